"""``TrainerCallback``s the recipes add to every run: throughput, training curves, early stopping;
and, for the generative ``abstract`` task, sample generations at each evaluation.

    trainer = Trainer(..., callbacks=default_callbacks(training_args, run_args))

Each callback does file and console I/O on the main process only, and checks its
settings when it is built, not hours into a run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import TYPE_CHECKING

import torch
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from hfplug.arguments import RunArguments
    from hfplug.training.generation import GenerationRecord

logger = logging.getLogger(__name__)

GIB = 1024**3


# --- Throughput -------------------------------------------------------------------


class ThroughputCallback(TrainerCallback):
    """Adds recent throughput and peak GPU memory to the training logs.

    Each training log (the periodic one with ``loss``) gets, over the interval
    since the previous training log:

    - ``samples_per_second``: optimizer steps x ``train_batch_size`` x
      ``gradient_accumulation_steps`` x ``world_size`` per wall-clock second, with
      the time spent in evaluation (``eval_*runtime``) left out. Checkpoint saving
      is not left out. The batch size is nominal: a short last batch counts as full.
    - ``tokens_per_second``: from ``state.num_input_tokens_seen``, so only with
      ``include_num_input_tokens_seen`` set to "all" or "non_padding". Unlike the
      Trainer's own ``train_tokens_per_second`` (an average since the start), this
      is the rate over the last interval.

    On CUDA, every log (training, eval and the final summary) also gets
    ``peak_memory_gib`` and ``peak_reserved_gib``: the peaks since the process
    started. The peak counters are never reset, as other code may read them.

    All work happens at log time: no per-step hooks and no device syncs.
    """

    def __init__(self):
        self._last_time: float | None = None
        self._last_step = 0
        self._last_tokens = 0
        self._eval_seconds = 0.0  # evaluation time inside the current interval
        self._warned_no_tokens = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # state is already restored from a checkpoint here, so a resumed run starts its
        # first interval at the resumed step and token count.
        self._last_time = time.perf_counter()
        self._last_step = state.global_step
        self._last_tokens = state.num_input_tokens_seen
        self._eval_seconds = 0.0
        if not _counts_tokens(args) and state.is_world_process_zero and not self._warned_no_tokens:
            self._warned_no_tokens = True
            logger.warning(
                "ThroughputCallback: no tokens_per_second, because include_num_input_tokens_seen is 'no'; "
                "set it to 'non_padding' (or 'all') to log tokens/s."
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # One call per eval dataset; their runtimes are "eval_runtime" or "eval_<name>_runtime".
        self._eval_seconds += sum(v for k, v in (metrics or {}).items() if k.endswith("_runtime"))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None:
            return
        extra = _peak_memory(args)
        if "loss" in logs and self._last_time is not None:
            extra.update(self._interval_rates(args, state))
        if extra:
            _add_to_logs(logs, state, extra)

    def _interval_rates(self, args: TrainingArguments, state: TrainerState) -> dict[str, float]:
        """samples/s (and tokens/s) since the previous training log; starts the next interval."""
        now = time.perf_counter()
        seconds = now - self._last_time - self._eval_seconds
        steps = state.global_step - self._last_step
        tokens = state.num_input_tokens_seen - self._last_tokens
        self._last_time, self._last_step, self._last_tokens = now, state.global_step, state.num_input_tokens_seen
        self._eval_seconds = 0.0
        if steps <= 0 or seconds <= 0:
            return {}
        # state.train_batch_size is the batch the dataloader really uses (it differs from
        # args with auto_find_batch_size); both already include n_gpu for DataParallel.
        batch = state.train_batch_size or args.train_batch_size
        samples = steps * batch * args.gradient_accumulation_steps * args.world_size
        rates = {"samples_per_second": round(samples / seconds, 3)}
        if _counts_tokens(args):
            rates["tokens_per_second"] = round(tokens / seconds, 3)
        return rates


def _counts_tokens(args: TrainingArguments) -> bool:
    """Whether the Trainer fills ``state.num_input_tokens_seen`` (v5 takes "all"/"non_padding"/"no")."""
    return args.include_num_input_tokens_seen not in ("no", False, None)


def _peak_memory(args: TrainingArguments) -> dict[str, float]:
    """Peak allocated / reserved memory of the training GPU in GiB; empty off CUDA."""
    device = args.device
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
    }


def _add_to_logs(logs: dict, state: TrainerState, extra: dict) -> None:
    """Add ``extra`` to ``logs`` and to the matching ``state.log_history`` entry.

    ``Trainer.log`` appends a copy of ``logs`` to ``log_history`` before calling
    ``on_log``, so without the second update the printed logs and the saved
    ``trainer_state.json`` would disagree.
    """
    logs.update(extra)
    entry = state.log_history[-1] if state.log_history else None
    # Only touch the last entry if it is this record (on_log may be called by other code).
    if entry is not None and all(
        k in logs and (logs[k] is v or logs[k] == v) for k, v in entry.items() if k != "step"
    ):
        entry.update(extra)


# --- Training curves ----------------------------------------------------------------

# Eval keys that measure the evaluation itself, not the model (speed, and counts such as eval_generated_samples).
_EVAL_SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_tokens_per_second", "_samples")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _curves(log_history: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """Panels to plot: ``{panel title: {series label: (steps, values)}}``, in first-seen order.

    Panel "loss" holds the training loss and every eval loss; each other eval
    metric gets its own panel. Non-finite values (a NaN loss) are left out.
    """
    panels: dict[str, dict[str, tuple[list, list]]] = {}

    def add(panel: str, label: str, step, value) -> None:
        steps, values = panels.setdefault(panel, {}).setdefault(label, ([], []))
        steps.append(step)
        values.append(value)

    for entry in log_history:
        step = entry.get("step")
        if not _is_number(step):
            continue
        if _is_number(entry.get("loss")):
            add("loss", "train loss", step, entry["loss"])
        for key, value in entry.items():
            if not key.startswith("eval_") or key.endswith(_EVAL_SPEED_SUFFIXES) or not _is_number(value):
                continue
            if key.endswith("_loss"):
                add("loss", key.replace("_", " "), step, value)
            else:
                add(key, key, step, value)
    return panels


def plot_training_curves(log_history: list[dict], path: str | os.PathLike) -> str | None:
    """Plot training loss, eval loss and each eval metric against the step into a PNG at ``path``.

    Returns the path written, or None when ``log_history`` has nothing to plot
    (then nothing is written). Draws on a private ``Figure`` with the Agg canvas,
    so a notebook's pyplot state and backend are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = _curves(log_history)
    if not panels:
        return None
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, series) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for label, (steps, values) in series.items():
            # Eval points are few and far apart, and a lone point draws no line: give those markers.
            marker = "o" if label != "train loss" or len(steps) == 1 else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


