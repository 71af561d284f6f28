"""The memory guard of the seed's dense attention: refuse, before allocating anything, a layer that would not
fit the memory at hand, with a message that says what to use instead.

Dense attention over a C x h x w map has (C*h*w)^2 weights: 1.7 billion at the seed's 150 px and 128 channels.
Train calls `check_model_fits` before building the network; loading a model for prediction should too, with
training=False (weights only).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from attention_cnn.errors import UserError
from attention_cnn.params import ModelParams

# Bytes a weight of the layer costs to train with Adam in fp32, an upper bound of what training really takes. At the
# peak, inside the optimizer step, 8 fp32 tensors of the layer's size are alive: the weight, its gradient, Adam's
# two moments; the step's temporaries (torch's Adam on CPU makes gradient + weight_decay * weight, sqrt(second
# moment) and the denominator as new tensors); and the host copy of the best epoch's weights. That is 32 bytes;
# a ninth copy allows for the allocator, which keeps freed memory for reuse (epoch.reuse_freed_host_memory) and
# cannot always fit a new copy into the holes. `attention-cnn train` measures 33 on CPU
# (tests/test_odd_training.py checks the bound). On CUDA the fused Adam makes no temporaries, and the bf16
# copies that autocast makes of the weight and its gradient stay below the same bound.
TRAIN_BYTES_PER_WEIGHT = 36
INFER_BYTES_PER_WEIGHT = 4


def available_memory_bytes(device: torch.device | str) -> tuple[int, str]:
    """Memory a new allocation can use on `device`, and a word on where the number comes from."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free memory on {torch.cuda.get_device_name(device)}"
    # CPU: MemAvailable is what the kernel can hand out without swapping. A container may be capped lower by
    # its cgroup, so take the smaller of the two. (psutil would do this, but it is not a dependency.)
    available = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    cgroup_max, cgroup_current = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if cgroup_max.is_file() and cgroup_current.is_file():
        limit = cgroup_max.read_text().strip()
        if limit != "max":
            headroom = int(limit) - int(cgroup_current.read_text().strip())
            available = headroom if available is None else min(available, headroom)
    if available is None:  # not Linux: physical memory is the best estimate we have without psutil
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available, "available RAM"


def feature_size(img_size: int) -> int:
    """Side h = w of the model's final feature map: three 2x2 max-pools, each rounding down."""
    return img_size // 8


def dense_attention_bytes(channels: int, img_size: int, batch_size: int = 64, training: bool = True) -> int:
    """Bytes the seed's dense attention needs: F*F + 2F weights (W, b, w) plus its activations, F = C*h*w."""
    num_features = channels * feature_size(img_size) ** 2
    num_weights = num_features * num_features + 2 * num_features
    if not training:
        return num_weights * INFER_BYTES_PER_WEIGHT
    # Activations kept for backward: the input, W x + b, its ReLU, the sigmoid, and their gradients (fp32): a few
    # MB beside the weights' copies, whose size does not depend on the batch.
    activations = 8 * batch_size * num_features * 4
    return num_weights * TRAIN_BYTES_PER_WEIGHT + activations


def check_dense_fits(channels: int, img_size: int, device: torch.device | str = "cpu",
                     batch_size: int = 64, training: bool = True) -> None:
    """Raise a UserError when a dense attention layer of this size would not fit the memory of `device`."""
    needed = dense_attention_bytes(channels, img_size, batch_size, training)
    available, where = available_memory_bytes(device)
    if needed > available:
        num_features = channels * feature_size(img_size) ** 2
        what = "to train with Adam" if training else "to hold"
        raise UserError(
            f"params.yaml: 'model.attention' dense at img_size={img_size} with model.channels={channels} is a "
            f"{num_features:,} x {num_features:,} layer ({num_features ** 2 / 1e9:.2f} billion weights) and needs "
            f"about {needed / 1e9:.1f} GB {what}, but only {available / 1e9:.1f} GB of {where} is at hand on "
            f"{torch.device(device).type}. Use the same mechanism with weights shared across positions: "
            f"`dvc exp run -S model.attention=conv` (or lower img_size / model.channels).")


def check_model_fits(params: ModelParams, img_size: int, device: torch.device | str = "cpu",
                     batch_size: int = 64, training: bool = True) -> None:
    """Call before building an AttentionCNN: only `dense` attention grows with the square of the map."""
    if params.attention == "dense":
        check_dense_fits(params.channels, img_size, device, batch_size, training)
