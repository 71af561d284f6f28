"""All-or-nothing writes: a killed or failed run never leaves a half-written output under its final name, and
never replaces a folder that holds files the command did not write.

Temporary names are `.NAME.tmp-PID-RANDOM` (and `.NAME.old-PID-RANDOM` during the swap) beside a final folder,
`NAME.tmp-PID-RANDOM` beside a final file, so the rename stays on one file system and two processes never share
one. The next write of the same path removes those of dead processes (a killed run), never those of a run still
going; `attention-cnn clean` finds the rest (`stale_temps`).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import resource
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from attention_cnn.errors import UserError

# errno values that mean "the disk cannot take this write": full, over quota, over the file-size limit.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
SPACE_MARGIN = 2**20  # a failed write with less than this left (disk or file-size limit) ran out of space
FOREIGN_SHOWN = 5     # foreign files named in the refusal


@dataclass(frozen=True)
class Owned:
    """What a command's own output folder holds, so that a folder holding anything else is never replaced.
    A non-empty folder is replaced only when it holds `sign` (when given) and every file matches `patterns`
    (fnmatch, on "/"-paths relative to the folder)."""
    patterns: tuple[str, ...]
    sign: str | None = None  # a file every earlier output of the command holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _sibling(path: Path, tag: str, hidden: bool = True) -> Path:
    # A file's temp name keeps NAME before its last dot: torch.save names the archive's inner folder after it,
    # so model.pt's bytes do not depend on the temp name.
    return path.parent / f"{'.' if hidden else ''}{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


# `.NAME.tmp-PID-RANDOM`, `.NAME.old-PID-RANDOM` (atomic_dir) and `NAME.tmp-PID-RANDOM` (atomic_file).
_TEMP_NAME = re.compile(r"^(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)-[0-9a-f]{12}$")


def _dead_temp(path: Path) -> bool:
    """True for a temp name of ours whose writing process is gone (a killed run)."""
    match = _TEMP_NAME.match(path.name)
    return (match is not None and (match["tag"] == "tmp" or path.name.startswith("."))
            and not _pid_alive(int(match["pid"])))


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def remove_stale_siblings(path: Path) -> list[Path]:
    """Remove the temp names of `path` (folder's or file's) left by processes that are gone; return them."""
    removed = []
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*", f"{path.name}.tmp-*"):
        for stale in path.parent.glob(pattern):
            if _dead_temp(stale):  # a live PID: another run is writing right now
                _remove(stale)
                removed.append(stale)
    return removed


def stale_temps(folder: Path | str) -> list[Path]:
    """Every temp name of a dead process under `folder` (recursively, not inside another temp): a killed run's
    half-built output folder (prepare's holds the decoded raw pixels) or half-written file."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            if _dead_temp(Path(dirpath, name)):
                found.append(Path(dirpath, name))
        dirnames[:] = [d for d in dirnames if not _TEMP_NAME.match(d)]  # never look inside a temp folder
    return sorted(found)


def remove_temp(path: Path) -> None:
    """Remove a path `stale_temps` found, after checking again that its process is gone."""
    if _dead_temp(path):
        _remove(path)


def foreign_files(folder: Path, owned: Owned) -> list[str]:
    """Files in `folder` (recursively, "/"-paths) that `owned` does not account for; [] when replaceable."""
    files = sorted(Path(dirpath, name).relative_to(folder).as_posix()
                   for dirpath, _, names in os.walk(folder) for name in names)
    if files and owned.sign is not None and owned.sign not in files:
        return files
    return [f for f in files if not any(fnmatch.fnmatchcase(f, pattern) for pattern in owned.patterns)]


def check_replaceable(final: Path, owned: Owned | None) -> None:
    """Raise UserError when `final` is not a folder this command may replace as a whole."""
    if final.exists() and not final.is_dir():
        raise UserError(f"{final}: is a file, not a folder. Give a folder for the outputs.")
    if owned is None or not final.is_dir():
        return
    foreign = foreign_files(final, owned)
    if foreign:
        shown = ", ".join(foreign[:FOREIGN_SHOWN]) + (f" and {len(foreign) - FOREIGN_SHOWN} more"
                                                      if len(foreign) > FOREIGN_SHOWN else "")
        raise UserError(f"{final}: holds files this command did not write ({shown}). It replaces its output "
                        f"folder as a whole, so it refuses; move those files away, or give a new or empty folder.")


def check_writable(final: Path | str) -> None:
    """Raise UserError naming the folder when `final` (a file or folder to be written) could not be: its nearest
    existing folder (the rest is created) must be writable by this user. Called before a command's work starts,
    so that it does not train or score for an hour and then fail on the write."""
    final = Path(os.path.abspath(final))
    folder = final.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{final}: cannot be written: {folder} is a file, not a folder. Move it away, or choose "
                        "another place for the outputs.")
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        why = "it is on a read-only file system" if read_only else "this user may not write to it"
        raise UserError(f"{final}: cannot be written: {folder} is not writable ({why}). "
                        + ("Choose a folder on another file system." if read_only else
                           f"Give write permission on it (chmod u+w {folder}), or choose another place."))


