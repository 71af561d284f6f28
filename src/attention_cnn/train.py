"""Train the attention CNN on the prepared splits: Adam, an LR schedule, tensor augmentation, model selection on
val, early stopping, DVCLive metrics, resumable per-epoch checkpoints, and optional DDP.

The images stay uint8 tensors on the training device for the whole run (decoded once by `prepare`); a batch is
an index into them, so there is no DataLoader and no per-epoch decoding.

Resume: `models/checkpoint.pt` is rewritten atomically after every epoch with everything the next epoch
depends on (weights, optimizer, scheduler, best-so-far, early-stopping counter, every RNG). A killed run,
re-run with the same params, data and code, continues from the last finished epoch; on CPU it ends with
bit-identical weights and metrics. A checkpoint with another fingerprint is ignored, loudly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from attention_cnn import model as model_module
from attention_cnn.data.prepared import PreparedSplit, load_split
from attention_cnn.errors import UserError
from attention_cnn.atomic import atomic_torch_save
from attention_cnn.model import AttentionCNN, autocast, save_model
from attention_cnn.params import Params, TrainParams

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class EpochResult:
    epoch: int             # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_s: float    # training images per second over all processes, augmentation included
    seconds: float         # wall time of the training phase of this epoch


@dataclass(frozen=True)
class TrainResult:
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    resumed_from: int      # epochs taken from a checkpoint (0: fresh start)
    history: list[EpochResult]
    model_path: Path | None  # None on ranks other than 0


# ----------------------------------------------------------------------------------------------------------
# Devices and processes


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


def all_reduce_sum(values: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if ctx.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# ----------------------------------------------------------------------------------------------------------
# Data


def load_train_val(prepared_dir: Path | str) -> tuple[PreparedSplit, PreparedSplit]:
    train_split, val_split = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    if train_split.classes != val_split.classes:
        raise UserError(f"{prepared_dir}: train and val list different classes. Re-run `dvc repro prepare`.")
    if train_split.img_size != val_split.img_size:
        raise UserError(f"{prepared_dir}: train and val have different image sizes. Re-run `dvc repro prepare`.")
    if len(train_split) == 0 or len(val_split) == 0:
        raise UserError(f"{prepared_dir}: the train or val split is empty. Add images to data.source "
                        f"or lower data.val_fraction / data.test_fraction.")
    return train_split, val_split


def channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images (N, 3, S, S) on the [0, 1] scale, in chunks (no float copy)."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64) / 255  # (b, 3, S, S)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def draw_augmentation(n: int, img_size: int, max_shift: float, generator: torch.Generator):
    """One epoch of augmentation draws: flip (n,) bool and shift (n, 2) whole pixels in [-m, m]."""
    flip = torch.rand(n, generator=generator) < 0.5
    m = int(round(max_shift * img_size))
    shift = torch.randint(-m, m + 1, (n, 2), generator=generator)
    return flip, shift


def augment(x: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Flip each image horizontally where `flip` and shift it by `shift` (dx, dy) whole pixels, in one pass.

    torchvision's v2 transforms draw one random decision per call, i.e. per batch; we want one per image, so
    this is a batched affine resampling: nearest-neighbour at exact pixel centres (no blur), borders reflected.
    x: (B, 3, S, S) float; flip: (B,) bool; shift: (B, 2) int.
    """
    B, _, H, W = x.shape
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1 - 2 * flip.to(x.dtype)          # -1 mirrors x
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = shift[:, 0].to(x.dtype) * (2 / W)  # one pixel is 2/W in grid coordinates
    theta[:, 1, 2] = shift[:, 1].to(x.dtype) * (2 / H)
    grid = F.affine_grid(theta, [B, 3, H, W], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)


# ----------------------------------------------------------------------------------------------------------
# Fingerprint, checkpoint, RNG state


def fingerprint(params: Params, train_split: PreparedSplit, val_split: PreparedSplit) -> str:
    """What a checkpoint must match to be resumed: params, the prepared data, and this training code."""
    h = hashlib.sha256()
    h.update(json.dumps({"seed": params.seed, "model": dataclasses.asdict(params.model),
                         "train": dataclasses.asdict(params.train), "torch": torch.__version__},
                        sort_keys=True).encode())
    for split in (train_split, val_split):
        h.update(json.dumps({"classes": split.classes, "files": split.files}).encode())
        for tensor in (split.images, split.labels):
            h.update(memoryview(tensor.contiguous().numpy()).cast("B"))
    for source in (model_module.__file__, __file__):  # a code change must not resume stale training
        h.update(Path(source).read_bytes())
    return h.hexdigest()


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def save_checkpoint(path: Path, blob: dict) -> None:
    atomic_torch_save(blob, path)  # a kill leaves the previous checkpoint, never half of a new one