class TrainingCurvesCallback(TrainerCallback):
    """At the end of training, plots ``state.log_history`` to ``output_dir/filename`` (main process only)."""

    def __init__(self, filename: str = "training_curves.png"):
        if not isinstance(filename, str) or not filename.lower().endswith(".png") or os.path.isabs(filename):
            raise ValueError(
                f"TrainingCurvesCallback filename must be a relative path ending in .png "
                f"(it is written inside output_dir), got {filename!r}."
            )
        self.filename = filename

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        path = plot_training_curves(state.log_history, os.path.join(args.output_dir, self.filename))
        if path is None:
            logger.warning(
                "No training curves written: log_history has no training loss or eval metrics "
                "(the run ended before its first logging_steps / eval_steps, or logging_strategy is 'no')."
            )
        else:
            logger.info("Training curves written to %s", path)


# --- Early stopping -------------------------------------------------------------------


def early_stopping_callback(
    patience: int | None, threshold: float | None, args: TrainingArguments
) -> EarlyStoppingCallback | None:
    """``EarlyStoppingCallback`` for ``patience`` evaluations without improvement; None when patience is None or 0.

    ``threshold`` is the least change of ``metric_for_best_model`` that counts as an
    improvement (None means 0). Checks that ``args`` can support early stopping and
    raises a ValueError naming the keys to set; it never changes ``args``.
    """
    if patience is None or patience == 0:
        return None
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"early_stopping_patience must be None, 0 (off) or a positive int, got {patience!r}.")
    threshold = 0.0 if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"early_stopping_threshold must be a number >= 0, got {threshold!r}.")

    missing = _early_stopping_problems(args)
    if missing:
        raise ValueError(
            f"early_stopping_patience={patience} needs, in the YAML or on the CLI: " + "; ".join(missing) + ". "
            "Together: eval_strategy (steps or epoch), save_strategy equal to it, "
            "load_best_model_at_end: true and metric_for_best_model (e.g. f1)."
        )
    return EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=float(threshold))


