"""hfplug.training.metrics: exact hand-computed cases, agreement with scikit-learn, the Trainer hook."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, top_k_accuracy_score
from transformers import EvalPrediction

from hfplug.training.metrics import classification_scores, compute_metrics_for, top_k_accuracies


def sklearn_scores(preds, refs, labels=None):
    precision, recall, f1, _ = precision_recall_fscore_support(
        refs, preds, labels=labels, average="macro", zero_division=0
    )
    return {"accuracy": accuracy_score(refs, preds), "f1": f1, "precision": precision, "recall": recall}


# --- classification_scores / ClassificationMetrics -----------------------------------


def test_hand_computed_three_classes():
    refs = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # class 0: TP 1, predicted 2, actual 2 -> P 1/2, R 1/2, F1 1/2
    # class 1: TP 2, predicted 3, actual 2 -> P 2/3, R 1,   F1 4/5
    # class 2: TP 1, predicted 1, actual 2 -> P 1,   R 1/2, F1 2/3
    got = classification_scores(preds, refs)
    assert got == pytest.approx(
        {"accuracy": 4 / 6, "precision": (1 / 2 + 2 / 3 + 1) / 3, "recall": (1 / 2 + 1 + 1 / 2) / 3, "f1": 59 / 90}
    )


def test_classes_absent_from_predictions_or_references_count_zero_without_warnings():
    # class 1 is never predicted (no precision), class 2 never occurs (no recall)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            got = classification_scores([0, 0, 2], [0, 0, 1])
    assert got == pytest.approx({"accuracy": 2 / 3, "precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})


def test_perfect_and_all_wrong():
    assert classification_scores([3, 1, 2], [3, 1, 2]) == {"accuracy": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0}
    assert classification_scores([1, 0], [0, 1]) == {"accuracy": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_sklearn_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 40))
    n = int(rng.integers(1, 500))
    # Skewed predictions, so that some classes are never predicted.
    preds = np.minimum(rng.geometric(0.3, n) - 1, n_classes - 1)
    refs = rng.integers(0, n_classes, n)
    assert classification_scores(preds, refs) == pytest.approx(sklearn_scores(preds, refs))
    # An explicit label set: ids outside the data, and data ids outside the set.
    labels = rng.choice(n_classes + 5, size=int(rng.integers(1, n_classes + 5)), replace=False)
    assert classification_scores(preds, refs, labels=labels) == pytest.approx(sklearn_scores(preds, refs, labels))


def test_ipc_sized_input_agrees_with_sklearn():
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 637, 20_000)
    preds = np.where(rng.random(refs.size) < 0.6, refs, rng.integers(0, 637, refs.size))
    assert classification_scores(preds, refs) == pytest.approx(sklearn_scores(preds, refs))


def test_non_contiguous_and_negative_ids():
    preds, refs = [10, -3, 7, 7], [10, 7, -3, 7]
    assert classification_scores(preds, refs) == pytest.approx(sklearn_scores(preds, refs))


@pytest.mark.parametrize(
    "preds, refs, match",
    [
        ([0, 1], [0], "differ in length"),
        ([], [], "No examples"),
        ([0.5, 1.0], [0, 1], "integer class ids"),
        ([[0, 1]], [[0, 1]], "1-D"),
    ],
)
def test_bad_inputs(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        classification_scores(preds, refs)


# --- top_k_accuracies / TopKAccuracy ----------------------------------------------------


def test_top_k_hand_computed():
    scores = [
        [0.1, 0.5, 0.4],  # true 2: second best
        [0.7, 0.2, 0.1],  # true 0: best
        [0.1, 0.3, 0.6],  # true 0: third
    ]
    got = top_k_accuracies(scores, [2, 0, 0], k=(1, 2, 3))
    assert got == pytest.approx({"top1_accuracy": 1 / 3, "top2_accuracy": 2 / 3, "top3_accuracy": 1.0})


def test_top_k_larger_than_number_of_classes_is_clamped():
    got = top_k_accuracies([[0.9, 0.1], [0.9, 0.1]], [1, 0], k=(1, 5))
    assert got == {"top1_accuracy": 0.5, "top5_accuracy": 1.0}


def test_top1_equals_argmax_accuracy_even_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 3, size=(300, 6)).astype(np.float32)  # many ties
    refs = rng.integers(0, 6, 300)
    assert top_k_accuracies(scores, refs, k=[1])["top1_accuracy"] == pytest.approx(np.mean(scores.argmax(1) == refs))
    # Constant scores must not look perfect: ties do not favour the true class.
    assert top_k_accuracies(np.zeros((4, 5)), [1, 2, 3, 4], k=[1])["top1_accuracy"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_top_k_agrees_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(3, 50))
    scores = rng.normal(size=(400, n_classes))
    refs = rng.integers(0, n_classes, 400)
    got = top_k_accuracies(scores, refs, k=(1, 2, 5))
    for k in (1, 2, 5):
        expected = top_k_accuracy_score(refs, scores, k=min(k, n_classes), labels=np.arange(n_classes))
        assert got[f"top{k}_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("k", [0, -1, (), (1, 0), (1.5,), "5", (True,)])
def test_top_k_rejects_bad_k(k):
    with pytest.raises(ValueError, match="top_k must be"):
        top_k_accuracies([[0.1, 0.9]], [1], k=k)


def test_top_k_rejects_references_out_of_range():
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\)"):
        top_k_accuracies([[0.1, 0.9]], [2])


# --- compute_metrics_for -------------------------------------------------------------


def test_decision_metrics_from_eval_prediction():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [0.5, 0.2], [-1.0, 1.0]])
    labels = np.array([0, 1, 1, 1])
    got = compute_metrics_for("decision")(EvalPrediction(predictions=logits, label_ids=labels))
    assert set(got) == {"accuracy", "f1", "precision", "recall"}
    assert got == pytest.approx(sklearn_scores(logits.argmax(1), labels))
    assert all(type(v) is float for v in got.values())  # JSON-serialisable, no numpy scalars


def test_ipc_metrics_take_first_element_of_tuple_predictions():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(64, 12)).astype(np.float32)
    labels = rng.integers(0, 12, 64)
    hidden = rng.normal(size=(64, 4))
    got = compute_metrics_for("ipc")(EvalPrediction(predictions=(logits, hidden), label_ids=labels))
    assert set(got) == {"accuracy", "f1", "precision", "recall", "top1_accuracy", "top5_accuracy"}
    assert got["top1_accuracy"] == pytest.approx(got["accuracy"])
    assert got["top5_accuracy"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=np.arange(12)))


def test_custom_top_k_keys():
    fn = compute_metrics_for("ipc", top_k=(1, 3, 10))
    got = fn(EvalPrediction(predictions=np.eye(4), label_ids=np.arange(4)))
    assert {"top1_accuracy", "top3_accuracy", "top10_accuracy"} <= set(got)
    assert "top5_accuracy" not in got


def test_unknown_task_lists_allowed_ones():
    with pytest.raises(ValueError, match=r"Unknown task 'cpc'\. Allowed: decision, ipc"):
        compute_metrics_for("cpc")


def test_bad_top_k_fails_when_building_the_hook():
    with pytest.raises(ValueError, match="top_k must be"):
        compute_metrics_for("ipc", top_k=(0,))


# --- ROUGE and perplexity (--task abstract) ------------------------------------------


def test_rouge_hand_computed():
    from hfplug.training.metrics import rouge_scores

    # 1-grams: P 3/3, R 3/4 -> F1 6/7; 2-grams: P 2/2, R 2/3 -> F1 4/5; LCS 3 -> F1 6/7.
    expected = {"rouge1": 6 / 7, "rouge2": 4 / 5, "rougeL": 6 / 7}
    assert rouge_scores(["the cat sat"], ["The cat sat down."]) == pytest.approx(expected)
    # Mean over pairs; nothing in common (or nothing at all) scores 0.
    assert rouge_scores(["the cat sat", "dog", ""], ["the cat sat down", "cat", ""]) == pytest.approx(
        {k: v / 3 for k, v in expected.items()}
    )


def test_rouge_tokenization_and_order():
    from hfplug.training.metrics import rouge_scores

    # rouge_score's tokenizer: lower-case, anything but a-z0-9 splits (non-ASCII letters too).
    assert rouge_scores(["dog s caf 42 a"], ["Dog's café-42!  A"]) == pytest.approx(
        dict.fromkeys(("rouge1", "rouge2", "rougeL"), 1.0)
    )
    # ROUGE-L of a reordering: LCS "a c" of 3 tokens each -> 2/3.
    assert rouge_scores(["a b c"], ["a c b"])["rougeL"] == pytest.approx(2 / 3)


def test_rouge_bad_inputs():
    from hfplug.training.metrics import rouge_scores

    with pytest.raises(ValueError, match="differ in length: 1 vs 2"):
        rouge_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        rouge_scores([], [])


def test_perplexity():
    from hfplug.training.metrics import perplexity

    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(np.exp(2.0))
    assert perplexity(1e4) == float("inf")  # not an OverflowError mid-training


def test_abstract_has_no_logits_metrics():
    assert compute_metrics_for("abstract") is None
