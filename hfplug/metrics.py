"""Offline metrics: classification for ``Trainer(compute_metrics=...)``, ROUGE and perplexity for generation.

``evaluate.load("accuracy")`` fetches the metric script from the Hub and fails
offline, so the metrics are ``evaluate.Metric`` subclasses defined here, over
plain numpy functions that do the math in a few vectorised passes (IPC has ~600
classes and tens of thousands of rows).

    ClassificationMetrics().compute(predictions=[0, 1, 1], references=[0, 1, 0])
    # accuracy 2/3, f1 2/3, precision 0.75, recall 0.75
    compute_metrics_for("ipc")  # -> Trainer(compute_metrics=...)

Macro averages follow scikit-learn's ``average="macro", zero_division=0``: the
classes averaged over are those that occur in the predictions or the references
(or the ``labels`` you pass), and a ratio whose denominator is zero (a class never
predicted has no precision, a class never present has no recall) counts as 0.

ROUGE-1/2/L (F1) follows Google's ``rouge_score`` package with its defaults (no
stemming): lower-case, every run of characters other than ``a-z0-9`` splits tokens,
ROUGE-N counts clipped n-gram matches, ROUGE-L uses the longest common subsequence
of the whole text. Scores are averaged over the pairs (``rouge_score``'s bootstrap
aggregator, which ``evaluate.load("rouge")`` uses, reports a resampled median of
means instead: close to the plain mean, but random).

    Rouge().compute(predictions=["the cat sat"], references=["the cat sat down"])
    # rouge1 6/7, rouge2 4/5, rougeL 6/7
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import datasets
import evaluate
import numpy as np
from transformers import EvalPrediction

from hfplug.data.tasks import GENERATIVE_TASKS, TASKS  # generative ones are scored by hfplug.generation

# Tasks with many classes also get top-k accuracy.
TOP_K_TASKS = ("ipc",)
DEFAULT_TOP_K = (1, 5)


# --- numpy math -------------------------------------------------------------


def _as_class_ids(values, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array, or a ValueError saying what was wrong."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class ids, got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}.")
    return array.astype(np.int64, copy=False)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio with 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def classification_scores(predictions, references, labels: Sequence[int] | None = None) -> dict[str, float]:
    """Accuracy and macro F1 / precision / recall of int class ids.

    ``labels`` picks the classes the macro averages run over (default: every class
    seen in ``predictions`` or ``references``); accuracy always covers all rows.
    """
    preds = _as_class_ids(predictions, "predictions")
    refs = _as_class_ids(references, "references")
    if preds.shape != refs.shape:
        raise ValueError(f"predictions and references differ in length: {preds.size} vs {refs.size}.")
    if preds.size == 0:
        raise ValueError("No examples: predictions and references are empty.")

    classes = np.union1d(preds, refs) if labels is None else np.unique(_as_class_ids(labels, "labels"))
    if classes.size == 0:
        raise ValueError("labels is empty; pass at least one class id or leave it as None.")
    # Map ids to 0..C-1 columns; ids outside ``classes`` get column C, a spill-over
    # bin dropped before averaging (so they still count as errors of the true class).
    n = classes.size
    pred_col = _column_of(preds, classes)
    ref_col = _column_of(refs, classes)
    hits = preds == refs
    true_pos = np.bincount(ref_col[hits], minlength=n + 1)[:n]
    predicted = np.bincount(pred_col, minlength=n + 1)[:n]
    actual = np.bincount(ref_col, minlength=n + 1)[:n]

    precision = _safe_divide(true_pos, predicted)
    recall = _safe_divide(true_pos, actual)
    # 2TP / (2TP + FP + FN): equal to the harmonic mean of P and R, and 0 when both are.
    f1 = _safe_divide(2 * true_pos, predicted + actual)
    return {
        "accuracy": float(hits.mean()),
        "f1": float(f1.mean()),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
    }


def _column_of(ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Column of each id in the sorted ``classes``; ``len(classes)`` for ids not in it."""
    cols = np.searchsorted(classes, ids)
    clipped = np.minimum(cols, classes.size - 1)
    return np.where(classes[clipped] == ids, cols, classes.size)


def check_top_k(k: Iterable[int]) -> tuple[int, ...]:
    """``k`` as a tuple of positive ints, or a ValueError naming what was given."""
    values = (k,) if isinstance(k, (int, np.integer)) else tuple(k)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise ValueError(f"top_k must be one or more positive ints such as (1, 5), got {k!r}.")
    return tuple(int(v) for v in values)


def top_k_accuracies(scores, references, k: Iterable[int] = DEFAULT_TOP_K) -> dict[str, float]:
    """``top{k}_accuracy`` for each k: the share of rows whose true class is among the k best scores.

    A k above the number of classes is clamped to it (so it scores 1.0); the key keeps
    the k asked for. Ties rank the lower class id first, like ``argmax``, so
    ``top1_accuracy`` equals the accuracy of ``argmax`` predictions.
    """
    ks = check_top_k(k)
    scores = np.asarray(scores)
    refs = _as_class_ids(references, "references")
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (examples x classes), got shape {scores.shape}.")
    n_rows, n_classes = scores.shape
    if n_rows != refs.size:
        raise ValueError(f"scores and references differ in length: {n_rows} vs {refs.size}.")
    if n_rows == 0:
        raise ValueError("No examples: scores and references are empty.")
    if refs.min() < 0 or refs.max() >= n_classes:
        raise ValueError(f"references must be class ids in [0, {n_classes}), got values in [{refs.min()}, {refs.max()}].")

    # The true class's rank (0 = best) is the number of classes that beat it: a higher
    # score, or an equal score at a lower id. One pass serves every k, and unlike a
    # sort it costs O(rows x classes).
    true_scores = scores[np.arange(n_rows), refs][:, None]
    lower_id = np.arange(n_classes)[None, :] < refs[:, None]
    rank = np.count_nonzero((scores > true_scores) | ((scores == true_scores) & lower_id), axis=1)
    return {f"top{k_}_accuracy": float(np.mean(rank < min(k_, n_classes))) for k_ in ks}


