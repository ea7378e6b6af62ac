"""utils/classification.py against scikit-learn on random and edge-case inputs, and the confusion figure."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk

from utils.classification import (
    accuracy, auc_one_vs_one, auc_one_vs_rest, balanced_accuracy, classification_scores, confusion_figure,
    confusion_matrix, draw_confusion, macro_f1, macro_precision, macro_recall, quadratic_kappa, uncertainty_auroc)


def _random_probabilities(rng, n: int, k: int, sharpness: float = 2.0) -> np.ndarray:
    logits = rng.normal(size=(n, k)) * sharpness
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    return probabilities / probabilities.sum(1, keepdims=True)


def _cases():
    """(name, labels, predictions, K): random, perfect, one-class predictions, missing classes, binary."""
    rng = np.random.default_rng(0)
    cases = [("random4", rng.integers(0, 4, 60), rng.integers(0, 4, 60), 4),
             ("random_binary", rng.integers(0, 2, 40), rng.integers(0, 2, 40), 2)]
    labels = rng.integers(0, 5, 50)
    cases += [("perfect", labels, labels.copy(), 5),
              ("all_predicted_one_class", labels, np.full(50, 2), 5),
              ("class_missing_from_labels", rng.choice([0, 1, 3], 40), rng.integers(0, 4, 40), 4),
              ("class_missing_everywhere", rng.choice([0, 2], 30), rng.choice([0, 2], 30), 3),
              ("only_predicted_class", np.zeros(10, int), np.r_[np.zeros(7, int), np.ones(3, int)], 2)]
    return cases


CASES = _cases()


def sklearn_hard_scores(labels, predictions, k: int) -> dict[str, float]:
    """scikit-learn's scores of hard predictions, under the names utils.classification reports them by."""
    with warnings.catch_warnings():  # sklearn warns about absent classes, which some cases test
        warnings.simplefilter("ignore")
        return {
            "accuracy": sk.accuracy_score(labels, predictions),
            "balanced_accuracy": sk.balanced_accuracy_score(labels, predictions),
            "precision": sk.precision_score(labels, predictions, average="macro", zero_division=0),
            "recall": sk.recall_score(labels, predictions, average="macro", zero_division=0),
            "f1": sk.f1_score(labels, predictions, average="macro", zero_division=0),
            "kappa": sk.cohen_kappa_score(labels, predictions, weights="quadratic", labels=list(range(k))),
        }


@pytest.mark.parametrize("name, labels, predictions, k", CASES, ids=[c[0] for c in CASES])
def test_hard_prediction_metrics_equal_sklearn(name, labels, predictions, k):
    expected = sklearn_hard_scores(labels, predictions, k)
    ours = {"accuracy": accuracy(labels, predictions, k),
            "balanced_accuracy": balanced_accuracy(labels, predictions, k), "precision": macro_precision(labels, predictions, k), "recall": macro_recall(labels, predictions, k),
            "f1": macro_f1(labels, predictions, k), "kappa": quadratic_kappa(labels, predictions, k)}
    for metric, value in expected.items():
        assert ours[metric] == pytest.approx(value, abs=1e-12, nan_ok=True), metric
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, k),
                                  sk.confusion_matrix(labels, predictions, labels=list(range(k))))


def test_kappa_undefined_and_perfect():
    assert math.isnan(quadratic_kappa(np.full(8, 1), np.full(8, 1), 3))  # one class everywhere: no disagreement
    assert quadratic_kappa(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2]), 3) == pytest.approx(1.0)
    # Grades, not ranks of the grades present: missing a grade by two costs four times missing it by one.
    by_one = quadratic_kappa(np.array([0, 2, 0, 2]), np.array([1, 2, 0, 2]), 3)
    by_two = quadratic_kappa(np.array([0, 2, 0, 2]), np.array([2, 2, 0, 2]), 3)
    assert by_two < by_one


