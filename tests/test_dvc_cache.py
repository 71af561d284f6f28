"""The DVC cache follows the code: stages import the src/ of the copy they run in, and a workspace restored from
the cache (`dvc checkout`, `dvc exp apply`) is up to date, so nothing retrains. Real `dvc` in temporary repos."""

import shutil
from pathlib import Path

import pytest

from e2e import run, stages_run

OUTS = ("data/sample", "data/prepared", "models", "metrics", "output")


@pytest.fixture(scope="module")
def repo(built_repo, tmp_path_factory) -> Path:
    """Like test_pipeline's repo (tiny params, one `dvc repro`), but a copy of its own: this module's tests
    change it."""
    return built_repo(tmp_path_factory.mktemp("cache"))


def _up_to_date(root: Path) -> bool:
    return "Data and pipelines are up to date" in run(["dvc", "status"], root)


def test_a_stage_imports_the_src_of_the_copy_it_runs_in(repo, tmp_path):
    """The package is installed (editable) from another checkout; the copy's own src/ must win."""
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    errors = copy / "src" / "attention_cnn" / "errors.py"
    errors.write_text(errors.read_text() + '\nprint("imported errors.py from", __file__, flush=True)\n')
    log = run(["dvc", "repro", "--force", "--single-item", "sample"], copy)
    assert f"imported errors.py from {errors}" in log


def test_finished_training_leaves_no_checkpoint_and_the_workspace_is_up_to_date(repo):
    assert not (repo / "models" / ".checkpoints").exists()
    assert _up_to_date(repo)


def test_a_workspace_restored_by_checkout_retrains_nothing(repo):
    """As in a fresh clone followed by `dvc pull`: every out comes from the cache, no checkpoint exists."""
    for out in OUTS:
        shutil.rmtree(repo / out)
    run(["dvc", "checkout"], repo)
    assert (repo / "models" / "model.pt").is_file()
    assert _up_to_date(repo)
    assert stages_run(run(["dvc", "repro"], repo)) == []


def test_exp_apply_then_repro_retrains_nothing(repo):
    # Another learning rate changes every weight. (train.epochs=1 did not always: when the 2-epoch run's best epoch
    # is its first, both runs save the same weights, and DVC rightly skips evaluate and visualize.)
    assert stages_run(run(["dvc", "exp", "run", "-n", "faster", "-S", "train.lr=0.002"], repo)) == [
        "train", "evaluate", "visualize"]
    run(["dvc", "exp", "apply", "faster"], repo)
    assert _up_to_date(repo)
    assert stages_run(run(["dvc", "repro"], repo)) == []
