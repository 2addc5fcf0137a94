"""Surviving Colab and faults: a time budget, a clean stop on SIGTERM/SIGINT, atomic checkpoints,
resuming only from complete checkpoints made with the same arguments.

A free Colab session ends without warning (idle ~90 min, hard limit ~12 h), and a
preemptible machine gets SIGTERM a few seconds before SIGKILL. The pieces here make
the Trainer stop at a step boundary, save a checkpoint that is either complete or
absent (never half-written), and resume from it as if nothing had happened.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"  # checkpoints are written here, then renamed into place
RUN_ARGS_FILE = "hfplug_run_args.json"
MIN_SAVE_RESERVE_S = 60.0  # kept free at the end of a time budget for the final checkpoint
PUSH_RESERVE_S = 300.0  # ... and for the push, when --push_to_hub is set
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


# --------------------------------------------------------------------------- time budget


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
            raise ValueError(f"time_budget {value!r} is not a duration; write it like 11h30m, 90m, 45s or 3600 (seconds).")
    if seconds <= 0:
        raise ValueError(f"time_budget must be positive, got {value!r}.")
    return seconds


def save_reserve(*, pushing: bool) -> float:
    """Seconds kept free at the end of a time budget for the final save (and push)."""
    return MIN_SAVE_RESERVE_S + (PUSH_RESERVE_S if pushing else 0.0)


def check_time_budget(budget_s: float, *, pushing: bool) -> None:
    """Refuse a budget too short to train and still save once (and push)."""
    reserve = save_reserve(pushing=pushing)
    if budget_s <= reserve:
        raise ValueError(
            f"time_budget {budget_s:.0f} s leaves no time to train: {reserve:.0f} s are kept for saving the final "
            f"checkpoint{' and pushing' if pushing else ''}. Give at least {2 * reserve:.0f} s (e.g. --time_budget "
            f"{int(2 * reserve // 60)}m), or leave time_budget unset."
        )


# --------------------------------------------------------------------------- graceful stop


class GracefulStopCallback(TrainerCallback):
    """Stop at the next step boundary, with a checkpoint, on SIGTERM/SIGINT or before a time budget runs out.

    All processes agree before stopping (one tiny all-reduce per step when distributed),
    so every rank takes part in the same final save; only the main process writes files
    (the Trainer's own rule). A second Ctrl-C interrupts at once, as usual.
    ``stop_reason`` says why training stopped early (``None`` when it ran to the end).
    """

    def __init__(self, *, deadline: float | None = None, reserve_s: float = MIN_SAVE_RESERVE_S,
                 signals=(signal.SIGTERM, signal.SIGINT)):
        self.deadline = deadline  # time.monotonic() value by which the process must be done
        self.reserve_s = reserve_s
        self.signals = tuple(signals)
        self.stop_reason: str | None = None
        self._requested: str | None = None
        self._previous = {}
        self._last_save_s = 0.0
        self._save_started: float | None = None

    # signal handling: only set a flag; the training loop acts on it at a step boundary
    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self._requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._requested = name
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping.", name)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they are
                pass

    def on_train_end(self, args, state, control, **kwargs):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _local_reason(self) -> str | None:
        if self._requested:
            return self._requested
        if self.deadline is not None:
            # Stop while the rest of the budget still covers a save as slow as the slowest so far (x2).
            if time.monotonic() + max(self.reserve_s, 2 * self._last_save_s) >= self.deadline:
                return "time_budget"
        return None

    def _agreed_reason(self, args) -> str | None:
        reason = self._local_reason()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return reason
        codes = ("", "time_budget", "SIGINT", "SIGTERM")
        flag = torch.tensor([codes.index(reason or "")], device=args.device if args.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return codes[int(flag.item())] or None

    def on_step_end(self, args, state, control, **kwargs):
        reason = self._agreed_reason(args)
        if reason and self.stop_reason is None:
            self.stop_reason = reason
            control.should_save = True
            control.should_training_stop = True
            logger.warning("Stopping at step %d (%s); saving a checkpoint.", state.global_step,
                           "time budget" if reason == "time_budget" else reason)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self._save_started is not None:
            self._last_save_s = max(self._last_save_s, time.monotonic() - self._save_started)
            self._save_started = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._save_started = None

    def mark_save_start(self) -> None:
        """Called by ``SafeCheckpointTrainer`` so the time budget knows how long a save takes."""
        self._save_started = time.monotonic()


# --------------------------------------------------------------------------- atomic checkpoints


class SafeCheckpointTrainer(Trainer):
    """A ``Trainer`` whose checkpoints appear atomically: written under ``output_dir/.checkpoint-staging``,
    then renamed to ``checkpoint-N``. A kill mid-save leaves only the staging folder (cleared on
    the next start); a full disk leaves the previous checkpoint intact and says so.
    """

    _staging = False

    def _get_output_dir(self, trial=None) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GracefulStopCallback):
                callback.mark_save_start()
        run_dir = self._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except OSError as err:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                previous = find_resumable_checkpoint(run_dir, log=False)
                raise OSError(
                    errno.ENOSPC,
                    f"No space left on the device while saving {name} in {run_dir}. "
                    f"{'The previous checkpoint ' + previous + ' is intact. ' if previous else ''}"
                    "Free some space (or lower save_total_limit), then rerun the same command to resume.",
                ) from err
            raise
        finally:
            self._staging = False
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)  # the atomic step
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and STAGING_DIR in best:
                self.state.best_model_checkpoint = best.replace(os.path.join(STAGING_DIR, ""), "")
            # Rotation ran inside the staging folder; run it where the checkpoints live.
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a checkpoint the Trainer can resume from: a readable trainer state and weights."""
    path = Path(path)
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin",
               "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any((path / name).is_file() for name in weights) or any(path.glob("pytorch_model_fsdp*"))


def find_resumable_checkpoint(output_dir: str | os.PathLike, *, log: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``; incomplete ones are skipped (and said so)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), child) for child in output_dir.iterdir() if child.is_dir() and (m := _CHECKPOINT.match(child.name))
    )
    for _, child in reversed(steps):
        if is_complete_checkpoint(child):
            return str(child)
        if log:
            logger.warning("Skipping %s: it is incomplete (a save was interrupted).", child)
    return None


