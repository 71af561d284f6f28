"""What a newcomer meets on the training side, and odd inputs to `attention-cnn train` / `clean`: each test runs the
real command (`python -m attention_cnn.cli ...`, or `main` in this process where nothing can hang) and checks the
exit code, the message and the files on disk. Where the logic is what is tested, it is fed scripted inputs, so
nothing here depends on the CPU's float rounding."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from attention_cnn.cli import main
from attention_cnn.data.prepared import PreparedSplit, save_split
from attention_cnn.memory import available_memory_bytes, dense_attention_bytes
from attention_cnn.metrics import (SMALL_DATA_SECTION, chance_ceiling, near_chance, not_learned_warning,
                                   too_few_to_tell)
from attention_cnn.params import parse_params
from attention_cnn.training.schedule import EpochResult, TrainingState, plan_training
from e2e import REPO
from test_everyday_workflow import ENV, run_clean, wait_for
from test_safety import assert_one_line_error, run_cli, snapshot, workspace  # noqa: F401 (a fixture)
from test_train import one_thread  # noqa: F401 (an autouse fixture: one thread)

CLASSES = ["forest", "sea"]


def prepared(folder: Path, size: int, counts: dict[str, int], seed: int = 0) -> Path:
    """Random uint8 splits of `size` px, two classes, `counts[split]` images each: what train reads."""
    g = torch.Generator().manual_seed(seed)
    for split, n in counts.items():
        save_split(folder, split, PreparedSplit(
            images=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            labels=torch.arange(n) % 2, masks=None, files=[f"{CLASSES[i % 2]}/{split}{i}.png" for i in range(n)],
            classes=CLASSES))
    return folder


def write_params(path: Path, img_size: int, model: dict, train: dict) -> Path:
    raw = {"img_size": img_size, "model": {"hidden": 8, **model},
           "train": {"device": "cpu", "augment": False, "patience": 100, **train}}
    path.write_text(yaml.safe_dump(raw))
    return path


def train_argv(folder: Path, params: Path, out: Path) -> list[str]:
    return ["train", "--params", str(params), "--prepared", str(folder), "--model", str(out / "models/model.pt"),
            "--metrics-dir", str(out / "metrics")]


def cli_train(capsys, folder: Path, params: Path, out: Path) -> tuple[int, str, str]:
    """`attention-cnn train` in this process (no second torch import); its exit code, stdout and stderr."""
    try:
        main(train_argv(folder, params, out))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    printed = capsys.readouterr()
    return code, printed.out, printed.err


# ---------------------------------------------------------------------------- dense: the guard's estimate

PEAK_RSS = """import json, resource, sys
from attention_cnn.cli import main
peaks = []
for argv in json.loads(sys.argv[1]):
    main(argv)
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps(peaks))
"""


def test_the_dense_guard_bounds_what_training_really_takes(tmp_path):
    """`attention-cnn train` with `conv` (a C x C layer), then the same with `dense`, in one process: what dense
    adds to the peak RSS must be at most the guard's estimate. Three epochs, so Adam steps run while a copy of the
    best weights is held and after it was replaced."""
    img, channels, batch = 96, 24, 8  # a 3,456 x 3,456 layer: 12 million weights, 48 MB each fp32 copy
    folder = prepared(tmp_path / "prepared", img, {"train": batch, "val": 2})
    runs = []
    for attention in ("conv", "dense"):
        params = write_params(tmp_path / f"{attention}.yaml", img, {"attention": attention, "channels": channels},
                              {"epochs": 3, "batch_size": batch})
        runs.append(["train", "--params", str(params), "--prepared", str(folder),
                     "--model", str(tmp_path / attention / "model.pt"), "--metrics-dir", str(tmp_path / attention)])
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, json.dumps(runs)], env={**ENV, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / attention / "model.pt").is_file() for attention in ("conv", "dense"))
    conv_peak, dense_peak = json.loads(done.stdout.splitlines()[-1])
    added, estimate = dense_peak - conv_peak, dense_attention_bytes(channels, img, batch_size=batch)
    assert added <= estimate, f"dense added {added / 1e6:.0f} MB to the peak, the guard expects {estimate / 1e6:.0f}"
    # And the test measures the layer: at least its weights and their gradient (8 of the 36 bytes a weight) show
    # in the peak; how much of the rest does depends on when glibc reuses freed blocks (0.34 to 0.91 of the
    # estimate seen on one machine).
    weights = (channels * (img // 8) ** 2) ** 2
    assert added >= 8 * weights, f"dense added {added / 1e6:.0f} MB, the guard expects {estimate / 1e6:.0f}"


def test_the_dense_layer_that_was_killed_for_memory_is_refused_in_one_line(tmp_path, capsys):
    """img_size 250, dense, 32 channels: 945 million weights. The guard used to say 15.2 GB while training took
    over 24 GB and was killed; now it asks for 34.1 GB, before anything is allocated or written."""
    available, _ = available_memory_bytes("cpu")
    needed = dense_attention_bytes(32, 250, batch_size=4)
    assert 34.0e9 < needed < 34.2e9
    if needed <= available:
        pytest.skip(f"this machine has {available / 1e9:.0f} GB available: the layer fits here")
    folder = prepared(tmp_path / "prepared", 250, {"train": 4, "val": 2})
    params = write_params(tmp_path / "params.yaml", 250, {"attention": "dense", "channels": 32}, {"batch_size": 4})
    code, _, err = cli_train(capsys, folder, params, tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, f"{params}: 'model.attention' dense at img_size=250", "34.1 GB",
                          "model.attention=conv")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- "did not learn" on a tiny split


def test_a_perfect_score_on_a_tiny_split_is_never_at_chance():
    # 2 classes, 6 val images: a guesser gets all 6 right 1/64 of the time, so 6 images cannot tell; the ceiling
    # (it was 0.5 + 3 * sqrt(0.25 / 6) = 1.11) stays half an image short of perfect.
    assert too_few_to_tell(2, 6) and 0.9 < chance_ceiling(2, 6) < 1.0
    assert near_chance(5 / 6, 2, 6) and not near_chance(1.0, 2, 6) and not_learned_warning("x", 1.0, 2, 6) is None
    assert not_learned_warning("best val accuracy", 5 / 6, 2, 6) == (
        "warning: best val accuracy 0.833 on 6 images is within what guessing reaches (0.500 for 2 classes): too "
        "few images to tell whether the model learned. Give the split more images (data.val_fraction, "
        "data.test_fraction, or a bigger folder). See " + SMALL_DATA_SECTION + ".")
    # From 10 images on, 10 of 10 is rarer than 3 standard errors' luck (1/1024): 9 of 10 is still chance.
    assert not too_few_to_tell(2, 10) and near_chance(0.9, 2, 10) and not near_chance(1.0, 2, 10)
    assert "the model did not learn" in not_learned_warning("test accuracy", 0.9, 2, 10)
    assert too_few_to_tell(3, 6) and not too_few_to_tell(3, 7)
    assert near_chance(0.55, 3, 27) and not near_chance(0.70, 3, 27)  # 3 standard errors on 27 images
    # A big split keeps the 5-point floor.
    assert near_chance(0.29, 4, 10_000) and not near_chance(0.31, 4, 10_000)
    # And patience counts once a perfect score is reached on the tiny split.
    state = TrainingState(patience=2, epochs=100, chance_ceiling=chance_ceiling(2, 6))
    for n, accuracy in enumerate([0.5, 1.0, 1.0, 1.0], start=1):
        state.update(EpochResult(epoch=n, train_loss=0.1, train_accuracy=accuracy, val_loss=0.1,
                                 val_accuracy=accuracy, lr=1e-3, images_per_s=1.0))
    assert state.stopping_early and state.best_epoch == state.last_progress_epoch == 2


def test_a_model_that_separates_a_tiny_val_split_is_not_told_it_did_not_learn(tmp_path, capsys):
    """Black images against white ones, 6 val images: any CPU's training gets every one right."""
    folder = prepared(tmp_path / "prepared", 16, {"train": 12, "val": 6})
    for split in ("train", "val"):  # class 0 black, class 1 white
        blob = torch.load(folder / f"{split}.pt", weights_only=True)
        blob["images"] = (blob["labels"] * 255).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 16, 16).contiguous()
        torch.save(blob, folder / f"{split}.pt")
    params = write_params(tmp_path / "params.yaml", 16, {"channels": 4},
                          {"steps": 48, "val_every": 12, "batch_size": 4, "lr": 0.01})
    code, out, err = cli_train(capsys, folder, params, tmp_path / "out")
    assert code == 0, err
    assert "best val accuracy 1.0000" in out, out
    assert "warning" not in out + err and "did not learn" not in out
    assert (tmp_path / "out/models/model.pt").is_file()


