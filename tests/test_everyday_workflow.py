"""The paths users take every day give true answers, or one line that says what to do.

Each test runs the real command (a stage script, `attention-cnn`, `dvc`, `git clone`) on a real fixture and
checks the exit code, the message and the files on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from attention_cnn.atomic import atomic_torch_save
from attention_cnn.cli import main
from attention_cnn.params import ParamsError, parse_params
from e2e import GIT_USER, REPO, VENV_BIN, run, stages_run
from test_safety import assert_one_line_error, snapshot, workspace  # noqa: F401 (a fixture)

ENV = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO / "src"),
       "DVC_NO_ANALYTICS": "1"}


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()  # gone, as a killed run's process
    return done.pid


def gone(pid: int, within_s: float) -> bool:
    """True once `pid` has exited (a zombie waiting for a reaper counts as exited)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


def run_clean(capsys, *argv) -> tuple[int, str]:
    """`attention-cnn clean ARGV`; its exit code and stdout (stderr must stay empty)."""
    try:
        main(["clean", *map(str, argv)])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    assert err == ""
    return code, out


def copy_of(built_repo, folder: Path) -> Path:
    folder.mkdir()
    return built_repo(folder)


def wait_for(path_glob, within_s: float = 60) -> Path:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = sorted(path_glob())
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError("timed out waiting for a file")


# ---------------------------------------------------------------------------- the stages' first line


def test_a_python_without_the_packages_is_one_line(tmp_path):
    """`python -S`: the interpreter without its site-packages, as the system python without the venv's."""
    for stage in sorted((REPO / "stages").glob("*.py")):
        done = subprocess.run([sys.executable, "-S", str(stage)], cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, (stage.name, done.stderr)
        assert_one_line_error(done.stderr, stage.name, "lacks torch", "source .venv/bin/activate")
        assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


STARTED_CHILD = """import os, pathlib, sys, time
from attention_cnn.startup import exit_with_parent
exit_with_parent()
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(120)
"""


@pytest.mark.parametrize("launch", ["direct", "sh -c", "bash -c, two commands"])
def test_a_started_process_ends_with_the_one_that_started_it(tmp_path, launch):
    """The stage's parent is dvc (bash execs `cmd`), or a shell that dvc started (dash, or a `cmd` of two
    commands, forks): SIGKILL of the starter ends the stage either way."""
    (tmp_path / "child.py").write_text(STARTED_CHILD)
    child = f"{sys.executable} {tmp_path / 'child.py'} {tmp_path / 'pid'}"
    argv = {"direct": child.split(), "sh -c": ["/bin/sh", "-c", f"{child}; true"],
            "bash -c, two commands": ["bash", "-c", f"{child}; true"]}[launch]
    starter = subprocess.Popen([sys.executable, "-c", f"import subprocess, time; subprocess.Popen({argv!r}); "
                                "time.sleep(120)"], env=ENV, start_new_session=True)
    try:
        stage = int(wait_for(lambda: [tmp_path / "pid"] if (tmp_path / "pid").exists() else []).read_text() or 0)
        assert stage and not gone(stage, within_s=1), "the started process exited by itself"
        starter.kill()
        starter.wait()
        assert gone(stage, within_s=5), f"the started process outlived its starter ({launch})"
    finally:
        try:
            os.killpg(starter.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_train_stage_ends_when_dvc_is_killed(built_repo, tmp_path):
    """`kill` of `dvc repro` alone: the stage it started exits within seconds, releases its lock and leaves no
    temporary file; its checkpoint stays, for the next run to resume. SHELL unset, as under CI or cron: dvc runs
    `cmd` through /bin/sh, which on Debian is dash and forks, so the stage's parent is the shell, not dvc."""
    repo = copy_of(built_repo, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(epochs=300, patience=300)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {key: value for key, value in ENV.items() if key != "SHELL"}
    dvc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        lock = wait_for(lambda: (repo / "models/.checkpoints").glob("*.lock"))
        wait_for(lambda: (repo / "models/.checkpoints").glob("*.pt"))  # an epoch is done
        stage = int(lock.read_text())
        assert stage != dvc.pid
        dvc.kill()
        dvc.wait()
        assert gone(stage, within_s=10), "the train stage outlived dvc"
    finally:
        try:
            os.killpg(dvc.pid, signal.SIGKILL)  # the stage too, should the test fail
        except ProcessLookupError:
            pass
    left = [p.name for p in (repo / "models").rglob("*")]
    assert len([name for name in left if name.endswith(".pt") and name != "model.pt"]) == 1, left  # resumable
    assert not [name for name in left if ".tmp" in name or name.endswith(".lock")], left
    assert not (repo / "models/model.pt").exists()


# ---------------------------------------------------------------------------- two runs at once


def test_two_processes_writing_one_file_never_share_a_temp_file(tmp_path):
    """Both start writing at once (after their slow torch import), 100 times each, as two training runs would."""
    writer = ("import pathlib, sys, time, torch\nfrom attention_cnn.atomic import atomic_torch_save\n"
              "folder = pathlib.Path(sys.argv[2]).parent\n(folder / f'ready{sys.argv[1]}').touch()\n"
              "while not (folder / 'go').exists():\n    time.sleep(0.001)\n"
              "for i in range(100):\n    atomic_torch_save({'x': torch.full((4096,), float(sys.argv[1]))}, sys.argv[2])\n")
    target = tmp_path / "out" / "model.pt"
    target.parent.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(k), str(target)], env=ENV, stderr=subprocess.PIPE,
                              text=True) for k in (1, 2)]
    wait_for(lambda: [] if len(list(target.parent.glob("ready*"))) < 2 else [target.parent])
    (target.parent / "go").touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    import torch

    assert torch.load(target, weights_only=True)["x"][0].item() in (1.0, 2.0)
    assert sorted(p.name for p in target.parent.iterdir()) == ["go", "model.pt", "ready1", "ready2"]


