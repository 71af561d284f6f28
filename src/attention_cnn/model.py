"""The attention CNN: a small conv trunk, a soft-attention mask over its last feature map, and an MLP head.

References:
1) the seed project, "Visualizing the Attention Mechanism in CNN": its attention is a dense layer over the
   flattened final feature map, mask = sigmoid(w * ReLU(W x + b)), multiplied into the map (`dense` here).
2) Jetley, Lord, Lee, Torr, "Learn To Pay Attention", ICLR 2018: local features are scored against a
   global feature, a softmax over positions turns the scores into a mask that sums to 1, and the
   attention-weighted sum of the local features is what the classifier sees (`ltpa` here).

Every variant shares one interface, features (B, C, h, w) in -> `Masked(mask, attended)` out, and the model
returns an `AttentionOutput`, so visualization and metrics never ask which variant made the mask.
`conv` (the default) is the seed's formula with W shared across positions, a 1x1 convolution: C^2 weights
at any image size instead of the seed's (C*h*w)^2, which is 1.7 billion at 150 px.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention_cnn.atomic import atomic_torch_save
from attention_cnn.errors import UserError
from attention_cnn.memory import check_model_fits, feature_size
from attention_cnn.params import RESIZE_POLICIES, ModelParams, ParamsError, parse_params

# Heads that are linear over positions (no hidden layer): a class's map is a weighted sum of its per-position
# scores (`class_maps`); the other heads' maps come from their gated hidden layer.
CLASS_MAP_HEADS = ("cam", "class_attention")
CLASS_ATTENTION_TEMPERATURE = 5.0  # the class softmax's temperature at init (model.head=class_attention)


class AttentionOutput(NamedTuple):
    logits: torch.Tensor    # (B, K)
    features: torch.Tensor  # (B, C, h, w) final conv map, before the mask
    mask: torch.Tensor      # (B, C or 1, h, w) in [0, 1], broadcastable to features
    attended: torch.Tensor  # (B, C, h, w) features * mask


class Masked(NamedTuple):
    mask: torch.Tensor      # (B, C or 1, h, w)
    attended: torch.Tensor  # (B, C, h, w)


def autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA. On CPU only when asked (train.cpu_bf16): it is slower than fp32 on CPUs without
    bf16 instructions, and on any CPU it changes the results, so fp32 stays the reproducible default."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or cpu_bf16)


# ----------------------------------------------------------------------------------------------------------
# Attention variants: features (B, C, h, w) in, Masked(mask, attended) out.


class Attention(nn.Module):
    """Base class: a variant computes the mask; multiplying it in and pooling for the head are shared."""

    def attention_mask(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> Masked:
        mask = self.attention_mask(features)  # (B, C or 1, h, w)
        return Masked(mask=mask, attended=features * mask)

    def head_input(self, attended: torch.Tensor, head: str) -> torch.Tensor:
        """What the classifier head sees (model.head): `flatten`, the seed's, the whole attended map as one vector,
        so each weight is tied to a position; `gap` / `gmp`, its average / maximum over positions, so the same
        evidence anywhere in the image gives the same input (translation invariant); `cam`, the average, read
        by one linear layer (AttentionCNN.class_maps)."""
        if head == "flatten":
            return attended.flatten(1)     # (B, C*h*w)
        if head == "gmp":
            return attended.amax(dim=(2, 3))  # (B, C)
        return attended.mean(dim=(2, 3))   # (B, C)

    @staticmethod
    def head_width(channels: int, size: int, head: str) -> int:
        return channels * size * size if head == "flatten" else channels


class NoAttention(Attention):
    """The same network without attention: the ablation the seed never ran."""

    def attention_mask(self, features):
        B, _, h, w = features.shape
        return features.new_ones(B, 1, h, w)

    def forward(self, features):
        return Masked(mask=self.attention_mask(features), attended=features)  # skip a multiply by ones


class DenseAttention(Attention):
    """The seed's attention, exactly: mask = sigmoid(w * ReLU(W x + b)) over the flattened map, F = C*h*w."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        num_features = channels * size * size
        self.proj = nn.Linear(num_features, num_features)   # W (F, F) and b (F,)
        self.scale = nn.Parameter(torch.ones(num_features))  # w (F,), elementwise

    def attention_mask(self, features):
        B, C, h, w = features.shape
        x = features.flatten(1)                              # (B, F)
        mask = torch.sigmoid(self.scale * F.relu(self.proj(x)))
        return mask.view(B, C, h, w)