# ---------------------------------------------------------------------------- train.steps is a cap


@pytest.mark.parametrize("num_train, batch, steps, val_every, expected", [
    (60, 32, 60, 1_000_000, (1, 30, 2, [[2] * 30])),     # was one epoch of 1,000,002 steps: now of 60
    (60, 32, 1, 40, (1, 1, 2, [[1]])),                    # was 40 steps
    (12, 4, 7, 3, (3, 1, 3, [[3], [3], [1]])),            # the last epoch is what the budget leaves
    (12, 4, 5, 1_000_000, (1, 2, 3, [[3, 2]])),           # a pass cut short
    (840, 32, 2000, 50, (38, 2, 27, [[27, 27]] * 37 + [[2]])),  # the built-in sample: 2,000, not 2,052
    (6000, 32, 1500, 50, (8, 1, 188, [[188]] * 7 + [[184]])),
])
def test_auto_epochs_never_plan_more_steps_than_train_steps(num_train, batch, steps, val_every, expected):
    tp = parse_params({"train": {"batch_size": batch, "steps": steps, "val_every": val_every}}).train
    plan = plan_training(tp, num_train)
    epochs, passes, per_pass, pass_steps = expected
    assert (plan.epochs, plan.passes, plan.steps_per_pass) == (epochs, passes, per_pass)
    assert [plan.pass_steps(e) for e in range(1, plan.epochs + 1)] == pass_steps
    assert plan.steps == steps == sum(map(sum, pass_steps))


