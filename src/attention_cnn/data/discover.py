"""Which files of an image folder are read, and under which class. Decodes nothing.

One walker (`walk_images`) serves both prepare and predict, with the same rules:
- hidden files and folders (".*", and zip's "__MACOSX") are never read, only counted;
- only regular files are listed as images: a FIFO, socket or device named like an image would hang or
  exhaust the reader, so it is skipped here with its reason;
- a symlinked folder is followed when it leads outside the folder being read (users link to avoid copies),
  but not when it resolves to that folder, to a parent of it, or to anywhere inside it: those images would be
  read twice, or under the wrong class (`forest/loop -> ..` would label every class as forest);
- each real folder is read once, so a loop among folders outside the source ends;
- a folder that cannot be listed (no permission, an I/O error) is never passed over silently: it is recorded
  in `Skips.unreadable`, which prepare reports with the class that loses its images, and predict in skipped.csv.

`discover` detects the layout of `data.source` (see prepare.py) and lists every image with its class.
`untracked_source_warning` tells a plain run that `dvc exp run --temp` and the queue will not see data.source.
"""

from __future__ import annotations

import functools
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from attention_cnn.errors import UserError

LAYOUT_CLASS_FOLDERS = "class_folders"
LAYOUT_TRAIN_TEST = "train_test"
LAYOUT_INTEL = "intel"

MASKS_DIR = ".masks"                   # ground-truth masks beside the classes; hidden, so never a class
IGNORED_FOLDERS = ("__MACOSX",)        # zip metadata: only AppleDouble "._" files, never a class
VAL_FOLDERS = ("val", "valid", "validation")
# Pillow registers these extensions but cannot decode the pixels by itself (stub plugins, a header-only
# MPEG reader, EPS needs Ghostscript), so a file with them is "not an image" here, not a broken image.
NOT_DECODED_BY_PILLOW = ("BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS")
NOT_AN_IMAGE = "not an image file"


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (".jpg", ...) of every format Pillow can decode by itself."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in NOT_DECODED_BY_PILLOW)


def display_name(text: str) -> str:
    """A file or folder name as it is written to reports, CSV and JSON files, figures and the console: bytes that
    are not valid UTF-8 (which os.listdir hands over as surrogate escapes, and which no UTF-8 writer accepts)
    shown as "\\xff". The walk keeps the real names to open the files; everything it reports uses these."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_FOLDERS


@dataclass
class Skips:
    """What a walk did not read: entries with a reason (listed in the report), folders that could not be listed,
    and a count of hidden names."""
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {"path" ("/"-ended), "reason"[, "class"]}
    hidden: int = 0


def unreadable_reason(exc: OSError) -> str:
    return f"cannot be listed ({exc.strerror or exc}): its images are not read"


def _non_regular_reason(path: str) -> str | None:
    """Why `path` (after following symlinks) is not a file we may read, or None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc}; a broken symlink?)"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{kind}, not a regular file: not read"


def _inside_or_above(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) in (path, root)


