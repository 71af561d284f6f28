"""How long a training run lasts and when it stops: the step budget's plan (`plan_training`), one epoch's
results (`EpochResult`), and model selection with early stopping on val (`TrainingState`). train.py runs the
epochs; this says how many and whether to go on."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from attention_cnn.params import TrainParams

# At equal val accuracy, a val loss lower by less than this is still selected, but is no progress for early
# stopping: once val accuracy is perfect, the loss of a confident model keeps halving (0.003, 0.0016, ...)
# for as long as it trains, and a bigger step budget would never stop early.
LOSS_MIN_DELTA = 0.01


@dataclass(frozen=True)
class Plan:
    """How long a run trains. A logged "epoch" (validation, early-stopping count, LR step, checkpoint) is up to
    `passes` passes over the train split: 1 for an explicit train.epochs; with train.epochs=auto, enough passes
    to make at least train.val_every optimizer steps, and enough epochs to make train.steps in all, so a small
    folder gets as many weight updates as a big one, and patience counts validations, not tiny epochs.
    train.steps is a cap (`max_steps`): an epoch never runs past it, so the last one, or a pass of it, may be cut
    short; a val_every far above the budget gives one epoch of train.steps, not a pass rounded up to val_every."""
    epochs: int
    passes: int
    steps_per_pass: int
    max_steps: int | None = None  # train.steps with train.epochs=auto; None: whole passes

    @property
    def steps_per_epoch(self) -> int:
        whole = self.passes * self.steps_per_pass
        return whole if self.max_steps is None else min(whole, self.max_steps)

    @property
    def steps(self) -> int:
        whole = self.epochs * self.passes * self.steps_per_pass
        return whole if self.max_steps is None else min(whole, self.max_steps)

    def pass_steps(self, epoch: int) -> list[int]:
        """Optimizer steps of each pass of `epoch` (from 1): steps_per_pass each, until the budget ends."""
        left = min(self.steps_per_epoch, self.steps - (epoch - 1) * self.steps_per_epoch)
        return [min(self.steps_per_pass, left - done) for done in range(0, max(left, 0), self.steps_per_pass)]


def plan_training(tp: TrainParams, per_rank: int) -> Plan:
    steps_per_pass = math.ceil(per_rank / tp.batch_size)
    if tp.epochs != "auto":
        return Plan(epochs=tp.epochs, passes=1, steps_per_pass=steps_per_pass)
    # No pass an epoch would not start: the budget ends it first.
    passes = min(math.ceil(tp.val_every / steps_per_pass), math.ceil(tp.steps / steps_per_pass))
    per_epoch = min(passes * steps_per_pass, tp.steps)
    return Plan(epochs=math.ceil(tp.steps / per_epoch), passes=passes, steps_per_pass=steps_per_pass,
                max_steps=tp.steps)


@dataclass
class WsdSchedule:
    """The wsd schedule of one run: `factor(step)`, the LR multiplier before optimizer step `step` (0-based; what
    LambdaLR calls each step), a linear rise to 1 over the first `warm` steps, 1 (the stable phase), then a
    cosine fall to 0 from `decay_start` to `total`; and the one change a run makes to it, `decay_after`.

    Why not one cosine over the whole budget: small folders sit near chance for hundreds of steps before they
    "take off", and a cosine has already lowered the LR by then, so whether a run learns became a matter of seed
    and float rounding. A long stable phase leaves the take-off time; the decay at the end still anneals.

    Why a perfect val starts the decay at once: it cannot select a more accurate model, so more steps at the peak
    LR only wait. Runs that got there early used to stop at the peak LR (patience ran out before the planned
    decay), unannealed: the built-in sample's seed 1 scored 0.978 and 0.989 on two CPU kernel paths, 0.994 on
    both now. The decay is as long as planned (at least one epoch): 0.3 / 0.7 of the steps so far, the run's own
    30 %, annealed too little (0.983). The change is a function of the val history, so a resumed run, which
    replays its history, makes it again at the same epoch: the checkpoint needs nothing more."""
    total: int          # optimizer steps of the run
    warm: int           # steps of the linear rise
    decay_start: int    # the first step of the cosine fall to 0 at `total` (= total: no decay)

    @classmethod
    def planned(cls, warmup: float, decay: float, total: int) -> WsdSchedule:
        """train.warmup and train.decay, fractions of `total`."""
        return cls(total=total, warm=round(warmup * total), decay_start=decay_start_step(total, decay))

    def factor(self, step: int) -> float:
        if step < self.warm:
            return (step + 1) / self.warm
        if step < self.decay_start:
            return 1.0
        t = (step - self.decay_start) / max(1, self.total - self.decay_start)
        return 0.5 * (1 + math.cos(math.pi * t))

    def decay_after(self, step: int, steps_per_epoch: int) -> bool:
        """Start the decay at `step`, the end of an epoch with a perfect val, when that is in the stable phase;
        the run's new `total` is a whole number of epochs. False when nothing changes (no decay planned)."""
        length = self.total - self.decay_start  # the planned decay's
        if length == 0 or not self.warm <= step < self.decay_start:
            return False
        self.total = min(self.total, math.ceil((step + max(steps_per_epoch, length)) / steps_per_epoch)
                         * steps_per_epoch)
        self.decay_start = step
        return True