def test_explicit_epochs_are_whole_passes_whatever_train_steps():
    plan = plan_training(parse_params({"train": {"epochs": 3, "batch_size": 4, "steps": 1}}).train, 10)
    assert (plan.epochs, plan.steps, plan.pass_steps(3)) == (3, 9, [3])


def test_a_real_run_makes_train_steps_optimizer_steps(tmp_path, capsys, monkeypatch):
    """12 training images in batches of 4: 3 steps a pass. The optimizer's steps are counted as torch makes them."""
    counted, step = [], torch.optim.Adam.step

    def counting(self, *args, **kwargs):
        counted.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    folder = prepared(tmp_path / "prepared", 16, {"train": 12, "val": 4})
    plans = {}
    for steps, val_every, epochs in ((1, 40, 1), (5, 1_000_000, 1), (7, 3, 3)):
        params = write_params(tmp_path / f"{steps}.yaml", 16, {"channels": 4},
                              {"steps": steps, "val_every": val_every, "batch_size": 4})
        counted.clear()
        code, out, err = cli_train(capsys, folder, params, tmp_path / str(steps))
        assert code == 0, err
        assert len(counted) == steps
        plans[steps] = [line for line in out.splitlines() if line.startswith("train: ")]
        assert (tmp_path / f"{steps}/models/model.pt").is_file()
        logged = json.loads((tmp_path / f"{steps}/metrics/metrics.json").read_text())
        assert logged["step"] == epochs - 1  # DVCLive's last step: one per epoch, from 0
    assert plans == {
        1: ["train: 1 epoch of 1 steps (1 of a pass's 3 steps over 12 images), 1 steps in all (train.steps=1)."],
        5: ["train: 1 epoch of 5 steps (1 pass and 2 steps over 12 images), 5 steps in all (train.steps=5)."],
        7: ["train: 3 epochs of 3 steps (1 pass over 12 images), 7 steps in all (train.steps=7)."]}


# ---------------------------------------------------------------------------- SIGTERM and Ctrl-C


