"""Classification metrics in numpy (accuracy, balanced accuracy, macro precision / recall / F1, one-vs-rest and
one-vs-one AUC, quadratic-weighted kappa, confusion matrix), the AUROC of an uncertainty for spotting errors, and
the confusion-matrix figure.

Labels are integers in [0, K); probabilities are (N, K). The values agree with scikit-learn's functions called as
the docstrings say; the tests check that on random and edge-case inputs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DPI = 100
_CELL_INCHES = 0.6
TEMP_PREFIX = ".tmp-"  # a figure is written under this prefix, then renamed, so readers never see half a PNG


# ----------------------------------------------------------------------------------------------------------
# Input checks.

def _labels(labels, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1D integer array, got dtype {labels.dtype} and shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def _pair(labels, predictions, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    labels, predictions = _labels(labels, num_classes), _labels(predictions, num_classes)
    if labels.shape != predictions.shape or labels.size == 0:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be equally long and "
                         f"not empty")
    return labels, predictions


def _occurring(matrix: np.ndarray) -> np.ndarray:
    """Classes found among the labels or the predictions: the classes sklearn macro-averages over by default."""
    return (matrix.sum(0) + matrix.sum(1)) > 0


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


# ----------------------------------------------------------------------------------------------------------
# Metrics on hard predictions.

def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    labels, predictions = _pair(labels, predictions, num_classes)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes,
                                                                                                num_classes)


def accuracy(labels, predictions, num_classes: int) -> float:
    labels, predictions = _pair(labels, predictions, num_classes)
    return float((labels == predictions).mean())


def balanced_accuracy(labels, predictions, num_classes: int) -> float:
    """Mean recall over the classes present in `labels` (sklearn's balanced_accuracy_score)."""
    matrix = confusion_matrix(labels, predictions, num_classes)
    present = matrix.sum(1) > 0
    return float((np.diag(matrix)[present] / matrix.sum(1)[present]).mean())


def _per_class(labels, predictions, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of every class (0 where undefined) and the mask of occurring classes."""
    matrix = confusion_matrix(labels, predictions, num_classes)
    true_positives = np.diag(matrix)
    predicted, actual = matrix.sum(0), matrix.sum(1)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, actual)
    f1 = _safe_divide(2 * true_positives, predicted + actual)
    return precision, recall, f1, _occurring(matrix)


def macro_precision(labels, predictions, num_classes: int) -> float:
    """Unweighted mean precision over the classes found in labels or predictions; 0 for a class never predicted
    (sklearn's precision_score(average="macro", zero_division=0))."""
    precision, _, _, occurring = _per_class(labels, predictions, num_classes)
    return float(precision[occurring].mean())


def macro_recall(labels, predictions, num_classes: int) -> float:
    """Unweighted mean recall over the classes found in labels or predictions (sklearn's recall_score(
    average="macro", zero_division=0)): a class only predicted counts as 0."""
    _, recall, _, occurring = _per_class(labels, predictions, num_classes)
    return float(recall[occurring].mean())


def macro_f1(labels, predictions, num_classes: int) -> float:
    """Unweighted mean of per-class F1 = 2 TP / (2 TP + FP + FN) over the classes found in labels or predictions
    (sklearn's f1_score(average="macro", zero_division=0))."""
    _, _, f1, occurring = _per_class(labels, predictions, num_classes)
    return float(f1[occurring].mean())


def quadratic_kappa(labels, predictions, num_classes: int) -> float:
    """Cohen's kappa with weights (i - j)^2 on the class indices 0..K-1, so that a grade missed by two costs four
    times one missed by one whichever grades occur (sklearn's cohen_kappa_score(weights="quadratic",
    labels=range(K))). NaN when undefined: labels and predictions all of one and the same class."""
    matrix = confusion_matrix(labels, predictions, num_classes).astype(float)
    expected = np.outer(matrix.sum(1), matrix.sum(0)) / matrix.sum()
    grades = np.arange(num_classes)
    weights = (grades[:, None] - grades[None, :]) ** 2
    disagreement_expected = (weights * expected).sum()
    if disagreement_expected == 0:
        return float("nan")
    return float(1 - (weights * matrix).sum() / disagreement_expected)


# ----------------------------------------------------------------------------------------------------------
# Metrics on scores.

def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((first + 1 + last) / 2)[group]  # mean of ranks first+1 .. last
    return ranks


def binary_auc(positive, scores) -> float:
    """Area under the ROC curve: the probability that a positive outscores a negative, ties counting half
    (Mann-Whitney U / (n+ n-), equal to sklearn's roc_auc_score). NaN without positives or negatives."""
    positive, scores = np.asarray(positive, bool), np.asarray(scores, float)
    num_positive, num_negative = positive.sum(), (~positive).sum()
    if num_positive == 0 or num_negative == 0:
        return float("nan")
    rank_sum = _ranks(scores)[positive].sum()
    return float((rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def auc_one_vs_rest(labels, probabilities) -> float:
    """Macro mean over classes of the AUC of each class's probability against all others (sklearn's
    roc_auc_score(multi_class="ovr"); for two classes the AUC of the second class's probability)."""
    probabilities = np.asarray(probabilities, float)
    labels = _labels(labels, probabilities.shape[1])
    if probabilities.shape[1] == 2:
        return binary_auc(labels == 1, probabilities[:, 1])
    return float(np.mean([binary_auc(labels == k, probabilities[:, k]) for k in range(probabilities.shape[1])]))


def auc_one_vs_one(labels, probabilities) -> float:
    """Hand & Till (2001): the mean over class pairs (a, b) of the AUCs separating a from b on their samples,
    by a's probability and by b's, averaged (sklearn's roc_auc_score(multi_class="ovo", average="macro"))."""
    probabilities = np.asarray(probabilities, float)
    labels = _labels(labels, probabilities.shape[1])
    pair_scores = []
    for a in range(probabilities.shape[1]):
        for b in range(a + 1, probabilities.shape[1]):
            pair = (labels == a) | (labels == b)
            a_wins = binary_auc(labels[pair] == a, probabilities[pair, a])
            b_wins = binary_auc(labels[pair] == b, probabilities[pair, b])
            pair_scores.append((a_wins + b_wins) / 2)
    return float(np.mean(pair_scores))


def uncertainty_auroc(uncertainty, correct) -> float:
    """AUROC of the uncertainty as a detector of wrong predictions (errors are the positives): 1 when every error
    is more uncertain than every right answer, 0.5 for an uninformative uncertainty. NaN when all predictions are
    right or all wrong."""
    uncertainty, correct = np.asarray(uncertainty, float).ravel(), np.asarray(correct, bool).ravel()
    if uncertainty.shape != correct.shape:
        raise ValueError(f"uncertainty {uncertainty.shape} and correct {correct.shape} must be equally long")
    return binary_auc(~correct, uncertainty)


def classification_scores(labels, probabilities, num_classes: int) -> dict[str, float]:
    """All scalar scores of hard predictions argmax(probabilities) and of the probabilities themselves.

    Keys: accuracy, balanced_accuracy, precision, recall, f1 (macro, zero_division=0), kappa (quadratic), auc_ovr,
    auc_ovo. The AUCs are NaN unless every one of the K classes occurs in `labels`: a class without samples has
    no ROC curve, and averaging over the remaining classes would make scores of different sets incomparable.
    kappa is NaN when labels and predictions are all the same single class.

    Args:
        probabilities: (N, K) class probabilities (or any scores: only their order within a column matters).
    """
    probabilities = np.asarray(probabilities, float)
    if probabilities.ndim != 2 or probabilities.shape[1] != num_classes:
        raise ValueError(f"probabilities must be (N, {num_classes}), got shape {probabilities.shape}")
    labels = _labels(labels, num_classes)
    predictions = probabilities.argmax(1)
    all_present = np.unique(labels).size == num_classes
    return {
        "accuracy": accuracy(labels, predictions, num_classes),
        "balanced_accuracy": balanced_accuracy(labels, predictions, num_classes),
        "precision": macro_precision(labels, predictions, num_classes),
        "recall": macro_recall(labels, predictions, num_classes),
        "f1": macro_f1(labels, predictions, num_classes),
        "kappa": quadratic_kappa(labels, predictions, num_classes),
        "auc_ovr": auc_one_vs_rest(labels, probabilities) if all_present else float("nan"),
        "auc_ovo": auc_one_vs_one(labels, probabilities) if all_present else float("nan"),
    }


# ----------------------------------------------------------------------------------------------------------
# Figure.

def draw_confusion(matrix, class_names: Sequence[str], title: str = "") -> Figure:
    """The confusion matrix as a figure: each cell shaded by its share of the true class's row, labelled with its
    count; true classes down, predicted classes across."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(class_names):
        raise ValueError(f"matrix {matrix.shape} must be (K, K) with K = {len(class_names)} class names")
    shares = _safe_divide(matrix, np.broadcast_to(matrix.sum(1, keepdims=True), matrix.shape))
    side = max(3.0, _CELL_INCHES * len(class_names) + 1.5)
    figure = Figure(figsize=(side + 0.8, side), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # a bare Agg canvas: no pyplot, no display, no global state
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if shares[row, col] > 0.5 else "black")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="share of the true class")
    return figure


def confusion_figure(matrix, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Write `draw_confusion` as a PNG at `path`, through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{TEMP_PREFIX}{path.name}")
    draw_confusion(matrix, class_names, title).savefig(temporary, format="png", dpi=_DPI)
    os.replace(temporary, path)
    return path
