"""One epoch's work: where batches come from (`BatchSource`), augmentation draws, the training pass, and the
validation sums. Nothing here reads the clock or writes a file, and nothing waits for the device except a
streamed batch's refill of a host buffer whose previous copy is still in flight; train.py runs the epochs."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attention_cnn.inference import images_to_float
from attention_cnn.model import autocast
from attention_cnn.params import TrainParams

# A split stays on the device for the whole run when its images take at most this fraction of the device's free
# memory (read once the model is built); the rest is left for activations, gradients and the optimizer.
RESIDENT_FRACTION = 0.5


def fits_on_device(split_bytes: int, device: torch.device, fraction: float = RESIDENT_FRACTION) -> bool:
    """Whether images of `split_bytes` stay on `device` for the run. On CPU always: the split is in host memory
    already (memory-mapped), and a CPU batch is an index into it either way."""
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return split_bytes <= fraction * free_bytes


# mallopt parameters, from glibc's malloc.h, and their defaults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextlib.contextmanager
def reuse_freed_host_memory(device: torch.device):
    """On CPU with glibc, keep freed tensors' memory in the process for the next step to reuse.

    glibc serves an allocation over 32 MB (its highest mmap threshold) with a fresh mmap and frees it with munmap,
    so every step paid page faults for the big activations (at 64 px, 32 channels and batch 64 the first conv's
    output and its gradients are 33.5 MB each): about 10k faults per step at 32 channels and 150k at 128, 14 % and
    27 % of the CPU time. From the heap, untrimmed, the same pages come back every step. Only where the memory
    lives changes, so results do not; the cost is a higher peak RSS (2.14 GB instead of 1.93 at 150 px).
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)  # give back what the run kept


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")  # glibc's soname on every Linux architecture it supports


