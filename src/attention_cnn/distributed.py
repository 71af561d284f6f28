"""Devices and processes for training: which device a rank uses and its kernel settings, the torchrun relaunch
behind train.nproc, and the few collective operations the training loop needs (no-ops in a single process)."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attention_cnn.errors import UserError
from attention_cnn.params import Params


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

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


def relaunch_under_torchrun(nproc: int) -> None:
    """Re-run the current script under torchrun with `nproc` processes, then exit with its status.

    Lets `python stages/train.py` (and so `dvc repro`) honour `train.nproc` without a different command line.
    Does nothing when nproc is 1 or we already are a torchrun worker.
    """
    if nproc <= 1 or inside_torchrun():
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *sys.argv]
    print(f"train.nproc={nproc}: running under torchrun: {' '.join(command[1:])}", flush=True)
    # exec, not a child process: a kill of this process (e.g. of `dvc repro`) then reaches torchrun itself.
    os.execv(sys.executable, command)


def setup_distributed(params: Params) -> Dist:
    nproc = params.train.nproc
    if not inside_torchrun():
        if nproc > 1:
            raise UserError(f"params.yaml: 'train.nproc' is {nproc}, so training must run under torchrun. "
                            f"Run `python stages/train.py` (it relaunches itself) or "
                            f"`torchrun --nproc_per_node={nproc} stages/train.py`.")
        return Dist(rank=0, world_size=1, device=resolve_device(params.train.device))
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if world_size != nproc:
        raise UserError(f"params.yaml: 'train.nproc' is {nproc} but torchrun started {world_size} processes. "
                        f"Make them agree.")
    device = resolve_device(params.train.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, device=device)


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