def clear_staging(output_dir: str | os.PathLike) -> None:
    """Remove what an interrupted save left behind (main process, before training)."""
    staging = Path(output_dir) / STAGING_DIR
    if staging.exists():
        logger.warning("Removing %s, left by a save that was interrupted.", staging)
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- same arguments on resume


def record_run_args(output_dir: str | os.PathLike, **groups) -> None:
    """Write the model and data arguments of a run to ``output_dir`` (compared on resume)."""
    path = Path(output_dir) / RUN_ARGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: asdict(value) for name, value in groups.items()}, indent=2, sort_keys=True, default=str))


def check_resume_args(output_dir: str | os.PathLike, *, ignore=(), **groups) -> None:
    """Refuse to resume a run whose model or data arguments differ from the checkpoint's (naming each)."""
    path = Path(output_dir) / RUN_ARGS_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps({name: asdict(value) for name, value in groups.items()}, default=str))
    differences = []
    for group, values in current.items():
        for key, value in values.items():
            before = saved.get(group, {}).get(key, value)
            if key not in ignore and before != value:
                differences.append(f"{key}: {before!r} in the checkpoint, {value!r} now")
    if differences:
        raise ValueError(
            f"{output_dir} holds a run made with other arguments, so it cannot be resumed: "
            + "; ".join(differences)
            + ". Rerun with the checkpoint's values, or use a new output_dir to start over."
        )


def resume_command() -> str:
    """How to run this process again: its own arguments, after ``accelerate launch`` when it was started so."""
    args = " ".join(shlex.quote(a) for a in sys.argv)
    launched = any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "LOCAL_RANK"))
    return f"accelerate launch <the same launch flags> {args}" if launched else f"python {args}"


# --------------------------------------------------------------------------- launch sanity


def check_launch_matches_machine(training_args) -> None:
    """Refuse a launch with more processes on this machine than it has GPUs (e.g. 8 processes on 1 GPU)."""
    if training_args.use_cpu or not torch.cuda.is_available():
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if local > gpus:
        raise ValueError(
            f"accelerate started {local} processes on this machine but it has {gpus} GPU(s). Use --num_processes "
            f"{gpus} (or an accelerate config whose num_processes matches the GPU count)."
        )