def train_argv(ws: Path, out: Path, params: Path) -> list[str]:
    return [sys.executable, "-m", "attention_cnn.cli", "train", "--params", str(params),
            "--prepared", str(ws / "data/prepared"), "--model", str(out / "models/model.pt"),
            "--metrics-dir", str(out / "metrics")]


def test_a_second_training_run_of_the_same_fingerprint_is_refused_then_clean_lists_what_is_left(
        workspace, tmp_path, capsys, monkeypatch):
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw.update(model={"channels": 4, "hidden": 8}, train={"epochs": 6, "patience": 6, "batch_size": 4})
    params.write_text(yaml.safe_dump(raw))
    argv = train_argv(workspace, tmp_path, params)
    first = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "models/.checkpoints").glob("*.pt"))
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-training, for as long as the test needs
        lock = next((tmp_path / "models/.checkpoints").glob("*.lock"))
        second = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert_one_line_error(second.stderr, str(lock), f"(PID {first.pid})", "another training run",
                              f"kill {first.pid}")
        clean_argv = ["--params", params, "--prepared", workspace / "data/prepared",
                      "--model", tmp_path / "models/model.pt"]
        monkeypatch.chdir(tmp_path)
        # A running run's checkpoint is never listed.
        assert run_clean(capsys, *clean_argv, "--yes") == (0, "clean: nothing to remove.\n")
    finally:
        first.kill()  # killed mid-run: its lock file stays, its flock is gone
        first.wait()
    checkpoint = next((tmp_path / "models/.checkpoints").glob("*.pt"))

    # A killed run's leftovers: a temp folder holding a decoded raw file, a half-written checkpoint, and
    # names clean did not create (kept whatever they look like).
    pid = dead_pid()
    raw_folder = tmp_path / "data" / f".prepared.tmp-{pid}-0123456789ab"
    raw_folder.mkdir(parents=True)
    (raw_folder / "images.raw").write_bytes(bytes(3 * 2**20))
    half = tmp_path / "models/.checkpoints" / f"{checkpoint.name}.tmp-{pid}-0123456789ab"
    half.write_bytes(bytes(1000))
    mine = [tmp_path / "data" / ".prepared.tmp-mine", tmp_path / "models/.checkpoints/notes.pt",
            tmp_path / "output" / f".x.tmp-{os.getpid()}-0123456789ab"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep")
    before = snapshot(tmp_path)
    code, out = run_clean(capsys, *clean_argv)
    assert code == 0
    out = out.splitlines()
    killed_mid_write = sorted((tmp_path / "models/.checkpoints").glob(f"*.tmp-{first.pid}-*"))  # rarely one
    listed = [f"data/{raw_folder.name}", f"models/.checkpoints/{half.name}", str(lock),  # its process is gone
              *[f"models/.checkpoints/{p.name}" for p in killed_mid_write]]
    assert out[0] == "clean: would remove (a dry run; `attention-cnn clean --yes` removes):"
    assert sorted(line.split()[0] for line in out[1:-1]) == sorted(listed)
    assert "3.0 MiB" in out[1] and f"a killed run's temporary folder (process {pid} is gone)" in out[1]
    assert out[-1].startswith("clean: would free ") and out[-1].endswith(f" in {len(listed)} items.")
    assert snapshot(tmp_path) == before  # a dry run

    # The same params resume the killed run's checkpoint (its stale lock is taken over) and finish.
    resumed = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout and (tmp_path / "models/model.pt").is_file()
    assert not checkpoint.exists() and not half.exists()  # the finished run's own leftovers are gone

    # A checkpoint of other params would never resume with these: clean lists it, --yes removes it.
    atomic_torch_save({"format": 2}, checkpoint.with_name("0123456789abcdef.pt"))
    code, out = run_clean(capsys, *clean_argv, "--yes")
    assert code == 0
    assert "clean: removing:" in out and "0123456789abcdef.pt" in out and "other params, data or code" in out
    assert not raw_folder.exists() and not checkpoint.with_name("0123456789abcdef.pt").exists()
    assert all(path.read_text() == "keep" for path in mine)


# ---------------------------------------------------------------------------- data.source


@pytest.mark.parametrize("source", ["../photos", "~/photos", "data/../../photos"])
def test_a_source_that_dvc_would_resolve_elsewhere_is_refused(tmp_path, source):
    with pytest.raises(ParamsError, match="absolute") as refused:
        parse_params({"data": {"source": source}})
    assert f"'data.source' is {source!r}" in str(refused.value)
    for fine in ("data/sample", "images/../data/sample", str(tmp_path)):
        assert parse_params({"data": {"source": fine}}).data.source == fine


def test_the_stage_refuses_a_relative_source_outside_the_repo_in_one_line(tmp_path):
    (tmp_path / "photos").mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "../photos"}}))
    done = subprocess.run([sys.executable, str(REPO / "stages/prepare.py")], cwd=repo, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "'data.source' is '../photos'", "--temp", "data.source=/path/to/photos")
    assert sorted(p.name for p in repo.iterdir()) == ["params.yaml"]