# --- evaluate.Metric wrappers ---------------------------------------------------


class ClassificationMetrics(evaluate.Metric):
    """Accuracy plus macro F1, precision and recall of int class ids (zero_division = 0).

    ``compute(predictions=..., references=..., labels=None)``; see
    :func:`classification_scores`.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy and macro-averaged F1, precision and recall; 0 where a class has no predictions or no references.",
            citation="",
            inputs_description="predictions, references: int class ids; labels (optional): the classes to average over.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(self, predictions, references, labels: Sequence[int] | None = None) -> dict[str, float]:
        return classification_scores(predictions, references, labels=labels)


class TopKAccuracy(evaluate.Metric):
    """Top-k accuracy from per-example score vectors (logits or probabilities).

    ``compute(predictions=scores, references=ids, k=(1, 5))`` returns
    ``{"top1_accuracy": ..., "top5_accuracy": ...}``; see :func:`top_k_accuracies`.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Share of examples whose true class is among the k highest scores; k above the class count is clamped.",
            citation="",
            inputs_description="predictions: a score per class for each example; references: int class ids; k: ints.",
            features=datasets.Features(
                {"predictions": datasets.List(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k: Iterable[int] = DEFAULT_TOP_K) -> dict[str, float]:
        return top_k_accuracies(np.asarray(predictions, dtype=np.float32), references, k=k)


# --- ROUGE and perplexity (generation) -----------------------------------------------

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_LOG_FLOAT_MAX = math.log(sys.float_info.max)  # ~709.8: exp() of more overflows
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """``rouge_score``'s default tokenizer: lower-case, split on anything but ``a-z0-9``."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def _f1(overlap: int, predicted: int, reference: int) -> float:
    precision = overlap / predicted if predicted else 0.0
    recall = overlap / reference if reference else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(prediction: list[str], reference: list[str], n: int) -> float:
    """ROUGE-N F1 of two token lists: n-gram matches, each clipped to its count in the other text."""
    pred, ref = _ngrams(prediction, n), _ngrams(reference, n)
    overlap = sum(min(count, pred[gram]) for gram, count in ref.items())
    return _f1(overlap, sum(pred.values()), sum(ref.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row at a time."""
    if len(a) < len(b):
        a, b = b, a  # the row follows the shorter list
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: list[str], reference: list[str]) -> float:
    """ROUGE-L F1: the longest common subsequence over the prediction's and the reference's lengths."""
    return _f1(lcs_length(prediction, reference), len(prediction), len(reference))


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over prediction/reference pairs (see the module docstring)."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} vs {len(references)}.")
    if not predictions:
        raise ValueError("No examples: predictions and references are empty.")
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        pred, ref = rouge_tokenize(prediction), rouge_tokenize(reference)
        totals["rouge1"] += rouge_n(pred, ref, 1)
        totals["rouge2"] += rouge_n(pred, ref, 2)
        totals["rougeL"] += rouge_l(pred, ref)
    return {key: value / len(predictions) for key, value in totals.items()}


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy (nats); ``inf`` where that overflows a float."""
    return math.exp(loss) if loss < _LOG_FLOAT_MAX else float("inf")


class Rouge(evaluate.Metric):
    """ROUGE-1/2/L F1 of generated texts against references, offline (no ``rouge_score`` needed).

    ``compute(predictions=[...], references=[...])`` returns ``{"rouge1", "rouge2", "rougeL"}``;
    see :func:`rouge_scores`.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge_score's tokenization, no stemming).",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions, references: one text each per example.",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return rouge_scores(predictions, references)


# --- Trainer hook ----------------------------------------------------------------


def compute_metrics_for(task: str, *, top_k: Iterable[int] = DEFAULT_TOP_K) -> Callable[[EvalPrediction], dict[str, float]] | None:
    """A ``compute_metrics`` function for ``Trainer`` on an hfplug task; ``None`` for ``abstract``.

    "decision": accuracy, f1, precision, recall (macro). "ipc": the same plus
    ``top{k}_accuracy`` for each k in ``top_k``. "abstract" has nothing to compute from
    logits (and gathering batch x sequence x vocabulary logits would take gigabytes):
    its perplexity and ROUGE come from ``hfplug.generation.GenerativeTrainer``.

    It calls the numpy functions directly rather than ``Metric.compute``: the
    latter round-trips inputs through Arrow, which takes seconds per evaluation for
    IPC's examples x ~600 scores.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Allowed: {', '.join(TASKS)}.")
    if task in GENERATIVE_TASKS:
        return None
    ks = check_top_k(top_k)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits, label_ids = eval_pred.predictions, eval_pred.label_ids
        # Models that also return hidden states or attentions hand over a tuple; logits come first.
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = np.asarray(logits)
        label_ids = np.asarray(label_ids).reshape(-1)
        metrics = classification_scores(logits.argmax(axis=-1), label_ids)
        if task in TOP_K_TASKS:
            metrics.update(top_k_accuracies(logits, label_ids, k=ks))
        return metrics

    return compute_metrics