class _Walker:
    """State of one walk: the folder that bounds it, the real folders already read, what was skipped."""

    def __init__(self, base: Path, skips: Skips, exclude: Path | None):
        self.base = base
        self.real_base = os.path.realpath(base)
        self.skips = skips
        self.exclude = os.path.realpath(exclude) if exclude is not None else None
        self.visited: set[str] = set()

    def rel(self, path: str) -> str:
        return Path(path).relative_to(self.base).as_posix() or "."

    def keep_folder(self, dirpath: str, name: str) -> bool:
        path = os.path.join(dirpath, name)
        if is_hidden(name):
            self.skips.hidden += 1
            return False
        real = os.path.realpath(path)
        if real == self.exclude:
            return False  # the command's own output folder, inside the input folder
        if os.path.islink(path) and _inside_or_above(real, self.real_base):
            self.skips.ignored.append({"path": self.rel(path) + "/", "reason": (
                f"symlink to {real}, which is {self.base} itself, inside it or above it: not followed, so no "
                "image is read twice or under another class")})
            return False
        return True

    def not_listed(self, exc: OSError) -> None:
        """os.walk's onerror: without it, a folder that cannot be listed is skipped without a word."""
        self.skips.unreadable.append({"path": self.rel(exc.filename).rstrip("/") + "/",
                                      "reason": unreadable_reason(exc)})

    def walk(self, folder: Path, extensions: frozenset[str]) -> list[str]:
        images = []
        for dirpath, dirnames, filenames in os.walk(folder, onerror=self.not_listed, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in self.visited:  # reached twice through symlinks outside the base: read once
                self.skips.ignored.append({"path": self.rel(dirpath) + "/",
                                           "reason": f"{real} is already read through another path"})
                dirnames[:] = []
                continue
            self.visited.add(real)
            dirnames[:] = sorted(d for d in dirnames if self.keep_folder(dirpath, d))
            rel_dir = self.rel(dirpath)  # once per folder: strings below, 14k Paths are slow
            for name in filenames:
                rel = f"{rel_dir}/{name}" if rel_dir != "." else name
                if is_hidden(name):
                    self.skips.hidden += 1
                elif (reason := _non_regular_reason(os.path.join(dirpath, name))) is not None:
                    self.skips.ignored.append({"path": rel, "reason": reason})
                elif os.path.splitext(name)[1].lower() in extensions:
                    images.append(rel)
                else:
                    self.skips.ignored.append({"path": rel, "reason": NOT_AN_IMAGE})
        return sorted(images)


def walk_images(folder: Path, base: Path | None = None, skips: Skips | None = None,
                exclude: Path | None = None) -> list[str]:
    """Regular image files under `folder`, recursively, as sorted "/"-paths relative to `base` (default: the
    folder). Symlinks that resolve inside or above `base` are not followed; `exclude` is not entered.
    What is not read goes to `skips`."""
    base = folder if base is None else base
    walker = _Walker(base, skips if skips is not None else Skips(), exclude)
    return walker.walk(folder, image_extensions())


# --------------------------------------------------------------------------------------------------------
# Layouts of data.source


@dataclass(frozen=True)
class SourceImage:
    rel: str          # path relative to data.source, "/"-separated
    label: int        # index into Discovery.classes
    pool: str | None  # None: split by the fractions; "train": val is carved out; "val" / "test": as given


@dataclass
class Discovery:
    source: Path
    layout: str
    classes: list[str]
    images: list[SourceImage]
    pool_dirs: dict[str, str]  # pool ("train", "val", "test", or "" for class_folders) -> folder rel to source
    skips: Skips = field(default_factory=Skips)  # files and folders not read, hidden ones counted
    unlabelled: dict | None = None               # Intel's seg_pred, counted, unused


def _subfolders(folder: Path, found: Discovery, image_reason: str) -> dict[str, Path]:
    """Visible sub-folders of `folder` by name. Files at this level are not in any class: listed as ignored."""
    walker = _Walker(found.source, found.skips, exclude=None)
    folders = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:  # without the classes nothing can be prepared: fatal, unlike a class' sub-folder
        raise UserError(f"data.source: {folder} cannot be listed ({exc.strerror or exc}). Give this user read "
                        f"and execute permission on it (chmod u+rx), or point data.source elsewhere.") from None
    for entry in entries:
        if entry.name == MASKS_DIR and folder == found.source:
            continue  # read by prepare(), not ignored
        if is_hidden(entry.name) or (entry.is_dir() and not walker.keep_folder(str(folder), entry.name)):
            found.skips.hidden += is_hidden(entry.name)
        elif entry.is_dir():
            folders[entry.name] = entry
        else:
            is_image = entry.suffix.lower() in image_extensions()
            found.skips.ignored.append({"path": walker.rel(str(entry)),
                                        "reason": image_reason if is_image else NOT_AN_IMAGE})
    return folders


def _image_files(folder: Path, found: Discovery, class_name: str | None = None) -> list[str]:
    """Image files under `folder`; folders it could not list are recorded with the class that loses them."""
    seen = len(found.skips.unreadable)
    images = walk_images(folder, base=found.source, skips=found.skips)
    if class_name is not None:
        for entry in found.skips.unreadable[seen:]:
            entry["class"] = display_name(class_name)
    return images


def _unwrap(folder: Path) -> Path:
    """The Intel zip unpacks seg_train/ into seg_train/seg_train/; accept both."""
    inner = folder / folder.name
    return inner if inner.is_dir() else folder


def _layout_hint(source: Path) -> str:
    return (f"Expected {source}/<class>/<images> (one folder per class), {source}/train/<class>/ and "
            f"{source}/test/<class>/, or the Intel download's seg_train/seg_train/<class>/ and "
            "seg_test/seg_test/<class>/.")


def _check_class_count(classes: list[str], where: Path, source: Path) -> None:
    if not classes:
        raise UserError(f"data.source: {where} has no class folders. {_layout_hint(source)}")
    if len(classes) < 2:
        raise UserError(f"data.source: {where} has only one class folder, '{classes[0]}'; a classifier needs "
                        f"at least two. Add a folder per class, or, if the classes are inside "
                        f"{where / classes[0]}, point data.source there.")


def _check_source(source: Path) -> None:
    if not source.exists():
        raise UserError(f"data.source: {source} does not exist. Set data.source in params.yaml to your image "
                        "folder (absolute, or relative to the repository root).")
    if not source.is_dir():
        raise UserError(f"data.source: {source} is not a folder. Point data.source at a folder of class "
                        "folders.")


def discover(source: Path) -> Discovery:
    """Find the layout, the classes and every image file of `source`. Decodes nothing."""
    _check_source(source)
    found = Discovery(source=source, layout="", classes=[], images=[], pool_dirs={})
    top = _subfolders(source, found, image_reason="not inside a class folder")
    if "seg_train" in top or "seg_test" in top:
        pools, expected = _intel_pools(found, top)
    elif "train" in top or "test" in top:
        pools, expected = _train_test_pools(found, top)
    else:
        found.layout = LAYOUT_CLASS_FOLDERS
        found.classes = sorted(top)
        _check_class_count(found.classes, source, source)
        found.pool_dirs = {"": "."}
        for label, name in enumerate(found.classes):
            found.images += [SourceImage(rel, label, None) for rel in _image_files(top[name], found, name)]
        _check_has_files(found)
        return found
    for name, folder in top.items():
        if name not in expected:
            found.skips.ignored.append({"path": _rel(folder, source) + "/",
                                        "reason": f"folder outside the {found.layout} layout"})
    _list_pools(found, pools)
    _check_has_files(found)
    return found


def _rel(path: Path, source: Path) -> str:
    return path.relative_to(source).as_posix() or "."


def _intel_pools(found: Discovery, top: dict[str, Path]) -> tuple[dict[str, Path], tuple[str, ...]]:
    found.layout = LAYOUT_INTEL
    for name in ("seg_train", "seg_test"):
        if name not in top:
            raise UserError(f"data.source: {found.source} looks like the Intel download but has no {name}/ "
                            "folder. Unpack the whole archive there.")
    if "seg_pred" in top:
        pred = _unwrap(top["seg_pred"])
        found.unlabelled = {"folder": _rel(pred, found.source), "images": len(_image_files(pred, found)),
                            "note": "unlabelled images, not used for training or evaluation"}
    pools = {"train": _unwrap(top["seg_train"]), "test": _unwrap(top["seg_test"])}
    return pools, ("seg_train", "seg_test", "seg_pred")


def _train_test_pools(found: Discovery, top: dict[str, Path]) -> tuple[dict[str, Path], tuple[str, ...]]:
    found.layout = LAYOUT_TRAIN_TEST
    source = found.source
    for name in ("train", "test"):
        if name not in top:
            other = "test" if name == "train" else "train"
            raise UserError(f"data.source: {source} has {other}/ but no {name}/. Add {source}/{name}/<class>/ "
                            f"with images, or point data.source at {source}/{other} to split it by "
                            "data.val_fraction and data.test_fraction.")
    pools = {"train": top["train"], "test": top["test"]}
    val_names = [name for name in VAL_FOLDERS if name in top]
    if len(val_names) > 1:
        raise UserError(f"data.source: {source} has several validation folders ({', '.join(val_names)}); "
                        "keep one.")
    if val_names:
        pools["val"] = top[val_names[0]]
    return pools, ("train", "test", *val_names)


def _list_pools(found: Discovery, pools: dict[str, Path]) -> None:
    """Classes from the train pool; every pool's class folders must be among them."""
    folders = {pool: _subfolders(root, found, image_reason="not inside a class folder")
               for pool, root in pools.items()}
    found.pool_dirs = {pool: _rel(root, found.source) for pool, root in pools.items()}
    found.classes = sorted(folders["train"])
    _check_class_count(found.classes, pools["train"], found.source)
    for pool in pools:
        for name in sorted(set(folders[pool]) - set(found.classes)):
            raise UserError(f"data.source: class '{name}' appears in {pools[pool]} but not in {pools['train']}. "
                            f"Add {pools['train'] / name}/ with images, or remove {pools[pool] / name}/.")
    for pool in pools:
        for label, name in enumerate(found.classes):
            if name in folders[pool]:
                found.images += [SourceImage(rel, label, pool)
                                 for rel in _image_files(folders[pool][name], found, name)]


def class_dir(found: Discovery, label: int, pool: str | None) -> Path:
    return found.source / found.pool_dirs[pool or ""] / found.classes[label]


def training_pool(found: Discovery) -> str | None:
    """The pool the fractions split: the whole folder for class_folders, train/ otherwise."""
    return None if found.layout == LAYOUT_CLASS_FOLDERS else "train"


def _check_has_files(found: Discovery) -> None:
    """Fail before decoding when a class folder (of the training pool) holds no image file at all."""
    counts = np.bincount([img.label for img in found.images if img.pool in (None, "train")],
                         minlength=len(found.classes))
    for label, count in enumerate(counts):
        if count:
            continue
        where = class_dir(found, label, training_pool(found))
        lost = [e for e in found.skips.unreadable if e.get("class") == display_name(found.classes[label])]
        if lost:
            raise UserError(f"data.source: class '{found.classes[label]}' has no readable image: "
                            f"{found.source / lost[0]['path']}/ {lost[0]['reason'].split(':')[0]}. Give this user "
                            f"read and execute permission on it (chmod -R u+rX {where}), or remove the folder.")
        raise UserError(f"data.source: class '{found.classes[label]}' has no readable image: {where} holds no "
                        "image file. Add images, or remove the folder.")


def _dvc_tracks(rel: Path, root: Path) -> bool:
    """True when DVC restores `rel` (relative to root) in a fresh workspace: `dvc add` made a .dvc file for it or a
    folder above it, or it is (inside) an out of a dvc.yaml stage, as data/sample is."""
    above = [rel, *rel.parents][:-1]  # rel and every folder above it, up to the root
    if any((root / f"{folder}.dvc").is_file() for folder in above):
        return True
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return False
    outs = {Path(next(iter(out)) if isinstance(out, dict) else str(out))
            for stage in stages.values() if isinstance(stage, dict) for out in stage.get("outs", [])}
    return any(folder in outs for folder in above)


def untracked_source_warning(source: str, root: Path | str = ".") -> str | None:
    """A line for a data.source inside the repo whose files git does not track and DVC does not restore.

    DVC hashes a stage's dependencies before its command runs, so under `dvc exp run --temp` and the queue (a copy
    of the commit under .dvc/tmp/exps/, without untracked files) such a folder fails in DVC itself with
    "[Errno 2] No such file or directory", before any line of ours can run; a plain run, which reads the folder
    in place, is the one place to say so. None when tracked, outside the repo, or without git."""
    root = Path(root)
    rel = Path(os.path.normpath(source))
    if rel.is_absolute() or not (root / rel).is_dir() or _dvc_tracks(rel, root):
        return None
    try:
        listed = subprocess.run(["git", "ls-files", "--others", "-z", "--", str(rel)], cwd=root,
                                capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    untracked = [name for name in listed.stdout.split(b"\0") if name] if listed.returncode == 0 else []
    if not untracked:
        return None
    return (f"prepare: warning: data.source '{source}' is inside the repo, but git does not track "
            f"{len(untracked)} of its files and DVC does not track the folder: this run reads them in place, but "
            f"`dvc exp run --temp` and `dvc exp run --queue` run in a copy without them (DVC stops with \"[Errno 2] "
            f"No such file or directory\", or trains on the tracked files only). Run `dvc add {rel.as_posix()}` and "
            f"commit {rel.as_posix()}.dvc, or give the absolute path: data.source={(root / rel).resolve()}")
