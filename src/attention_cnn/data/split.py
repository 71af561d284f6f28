"""Which split each decoded image lands in, and which byte-identical files the report must mention."""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from attention_cnn.data.discover import Discovery, class_dir, display_name, training_pool
from attention_cnn.data.prepared import SPLITS
from attention_cnn.errors import UserError


def _round(x: float) -> int:
    return int(x + 0.5)  # half up; Python's round() would send 2.5 to 2 but 3.5 to 4


def _class_rng(seed: int, name: str) -> np.random.Generator:
    """One RNG per class, keyed by its name: adding a class does not reshuffle the others."""
    # surrogateescape: a folder name that is not valid UTF-8 hashes by its own bytes (valid names as before)
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8", "surrogateescape"))])


@dataclass(frozen=True)
class _Fractions:
    val: float
    test: float
    seed: int


def assign_splits(found: Discovery, kept: list[int], val_fraction: float, test_fraction: float,
                  seed: int, digests: list[str | None]) -> dict[int, str]:
    """Split of every kept image (index into found.images). Deterministic for a seed: each class' files are
    sorted by path, then permuted by the class RNG, so the file system's listing order does not matter.
    Byte-identical files of a class (same entry in `digests`) are drawn as one unit and land in one split:
    a copy of a training image in test would inflate the test accuracy. Without duplicates every unit is one
    file, and the split is the same as drawing files.
    Raises UserError when some class would get no image in some split."""
    pools: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i in kept:
        img = found.images[i]
        pools[(img.label, img.pool or "")].append(i)
    fractions = _Fractions(val_fraction, test_fraction, seed)
    split_of: dict[int, str] = {}
    for (label, pool), members in sorted(pools.items()):
        if pool in ("val", "test"):
            split_of.update({i: pool for i in members})
        else:
            split_of.update(_draw_class(found, label, pool, members, fractions, digests))
    counts = split_counts(found, split_of)
    for split in SPLITS:
        for name, count in counts[split].items():
            if count == 0:  # only possible for a split given by a folder
                folder = found.source / found.pool_dirs[split] / name
                raise UserError(f"data.source: class '{name}' has no readable image in {folder}, so its {split} "
                                f"split would be empty. Add images there.")
    return split_of


def _draw_class(found: Discovery, label: int, pool: str, members: list[int], fractions: _Fractions,
                digests: list[str | None]) -> dict[int, str]:
    """Draw one class' files of a pool that the fractions split ("" = all three splits, "train" = val only)."""
    members = sorted(members, key=lambda i: found.images[i].rel)
    n = len(members)
    n_test = _round(n * fractions.test) if pool == "" else 0
    n_val = _round(n * fractions.val)
    n_train = n - n_val - n_test
    name = found.classes[label]
    where = class_dir(found, label, pool or None)
    needed = 3 if pool == "" else 2  # one image per split the fractions draw
    if n < needed:
        splits = "train, val and test" if pool == "" else "train and val"
        raise UserError(f"data.source: class '{name}' has only {n} readable image{'s' if n > 1 else ''} in {where}; "
                        f"no data.val_fraction / data.test_fraction can split {'them' if n > 1 else 'it'} into "
                        f"{splits}, which each need at least one image of every class. Add at least "
                        f"{needed - n} more image{'s' if needed - n > 1 else ''} to {where}, or remove the folder.")
    if n_val < 1 or n_train < 1 or (pool == "" and n_test < 1):
        given = (f"data.val_fraction {fractions.val} and data.test_fraction {fractions.test} give "
                 f"{n_val} val, {n_test} test" if pool == "" else
                 f"data.val_fraction {fractions.val} gives {n_val} val")
        raise UserError(f"data.source: class '{name}' has {n} readable image(s) in {where}; {given} and {n_train} "
                        f"train, but every split needs at least one image of every class. Add images to the class "
                        f"or change data.val_fraction / data.test_fraction in params.yaml.")
    units: dict[str | int, list[int]] = {}  # first file's position keeps the units in path order
    for i in members:
        units.setdefault(digests[i] if digests[i] is not None else i, []).append(i)
    groups = list(units.values())
    placed = {"test": 0, "val": 0, "train": 0}
    split_of = {}
    for k in _class_rng(fractions.seed, name).permutation(len(groups)):
        split = "test" if placed["test"] < n_test else "val" if placed["val"] < n_val else "train"
        placed[split] += len(groups[k])
        split_of.update({i: split for i in groups[k]})
    short = [split for split, count in placed.items() if count == 0 and (split != "test" or pool == "")]
    if short:
        distinct = f"{len(groups)} distinct image{'s' if len(groups) > 1 else ''}"
        raise UserError(f"data.source: class '{name}' has {n} readable image(s) in {where} but only {distinct} "
                        f"(the others are byte-identical copies, which stay together in one split), so its "
                        f"{' and '.join(short)} split{'s' if len(short) > 1 else ''} would be empty. "
                        f"Add different images to the class.")
    return split_of


def split_counts(found: Discovery, split_of: dict[int, str]) -> dict[str, dict[str, int]]:
    names = [display_name(name) for name in found.classes]  # as report.json writes them
    counts = {split: {name: 0 for name in names} for split in SPLITS}
    for i, split in split_of.items():
        counts[split][names[found.images[i].label]] += 1
    return counts


def check_readable(found: Discovery, errors: list[str | None]) -> None:
    """A class whose training-pool files all failed to decode: name it, with the first reasons."""
    pool_files: dict[int, list[int]] = defaultdict(list)
    for i, img in enumerate(found.images):
        if img.pool in (None, "train"):
            pool_files[img.label].append(i)
    for label, files in sorted(pool_files.items()):
        if all(errors[i] is not None for i in files):
            reasons = "; ".join(f"{found.images[i].rel}: {errors[i]}" for i in files[:3])
            more = f" (and {len(files) - 3} more)" if len(files) > 3 else ""
            folder = class_dir(found, label, training_pool(found))
            raise UserError(f"data.source: class '{found.classes[label]}' has no readable image: all {len(files)} "
                            f"file(s) in {folder} failed to decode. {reasons}{more}. Replace them with valid images.")


@dataclass
class Duplicates:
    across_splits: list[dict]  # {"blake2b", "files": [{"path", "split", "class"}]}: leakage
    groups_within_split: int   # harmless for evaluation, counted for the record


def find_duplicates(found: Discovery, digests: list[str | None], split_of: dict[int, str]) -> Duplicates:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in sorted(split_of, key=lambda i: found.images[i].rel):
        groups[digests[i]].append(i)
    across, within = [], 0
    for digest, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        if len({split_of[i] for i in members}) == 1:
            within += 1
            continue
        across.append({"blake2b": digest, "files": [
            {"path": display_name(found.images[i].rel), "split": split_of[i],
             "class": display_name(found.classes[found.images[i].label])}
            for i in members]})
    return Duplicates(across, within)
