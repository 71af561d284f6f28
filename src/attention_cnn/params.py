"""The one place where params.yaml is read and validated.

Every stage calls `load_params()` first, so a wrong type, an out-of-range value or an unknown key stops
the run before any work is done, with a message that names the key and what it accepts.
Each section is a frozen dataclass; a field's `metadata` says what values it accepts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attention_cnn.errors import UserError

ATTENTION_VARIANTS = ("none", "dense", "conv", "spatial", "ltpa")
RESIZE_POLICIES = ("stretch", "center_crop", "pad")
LR_SCHEDULES = ("wsd", "cosine", "step", "constant")
HEADS = ("gmp", "gap", "flatten", "cam", "class_attention")
FLIPS = ("horizontal", "both", "none")
DEVICES = ("auto", "cpu", "cuda")
# The explanation methods evaluate.methods may name (explain/scoring.py builds them, in this order).
# native: the model's own class map, exact for every model.head (model.py class_maps, explain/methods.py).
EXPLAIN_METHODS = ("native", "mask", "attended", "gradcam", "ig", "smoothgrad", "occlusion", "random", "edge")


class ParamsError(UserError):
    """params.yaml is missing, malformed, or holds a value a stage cannot use."""


def _int(lo: int | None = None, hi: int | None = None) -> dict:
    return {"kind": int, "lo": lo, "hi": hi}


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"kind": float, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


def _choice(*choices: str) -> dict:
    return {"kind": str, "choices": choices}


def _subset(*choices: str) -> dict:
    return {"kind": list, "choices": choices}


def _str() -> dict:
    return {"kind": str}


def _bool() -> dict:
    return {"kind": bool}


def _epochs() -> dict:
    return {"kind": int, "lo": 1, "hi": 10_000, "auto": True}


def _endpoint() -> dict:
    return {"kind": str, "endpoint": True}


def _is_endpoint(value: str) -> bool:
    """host:port, the host a name, an IPv4 address or a bracketed IPv6 address: what torchrun accepts."""
    host, colon, port = value.rpartition(":")
    return bool(colon and host and " " not in host and port.isdigit() and 1 <= int(port) <= 65_535)


@dataclass(frozen=True)
class SampleParams:
    images_per_class: int = field(default=200, metadata=_int(6, 100_000))
    image_size: int = field(default=150, metadata=_int(32, 1024))
    jpeg_quality: int = field(default=90, metadata=_int(1, 95))


@dataclass(frozen=True)
class DataParams:
    source: str = field(default="data/sample", metadata=_str())
    val_fraction: float = field(default=0.15, metadata=_float(0.0, 0.5, lo_open=True))
    test_fraction: float = field(default=0.15, metadata=_float(0.0, 0.5, lo_open=True))
    resize: str = field(default="stretch", metadata=_choice(*RESIZE_POLICIES))
    workers: int = field(default=0, metadata=_int(0, 256))


@dataclass(frozen=True)
class ModelParams:
    attention: str = field(default="conv", metadata=_choice(*ATTENTION_VARIANTS))
    channels: int = field(default=32, metadata=_int(1, 1024))
    hidden: int = field(default=256, metadata=_int(1, 65_536))
    dropout: float = field(default=0.0, metadata=_float(0.0, 1.0, hi_open=True))
    head: str = field(default="gmp", metadata=_choice(*HEADS))
    class_window: int = field(default=3, metadata=_int(1, 31))  # odd: centred on its position (parse_params)


@dataclass(frozen=True)
class TrainParams:
    epochs: int | str = field(default="auto", metadata=_epochs())
    steps: int = field(default=2000, metadata=_int(1, 10_000_000))
    val_every: int = field(default=50, metadata=_int(1, 1_000_000))
    batch_size: int = field(default=32, metadata=_int(1, 65_536))
    lr: float = field(default=0.001, metadata=_float(0.0, 10.0, lo_open=True))
    weight_decay: float = field(default=0.0001, metadata=_float(0.0, 1.0))
    label_smoothing: float = field(default=0.0, metadata=_float(0.0, 1.0, hi_open=True))
    lr_schedule: str = field(default="wsd", metadata=_choice(*LR_SCHEDULES))
    # wsd only: fractions of the run's steps spent warming the LR up from 0, and decaying it to 0 at the end
    warmup: float = field(default=0.05, metadata=_float(0.0, 0.5))
    decay: float = field(default=0.3, metadata=_float(0.0, 1.0))
    patience: int = field(default=10, metadata=_int(1, 10_000))
    augment: bool = field(default=True, metadata=_bool())
    max_shift: float = field(default=0.1, metadata=_float(0.0, 0.5))
    flip: str = field(default="horizontal", metadata=_choice(*FLIPS))
    rotate: float = field(default=0.0, metadata=_float(0.0, 180.0))
    scale: float = field(default=0.0, metadata=_float(0.0, 0.9))
    color_jitter: float = field(default=0.3, metadata=_float(0.0, 0.9))
    grey: float = field(default=0.2, metadata=_float(0.0, 1.0))
    channel_shuffle: float = field(default=0.5, metadata=_float(0.0, 1.0))
    device: str = field(default="auto", metadata=_choice(*DEVICES))
    compile: bool = field(default=False, metadata=_bool())
    cpu_bf16: bool = field(default=False, metadata=_bool())
    nproc: int = field(default=1, metadata=_int(1, 1024))
    nnodes: int = field(default=1, metadata=_int(1, 1024))
    rdzv_endpoint: str = field(default="", metadata=_endpoint())
    rdzv_timeout: int = field(default=300, metadata=_int(1, 86_400))


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = field(default=256, metadata=_int(1, 65_536))
    faithfulness_images: int = field(default=60, metadata=_int(1, 100_000))
    faithfulness_steps: int = field(default=16, metadata=_int(2, 1024))
    methods: tuple[str, ...] = field(default=EXPLAIN_METHODS, metadata=_subset(*EXPLAIN_METHODS))
    sanity_images: int = field(default=4, metadata=_int(0, 100_000))  # 0 skips the randomisation check
    # mosaics of confidently-classified test images for the grid pointing game; 0 skips it
    mosaics: int = field(default=20, metadata=_int(0, 100_000))
    # softmax probability of the true class a correctly classified test image needs to enter a mosaic
    grid_confidence: float = field(default=0.9, metadata=_float(0.0, 1.0))
    figures: int = field(default=12, metadata=_int(0, 1000))            # images drawn with every method's map


@dataclass(frozen=True)
class VisualizeParams:
    num_images: int = field(default=12, metadata=_int(1, 10_000))
    per_class: int = field(default=6, metadata=_int(1, 100))
    alpha: float = field(default=0.5, metadata=_float(0.0, 1.0))
    colormap: str = field(default="jet", metadata=_str())


@dataclass(frozen=True)
class Params:
    seed: int = field(default=42, metadata=_int(0, 2**32 - 1))
    img_size: int = field(default=64, metadata=_int(16, 1024))
    sample: SampleParams = field(default_factory=SampleParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    visualize: VisualizeParams = field(default_factory=VisualizeParams)

    def source_path(self, root: Path | str = ".") -> Path:
        """`data.source` as a path: absolute as given, or relative to the repo root (and inside it)."""
        source = Path(self.data.source)
        return source if source.is_absolute() else Path(root) / source


# One line per key for the params reference page (docs/params.md, written by tools/params_reference.py).
# A key of the schema without a line here, or a line naming no key, fails tests/test_docs.py.
MEANINGS = {
    "seed": "seeds every random draw: the sample, the splits, weight init, shuffling, augmentation",
    "img_size": "side in pixels of the square images the network sees",
    "sample.images_per_class": "images per class of the built-in sample",
    "sample.image_size": "side in pixels of the built-in sample's JPEG files",
    "sample.jpeg_quality": "JPEG quality of the built-in sample",
    "data.source": "the image folder to learn from: absolute, or a folder inside the repository",
    "data.val_fraction": "share of each class held out to select the model (early stopping, best epoch)",
    "data.test_fraction": "share of each class held out for the reported metrics (`<class>/` layout only)",
    "data.resize": "how an image becomes a square: stretch it, crop its centre, or pad it",
    "data.workers": "decode processes of prepare; 0 = one per core (does not change the outputs)",
    "model.attention": "the attention mechanism; `none` is the same network without one",
    "model.channels": "filters in each of the 4 convolution layers",
    "model.hidden": "width of the head's hidden fully connected layer (`cam` and `class_attention` have none)",
    "model.dropout": "dropout before the last layer",
    "model.head": "what the classifier sees of the attended map: its maximum (`gmp`), average (`gap`), "
                  "the whole map (`flatten`), class activation maps (`cam`), or each class's own softmax attention "
                  "over positions of its class map (`class_attention`)",
    "model.class_window": "with `class_attention`, each position's class score reads each channel's maximum over "
                          "this odd-sided square of positions around it (1: the position alone)",
    "train.epochs": "`auto`: enough epochs for `train.steps` steps; an integer: that many single passes",
    "train.steps": "with `epochs: auto`, optimizer steps at most, whatever the folder's size",
    "train.val_every": "with `epochs: auto`, an epoch is whole passes of at least this many steps",
    "train.batch_size": "images per optimizer step, per process",
    "train.lr": "Adam's learning rate",
    "train.weight_decay": "Adam's weight decay",
    "train.label_smoothing": "cross-entropy target: 1 - x on the class, x spread over all classes",
    "train.lr_schedule": "`wsd`: warm-up, stable, decay, set every step; `cosine`, `step`, `constant`: set per epoch",
    "train.warmup": "with `wsd`, the fraction of the steps over which the learning rate rises from 0",
    "train.decay": "with `wsd`, the fraction of the steps, at the end, over which the learning rate falls to 0 (it "
                   "starts sooner, the same length, at the first perfect val score)",
    "train.patience": "epochs without validation progress before stopping early (with `wsd` counted only from "
                      "its decay; never at chance)",
    "train.augment": "apply the random per-image changes below; `false`: none of them",
    "train.max_shift": "largest random shift, as a fraction of `img_size`",
    "train.flip": "random flips: `horizontal`, `both` (only for classes with no \"up\"), or `none`",
    "train.rotate": "largest random rotation in degrees; 180 is any angle (only for classes with no \"up\")",
    "train.scale": "random zoom in or out by up to this fraction",
    "train.color_jitter": "random brightness, contrast and saturation change, up to this fraction",
    "train.grey": "probability that an image is made grey",
    "train.channel_shuffle": "probability of a random RGB channel order (set 0 when hue is the class)",
    "train.device": "`auto` (CUDA when present), `cpu` or `cuda`",
    "train.compile": "`torch.compile` the model",
    "train.cpu_bf16": "bf16 autocast on the CPU too (CUDA always uses it); faster only on CPUs with bf16 units",
    "train.nproc": "training processes per machine; above 1, DDP under torchrun",
    "train.nnodes": "machines training together; above 1, `attention-cnn train --node-rank K` joins",
    "train.rdzv_endpoint": "`host:port` of the first machine, where the machines meet (when `nnodes` > 1)",
    "train.rdzv_timeout": "seconds the machines wait for each other before a clear error",
    "evaluate.batch_size": "images per inference batch",
    "evaluate.faithfulness_images": "test images every explanation method is scored on",
    "evaluate.faithfulness_steps": "steps in which deletion and insertion remove or put back pixels",
    "evaluate.methods": "the explanation methods scored and drawn",
    "evaluate.sanity_images": "images of the cascading-randomisation sanity check; 0 skips it",
    "evaluate.figures": "test images drawn with every method's map",
    "evaluate.mosaics": "mosaics of the grid pointing game, one confidently-correct test image per class; 0 skips it",
    "evaluate.grid_confidence": "probability of its true class a test image needs to enter a mosaic",
    "visualize.num_images": "test images drawn before and after the mask",
    "visualize.per_class": "images in each per-class grid",
    "visualize.alpha": "opacity of the maps drawn over the images",
    "visualize.colormap": "matplotlib colormap of the maps",
}

# Where and how long the machines of a several-machine run wait for each other: not what they compute. dvc.yaml
# leaves them out, and neither a resume nor the check that all nodes run the same job looks at them.
RENDEZVOUS_KEYS = ("rdzv_endpoint", "rdzv_timeout")


def training_params(params: Params) -> dict:
    """The params that decide the trained weights, beside the data: seed, model and train."""
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k not in RENDEZVOUS_KEYS}
    return {"seed": params.seed, "model": dataclasses.asdict(params.model), "train": train}


def _describe(spec: dict) -> str:
    kind = spec["kind"]
    if kind is list:
        return "a non-empty list of distinct names out of " + ", ".join(spec["choices"])
    if spec.get("endpoint"):
        return "host:port of the first machine (e.g. 10.0.0.1:29500), or \"\" when train.nnodes is 1"
    if "choices" in spec:
        return "one of " + ", ".join(repr(c) for c in spec["choices"])
    if spec.get("auto"):
        return f"'auto' or an integer >= {spec['lo']} and <= {spec['hi']}"
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string"
    noun = "an integer" if kind is int else "a number"
    lo, hi = spec.get("lo"), spec.get("hi")
    lo_op = ">" if spec.get("lo_open") else ">="
    hi_op = "<" if spec.get("hi_open") else "<="
    if lo is not None and hi is not None:
        return f"{noun} {lo_op} {lo} and {hi_op} {hi}"
    if lo is not None:
        return f"{noun} {lo_op} {lo}"
    return noun


def _check_value(key: str, value: Any, spec: dict) -> Any:
    kind = spec["kind"]
    wanted = _describe(spec)
    if spec.get("auto") and value == "auto":
        return value
    if kind is list:
        ok = (isinstance(value, list) and len(value) > 0 and len(set(map(str, value))) == len(value)
              and all(isinstance(v, str) and v in spec["choices"] for v in value))
        if not ok:
            raise ParamsError(f"params.yaml: '{key}' must be {wanted}, got {value!r}. Fix it in params.yaml "
                              f"or pass a valid value with `dvc exp run -S '{key}=[...]'`.")
        return tuple(value)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif spec.get("endpoint"):
        ok = isinstance(value, str) and (value == "" or _is_endpoint(value))
    else:
        ok = isinstance(value, str) and value != ""
    if ok and "choices" in spec:
        ok = value in spec["choices"]
    if ok and kind in (int, float):
        lo, hi = spec.get("lo"), spec.get("hi")
        if lo is not None:
            ok = value > lo if spec.get("lo_open") else value >= lo
        if ok and hi is not None:
            ok = value < hi if spec.get("hi_open") else value <= hi
    if not ok:
        raise ParamsError(f"params.yaml: '{key}' must be {wanted}, got {value!r}. Fix it in params.yaml "
                          f"or pass a valid value with `dvc exp run -S {key}=...`.")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {where} must be a mapping of keys to values, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key '{prefix}{unknown[0]}' in {where}. "
                          f"Allowed keys: {', '.join(fields)}.")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue  # the dataclass default applies
        key = prefix + name
        if isinstance(f.default_factory, type):  # a nested section
            values[name] = _build(f.default_factory, raw[name], key + ".")
        else:
            values[name] = _check_value(key, raw[name], f.metadata)
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from params.yaml) and return typed Params."""
    if raw is None:
        raw = {}
    params = _build(Params, raw, "")
    if params.data.val_fraction + params.data.test_fraction >= 0.9:
        raise ParamsError("params.yaml: 'data.val_fraction' + 'data.test_fraction' must be < 0.9 so that "
                          f"training keeps data, got {params.data.val_fraction} + {params.data.test_fraction}.")
    if params.train.nnodes > 1 and not params.train.rdzv_endpoint:
        raise ParamsError(f"params.yaml: 'train.nnodes' is {params.train.nnodes}, so 'train.rdzv_endpoint' must be "
                          f"host:port of the first machine, where the others join it (e.g. "
                          f"`dvc exp run -S train.rdzv_endpoint=10.0.0.1:29500`).")
    if params.model.class_window % 2 == 0:
        raise ParamsError(f"params.yaml: 'model.class_window' must be odd (1, 3, 5, ...), so that the window is "
                          f"centred on its position, got {params.model.class_window}.")
    _check_source(params.data.source)
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping. PyYAML keeps the last one silently, but
    DVC refuses the file: the stages and `dvc exp show` must never read two different values from it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ParamsError(f"{Path(key_node.start_mark.name)}: key '{key}' is given twice, on lines "
                                  f"{first_line[key]} and {line}; DVC refuses such a file. Keep one of them.")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_source(source: str) -> None:
    """`data.source` is a dvc.yaml dep (`${data.source}`), so DVC, `dvc exp run --temp`, the queue and prepare must
    all read the same folder. DVC does not expand `~`, and it resolves a relative path from the workspace the
    stage runs in: for `--temp` and the queue a copy under .dvc/tmp/exps/, where `../x` is another folder."""
    if source.startswith("~"):
        raise ParamsError(f"params.yaml: 'data.source' is {source!r}: DVC does not expand '~', so give the absolute "
                          f"path: `dvc exp run -S data.source={os.path.expanduser(source)}`.")
    if not os.path.isabs(source) and os.path.normpath(source).split(os.sep)[0] == "..":
        raise ParamsError(f"params.yaml: 'data.source' is {source!r}, relative and outside the repo: `dvc exp run "
                          f"--temp` and the queue run in a copy elsewhere, where it names another folder. Give an "
                          f"absolute path: `dvc exp run -S data.source=/path/to/{Path(source).name}`.")


_DEFAULT_FILE = re.compile(r"(?<![\w./-])params\.yaml(?![\w.-])")  # the word, not a path that ends in it


def naming_file(exc: UserError, path: Path | str) -> UserError:
    """`exc` with its message naming `path` where it names params.yaml: the checks speak of params.yaml, the file
    the stages read, but `attention-cnn --params FILE` reads another one, and its errors must name that."""
    if Path(path) == Path("params.yaml") or not _DEFAULT_FILE.search(str(exc)):
        return exc
    return type(exc)(_DEFAULT_FILE.sub(lambda _: str(path), str(exc)))


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml. Raises ParamsError naming the key at fault."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found. Run from the repository root, where params.yaml lives.")
    try:
        with open(path, "rb") as f:  # by file: the marks carry its name; bytes: bad UTF-8 is a YAMLError
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc}).") from exc
    try:
        return parse_params(raw)
    except ParamsError as exc:
        raise naming_file(exc, path) from None