def read_checkpoint(path: Path, expected_fingerprint: str, say: Callable[[str], None]) -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unreadable file cannot be resumed; training from scratch is always correct
        say(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); starting fresh.")
        return None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        say(f"{path}: checkpoint of another format; starting fresh.")
        return None
    if blob.get("fingerprint") != expected_fingerprint:
        say(f"{path}: checkpoint was written for other params, data or code; ignoring it and starting fresh.")
        return None
    return blob


# ----------------------------------------------------------------------------------------------------------
# The loop


class _Metrics:
    """DVCLive on rank 0. On resume the metrics are replayed from the checkpoint's history, so the files match
    an uninterrupted run even when DVC deleted metrics/train before the re-run (it is not a persistent out) or
    the kill landed between a DVCLive write and the checkpoint write."""

    def __init__(self, metrics_dir: Path | str | None):
        self.live = None
        if metrics_dir is not None:
            from dvclive import Live  # imported here: DDP workers other than rank 0 never need it
            # dvcyaml=None: the pipeline's dvc.yaml declares our plots; DVCLive must not rewrite it.
            self.live = Live(dir=str(metrics_dir), dvcyaml=None, save_dvc_exp=False, resume=False)

    def log_epoch(self, r: EpochResult, best: dict) -> None:
        if self.live is None:
            return
        live = self.live
        live.log_metric("train/loss", r.train_loss)
        live.log_metric("train/accuracy", r.train_accuracy)
        live.log_metric("val/loss", r.val_loss)
        live.log_metric("val/accuracy", r.val_accuracy)
        live.log_metric("lr", r.lr)
        live.log_metric("images_per_s", r.images_per_s)
        live.log_metric("best/epoch", best["epoch"], plot=False)
        live.log_metric("best/val_accuracy", best["val_accuracy"], plot=False)
        live.log_metric("best/val_loss", best["val_loss"], plot=False)
        live.next_step()

    def end(self) -> None:
        if self.live is not None:
            self.live.end()


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    """Stepped once per epoch."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "step":  # a tenth of the rate after each third of the run
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                   batch_size: int, device: torch.device) -> torch.Tensor:
    """Sum of cross-entropy losses, number correct and count over `indices`: tensor([loss_sum, correct, n])."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, indices.numel(), batch_size):
        idx = indices[start:start + batch_size]
        x = _to_input(images[idx], device)
        y = labels[idx]
        with autocast(device):
            logits = model(x).logits.float()
        totals[0] += F.cross_entropy(logits, y, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += idx.numel()
    return totals


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor, order: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor,
                tp: TrainParams, bar: tqdm, images_per_update: int = 1) -> torch.Tensor:
    """One pass over `order` (indices into images, on their device). Returns tensor([loss_sum, correct, n]).

    Nothing here waits for the device: the sums stay on it until the caller reads them once per epoch.
    """
    model.train()
    device = images.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, order.numel(), tp.batch_size):
        idx = order[start:start + tp.batch_size]
        y = labels[idx]
        x = _to_input(images[idx], device)  # (B, 3, S, S)
        if tp.augment:
            x = augment(x, flip[start:start + tp.batch_size], shift[start:start + tp.batch_size])
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = model(x).logits  # (B, K)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Sums, not per-batch means: a short last batch weighs what it should.
        totals[0] += loss.detach() * idx.numel()
        totals[1] += (logits.detach().argmax(dim=1) == y).sum()
        totals[2] += idx.numel()
        bar.update(idx.numel() * images_per_update)
    return totals


