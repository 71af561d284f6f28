"""save_split_streamed and prepare's chunked path write exactly the bytes a plain torch.save of the same tensors
writes, whatever the chunk size, and leave nothing behind when they fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attention_cnn.data.decode import decode_image
from attention_cnn.data.prepare import prepare
from attention_cnn.data.prepared import SPLITS, PreparedSplit, Rows, load_split, save_split, save_split_streamed
from attention_cnn.params import parse_params


def random_split(n: int, size: int, with_masks: bool, seed: int = 0) -> PreparedSplit:
    g = torch.Generator().manual_seed(seed)
    return PreparedSplit(
        images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        labels=torch.randint(0, 4, (n,), generator=g),
        masks=torch.randint(0, 2, (n, size, size), dtype=torch.uint8, generator=g) * 255 if with_masks else None,
        files=[f"class {i % 4}/ö_{i:03d}.jpg" for i in range(n)], classes=["a", "b", "c", "d"])


def rows(tensor: torch.Tensor, per_chunk: int) -> Rows:
    return Rows(tuple(tensor.shape), lambda: (tensor[i:i + per_chunk].numpy()
                                              for i in range(0, len(tensor), per_chunk)))


@pytest.mark.parametrize("with_masks", [True, False])
@pytest.mark.parametrize("per_chunk", [1, 4, 1000])
def test_streamed_split_is_byte_identical_to_torch_save(tmp_path, with_masks, per_chunk):
    data = random_split(n=23, size=9, with_masks=with_masks)
    plain = save_split(tmp_path / "plain", "val", data)
    streamed = save_split_streamed(tmp_path / "streamed", "val", rows(data.images, per_chunk), data.labels,
                                   rows(data.masks, per_chunk) if with_masks else None, data.files, data.classes)
    assert streamed.read_bytes() == plain.read_bytes()
    assert sorted(p.name for p in streamed.parent.iterdir()) == ["val.pt"]  # no placeholder or .tmp left
    loaded = load_split(tmp_path / "streamed", "val")
    assert torch.equal(loaded.images, data.images) and torch.equal(loaded.labels, data.labels)
    assert loaded.files == data.files and (loaded.masks is None) == (not with_masks)


def test_a_source_short_of_bytes_fails_and_leaves_the_previous_file(tmp_path):
    data = random_split(n=10, size=8, with_masks=False)
    previous = save_split(tmp_path, "train", random_split(n=5, size=8, with_masks=False, seed=1)).read_bytes()
    short = Rows(tuple(data.images.shape), lambda: [data.images[:9].numpy()])
    with pytest.raises(RuntimeError, match=r"data/0 got 1728 bytes, torch.save reserved 1920"):
        save_split_streamed(tmp_path, "train", short, data.labels, None, data.files, data.classes)
    assert (tmp_path / "train.pt").read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.pt"]


def masked_folders(root: Path, per_class: int = 9, size: int = 20) -> Path:
    """Noise images in three classes, each with a ground-truth mask of its size under .masks/."""
    rng = np.random.default_rng(3)
    for name in ("cat", "dog", "owl"):
        for i in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / ".masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
            Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255).save(
                root / ".masks" / name / f"{i}.png")
    return root


def test_prepare_in_tiny_chunks_writes_what_torch_save_writes(tmp_path):
    params = parse_params({"img_size": 16, "seed": 5, "data": {"source": str(masked_folders(tmp_path / "src")),
                                                               "workers": 2}})
    prepare(params, out_dir=tmp_path / "tiny", progress=False, chunk_bytes=1)  # one row per chunk
    prepare(params, out_dir=tmp_path / "default", progress=False)               # one chunk per split
    for split in SPLITS:
        written = load_split(tmp_path / "tiny", split)
        assert written.masks is not None and len(written) > 1
        plain = save_split(tmp_path / "plain", split, PreparedSplit(
            written.images.clone(), written.labels.clone(), written.masks.clone(), written.files, written.classes))
        tiny = (tmp_path / "tiny" / f"{split}.pt").read_bytes()
        assert tiny == plain.read_bytes() == (tmp_path / "default" / f"{split}.pt").read_bytes()
        for k, rel in enumerate(written.files):  # each worker wrote its rows where they belong
            expected = decode_image(tmp_path / "src" / rel, 16, "stretch", tmp_path / "src" / ".masks" / rel)
            assert np.array_equal(written.images[k].numpy(), expected.pixels)
            assert np.array_equal(written.masks[k].numpy(), expected.mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default", "plain", "src", "tiny"]  # no build left
    assert not any(p.name.startswith(".") for p in (tmp_path / "tiny").iterdir())       # nor the raw files