def ctrl_c_live() -> None:
    """A child's SIGINT as in a terminal's foreground job. A pytest started in the background (`make test &`,
    nohup, a script's `&`) inherits SIGINT ignored, and train rightly leaves an ignored Ctrl-C ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_train(folder: Path, params: Path, out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "attention_cnn.cli", "train", "--params", str(params), "--prepared", str(folder),
            "--model", str(out / "models/model.pt"), "--metrics-dir", str(out / "metrics")]
    return subprocess.Popen(argv, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_live)


def stopped(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def last_line(err: str) -> str:
    return [line for line in re.split(r"[\r\n]", err) if line.strip()][-1]


def start_endless_train(tmp_path: Path, out: Path, val_every: int) -> subprocess.Popen:
    """`attention-cnn train` on a tiny folder with a budget it never ends by itself, for a signal to stop."""
    folder = prepared(tmp_path / "prepared", 16, {"train": 12, "val": 4})
    params = write_params(tmp_path / "params.yaml", 16, {"channels": 4},
                          {"steps": 10_000_000, "val_every": val_every, "batch_size": 4})
    return start_train(folder, params, out)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_train_keeps_its_checkpoint_releases_its_lock_and_says_how_to_resume(tmp_path, sig, code):
    """What a cancelled Slurm job (SIGTERM) or Ctrl-C (SIGINT) does to `attention-cnn train` after some epochs."""
    out = tmp_path / "out"
    proc = start_endless_train(tmp_path, out, val_every=3)
    try:
        checkpoint = wait_for(lambda: (out / "models/.checkpoints").glob("*.pt"))
    finally:
        returncode, err = stopped(proc, sig)
    assert returncode == code, err
    assert last_line(err) == (f"train: stopped by {sig.name}; {checkpoint} keeps it up to the last finished epoch: "
                              "run the same command again to resume from there.")
    assert "Traceback" not in err
    left = sorted(p.relative_to(out / "models").as_posix() for p in (out / "models").rglob("*"))
    assert left == [".checkpoints", f".checkpoints/{checkpoint.name}"], left  # no lock, no temp, no model
    assert (out / "metrics/metrics.json").is_file()  # the epochs it logged, which the resume replays


SWALLOWED_STOP = """
import os, signal
from attention_cnn import startup
startup.handle_stop_signals()

class Finalized:
    def __del__(self):  # the handler runs in here, and Python drops what a __del__ raises
        os.kill(os.getpid(), signal.SIG{name})
        sum(range(10**6))

