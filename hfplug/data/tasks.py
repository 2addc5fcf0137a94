"""HUPD tasks: which records a task keeps, their labels, and the text a model reads.

- ``decision``: patent acceptance prediction, the HUPD paper's setup: ACCEPTED -> 1,
  REJECTED -> 0; every other decision (CONT-ACCEPTED, CONT-REJECTED, PENDING,
  CONT-PENDING) is dropped.
- ``ipc``: the main IPC subclass (first 4 characters of ``ipc_label``, e.g. ``G06F``).
  The label set comes from the training split; validation records whose subclass
  never occurs in training cannot be predicted, so they are dropped and counted.
- ``abstract``: write the abstract from the claims (the HUPD paper's summarization
  task) as a chat: the user turn is an instruction and the claims (or the sections named by
  ``text_fields``), the assistant turn is the abstract. Records with an empty abstract
  or an empty source section are dropped and counted. Examples are encoded through
  ``hfplug.chat.format.ChatFormat`` with the loss on the reply only; claims are cut
  to fit ``max_length`` so the abstract and its end-of-turn token stay whole.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets import DatasetDict, IterableDataset, IterableDatasetDict

logger = logging.getLogger(__name__)

TASKS = ("decision", "ipc", "abstract")
GENERATIVE_TASKS = ("abstract",)  # causal-LM fine-tuning through a chat format
# The sections of an application a model can read: the values --text_fields picks from.
TEXT_FIELDS = ("title", "abstract", "claims", "background", "summary", "description")
# What the model reads when --text_fields is not given.
DEFAULT_TEXT_FIELDS = {"decision": "title,abstract", "ipc": "title,abstract", "abstract": "claims"}
# How a text field is introduced inside an abstract prompt.
TEXT_FIELD_TITLES = {
    "title": "Title",
    "claims": "Claims",
    "background": "Background",
    "summary": "Summary",
    "description": "Description",
}
# The field each task learns from besides its text fields: the label, or for abstract the text it writes.
LABEL_FIELDS = {"decision": "decision", "ipc": "ipc_label", "abstract": "abstract"}
IGNORE_INDEX = -100  # labels the loss skips (PyTorch's cross-entropy default)
DECISION_LABELS = ("REJECTED", "ACCEPTED")  # index = label id
IPC_SUBCLASS_CHARS = 4


def parse_text_fields(value: str | Sequence[str]) -> list[str]:
    """``"title,abstract"`` or ``["title", "abstract"]`` -> validated, ordered text field names."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"text_fields is empty; pick one or more of {', '.join(TEXT_FIELDS)} (e.g. title,abstract).")
    unknown = [n for n in names if n not in TEXT_FIELDS]
    if unknown:
        raise ValueError(
            f"Unknown section(s) in text_fields: {', '.join(unknown)}. Allowed: {', '.join(TEXT_FIELDS)}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"text_fields lists a section twice: {','.join(names)}.")
    return names


def task_columns(task: str, text_fields: str | Sequence[str] | None = None) -> list[str]:
    """The HUPD fields ``task`` reads: its ``text_fields`` (default: the task's) and :data:`LABEL_FIELDS`.

    ``load_hupd(columns=task_columns(task, text_fields))`` caches only these (and the few fields
    it always keeps), e.g. ``["title", "abstract", "decision"]`` for ``decision``.
    """
    fields = parse_text_fields(text_fields or DEFAULT_TEXT_FIELDS[check_task(task)])
    return list(dict.fromkeys([*fields, LABEL_FIELDS[task]]))


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Allowed: {', '.join(TASKS)}.")
    return task


def is_generative(task: str) -> bool:
    """Whether ``task`` fine-tunes a causal LM to write text (rather than a classifier)."""
    return check_task(task) in GENERATIVE_TASKS


def check_abstract_sources(text_fields: str | Sequence[str]) -> list[str]:
    """The text fields an abstract is written from; the abstract itself cannot be one of them."""
    names = parse_text_fields(text_fields)
    if "abstract" in names:
        raise ValueError(
            f"--task abstract writes the abstract, so text_fields cannot include it (got {','.join(names)}). "
            "Use --text_fields claims (the HUPD paper's summarization input) or other sections: "
            f"{', '.join(s for s in TEXT_FIELDS if s != 'abstract')}."
        )
    return names


@dataclass
class TaskData:
    """A task's splits and what was dropped on the way.

    Classification tasks' splits carry an int ``label`` column and ``label_names``;
    the generative ``abstract`` task has no labels (``label_names == []``).
    """

    splits: DatasetDict | IterableDatasetDict
    label_names: list[str]
    dropped: dict[str, int] = field(default_factory=dict)  # split -> records dropped (not counted when streaming)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def limit(self, max_train_samples: int | None = None, max_eval_samples: int | None = None) -> None:
        """Keep only the first N records of the train / validation splits (quick runs)."""
        for name, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
            if limit is not None and name in self.splits:
                split = self.splits[name]
                self.splits[name] = (
                    split.take(limit)
                    if isinstance(split, IterableDataset)
                    else split.select(range(min(limit, len(split))))
                )

    def add_dropped(self, counts: dict[str, int]) -> None:
        """Add records dropped at a later stage (e.g. too long to tokenize) to ``dropped``."""
        for name, n in counts.items():
            if n:
                self.dropped[name] = self.dropped.get(name, 0) + n


def ipc_subclass(ipc_label: str | None) -> str:
    return (ipc_label or "").strip()[:IPC_SUBCLASS_CHARS]


def prepare_task(
    splits: DatasetDict | IterableDatasetDict, task: str, *, text_fields: str | Sequence[str] | None = None
) -> TaskData:
    """Keep the records ``task`` uses and, for classification, add its int ``label`` column.

    Labels are computed from one column and attached with ``add_column`` + a
    ``filter`` on the label, so the (large) text columns are never rewritten.
    ``text_fields`` (``"claims,title"`` or a list) matters for ``abstract`` only: what the abstract
    is written from (default: claims); records where one of them or the abstract is empty are dropped.
    """
    check_task(task)
    if task in GENERATIVE_TASKS:
        return _prepare_abstract(splits, check_abstract_sources(text_fields or DEFAULT_TEXT_FIELDS[task]))
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


def _prepare_abstract(splits: DatasetDict | IterableDatasetDict, sources: list[str]) -> TaskData:
    """Keep the records that have the abstract and every source section (non-blank)."""
    streaming = isinstance(splits, IterableDatasetDict)
    needed = [*sources, "abstract"]
    complete = lambda *columns: [all((v or "").strip() for v in row) for row in zip(*columns)]  # noqa: E731
    kept, dropped = {}, {}
    for name, split in splits.items():
        kept[name] = split.filter(complete, input_columns=needed, batched=True)
        if not streaming and len(kept[name]) < len(split):
            dropped[name] = len(split) - len(kept[name])
            logger.warning(
                "--task abstract: dropped %d of %d %s record(s): empty %s.",
                dropped[name],
                len(split),
                name,
                " or ".join(needed),
            )
    kept = IterableDatasetDict(kept) if streaming else DatasetDict(kept)
    if not streaming and "train" in kept and len(kept["train"]) == 0:
        raise ValueError(f"No training records left for --task abstract: none has a non-empty {' and '.join(needed)}.")
    return TaskData(kept, [], dropped)


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


def join_text_fields(batch: dict, text_fields: Sequence[str], separator: str) -> list[str]:
    """Join the ``text_fields`` of each record in a batch, in order, skipping empty ones."""
    n = len(batch[text_fields[0]])
    return [separator.join(s for f in text_fields if (s := (batch[f][i] or "").strip())) for i in range(n)]


def tokenize_splits(
    splits: DatasetDict | IterableDatasetDict,
    tokenizer,
    *,
    text_fields: str | Sequence[str],
    max_length: int,
    add_length: bool = False,
    num_proc: int | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Tokenize once, with ``map(batched=True)``, truncating to ``max_length`` and *not* padding.

    The model reads ``text_fields`` (``"title,abstract"`` or a list), joined in that order.
    Padding happens per batch in the collator, so a batch of short abstracts is not
    padded to 512. ``add_length`` stores each example's token count in ``length``
    for ``train_sampling_strategy="group_by_length"``.
    """
    text_fields = parse_text_fields(text_fields)
    # A visible boundary between text fields: [SEP] for BERT-like tokenizers, a blank line otherwise.
    separator = f" {tokenizer.sep_token} " if tokenizer.sep_token else "\n\n"

    def encode(batch):
        enc = tokenizer(join_text_fields(batch, text_fields, separator), truncation=True, max_length=max_length)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "label": batch["label"]}
        if add_length:
            out["length"] = [len(ids) for ids in enc["input_ids"]]
        return out

    some_split = next(iter(splits.values()))
    columns = list(some_split.features) if some_split.features is not None else None
    kwargs = {} if isinstance(splits, IterableDatasetDict) else {"num_proc": num_proc, "desc": "Tokenizing"}
    return splits.map(encode, batched=True, remove_columns=columns, **kwargs)


# --- abstract: chat examples ---------------------------------------------------------


def abstract_instruction(sources: Sequence[str]) -> str:
    """The instruction that opens every abstract prompt, naming the text fields that follow."""
    listed = sources[0] if len(sources) == 1 else f"{', '.join(sources[:-1])} and {sources[-1]}"
    return f"Write the abstract of a patent application from its {listed}."


def _titled_text(texts: dict[str, str]) -> str:
    return "\n\n".join(f"{TEXT_FIELD_TITLES[name]}:\n{text.strip()}" for name, text in texts.items())


def abstract_prompt(texts: dict[str, str]) -> str:
    """The user turn of an abstract example: the instruction, then each text field under its title.

    ``texts`` maps text field names (in order) to their text. To get the trained behaviour
    from ``recipes/chat.py``, send exactly this, e.g. ``abstract_prompt({"claims": text})``.
    """
    return f"{abstract_instruction(list(texts))}\n\n{_titled_text(texts)}"


def abstract_messages(prompt: str, abstract: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": abstract}]


def encode_abstract_example(chat_format, texts: dict[str, str], abstract: str, max_length: int):
    """``(input_ids, labels)`` of one abstract example in at most ``max_length`` tokens, or ``None``.

    ``labels`` are the input ids on the assistant's reply, its end-of-turn token included
    (so the model learns to stop), and ``IGNORE_INDEX`` elsewhere. When the example is too
    long, the end of the source text is cut: the abstract is what the model learns to
    write, so it stays whole. ``None`` when the instruction and the abstract alone leave
    no room for any source text (the caller counts the drop).
    """
    tokenizer = chat_format.tokenizer
    instruction, body = abstract_instruction(list(texts)), _titled_text(texts)
    # verbose=False: a long body is expected here (it gets cut), not a mistake to warn about.
    body_ids = tokenizer(body, add_special_tokens=False, verbose=False)["input_ids"]
    # Everything but the body: template, instruction, abstract and end-of-turn token.
    fixed = len(chat_format.encode(abstract_messages(instruction, abstract)))
    keep = min(len(body_ids), max_length - fixed)
    while keep > 0:
        text = (
            body if keep == len(body_ids) else tokenizer.decode(body_ids[:keep]).rstrip("\ufffd")
        )  # no half character
        ids, mask = chat_format.encode_with_assistant_mask(abstract_messages(f"{instruction}\n\n{text}", abstract))
        over = len(ids) - max_length
        if over <= 0:
            return ids, [token if m else IGNORE_INDEX for token, m in zip(ids, mask)]
        keep -= over  # tokens do not add up exactly across the cut and the joins: cut more and re-check
    return None


def tokenize_abstract_splits(
    splits: DatasetDict | IterableDatasetDict,
    chat_format,
    *,
    text_fields: str | Sequence[str],
    max_length: int,
    add_length: bool = False,
    num_proc: int | None = None,
) -> tuple[DatasetDict | IterableDatasetDict, dict[str, int]]:
    """Encode ``abstract`` records as chat examples: ``input_ids``, ``attention_mask``, ``labels``.

    Labels are computed here, in ``map``, so the collator only pads. Returns the encoded
    splits and, per split, how many records were dropped because their abstract alone
    fills ``max_length`` (not counted when streaming). ``chat_format`` is a
    ``hfplug.chat.format.ChatFormat``; give it a fixed ``date_string`` (see
    ``hfplug.training.chat_setup.training_chat_format``) so the same records encode the same every day.
    """
    sources = check_abstract_sources(text_fields)

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for i, abstract in enumerate(batch["abstract"]):
            texts = {name: batch[name][i] for name in sources}
            example = encode_abstract_example(chat_format, texts, abstract.strip(), max_length)
            if example is None:
                continue
            ids, labels = example
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        if add_length:
            out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    some_split = next(iter(splits.values()))
    columns = list(some_split.features) if some_split.features is not None else None
    streaming = isinstance(splits, IterableDatasetDict)
    kwargs = {} if streaming else {"num_proc": num_proc, "desc": "Tokenizing"}
    encoded = splits.map(encode, batched=True, remove_columns=columns, **kwargs)
    too_long = {}
    if not streaming:
        for name in splits:
            too_long[name] = len(splits[name]) - len(encoded[name])
            if too_long[name]:
                logger.warning(
                    "--task abstract: dropped %d of %d %s record(s): the abstract alone does not fit "
                    "max_length=%d (raise --max_length to keep them).",
                    too_long[name],
                    len(splits[name]),
                    name,
                    max_length,
                )
    return encoded, too_long
