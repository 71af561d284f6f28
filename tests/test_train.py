"""Training: outputs and metrics files, determinism, resume after a kill, augmentation, devices, and DDP."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tqdm import tqdm

from attention_cnn.training.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from attention_cnn.data.prepared import PreparedSplit, load_split, save_split
from attention_cnn.errors import UserError
from attention_cnn.model import AttentionCNN, load_model
from attention_cnn.params import parse_params
from attention_cnn.training.epoch import (BatchSource, Draws, adjust_colour, augment, draw_augmentation,
                                 train_epoch)
from attention_cnn.training.train import train

REPO = Path(__file__).resolve().parents[1]
IMG, CLASSES = 16, ["red", "green", "blue"]
RAW = {"seed": 7, "img_size": IMG,
       "model": {"attention": "conv", "channels": 4, "hidden": 8, "dropout": 0.1, "head": "flatten"},
       # The class of make_split's images is their colour: the colour augmentations would hide it.
       # cosine: these 16-step runs were tuned with it (the wsd default is resumed in test_small_data.py).
       "train": {"epochs": 4, "batch_size": 16, "lr": 0.03, "lr_schedule": "cosine", "patience": 10, "device": "cpu",
                 "channel_shuffle": 0.0, "grey": 0.0, "color_jitter": 0.0}}
PLOTS = ["train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr", "images_per_s"]


def make_split(n: int, seed: int) -> PreparedSplit:
    """Class k: a noisy image whose colour channel k is bright in a random square. Easy, but not trivial."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    images = torch.randint(0, 90, (n, 3, IMG, IMG), generator=g, dtype=torch.uint8)
    for i in range(n):
        y, x = torch.randint(0, IMG // 2, (2,), generator=g).tolist()
        images[i, labels[i], y:y + IMG // 2, x:x + IMG // 2] += 140
    return PreparedSplit(images=images, labels=labels, masks=None, files=[f"{i}.jpg" for i in range(n)],
                         classes=CLASSES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy CI box each op would wait for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    for split, n, seed in (("train", 60, 1), ("val", 24, 2), ("test", 24, 3)):
        save_split(folder, split, make_split(n, seed))
    return folder


def params(model: dict | None = None, **train):
    raw = json.loads(json.dumps(RAW))
    raw["model"].update(model or {})
    raw["train"].update(train)
    return parse_params(raw)


def run(prepared, out: Path, p=None, **kw):
    return train(p or params(), prepared, out / "model.pt", out / "checkpoints", out / "metrics",
                 progress=False, **kw)


def plot_rows(out: Path, name: str) -> list[str]:
    return (out / "metrics" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()


def summary(out: Path) -> dict:
    blob = json.loads((out / "metrics" / "metrics.json").read_text())
    blob.pop("images_per_s")  # wall-clock speed: the one metric that is not reproducible
    return blob


def weights(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """One uninterrupted run, compared against by the determinism and resume tests."""
    out = tmp_path_factory.mktemp("reference")
    return out, run(prepared, out)


def test_training_learns_and_writes_model_and_metrics_and_removes_its_checkpoint(reference):
    out, result = reference
    assert result.epochs_run == 4 and result.resumed_from == 0 and not result.stopped_early
    # The model is selected on val: best epoch has the top val accuracy, ties broken by the lower loss.
    top = max(result.history, key=lambda r: (r.val_accuracy, -r.val_loss))
    assert result.best_epoch == top.epoch and result.best_val_accuracy == top.val_accuracy
    assert result.best_val_accuracy >= 0.9  # three colours are learnable in four epochs
    assert result.history[-1].train_loss < result.history[0].train_loss
    # DVCLive files at the paths dvc.yaml's plots read, one row per epoch, x = step.
    for name in PLOTS:
        rows = plot_rows(out, name)
        assert rows[0] == f"step\t{name.split('/')[-1]}" and len(rows) == 1 + 4, name
    lrs = [float(r.split("\t")[1]) for r in plot_rows(out, "lr")[1:]]
    assert lrs[0] == 0.03 and lrs == sorted(lrs, reverse=True)  # cosine decay
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())
    assert metrics["best"] == {"epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy,
                               "val_loss": result.best_val_loss}
    assert metrics["val"]["accuracy"] == result.history[-1].val_accuracy and metrics["images_per_s"] > 0
    # The model file alone is enough for prediction.
    loaded = load_model(out / "model.pt")
    assert loaded.classes == CLASSES and loaded.img_size == IMG and loaded.model.params.attention == "conv"
    assert loaded.model.std.flatten().min() > 0.1  # normalisation taken from the train split, not defaults
    # The checkpoint served its purpose: nothing is left beside the outputs, no temp file either.
    assert sorted(p.name for p in out.iterdir()) == ["metrics", "model.pt"]


def test_two_runs_give_identical_metrics_and_weights(prepared, reference, tmp_path):
    out, _ = reference
    run(prepared, tmp_path)
    assert summary(tmp_path) == summary(out)
    for name in PLOTS[:-1]:
        assert plot_rows(tmp_path, name) == plot_rows(out, name)
    a, b = weights(out), weights(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_batches_train_the_same_model_as_a_resident_split(prepared, reference, tmp_path):
    """The path of a split too big for the device (each batch gathered from the memory-mapped split into a reused
    host buffer), forced here on CPU: same batches, order and augmentation draws, so bit-identical results."""
    out, _ = reference
    run(prepared, tmp_path, resident=False)
    assert summary(tmp_path) == summary(out)
    for name in PLOTS[:-1]:
        assert plot_rows(tmp_path, name) == plot_rows(out, name)
    a, b = weights(out), weights(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def batches_of(source: BatchSource, index_batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # All kept until the end: a host buffer refilled too early would show up in an earlier batch.
    return [source.batch(idx.to(source.index_device)) for idx in index_batches]


def assert_streamed_batches_match_resident(prepared: Path, device: torch.device) -> BatchSource:
    split = load_split(prepared, "train")  # memory-mapped, as train reads it
    g = torch.Generator().manual_seed(0)
    # Full batches, a short one, then bigger ones (the buffers grow), then a repeat of an image within a batch.
    index_batches = [torch.randperm(60, generator=g)[:n] for n in (16, 16, 16, 12, 40, 40)] + [torch.zeros(5).long()]
    resident = BatchSource(split.images, split.labels, device, resident=True)
    streamed = BatchSource(split.images, split.labels, device, resident=False)
    assert streamed.index_device == torch.device("cpu") and streamed.images.data_ptr() == split.images.data_ptr()
    for (x_r, y_r), (x_s, y_s) in zip(batches_of(resident, index_batches), batches_of(streamed, index_batches),
                                      strict=True):
        assert x_s.device.type == device.type and x_s.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x_r, x_s) and torch.equal(y_r, y_s)
    return streamed


def test_streamed_batches_equal_resident_ones_on_cpu(prepared):
    assert_streamed_batches_match_resident(prepared, torch.device("cpu"))


class Killed(Exception):
    pass


def kill_after_epoch(n: int):
    def on_epoch_end(result):
        if result.epoch == n:
            raise Killed
    return on_epoch_end


def test_resume_after_a_kill_ends_bit_identical(prepared, reference, tmp_path, capsys):
    out, _ = reference
    with pytest.raises(Killed):
        run(prepared, tmp_path, on_epoch_end=kill_after_epoch(2))
    assert not (tmp_path / "model.pt").exists()
    [checkpoint] = (tmp_path / "checkpoints").iterdir()  # named by the run's fingerprint
    # `dvc repro` deletes the outs before re-running; the checkpoint is not one of them, so it survives.
    for leftover in (tmp_path / "metrics").rglob("*"):
        if leftover.is_file():
            leftover.unlink()
    resumed = run(prepared, tmp_path)
    assert resumed.resumed_from == 2 and resumed.epochs_run == 4
    assert f"{checkpoint}: resuming after epoch 2 of 4" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints").exists()
    a, b = weights(out), weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary(tmp_path) == summary(out)
    for name in PLOTS[:-1]:
        assert plot_rows(tmp_path, name) == plot_rows(out, name)


def test_a_run_with_other_params_does_not_resume_from_a_checkpoint(prepared, tmp_path, capsys):
    with pytest.raises(Killed):
        run(prepared, tmp_path, p=params(epochs=3), on_epoch_end=kill_after_epoch(1))
    [killed] = (tmp_path / "checkpoints").iterdir()
    other = run(prepared, tmp_path, p=params(epochs=2))
    assert other.resumed_from == 0 and other.epochs_run == 2
    # The killed run's checkpoint is left for its own re-run, which resumes from it.
    assert list((tmp_path / "checkpoints").iterdir()) == [killed]
    assert run(prepared, tmp_path, p=params(epochs=3)).resumed_from == 1
    assert not (tmp_path / "checkpoints").exists()
    # A checkpoint whose content carries another fingerprint than its name is ignored, loudly.
    stale = tmp_path / "stale.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "fingerprint": "another run"}, stale)
    assert read_checkpoint(stale, "this run", print) is None
    assert "written for other params, data or code; ignoring it and starting fresh" in capsys.readouterr().out


def test_few_steps_per_epoch_warn_once_with_a_batch_size_to_try(prepared, tmp_path, capsys):
    run(prepared, tmp_path / "small", p=params(epochs=2, batch_size=16))  # 60 images: 4 steps per epoch
    out = capsys.readouterr().out
    assert out.count("warning:") == 1
    assert "60 training images make 4 steps of train.batch_size=16 per epoch" in out
    assert "-S train.batch_size=6" in out
    run(prepared, tmp_path / "enough", p=params(epochs=1, batch_size=6))  # 10 steps
    assert "warning" not in capsys.readouterr().out


def test_dense_attention_too_big_for_memory_is_refused_before_building(tmp_path):
    """The memory guard runs in train, before any weight is allocated: here 1.7e13 of them."""
    big = PreparedSplit(images=torch.zeros(3, 3, 1024, 1024, dtype=torch.uint8), labels=torch.arange(3),
                        masks=None, files=["a.jpg", "b.jpg", "c.jpg"], classes=CLASSES)
    for split in ("train", "val"):
        save_split(tmp_path / "prepared", split, big)
    with pytest.raises(UserError, match=r"dense at img_size=1024 with model.channels=1024 .* model.attention=conv"):
        run(tmp_path / "prepared", tmp_path, p=params({"attention": "dense", "channels": 1024}))


def test_early_stopping_stops_patience_epochs_after_the_last_progress_and_keeps_the_best(prepared, tmp_path):
    # The colour classes are learned in a few epochs; then val accuracy can rise no more and the loss drops by
    # less than LOSS_MIN_DELTA an epoch, so patience 2 stops the run long before 40 epochs on any CPU. (The
    # rules themselves are tested on scripted val results in test_small_data.py.)
    result = run(prepared, tmp_path, p=params(epochs=40, patience=2, lr_schedule="constant"))
    assert result.best_val_accuracy > 0.9
    assert result.stopped_early and result.epochs_run == result.last_progress_epoch + 2 < 40
    assert result.last_progress_epoch <= result.best_epoch <= result.epochs_run
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["classes"] == CLASSES and saved["best_epoch"] == result.best_epoch


PAGE_FAULT_CHECK = """
import resource, torch
from attention_cnn.training.epoch import reuse_freed_host_memory

def page_faults_of_a_second_big_tensor():
    torch.ones(16 * 2**20)  # 64 MB, over glibc's largest mmap threshold; freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

pages = 64 * 2**20 // resource.getpagesize()
assert page_faults_of_a_second_big_tensor() > pages // 2  # glibc's default: munmap, then fresh pages
with reuse_freed_host_memory(torch.device("cpu")):
    # Steady state, as in training: the first rounds may still land on heap pages a past trim gave back.
    faults = [page_faults_of_a_second_big_tensor() for _ in range(4)]
    assert faults[-1] < pages // 100, faults
assert page_faults_of_a_second_big_tensor() > pages // 2  # the process's defaults are back
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_training_on_cpu_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    # In a fresh process, as a training run is: after hundreds of tests in this one, where the heap's big chunks
    # land depends on what ran before (a full `make test` once saw 16,384 faults inside the context).
    src = Path(__file__).resolve().parents[1] / "src"
    done = subprocess.run([sys.executable, "-c", PAGE_FAULT_CHECK], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(src)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_augment_flips_and_shifts_whole_pixels_per_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    flip = torch.tensor([True, False])
    shift = torch.tensor([[0, 0], [1, -2]])  # image 1: one pixel in x, two in y
    y = augment(x, Draws(flip, shift))
    assert torch.equal(y[0], x[0].flip(-1))
    # out[i, j] = in[i + dy, j + dx], borders reflected: the interior is an exact copy of shifted pixels.
    assert torch.equal(y[1, :, 2:, :5], x[1, :, :4, 1:])
    assert torch.equal(augment(x, Draws(torch.tensor([False, False]), torch.zeros(2, 2, dtype=torch.long))), x)


def grid_sample_augment(x: torch.Tensor, flip: torch.Tensor, shift: torch.Tensor,
                        affine: torch.Tensor | None = None) -> torch.Tensor:
    """The same flip, shift and affine map as a nearest-neighbour, reflection-padded affine resampling (what
    `augment` did before it became a gather): the reference the gather must reproduce pixel for pixel."""
    B, _, H, W = x.shape
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = 1 - 2 * flip.float()
    theta[:, 1, 1] = 1
    if affine is not None:  # source = A @ (flipped output), about the centre
        theta[:, :2, :2] = affine @ theta[:, :2, :2]
    theta[:, 0, 2] = shift[:, 0] * (2 / W)
    theta[:, 1, 2] = shift[:, 1] * (2 / H)
    grid = torch.nn.functional.affine_grid(theta, [B, 3, H, W], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)


@pytest.mark.parametrize("size", [16, 15, 64])
def test_augment_picks_the_pixels_of_a_reflection_padded_affine_resampling(size):
    g = torch.Generator().manual_seed(size)
    x = torch.randint(0, 256, (40, 3, size, size), generator=g, dtype=torch.uint8)
    flip = torch.rand(40, generator=g) < 0.5
    shift = torch.randint(-size // 2, size // 2 + 1, (40, 2), generator=g)  # up to train.max_shift's limit, 0.5
    y = augment(x, Draws(flip, shift))
    assert y.dtype == torch.uint8 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, grid_sample_augment(x.float(), flip, shift).to(torch.uint8))


@pytest.mark.parametrize("size", [16, 15, 64])
def test_rotation_zoom_and_vertical_flip_pick_the_pixels_of_the_same_affine_resampling(size):
    tp = params(rotate=180.0, scale=0.3, flip="both", max_shift=0.2).train
    draws = draw_augmentation(40, size, tp, torch.Generator().manual_seed(size))
    x = torch.randint(0, 256, (40, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    y = augment(x, draws)
    assert y.dtype == torch.uint8 and y.is_contiguous(memory_format=torch.channels_last)
    expected = grid_sample_augment(x.float(), draws.flip, draws.shift, draws.affine).to(torch.uint8)
    # The same nearest pixel except where a source coordinate falls within float rounding of a pixel border.
    assert (y == expected).all(dim=1).float().mean() > 0.995


def test_channel_order_is_one_permutation_per_image():
    x = torch.randint(0, 256, (30, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    draws = draw_augmentation(30, 8, params(channel_shuffle=1.0).train, torch.Generator().manual_seed(3))
    y = augment(x, draws)
    moved = augment(x, Draws(draws.flip, draws.shift))  # the same geometry, channels kept
    for i in range(30):
        assert torch.equal(y[i], moved[i][draws.channels[i]])
    assert len({tuple(c) for c in draws.channels.tolist()}) > 1


def test_colour_changes_match_torchvision_image_by_image():
    from torchvision.transforms.v2 import functional as TF
    x = torch.rand(12, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    draws = draw_augmentation(12, 10, params(color_jitter=0.5, grey=0.3).train, torch.Generator().manual_seed(1))
    y = adjust_colour(x, draws.colour)
    assert (draws.colour[:, 2] == 0).any()  # some images went grey
    for i, (b, c, sat) in enumerate(draws.colour.tolist()):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b), c), sat)
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on CPU needs a C++ compiler")
# Under ATEN_CPU_CAPABILITY=default, torch 2.14's inductor still emits at::vec::Vectorized code but compiles it
# without the header that declares it ("'at::vec' has not been declared"): a torch bug of that override, which
# make test-isa sets; the avx2 and own-kernel runs cover compile.
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default",
                    reason="torch's inductor cannot compile its vectorised code under ATEN_CPU_CAPABILITY=default")
def test_compiled_training_matches_eager(prepared, tmp_path):
    """train.compile=true (what the GPU benchmark runs) trains the same model as eager, up to float rounding in
    the fused kernels, and saves weights that load without torch.compile's wrapper names."""
    # No dropout: compiled dropout draws its masks from another RNG stream than eager.
    # 60 images = 3 full batches of 20: one compiled graph, no recompile for a short last batch.
    eager = run(prepared, tmp_path / "eager", params({"dropout": 0.0}, epochs=2, batch_size=20))
    compiled = run(prepared, tmp_path / "compiled", params({"dropout": 0.0}, epochs=2, batch_size=20, compile=True))
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5)
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-5)
    loaded = load_model(tmp_path / "compiled" / "model.pt")
    eager_weights = weights(tmp_path / "eager")
    assert loaded.model.state_dict().keys() == eager_weights.keys()
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, eager_weights[key], atol=1e-4, rtol=1e-4)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bench/gpu_check.sh runs it on one)")


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cpu_convolutions_compute_in_bf16_only_when_train_cpu_bf16_asks(prepared, tmp_path, cpu_bf16):
    """fp32 stays the CPU default (reproducible); train.cpu_bf16 turns bf16 autocast on and still learns."""
    p = params(cpu_bf16=cpu_bf16)
    net = AttentionCNN(len(CLASSES), IMG, p.model)
    dtypes = []
    hook = net.trunk[1].conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    split = load_split(prepared, "train")
    n = len(split)
    with tqdm(disable=True) as bar:
        totals = train_epoch(net, torch.optim.Adam(net.parameters()), BatchSource(split.images, split.labels,
                             torch.device("cpu"), resident=True), torch.randperm(n),
                             Draws(torch.zeros(n, dtype=torch.bool), torch.zeros(n, 2, dtype=torch.long)), p.train, bar)
    hook.remove()
    assert totals[2].item() == n and torch.isfinite(totals[0])
    assert set(dtypes) == {torch.bfloat16 if cpu_bf16 else torch.float32}
    result = run(prepared, tmp_path, p)
    assert all(parameter.dtype == torch.float32 for parameter in weights(tmp_path).values()
               if parameter.is_floating_point())
    assert result.history[-1].train_accuracy > 1 / len(CLASSES)


@needs_cuda
def test_cuda_step_runs_in_bf16_on_channels_last_input(prepared):
    """Inside a real training pass on the GPU: the convolutions see channels_last input and compute in bf16."""
    device = torch.device("cuda")
    p = params(device="cuda")
    net = AttentionCNN(len(CLASSES), IMG, p.model).to(device, memory_format=torch.channels_last)
    seen = []
    hook = net.trunk[1].conv.register_forward_hook(lambda module, inputs, output: seen.append(
        (inputs[0].is_contiguous(memory_format=torch.channels_last), output.dtype)))
    split = load_split(prepared, "train")
    source, n = BatchSource(split.images, split.labels, device, resident=True), len(split)
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    with tqdm(disable=True) as bar:
        totals = train_epoch(net, optimizer, source, torch.randperm(n, device=device),
                             torch.zeros(n, dtype=torch.bool, device=device),
                             torch.ones(n, 2, dtype=torch.long, device=device), p.train, bar)
    hook.remove()
    assert totals[2].item() == n and torch.isfinite(totals[0])
    assert seen and all(channels_last and dtype == torch.bfloat16 for channels_last, dtype in seen)


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_training_learns_and_its_model_predicts_on_cpu(prepared, tmp_path, compiled):
    p = params(device="cuda", epochs=6, batch_size=20, compile=compiled)
    result = train(p, prepared, tmp_path / "model.pt", tmp_path / "checkpoints", metrics_dir=None, progress=False)
    assert result.best_val_accuracy >= 0.9 and result.history[-1].train_loss < result.history[0].train_loss
    loaded = load_model(tmp_path / "model.pt")  # on the CPU
    val = load_split(prepared, "val")
    with torch.no_grad():
        predicted = loaded.model(val.images.float() / 255).logits.argmax(dim=1)
    assert (predicted == val.labels).float().mean() >= 0.85  # bf16-trained weights work in fp32


@needs_cuda
def test_cuda_streamed_batches_come_through_pinned_buffers_and_equal_resident_ones(prepared):
    streamed = assert_streamed_batches_match_resident(prepared, torch.device("cuda"))
    assert all(buffer.is_pinned() for buffer in streamed._buffers)  # or the copies would not overlap compute


@needs_cuda
def test_cuda_streamed_training_learns_like_resident_training(prepared, tmp_path):
    p = params(device="cuda", epochs=6, batch_size=20)
    on_device = train(p, prepared, tmp_path / "a.pt", tmp_path / "ck", metrics_dir=None, progress=False)
    streamed = train(p, prepared, tmp_path / "b.pt", tmp_path / "ck", metrics_dir=None, progress=False,
                     resident=False)
    assert streamed.best_val_accuracy >= 0.9
    # CUDA's fast kernels are not deterministic (distributed.kernel_settings): close, not bit-identical.
    assert streamed.history[0].train_loss == pytest.approx(on_device.history[0].train_loss, rel=1e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_requested_without_cuda_is_a_user_error(prepared, tmp_path):
    with pytest.raises(UserError, match="'train.device' is cuda but no CUDA device"):
        run(prepared, tmp_path, p=params(device="cuda"))


def test_nproc_without_torchrun_is_a_user_error(prepared, tmp_path):
    with pytest.raises(UserError, match="torchrun"):
        run(prepared, tmp_path, p=params(nproc=2))


# A DDP run killed after its first epoch: every rank raises at the same point, after the checkpoint is written.
KILLED_DDP_RUN = """
import sys
from attention_cnn.params import load_params
from attention_cnn.training.train import train

def kill_after_epoch_1(result):
    if result.epoch == 1:
        sys.exit(3)

train(load_params(), "data/prepared", "models/model.pt", "models/.checkpoints", None, progress=False,
      on_epoch_end=kill_after_epoch_1)
"""


def test_ddp_two_cpu_processes_resume_a_killed_run_through_the_stage_script(prepared, tmp_path):
    """`python stages/train.py` with train.nproc=2 relaunches itself under torchrun (gloo); rank 0 writes.
    After a kill, it resumes from the checkpoint, which holds every rank's RNG."""
    raw = json.loads(json.dumps(RAW))
    raw["train"].update(epochs=2, nproc=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data").mkdir()
    os.symlink(prepared, tmp_path / "data" / "prepared")
    (tmp_path / "killed.py").write_text(KILLED_DDP_RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}  # as dvc.yaml's cmd: this checkout's code
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "killed.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode != 0 and "epoch 1/2:" in killed.stdout, killed.stdout[-2000:] + killed.stderr[-3000:]
    [saved] = (tmp_path / "models" / ".checkpoints").iterdir()
    assert len(torch.load(saved, weights_only=True)["rng"]) == 2  # every rank's RNG, for resume

    proc = subprocess.run([sys.executable, str(REPO / "stages" / "train.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "running under torchrun" in proc.stdout
    assert "resuming after epoch 1 of 2" in proc.stdout
    assert proc.stdout.count("epoch 2/2:") == 1  # only rank 0 reports
    loaded = load_model(tmp_path / "models" / "model.pt")
    assert loaded.classes == CLASSES
    assert not (tmp_path / "models" / ".checkpoints").exists()  # rank 0 removed it once the model was written
    val_accuracy = tmp_path / "metrics" / "train" / "plots" / "metrics" / "val" / "accuracy.tsv"
    assert len(val_accuracy.read_text().splitlines()) == 1 + 2  # the replayed epoch and the new one
    assert json.loads((tmp_path / "metrics" / "train" / "metrics.json").read_text())["step"] == 1
