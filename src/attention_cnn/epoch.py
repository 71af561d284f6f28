"""One epoch's work on tensors already on the device: augmentation draws, the training pass, and the validation
sums. Nothing here reads the clock, writes a file or waits for the device; train.py runs the epochs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attention_cnn.model import autocast
from attention_cnn.params import TrainParams


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


@torch.no_grad()
def validation_totals(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
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
