"""One epoch's work: where batches come from (`BatchSource`), augmentation draws, the training pass, and the
validation sums. Nothing here reads the clock or writes a file, and nothing waits for the device except a
streamed batch's refill of a host buffer whose previous copy is still in flight; train.py runs the epochs."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform

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

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None,
              shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) float in [0, 1], channels_last, and labels (B,), on the device; idx on index_device.
        With flip and shift (on the device), the images are augmented (`augment`) while still uint8."""
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
        x = augment(x, flip, shift) if flip is not None else x.contiguous(memory_format=torch.channels_last)
        return images_to_float(x), y  # elementwise: keeps channels_last

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


def draw_augmentation(n: int, img_size: int, max_shift: float, generator: torch.Generator):
    """One epoch of augmentation draws: flip (n,) bool and shift (n, 2) whole pixels in [-m, m]."""
    flip = torch.rand(n, generator=generator) < 0.5
    m = int(round(max_shift * img_size))
    shift = torch.randint(-m, m + 1, (n, 2), generator=generator)
    return flip, shift


def augment(x: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Flip each image horizontally where `flip` and shift it by `shift` (dx, dy) whole pixels, borders reflected.

    torchvision's v2 transforms draw one random decision per call, i.e. per batch; we want one per image, so this
    picks every output pixel's source pixel, out[i, j] = in[i + dy, j + dx] (j mirrored first where flipped), in
    one gather of the uint8 batch: what grid_sample's nearest-neighbour, reflection-padded affine resampling gives
    (tested against it), with no float grid to build and a quarter of the bytes to move.
    x: (B, 3, S, S) any dtype; flip: (B,) bool; shift: (B, 2) int. Returns (B, 3, S, S) channels_last.
    """
    B, _, H, W = x.shape
    cols = torch.arange(W, device=x.device)
    cols = torch.where(flip[:, None], W - 1 - cols, cols) + shift[:, :1]     # (B, W)
    rows = torch.arange(H, device=x.device) + shift[:, 1:]                   # (B, H)
    rows, cols = _reflect(rows, H), _reflect(cols, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    picked = x[batch, :, rows[:, :, None], cols[:, None, :]]                # (B, H, W, 3)
    return picked.permute(0, 3, 1, 2)                                        # (B, 3, H, W), channels_last


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Fold indices outside [0, size) back in, mirrored about the border: -1 -> 0, size -> size - 1."""
    index = index.remainder(2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


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
                order: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor, tp: TrainParams, bar: tqdm,
                images_per_update: int = 1) -> torch.Tensor:
    """One pass over `order` (indices into the split, on source.index_device); flip and shift on the device.
    Returns tensor([loss_sum, correct, n]).

    The sums stay on the device until the caller reads them once per epoch.
    """
    model.train()
    device = source.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, order.numel(), tp.batch_size):
        idx = order[start:start + tp.batch_size]
        if tp.augment:
            x, y = source.batch(idx, flip[start:start + tp.batch_size], shift[start:start + tp.batch_size])
        else:
            x, y = source.batch(idx)  # (B, 3, S, S), (B,)
        with autocast(device, tp.cpu_bf16):
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

