"""Offline metrics: classification for ``Trainer(compute_metrics=...)``, ROUGE and perplexity for generation.

Computed with kept libraries, offline (``evaluate.load`` fetches its scripts from the Hub):
accuracy and macro F1 / precision / recall with scikit-learn (``average="macro",
zero_division=0``: the classes averaged over are those in the predictions or the
references, or the ``labels`` you pass; a ratio with a zero denominator counts as 0), and
ROUGE-1/2/L F1 with Google's ``rouge_score`` (its defaults, no stemming), averaged over
the pairs (``evaluate``'s "rouge" reports a bootstrap median of means instead: close, but random).

Top-k accuracy is the one piece computed here: scikit-learn's ``top_k_accuracy_score``
sorts every row: on IPC-sized input (20,000 rows x 637 classes) top-1 + top-5 take 2.1 s,
against 0.06 s for the rank count below (``python benchmarks/metrics_speed.py``, 2026-11-25, 2-core CPU).

    classification_scores([0, 1, 1], [0, 1, 0])  # accuracy 2/3, f1 2/3, precision 0.75, recall 0.75
    compute_metrics_for("ipc")  # -> Trainer(compute_metrics=...)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from transformers import EvalPrediction

from hfplug.data.tasks import GENERATIVE_TASKS, TASKS  # generative ones are scored by hfplug.training.generation

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

    if labels is not None and not np.size(labels):
        raise ValueError("labels is empty; pass at least one class id or leave it as None.")
    precision, recall, f1, _ = precision_recall_fscore_support(
        refs,
        preds,
        labels=None if labels is None else _as_class_ids(labels, "labels"),
        average="macro",
        zero_division=0,
    )
    return {
        "accuracy": float(accuracy_score(refs, preds)),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
    }


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
        raise ValueError(
            f"references must be class ids in [0, {n_classes}), got values in [{refs.min()}, {refs.max()}]."
        )

    # The true class's rank (0 = best) is the number of classes that beat it: a higher
    # score, or an equal score at a lower id. One pass serves every k, and unlike a
    # sort it costs O(rows x classes).
    true_scores = scores[np.arange(n_rows), refs][:, None]
    lower_id = np.arange(n_classes)[None, :] < refs[:, None]
    rank = np.count_nonzero((scores > true_scores) | ((scores == true_scores) & lower_id), axis=1)
    return {f"top{k_}_accuracy": float(np.mean(rank < min(k_, n_classes))) for k_ in ks}


# --- ROUGE and perplexity (generation) -----------------------------------------------

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_LOG_FLOAT_MAX = math.log(sys.float_info.max)  # ~709.8: exp() of more overflows


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over prediction/reference pairs (``rouge_score``, no stemming)."""
    from rouge_score.rouge_scorer import RougeScorer  # imports nltk: only runs that generate pay for it

    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} vs {len(references)}.")
    if not predictions:
        raise ValueError("No examples: predictions and references are empty.")
    scorer = RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {key: float(np.mean([score[key].fmeasure for score in scores])) for key in ROUGE_KEYS}


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy (nats); ``inf`` where that overflows a float."""
    return math.exp(loss) if loss < _LOG_FLOAT_MAX else float("inf")


# --- Trainer hook ----------------------------------------------------------------


def compute_metrics_for(
    task: str, *, top_k: Iterable[int] = DEFAULT_TOP_K
) -> Callable[[EvalPrediction], dict[str, float]] | None:
    """A ``compute_metrics`` function for ``Trainer`` on an hfplug task; ``None`` for ``abstract``.

    "decision": accuracy, f1, precision, recall (macro). "ipc": the same plus
    ``top{k}_accuracy`` for each k in ``top_k``. "abstract" has nothing to compute from
    logits (and gathering batch x sequence x vocabulary logits would take gigabytes):
    its perplexity and ROUGE come from ``hfplug.training.generation.GenerativeTrainer``.

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
