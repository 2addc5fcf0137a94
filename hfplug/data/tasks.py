"""HUPD tasks: which records a task keeps, their labels, and the text a model reads.

- ``decision``: patent acceptance prediction, the HUPD paper's setup: ACCEPTED -> 1,
  REJECTED -> 0; every other decision (CONT-ACCEPTED, CONT-REJECTED, PENDING,
  CONT-PENDING) is dropped.
- ``ipc``: the main IPC subclass (first 4 characters of ``ipc_label``, e.g. ``G06F``).
  The label set comes from the training split; validation records whose subclass
  never occurs in training cannot be predicted, so they are dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

from datasets import DatasetDict, IterableDataset, IterableDatasetDict

logger = logging.getLogger(__name__)

TASKS = ("decision", "ipc")
SECTIONS = ("title", "abstract", "claims", "background", "summary", "description")
DECISION_LABELS = ("REJECTED", "ACCEPTED")  # index = label id
IPC_SUBCLASS_CHARS = 4


def parse_text_fields(value: str | Sequence[str]) -> list[str]:
    """``"title,abstract"`` or ``["title", "abstract"]`` -> validated, ordered section names."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"text_fields is empty; pick one or more of {', '.join(SECTIONS)} (e.g. title,abstract).")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"Unknown section(s) in text_fields: {', '.join(unknown)}. Allowed: {', '.join(SECTIONS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"text_fields lists a section twice: {','.join(names)}.")
    return names


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Allowed: {', '.join(TASKS)}.")
    return task


@dataclass
class TaskData:
    """A task's splits (each with an int ``label`` column) and what was dropped on the way."""

    splits: DatasetDict | IterableDatasetDict
    label_names: list[str]
    dropped: dict[str, int] = field(default_factory=dict)  # split -> records dropped (not counted when streaming)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def ipc_subclass(ipc_label: str | None) -> str:
    return (ipc_label or "").strip()[:IPC_SUBCLASS_CHARS]


def prepare_task(splits: DatasetDict | IterableDatasetDict, task: str) -> TaskData:
    """Keep the records ``task`` uses and add its int ``label`` column.

    Labels are computed from one column and attached with ``add_column`` + a
    ``filter`` on the label, so the (large) text columns are never rewritten.
    """
    check_task(task)
    streaming = isinstance(splits, IterableDatasetDict)
    if task == "decision":
        label_names = list(DECISION_LABELS)
        source = "decision"
        label_of = {name: i for i, name in enumerate(label_names)}
        to_label = lambda decision: label_of.get(decision, -1)  # noqa: E731
        reasons = {"train": "other decisions (CONT-*, PENDING)", "validation": "other decisions (CONT-*, PENDING)"}
    else:
        train_labels = {ipc_subclass(v) for v in _column(splits["train"], "ipc_label")} - {""}
        if len(train_labels) < 2:
            raise ValueError(
                f"--task ipc needs at least 2 IPC subclasses in the training split; found {len(train_labels)} "
                f"({', '.join(sorted(train_labels)) or 'none'}). "
                "Widen the selection (filing dates, ipcr_label/cpc_label prefix, query)."
            )
        label_names = sorted(train_labels)
        source = "ipc_label"
        label_of = {name: i for i, name in enumerate(label_names)}
        to_label = lambda ipc: label_of.get(ipc_subclass(ipc), -1)  # noqa: E731
        reasons = {"train": "no IPC label", "validation": "IPC subclass not seen in training (cannot be predicted)"}

    kept, dropped = {}, {}
    for name, split in splits.items():
        kept[name], n_dropped = _attach_labels(split, source, to_label)
        if n_dropped:
            reason = reasons.get(name, reasons["train"])
            dropped[name] = n_dropped
            logger.warning("--task %s: dropped %d of %d %s record(s): %s.", task, n_dropped, len(split), name, reason)
    kept = IterableDatasetDict(kept) if streaming else DatasetDict(kept)
    if not streaming and "train" in kept and len(kept["train"]) == 0:
        raise ValueError(f"No training records left for --task {task} after filtering; widen the selection.")
    return TaskData(kept, label_names, dropped)


def _column(split, name: str):
    """All values of one column; for a streaming split this reads the split once."""
    if isinstance(split, IterableDataset):
        return [row[name] for row in split.select_columns([name])]
    return split[name]


def _attach_labels(split, source: str, to_label) -> tuple:
    """Add ``label`` (``to_label(record[source])``, -1 = drop) and drop the -1s. Returns (split, dropped count)."""
    keep = lambda labels: [label >= 0 for label in labels]  # noqa: E731
    if isinstance(split, IterableDataset):  # lazy: nothing to count up front
        labelled = split.map(lambda b: {"label": [to_label(v) for v in b[source]]}, batched=True)
        return labelled.filter(keep, input_columns="label", batched=True), 0
    labels = [to_label(v) for v in split[source]]
    labelled = split.add_column("label", labels).filter(keep, input_columns="label", batched=True)
    return labelled, len(split) - len(labelled)


def join_sections(batch: dict, text_fields: Sequence[str], separator: str) -> list[str]:
    """Join the chosen sections of each record in a batch, skipping empty ones."""
    n = len(batch[text_fields[0]])
    return [separator.join(s for f in text_fields if (s := (batch[f][i] or "").strip())) for i in range(n)]


def tokenize_splits(
    splits: DatasetDict | IterableDatasetDict,
    tokenizer,
    *,
    text_fields: Sequence[str],
    max_length: int,
    add_length: bool = False,
    num_proc: int | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Tokenize once, with ``map(batched=True)``, truncating to ``max_length`` and *not* padding.

    Padding happens per batch in the collator, so a batch of short abstracts is not
    padded to 512. ``add_length`` stores each example's token count in ``length``
    for ``train_sampling_strategy="group_by_length"``.
    """
    # A visible boundary between sections: [SEP] for BERT-like tokenizers, a blank line otherwise.
    separator = f" {tokenizer.sep_token} " if tokenizer.sep_token else "\n\n"

    def encode(batch):
        enc = tokenizer(join_sections(batch, text_fields, separator), truncation=True, max_length=max_length)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "label": batch["label"]}
        if add_length:
            out["length"] = [len(ids) for ids in enc["input_ids"]]
        return out

    some_split = next(iter(splits.values()))
    columns = list(some_split.features) if some_split.features is not None else None
    kwargs = {} if isinstance(splits, IterableDatasetDict) else {"num_proc": num_proc, "desc": "Tokenizing"}
    return splits.map(encode, batched=True, remove_columns=columns, **kwargs)
