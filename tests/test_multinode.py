"""Several machines as one torchrun job, played on one machine: node 0 is `dvc repro train` in a tiny git + DVC
repo, node 1 is `attention-cnn train --node-rank 1` in a copy of it; gloo, rendezvous on 127.0.0.1.
And the ways it goes wrong: a machine alone, or machines with other params or data, stop with one clear line
within train.rdzv_timeout instead of hanging."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from attention_cnn.data.prepared import load_split, save_split
from attention_cnn.training.distributed import flatten
from attention_cnn.model import load_model
from e2e import TINY, VENV_BIN, run, stages_run, tiny_repo

TWO_MACHINES = {"nnodes": 2, "nproc": 1, "rdzv_endpoint": "127.0.0.1:1", "rdzv_timeout": 60}
NODE_1 = [sys.executable, "-m", "attention_cnn.cli", "train", "--node-rank", "1"]
NODE_0_STAGE = [sys.executable, "stages/train.py"]  # what `dvc repro train` runs, without DVC's start-up time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_train_params(root: Path, **train) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    # One thread per process: two machines share this one's cores, and every run computes the same sums.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd / "src")}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds since start) of a process from `start`."""
    started = time.monotonic()
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args} still ran after {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    return process.returncode, out, err, time.monotonic() - started


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC copy of the pipeline with tiny params for two machines, prepared (not trained)."""
    root = tiny_repo(tmp_path_factory.mktemp("node0"), {"train": TWO_MACHINES})
    assert stages_run(run(["dvc", "repro", "prepare"], root)) == ["sample", "prepare"]
    return root


def machine_copy(repo: Path, folder: Path) -> Path:
    """Another machine's checkout: the same code, params and prepared data (as after `dvc pull`), untrained."""
    shutil.copytree(repo, folder, symlinks=True, ignore=shutil.ignore_patterns("cache", "__pycache__"))
    for out in ("models", "metrics"):
        shutil.rmtree(folder / out, ignore_errors=True)
    return folder


def test_two_machines_train_as_one_job_like_one_machine_with_two_processes(repo, tmp_path):
    node1 = machine_copy(repo, tmp_path / "node1")
    endpoint = f"127.0.0.1:{free_port()}"
    for root in (repo, node1):
        set_train_params(root, rdzv_endpoint=endpoint)

    first, second = start(["dvc", "repro", "train"], repo), start(NODE_1, node1)
    (status0, out0, err0, _), (status1, out1, err1, _) = finish(first), finish(second)
    assert status0 == 0, out0[-3000:] + err0[-3000:]
    assert status1 == 0, out1[-3000:] + err1[-3000:]
    assert stages_run(out0) == ["train"]
    assert "node 1 running under torchrun: --nnodes=2 --node-rank=1" in out1
    assert (repo / "models" / "model.pt").is_file()
    # Only global rank 0, on node 0, writes: nothing appears in node 1's checkout.
    assert not (node1 / "models").exists() and not (node1 / "metrics").exists()
    # Where the machines meet is not a result: another endpoint leaves the stage up to date.
    set_train_params(repo, rdzv_endpoint="node0.example:29500")
    assert "Data and pipelines are up to date" in run(["dvc", "status", "train"], repo)

    # The same global batch on one machine: 1 node × 2 processes, ranks 0 and 1 as before.
    set_train_params(node1, nnodes=1, nproc=2, rdzv_endpoint="")
    status, out, err, _ = finish(start([sys.executable, "-m", "attention_cnn.cli", "train"], node1))
    assert status == 0, out[-3000:] + err[-3000:]
    two_machines, one_machine = (flatten(json.loads((root / "metrics/train/metrics.json").read_text()))
                                 for root in (repo, node1))
    for metrics in (two_machines, one_machine):
        metrics.pop("images_per_s")  # wall-clock speed, the one metric that differs
    assert two_machines["step"] == TINY["train"]["epochs"] - 1
    assert two_machines == pytest.approx(one_machine, rel=1e-5, abs=1e-6)
    weights = [load_model(root / "models" / "model.pt").model.state_dict() for root in (repo, node1)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def failed_launches(repo, tmp_path_factory) -> dict[str, tuple[int, str, str, float, Path]]:
    """Launches that must fail, all started together (each waits on its own timeout).
    Name -> (exit status, stdout, stderr, seconds, checkout); names ending in 1 are node 1, the others node 0."""
    base = tmp_path_factory.mktemp("failing")
    launches = {}
    for name in ("alone0", "alone1", "busy0", "params0", "params1", "data0", "data1"):
        root = machine_copy(repo, base / name)
        set_train_params(root, rdzv_timeout=30 if name[:-1] in ("params", "data") else 3)
        launches[name] = root
    # Each pair meets at its own port; the machines alone meet nobody.
    ports = {}
    for pair in (("alone0",), ("alone1",), ("busy0",), ("params0", "params1"), ("data0", "data1")):
        ports[pair[0]] = free_port()
        for name in pair:
            set_train_params(launches[name], rdzv_endpoint=f"127.0.0.1:{ports[pair[0]]}")
    busy = socket.socket()  # another program holds busy0's port
    busy.bind(("", ports["busy0"]))
    busy.listen()
    set_train_params(launches["params1"], batch_size=8)
    other = load_split(launches["data1"] / "data" / "prepared", "train")
    other.images[0, 0, 0, 0] ^= 1  # one bit of one pixel
    save_split(launches["data1"] / "data" / "prepared", "train", other)

    with busy:
        started = {name: start(NODE_1 if name.endswith("1") else NODE_0_STAGE, root)
                   for name, root in launches.items()}
        return {name: (*finish(process), launches[name]) for name, process in started.items()}


def _error_line(stderr: str) -> str:
    [line] = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr, stderr[-3000:]
    return line


def test_a_machine_alone_stops_within_the_timeout_with_one_clear_line(failed_launches):
    status, _, err, seconds, _ = failed_launches["alone0"]
    assert status == 2
    assert _error_line(err).startswith("error: params.yaml: 'train.rdzv_endpoint' 127.0.0.1:")
    assert "the other machines did not all join within train.rdzv_timeout=3 s" in err
    assert "attention-cnn train --node-rank K" in err
    status, _, err, seconds1, _ = failed_launches["alone1"]
    assert status == 2
    assert "node 1 could not join node 0 within train.rdzv_timeout=3 s (" in _error_line(err)
    assert "Start node 0 (`dvc repro train` there)" in err
    # 3 s of waiting on top of starting Python and torch, not torchrun's default of 600 s.
    assert seconds < 60 and seconds1 < 60


def test_a_taken_port_on_node_0_is_named(failed_launches):
    status, _, err, _, _ = failed_launches["busy0"]
    assert status == 2
    assert _error_line(err).endswith(": the port is taken on this machine (node 0). Choose a free one.")


def test_machines_with_other_params_both_stop_naming_the_key(failed_launches):
    for name in ("params0", "params1"):
        status, _, err, _, _ = failed_launches[name]
        assert status == 2
        assert _error_line(err) == ("error: params.yaml of node 1 differs from node 0's: train.batch_size=8 "
                                    "(node 0: 16). Every machine needs the same params.yaml, data and code.")


def test_machines_with_other_prepared_data_both_stop(failed_launches):
    for name in ("data0", "data1"):
        status, out, err, _, root = failed_launches[name]
        assert status == 2
        assert _error_line(err).startswith("error: node 1 has other prepared data or training code than node 0")
        assert "epoch 1/" not in out and not (root / "models").exists()


def test_a_node_rank_outside_train_nnodes_is_refused_before_anything_starts(tmp_path, capsys):
    from attention_cnn.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"nnodes": 1}}))
    with pytest.raises(SystemExit) as exited:
        main(["train", "--node-rank", "1", "--params", str(tmp_path / "params.yaml")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"error: --node-rank 1: {tmp_path / 'params.yaml'} has train.nnodes=1, so "
                                       f"the node rank must be 0..0 (0 is the machine that runs `dvc repro`).\n")