def _early_stopping_problems(args: TrainingArguments) -> list[str]:
    """What ``args`` lacks for early stopping, one 'key: wanted (got value)' per setting."""
    eval_strategy = _strategy(args.eval_strategy)
    save_strategy = _strategy(args.save_strategy)
    problems = []
    if eval_strategy == "no":
        problems.append("eval_strategy: steps or epoch (got 'no')")
    # The best model is only known at save time, so saving must follow evaluation.
    elif save_strategy not in (eval_strategy, "best"):
        problems.append(f"save_strategy: {eval_strategy} like eval_strategy, or best (got {save_strategy!r})")
    if not args.load_best_model_at_end:
        problems.append(f"load_best_model_at_end: true (got {args.load_best_model_at_end!r})")
    if not args.metric_for_best_model:
        problems.append("metric_for_best_model: e.g. f1 or loss (got None)")
    return problems


def _strategy(value) -> str:
    """An IntervalStrategy / SaveStrategy (str enums) or a plain string, as its value."""
    return getattr(value, "value", value)


# --- Sample generations ------------------------------------------------------------------


class SampleGenerationCallback(TrainerCallback):
    """At each evaluation, generates replies for a few fixed validation records and shows them.

    Each reply is logged (shortened) next to its reference and appended, in full, to
    ``output_dir/filename`` as one JSON line: ``{"step", "index", "generated", "reference"}``.
    Reading the file across steps shows what the model learns to write, and whether it
    learns to stop. Runs on the main process only; costs ``len(records)`` greedy
    generations of at most ``max_new_tokens`` tokens per evaluation.
    """

    def __init__(
        self,
        chat_format,
        records: list[GenerationRecord],
        *,
        max_new_tokens: int = 256,
        filename: str = "samples.jsonl",
    ):
        if not records:
            raise ValueError("SampleGenerationCallback needs at least one record to generate for.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if not isinstance(filename, str) or not filename.endswith(".jsonl") or os.path.isabs(filename):
            raise ValueError(
                f"SampleGenerationCallback filename must be a relative path ending in .jsonl "
                f"(it is written inside output_dir), got {filename!r}."
            )
        self.chat_format, self.records = chat_format, list(records)
        self.max_new_tokens, self.filename = max_new_tokens, filename

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        from hfplug.training.generation import generate_batch

        pad_token_id = self.chat_format.tokenizer.pad_token_id
        replies = []
        for start in range(0, len(self.records), args.per_device_eval_batch_size):
            batch = self.records[start : start + args.per_device_eval_batch_size]
            replies += generate_batch(
                model,
                self.chat_format,
                [r.prompt_ids for r in batch],
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad_token_id,
            )
        lines = [
            {"step": state.global_step, "index": r.index, "generated": reply, "reference": r.reference}
            for r, reply in zip(self.records, replies)
        ]
        path = os.path.join(args.output_dir, self.filename)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        for line in lines:
            logger.info(
                "Sample generation, step %d, validation record %d:\n  generated: %s\n  reference: %s",
                line["step"],
                line["index"],
                _shorten(line["generated"]),
                _shorten(line["reference"]),
            )


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sample_generation_callback(
    chat_format,
    records: list[GenerationRecord],
    run_args: RunArguments,
) -> SampleGenerationCallback | None:
    """The sample callback for the first ``run_args.log_samples`` records; None when that is 0 or there are none."""
    shown = records[: run_args.log_samples]
    if not shown:
        return None
    return SampleGenerationCallback(chat_format, shown, max_new_tokens=run_args.max_new_tokens)


# --- What the recipes use ---------------------------------------------------------------


def default_callbacks(
    args: TrainingArguments, run_args: RunArguments | None = None, *, curves_filename: str = "training_curves.png"
) -> list[TrainerCallback]:
    """Throughput, training curves, and early stopping when ``run_args.early_stopping_patience`` is set."""
    callbacks: list[TrainerCallback] = [ThroughputCallback(), TrainingCurvesCallback(curves_filename)]
    if run_args is not None:
        stopper = early_stopping_callback(run_args.early_stopping_patience, run_args.early_stopping_threshold, args)
        if stopper is not None:
            callbacks.append(stopper)
    return callbacks
