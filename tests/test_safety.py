"""No command loses, mislabels or hangs on a user's data, and every mistake is one clear line.

Each test runs the real command (the CLI's `main`, or the stage script in a subprocess where a hang or a
resource limit must be contained) on a folder built here, and checks the exit code, the message and the files
on disk before and after.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import runpy
import shutil
import subprocess
import sys
import zlib
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from attention_cnn.cli import main
from attention_cnn.data.prepare import prepare
from attention_cnn.data.prepared import PreparedSplit, save_split
from attention_cnn.errors import UserError
from attention_cnn.model import AttentionCNN, save_model
from attention_cnn.params import ModelParams, parse_params

PROGRESS_BAR = re.compile(r"\| *\d+/\d+ \[")  # tqdm: "| 3/12 [00:01<00:02, ...]"
REPO = Path(__file__).resolve().parents[1]
S = 16
CLASSES = ["forest", "sea", "street"]


def noise(path: Path, seed: int, size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `attention-cnn ARGV`; return its exit code and stderr."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    """stderr holds exactly one line besides progress bars: `error: ...` with every fragment."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """params.yaml, data/prepared and models/model.pt, tiny, as the evaluate and visualize commands read them."""
    root = tmp_path_factory.mktemp("workspace")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        n = 6
        save_split(root / "data/prepared", split, PreparedSplit(
            images=torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8),
            labels=torch.arange(n) % 3, masks=None, files=[f"{CLASSES[i % 3]}/{i}.png" for i in range(n)],
            classes=CLASSES))
    torch.manual_seed(0)
    model = AttentionCNN(len(CLASSES), S, ModelParams(channels=4, hidden=8))
    save_model(root / "models/model.pt", model.eval(), CLASSES, resize="stretch")
    params = {"img_size": S, "evaluate": {"batch_size": 4, "faithfulness_images": 2, "faithfulness_steps": 2},
              "visualize": {"num_images": 2, "per_class": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for k in range(3):
        noise(root / "images" / f"{k}.png", k)
    return root


def common(ws: Path) -> list:
    return ["--params", ws / "params.yaml", "--prepared", ws / "data/prepared", "--model", ws / "models/model.pt"]


# ---------------------------------------------------------------------------- output folders


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("precious")
    noise(path / "holiday.png", 1)
    return path


def command_argv(ws: Path, command: str, target: Path, other: Path) -> list:
    """`command` with its output `flag` at `target` (and any other output folder at `other`)."""
    name, flag = command.split()
    if name == "predict":
        return [name, "--model", ws / "models/model.pt", "--images", ws / "images", "--no-figures", flag, target]
    outs = {"--out": other / "out", "--metrics-dir": other / "metrics"} if name == "evaluate" else {"--out": None}
    outs[flag] = target
    return [name, *common(ws), *[x for flag_, path in outs.items() for x in (flag_, path)]]


@pytest.mark.parametrize("command", ["visualize --out", "evaluate --out", "evaluate --metrics-dir", "predict --out"])
def test_commands_refuse_a_folder_they_did_not_write(workspace, tmp_path, capsys, command):
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    code, err = run_cli(capsys, *command_argv(workspace, command, mine, tmp_path / "other"))
    assert code == 2
    assert_one_line_error(err, str(mine), "did not write", "holiday.png", "thesis.txt")
    assert snapshot(mine) == before
    assert [p for p in tmp_path.rglob("*") if p.is_file() and mine not in p.parents] == []  # nothing written
    assert not [p for p in tmp_path.rglob(".*")]  # and no temp folders left

    for _ in range(2):  # its own earlier output is replaced
        code, err = run_cli(capsys, *command_argv(workspace, command, tmp_path / "fresh", tmp_path / "other"))
        assert code == 0, err
    assert any((tmp_path / "fresh").iterdir())
    assert not [p for p in tmp_path.rglob(".*")]


def test_predict_refuses_out_at_or_above_images(workspace, tmp_path, capsys):
    images = tmp_path / "photos" / "2024"
    for k in range(2):
        noise(images / f"{k}.jpg", k)
    before = snapshot(tmp_path / "photos")
    for out in (images, images.parent, tmp_path / "photos" / "2024" / ".."):
        code, err = run_cli(capsys, "predict", "--model", workspace / "models/model.pt", "--images", images,
                            "--out", out)
        assert code == 2
        assert_one_line_error(err, f"--out {out}", "--images folder or a folder above it")
        assert snapshot(tmp_path / "photos") == before


def test_symlinked_out_is_followed_and_stays_a_link(workspace, tmp_path, capsys):
    target = tmp_path / "disk" / "predictions"
    target.parent.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    for _ in range(2):
        code, err = run_cli(capsys, "predict", "--model", workspace / "models/model.pt",
                            "--images", workspace / "images", "--out", link, "--no-figures", "--workers", "1")
        assert code == 0, err
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert sorted(p.name for p in target.iterdir()) == ["predictions.csv", "skipped.csv"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["predictions"]  # no half-done rename left


def test_a_killed_runs_temp_folders_are_removed_by_the_next_run(workspace, tmp_path, capsys):
    out = tmp_path / "vis"
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is gone, as a killed run's
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a run still going
    try:
        stale = [tmp_path / f".vis.tmp-{dead.pid}-0123456789ab", tmp_path / f".vis.old-{dead.pid}-0123456789ab"]
        for folder in stale:
            noise(folder / "01_half.png", 3)
        running = tmp_path / f".vis.tmp-{live.pid}-0123456789ab"
        running.mkdir()
        code, err = run_cli(capsys, "visualize", *common(workspace), "--out", out)
        assert code == 0, err
        assert not any(folder.exists() for folder in stale)
        assert running.is_dir()  # another run's build is never touched
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------- damaged files


def damaged_models(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir()
    data = good.read_bytes()
    blob = torch.load(good, weights_only=True)
    files = {"truncated": data[: len(data) // 2], "empty": b"",
             "random": np.random.default_rng(0).bytes(4000), "foreign pickle": pickle.dumps(Namespace(a=1))}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    wrong = {"unknown key": {"params": {**blob["params"], "width": 3}},
             "no classes": {"classes": None},
             "img_size as a string": {"img_size": "64"},
             "absurd width": {"params": {**blob["params"], "channels": 10**9}}}
    for name, change in wrong.items():
        paths[name] = folder / f"{name}.pt"
        torch.save({**blob, **change}, paths[name])
    return paths


def test_damaged_or_foreign_model_files_are_one_line_errors(workspace, tmp_path, capsys):
    paths = damaged_models(tmp_path / "models", workspace / "models/model.pt")
    for name, path in paths.items():
        for argv in (["predict", "--model", path, "--images", workspace / "images", "--out", tmp_path / "p"],
                     ["evaluate", *common(workspace)[:4], "--model", path, "--out", tmp_path / "e",
                      "--metrics-dir", tmp_path / "m"],
                     ["visualize", *common(workspace)[:4], "--model", path, "--out", tmp_path / "v"]):
            code, err = run_cli(capsys, *argv)
            assert code == 2, (name, argv[0])
            assert_one_line_error(err, str(path), "dvc repro train")
            assert "weights_only" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    code, err = run_cli(capsys, "predict", "--model", paths["absurd width"], "--images", workspace / "images",
                        "--out", tmp_path / "p")
    assert "model.channels" in err and "1000000000" in err


def test_the_installed_command_says_it_in_one_line(workspace, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04 half a zip")
    script = Path(sys.executable).parent / "attention-cnn"
    done = subprocess.run([str(script), "predict", "--model", str(bad), "--images", str(workspace / "images"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, str(bad), "dvc repro train")


def test_a_truncated_prepared_split_names_dvc_repro_prepare(workspace, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    shutil.copytree(workspace / "data/prepared", prepared)
    data = (prepared / "test.pt").read_bytes()
    (prepared / "test.pt").write_bytes(data[: len(data) // 3])
    code, err = run_cli(capsys, "visualize", "--params", workspace / "params.yaml", "--prepared", prepared,
                        "--model", workspace / "models/model.pt", "--out", tmp_path / "v")
    assert code == 2
    assert_one_line_error(err, str(prepared / "test.pt"), "dvc repro prepare")
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------------------- prepare on odd folders


def stage_repo(tmp_path: Path, source: Path, **data) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "stages", repo / "stages")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["img_size"] = S
    raw["data"].update({"source": str(source), "workers": 1, "val_fraction": 0.2, "test_fraction": 0.2, **data})
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    return repo


def run_prepare(repo: Path, stage: str = "prepare", prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The stage script in its own process (run by `prefix`, e.g. setpriv): a hang is cut by the timeout instead
    of stalling the suite."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([*prefix, sys.executable, f"stages/{stage}.py"], cwd=repo, capture_output=True, text=True,
                          timeout=120, env=env)


def run_prepare_here(repo: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The stage script in this process (no second torch import); returns its exit code and stdout."""
    monkeypatch.chdir(repo)
    try:
        runpy.run_path("stages/prepare.py", run_name="__main__")
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().out


