"""The prepared-split format: what `prepare` writes and what train, evaluate and visualize read.

One `<split>.pt` file per split (train, val, test) in the prepared folder, written with `torch.save` and read
with `torch.load(..., weights_only=True, mmap=True)`, so loading 14k images at 150 px is a memory map, not a
decode. DVC hashes a handful of files instead of thousands.

Each file holds a dict:
    images:  uint8  (N, 3, S, S)  RGB, already resized to img_size S
    labels:  int64  (N,)          index into `classes`
    masks:   uint8  (N, S, S)     ground-truth evidence masks (255 = evidence), or None when the source has none
    files:   list[str]            source path of each image, relative to data.source
    classes: list[str]            sorted class names, the same in every split
    resize:  str                  data.resize, how the images were brought to S x S (train stores it in the
                                  model, so predict resizes a raw file the same way)

`save_split` writes a split held in memory. `save_split_streamed` writes the same bytes from images and masks
given a few rows at a time, so prepare never holds a whole split: torch.save writes the archive with the
storage bytes left out (`torch.serialization.skip_data`), then the bytes are written into their places and
the checksums the archive keeps (each record's CRC-32, and `.data/serialization_id`) are set as torch.save sets
them. tests/test_prepared_streamed.py checks the result against a plain torch.save, byte for byte.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np
import torch

from attention_cnn.atomic import atomic_file, atomic_torch_save
from attention_cnn.errors import UserError

SPLITS = ("train", "val", "test")
_KEYS = {"images", "labels", "masks", "files", "classes", "resize"}


@dataclass
class PreparedSplit:
    images: torch.Tensor        # (N, 3, S, S) uint8
    labels: torch.Tensor        # (N,) int64
    masks: torch.Tensor | None  # (N, S, S) uint8, or None
    files: list[str]
    classes: list[str]
    resize: str = "stretch"     # params.RESIZE_POLICIES; the default of data.resize

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def img_size(self) -> int:
        return self.images.shape[-1]


def split_path(prepared_dir: Path | str, split: str) -> Path:
    return Path(prepared_dir) / f"{split}.pt"


def save_split(prepared_dir: Path | str, split: str, data: PreparedSplit) -> Path:
    """Write one split atomically: a killed run never leaves a half-written file under the final name."""
    return atomic_torch_save({"images": data.images.contiguous(), "labels": data.labels, "masks": data.masks,
                              "files": list(data.files), "classes": list(data.classes), "resize": data.resize},
                             split_path(prepared_dir, split))


@dataclass(frozen=True)
class Rows:
    """A uint8 tensor too big to hold: its shape, and its bytes in C order as chunks of a few rows each
    (anything with the buffer protocol), produced anew by every call of `chunks`."""
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable]


def save_split_streamed(prepared_dir: Path | str, split: str, images: Rows, labels: torch.Tensor,
                        masks: Rows | None, files: list[str], classes: list[str], resize: str = "stretch") -> Path:
    """Write one split atomically, byte-identical to `save_split` of the same tensors, holding one chunk."""
    path = split_path(prepared_dir, split)
    labels = labels.contiguous()
    with atomic_file(path) as tmp:
        _save_without_data(tmp, {"images": images.shape, "labels": labels,
                                 "masks": masks.shape if masks is not None else None,
                                 "files": list(files), "classes": list(classes), "resize": resize})
        label_bytes = labels.numpy().tobytes()
        _fill_storages(tmp, [images.chunks, lambda: [label_bytes]] + ([masks.chunks] if masks is not None else []))
    return path


def _save_without_data(tmp: Path, blob: dict) -> None:
    """torch.save of `blob` with every storage's bytes left out, the shapes in it standing for uint8 tensors.
    torch.save names the archive's records after the file, so `tmp` must be named `<split>.pt.tmp-PID-RANDOM` as
    atomic_torch_save's is; it numbers the storages in the order its pickler meets them: the dict's."""
    backing = {key: tmp.with_name(f"{tmp.name}.placeholder-{key}") for key, value in blob.items()
               if isinstance(value, tuple)}
    try:
        placeholders = {key: _placeholder(path, blob[key]) for key, path in backing.items()}
        with torch.serialization.skip_data():
            torch.save({**blob, **placeholders}, tmp)
    finally:
        for path in backing.values():
            path.unlink(missing_ok=True)


def _placeholder(backing: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor of `shape` that torch.save can describe without reading it and that takes no memory: a
    map of a sparse file (torch.empty would be refused by the kernel above the machine's memory)."""
    numel = int(np.prod(shape, dtype=np.int64))
    if numel == 0:
        return torch.empty(shape, dtype=torch.uint8)
    with open(backing, "wb") as f:
        f.truncate(numel)
    return torch.from_file(str(backing), shared=True, size=numel, dtype=torch.uint8).view(shape)