class ConvAttention(Attention):
    """The seed's formula with W shared across positions (a 1x1 conv): a mask per position and channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)     # W (C, C) and b (C,)
        self.scale = nn.Parameter(torch.ones(channels))              # w (C,), shared across positions

    def attention_mask(self, features):
        w = self.scale.view(1, -1, 1, 1)  # a 1-D parameter: channels_last leaves it alone (DDP wants its strides)
        return torch.sigmoid(w * F.relu(self.proj(features)))       # (B, C, h, w)


class SpatialAttention(Attention):
    """One mask value per position, a 2-D heat map: sigmoid(v . ReLU(W x + b) + c), W shared across positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)  # W, b
        self.score = nn.Conv2d(channels, 1, kernel_size=1)        # v, c: one number per position

    def attention_mask(self, features):
        return torch.sigmoid(self.score(F.relu(self.proj(features))))  # (B, 1, h, w)


class LTPAttention(Attention):
    """Learn To Pay Attention (Jetley et al. 2018) with dot-product compatibility.

    In the paper g comes from the layers above the attended one; here the attended map is the last one, so g
    is a learned projection of its average over positions. Each position's local feature l_s
    is scored c_s = <l_s, g> / sqrt(C), a softmax over the h*w positions makes the mask (sums to 1), and the
    head sees the attention-weighted sum g_a = sum_s a_s l_s. (The paper's parametrised form <u, l_s + g> is
    not used: its g term is the same at every position, so the softmax cancels it.)
    """

    def __init__(self, channels: int):
        super().__init__()
        self.global_proj = nn.Linear(channels, channels)

    def attention_mask(self, features):
        B, C, h, w = features.shape
        g = self.global_proj(features.mean(dim=(2, 3)))              # (B, C)
        scores = torch.einsum("bchw,bc->bhw", features, g) / math.sqrt(C)
        return scores.flatten(1).softmax(dim=1).view(B, 1, h, w)    # (B, 1, h, w), sums to 1

    def head_input(self, attended, head):
        """`gap`: the paper's attention-weighted sum g_a = sum_s a_s l_s (B, C), the mask being the weights of
        an average; `flatten` and `gmp` as for the other variants."""
        if head in ("gap", "cam"):
            return attended.sum(dim=(2, 3))
        return super().head_input(attended, head)


# One builder per name in params.ATTENTION_VARIANTS, the list params.yaml is validated against.
_BUILDERS = {
    "none": lambda channels, size: NoAttention(),
    "dense": DenseAttention,
    "conv": lambda channels, size: ConvAttention(channels),
    "spatial": lambda channels, size: SpatialAttention(channels),
    "ltpa": lambda channels, size: LTPAttention(channels),
}


def build_attention(variant: str, channels: int, size: int) -> Attention:
    return _BUILDERS[variant](channels, size)


# ----------------------------------------------------------------------------------------------------------
# The network


