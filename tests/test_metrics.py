"""Classification metrics against hand-computed values; deletion/insertion and the pointing game on hand-built
examples whose answers are known analytically."""

import math

import pytest
import torch

from attention_cnn.explain.metrics.deletion_insertion import (blur, curve_auc, deletion_fill, deletion_insertion,
                                                              perturbation)
from attention_cnn.explain.metrics.pointing import pointing_game, pointing_tolerance
from attention_cnn.metrics import classification_report, confusion_matrix, expected_calibration_error
from attention_cnn.model import AttentionCNN
from attention_cnn.params import ModelParams

CLASSES = ["a", "b", "c"]
# Five images; logits = log(probabilities), so softmax gives these rows back.
PROBS = torch.tensor([
    [0.7, 0.2, 0.1],  # true a, pred a (0.7)
    [0.3, 0.6, 0.1],  # true a, pred b (0.6): wrong, a is second -> top-2 hit
    [0.1, 0.8, 0.1],  # true b, pred b (0.8)
    [0.2, 0.1, 0.7],  # true c, pred c (0.7)
    [0.5, 0.3, 0.2],  # true c, pred a (0.5): wrong, c is third -> top-2 miss
])
LABELS = torch.tensor([0, 0, 1, 2, 2])


def test_classification_report_matches_hand_computed_values():
    report = classification_report(PROBS.log(), LABELS, CLASSES)
    assert report.accuracy == pytest.approx(3 / 5)
    assert report.top2_accuracy == pytest.approx(4 / 5)
    assert report.loss == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.8) + math.log(0.7)
                                          + math.log(0.2)) / 5, rel=1e-5)
    assert report.confusion.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    # precision: a 1/2, b 1/2, c 1/1; recall: a 1/2, b 1/1, c 1/2; F1: 1/2, 2/3, 2/3
    a, b, c = (report.per_class[name] for name in CLASSES)
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert (c.precision, c.recall, c.f1, c.support) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert report.macro_precision == pytest.approx(2 / 3)
    assert report.macro_recall == pytest.approx(2 / 3)
    assert report.macro_f1 == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert report.weighted_recall == pytest.approx(report.accuracy)  # always true: support-weighted recall
    assert report.weighted_precision == pytest.approx((2 * 0.5 + 1 * 0.5 + 2 * 1.0) / 5)
    assert report.weighted_f1 == pytest.approx((2 * 0.5 + 1 * 2 / 3 + 2 * 2 / 3) / 5)
    # ECE: bins hold {0.7, 0.7 both right}, {0.6 wrong}, {0.8 right}, {0.5 wrong}
    assert report.ece == pytest.approx((abs(2 - 1.4) + 0.6 + 0.2 + 0.5) / 5, abs=1e-6)
    assert report.predictions.tolist() == [0, 1, 1, 2, 0]
    assert report.confidence.tolist() == pytest.approx([0.7, 0.6, 0.8, 0.7, 0.5], abs=1e-6)


def test_metric_names_for_dvclive():
    metrics = classification_report(PROBS.log(), LABELS, CLASSES).as_metrics()
    assert metrics["accuracy"] == pytest.approx(0.6)
    for key in ("loss", "top2_accuracy", "ece", "macro/f1", "weighted/precision", "per_class/c/recall"):
        assert key in metrics


def test_a_class_never_predicted_scores_zero_precision_not_nan():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]])
    report = classification_report(logits, torch.tensor([0, 1, 2]), CLASSES)
    assert report.per_class["c"].precision == 0.0 and report.per_class["c"].f1 == 0.0
    assert report.per_class["a"].precision == 0.5
    assert not math.isnan(report.macro_f1)


def test_ece_of_a_perfectly_calibrated_bin_is_zero_and_overconfidence_counts():
    confidence = torch.tensor([0.75, 0.75, 0.75, 0.75])
    assert expected_calibration_error(confidence, torch.tensor([1, 1, 1, 0])) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(confidence, torch.tensor([0, 0, 0, 0])) == pytest.approx(0.75)


def test_confusion_matrix_rows_are_true_classes():
    m = confusion_matrix(torch.tensor([0, 0, 2]), torch.tensor([1, 0, 2]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError):
        classification_report(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), CLASSES)


# ----------------------------------------------------------------------------------------------------------
# Deletion / insertion on a model with a known answer

S = 8


