"""All-or-nothing writes: a killed or failed run never leaves a half-written output under its final name."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


def _sibling(path: Path, tag: str) -> Path:
    # Beside the final path, so the rename stays on one file system and is atomic.
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a fresh hidden folder next to `final`; on success it replaces `final`, on failure it is removed.

    `final` is always either the old complete folder, briefly absent, or the new complete one, never partial.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    build = _sibling(final, "tmp")
    build.mkdir()  # not tempfile.mkdtemp: that would make the outputs private (mode 700)
    try:
        yield build
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if final.exists():
        old = _sibling(final, "old")
        os.replace(final, old)
        os.replace(build, final)
        shutil.rmtree(old)
    else:
        os.replace(build, final)


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """`torch.save` under a temporary name, then rename: a kill leaves the previous file, never half a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