class ConvBlock(nn.Module):
    """conv 3x3 -> (2x2 max-pool) -> ReLU -> BatchNorm.

    The seed pools last. Max-pool commutes with ReLU exactly, and with BatchNorm whenever its scale is positive,
    so pooling first is the same family of functions, and ReLU and BatchNorm then touch a quarter of the
    values: on CPU these memory-bound ops cost as much as the convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.norm(F.relu(self.pool(self.conv(x))))


class AttentionCNN(nn.Module):
    """4 conv blocks (3 pooled) -> attention over the final map -> FC hidden -> dropout -> classes."""

    def __init__(self, num_classes: int, img_size: int, params: ModelParams):
        """Builds what it is asked for: call memory.check_model_fits first where `dense` could be too big."""
        super().__init__()
        if img_size < 8:
            raise UserError(f"img_size must be at least 8 (three 2x2 pools), got {img_size}.")
        C, size = params.channels, feature_size(img_size)
        self.num_classes, self.img_size, self.params = num_classes, img_size, params
        # Input normalisation lives in the model (set from the train split), so a saved model is self-contained.
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.trunk = nn.Sequential(
            ConvBlock(3, C, pool=True),   # (B, C, S/2, S/2)
            ConvBlock(C, C, pool=True),   # (B, C, S/4, S/4)
            ConvBlock(C, C, pool=True),   # (B, C, S/8, S/8)
            ConvBlock(C, C, pool=False),  # (B, C, h, w), h = w = S // 8
        )
        self.attention = build_attention(params.attention, C, size)
        if params.head in CLASS_MAP_HEADS:  # each position's share of a logit is exact (class_maps)
            self.head = nn.Sequential(nn.Dropout(params.dropout), nn.Linear(C, num_classes))
        else:
            self.head = nn.Sequential(
                nn.Linear(self.attention.head_width(C, size, params.head), params.hidden),
                nn.ReLU(),
                nn.Dropout(params.dropout),
                nn.Linear(params.hidden, num_classes),
            )
        if params.head == "class_attention":
            # log of the class softmax's temperature, learned. At 1 the softmax over positions is near uniform at
            # init and the head sat at chance on cluttered shapes (300 per class) for > 1,000 steps on one seed;
            # from 5 it left chance 50-100 steps after `gmp` (BENCHMARKS.md, "The class softmax learns its
            # temperature" and the take-off table before it).
            self.log_temperature = nn.Parameter(torch.tensor(math.log(CLASS_ATTENTION_TEMPERATURE)))

    @torch.no_grad()
    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel mean and std of the training images, both (3,) on the [0, 1] scale."""
        self.mean.copy_(mean.reshape(1, 3, 1, 1))
        self.std.copy_(std.clamp_min(1e-3).reshape(1, 3, 1, 1))

    @property
    def learns_mask(self) -> bool:
        """False for `none`, whose mask is constant: there is nothing to draw or to score as a saliency map."""
        return self.params.attention != "none"

    def class_maps(self, attended: torch.Tensor) -> torch.Tensor:
        """Every class's share of its logit at each position, (B, C, h, w) -> (B, K, h, w); summed over the
        positions, plus `class_offsets`, they are the logits exactly (in eval mode: dropout off).

        `cam` (Zhou et al. 2016): logits = W pool(attended) + b with pooling linear (an average; for `ltpa` the
        sum its mask weights), so position s's share of logit k is W_k . attended[:, :, s] times the pooling weight.
        `class_attention`: class k pools its own scores z_ks = W_k . window[:, :, s] with its own attention over
        positions, a_k = softmax_s(T z_k) with T a learned temperature, so logit k = sum_s a_ks z_ks + b_k and
        a_ks z_ks is position s's share. One mask per class (as Attention Branch Networks' class-wise maps, Fukui
        et al. 2019): where two classes are in view, each class's logit, and its map, come from the positions
        that look like it. window[:, c, s] is channel c's maximum over the model.class_window square around s:
        with the position alone (1) a class score must find the whole object in one position's receptive field,
        and on cluttered shapes at 60 per class the head learned less surely than `gmp`, which combines channel
        maxima from anywhere; with 3 it learned them as surely (BENCHMARKS.md, "A neighbourhood for each class
        score").
        `gmp`, `gap`, `flatten` (pool or flatten -> Linear U -> ReLU -> Linear V): the ReLU is a gate, open or
        shut for this input, so the head is linear in what it sees, logits = G(x) . pooled + offset with
        G(x) = V diag(open) U (as B-cos reads W(x) x off a dynamic-linear network, Boehle et al. 2022). `gmp`'s
        pooled value of channel c is attended where channel c peaks: that position gets G_kc times it (split
        evenly where positions tie, as amax's gradient). `gap` shares each channel over every position, `flatten`
        has a coefficient per position.
        """
        head = self.params.head
        B, C, h, w = attended.shape
        if head in CLASS_MAP_HEADS:
            if head == "class_attention" and self.params.class_window > 1:
                k = self.params.class_window
                attended = F.max_pool2d(attended, k, stride=1, padding=k // 2)      # (B, C, h, w)
            scores = torch.einsum("bchw,kc->bkhw", attended, self.head[-1].weight)   # (B, K, h, w)
            if head == "class_attention":
                sharpened = scores * self.log_temperature.exp()
                weights = sharpened.flatten(2).softmax(dim=2).view_as(scores)      # (B, K, h, w), sums to 1
                return weights * scores
            return scores * self._position_weight(h * w)
        pooled = self.attention.head_input(attended, head)                          # (B, D)
        coef = self._gated_coefficients(pooled)                                     # (B, K, D)
        if head == "flatten":
            return (coef.view(B, -1, C, h, w) * attended[:, None]).sum(dim=2)
        if head == "gmp":
            peaks = (attended == pooled[:, :, None, None]).to(attended.dtype)      # (B, C, h, w)
            where = peaks / peaks.sum(dim=(2, 3), keepdim=True)
            return torch.einsum("bkc,bchw->bkhw", coef * pooled[:, None, :], where)
        return torch.einsum("bkc,bchw->bkhw", coef, attended) * self._position_weight(h * w)  # gap

    def _position_weight(self, positions: int) -> float:
        """Each position's weight in the pooled value of `cam` and `gap` (Attention.head_input): an average, or
        for `ltpa` the sum its mask already weights."""
        return 1.0 if isinstance(self.attention, LTPAttention) else 1.0 / positions

    def class_offsets(self, attended: torch.Tensor) -> torch.Tensor:
        """What the logits add to the maps' sums (B, K): the last layer's bias, and for the hidden-layer heads the
        first layer's bias through the open gates (it depends on the input, as the gates do)."""
        bias = self.head[-1].bias.expand(attended.shape[0], -1)
        if self.params.head in CLASS_MAP_HEADS:
            return bias
        open_gates = self._open_gates(self.attention.head_input(attended, self.params.head))   # (B, H)
        return bias + open_gates * self.head[0].bias @ self.head[-1].weight.T

    def _gated_coefficients(self, pooled: torch.Tensor) -> torch.Tensor:
        """G(x) = V diag(open gates) U (B, K, D) of a hidden-layer head, for the input `pooled` (B, D)."""
        return torch.einsum("kh,bh,hd->bkd", self.head[-1].weight, self._open_gates(pooled), self.head[0].weight)

    def _open_gates(self, pooled: torch.Tensor) -> torch.Tensor:
        """1 where the hidden layer's ReLU passes its input for this `pooled` (B, D), else 0: (B, H)."""
        return (self.head[0](pooled) > 0).to(pooled.dtype)

    def forward(self, x: torch.Tensor) -> AttentionOutput:
        x = (x - self.mean) / self.std                     # (B, 3, S, S)
        features = self.trunk(x)                           # (B, C, h, w)
        mask, attended = self.attention(features)          # (B, C or 1, h, w), (B, C, h, w)
        if self.params.head == "class_attention":
            dropped = self.head[0](attended)                                         # dropout, as the other heads
            logits = self.class_maps(dropped).sum(dim=(2, 3)) + self.head[-1].bias   # (B, K)
        else:
            logits = self.head(self.attention.head_input(attended, self.params.head))  # (B, K)
        return AttentionOutput(logits=logits, features=features, mask=mask, attended=attended)


# ----------------------------------------------------------------------------------------------------------
# Saving and loading: models/model.pt holds everything prediction needs: the weights (with the normalisation
# mean and std, buffers), the classes, and how an image was made into the model's input during training (the
# resize policy of data.resize at img_size), so that predict on a raw file sees what training saw.

MODEL_FORMAT = 2  # 2: adds "resize" and "best_epoch"; a format-1 file cannot say how its images were resized


@dataclass
class TrainedModel:
    model: AttentionCNN      # in eval mode; its params are model.params
    classes: list[str]
    img_size: int
    resize: str              # data.resize of the prepared images it was trained on (params.RESIZE_POLICIES)
    best_epoch: int | None   # the epoch (from 1) whose weights these are; None when not written by training


def save_model(path: Path | str, model: AttentionCNN, classes: list[str], *, resize: str,
               best_epoch: int | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model atomically. `resize` is the policy its training images were resized with; `state_dict`
    overrides the model's own (e.g. the best epoch's weights)."""
    state = state_dict if state_dict is not None else model.state_dict()
    blob = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "classes": list(classes),
        "img_size": model.img_size,
        "resize": resize,
        "best_epoch": best_epoch,
        "params": dataclasses.asdict(model.params),
    }
    return atomic_torch_save(blob, path)


def _not_ours(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}. Re-run `dvc repro train` to write it again.")


def _read_model_file(path: Path, map_location: torch.device | str) -> tuple[dict, ModelParams, int]:
    """The blob of a model file, its model params and img_size, validated before anything is allocated."""
    if not path.is_file():
        raise UserError(f"{path}: model not found. Run `dvc repro train` first.")
    try:
        with warnings.catch_warnings():  # a foreign pickle also warns about its protocol: one line is enough
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, empty, random bytes, or a pickle of foreign objects: torch raises
        # RuntimeError, UnpicklingError, EOFError, ... and some of its messages suggest an unsafe load
        raise _not_ours(path, f"not a readable model file ({type(exc).__name__}; truncated, damaged, or "
                              "written by another program)") from exc
    if isinstance(blob, dict) and isinstance(blob.get("format"), int) and blob["format"] < MODEL_FORMAT:
        raise _not_ours(path, f"written by an older attention_cnn (model format {blob['format']}), which did not "
                              "store how training resized its images (data.resize), so predict could not see "
                              "images as training did")
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise _not_ours(path, "not a model written by this version of attention_cnn")
    if blob.get("resize") not in RESIZE_POLICIES:
        raise _not_ours(path, f"its stored 'resize' must be one of {', '.join(RESIZE_POLICIES)}, "
                              f"got {blob.get('resize')!r}")
    best = blob.get("best_epoch")
    if best is not None and not (type(best) is int and best >= 1):
        raise _not_ours(path, f"its stored 'best_epoch' must be an epoch number from 1, got {best!r}")
    classes = blob.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise _not_ours(path, f"its stored 'classes' must be a list of at least two names, got {classes!r}")
    if not isinstance(blob.get("state_dict"), dict):
        raise _not_ours(path, "it holds no weights ('state_dict')")
    stored = blob.get("params")
    if isinstance(stored, dict) and "head" not in stored:  # written before model.head: the seed's head then
        stored = {**stored, "head": "flatten"}
    if isinstance(stored, dict) and "class_window" not in stored:  # written before it: the position alone then
        stored = {**stored, "class_window": 1}
    try:  # the same schema as params.yaml, so a wrong type or an absurd size is refused before allocation
        checked = parse_params({"img_size": blob.get("img_size"), "model": stored})
    except ParamsError as exc:
        problem = str(exc).removeprefix("params.yaml: ").split(". Fix it in params.yaml")[0].rstrip(".")
        raise _not_ours(path, f"its stored params are not valid ({problem})") from exc
    return blob, checked.model, checked.img_size


def load_model(path: Path | str, map_location: torch.device | str = "cpu") -> TrainedModel:
    """Load a model written by `save_model` (weights_only=True: a model file cannot run code). Any file that is
    not one gives a UserError naming it."""
    path = Path(path)
    blob, params, img_size = _read_model_file(path, map_location)
    check_model_fits(params, img_size, map_location, training=False)
    model = AttentionCNN(len(blob["classes"]), img_size, params)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:  # weights of another architecture under the same format number
        raise _not_ours(path, "its weights do not fit this version's model") from exc
    model.to(map_location).eval()
    return TrainedModel(model=model, classes=list(blob["classes"]), img_size=img_size, resize=blob["resize"],
                        best_epoch=blob["best_epoch"])
