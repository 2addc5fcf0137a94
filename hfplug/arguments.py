"""Dataclass arguments shared by the recipes (beside ``transformers.TrainingArguments``
and ``hfplug.model_args.ModelArguments``).

Field names are the flag names and the YAML keys: ``--hupd_config sample`` on the
command line is ``hupd_config: sample`` in a config file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from hfplug.data.hupd import HUB_FILES
from hfplug.data.hupd_selection import parse_filing_date
from hfplug.data.tasks import (
    DEFAULT_TEXT_FIELDS,
    TASKS,
    TEXT_FIELDS,
    check_abstract_sources,
    check_task,
    is_generative,
    parse_text_fields,
)

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(value: str | float | int) -> float:
    """``"11h30m"``, ``"90m"``, ``"45s"``, ``"1.5h"`` or plain seconds (``3600``) -> seconds."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        match = _DURATION.match(text) if text else None
        if text.replace(".", "", 1).isdigit():
            seconds = float(text)
        elif match and any(match.groups()):
            hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
        else:
            raise ValueError(
                f"time_budget {value!r} is not a duration; write it like 11h30m, 90m, 45s or 3600 (seconds)."
            )
    if seconds <= 0:
        raise ValueError(f"time_budget must be positive, got {value!r}.")
    return seconds