class BatchSource:
    """A split's uint8 images and labels, handed out as float batches on the training device.

    Resident: the split is copied to the device once and indexed there. Streamed (a split too big for the device):
    each batch is gathered from the host split (memory-mapped by load_split) into one of two reusable buffers,
    pinned when the device is CUDA, and copied without blocking, so the next batch is gathered while the device
    works. Both give the same images in the same order, so a run's results do not depend on the choice.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, resident: bool):
        self.device, self.resident = device, resident
        self.num_images, self.img_size = labels.numel(), images.shape[-1]
        self.index_device = device if resident else torch.device("cpu")  # where batch indices must live
        self.images = images.to(device) if resident else images          # (N, 3, S, S) uint8
        self.labels = labels.to(device) if resident else labels          # (N,) int64
        self._buffers: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = [None, None]  # a buffer's last copy to the device
        self._turn = 0

    def batch(self, idx: torch.Tensor, draws: Draws | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) float in [0, 1], channels_last, and labels (B,), on the device; idx on index_device.
        With draws (on the device), the images are moved (`augment`) while still uint8, then recoloured."""
        if self.resident:
            x, y = self.images[idx], self.labels[idx]
        else:
            buffer = self._host_buffer(idx.numel())
            torch.index_select(self.images, 0, idx, out=buffer)
            x = buffer.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                self._copied[self._turn] = torch.cuda.Event()
                self._copied[self._turn].record(torch.cuda.current_stream(self.device))
            self._turn = 1 - self._turn
            y = self.labels[idx].to(self.device, non_blocking=True)
        if draws is None:
            return images_to_float(x.contiguous(memory_format=torch.channels_last)), y
        x = images_to_float(augment(x, draws))  # elementwise: keeps channels_last
        return (x if draws.colour is None else adjust_colour(x, draws.colour)), y

    def _host_buffer(self, n: int) -> torch.Tensor:
        """This turn's buffer, once the device has finished copying out of it (it was filled two batches ago)."""
        if not self._buffers or self._buffers[0].shape[0] < n:
            pin = self.device.type == "cuda"  # pinning needs CUDA; on CPU the copy to the device is a no-op
            if self._copied[0] is not None or self._copied[1] is not None:
                torch.cuda.current_stream(self.device).synchronize()  # old buffers may still be read by a copy
            self._buffers = [torch.empty((n, *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
                             for _ in range(2)]
            self._copied = [None, None]
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        return self._buffers[self._turn][:n]


@dataclass
class Draws:
    """One epoch's per-image augmentation draws (params train.*), on one device; any part may be None (off).
    flip (n,) bool | shift (n, 2) whole pixels (dx, dy) | affine (n, 2, 2) output->source map, rotation, zoom and
    vertical flip | channels (n, 3) channel order | colour (n, 3) brightness, contrast, saturation factors."""
    flip: torch.Tensor
    shift: torch.Tensor
    affine: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    colour: torch.Tensor | None = None

    def _parts(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]  # not astuple: it deep-copies tensors

    def to(self, device: torch.device) -> "Draws":
        return Draws(*(None if t is None else t.to(device) for t in self._parts()))

    def __getitem__(self, part: slice) -> "Draws":
        return Draws(*(None if t is None else t[part] for t in self._parts()))


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def draw_augmentation(n: int, img_size: int, tp: TrainParams, generator: torch.Generator) -> Draws:
    """One epoch of per-image draws from the run's `augment` generator (in its checkpoint, so a resumed run
    draws the same). A part whose param is off draws nothing, so turning it on changes only the runs using it."""
    flip = torch.rand(n, generator=generator) < 0.5
    if tp.flip == "none":
        flip = torch.zeros(n, dtype=torch.bool)
    m = int(round(tp.max_shift * img_size))
    shift = torch.randint(-m, m + 1, (n, 2), generator=generator)
    draws = Draws(flip, shift)
    if tp.rotate > 0 or tp.scale > 0 or tp.flip == "both":
        angle = torch.deg2rad(_uniform(n, -tp.rotate, tp.rotate, generator))
        zoom = _uniform(n, 1 - tp.scale, 1 + tp.scale, generator)  # > 1 zooms in (a crop), < 1 out
        vflip = torch.rand(n, generator=generator) < 0.5 if tp.flip == "both" else torch.zeros(n, dtype=torch.bool)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        sy = 1 - 2 * vflip.double()
        # source = A @ output, about the image centre: rotate by -angle and shrink by zoom, then flip rows
        draws.affine = torch.stack([torch.stack([cos, -sin * sy], 1), torch.stack([sin, cos * sy], 1)], 1).float()
    if tp.channel_shuffle > 0:
        perms = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)])
        keep = torch.rand(n, generator=generator) >= tp.channel_shuffle
        draws.channels = torch.where(keep[:, None], torch.arange(3), perms)
    if tp.color_jitter > 0 or tp.grey > 0:
        j = tp.color_jitter
        colour = torch.stack([_uniform(n, 1 - j, 1 + j, generator) for _ in range(3)], 1).float()
        grey = torch.rand(n, generator=generator) < tp.grey
        colour[:, 2] = torch.where(grey, 0.0, colour[:, 2])  # saturation 0: grey
        draws.colour = colour
    return draws


