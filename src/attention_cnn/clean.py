"""`attention-cnn clean`: find (and with `--yes` remove) the disk space that runs left behind and nothing will use.

Two kinds, both only under names this project writes:
- a killed run's temporary outputs (atomic.py's `NAME.tmp-PID-RANDOM` names, whose process is gone): a half-built
  `data/.prepared.tmp-*` holds the decoded raw pixels, as big as the prepared data;
- checkpoints in models/.checkpoints/ (`<fingerprint>.pt`) whose fingerprint is not the current one: written
  for other params, prepared data or code, so the next `dvc repro` would not resume them (it would if those
  params came back, hence a dry run by default).
A checkpoint whose run still holds its lock (checkpoint.run_lock) is never listed; a lock whose process is gone
(`<fingerprint>.lock`, the PID inside) is, even beside the current checkpoint, which stays for its resume. A folder
or link under a checkpoint's name is never touched (clean says so).
"""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from attention_cnn.atomic import _pid_alive, remove_temp, stale_temps
from attention_cnn.errors import UserError
from attention_cnn.params import Params, load_params

OUTPUT_FOLDERS = ("data", "models", "metrics", "output")  # where the pipeline writes, relative to the repo
_CHECKPOINT = re.compile(r"^[0-9a-f]{16}\.pt$")            # checkpoint.checkpoint_path's names
_LOCK = re.compile(r"^[0-9a-f]{16}\.lock$")                # checkpoint.run_lock's, beside them


@dataclass(frozen=True)
class Leftover:
    path: Path
    size: int     # bytes, a folder's files summed
    reason: str


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(Path(d, f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def _locked(lock: Path) -> bool:
    """True when a live training run holds `lock`."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock too


def current_checkpoint_name(params: Params, prepared: Path) -> str:
    """The checkpoint file name the next training run would resume; UserError when the data cannot be read."""
    from attention_cnn.training.checkpoint import checkpoint_path
    from attention_cnn.training.train import load_train_val, training_fingerprint

    train_split, val_split = load_train_val(prepared)
    return checkpoint_path(".", training_fingerprint(params, train_split, val_split)).name


def _stale_lock(lock: Path) -> int | None:
    """The PID in a `<fingerprint>.lock` that checkpoint.run_lock wrote, when that process is gone and no run
    holds the lock; else None (held, or not a PID: a file it did not write, or one being written)."""
    try:
        pid = lock.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not pid.isdigit() or _pid_alive(int(pid)) or _locked(lock):
        return None
    return int(pid)


def find_leftovers(root: Path, params_path: Path, prepared: Path, checkpoints: Path) -> tuple[list[Leftover], str]:
    """What `clean` would remove, and a note on what it kept and why ('' when none). A params file that is not
    valid is a ParamsError: without it no checkpoint can be judged, and the user must hear why."""
    params = load_params(params_path)
    found = [Leftover(p, _size(p), f"a killed run's temporary {'folder' if p.is_dir() else 'file'} (process "
                                   f"{p.name.rsplit('-', 2)[-2]} is gone)")
             for folder in OUTPUT_FOLDERS if (root / folder).is_dir() for p in stale_temps(root / folder)]
    named = sorted(p for p in checkpoints.iterdir() if _CHECKPOINT.match(p.name) or _LOCK.match(p.name)) \
        if checkpoints.is_dir() else []
    # Only regular files under the names checkpoint.py writes: a folder or a link so named is someone else's.
    notes = [f"clean: kept {p}: a {'link' if p.is_symlink() else 'folder' if p.is_dir() else 'special file'}, not "
             f"a file training writes" for p in named if p.is_symlink() or not p.is_file()]
    named = [p for p in named if p.is_file() and not p.is_symlink()]
    for lock in (p for p in named if _LOCK.match(p.name)):
        pid = _stale_lock(lock)
        if pid is not None:
            found.append(Leftover(lock, _size(lock), f"a killed run's lock (process {pid} is gone)"))
    saved = [p for p in named if _CHECKPOINT.match(p.name)]
    if not saved:
        return found, "\n".join(notes)
    try:
        current = current_checkpoint_name(params, prepared)
    except UserError as exc:
        notes.append(f"checkpoints kept: without readable prepared data no fingerprint can be compared ({exc})")
        return found, "\n".join(notes)
    for path in saved:
        if path.name != current and not _locked(path.with_suffix(".lock")):
            found.append(Leftover(path, _size(path), "checkpoint of other params, data or code: the next training "
                                                     "run would not resume it"))
    return found, "\n".join(notes)


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def clean(root: Path | str = ".", params_path: Path | str = "params.yaml", prepared: Path | str = "data/prepared",
          checkpoints: Path | str = "models/.checkpoints", remove: bool = False) -> list[Leftover]:
    """List what runs left behind (and remove it when `remove`); print one line each and the total."""
    root = Path(root)
    found, note = find_leftovers(root, Path(params_path), Path(prepared), Path(checkpoints))
    if note:
        print(note)
    if not found:
        print("clean: nothing to remove.")
        return found
    width = max(len(str(item.path)) for item in found)
    print("clean: removing:" if remove else "clean: would remove (a dry run; `attention-cnn clean --yes` removes):")
    for item in found:
        print(f"  {str(item.path):<{width}}  {_mib(item.size):>11}  {item.reason}")
        if remove:
            if _LOCK.match(item.path.name):
                if _stale_lock(item.path) is not None:  # again: a new run may have taken it since the listing
                    item.path.unlink(missing_ok=True)
            elif _CHECKPOINT.match(item.path.name):
                item.path.unlink(missing_ok=True)
            else:
                remove_temp(item.path)
    print(f"clean: {'freed' if remove else 'would free'} {_mib(sum(item.size for item in found))} in {len(found)} "
          f"item{'s' if len(found) != 1 else ''}.")
    return found
