"""Train the attention CNN on the prepared splits: Adam, an LR schedule, tensor augmentation, model selection on
val, early stopping, DVCLive metrics, resumable per-epoch checkpoints, and optional DDP.

The images stay uint8 tensors (decoded once by `prepare`) and a batch is an index into them, so there is no
DataLoader and no per-epoch decoding. A split lives on the training device for the whole run when it fits (see
`epoch.fits_on_device`); a bigger one is streamed batch by batch from its memory map (`epoch.BatchSource`).

Resume: after every epoch a checkpoint (see checkpoint.py) is rewritten atomically with everything the next
epoch depends on (weights, optimizer, scheduler, the best weights so far, the history, every RNG). A killed run,
re-run with the same params, data and code, continues from the last finished epoch; on CPU it ends with
bit-identical weights and metrics. The history is replayed through the same `TrainingState.update` as the live
loop, so the best epoch and the early-stopping count come out as they would have.
Devices and DDP are in distributed.py; the memory guard of `dense` attention is in memory.py.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from attention_cnn.atomic import check_writable
from attention_cnn.training.checkpoint import (CHECKPOINT_FORMAT, checkpoint_path, fingerprint, read_checkpoint,
                                      remove_checkpoint, rng_state, run_lock, save_checkpoint, set_rng_state)
from attention_cnn.data.prepared import PreparedSplit, load_split
from attention_cnn.training.distributed import (Dist, all_reduce_sum, broadcast_buffers, broadcast_from_main, check_same_run,
                                       gather_objects, kernel_settings, setup_distributed, shut_down, wrap_for_steps)
from attention_cnn.training.epoch import (BatchSource, draw_augmentation, fits_on_device, reuse_freed_host_memory, train_epoch,
                                 validation_totals)
from attention_cnn.errors import UserError
from attention_cnn.memory import check_model_fits
from attention_cnn.metrics import chance_ceiling, chance_level, not_learned_warning
from attention_cnn.model import AttentionCNN, save_model
from attention_cnn.params import Params
from attention_cnn.startup import raise_if_stopped
from attention_cnn.training.schedule import (LOSS_MIN_DELTA, EpochResult, Plan, TrainingState, WsdSchedule,
                                            patience_from_epoch, plan_training)

# An epoch of fewer optimizer steps than this barely moves the weights: train warns and says what to change.
MIN_STEPS_PER_EPOCH = 10
@dataclass(frozen=True)
class TrainResult:
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    last_progress_epoch: int  # the last epoch that counted as progress; patience counts from it
    epochs_run: int
    stopped_early: bool
    resumed_from: int      # epochs taken from a checkpoint (0: fresh start)
    history: list[EpochResult]
    model_path: Path | None  # None on ranks other than 0


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


# ----------------------------------------------------------------------------------------------------------
# Metrics and schedule


class _Metrics:
    """DVCLive on rank 0. On resume the metrics are replayed from the checkpoint's history, so the files match
    an uninterrupted run even when DVC deleted metrics/train before the re-run (it is not a persistent out) or
    the kill landed between a DVCLive write and the checkpoint write."""

    def __init__(self, metrics_dir: Path | str | None, chance: float):
        self.live, self.chance = None, chance
        if metrics_dir is not None:
            from dvclive import Live  # imported here: DDP workers other than rank 0 never need it
            # dvcyaml=None: the pipeline's dvc.yaml declares our plots; DVCLive must not rewrite it.
            self.live = Live(dir=str(metrics_dir), dvcyaml=None, save_dvc_exp=False, resume=False)

    def log_epoch(self, r: EpochResult, state: TrainingState) -> None:
        if self.live is None:
            return
        live = self.live
        live.log_metric("train/loss", r.train_loss)
        live.log_metric("train/accuracy", r.train_accuracy)
        live.log_metric("val/loss", r.val_loss)
        live.log_metric("val/accuracy", r.val_accuracy)
        live.log_metric("lr", r.lr)
        live.log_metric("images_per_s", r.images_per_s)
        live.log_metric("best/epoch", state.best_epoch, plot=False)
        live.log_metric("best/val_accuracy", state.best_val_accuracy, plot=False)
        live.log_metric("best/val_loss", state.best_val_loss, plot=False)
        live.log_metric("guess", self.chance, plot=False)  # chance level, 1 / classes: what accuracy must beat
        live.next_step()

    def end(self) -> None:
        if self.live is not None:
            self.live.end()


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    """Stepped once per epoch (wsd is `make_step_scheduler`'s)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "step":  # a tenth of the rate after each third of the run
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def make_step_scheduler(optimizer: torch.optim.Optimizer, schedule: WsdSchedule):
    """wsd, stepped after every optimizer step: a warm-up of 100 steps would be 2 epochs if stepped per epoch.
    `schedule` is read at every step: TrainingState may start its decay early."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor(step))


# ----------------------------------------------------------------------------------------------------------
# The run

# The code whose change must not resume a checkpoint: the whole package, because a hand-kept list of the
# modules that decide the weights goes stale as imports change (losing a resume is cheap; a stale one is not).
_TRAINING_CODE = sorted(Path(__file__).parent.parent.rglob("*.py"))


def training_fingerprint(params: Params, train_split: PreparedSplit, val_split: PreparedSplit) -> str:
    """What names a run's checkpoint: params, prepared data and the training code (`attention-cnn clean` asks too)."""
    return fingerprint(params, train_split, val_split, _TRAINING_CODE)


def check_outputs_writable(model_path: Path | str, checkpoint_dir: Path | str,
                           metrics_dir: Path | str | None) -> None:
    """Refuse, naming the folder, before any epoch runs, when the model, its checkpoint or the metrics could
    not be written (the stage and `attention-cnn train` call it before starting the worker processes)."""
    check_writable(model_path)
    check_writable(Path(checkpoint_dir) / "checkpoint.pt")
    if metrics_dir is not None:
        check_writable(Path(metrics_dir) / "metrics.json")


def train(params: Params, prepared_dir: Path | str = "data/prepared", model_path: Path | str = "models/model.pt",
          checkpoint_dir: Path | str = "models/.checkpoints", metrics_dir: Path | str | None = "metrics/train",
          progress: bool = True, on_epoch_end: Callable[[EpochResult], None] | None = None,
          resident: bool | None = None) -> TrainResult:
    """Train on `prepared_dir`'s train split, select on val, write the best model and metrics.

    The checkpoint goes to `checkpoint_dir`, named by the run's fingerprint, and is removed once the model is
    written. Under torchrun (train.nproc or train.nnodes > 1) every process calls this; rank 0 alone writes files.
    `on_epoch_end` runs after each epoch's checkpoint is written (progress reporting; tests use it to
    simulate a kill). `resident` overrides where the splits live: True on the device, False streamed from host
    memory, None as `fits_on_device` decides (the results are the same either way).
    """
    ctx = setup_distributed(params)
    with kernel_settings(ctx.device), reuse_freed_host_memory(ctx.device), ExitStack() as held:
        return _train(params, ctx, Path(prepared_dir), Path(model_path), Path(checkpoint_dir), metrics_dir,
                      progress, on_epoch_end, resident, held)


@dataclass
class _Run:
    """What a training run carries from one epoch to the next."""
    params: Params
    ctx: Dist
    net: AttentionCNN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generators: dict[str, torch.Generator]
    train_data: BatchSource
    val_data: BatchSource
    val_indices: torch.Tensor    # this rank's share of val, on val_data.index_device
    per_rank: int                # training images per process and pass
    plan: Plan
    progress: bool
    step_model: torch.nn.Module | None = None  # net, wrapped by DDP and torch.compile where asked


def _train(params: Params, ctx: Dist, prepared_dir: Path, model_path: Path, checkpoint_dir: Path,
           metrics_dir: Path | str | None, progress: bool,
           on_epoch_end: Callable[[EpochResult], None] | None, resident: bool | None, held: ExitStack) -> TrainResult:
    say = (lambda msg: print(msg, flush=True)) if ctx.is_main else (lambda msg: None)
    train_split, val_split = load_train_val(prepared_dir)
    per_rank = _images_per_rank(len(train_split), ctx, prepared_dir)
    plan = plan_training(params.train, per_rank)
    if params.train.epochs != "auto":  # auto makes enough steps by itself
        _warn_if_few_steps(prepared_dir, len(train_split), per_rank, plan.steps_per_pass, params.train.batch_size,
                           say)
    else:
        say(f"train: {plan.epochs} epoch{'s' if plan.epochs > 1 else ''} of {plan.steps_per_epoch} steps "
            f"({_passes(plan)} over {len(train_split)} images), {plan.steps} steps in all "
            f"(train.steps={params.train.steps}).")
    check_model_fits(params.model, train_split.img_size, ctx.device, params.train.batch_size)
    tp = params.train
    state = TrainingState(tp.patience, plan.epochs,
                          chance_ceiling=chance_ceiling(len(train_split.classes), len(val_split)),
                          patience_from=patience_from_epoch(tp, plan),
                          schedule=(WsdSchedule.planned(tp.warmup, tp.decay, plan.steps) if tp.lr_schedule == "wsd"
                                    else None), steps_per_epoch=plan.steps_per_epoch)
    run = _build_run(params, ctx, train_split, val_split, per_rank, plan, state, progress, resident, say)

    run_fingerprint = training_fingerprint(params, train_split, val_split)
    check_same_run(run_fingerprint, params, ctx)
    saved_at = checkpoint_path(checkpoint_dir, run_fingerprint)
    if ctx.is_main:  # a second run of this fingerprint in this checkout is refused while this one trains
        held.enter_context(run_lock(saved_at))
    if ctx.is_main:
        held.enter_context(_say_how_to_resume(saved_at, state, metrics_dir))
    metrics = _Metrics(metrics_dir if ctx.is_main else None, round(chance_level(len(train_split.classes)), 3))
    # Rank 0's checkpoint for every rank: the other machines of a several-machine run have none on their disk.
    saved = broadcast_from_main(read_checkpoint(saved_at, run_fingerprint, say) if ctx.is_main else None, ctx)
    best_weights = _resume(run, state, metrics, saved, saved_at, say)
    resumed_from = len(state.history)
    run.step_model = _step_model(run.net, ctx, params.train.compile)

    while not state.done:
        raise_if_stopped()
        result = _train_one_epoch(run, epoch=len(state.history) + 1, epochs=state.epochs)
        if state.update(result):
            best_weights = _keep_best(run.net, best_weights)
        _report(result, state, say)
        metrics.log_epoch(result, state)
        _save_progress(run, state, best_weights, run_fingerprint, saved_at)
        if on_epoch_end is not None:
            on_epoch_end(result)

    metrics.end()
    written = None
    if ctx.is_main:
        written = save_model(model_path, run.net, train_split.classes, resize=train_split.resize,
                             best_epoch=state.best_epoch, state_dict=best_weights)
        say(f"{model_path}: best val accuracy {state.best_val_accuracy:.4f} (loss {state.best_val_loss:.4f}) "
            f"at epoch {state.best_epoch}.")
        warning = not_learned_warning("best val accuracy", state.best_val_accuracy, len(train_split.classes),
                                      len(val_split))
        if warning:
            say(warning)
    shut_down(ctx)
    if ctx.is_main:
        remove_checkpoint(saved_at)
    return TrainResult(best_epoch=state.best_epoch, best_val_accuracy=state.best_val_accuracy,
                       best_val_loss=state.best_val_loss, last_progress_epoch=state.last_progress_epoch,
                       epochs_run=len(state.history),
                       stopped_early=state.stopping_early, resumed_from=resumed_from,
                       history=state.history, model_path=written)


@contextmanager
def _say_how_to_resume(saved_at: Path, state: TrainingState, metrics_dir: Path | str | None) -> Iterator[None]:
    """A run stopped by Ctrl-C or a signal (SIGTERM: `kill`, a cancelled Slurm job) says in one line what it leaves
    and how to resume, and removes the metrics folder it created when no epoch was logged into it. Its lock goes
    with run_lock, and the checkpoint stays for the resume."""
    created = None
    if metrics_dir is not None:
        created = Path(os.path.abspath(metrics_dir))
        while not created.parent.exists():
            created = created.parent  # the outermost folder this run will create
        created = None if created.exists() else created
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as stop:
        code = 130 if isinstance(stop, KeyboardInterrupt) else stop.code
        by = signal.Signals(code - 128).name if isinstance(code, int) and 128 < code < 128 + signal.NSIG else None
        if by is not None:
            if state.history and saved_at.is_file():
                what = (f"{saved_at} keeps it up to the last finished epoch: run the same command again to resume "
                        "from there")
            else:
                what = "no epoch had finished, so there is nothing to resume: the same command starts afresh"
            _remove_empty_folders(Path(os.path.abspath(metrics_dir)) if metrics_dir is not None else None, created)
            try:
                for bar in list(getattr(tqdm, "_instances", ())):
                    bar.close()  # the epoch's bar (leave=False) is cleared: this line is the last on the terminal
                print(f"train: stopped by {by}; {what}.", file=sys.stderr, flush=True)
            except OSError:  # no one to tell: the terminal or dvc's pipe went with the parent that was killed
                pass
        raise


def _remove_empty_folders(folder: Path | None, top: Path | None) -> None:
    """rmdir `folder` and its parents up to `top`, while empty: what a stopped run created and wrote nothing into."""
    if folder is None or top is None:
        return
    while folder.is_dir() and not any(folder.iterdir()) and (folder == top or top in folder.parents):
        folder.rmdir()
        if folder == top:
            return
        folder = folder.parent


def _passes(plan: Plan) -> str:
    whole, part = divmod(plan.steps_per_epoch, plan.steps_per_pass)
    if not whole:
        return f"{part} of a pass's {plan.steps_per_pass} steps"
    return f"{whole} pass{'es' if whole > 1 else ''}" + (f" and {part} steps" if part else "")


def _keep_best(net: AttentionCNN, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A host copy of the net's weights, written into the previous best's tensors: a new copy beside the old one
    would hold a third copy of a big `dense` layer at once, and leave holes that the allocator cannot reuse."""
    state = net.state_dict()
    if best is None or best.keys() != state.keys():
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    for k, v in state.items():
        best[k].copy_(v.detach())
    return best


def _images_per_rank(num_train: int, ctx: Dist, prepared_dir: Path) -> int:
    # DDP: every rank takes an equal share of one shared permutation (equal step counts, or DDP would hang).
    per_rank = num_train // ctx.world_size
    if per_rank == 0:
        raise UserError(f"{prepared_dir}: {num_train} training images cannot be shared by "
                        f"{ctx.world_size} processes (train.nnodes × train.nproc). Lower train.nproc.")
    return per_rank


def _warn_if_few_steps(prepared_dir: Path, num_train: int, per_rank: int, steps: int, batch_size: int,
                       say: Callable[[str], None]) -> None:
    if steps < MIN_STEPS_PER_EPOCH:
        per_process = " per process" if per_rank < num_train else ""
        say(f"warning: {prepared_dir}: {num_train} training images make {steps} steps of "
            f"train.batch_size={batch_size} per epoch{per_process}; with fewer than {MIN_STEPS_PER_EPOCH} an epoch "
            f"barely moves the weights. Use a smaller batch (`dvc exp run -S train.batch_size="
            f"{max(1, per_rank // MIN_STEPS_PER_EPOCH)}`) or add images to data.source.")


def _build_run(params: Params, ctx: Dist, train_split: PreparedSplit, val_split: PreparedSplit, per_rank: int,
               plan: Plan, state: TrainingState, progress: bool, resident: bool | None,
               say: Callable[[str], None]) -> _Run:
    tp, device = params.train, ctx.device
    # Model: same initial weights on every rank (DDP would broadcast them anyway); dropout streams differ.
    torch.manual_seed(params.seed)
    np.random.seed(params.seed % 2**32)
    random.seed(params.seed)
    with torch.device(device):  # built where it trains: a big layer is never allocated twice
        net = AttentionCNN(len(train_split.classes), train_split.img_size, params.model)
    net.set_normalization(*channel_stats(train_split.images))
    # channels_last: tensor cores on CUDA, and oneDNN's fastest conv kernels on CPU.
    net.to(memory_format=torch.channels_last)
    torch.manual_seed(params.seed + ctx.rank)
    generators = {
        "shuffle": torch.Generator().manual_seed(params.seed),               # the same order on every rank
        "augment": torch.Generator().manual_seed(params.seed + 1000 + ctx.rank),
    }
    optimizer = torch.optim.Adam(net.parameters(), lr=tp.lr, weight_decay=tp.weight_decay,
                                 fused=device.type == "cuda")  # one kernel for all parameters on CUDA
    split_bytes = train_split.images.nbytes + val_split.images.nbytes
    if resident is None:  # decided once the model is on the device, so its memory is already taken
        resident = fits_on_device(split_bytes, device)
        if not resident:
            say(f"train: the train and val images ({split_bytes / 2**30:.1f} GiB) take over half of {device}'s "
                "free memory; streaming their batches from host memory.")
    val_data = BatchSource(val_split.images, val_split.labels, device, resident)
    return _Run(params=params, ctx=ctx, net=net, optimizer=optimizer,
                scheduler=(make_step_scheduler(optimizer, state.schedule) if state.schedule is not None
                           else make_scheduler(optimizer, tp.lr_schedule, plan.epochs)), generators=generators,
                train_data=BatchSource(train_split.images, train_split.labels, device, resident), val_data=val_data,
                val_indices=torch.arange(ctx.rank, len(val_split), ctx.world_size, device=val_data.index_device),
                per_rank=per_rank, plan=plan, progress=progress)


def _step_model(net: AttentionCNN, ctx: Dist, compile_model: bool) -> torch.nn.Module:
    step_model = wrap_for_steps(net, ctx)
    if compile_model:
        # dynamic=False: the short last batch of an epoch gets its own static graph. By default its new shape
        # would make torch.compile build a shape-generic graph, which the full batches would then run too.
        step_model = torch.compile(step_model, dynamic=False)
    return step_model


def _resume(run: _Run, state: TrainingState, metrics: _Metrics, saved: dict | None, saved_at: Path,
            say: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
    """Put a checkpoint's states into the run and replay its epochs; returns the best weights so far."""
    if saved is None:
        return None
    run.net.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"][run.ctx.rank], run.generators)
    for past in saved["history"]:  # metrics/train then matches an uninterrupted run
        state.update(EpochResult(**past))
        metrics.log_epoch(state.history[-1], state)
    say(f"{saved_at}: resuming after epoch {len(state.history)} of {state.epochs}"
        + (" (training had finished; writing its outputs)" if state.done else "") + ".")
    return saved["best_weights"]


def _train_one_epoch(run: _Run, epoch: int, epochs: int) -> EpochResult:
    tp, ctx, device = run.params.train, run.ctx, run.ctx.device
    lr = run.optimizer.param_groups[0]["lr"]
    pass_steps = run.plan.pass_steps(epoch)  # train.steps may end the epoch part-way through a pass
    bar = tqdm(total=sum(min(run.per_rank, steps * tp.batch_size) for steps in pass_steps) * ctx.world_size,
               desc=f"epoch {epoch}/{epochs}",
               unit="img", unit_scale=True, disable=not (run.progress and ctx.is_main), leave=False,
               dynamic_ncols=True)
    started = time.perf_counter()
    totals = 0
    step_scheduler = run.scheduler if tp.lr_schedule == "wsd" else None
    for steps in pass_steps:  # a fresh order and fresh augmentation draws each pass
        order = torch.randperm(run.train_data.num_images, generator=run.generators["shuffle"])
        order = order[ctx.rank * run.per_rank:(ctx.rank + 1) * run.per_rank][:steps * tp.batch_size]
        order = order.to(run.train_data.index_device)
        draws = (draw_augmentation(run.per_rank, run.train_data.img_size, tp, run.generators["augment"]).to(device)
                 if tp.augment else None)
        totals = totals + train_epoch(run.step_model, run.optimizer, run.train_data, order, draws, tp, bar,
                                      images_per_update=ctx.world_size, step_scheduler=step_scheduler)
    train_loss, train_correct, train_count = all_reduce_sum(totals, ctx).tolist()  # syncs the device
    seconds = time.perf_counter() - started
    bar.close()
    if step_scheduler is None:
        run.scheduler.step()

    broadcast_buffers(run.net, ctx)  # each rank validates its share of val with the same BatchNorm stats
    val_totals = validation_totals(run.net, run.val_data, run.val_indices, 2 * tp.batch_size, tp.cpu_bf16)
    val_loss, val_correct, val_count = all_reduce_sum(val_totals, ctx).tolist()
    return EpochResult(epoch=epoch, train_loss=train_loss / train_count, train_accuracy=train_correct / train_count,
                       val_loss=val_loss / val_count, val_accuracy=val_correct / val_count, lr=lr,
                       images_per_s=train_count / seconds)


def _report(result: EpochResult, state: TrainingState, say: Callable[[str], None]) -> None:
    say(f"epoch {result.epoch}/{state.epochs}: train loss {result.train_loss:.4f} acc {result.train_accuracy:.4f} | "
        f"val loss {result.val_loss:.4f} acc {result.val_accuracy:.4f} | lr {result.lr:.2e} | "
        f"{result.images_per_s:,.0f} img/s" + (" | best" if state.best_epoch == result.epoch else ""))
    if state.early_decay_epoch == result.epoch:
        say(f"val accuracy is perfect: wsd's decay starts now and ends the run after epoch {state.epochs} "
            f"(step {state.schedule.total}).")
    if state.stopping_early:
        say(f"early stop: no val progress (a higher accuracy, or the same with a loss lower by {LOSS_MIN_DELTA}) "
            f"for {state.patience} epochs since epoch {state.last_progress_epoch}; keeping the best, epoch "
            f"{state.best_epoch}.")


def _save_progress(run: _Run, state: TrainingState, best_weights: dict[str, torch.Tensor] | None,
                   run_fingerprint: str, path: Path) -> None:
    rng = gather_objects(rng_state(run.generators), run.ctx)  # every rank's RNG goes into rank 0's checkpoint
    if run.ctx.is_main:
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "fingerprint": run_fingerprint, "model": run.net.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "best_weights": best_weights, "history": [dataclasses.asdict(h) for h in state.history], "rng": rng})