Finalized()
print("still running", flush=True)
startup.raise_if_stopped()
print("not reached", flush=True)
"""


# An uncaught KeyboardInterrupt ends Python by SIGINT (-2); SystemExit(143) with that status.
@pytest.mark.parametrize("name, code", [("INT", -signal.SIGINT), ("TERM", 143)])
def test_a_stop_signal_dropped_inside_a_finalizer_is_raised_again_by_the_loop(name, code):
    done = subprocess.run([sys.executable, "-c", SWALLOWED_STOP.format(name=name)], env=ENV, capture_output=True,
                          text=True, timeout=60, preexec_fn=ctrl_c_live)
    assert "Exception ignored in" in done.stderr and done.stdout == "still running\n", done.stderr
    assert done.returncode == code, done.stderr
    if name == "INT":
        assert last_line(done.stderr) == "KeyboardInterrupt"


def test_a_train_stopped_before_its_first_epoch_leaves_no_metrics_folder(tmp_path):
    out = tmp_path / "out"
    proc = start_endless_train(tmp_path, out, val_every=1_000_000)
    try:
        wait_for(lambda: [out / "metrics"] if (out / "metrics").is_dir() else [])  # training has started
    finally:
        returncode, err = stopped(proc, signal.SIGTERM)
    assert returncode == 143, err
    assert last_line(err) == ("train: stopped by SIGTERM; no epoch had finished, so there is nothing to resume: "
                              "the same command starts afresh.")
    assert not (out / "metrics").exists()
    assert [p for p in out.rglob("*") if not p.is_dir()] == []  # no lock, checkpoint or temp file either


# ---------------------------------------------------------------------------- clean


def test_clean_keeps_what_it_did_not_write_and_removes_a_killed_runs_lock(tmp_path, capsys, monkeypatch):
    """A real run killed with SIGKILL (its lock file stays, with its PID), plus things under checkpoint names
    that training never writes. `clean --yes` removes the lock and a checkpoint of other params only."""
    folder = prepared(tmp_path / "data/prepared", 16, {"train": 12, "val": 4})
    params = write_params(tmp_path / "params.yaml", 16, {"channels": 4},
                          {"steps": 10_000_000, "val_every": 3, "batch_size": 4})
    proc = start_train(folder, params, tmp_path)
    try:
        current = wait_for(lambda: (tmp_path / "models/.checkpoints").glob("*.pt"))
    finally:
        proc.kill()  # as the kernel's OOM killer does: nothing runs after it
        proc.communicate()
    checkpoints = current.parent
    lock = current.with_suffix(".lock")
    assert lock.read_text().strip() == str(proc.pid)
    other = checkpoints / "0123456789abcdef.pt"
    other.write_bytes(b"a checkpoint of other params")
    kept = {checkpoints / "fedcba9876543210.pt": "folder", checkpoints / "1111111111111111.pt": "link",
            checkpoints / "2222222222222222.lock": "live", checkpoints / "3333333333333333.lock": "not a pid"}
    (checkpoints / "fedcba9876543210.pt").mkdir()
    (checkpoints / "fedcba9876543210.pt/thesis.txt").write_text("precious")
    (checkpoints / "1111111111111111.pt").symlink_to(tmp_path / "params.yaml")
    (checkpoints / "2222222222222222.lock").write_text(f"{os.getpid()}\n")  # a live process: this one
    (checkpoints / "3333333333333333.lock").write_text("notes\n")
    before = snapshot(checkpoints)
    monkeypatch.chdir(tmp_path)
    code, out = run_clean(capsys, "--yes")
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == [f"clean: kept models/.checkpoints/1111111111111111.pt: a link, not a file training writes",
                         f"clean: kept models/.checkpoints/fedcba9876543210.pt: a folder, not a file training writes"]
    assert lines[2] == "clean: removing:"
    removed = {line.split()[0]: line for line in lines[3:-1]}
    assert sorted(removed) == ["models/.checkpoints/0123456789abcdef.pt", f"models/.checkpoints/{lock.name}"]
    assert f"a killed run's lock (process {proc.pid} is gone)" in removed[f"models/.checkpoints/{lock.name}"]
    assert lines[-1].startswith("clean: freed ") and lines[-1].endswith(" in 2 items.")
    assert not lock.exists() and not other.exists()
    assert current.is_file()  # the current checkpoint stays: the next run resumes it
    assert snapshot(checkpoints) == {k: v for k, v in before.items() if k not in (lock.name, other.name)}
    assert (checkpoints / "1111111111111111.pt").is_symlink()


def test_clean_with_invalid_params_is_an_error_naming_the_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "models/.checkpoints").mkdir(parents=True)
    checkpoint = tmp_path / "models/.checkpoints/0123456789abcdef.pt"
    checkpoint.write_bytes(b"kept")
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"train": {"lr": -1}}))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "clean", "--yes", "--params", "other.yaml")
    assert code == 2
    assert_one_line_error(err, "error: other.yaml: 'train.lr' must be a number > 0.0", "Fix it in other.yaml")
    assert "params.yaml" not in err and checkpoint.read_bytes() == b"kept"


# ---------------------------------------------------------------------------- --params FILE


def test_errors_about_a_key_name_the_params_file_given(tmp_path, capsys):
    folder = prepared(tmp_path / "prepared", 16, {"train": 4, "val": 2})
    bad = tmp_path / "other.yaml"
    bad.write_text(yaml.safe_dump({"img_size": 16, "model": {"attention": "dense", "channels": "many"}}))
    code, _, err = cli_train(capsys, folder, bad, tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, f"error: {bad}: 'model.channels' must be an integer", f"Fix it in {bad}")
    assert "params.yaml" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- evaluate's warning


def test_attention_cnn_evaluate_warns_as_the_stage_does(workspace, tmp_path):
    """An untrained model: the stage script and `attention-cnn evaluate` print the same lines, warning included."""
    repo = tmp_path / "repo"
    shutil.copytree(workspace, repo)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["evaluate"].update(methods=["mask"], sanity_images=0, figures=0)  # the warning is what is tested
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    printed = {}
    for name, argv in (("stage", [str(REPO / "stages/evaluate.py")]), ("cli", ["-m", "attention_cnn.cli", "evaluate"])):
        shutil.rmtree(repo / "metrics", ignore_errors=True)
        shutil.rmtree(repo / "output", ignore_errors=True)
        done = subprocess.run([sys.executable, *argv], cwd=repo, env={**ENV, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert (repo / "metrics/evaluate/metrics.json").is_file()
        printed[name] = [line for line in done.stdout.splitlines() if line.startswith(("evaluate: test", "warning:"))]
    assert printed["cli"] == printed["stage"]
    assert printed["stage"][0].startswith("evaluate: test accuracy ")
    assert len(printed["stage"]) == 2 and printed["stage"][1].startswith("warning: test accuracy ")
