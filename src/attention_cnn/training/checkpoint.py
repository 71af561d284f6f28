"""Resumable training: the run's fingerprint, every RNG's state, and the per-epoch checkpoint file.

A checkpoint lives in a scratch folder (models/.checkpoints/ in the pipeline, ignored by git and DVC), named
after the fingerprint of the run that wrote it: params, prepared data and training code. It is not a DVC out,
so a fresh clone or `dvc exp apply` is up to date without it; train removes it once the model is written. A
killed run leaves it behind, and the next run with the same fingerprint resumes from it. While a run trains, it
holds `<fingerprint>.lock` (flock, with its PID inside), so a second run of the same fingerprint in the same
checkout is refused instead of writing the same checkpoint; the OS drops the lock when its process dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from attention_cnn.atomic import atomic_torch_save
from attention_cnn.data.prepared import PreparedSplit
from attention_cnn.errors import UserError
from attention_cnn.params import Params, training_params

CHECKPOINT_FORMAT = 2


def fingerprint(params: Params, train_split: PreparedSplit, val_split: PreparedSplit,
                code_files: Iterable[Path | str]) -> str:
    """What a checkpoint must match to be resumed: params, the prepared data, and the training code."""
    h = hashlib.sha256()
    # Not the rendezvous keys: a new host for node 0 resumes, and nodes that name it differently agree.
    h.update(json.dumps({**training_params(params), "torch": torch.__version__}, sort_keys=True).encode())
    for split in (train_split, val_split):
        h.update(json.dumps({"classes": split.classes, "files": split.files}).encode())
        for tensor in (split.images, split.labels):
            h.update(memoryview(tensor.contiguous().numpy()).cast("B"))
    for source in code_files:  # a code change must not resume stale training
        h.update(Path(source).read_bytes())
    return h.hexdigest()


def checkpoint_path(folder: Path | str, run_fingerprint: str) -> Path:
    return Path(folder) / f"{run_fingerprint[:16]}.pt"


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def save_checkpoint(path: Path, blob: dict) -> None:
    atomic_torch_save(blob, path)  # a kill leaves the previous checkpoint, never half of a new one


def read_checkpoint(path: Path, expected_fingerprint: str, say: Callable[[str], None]) -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unreadable file cannot be resumed; training from scratch is always correct
        say(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); starting fresh.")
        return None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        say(f"{path}: checkpoint of another format; starting fresh.")
        return None
    if blob.get("fingerprint") != expected_fingerprint:
        say(f"{path}: checkpoint was written for other params, data or code; ignoring it and starting fresh.")
        return None
    return blob


def remove_checkpoint(path: Path) -> None:
    """After the model is written: the checkpoint has served, and the folder goes too once empty."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # not empty: checkpoints of other, killed runs wait there for their resume
        pass


@contextmanager
def run_lock(checkpoint: Path) -> Iterator[None]:
    """Hold `<checkpoint>.lock` while the run trains, or refuse: another live process of this fingerprint holds it.

    flock, not the PID alone: the kernel releases it when its holder dies, so a killed run's lock file is
    simply taken over. The file is removed on release, and a holder checks that the file it locked is still
    the one at the path (another run may have removed it in between)."""
    lock_path = checkpoint.with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{lock_path}: another training run with the same params, data and code is running "
                            f"in this checkout (PID {holder}). Wait for it to finish, or stop it (`kill {holder}`), "
                            "then run again.") from None
        if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # removed by the run that held it just before us: lock the new file instead
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)
        try:
            lock_path.parent.rmdir()  # the folder goes once empty, as in remove_checkpoint
        except OSError:
            pass