def classes(root: Path, per_class: int = 5, names=("forest", "sea")) -> Path:
    for k, name in enumerate(names):
        for i in range(per_class):
            noise(root / name / f"{i}.png", 100 * k + i)
    return root


def test_symlinks_back_into_the_source_are_skipped_and_outside_ones_followed(tmp_path, monkeypatch, capsys):
    src = classes(tmp_path / "src")
    (src / "forest" / "loop").symlink_to("..", target_is_directory=True)       # the source itself
    (src / "sea" / "self").symlink_to(".", target_is_directory=True)           # its own class folder
    (src / "sea" / "forest too").symlink_to("../forest", target_is_directory=True)  # another class
    outside = classes(tmp_path / "elsewhere", per_class=2, names=("more",))
    (src / "forest" / "linked").symlink_to(outside / "more", target_is_directory=True)
    repo = stage_repo(tmp_path, src)
    code, stdout = run_prepare_here(repo, monkeypatch, capsys)
    assert code == 0
    report = json.loads((repo / "data/prepared/report.json").read_text())
    assert report["kept"] == 12  # 5 + 5, plus the 2 linked from outside: nothing read twice
    ignored = {entry["path"]: entry["reason"] for entry in report["ignored"]}
    assert set(ignored) == {"forest/loop/", "sea/self/", "sea/forest too/"}
    assert all("not followed" in reason for reason in ignored.values())
    files = [f for split in ("train", "val", "test")
             for f in torch.load(repo / f"data/prepared/{split}.pt", weights_only=True)["files"]]
    assert sorted(files) == sorted([f"forest/{i}.png" for i in range(5)] + [f"sea/{i}.png" for i in range(5)]
                                   + ["forest/linked/0.png", "forest/linked/1.png"])
    assert "ignored forest/loop/: symlink to" in stdout  # on the console too