def augment(x: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Move each image's pixels by its draws, in one gather of the uint8 batch: flip, shift, and where drawn a
    rotation / zoom / vertical flip and a channel order.

    torchvision's v2 transforms draw one random decision per call, i.e. per batch; we want one per image, so this
    picks every output pixel's source pixel: out[i, j] = in[A (i, j) + (dy, dx)] about the centre (j mirrored first
    where flipped), nearest pixel, borders reflected. That is grid_sample's nearest-neighbour, reflection-padded
    affine resampling (tested against it), with no float image to build and a quarter of the bytes to move.
    Without rotation or zoom the rows and columns are picked separately (no (B, H, W) coordinate grid).
    x: (B, 3, S, S) any dtype. Returns (B, 3, H, W) channels_last.
    """
    B, _, H, W = x.shape
    flip, shift = draws.flip, draws.shift
    batch = torch.arange(B, device=x.device)[:, None, None]
    if draws.affine is None:
        cols = torch.arange(W, device=x.device)
        cols = torch.where(flip[:, None], W - 1 - cols, cols) + shift[:, :1]     # (B, W)
        rows = torch.arange(H, device=x.device) + shift[:, 1:]                   # (B, H)
        rows, cols = _reflect(rows, H)[:, :, None], _reflect(cols, W)[:, None, :]  # (B, H, 1), (B, 1, W)
    else:
        rows, cols = _affine_source(draws.affine, flip, shift, H, W)              # (B, H, W) each
    if draws.channels is None:
        picked = x[batch, :, rows, cols]                                         # (B, H, W, 3)
    else:
        picked = x[batch[..., None], draws.channels[:, None, None, :], rows[..., None], cols[..., None]]
    return picked.permute(0, 3, 1, 2)                                            # (B, 3, H, W), channels_last


def _affine_source(affine: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor, H: int, W: int):
    """Source row and column (B, H, W) of every output pixel: A about the centre, then the shift; rounded to the
    nearest pixel (ties to even, as grid_sample) and reflected into the image."""
    cy, cx = (H - 1) / 2, (W - 1) / 2
    ys = torch.arange(H, device=affine.device, dtype=torch.float32) - cy
    xs = torch.arange(W, device=affine.device, dtype=torch.float32) - cx
    xs = torch.where(flip[:, None], -xs, xs)                                      # (B, W): mirrored columns
    a = affine[:, :, :, None, None]                                               # (B, 2, 2, 1, 1)
    src_x = a[:, 0, 0] * xs[:, None, :] + a[:, 0, 1] * ys[None, :, None] + cx + shift[:, 0, None, None]
    src_y = a[:, 1, 0] * xs[:, None, :] + a[:, 1, 1] * ys[None, :, None] + cy + shift[:, 1, None, None]
    rows, cols = torch.round(src_y).long(), torch.round(src_x).long()
    return _reflect(rows, H), _reflect(cols, W)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Fold indices outside [0, size) back in, mirrored about the border: -1 -> 0, size -> size - 1."""
    index = index.remainder(2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


def adjust_colour(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors (B, 3) on a float batch (B, 3, H, W) in [0, 1].

    torchvision's adjust_brightness / adjust_contrast / adjust_saturation take one factor per call; this applies
    the same three formulas in the same order (each clamped to [0, 1]), with a factor per image, in a few
    elementwise ops over the batch (tested against torchvision image by image). Saturation 0 is greyscale.
    """
    f = colour[:, :, None, None, None]                                           # (B, 3, 1, 1, 1)
    x = (x * f[:, 0]).clamp(0, 1)                                                 # brightness
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)                             # (B, 1, 1, 1)
    x = (f[:, 1] * x + (1 - f[:, 1]) * mean).clamp(0, 1)                          # contrast
    return (f[:, 2] * x + (1 - f[:, 2]) * _grey(x)).clamp(0, 1)                   # saturation


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (B, 1, H, W), torchvision's rgb_to_grayscale."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


@torch.no_grad()
def validation_totals(model: torch.nn.Module, source: BatchSource, indices: torch.Tensor,
                      batch_size: int, cpu_bf16: bool = False) -> torch.Tensor:
    """Sum of cross-entropy losses, number correct and count over `indices`: tensor([loss_sum, correct, n])."""
    model.eval()
    device = source.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, indices.numel(), batch_size):
        idx = indices[start:start + batch_size]
        x, y = source.batch(idx)
        with autocast(device, cpu_bf16):
            logits = model(x).logits.float()
        totals[0] += F.cross_entropy(logits, y, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += idx.numel()
    return totals


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: BatchSource,
                order: torch.Tensor, draws: Draws | None, tp: TrainParams, bar: tqdm,
                images_per_update: int = 1,
                step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> torch.Tensor:
    """One pass over `order` (indices into the split, on source.index_device); draws on the device, or None
    (train.augment off). `step_scheduler`, when given, is stepped after every optimizer step.
    Returns tensor([loss_sum, correct, n]).

    The sums stay on the device until the caller reads them once per epoch.
    """
    model.train()
    device = source.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, order.numel(), tp.batch_size):
        idx = order[start:start + tp.batch_size]
        part = None if draws is None else draws[start:start + tp.batch_size]
        x, y = source.batch(idx, part)  # (B, 3, S, S), (B,)
        with autocast(device, tp.cpu_bf16):
            logits = model(x).logits  # (B, K)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=tp.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        # Sums, not per-batch means: a short last batch weighs what it should.
        totals[0] += loss.detach() * idx.numel()
        totals[1] += (logits.detach().argmax(dim=1) == y).sum()
        totals[2] += idx.numel()
        bar.update(idx.numel() * images_per_update)
    return totals

