"""The prepare stage on fixtures drawn here: layouts, every mode and format, bad files, errors, masks, policies."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageCms

from attention_cnn.data.decode import MAX_IMAGE_PIXELS, decode_image
from attention_cnn.data.prepare import prepare
from attention_cnn.data.prepared import SPLITS, load_split
from attention_cnn.errors import UserError
from attention_cnn.params import parse_params

REPO = Path(__file__).resolve().parents[1]
S = 16  # img_size of most tests
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# ---------------------------------------------------------------------------------------------- fixtures

def noise(path: Path, seed: int, size=(40, 30), fmt: str | None = None, **save) -> Path:
    """A distinct RGB noise image (distinct bytes, so no accidental duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt, **save)
    return path


def solid(path: Path, color, size=(32, 24), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def class_folders(root: Path, classes=("cat", "dog", "owl"), per_class=10, ext="png") -> Path:
    for k, name in enumerate(classes):
        for i in range(per_class):
            noise(root / name / f"{i:03d}.{ext}", seed=1000 * k + i)
    return root


def params(source: Path, **data):
    data = {"source": str(source), "val_fraction": 0.2, "test_fraction": 0.2, "workers": 1, **data}
    return parse_params({"img_size": S, "seed": 7, "data": data})


def run(source: Path, out: Path, **data):
    report = prepare(params(source, **data), out_dir=out, progress=False)
    return report, {split: load_split(out, split) for split in SPLITS}


def close(a, b, tol=12) -> bool:
    return all(abs(int(p) - int(q)) <= tol for p, q in zip(a, b))


def decoded_rgb(path: Path, policy="stretch", size=S) -> np.ndarray:
    result = decode_image(path, size, policy)
    assert result.error is None, result.error
    return result.pixels.transpose(1, 2, 0)  # (S, S, 3)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims width x height (CRC fixed), i.e. a decompression bomb's header."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------------------------------------- layouts

def test_class_folders_layout(tmp_path):
    src = class_folders(tmp_path / "src")
    report, splits = run(src, tmp_path / "out")
    assert report.layout == "class_folders"
    for split, per_class in (("train", 6), ("val", 2), ("test", 2)):
        data = splits[split]
        assert data.classes == ["cat", "dog", "owl"]
        assert data.images.dtype == torch.uint8 and data.images.shape == (3 * per_class, 3, S, S)
        assert data.labels.dtype == torch.int64 and data.labels.tolist() == sorted(data.labels.tolist())
        assert data.masks is None
        for label, file in zip(data.labels.tolist(), data.files):
            assert file.split("/")[0] == data.classes[label]
        assert report.counts[split] == {"cat": per_class, "dog": per_class, "owl": per_class}
    all_files = [f for data in splits.values() for f in data.files]
    assert sorted(all_files) == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    # the stored pixels are the decoded file, resized
    first = splits["train"]
    assert torch.equal(first.images[0], torch.from_numpy(decoded_rgb(src / first.files[0]).transpose(2, 0, 1)))
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["counts"] == report.counts and on_disk["skipped"] == [] and on_disk["kept"] == 30
    for split in SPLITS:
        with Image.open(tmp_path / "out" / f"preview_{split}.png") as preview:
            assert preview.width > 8 * S and preview.height >= 3 * S


def test_train_test_layout_keeps_test_and_carves_val(tmp_path):
    src = tmp_path / "src"
    class_folders(src / "train", per_class=10)
    for k, name in enumerate(("cat", "dog", "owl")):
        for i in range(3):
            noise(src / "test" / name / f"t{i}.jpg", seed=50_000 + 10 * k + i)
    report, splits = run(src, tmp_path / "out")
    assert report.layout == "train_test"
    assert sorted(splits["test"].files) == sorted(p.relative_to(src).as_posix() for p in (src / "test").rglob("*.jpg"))
    assert report.counts["val"] == {"cat": 2, "dog": 2, "owl": 2}  # 0.2 of each train folder
    assert report.counts["train"] == {"cat": 8, "dog": 8, "owl": 8}
    assert all(f.startswith("train/") for f in splits["train"].files + splits["val"].files)
    assert any("test_fraction is not used" in note for note in report.notes)


def test_intel_layout_as_unpacked(tmp_path):
    src = tmp_path / "intel"
    for k, name in enumerate(("buildings", "forest")):
        for i in range(6):
            noise(src / "seg_train" / "seg_train" / name / f"{i}.jpg", seed=10 * k + i, size=(150, 150))
        for i in range(2):
            noise(src / "seg_test" / "seg_test" / name / f"{100 + i}.jpg", seed=500 + 10 * k + i, size=(150, 150))
    for i in range(4):
        noise(src / "seg_pred" / "seg_pred" / f"{900 + i}.jpg", seed=900 + i, size=(150, 150))
    report, splits = run(src, tmp_path / "out")
    assert report.layout == "intel"
    assert report.classes == ["buildings", "forest"]
    assert report.counts["test"] == {"buildings": 2, "forest": 2}
    assert all(f.startswith("seg_test/seg_test/") for f in splits["test"].files)
    assert report.unlabelled["images"] == 4 and report.unlabelled["folder"] == "seg_pred/seg_pred"
    assert not any("seg_pred" in f for data in splits.values() for f in data.files)
    assert "unlabelled 4 in seg_pred/seg_pred (unused)" in report.summary()


# ---------------------------------------------------------------------------------------------- modes and formats

def test_every_mode_becomes_correct_rgb(tmp_path):
    d = tmp_path
    palette = Image.new("P", (32, 24), 1)
    palette.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    palette.save(d / "p.png")
    transparent_p = Image.new("P", (32, 24), 0)
    transparent_p.putpalette([*RED, *BLUE] + [0] * 762)
    transparent_p.save(d / "p_transparent.png", transparency=0)  # index 0 (red) is transparent
    srgb_to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    ImageCms.applyTransform(Image.new("RGB", (32, 24), (200, 30, 30)), srgb_to_lab).save(d / "lab.tif")
    cases = {
        solid(d / "l.png", 100, mode="L"): (100, 100, 100),
        solid(d / "one_bit.png", 1, mode="1"): WHITE,
        solid(d / "la.png", (60, 255), mode="LA"): (60, 60, 60),
        d / "p.png": BLUE,
        d / "p_transparent.png": WHITE,
        solid(d / "rgba_opaque.png", (10, 200, 30, 255), mode="RGBA"): (10, 200, 30),
        solid(d / "cmyk.jpg", (255, 0, 0, 0), mode="CMYK", quality=95): (0, 255, 255),  # cyan
        solid(d / "cmyk.tif", (0, 255, 0, 0), mode="CMYK"): (255, 0, 255),              # magenta
        solid(d / "i.tif", 65535, mode="I"): WHITE,                                     # 32-bit int, 16-bit range
        solid(d / "f.tif", 0.5, mode="F"): (128, 128, 128),                             # float in 0..1
        d / "lab.tif": (200, 30, 30),
    }
    for path, expected in cases.items():
        pixels = decoded_rgb(path)
        assert pixels.shape == (S, S, 3), path.name
        assert close(pixels[S // 2, S // 2], expected, tol=4), (path.name, pixels[S // 2, S // 2], expected)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.zeros((32, 32), np.uint16)
    values[:, :16], values[:, 16:] = 65535, 32768
    Image.fromarray(values).save(tmp_path / "grey16.png")
    Image.fromarray(values).save(tmp_path / "grey16.tif")
    for name in ("grey16.png", "grey16.tif"):
        with Image.open(tmp_path / name) as image:
            assert image.mode.startswith("I")  # really 16-bit on disk
        pixels = decoded_rgb(tmp_path / name, size=32)
        assert tuple(pixels[5, 3]) == (255, 255, 255)
        assert tuple(pixels[5, 28]) == (128, 128, 128), "32768 must scale to 128, not clip to 255"


def test_alpha_is_composited_on_white(tmp_path):
    half_red = solid(tmp_path / "half.png", (255, 0, 0, 128), mode="RGBA")
    clear = solid(tmp_path / "clear.png", (0, 0, 0, 0), mode="RGBA")
    clear_la = solid(tmp_path / "clear_la.png", (0, 0), mode="LA")
    assert close(decoded_rgb(half_red)[4, 4], (255, 127, 127), tol=2)
    assert tuple(decoded_rgb(clear)[4, 4]) == WHITE
    assert tuple(decoded_rgb(clear_la)[4, 4]) == WHITE


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), RED)  # stored: left half red, right half blue
    image.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half ends up on top
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    stretched = decoded_rgb(tmp_path / "phone.jpg")
    assert close(stretched[2, S // 2], RED, 40) and close(stretched[S - 3, S // 2], BLUE, 40)
    padded = decoded_rgb(tmp_path / "phone.jpg", policy="pad")  # upright it is tall: bars left and right
    assert tuple(padded[S // 2, 0]) == BLACK and tuple(padded[S // 2, S - 1]) == BLACK
    assert close(padded[2, S // 2], RED, 40) and close(padded[S - 3, S // 2], BLUE, 40)


def test_resize_policies_geometry(tmp_path):
    image = Image.new("RGB", (40, 20), GREEN)  # red left quarter, blue right quarter
    image.paste(RED, (0, 0, 10, 20))
    image.paste(BLUE, (30, 0, 40, 20))
    path = tmp_path / "wide.png"
    image.save(path)

    # resampling may blend a level or two across a sharp edge, hence tol=3
    stretch = decoded_rgb(path, "stretch")
    assert close(stretch[8, 1], RED, 3) and close(stretch[8, 8], GREEN, 3) and close(stretch[8, 14], BLUE, 3)
    assert close(stretch[0, 8], GREEN, 3) and close(stretch[15, 8], GREEN, 3)  # the full height is used

    crop = decoded_rgb(path, "center_crop")  # the central 20x20 is all green (the filter's reach aside)
    assert all(close(pixel, GREEN, 3) for row in crop[:, 2:-2] for pixel in row)
    assert all(close(pixel, GREEN, 3) for pixel in crop[:, 8])

    pad = decoded_rgb(path, "pad")  # scaled to 16x8 at rows 4..11, black bars above and below
    assert (pad[:4] == 0).all() and (pad[12:] == 0).all()
    assert close(pad[8, 1], RED, 3) and close(pad[8, 8], GREEN, 3) and close(pad[8, 14], BLUE, 3)


def test_extreme_aspect_ratios(tmp_path):
    src = tmp_path / "src"
    for k, (name, size) in enumerate((("wide", (600, 3)), ("tall", (2, 500)), ("dot", (1, 1)))):
        for i in range(5):
            noise(src / name / f"{i}.png", seed=10 * k + i, size=size)
    for policy in ("stretch", "center_crop", "pad"):
        report, splits = run(src, tmp_path / policy, resize=policy)
        assert report.kept == 15 and not report.skipped
        assert all(data.images.shape[1:] == (3, S, S) for data in splits.values())
    wide = decoded_rgb(src / "wide" / "0.png", "pad")  # 600x3 -> 16x1 at row (16 - 1) // 2
    assert (np.delete(wide, 7, axis=0) == 0).all() and wide[7].any()


def test_formats_names_and_frames(tmp_path):
    src = tmp_path / "src"
    noise(src / "Ünïcode clâss" / "photo 1.JPG", 1)
    noise(src / "Ünïcode clâss" / "日本 2.JPEG", 2)
    noise(src / "Ünïcode clâss" / "three.PNG", 3)
    noise(src / "Ünïcode clâss" / "four.webp", 4, fmt="WEBP", lossless=True)
    noise(src / "Ünïcode clâss" / "five.BMP", 5)
    noise(src / "Ünïcode clâss" / "six.tiff", 6)
    noise(src / "Ünïcode clâss" / "nested" / "seven.tif", 7)
    for i in range(4):
        noise(src / "other" / f"{i}.webp", 10 + i, fmt="WEBP")
    frames = [Image.new("RGB", (30, 20), RED), Image.new("RGB", (30, 20), BLUE)]
    frames[0].save(src / "other" / "anim.gif", save_all=True, append_images=frames[1:])
    report, splits = run(src, tmp_path / "out", val_fraction=0.15, test_fraction=0.15)
    assert report.skipped == [] and report.kept == 12
    assert report.classes == ["other", "Ünïcode clâss"]
    files = {f for data in splits.values() for f in data.files}
    assert {"Ünïcode clâss/photo 1.JPG", "Ünïcode clâss/日本 2.JPEG", "Ünïcode clâss/nested/seven.tif",
            "other/anim.gif"} <= files
    assert tuple(decoded_rgb(src / "other" / "anim.gif")[5, 5]) == RED  # the first frame
    report_json = (tmp_path / "out" / "report.json").read_text(encoding="utf-8")
    assert "Ünïcode clâss" in report_json


# ---------------------------------------------------------------------------------------------- bad files

def test_broken_files_are_skipped_and_reported(tmp_path):
    src = class_folders(tmp_path / "src", per_class=6, ext="jpg")
    good = (src / "cat" / "000.jpg").read_bytes()
    (src / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "cat" / "empty.jpg").write_bytes(b"")
    (src / "dog" / "text.jpg").write_text("this is not a picture\n")
    (src / "dog" / "garbage.png").write_bytes(np.random.default_rng(0).bytes(500))
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, "PNG")
    (src / "owl" / "cut.png").write_bytes(png.getvalue()[:300])
    png_claiming(src / "owl" / "bomb error.png", 30_000, 30_000)  # > 2 x MAX_IMAGE_PIXELS: Pillow raises
    png_claiming(src / "owl" / "bomb warning.png", 15_000, 15_000)  # > 1 x: Pillow only warns; refused too
    limit = Image.MAX_IMAGE_PIXELS
    assert limit == MAX_IMAGE_PIXELS == 200_000_000  # our documented bound, not Pillow's 89 MP

    report, splits = run(src, tmp_path / "out")
    assert Image.MAX_IMAGE_PIXELS == limit  # the guard stays on
    reasons = {entry["path"]: entry["reason"] for entry in report.skipped}
    assert set(reasons) == {"cat/truncated.jpg", "cat/empty.jpg", "dog/text.jpg", "dog/garbage.png",
                            "owl/cut.png", "owl/bomb error.png", "owl/bomb warning.png"}
    assert "truncated" in reasons["cat/truncated.jpg"]
    assert reasons["cat/empty.jpg"] == "empty file (0 bytes)"
    assert "identify" in reasons["dog/text.jpg"] and "identify" in reasons["dog/garbage.png"]
    assert "decompression-bomb" in reasons["owl/bomb error.png"]
    assert "decompression-bomb" in reasons["owl/bomb warning.png"]
    assert report.kept == 18 and sum(len(d) for d in splits.values()) == 18  # every valid image kept
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {entry["path"] for entry in on_disk["skipped"]} == set(reasons)
    assert "skipped 7" in report.summary()


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    src = class_folders(tmp_path / "src", per_class=5)
    (src / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "cat" / "._000.png").write_bytes(b"\0\5\26\7AppleDouble")  # macOS metadata, named like an image
    noise(src / "dog" / ".hidden" / "secret.png", 99)
    noise(src / ".cache" / "x.png", 98)
    (src / "__MACOSX" / "cat").mkdir(parents=True)
    (src / "__MACOSX" / "cat" / "._001.png").write_bytes(b"\0")
    (src / "owl" / "notes.txt").write_text("owls")
    (src / "labels.csv").write_text("file,label\n")
    noise(src / "stray.png", 97)  # an image outside any class folder
    report, splits = run(src, tmp_path / "out", val_fraction=0.2, test_fraction=0.2)
    assert report.classes == ["cat", "dog", "owl"] and report.kept == 15 and report.skipped == []
    ignored = {entry["path"]: entry["reason"] for entry in report.ignored}
    assert ignored == {"owl/notes.txt": "not an image file", "labels.csv": "not an image file",
                       "stray.png": "not inside a class folder"}
    assert report.hidden_ignored == 5  # .DS_Store, ._000.png, .hidden/, .cache/, __MACOSX/
    assert not any("secret" in f or "._" in f for data in splits.values() for f in data.files)


# ---------------------------------------------------------------------------------------------- errors

def expect_error(tmp_path, source: Path, *fragments: str, **data) -> None:
    out = tmp_path / "out" / "prepared"
    with pytest.raises(UserError) as caught:
        prepare(params(source, **data), out_dir=out, progress=False)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # no temp leftovers


def test_missing_source(tmp_path):
    expect_error(tmp_path, tmp_path / "nowhere", "nowhere", "does not exist", "data.source")


def test_no_class_folders(tmp_path):
    (tmp_path / "src").mkdir()
    noise(tmp_path / "src" / "loose.jpg", 1)
    expect_error(tmp_path, tmp_path / "src", "no class folders")


def test_fewer_than_two_classes(tmp_path):
    class_folders(tmp_path / "src", classes=("images",))
    expect_error(tmp_path, tmp_path / "src", "only one class folder", "'images'", "at least two")


def test_class_without_image_files(tmp_path):
    src = class_folders(tmp_path / "src", classes=("cat", "dog"))
    (src / "empty_class").mkdir()
    (src / "empty_class" / "readme.txt").write_text("nothing")
    expect_error(tmp_path, src, "class 'empty_class' has no readable image")


def test_class_whose_files_are_all_broken(tmp_path):
    src = class_folders(tmp_path / "src", classes=("cat", "dog"))
    for i in range(3):
        (src / "broken" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (src / "broken" / f"{i}.jpg").write_text("not an image")
    expect_error(tmp_path, src, "class 'broken' has no readable image", "broken/0.jpg")


def test_split_would_be_empty(tmp_path):
    src = class_folders(tmp_path / "src", classes=("cat", "dog"))
    noise(src / "rare" / "a.png", 1)
    noise(src / "rare" / "b.png", 2)
    expect_error(tmp_path, src, "class 'rare' has only 2 readable images", "no data.val_fraction / "
                 "data.test_fraction can split them", "Add at least 1 more image to")


def test_train_test_layout_errors(tmp_path):
    src = tmp_path / "src"
    class_folders(src / "train", classes=("cat", "dog"))
    expect_error(tmp_path, src, "no test/")
    class_folders(src / "test", classes=("cat", "dog", "eel"), per_class=2)
    expect_error(tmp_path, src, "class 'eel' appears in", "but not in")
    shutil.rmtree(src / "test" / "eel")
    shutil.rmtree(src / "test" / "dog")
    expect_error(tmp_path, src, "class 'dog' has no readable image in", "test split would be empty")


def test_stage_script_exits_2_and_writes_nothing(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "stages", repo / "stages")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(tmp_path / "missing")
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    failed = subprocess.run([sys.executable, "stages/prepare.py"], cwd=repo, capture_output=True, text=True)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.startswith("error: data.source:") and "missing" in failed.stderr
    assert not (repo / "data").exists()

    raw["data"]["source"] = str(class_folders(tmp_path / "src", per_class=5))
    raw["img_size"] = S
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    ok = subprocess.run([sys.executable, "stages/prepare.py"], cwd=repo, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("prepare: 15 images, 3 classes") and ok.stdout.count("\n") == 1
    assert sorted(p.name for p in (repo / "data").iterdir()) == ["prepared"]  # no temp folder left behind
    assert {p.name for p in (repo / "data" / "prepared").iterdir()} == {
        "train.pt", "val.pt", "test.pt", "report.json", "preview_train.png", "preview_val.png", "preview_test.png"}


def test_failed_run_keeps_previous_outputs_and_rerun_replaces_them(tmp_path):
    src = class_folders(tmp_path / "src", per_class=5)
    out = tmp_path / "data" / "prepared"
    run(src, out)
    first = (out / "train.pt").read_bytes()
    with pytest.raises(UserError):
        prepare(params(tmp_path / "gone"), out_dir=out, progress=False)
    assert (out / "train.pt").read_bytes() == first
    run(src, out, val_fraction=0.4)  # a rerun replaces its own outputs
    assert (out / "train.pt").read_bytes() != first
    (out / "notes.txt").write_text("the user's")  # but never a file it did not write
    with pytest.raises(UserError, match=r"prepared: holds files this command did not write \(notes.txt\)"):
        run(src, out)
    assert (out / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]


# ---------------------------------------------------------------------------- leakage, determinism, masks

def test_duplicates_across_splits_are_reported(tmp_path):
    src = tmp_path / "src"
    class_folders(src / "train", classes=("cat", "dog"), per_class=10)
    class_folders(src / "test", classes=("cat", "dog"), per_class=2)  # same seeds: test/cat/000 == train/cat/000
    noise(src / "test" / "dog" / "x.png", 777)
    shutil.copy(src / "test" / "dog" / "x.png", src / "test" / "dog" / "copy of x.png")  # same split: no leak
    report, _ = run(src, tmp_path / "out")
    groups = {tuple(sorted(f["path"] for f in group["files"])) for group in report.duplicates_across_splits}
    assert ("test/cat/000.png", "train/cat/000.png") in groups
    assert ("test/dog/001.png", "train/dog/001.png") in groups
    assert len(groups) == 4 and report.duplicate_groups_within_split == 1
    assert all({f["split"] for f in g["files"]} > {"test"} for g in report.duplicates_across_splits)
    assert "WARNING" in report.summary() and "different splits" in report.summary()
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(on_disk["duplicates_across_splits"]) == 4


def test_copies_within_a_class_land_in_one_split(tmp_path):
    src = class_folders(tmp_path / "src", per_class=10)
    # cat: three copies of 000 and two of 005 under other names; dog/owl untouched.
    for original, copies in (("000", ("copy_a", "copy_b")), ("005", ("zz_copy",))):
        for copy in copies:
            shutil.copy(src / "cat" / f"{original}.png", src / "cat" / f"{copy}.png")
    report, splits = run(src, tmp_path / "out")
    split_of = {f: split for split in SPLITS for f in splits[split].files}
    assert len({split_of[f"cat/{name}.png"] for name in ("000", "copy_a", "copy_b")}) == 1
    assert split_of["cat/005.png"] == split_of["cat/zz_copy.png"]
    assert report.duplicates_across_splits == [] and report.duplicate_groups_within_split == 2
    assert sum(report.totals.values()) == 33 and all(report.counts[split]["cat"] >= 1 for split in SPLITS)
    # Classes without copies split as before: the copies in cat change nothing in dog and owl.
    _, plain = run(class_folders(tmp_path / "plain", per_class=10), tmp_path / "plain_out")
    for split in SPLITS:
        assert [f for f in splits[split].files if not f.startswith("cat/")] == \
            [f for f in plain[split].files if not f.startswith("cat/")]


def test_a_class_of_copies_cannot_fill_every_split(tmp_path):
    src = class_folders(tmp_path / "src", classes=("cat", "dog"), per_class=10)
    for i in range(1, 10):
        shutil.copy(src / "dog" / "000.png", src / "dog" / f"{i:03d}.png")  # ten files, two different images
    noise(src / "dog" / "other.png", seed=99)
    with pytest.raises(UserError, match=r"class 'dog' has 11 readable image\(s\) .* but only 2 distinct images .* splits? would be empty"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_deterministic_and_independent_of_listing_order(tmp_path, monkeypatch):
    src = class_folders(tmp_path / "src", per_class=10)
    report, serial = run(src, tmp_path / "a", workers=1)
    _, parallel = run(src, tmp_path / "b", workers=2)
    for split in SPLITS:
        assert torch.equal(serial[split].images, parallel[split].images)
        assert torch.equal(serial[split].labels, parallel[split].labels)
        assert serial[split].files == parallel[split].files
        assert (tmp_path / "a" / f"{split}.pt").read_bytes() == (tmp_path / "b" / f"{split}.pt").read_bytes()

    # the file system lists the files in another order: same splits
    real_walk = os.walk

    def reversed_walk(*args, **kwargs):
        for dirpath, dirnames, filenames in real_walk(*args, **kwargs):
            yield dirpath, dirnames, filenames[::-1]

    monkeypatch.setattr(os, "walk", reversed_walk)
    _, reordered = run(src, tmp_path / "c")
    monkeypatch.undo()
    assert all(reordered[split].files == serial[split].files for split in SPLITS)

    # and the seed matters
    other = prepare(parse_params({"img_size": S, "seed": 8, "data": {"source": str(src), "val_fraction": 0.2,
                                                                     "test_fraction": 0.2, "workers": 1}}),
                    out_dir=tmp_path / "d", progress=False)
    assert other.counts == report.counts
    assert load_split(tmp_path / "d", "test").files != serial["test"].files


def test_masks_carried_with_the_same_geometry(tmp_path):
    src = tmp_path / "src"
    for k, name in enumerate(("cat", "dog")):
        for i in range(5):
            noise(src / name / f"{i}.jpg", seed=10 * k + i, size=(40, 20))
            mask = Image.new("L", (40, 20), 0)
            mask.paste(255, (0, 0, 20, 20))  # the left half is evidence
            (src / ".masks" / name).mkdir(parents=True, exist_ok=True)
            mask.save(src / ".masks" / name / f"{i}.png")
    report, splits = run(src, tmp_path / "out", resize="pad")
    assert report.masks["used"] and report.masks["matched"] == 10 and report.classes == ["cat", "dog"]
    assert report.hidden_ignored == 0  # .masks/ is read, not ignored
    masks = splits["train"].masks
    assert masks.dtype == torch.uint8 and masks.shape == (len(splits["train"]), S, S)
    assert set(masks.unique().tolist()) == {0, 255}
    # padded: rows 4..11 hold the image; its left half is evidence, the bars are not
    assert (masks[:, 8, :7] == 255).all() and (masks[:, 8, 9:] == 0).all()
    assert (masks[:, :4] == 0).all() and (masks[:, 12:] == 0).all()

    (src / ".masks" / "dog" / "3.png").unlink()
    Image.new("L", (8, 8)).save(src / ".masks" / "cat" / "1.png")  # wrong size
    report, splits = run(src, tmp_path / "out2", resize="pad")
    assert not report.masks["used"] and report.masks["matched"] == 8
    assert report.masks["problems"] == [{"path": "cat/1.jpg", "reason": "mask is 8x8, the image 40x20"}]
    assert all(data.masks is None for data in splits.values())
    assert "masks 8/10 (not used)" in report.summary()