# --------------------------------------------------------------------------------------------------------
# Filling in what torch.save left out. The archive is a zip of stored (uncompressed) records, each followed by
# a data descriptor (PK\x07\x08, CRC-32, sizes) because its local header leaves the CRC at zero; the central
# directory repeats each CRC. `.data/serialization_id` is 20 digits hashed from the record names, then 20 from
# the records' CRCs, folded with c10::hash_combine in the order they were written.

_LOCAL_HEADER, _CENTRAL_HEADER, _DESCRIPTOR = b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08"
_SERIALIZATION_ID = ".data/serialization_id"


@dataclass
class _Record:
    name: str         # without the archive's leading folder
    size: int
    data_offset: int  # first byte of the record's data
    crc_offsets: tuple[int, int]  # the CRC in its data descriptor and in its central directory entry
    crc: int


def _records(f: BinaryIO) -> list[_Record]:
    archive = zipfile.ZipFile(f)
    infos = archive.infolist()  # in the order written
    f.seek(archive.start_dir)   # the central directory: one entry per record, in the same order
    records = []
    for info in infos:
        central = f.tell()
        fixed = f.read(46)
        name_len, extra_len, comment_len = struct.unpack("<3H", fixed[28:34])
        f.seek(name_len + extra_len + comment_len, 1)
        after_central = f.tell()
        f.seek(info.header_offset)
        local = f.read(30)
        data_offset = info.header_offset + 30 + sum(struct.unpack("<2H", local[26:30]))
        f.seek(data_offset + info.file_size)
        if fixed[:4] != _CENTRAL_HEADER or local[:4] != _LOCAL_HEADER or f.read(4) != _DESCRIPTOR \
                or info.compress_type != zipfile.ZIP_STORED:
            raise RuntimeError(f"{f.name}: torch.save wrote a zip layout this writer does not know")
        records.append(_Record(info.filename.split("/", 1)[1], info.file_size, data_offset,
                               (data_offset + info.file_size + 4, central + 16), info.CRC))
        f.seek(after_central)
    return records


def _write_data(f: BinaryIO, record: _Record, data: bytes | Iterable) -> None:
    """The record's data at its place (chunk by chunk), then its CRC at both places."""
    f.seek(record.data_offset)
    crc, written = 0, 0
    for chunk in [data] if isinstance(data, bytes) else data:
        view = memoryview(chunk).cast("B")
        f.write(view)
        crc, written = zlib.crc32(view, crc), written + len(view)
    if written != record.size:
        raise RuntimeError(f"{f.name}: {record.name} got {written} bytes, torch.save reserved {record.size}")
    record.crc = crc
    for offset in record.crc_offsets:
        f.seek(offset)
        f.write(struct.pack("<I", crc))


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    return (seed ^ (value + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & 0xFFFF_FFFF_FFFF_FFFF


def _fill_storages(path: Path, sources: list[Callable[[], Iterable]]) -> None:
    """Write storage k's bytes (`sources[k]()`, chunk by chunk) into `data/k` of the archive torch.save wrote with
    skip_data, then the CRCs and the serialization id that a torch.save with the data would have written."""
    with open(path, "r+b") as f:
        records = _records(f)
        storages = [r for r in records if r.name.startswith("data/")]
        if [r.name for r in storages] != [f"data/{k}" for k in range(len(sources))]:
            raise RuntimeError(f"{path}: torch.save wrote storages {[r.name for r in storages]}, "
                               f"expected {len(sources)}")
        for record, source in zip(storages, sources):
            _write_data(f, record, source())
        serial = records[-1]
        if serial.name != _SERIALIZATION_ID or serial.size != 40:
            raise RuntimeError(f"{path}: torch.save's last record is {serial.name}, not a 40-digit {_SERIALIZATION_ID}")
        combined = 0
        for record in records[:-1]:
            combined = _hash_combine(combined, record.crc)
        f.seek(serial.data_offset)
        names_hash = f.read(20)
        _write_data(f, serial, names_hash + f"{combined:020d}".encode("ascii"))


def load_split(prepared_dir: Path | str, split: str) -> PreparedSplit:
    path = split_path(prepared_dir, split)
    if not path.is_file():
        raise UserError(f"{path}: prepared split not found. Run `dvc repro prepare` first.")
    try:
        blob = torch.load(path, weights_only=True, mmap=True)
    except Exception as exc:  # truncated, empty or foreign: torch raises RuntimeError, UnpicklingError, ...
        raise UserError(f"{path}: not a readable prepared split ({type(exc).__name__}; truncated, damaged, or "
                        "written by another program). Re-run `dvc repro prepare` to write it again.") from exc
    if not isinstance(blob, dict) or not _KEYS <= set(blob):
        raise UserError(f"{path}: not a prepared split written by this version of attention_cnn. Re-run "
                        "`dvc repro prepare` to write it again.")
    return PreparedSplit(images=blob["images"], labels=blob["labels"], masks=blob["masks"],
                         files=list(blob["files"]), classes=list(blob["classes"]), resize=blob["resize"])
