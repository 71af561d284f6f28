"""Running a trained model on prepared images: what evaluate, visualize and predict (and train's validation)
all do, in one place.

- `load_for_inference` loads models/model.pt onto the best device, `check_model_matches` refuses a model and a
  split that do not belong together (a stale model or split);
- `images_to_float` is THE uint8 -> float conversion: the model takes RGB in [0, 1] and normalises inside;
- `forward_batches` runs the model batch by batch under inference mode and autocast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from attention_cnn.data.prepared import PreparedSplit
from attention_cnn.errors import UserError
from attention_cnn.model import AttentionCNN, AttentionOutput, TrainedModel, autocast, load_model


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_for_inference(model_path: Path | str) -> TrainedModel:
    """Load the model onto the GPU when there is one, else the CPU, in channels_last: faster convolutions on
    CUDA, and on a 2-core CPU too (measured on inference at 64 px)."""
    trained = load_model(model_path, map_location=inference_device())
    trained.model.to(memory_format=torch.channels_last)
    return trained


def check_model_matches(trained: TrainedModel, split: PreparedSplit, model_path: Path | str,
                        prepared_dir: Path | str) -> None:
    """Refuse to score a model on data with other classes, another image size or another resize policy (a
    stale model or split)."""
    if (split.classes, split.img_size, split.resize) != (trained.classes, trained.img_size, trained.resize):
        raise UserError(f"{model_path}: the model was trained on classes {trained.classes} at {trained.img_size} "
                        f"px ({trained.resize}), but {prepared_dir} holds {split.classes} at {split.img_size} px "
                        f"({split.resize}). Run `dvc repro` to retrain on the prepared data.")


def images_to_float(images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """(N, 3, S, S) uint8 RGB -> float32 in [0, 1] on `device` (moved before converting: 4x less to copy)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.float().div_(255)


def forward_batches(model: AttentionCNN, images: torch.Tensor,
                    batch_size: int) -> Iterator[tuple[int, AttentionOutput]]:
    """Yield (start index, model output) for uint8 `images` (N, 3, S, S) in batches of `batch_size`, the last
    one possibly short, under inference mode and the device's autocast."""
    device = model_device(model)
    with torch.inference_mode(), autocast(device):
        for start in range(0, images.shape[0], batch_size):
            yield start, model(images_to_float(images[start:start + batch_size], device))


def predict_logits(model: AttentionCNN, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> (N, K) float32 logits on the CPU."""
    return torch.cat([out.logits.float().cpu() for _, out in forward_batches(model, images, batch_size)])


def spread_over_classes(labels: torch.Tensor, count: int) -> list[int]:
    """Indices of `count` images taken round-robin over the classes (first image of each class, then the
    second, ...), each class in index order: deterministic, and every class shows up before any repeats.
    Evaluate scores attention on these images and visualize draws them."""
    per_class = [torch.nonzero(labels == k).flatten().tolist() for k in torch.unique(labels).tolist()]
    picked: list[int] = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        for indices in per_class:
            if rank < len(indices) and len(picked) < count:
                picked.append(indices[rank])
    return picked