def test_fifos_devices_and_huge_files_are_not_read(tmp_path, monkeypatch):
    src = classes(tmp_path / "src")
    os.mkfifo(src / "forest" / "pipe.jpg")
    (src / "sea" / "zero.jpg").symlink_to("/dev/zero")
    with open(src / "sea" / "huge.png", "wb") as f:  # sparse: 300 MiB on paper, nothing on disk
        f.truncate(300 * 2**20)
    repo = stage_repo(tmp_path, src)
    done = run_prepare(repo)  # a FIFO would block forever and /dev/zero never ends: the timeout catches both
    assert done.returncode == 0, done.stderr
    report = json.loads((repo / "data/prepared/report.json").read_text())
    ignored = {entry["path"]: entry["reason"] for entry in report["ignored"]}
    assert "FIFO" in ignored["forest/pipe.jpg"] and "device" in ignored["sea/zero.jpg"]
    skipped = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    assert skipped == {"sea/huge.png": "300 MiB, larger than MAX_FILE_BYTES (256 MiB): not read"}
    assert report["kept"] == 10


def test_predict_skips_a_fifo_and_a_loop(workspace, tmp_path, capsys):
    images = tmp_path / "images"
    for k in range(2):
        noise(images / f"{k}.png", k)
    os.mkfifo(images / "pipe.jpg")
    (images / "loop").symlink_to(".", target_is_directory=True)
    code, err = run_cli(capsys, "predict", "--model", workspace / "models/model.pt", "--images", images,
                        "--out", tmp_path / "out", "--no-figures", "--workers", "1")
    assert code == 0, err
    rows = (tmp_path / "out/skipped.csv").read_text().splitlines()
    assert rows[0] == "file,reason" and len(rows) == 3
    assert any(r.startswith("loop/,") for r in rows) and any(r.startswith("pipe.jpg,") and "FIFO" in r for r in rows)
    assert len((tmp_path / "out/predictions.csv").read_text().splitlines()) == 3


