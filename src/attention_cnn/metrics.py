"""Classification metrics, computed once from all logits and labels of a split.

Never from per-batch averages: the last batch is usually short, and averaging batch accuracies then weights its
images more than the others (the seed's bug). Every number here comes from the full (N, K) logits.

Conventions (the same as scikit-learn's defaults with zero_division=0, which we cannot depend on):
- precision of a class that is never predicted is 0; recall of a class absent from the labels is 0;
  F1 is 0 when precision + recall is 0.
- macro = unweighted mean over classes; weighted = mean weighted by each class's support (true count).
- ECE (Guo et al. 2017): 15 equal-width confidence bins over (0, 1]; the support-weighted mean of
  |accuracy - mean confidence| per bin, with confidence = the top softmax probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ECE_BINS = 15


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int  # true images of the class


@dataclass(frozen=True)
class ClassificationReport:
    accuracy: float
    loss: float             # mean cross-entropy over all images
    top2_accuracy: float    # true class among the two most probable
    ece: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    per_class: dict[str, ClassMetrics]
    confusion: torch.Tensor  # (K, K) int64, rows = true class, columns = predicted class
    predictions: torch.Tensor  # (N,) int64
    confidence: torch.Tensor   # (N,) float32, softmax probability of the predicted class

    def as_metrics(self) -> dict[str, float]:
        """Flat metric names as logged to DVCLive ('/' nests them in metrics.json)."""
        metrics = {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "top2_accuracy": self.top2_accuracy,
            "ece": self.ece,
            "macro/precision": self.macro_precision,
            "macro/recall": self.macro_recall,
            "macro/f1": self.macro_f1,
            "weighted/precision": self.weighted_precision,
            "weighted/recall": self.weighted_recall,
            "weighted/f1": self.weighted_f1,
        }
        for name, m in self.per_class.items():
            metrics[f"per_class/{name}/precision"] = m.precision
            metrics[f"per_class/{name}/recall"] = m.recall
            metrics[f"per_class/{name}/f1"] = m.f1
        return metrics


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width bins of (0, 1]; bin i holds confidences in (i/bins, (i+1)/bins]."""
    confidence = confidence.double()
    # ceil(c * bins) - 1 puts c in (i/bins, (i+1)/bins] into bin i; clamp keeps c == 0 in bin 0.
    bin_index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.bincount(bin_index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(bin_index, weights=correct.double(), minlength=bins)
    gap = (correct_sum - conf_sum).abs()  # = count * |acc - conf| per bin
    return float(gap.sum() / confidence.numel())


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> ClassificationReport:
    """All classification metrics of one split from its (N, K) logits and (N,) integer labels."""
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or logits.shape[1] != len(classes):
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} "
                         f"and {len(classes)} classes")
    if labels.numel() == 0:
        raise ValueError("no images to score")
    logits, labels = logits.float(), labels.long()
    num_classes = len(classes)
    probs = logits.softmax(dim=1)                      # (N, K)
    confidence, predictions = probs.max(dim=1)         # (N,), (N,)
    correct = predictions == labels

    top2 = logits.topk(min(2, num_classes), dim=1).indices  # (N, 2)
    confusion = confusion_matrix(labels, predictions, num_classes)
    true_pos = confusion.diag().double()
    support = confusion.sum(dim=1).double()    # true count per class
    predicted = confusion.sum(dim=0).double()  # predicted count per class
    precision = _safe_div(true_pos, predicted)
    recall = _safe_div(true_pos, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    weights = support / support.sum()

    per_class = {name: ClassMetrics(precision=float(precision[k]), recall=float(recall[k]), f1=float(f1[k]),
                                    support=int(support[k]))
                 for k, name in enumerate(classes)}
    return ClassificationReport(
        accuracy=float(correct.double().mean()),
        loss=float(F.cross_entropy(logits, labels, reduction="sum").double() / labels.numel()),
        top2_accuracy=float((top2 == labels[:, None]).any(dim=1).double().mean()),
        ece=expected_calibration_error(confidence, correct),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        weighted_precision=float((weights * precision).sum()),
        weighted_recall=float((weights * recall).sum()),
        weighted_f1=float((weights * f1).sum()),
        per_class=per_class,
        confusion=confusion,
        predictions=predictions,
        confidence=confidence,
    )


# ----------------------------------------------------------------------------------------------------------
# Did the run learn anything?

SMALL_DATA_SECTION = 'docs/your-folder.md, "Small folders"'


def chance_level(num_classes: int) -> float:
    """Accuracy of guessing: what `accuracy` must clearly beat (the splits are stratified, so about balanced).
    The metrics files hold it as `guess`, to 3 decimals: `dvc metrics show`'s table must fit 160 columns, and a
    column is as wide as its name or its value."""
    return 1.0 / num_classes


# The one-sided tail beyond 3 standard errors: how rarely luck alone may explain an accuracy.
LUCK = 0.00135


def too_few_to_tell(num_classes: int, count: int) -> bool:
    """True when a guesser gets all `count` images right more often than LUCK (2 classes: up to 9 images), so that
    no score on them can tell a model that learned from one that guesses."""
    return chance_level(num_classes) ** max(count, 1) > LUCK


def chance_ceiling(num_classes: int, count: int) -> float:
    """The highest accuracy over `count` images still within a few points of chance: 5 points, or 3 standard
    errors of a guesser's accuracy on so few images (a best-of-many val accuracy drifts up by luck alone).
    Always half an image below a perfect score: on a tiny split 3 standard errors reach past 1 (0.5 + 3 *
    sqrt(0.25 / 6) = 1.11 for 2 classes and 6 images), and a model that gets every image right must not be
    called one that did not learn, nor have its patience never counted. Half an image, so that
    accuracy = correct / count compares the same on any CPU."""
    count = max(count, 1)
    p = chance_level(num_classes)
    return min(p + max(0.05, 3 * (p * (1 - p) / count) ** 0.5), (count - 0.5) / count)


def near_chance(accuracy: float, num_classes: int, count: int) -> bool:
    return accuracy <= chance_ceiling(num_classes, count)


def not_learned_warning(what: str, accuracy: float, num_classes: int, count: int) -> str | None:
    """The one `warning:` line train and evaluate print when a model is no better than guessing, else None."""
    if not near_chance(accuracy, num_classes, count):
        return None
    if too_few_to_tell(num_classes, count):  # "did not learn" would be a guess too
        return (f"warning: {what} {accuracy:.3f} on {count} images is within what guessing reaches "
                f"({chance_level(num_classes):.3f} for {num_classes} classes): too few images to tell whether the "
                f"model learned. Give the split more images (data.val_fraction, data.test_fraction, or a bigger "
                f"folder). See {SMALL_DATA_SECTION}.")
    return (f"warning: {what} {accuracy:.3f} is about chance ({chance_level(num_classes):.3f} for {num_classes} "
            f"classes, {count} images): the model did not learn. See {SMALL_DATA_SECTION}.")