# ---------------------------------------------------------------------------- the README's undo recipe


def test_readme_undo_recipe_restores_results_in_a_fresh_clone(built_repo, tmp_path):
    """A clone whose committed dvc.lock names outputs this machine never produced (another CPU's rounding),
    a plain `dvc exp run -S`, then the README's undo: the results come back from DVC's run cache, no re-run."""
    origin = copy_of(built_repo, tmp_path / "origin")
    lock = yaml.safe_load((origin / "dvc.lock").read_text())
    for out in lock["stages"]["visualize"]["outs"]:
        out["md5"] = "0" * 32 + ".dir"  # what another CPU computed: not in this machine's cache
    (origin / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    run(["git", "add", "-A"], origin)
    run(["git", *GIT_USER, "commit", "-qm", "results of another machine"], origin)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    # This machine's cache (its run cache included): what it computed in the origin checkout.
    run(["dvc", "cache", "dir", "--local", str(origin / ".dvc/cache")], clone)
    assert stages_run(run(["dvc", "repro"], clone)) == ["visualize"]  # the only stage whose outputs are foreign
    figures = snapshot(clone / "output/visualize")

    assert stages_run(run(["dvc", "exp", "run", "-S", "visualize.num_images=2"], clone)) == ["visualize"]
    assert snapshot(clone / "output/visualize") != figures
    run(["git", "checkout", "params.yaml"], clone)  # the README's undo
    log = run(["dvc", "repro"], clone)
    assert stages_run(log) == [] and "Stage 'visualize' is cached - skipping run, checking out outputs" in log
    assert snapshot(clone / "output/visualize") == figures
    assert run(["git", "diff", "--cached", "--name-only"], clone) == ""  # dvc.lock is not staged (no autostage)

    # The old recipe, for the record: the committed dvc.lock names figures this machine never made.
    run(["git", "checkout", "dvc.lock"], clone)
    done = subprocess.run(["dvc", "checkout"], cwd=clone, env=ENV, capture_output=True, text=True)
    assert done.returncode != 0 and not (clone / "output/visualize").exists()


# ---------------------------------------------------------------------------- dvc plots diff


def test_plots_diff_gives_each_revision_its_own_colour_in_every_chart(built_repo, tmp_path):
    """The workspace against HEAD: two revisions (with the same numbers, which does not matter to the encoding)."""
    repo = copy_of(built_repo, tmp_path / "repo")
    run(["git", "add", "-A"], repo)
    run(["git", *GIT_USER, "commit", "-qm", "results"], repo)
    charts = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], repo))["data"]
    checked = 0
    for title, renders in charts.items():
        for render in renders:
            if render["type"] != "vega":
                continue
            spec = render["content"]
            assert {row["rev"] for row in spec["data"]["values"]} == {"workspace", "HEAD"}, title
            layers = _layers(spec)
            if "facet" in spec:  # one panel per revision: a band across its top, in the revision's colour
                assert spec["facet"]["column"]["field"] == "rev", title
                assert spec["transform"][-1]["as"] == "rev_colour" and "datum.rev_rank" in spec["transform"][-1]["calculate"]
                assert any(layer.get("encoding", {}).get("stroke", {}).get("field") == "rev_colour"
                           for layer in layers), title
            else:  # curves: one colour per revision and series
                assert spec["encoding"]["color"]["field"] == "line", title
                assert {"calculate": "datum.rev + ' · ' + datum.series", "as": "line"} in spec["transform"]
            checked += 1
    assert checked == 9  # six pipeline charts and the three of the explanations (methods.json)


def _layers(spec: dict) -> list[dict]:
    inner = spec.get("spec", spec)
    return [inner, *inner.get("layer", [])]