def decay_start_step(total: int, decay: float) -> int:
    """The first step of wsd's decay phase."""
    return total - round(decay * total)


def patience_from_epoch(tp: TrainParams, plan: Plan) -> int:
    """The first epoch whose lack of val progress counts towards patience. With wsd: the first epoch that ends
    inside the decay phase, because before it the LR is at its peak and a plateau is no sign of convergence (the
    runs this guards against sat at a partial plateau for 300 steps, then learned). Other schedules: epoch 1."""
    if tp.lr_schedule != "wsd":
        return 1
    steps_per_epoch = plan.passes * plan.steps_per_pass
    return decay_start_step(plan.steps, tp.decay) // steps_per_epoch + 1


@dataclass(frozen=True)
class EpochResult:
    epoch: int             # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_s: float    # training images per second over all processes, augmentation included


@dataclass
class TrainingState:
    """Model selection on val and early stopping, advanced by one `update` per finished epoch: in the live loop,
    and again over a checkpoint's history when a run resumes.

    Epochs whose best val accuracy is still at or below `chance_ceiling` do not count towards patience: a run
    that has not left chance yet has not converged, it is still looking (small folders sit there for hundreds of
    steps before they learn), so it is not stopped for that; the step budget still ends it.
    Epochs before `patience_from` do not count either (see `patience_from_epoch`), unless val accuracy is
    perfect: then no later epoch can select a more accurate model, and only the loss is left to improve. With
    wsd (`schedule`), the first perfect epoch in the stable phase also starts the decay, and the run ends with it
    (`epochs` shrinks), or sooner when patience runs out.

    The kept model is the best of the epochs that count (`counting`): until the first of them the best so far is
    tracked (an interrupted run has one), then the selection starts again there. Weights at wsd's peak LR are
    iterates the decay has yet to settle, and on a small val split one lucky epoch among them outranked every
    decayed one: on cluttered shapes at 60 per class (27 val images) the kept peak-LR epoch scored 0.870 on 300
    unseen images, the decayed epochs up to 0.927 (BENCHMARKS.md, "The kept model: the best of the epochs that
    count")."""
    patience: int
    epochs: int
    chance_ceiling: float = 0.0
    patience_from: int = 1
    schedule: WsdSchedule | None = None  # wsd's, which a perfect val shortens (its `decay_after`)
    steps_per_epoch: int = 0             # with `schedule`: optimizer steps of every epoch but maybe the last
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0            # 0: no epoch yet
    best_val_accuracy: float = 0.0
    best_val_loss: float = math.inf
    last_progress_epoch: int = 0   # the epoch patience counts from (0: none yet)
    epochs_without_improvement: int = 0
    early_decay_epoch: int = 0     # the epoch whose perfect val started wsd's decay early (0: none)
    counting: bool = False         # an epoch has counted: only those are candidates for the kept model

    def update(self, result: EpochResult) -> bool:
        """Record a finished epoch. True when it is the best so far: top val accuracy, ties to the lower loss."""
        self.history.append(result)
        if not self.counting and (result.epoch >= self.patience_from or result.val_accuracy >= 1.0):
            self.counting = True  # the first epoch that counts: the peak-LR epochs before it are no candidates
            self.best_epoch, self.best_val_accuracy, self.best_val_loss = 0, 0.0, math.inf
        more_accurate = self.best_epoch == 0 or result.val_accuracy > self.best_val_accuracy
        as_accurate = result.val_accuracy == self.best_val_accuracy
        improved = more_accurate or (as_accurate and result.val_loss < self.best_val_loss)
        progress = more_accurate or (as_accurate and result.val_loss < self.best_val_loss - LOSS_MIN_DELTA)
        if improved:
            self.best_epoch, self.best_val_accuracy, self.best_val_loss = (result.epoch, result.val_accuracy,
                                                                            result.val_loss)
        if progress:
            self.last_progress_epoch = result.epoch
            self.epochs_without_improvement = 0
        elif self.counting and self.best_val_accuracy > self.chance_ceiling:
            self.epochs_without_improvement += 1
        if (self.schedule is not None and result.val_accuracy >= 1.0
                and self.schedule.decay_after(result.epoch * self.steps_per_epoch, self.steps_per_epoch)):
            self.early_decay_epoch = result.epoch
            self.epochs = math.ceil(self.schedule.total / self.steps_per_epoch)  # the budget's last may be short
        return improved

    @property
    def stopping_early(self) -> bool:
        return self.epochs_without_improvement >= self.patience

    @property
    def done(self) -> bool:
        return self.stopping_early or len(self.history) >= self.epochs