def _to_input(batch_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = batch_uint8.to(device, non_blocking=True).float().div_(255)  # (B, 3, S, S) in [0, 1]
    return x.contiguous(memory_format=torch.channels_last)


def _is_better(val_accuracy: float, val_loss: float, best: dict) -> bool:
    if best["epoch"] == 0:
        return True
    return val_accuracy > best["val_accuracy"] or (val_accuracy == best["val_accuracy"]
                                                   and val_loss < best["val_loss"])


def train(params: Params, prepared_dir: Path | str = "data/prepared", model_path: Path | str = "models/model.pt",
          checkpoint_path: Path | str = "models/checkpoint.pt", metrics_dir: Path | str | None = "metrics/train",
          progress: bool = True, on_epoch_end: Callable[[EpochResult], None] | None = None) -> TrainResult:
    """Train on `prepared_dir`'s train split, select on val, write the best model, metrics and checkpoints.

    Under torchrun (train.nproc > 1) every process calls this; rank 0 alone writes files.
    `on_epoch_end` runs after each epoch's checkpoint is written (progress reporting; tests use it to
    simulate a kill).
    """
    ctx = setup_distributed(params)
    with kernel_settings(ctx.device):
        return _train(params, ctx, prepared_dir, Path(model_path), Path(checkpoint_path), metrics_dir, progress,
                      on_epoch_end)


@contextlib.contextmanager
def kernel_settings(device: torch.device):
    """Deterministic kernels on CPU (bit-identical reruns and resumes); the fastest ones on CUDA, whose
    fast kernels are not deterministic. Process-wide switches, so they are put back afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory,
             torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
            # ...without its debugging aid of NaN-filling every new tensor: that cost 20% of a CPU step here.
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


def _train(params: Params, ctx: Dist, prepared_dir: Path | str, model_path: Path, checkpoint_path: Path,
           metrics_dir: Path | str | None, progress: bool,
           on_epoch_end: Callable[[EpochResult], None] | None) -> TrainResult:
    tp, device = params.train, ctx.device
    say = (lambda msg: print(msg, flush=True)) if ctx.is_main else (lambda msg: None)

    train_split, val_split = load_train_val(prepared_dir)
    classes, img_size = train_split.classes, train_split.img_size

    # Model: same initial weights on every rank (DDP would broadcast them anyway); dropout streams differ.
    torch.manual_seed(params.seed)
    np.random.seed(params.seed % 2**32)
    random.seed(params.seed)
    with torch.device(device):  # built where it trains: a big layer is never allocated twice
        net = AttentionCNN(len(classes), img_size, params.model, device=device, batch_size=tp.batch_size)
    net.set_normalization(*channel_stats(train_split.images))
    # channels_last: tensor cores on CUDA, and oneDNN's fastest conv kernels on CPU (1.5x measured here).
    net.to(memory_format=torch.channels_last)
    torch.manual_seed(params.seed + ctx.rank)
    generators = {
        "shuffle": torch.Generator().manual_seed(params.seed),               # the same order on every rank
        "augment": torch.Generator().manual_seed(params.seed + 1000 + ctx.rank),
    }

    optimizer = torch.optim.Adam(net.parameters(), lr=tp.lr, weight_decay=tp.weight_decay,
                                 fused=device.type == "cuda")  # one kernel for all parameters on CUDA
    scheduler = make_scheduler(optimizer, tp.lr_schedule, tp.epochs)
    best = {"epoch": 0, "val_accuracy": 0.0, "val_loss": float("inf"), "state_dict": None}
    history: list[EpochResult] = []
    bad_epochs, done = 0, False

    run_fingerprint = fingerprint(params, train_split, val_split)
    checkpoint = read_checkpoint(checkpoint_path, run_fingerprint, say)
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        best = checkpoint["best"]
        bad_epochs, done = checkpoint["bad_epochs"], checkpoint["done"]
        history = [EpochResult(**h) for h in checkpoint["history"]]
        set_rng_state(checkpoint["rng"][ctx.rank], generators)
        say(f"{checkpoint_path}: resuming after epoch {len(history)} of {tp.epochs}"
            + (" (training had finished; writing its outputs)" if done else "") + ".")
    resumed_from = len(history)

    metrics = _Metrics(metrics_dir if ctx.is_main else None)
    replayed_best = {"epoch": 0, "val_accuracy": 0.0, "val_loss": float("inf")}
    for past in history:  # replay, so metrics/train matches an uninterrupted run
        if _is_better(past.val_accuracy, past.val_loss, replayed_best):
            replayed_best = {"epoch": past.epoch, "val_accuracy": past.val_accuracy, "val_loss": past.val_loss}
        metrics.log_epoch(past, replayed_best)

    # Data on the device, once. Labels and images are indexed per batch; nothing is decoded again.
    train_images, train_labels = train_split.images.to(device), train_split.labels.to(device)
    val_images, val_labels = val_split.images.to(device), val_split.labels.to(device)
    # DDP: every rank takes an equal share of one shared permutation (equal step counts, or DDP would hang).
    per_rank = len(train_split) // ctx.world_size
    if per_rank == 0:
        raise UserError(f"{prepared_dir}: {len(train_split)} training images cannot be shared by "
                        f"train.nproc={ctx.world_size} processes. Lower train.nproc.")
    val_indices = torch.arange(ctx.rank, len(val_split), ctx.world_size, device=device)

    step_model: torch.nn.Module = net
    if ctx.world_size > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if tp.compile:
        # dynamic=False: the short last batch of an epoch gets its own static graph. By default its new shape
        # would make torch.compile build a shape-generic graph, which the full batches would then run too.
        step_model = torch.compile(step_model, dynamic=False)

    epoch = len(history)
    while not done and epoch < tp.epochs:
        epoch += 1
        # --- train one epoch
        order = torch.randperm(len(train_split), generator=generators["shuffle"])
        order = order[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
        flip, shift = draw_augmentation(per_rank, img_size, tp.max_shift, generators["augment"])
        order, flip, shift = order.to(device), flip.to(device), shift.to(device)
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(total=per_rank * ctx.world_size, desc=f"epoch {epoch}/{tp.epochs}", unit="img",
                   unit_scale=True, disable=not (progress and ctx.is_main), leave=False, dynamic_ncols=True)
        started = time.perf_counter()
        totals = train_epoch(step_model, optimizer, train_images, train_labels, order, flip, shift, tp, bar,
                             images_per_update=ctx.world_size)
        train_loss, train_correct, train_count = all_reduce_sum(totals, ctx).tolist()  # syncs the device
        seconds = time.perf_counter() - started
        bar.close()
        scheduler.step()

        # --- validate (all ranks, each on its share; BatchNorm stats taken from rank 0 so all agree)
        if ctx.world_size > 1:
            for buffer in net.buffers():
                dist.broadcast(buffer, src=0)
        val_totals = evaluate_split(net, val_images, val_labels, val_indices, 2 * tp.batch_size, device)
        val_loss, val_correct, val_count = all_reduce_sum(val_totals, ctx).tolist()
        result = EpochResult(epoch=epoch, train_loss=train_loss / train_count,
                             train_accuracy=train_correct / train_count, val_loss=val_loss / val_count,
                             val_accuracy=val_correct / val_count, lr=lr,
                             images_per_s=train_count / seconds, seconds=seconds)
        history.append(result)

        # --- select on val, stop early
        if _is_better(result.val_accuracy, result.val_loss, best):
            best = {"epoch": epoch, "val_accuracy": result.val_accuracy, "val_loss": result.val_loss,
                    "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        done = bad_epochs >= tp.patience or epoch == tp.epochs
        say(f"epoch {epoch}/{tp.epochs}: train loss {result.train_loss:.4f} acc {result.train_accuracy:.4f} | "
            f"val loss {result.val_loss:.4f} acc {result.val_accuracy:.4f} | lr {lr:.2e} | "
            f"{result.images_per_s:,.0f} img/s" + (" | best" if best["epoch"] == epoch else ""))
        if bad_epochs >= tp.patience:
            say(f"early stop: val accuracy has not improved for {tp.patience} epochs (best: epoch {best['epoch']}).")

        metrics.log_epoch(result, best)
        rng = [rng_state(generators)]
        if ctx.world_size > 1:  # every rank's RNG goes into rank 0's checkpoint
            rng = [None] * ctx.world_size
            dist.all_gather_object(rng, rng_state(generators))
        if ctx.is_main:
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "fingerprint": run_fingerprint, "model": net.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best": best,
                "bad_epochs": bad_epochs, "done": done, "history": [dataclasses.asdict(h) for h in history],
                "rng": rng})
        if on_epoch_end is not None:
            on_epoch_end(result)

    metrics.end()
    written = None
    if ctx.is_main:
        written = save_model(model_path, net, classes, state_dict=best["state_dict"])
        say(f"{model_path}: best val accuracy {best['val_accuracy']:.4f} (loss {best['val_loss']:.4f}) "
            f"at epoch {best['epoch']}.")
    if ctx.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(best_epoch=best["epoch"], best_val_accuracy=best["val_accuracy"],
                       best_val_loss=best["val_loss"], epochs_run=len(history),
                       stopped_early=len(history) < tp.epochs, resumed_from=resumed_from, history=history,
                       model_path=written)

