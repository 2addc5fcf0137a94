"""HUPD data: the loader, task labels, tokenization and collators."""

from hfplug.data.collate import padding_collator
from hfplug.data.hupd import load_hupd
from hfplug.data.tasks import TASKS, TEXT_FIELDS, TaskData, parse_text_fields, prepare_task, tokenize_splits

__all__ = [
    "TASKS",
    "TEXT_FIELDS",
    "TaskData",
    "load_hupd",
    "padding_collator",
    "parse_text_fields",
    "prepare_task",
    "tokenize_splits",
]