def test_a_100_megapixel_photo_is_accepted_and_250_is_refused(tmp_path, monkeypatch, capsys):
    src = classes(tmp_path / "src")
    Image.new("L", (10_000, 10_000), 200).save(src / "forest" / "big.jpg", quality=50)  # ~1 MB on disk
    header = bytearray((src / "forest" / "0.png").read_bytes())  # a PNG header claiming 250 MP
    header[16:24] = (15_812).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    (src / "sea" / "bomb.png").write_bytes(bytes(header))
    repo = stage_repo(tmp_path, src)
    assert run_prepare_here(repo, monkeypatch, capsys)[0] == 0
    report = json.loads((repo / "data/prepared/report.json").read_text())
    assert report["kept"] == 11
    skipped = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    assert list(skipped) == ["sea/bomb.png"] and "decompression-bomb" in skipped["sea/bomb.png"]


def test_prepare_prints_the_first_ten_files_it_did_not_use(tmp_path, monkeypatch, capsys):
    src = classes(tmp_path / "src")
    for i in range(8):
        (src / "sea" / f"broken {i}.jpg").write_bytes(b"not a jpeg")
    for i in range(5):
        (src / "forest" / f"notes {i}.txt").write_text("x")
    code, stdout = run_prepare_here(stage_repo(tmp_path, src), monkeypatch, capsys)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("prepare: 10 images") and len(lines) == 12
    assert lines[1].startswith("  skipped sea/broken 0.jpg: not an image Pillow can identify")
    assert lines[9] == "  ignored forest/notes 0.txt: not an image file"
    assert lines[11] == "  ... and 3 more in data/prepared/report.json"


# ---------------------------------------------------------------------------- out of disk space


LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["stages/prepare.py"]
runpy.run_path("stages/prepare.py", run_name="__main__")
"""


@pytest.mark.parametrize("limit", [3000, 8000])  # torch.save of train.pt fails / Pillow's preview_train.png fails
def test_out_of_space_is_one_line_and_keeps_the_previous_outputs(tmp_path, monkeypatch, capsys, limit):
    """RLIMIT_FSIZE makes every write past `limit` bytes fail as a full disk does, without root or a mount."""
    repo = stage_repo(tmp_path, classes(tmp_path / "src"))
    assert run_prepare_here(repo, monkeypatch, capsys)[0] == 0
    before = snapshot(repo / "data/prepared")
    sizes = {name: len(data) for name, data in before.items()}
    assert sizes["train.pt"] < 8000 < sizes["preview_train.png"]  # so each limit fails where it says
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("seed: 42", "seed: 43"))
    done = subprocess.run(
        [sys.executable, "-c", LIMITED.format(limit=limit)], cwd=repo, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, "data/prepared", "no space left", "intact")
    assert snapshot(repo / "data/prepared") == before
    assert sorted(p.name for p in (repo / "data").iterdir()) == ["prepared"]


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_is_one_line_and_keeps_the_previous_outputs(workspace, tmp_path, capsys):
    """A real full file system (a 64 KiB tmpfs, so this needs root): predict's figures do not fit."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("mounting a tmpfs needs root; test_out_of_space_* covers the same path with RLIMIT_FSIZE")
    try:
        argv = ["predict", "--model", workspace / "models/model.pt", "--images", workspace / "images",
                "--out", disk / "out", "--workers", "1"]
        code, err = run_cli(capsys, *argv, "--no-figures")
        assert code == 0, err
        before = snapshot(disk / "out")
        code, err = run_cli(capsys, *argv)  # three figures do not fit in 64 KiB
        assert code == 2
        assert_one_line_error(err, str(disk / "out"), "no space left", "intact")
        assert snapshot(disk / "out") == before
        assert sorted(p.name for p in disk.iterdir()) == ["out"]

        # torch.save's writer loses the errno (a RuntimeError): prepare still says what happened
        src = classes(tmp_path / "src", per_class=10)
        with pytest.raises(UserError, match=r"prepared: no space left to write it .* is intact"):
            prepare(parse_params({"img_size": 64, "data": {"source": str(src), "workers": 1}}),
                    out_dir=disk / "prepared", progress=False)
        assert sorted(p.name for p in disk.iterdir()) == ["out"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
