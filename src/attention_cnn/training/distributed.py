"""Devices and processes for training: which device a rank uses and its kernel settings, the torchrun launch
behind train.nproc and train.nnodes, the checks that every machine runs the same job, and the few collective
operations the training loop needs (no-ops in a single process)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from attention_cnn.errors import UserError
from attention_cnn.params import Params, TrainParams, training_params


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device
    node: int = 0          # which machine: torchrun's node rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("params.yaml: 'train.device' is cuda but no CUDA device is available here. "
                        "Use `-S train.device=auto` (CUDA when present, else CPU) or `-S train.device=cpu`.")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def kernel_settings(device: torch.device):
    """Deterministic kernels on CPU (bit-identical reruns and resumes); the fastest ones on CUDA, whose
    fast kernels are not deterministic. Process-wide switches, so they are put back afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory,
             torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
            # ...without its debugging aid of NaN-filling every new tensor, which slows every CPU step.
            torch.utils.deterministic.fill_uninitialized_memory = False
        else:
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.utils.deterministic.fill_uninitialized_memory = saved[1]
        torch.backends.cudnn.benchmark = saved[2]
        torch.set_float32_matmul_precision(saved[3])


def inside_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_under_torchrun(tp: TrainParams, worker: list[str], node_rank: int = 0) -> None:
    """Run `worker` (a script and its arguments, or `--module`, a module and its arguments) under torchrun as
    node `node_rank` of train.nnodes machines with train.nproc processes each, then exit with its status.

    Lets `python stages/train.py` (and so `dvc repro`) honour train.nproc and train.nnodes without a different
    command line. Does nothing when there is one process in all, or we already are a torchrun worker.
    torchrun runs in this process (as the `torchrun` command does), so a kill of this process reaches its
    workers, and a failed rendezvous becomes one line instead of torchrun's traceback.
    """
    if tp.nproc * tp.nnodes == 1 or inside_torchrun():
        return
    if tp.nnodes == 1:
        where = ["--standalone"]
    else:
        # static, not c10d: c10d numbers the machines by host name, and global rank 0, which writes the
        # outputs, must be on node 0, the checkout `dvc repro` tracks. static takes each node's rank as given.
        where = [f"--nnodes={tp.nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                 f"--rdzv-endpoint={tp.rdzv_endpoint}", f"--rdzv-conf=timeout={tp.rdzv_timeout}"]
        if node_rank > 0:
            _wait_until_reachable(tp, node_rank)
    argv = [*where, f"--nproc-per-node={tp.nproc}", "--max-restarts=0", *worker]
    print(f"train.nnodes={tp.nnodes}, train.nproc={tp.nproc}: node {node_rank} running under torchrun: "
          f"{' '.join(argv)}", flush=True)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:  # each worker has printed its own error (a UserError: one line)
        sys.exit(_worker_exit_status(exc))
    except dist.DistError as exc:
        raise UserError(_rendezvous_failure(tp, node_rank, exc)) from None
    sys.exit(0)


def _wait_until_reachable(tp: TrainParams, node_rank: int) -> None:
    """Until node 0 listens at train.rdzv_endpoint, or train.rdzv_timeout has passed (then a UserError). torchrun
    would retry too, but past the timeout and with a C++ stack trace per try."""
    host, _, port = tp.rdzv_endpoint.rpartition(":")
    deadline = time.monotonic() + tp.rdzv_timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(left, 5.0))):
                return
        except OSError as exc:  # refused (node 0 not started yet), unknown host, no route, ...
            if time.monotonic() + 0.5 >= deadline:
                raise UserError(_rendezvous_failure(tp, node_rank, exc)) from None
            time.sleep(0.5)


def _worker_exit_status(exc: Exception) -> int:
    codes = [failure.exitcode for failure in exc.failures.values()]
    return next((code for code in codes if code > 0), 1)  # a worker killed by a signal has a negative code


