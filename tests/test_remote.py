"""A team shares one pipeline through a DVC remote: after `dvc push`, a fresh `git clone` plus `dvc pull` is up to
date and `dvc repro` retrains nothing; an experiment travels by `dvc exp push/pull`. Real git and `dvc`, with a
local folder as the remote."""

import filecmp
from pathlib import Path

import pytest

from e2e import run, stages_run

GIT_USER = ["-c", "user.name=t", "-c", "user.email=t@t"]
# What a pull must bring back, byte for byte: the model and every metrics file train and evaluate wrote.
SHARED_OUTS = ("models/model.pt", "metrics/train/metrics.json", "metrics/evaluate/metrics.json",
               "metrics/maps/mask.json")


def _up_to_date(root: Path) -> bool:
    return "Data and pipelines are up to date" in run(["dvc", "status"], root)


@pytest.fixture(scope="module")
def pushed(built_repo, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny pipeline after `dvc repro`, with a local-folder remote set as default, pushed and committed."""
    root = built_repo(tmp_path_factory.mktemp("origin"))
    remote = tmp_path_factory.mktemp("remote")
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], root)
    run(["dvc", "push"], root)
    run(["git", "add", "-A"], root)
    run(["git", *GIT_USER, "commit", "-qm", "pipeline results, shared remote"], root)
    return root, remote


def test_push_fills_the_remote(pushed):
    _, remote = pushed
    assert any(path.is_file() for path in remote.rglob("*"))


def test_fresh_clone_and_pull_is_up_to_date_and_retrains_nothing(pushed, tmp_path):
    origin, _ = pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "models" / "model.pt").exists()  # git alone does not carry the results
    run(["dvc", "pull"], clone)

    assert _up_to_date(clone)
    assert stages_run(run(["dvc", "repro"], clone)) == []
    for out in SHARED_OUTS:
        assert filecmp.cmp(origin / out, clone / out, shallow=False), out


def test_an_experiment_pushed_from_one_clone_is_pulled_and_applied_in_another(pushed, tmp_path):
    """`dvc exp push origin` sends the experiment's git ref to the git remote and its outputs to the DVC remote."""
    origin, _ = pushed
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    for clone in (alice, bob):
        run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    run(["dvc", "pull"], alice)
    # An evaluate-only change keeps this test short; the outputs travel the same way whichever stage wrote them.
    log = run(["dvc", "exp", "run", "-n", "fewer-steps", "-S", "evaluate.faithfulness_steps=2"], alice)
    assert stages_run(log) == ["evaluate"]
    run(["dvc", "exp", "push", "origin", "fewer-steps"], alice)

    run(["dvc", "exp", "pull", "origin", "fewer-steps"], bob)
    run(["dvc", "exp", "apply", "fewer-steps"], bob)
    metrics = "output/evaluate/explain.json"  # every score at full precision (deletion changes with the steps)
    assert not filecmp.cmp(origin / metrics, bob / metrics, shallow=False)  # the experiment's, not the commit's
    assert _up_to_date(bob)
    assert stages_run(run(["dvc", "repro"], bob)) == []
    for out in SHARED_OUTS:
        assert filecmp.cmp(alice / out, bob / out, shallow=False), out