@pytest.mark.parametrize("k, n, seed", [(2, 50, 1), (3, 80, 2), (5, 120, 3)])
def test_auc_equal_sklearn(k, n, seed):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.arange(k), rng.integers(0, k, n - k)]  # every class present
    probabilities = _random_probabilities(rng, n, k)
    probabilities[:10] = probabilities[10:20]  # tied scores
    if k == 2:
        expected_ovr = expected_ovo = sk.roc_auc_score(labels, probabilities[:, 1])
    else:
        expected_ovr = sk.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
        expected_ovo = sk.roc_auc_score(labels, probabilities, multi_class="ovo", average="macro")
    assert auc_one_vs_rest(labels, probabilities) == pytest.approx(expected_ovr, abs=1e-12)
    assert auc_one_vs_one(labels, probabilities) == pytest.approx(expected_ovo, abs=1e-12)


def test_auc_perfect_and_constant_scores():
    labels = np.array([0, 1, 2, 0, 1, 2])
    one_hot = np.eye(3)[labels]
    assert auc_one_vs_rest(labels, one_hot) == 1.0 and auc_one_vs_one(labels, one_hot) == 1.0
    uniform = np.full((6, 3), 1 / 3)
    assert auc_one_vs_rest(labels, uniform) == 0.5 == sk.roc_auc_score(labels, uniform, multi_class="ovr")


def test_classification_scores_keys_values_and_missing_class():
    rng = np.random.default_rng(4)
    labels = np.r_[np.arange(3), rng.integers(0, 3, 57)]
    probabilities = _random_probabilities(rng, 60, 3)
    scores = classification_scores(labels, probabilities, 3)
    assert set(scores) == {"accuracy", "balanced_accuracy", "precision", "recall", "f1", "kappa", "auc_ovr",
                           "auc_ovo"}
    predictions = probabilities.argmax(1)
    assert scores["f1"] == pytest.approx(sk.f1_score(labels, predictions, average="macro", zero_division=0))
    assert scores["auc_ovo"] == pytest.approx(sk.roc_auc_score(labels, probabilities, multi_class="ovo"))
    missing = classification_scores(labels[labels != 2], probabilities[labels != 2], 3)
    assert math.isnan(missing["auc_ovr"]) and math.isnan(missing["auc_ovo"])
    assert not math.isnan(missing["accuracy"])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        classification_scores(labels, probabilities, 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        classification_scores(np.r_[labels[:-1], 3], probabilities, 3)


def test_uncertainty_auroc_equals_sklearn():
    rng = np.random.default_rng(5)
    correct = rng.random(100) > 0.3
    uncertainty = rng.random(100) + 0.5 * ~correct  # errors tend to be more uncertain
    uncertainty[:20] = np.round(uncertainty[:20], 1)  # ties
    expected = sk.roc_auc_score(~correct, uncertainty)
    assert uncertainty_auroc(uncertainty, correct) == pytest.approx(expected, abs=1e-12)
    assert expected > 0.6
    assert uncertainty_auroc(np.r_[0.1, 0.2, 0.9], np.array([True, True, False])) == 1.0
    assert math.isnan(uncertainty_auroc(rng.random(5), np.ones(5, bool)))
    assert math.isnan(uncertainty_auroc(rng.random(5), np.zeros(5, bool)))


def test_confusion_figure_written_with_class_names(tmp_path):
    names = ["benign", "malignant", "normal"]
    matrix = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # the last class has no samples: its row stays blank
    figure = draw_confusion(matrix, names, title="val")
    texts = {t.get_text() for ax in figure.axes for t in ax.texts + ax.get_xticklabels() + ax.get_yticklabels()}
    assert set(names) <= texts and {"5", "7", "0"} <= texts
    assert "val" in {ax.get_title() for ax in figure.axes}
    path = confusion_figure(matrix, names, tmp_path / "eval" / "confusion.png", title="val")
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temporary left
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.format == "PNG"
    with pytest.raises(ValueError, match="class names"):
        draw_confusion(matrix, names[:2])