def check_positive_int(name: str, value, *, when_set: bool = False) -> None:
    """``value`` must be an int > 0: not a bool (``True == 1``), not a float such as 12.5."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be positive{' when set' if when_set else ''}, a whole number, got {value!r}.")


# TrainingArguments counts that transformers accepts at parse time but that fail later (a DataLoader
# with batch size 0) or silently mean nothing.
_POSITIVE_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
_POSITIVE_IF_SET = ("eval_accumulation_steps", "save_total_limit", "logging_steps", "eval_steps", "save_steps")


def check_training_args(args, data_args: HupdArguments | None = None) -> None:
    """Refuse ``TrainingArguments`` values that transformers lets through but that cannot work (nothing is changed:
    what the other arguments imply is applied by ``hfplug.training.model_setup.prepare_training_args``)."""
    for name in _POSITIVE_COUNTS:
        check_positive_int(name, getattr(args, name))
    for name in _POSITIVE_IF_SET:
        value = getattr(args, name, None)
        if value is not None and (isinstance(value, bool) or value <= 0):
            raise ValueError(f"{name} must be positive when set, got {value!r}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(
            f"dataloader_num_workers must be 0 (load in the main process) or more, got {args.dataloader_num_workers}."
        )
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(f"max_steps must be positive, or -1 to train for num_train_epochs, got {args.max_steps}.")
    if args.max_steps < 0 and args.num_train_epochs <= 0 and args.do_train:
        raise ValueError(f"num_train_epochs must be positive, got {args.num_train_epochs} (or set max_steps).")
    if data_args is not None and data_args.streaming and args.do_train and args.max_steps <= 0:
        raise ValueError("streaming=True has no dataset length to derive epochs from; set --max_steps (e.g. 1000).")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(
            f"output_dir {args.output_dir!r} is a file, not a folder. Pass a folder path (it is created "
            "if missing), e.g. --output_dir outputs/my_run."
        )


@dataclass
class HupdArguments:
    """Which HUPD records to load, the task, and how the text is fed to the model."""

    hupd_config: str = field(
        default="sample", metadata={"help": "HUPD config: 'sample' (January 2016) or 'all' (2004-2018)."}
    )
    hupd_metadata_path: str | None = field(
        default=None, metadata={"help": "Local metadata .feather; default: fetched from the HUPD/hupd Hub repo."}
    )
    hupd_archive_path: str | None = field(
        default=None,
        metadata={"help": "Local archive (.tar.gz for sample, .tar for all); default: fetched from the Hub."},
    )
    train_filing_start_date: str | None = field(default=None, metadata={"help": "YYYY-MM-DD, inclusive."})
    train_filing_end_date: str | None = field(
        default=None, metadata={"help": "YYYY-MM-DD, exclusive (as in the official loader)."}
    )
    val_filing_start_date: str | None = field(default=None, metadata={"help": "YYYY-MM-DD, inclusive."})
    val_filing_end_date: str | None = field(
        default=None, metadata={"help": "YYYY-MM-DD, exclusive (inclusive with uniform_split)."}
    )
    uniform_split: bool = field(
        default=False, metadata={"help": "Shuffle (seed 1729) and split 85/15 instead of splitting by date."}
    )
    val_set_balancer: bool = field(
        default=False, metadata={"help": "Balance ACCEPTED/REJECTED in validation (official loader's rule)."}
    )
    ipcr_label: str | None = field(
        default=None, metadata={"help": "Keep applications whose main IPC label starts with this, e.g. G06F."}
    )
    cpc_label: str | None = field(
        default=None,
        metadata={
            "help": "Keep applications whose main CPC label starts with this (ignored if ipcr_label is set, as officially)."
        },
    )
    query: str | None = field(
        default=None,
        metadata={"help": "pandas DataFrame.query on the metadata, e.g. \"examiner_art_unit == '2161'\"."},
    )
    hupd_cache_dir: str | None = field(default=None, metadata={"help": "Where the built splits are cached (Arrow)."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream records from the archive instead of caching them; needs max_steps."}
    )

    task: str = field(
        default="decision",
        metadata={
            "help": f"One of {', '.join(TASKS)}: acceptance, IPC subclass, or writing the abstract from the claims."
        },
    )
    text_fields: str | None = field(
        default=None,
        metadata={
            "help": f"Comma-separated sections the model reads, in order; any of {', '.join(TEXT_FIELDS)}. Default: title,abstract (decision, ipc); claims (abstract, which cannot read the abstract it writes)."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "--task abstract: chat format of the examples: llama3, chatml, plain or a .jinja file. Default: the tokenizer's own template, else one chosen from its special tokens. Saved with the tokenizer, so recipes/chat.py --adapter uses it."
        },
    )
    max_length: int = field(
        default=512,
        metadata={
            "help": "Truncate inputs to this many tokens (padding is per batch). --task abstract cuts the claims and keeps the abstract whole."
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch similar lengths together (sets train_sampling_strategy=group_by_length)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training records (quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes for tokenization and for building the HUPD cache (for 'all', year archives read in parallel)."
        },
    )

    def __post_init__(self):
        if self.hupd_config not in ("sample", "all"):
            raise ValueError(f"hupd_config must be 'sample' or 'all', got {self.hupd_config!r}.")
        check_task(self.task)
        # None means the task's default; "" is a mistake (as "," is), not a request for the default.
        self.text_fields = ",".join(
            parse_text_fields(DEFAULT_TEXT_FIELDS[self.task] if self.text_fields is None else self.text_fields)
        )
        if is_generative(self.task):
            check_abstract_sources(self.text_fields)
        elif self.chat_template is not None:
            raise ValueError(
                f"chat_template applies to --task abstract only; --task {self.task} trains a classifier. "
                "Remove chat_template, or use --task abstract."
            )
        for name in (
            "train_filing_start_date",
            "train_filing_end_date",
            "val_filing_start_date",
            "val_filing_end_date",
        ):
            value = getattr(self, name)
            if value is not None:
                value = str(value)  # YAML may hand us a datetime.date
                parse_filing_date(value, name)  # the loader's own check, at parse time
                setattr(self, name, value)
        check_positive_int("max_length", self.max_length)
        for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name), when_set=True)

    def hub_files_needed(self) -> list[str]:
        """The files of the HUPD/hupd dataset repo this selection downloads (none when both are local)."""
        metadata, archive = HUB_FILES[self.hupd_config]
        local = ((metadata, self.hupd_metadata_path), (archive, self.hupd_archive_path))
        return [name for name, path in local if path is None]

    def load_hupd_kwargs(self) -> dict:
        """The keyword arguments for ``hfplug.data.load_hupd`` (its keywords are these fields' names).

        ``preprocessing_num_workers`` is its ``num_proc``, as for tokenization (``datasets``' name);
        ``columns`` is not set here: the recipe passes its task's (``hfplug.data.tasks.task_columns``).
        """
        return dict(
            hupd_config=self.hupd_config,
            hupd_metadata_path=self.hupd_metadata_path,
            hupd_archive_path=self.hupd_archive_path,
            train_filing_start_date=self.train_filing_start_date,
            train_filing_end_date=self.train_filing_end_date,
            val_filing_start_date=self.val_filing_start_date,
            val_filing_end_date=self.val_filing_end_date,
            uniform_split=self.uniform_split,
            val_set_balancer=self.val_set_balancer,
            ipcr_label=self.ipcr_label,
            cpc_label=self.cpc_label,
            query=self.query,
            hupd_cache_dir=self.hupd_cache_dir,
            streaming=self.streaming,
            num_proc=self.preprocessing_num_workers,
        )


@dataclass
class RunArguments:
    """Recipe behaviour beyond ``TrainingArguments``."""

    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improvement of metric_for_best_model."}
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Minimum improvement that counts for early stopping."}
    )
    time_budget: str | None = field(
        default=None,
        metadata={
            "help": "Stop cleanly, with a checkpoint, before this much time has passed since start: e.g. 11h30m (Colab's limit is ~12 h), 90m, or seconds. Time for the final save (and push) is kept free."
        },
    )
    # --task abstract: generation at each evaluation.
    max_generate_samples: int = field(
        default=64,
        metadata={
            "help": "--task abstract: validation records (the first N) whose abstracts are generated at each evaluation for ROUGE; 0 = no generation (loss and perplexity only)."
        },
    )
    max_new_tokens: int = field(
        default=256,
        metadata={
            "help": "--task abstract: longest generated abstract, in tokens (USPTO abstracts have at most 150 words)."
        },
    )
    log_samples: int = field(
        default=3,
        metadata={
            "help": "--task abstract: validation records whose generated abstracts are logged and appended to output_dir/samples.jsonl at each evaluation; 0 = off."
        },
    )

    def __post_init__(self):
        if self.early_stopping_patience is not None and self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}.")
        for name in ("max_generate_samples", "log_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 turns it off), got {value!r}.")
        if self.time_budget is not None:
            parse_duration(self.time_budget)  # a clear error at parse time, not hours later
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive integer (e.g. 256), got {self.max_new_tokens!r}.")