def check_output_dir(final: Path | str, owned: Owned | None) -> Path:
    """The folder atomic_dir will replace (a symlink's target), after refusing one it may not replace or cannot
    write. Commands call it up front, before any work, so that a refusal costs nothing."""
    final = Path(os.path.realpath(final)) if Path(final).is_symlink() else Path(final)
    check_replaceable(final, owned)
    check_writable(final)
    return final


def _space_errno(exc: BaseException | None, partial: Path | None) -> int | None:
    """The errno that says a failed write ran out of space, or None. Python's writes carry it in the
    exception; torch.save's C++ writer loses it (a RuntimeError), so then the disk and the file-size limit
    are checked against the partial file, before it is removed."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    if partial is None or not partial.exists():
        return None
    disk = os.statvfs(partial.parent)
    if disk.f_bavail * disk.f_frsize < SPACE_MARGIN:
        return errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and partial.stat().st_size + SPACE_MARGIN > limit:
        return errno.EFBIG
    return None


class DiskFullError(UserError):
    """A write ran out of space; the message names the output, whose previous version is intact."""

    def __init__(self, code: int, path: Path):
        super().__init__(f"{path}: no space left to write it ({os.strerror(code)}); the previous {path.name} is "
                         "intact. Free some disk space and run again.")
        self.code = code


@contextmanager
def atomic_dir(final: Path | str, owned: Owned | None = None) -> Iterator[Path]:
    """Yield a fresh hidden folder next to `final`; on success it replaces `final`, on failure it is removed.

    `final` is always either the old complete folder, briefly absent, or the new complete one, never partial.
    With `owned`, a `final` holding files the command did not write is refused before anything is built.
    A symlinked `final` is followed: its target's contents are replaced, the link stays.
    """
    final = check_output_dir(final, owned)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    build = _sibling(final, "tmp")
    build.mkdir()  # not tempfile.mkdtemp: that would make the outputs private (mode 700)
    try:
        yield build
    except BaseException as exc:
        shutil.rmtree(build, ignore_errors=True)
        code = exc.code if isinstance(exc, DiskFullError) else _space_errno(exc, None)
        if code is not None:
            raise DiskFullError(code, final) from exc
        raise
    if final.exists():
        old = _sibling(final, "old")
        os.replace(final, old)
        os.replace(build, final)
        shutil.rmtree(old)
    else:
        os.replace(build, final)


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path `NAME.tmp-PID-RANDOM` beside `path` to write; on success it replaces `path`, on
    failure it is removed: a kill leaves the previous file, never half a new one, and two processes writing the
    same path never share a temp file. A write that ran out of space raises DiskFullError, also when the writer
    (torch.save's C++ one) lost the errno."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _sibling(path, "tmp", hidden=False)
    try:
        yield tmp
    except BaseException as exc:
        code = _space_errno(exc, tmp)
        tmp.unlink(missing_ok=True)
        if code is not None:
            raise DiskFullError(code, path) from exc
        raise
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """`torch.save` under a temporary name, then rename: a kill leaves the previous file, never half a new one."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)  # by path: the archive's inner name comes from it, so the bytes stay stable
    return Path(path)
