import numpy as np
import pytest
from PIL import Image

from attention_cnn.data.sample import CLASSES, MASKS_DIR, draw_scene, write_sample


def test_six_classes_named_after_the_intel_set():
    assert CLASSES == ("buildings", "forest", "glacier", "mountain", "sea", "street")


def test_scene_is_deterministic_and_differs_by_seed_and_index():
    a = np.asarray(draw_scene(1, "forest", 0).image)
    assert np.array_equal(a, np.asarray(draw_scene(1, "forest", 0).image))
    assert not np.array_equal(a, np.asarray(draw_scene(2, "forest", 0).image))
    assert not np.array_equal(a, np.asarray(draw_scene(1, "forest", 1).image))


@pytest.mark.parametrize("name", CLASSES)
def test_mask_covers_part_of_the_image_and_marks_evidence(name):
    covered = []
    for i in range(5):
        scene = draw_scene(0, name, i, size=96)
        assert scene.image.size == (96, 96) and scene.image.mode == "RGB"
        mask = np.asarray(scene.mask)
        assert set(np.unique(mask)) <= {0, 255}
        covered.append((mask > 0).mean())
    assert 0.01 < min(covered) and max(covered) < 0.8


def test_evidence_moves_between_images():
    centres = []
    for i in range(8):
        ys, xs = np.nonzero(np.asarray(draw_scene(3, "sea", i).mask))
        centres.append((xs.mean(), ys.mean()))
    spread = np.std(np.array(centres), axis=0)
    assert (spread > 10).all(), f"evidence should sit at random positions, centres spread {spread}"


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match="unknown sample class 'desert'"):
        draw_scene(0, "desert", 0)


def test_write_sample_layout(tmp_path):
    out = write_sample(tmp_path / "sample", seed=5, images_per_class=2, image_size=48)
    for name in CLASSES:
        jpgs = sorted((out / name).iterdir())
        assert [p.name for p in jpgs] == [f"{name}_0000.jpg", f"{name}_0001.jpg"]
        with Image.open(jpgs[0]) as im:
            assert im.format == "JPEG" and im.size == (48, 48)
        masks = sorted((out / MASKS_DIR / name).iterdir())
        assert [p.name for p in masks] == [f"{name}_0000.png", f"{name}_0001.png"]
    # Nothing but the class folders and the hidden mask folder; no staging leftovers beside it.
    assert sorted(p.name for p in out.iterdir()) == sorted([*CLASSES, MASKS_DIR])
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_write_sample_is_reproducible(tmp_path):
    a = write_sample(tmp_path / "a", seed=9, images_per_class=1, image_size=40)
    b = write_sample(tmp_path / "b", seed=9, images_per_class=1, image_size=40)
    for name in CLASSES:
        assert (a / name / f"{name}_0000.jpg").read_bytes() == (b / name / f"{name}_0000.jpg").read_bytes()