def region_score(x: torch.Tensor) -> torch.Tensor:
    """A 'model' whose class-0 probability is the mean brightness of the left half of the image."""
    p = x[:, :, :, : S // 2].mean(dim=(1, 2, 3))  # (N,)
    return torch.stack([p, 1 - p], dim=1)


def half_map(left: bool) -> torch.Tensor:
    saliency = torch.zeros(S, S)
    saliency[:, : S // 2] = 1.0
    return saliency if left else 1 - saliency


def test_deletion_and_insertion_have_the_analytic_areas():
    # Image 0's map points exactly at the region the score reads; image 1's map at everything else.
    images = torch.ones(2, 3, S, S)
    saliency = torch.stack([half_map(left=True), half_map(left=False)])
    setup = perturbation(region_score, images, torch.tensor([0, 0]), batch_size=3,
                         fill=torch.zeros_like(images), insertion_start=torch.zeros_like(images))
    result = deletion_insertion(region_score, setup, saliency, steps=4, batch_size=3)
    # Right map: deleting 1/4 of the pixels removes half the region -> curve 1, .5, 0, 0, 0 -> area 1/4;
    # insertion mirrors it -> 0, .5, 1, 1, 1 -> 3/4. The inverse map swaps the two.
    assert result.deletion_curve[:, 0].tolist() == pytest.approx([1, 0.5, 0, 0, 0])
    assert result.insertion_curve[:, 0].tolist() == pytest.approx([0, 0.5, 1, 1, 1])
    assert result.deletion_auc.tolist() == pytest.approx([0.25, 0.75])
    assert result.insertion_auc.tolist() == pytest.approx([0.75, 0.25])


def test_a_random_map_lies_between_the_right_and_the_inverse_map():
    torch.manual_seed(0)
    images = torch.ones(1, 3, S, S)
    setup = perturbation(region_score, images, torch.tensor([0]), batch_size=16,
                         fill=torch.zeros_like(images), insertion_start=torch.zeros_like(images))
    noise = torch.rand(1, S, S)
    random = deletion_insertion(region_score, setup, noise, steps=16, batch_size=16)
    right = deletion_insertion(region_score, setup, half_map(True)[None], steps=16, batch_size=16)
    wrong = deletion_insertion(region_score, setup, half_map(False)[None], steps=16, batch_size=16)
    assert right.deletion_auc < random.deletion_auc < wrong.deletion_auc
    assert right.insertion_auc > random.insertion_auc > wrong.insertion_auc


def test_deletion_fills_with_the_channel_mean_and_insertion_starts_from_blur():
    images = torch.rand(2, 3, 16, 16)
    mean = torch.tensor([0.4, 0.5, 0.3])
    fill = deletion_fill(images, mean)
    setup = perturbation(lambda x: region_score(x[..., :S, :S]), images, torch.tensor([0, 1]), batch_size=4, fill=fill)
    assert fill.shape == images.shape
    assert torch.equal(setup.fill[1, :, 7, 9], mean)
    assert torch.allclose(setup.insertion_start, blur(images))


def test_the_deletion_fill_is_zero_after_the_models_normalisation():
    model = AttentionCNN(3, 16, ModelParams(channels=4, hidden=8))
    model.set_normalization(torch.tensor([0.4, 0.5, 0.3]), torch.tensor([0.2, 0.25, 0.3]))
    fill = deletion_fill(torch.rand(2, 3, 16, 16), model.mean)
    assert torch.equal((fill - model.mean) / model.std, torch.zeros_like(fill))


def test_blur_equals_torchvision_gaussian_blur():
    from torchvision.transforms.functional import gaussian_blur

    images = torch.rand(2, 3, 64, 64)
    # sigma = 64/16 = 4 px, kernel 2*ceil(3*4)+1 = 25
    assert torch.allclose(blur(images), gaussian_blur(images, kernel_size=[25, 25], sigma=[4.0, 4.0]), atol=1e-5)


def test_blur_keeps_flat_images_and_flattens_texture():
    flat = torch.full((1, 3, 64, 64), 0.3)
    assert torch.allclose(blur(flat), flat, atol=1e-6)
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2).float().expand(1, 3, 64, 64)
    assert blur(checker).std() < 0.1 * checker.std()


def test_curve_auc_is_the_trapezoid_over_fractions():
    assert curve_auc(torch.tensor([[1.0], [1.0], [1.0]])).item() == pytest.approx(1.0)
    assert curve_auc(torch.tensor([[1.0], [0.0]])).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------
# Pointing game


def peak_at(row: int, col: int, size: int = 16) -> torch.Tensor:
    saliency = torch.zeros(size, size)
    saliency[row, col] = 1.0
    return saliency


def test_pointing_game_on_a_synthetic_mask():
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[4:8, 4:8] = 255  # rows and columns 4..7
    maps = torch.stack([peak_at(5, 5), peak_at(12, 12), peak_at(9, 5)])
    masks = mask.expand(3, 16, 16)
    assert pointing_game(maps, masks, tolerance=0).tolist() == [1.0, 0.0, 0.0]
    # (9, 5) is two rows below the mask's last row: a miss with tolerance 1, a hit with tolerance 2.
    assert pointing_game(maps, masks, tolerance=1).tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=2).tolist() == [1.0, 0.0, 1.0]


def test_pointing_game_ties_score_their_share_and_empty_masks_are_nan():
    mask = torch.zeros(2, 16, 16, dtype=torch.uint8)
    mask[0, :4, :] = 255  # a quarter of the image
    flat = torch.ones(2, 16, 16)
    hits = pointing_game(flat, mask, tolerance=0)
    assert hits[0].item() == pytest.approx(0.25)
    assert math.isnan(hits[1].item())


def test_pointing_tolerance_is_15_px_at_224_scaled_to_the_image():
    assert pointing_tolerance(224) == 15
    assert pointing_tolerance(112) == 7.5
    assert pointing_tolerance(64) == pytest.approx(4.2857, abs=1e-4)


def test_pointing_game_grows_the_mask_by_a_disk_not_a_square():
    mask = torch.zeros(32, 32, dtype=torch.uint8)
    mask[10, 10] = 255  # one evidence pixel
    # Offsets from it: 3 along a row (distance 3), (2, 2) (2.83), (3, 2) (3.61) and (3, 3) (4.24).
    peaks = [(10, 13), (12, 12), (13, 12), (13, 13)]
    maps = torch.stack([peak_at(r, c, size=32) for r, c in peaks])
    hits = pointing_game(maps, mask.expand(4, 32, 32), tolerance=3)
    # A square of half-width 3 would hit all four; the disk of radius 3 hits the first two only.
    assert hits.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert pointing_game(maps, mask.expand(4, 32, 32), tolerance=3.7).tolist() == [1.0, 1.0, 1.0, 0.0]