def _rendezvous_failure(tp: TrainParams, node_rank: int, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"params.yaml: 'train.rdzv_endpoint' {tp.rdzv_endpoint}"
    if node_rank == 0 and "EADDRINUSE" in reason:
        return f"{where}: the port is taken on this machine (node 0). Choose a free one."
    if node_rank == 0:
        return (f"{where}: the other machines did not all join within train.rdzv_timeout={tp.rdzv_timeout} s "
                f"({reason}). On each of them run `attention-cnn train --node-rank K` (K = 1.."
                f"{tp.nnodes - 1}) in a checkout with the same params.yaml and data.")
    return (f"{where}: node {node_rank} could not join node 0 within train.rdzv_timeout={tp.rdzv_timeout} s "
            f"({reason}). Start node 0 (`dvc repro train` there) and check that this machine reaches that "
            f"host and port.")


def setup_distributed(params: Params) -> Dist:
    tp = params.train
    processes = tp.nnodes * tp.nproc
    if not inside_torchrun():
        if processes > 1:
            raise UserError(f"params.yaml: 'train.nnodes' × 'train.nproc' is {tp.nnodes} × {tp.nproc}, so "
                            f"training must run under torchrun. Run `python stages/train.py` or `attention-cnn "
                            f"train` (they relaunch themselves), or `torchrun --nproc_per_node={tp.nproc} "
                            f"stages/train.py`.")
        return Dist(rank=0, world_size=1, device=resolve_device(tp.device))
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank, node = int(os.environ["LOCAL_RANK"]), int(os.environ.get("GROUP_RANK", "0"))
    if world_size > 1:
        check_same_job(params, rank, world_size, node)
    if world_size != processes:
        raise UserError(f"params.yaml: 'train.nnodes' × 'train.nproc' is {tp.nnodes} × {tp.nproc} = {processes} "
                        f"processes but torchrun started {world_size}. Make them agree.")
    device = resolve_device(tp.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, device=device, node=node)


def check_same_job(params: Params, rank: int, world_size: int, node: int) -> None:
    """Before the process group starts: every process is there, and all read the same training params.

    A process that never comes (its node failed, or was started with another train.nproc) or other params on
    one node stop every process with the same one-line error within train.rdzv_timeout, where
    `init_process_group` would wait for 30 minutes.
    """
    def compare(jobs: list[dict]) -> str:
        for job in jobs[1:]:
            differing = sorted(key for key in jobs[0]["params"].keys() | job["params"].keys()
                               if jobs[0]["params"].get(key) != job["params"].get(key))
            if differing:
                shown = ", ".join(f"{key}={job['params'].get(key)!r} (node 0: {jobs[0]['params'].get(key)!r})"
                                  for key in differing[:3])
                return (f"params.yaml of node {job['node']} differs from node 0's: {shown}. Every machine needs "
                        f"the same params.yaml, data and code.")
        return ""

    _agree("start", {"node": node, "params": flatten(training_params(params))}, compare, rank, world_size, node,
           params.train.rdzv_timeout)


def check_same_run(run_fingerprint: str, params: Params, ctx: Dist) -> None:
    """Once every rank has loaded the data: all train on node 0's data with node 0's code (the params were
    compared by check_same_job). A rank that failed to load its data stops the others within the timeout."""
    def compare(seen: list[dict]) -> str:
        differing = sorted({other["node"] for other in seen if other["fingerprint"] != seen[0]["fingerprint"]})
        if not differing:
            return ""
        nodes = f"node {differing[0]} has" if len(differing) == 1 else f"nodes {', '.join(map(str, differing))} have"
        return (f"{nodes} other prepared data or training code than node 0 (torch version included). Give every "
                f"machine the same checkout: `git pull` and `dvc pull` (or `dvc repro prepare`).")

    if ctx.world_size > 1:
        _agree("data", {"node": ctx.node, "fingerprint": run_fingerprint}, compare, ctx.rank, ctx.world_size,
               ctx.node, params.train.rdzv_timeout)


def _agree(step: str, mine: dict, compare: Callable[[list[dict]], str], rank: int, world_size: int, node: int,
           timeout_s: int) -> None:
    """Rank 0 collects every rank's `mine` on torchrun's store and posts `compare(all of them)`: '' when they
    agree, else the error that every rank then raises. Store waits, not collectives: a rank that never comes
    (it failed, or its node did) makes a timeout and a one-line error on the others, with any backend."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    prefix = f"attention_cnn/{step}"  # torchrun's store lives as long as its job: no key of another run
    store.set(f"{prefix}/{rank}", json.dumps(mine))
    if rank == 0:
        keys = [f"{prefix}/{r}" for r in range(world_size)]
        try:
            store.wait(keys, timeout)
            verdict = compare([json.loads(blob) for blob in store.multi_get(keys)])
        except dist.DistError:
            arrived = sum(store.check([key]) for key in keys)
            verdict = (f"only {arrived} of {world_size} training processes reached the {step} check within "
                       f"train.rdzv_timeout={timeout_s} s; see the other nodes' output for their error.")
        store.set(f"{prefix}/verdict", verdict)
    try:
        store.wait([f"{prefix}/verdict"], 2 * timeout)  # rank 0 may itself wait a whole timeout for the others
    except dist.DistError:
        raise UserError(f"node {node}: node 0 did not confirm the {step} check within 2 × train.rdzv_timeout="
                        f"{timeout_s} s; see node 0's output.") from None
    verdict = store.get(f"{prefix}/verdict").decode()
    if verdict:
        raise UserError(verdict)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def broadcast_from_main(value, ctx: Dist):
    """Rank 0's `value` (any picklable object) on every rank: e.g. the checkpoint that only node 0 has."""
    if ctx.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_for_steps(net: torch.nn.Module, ctx: Dist) -> torch.nn.Module:
    """The module the optimizer steps through: DDP-wrapped when there are several processes."""
    if ctx.world_size == 1:
        return net
    device = ctx.device
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(values: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if ctx.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(net: torch.nn.Module, ctx: Dist) -> None:
    """Every rank gets rank 0's buffers (BatchNorm running stats), so all validate the same model."""
    if ctx.world_size > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(value, ctx: Dist) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if ctx.world_size == 1:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def shut_down(ctx: Dist) -> None:
    """Wait for every rank, then leave the process group."""
    if ctx.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
