"""Surviving Colab and faults: a time budget, a clean stop on SIGTERM/SIGINT (also when only the
launcher is signalled: ``hfplug.launcher.follow_launcher``), one run per output_dir, atomic and verified
checkpoints (``hfplug.training.checkpoints``), resuming only from complete checkpoints made with the same
arguments.

A free Colab session ends without warning (idle ~90 min, hard limit ~12 h), and a
preemptible machine gets SIGTERM a few seconds before SIGKILL. The pieces here make
the Trainer stop at a step boundary, save a checkpoint that is either complete or
absent (never half-written), and resume from it as if nothing had happened.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback

# Re-exported: hfplug.training.resilience stays the one import for surviving faults.
from hfplug.arguments import parse_duration  # noqa: F401  (the time budget's syntax lives with the argument)
from hfplug.launcher import follow_launcher, resume_command
from hfplug.training.checkpoints import clear_staging, find_resumable_checkpoint

logger = logging.getLogger(__name__)

RUN_ARGS_FILE = "hfplug_run_args.json"
LOCK_FILE = ".hfplug.lock"
MIN_SAVE_RESERVE_S = 60.0  # kept free at the end of a time budget for the final checkpoint
PUSH_RESERVE_S = 300.0  # ... and for the push, when --push_to_hub is set


# --------------------------------------------------------------------------- time budget


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

    def __init__(
        self,
        *,
        deadline: float | None = None,
        reserve_s: float = MIN_SAVE_RESERVE_S,
        signals=(signal.SIGTERM, signal.SIGINT),
    ):
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
        if signal.SIGTERM in self._previous:
            follow_launcher()  # a launcher killed alone (or already gone) stops this process too, with a checkpoint

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
            logger.warning(
                "Stopping at step %d (%s); saving a checkpoint.",
                state.global_step,
                "time budget" if reason == "time_budget" else reason,
            )
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


# --------------------------------------------------------------------------- one run per output_dir


class OutputDirInUse(OSError):
    """Another run holds ``output_dir`` (its pid and host are in the message)."""


class OutputDirLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``output_dir/.hfplug.lock``, as a context manager.

    The lock file says who holds it (pid, host, start time, command). The kernel drops the
    lock when the holder exits, however it exits, so a crash leaves nothing stale. Only one
    process of a multi-process run should take it (they share the folder legitimately).
    Processes forked while it is held (e.g. data-loader workers) hold it until they exit.
    Without ``fcntl`` (Windows), or on a file system without locks (some FUSE mounts), nothing
    is locked and a warning says so; on NFS, Linux maps ``flock`` to NFS locks, seen by every host.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        try:
            import fcntl
        except ImportError:
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: another process holds it
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            raise OutputDirInUse(self._busy_message(holder)) from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP, ...: a file system without locks (some FUSE/network mounts)
            os.close(fd)
            logger.warning(
                "Cannot lock %s (%s): nothing stops a second run from using %s at the same time.",
                self.path,
                os.strerror(err.errno) if err.errno else err,
                self.output_dir,
            )
            return self
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": shlex.join(sys.argv),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            ).encode(),
        )
        self._fd = fd
        return self

    def _busy_message(self, holder: str) -> str:
        try:
            info = json.loads(holder)
            who = f"pid {info['pid']} on host {info['host']}, started {info['started']}: {info['command']}"
            stop = f"stop it (kill -TERM {int(info['pid'])} on {info['host']})"
        except (ValueError, KeyError, TypeError):
            who, stop = "a process that is starting", "stop it"
        return (
            f"{self.output_dir} is in use by another run ({who}). One run per output_dir: wait for it to end, "
            f"{stop}, or use another output_dir."
        )

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_held_locks: dict[str, OutputDirLock] = {}


def lock_output_dir(output_dir: str | os.PathLike, *, main_process: bool = True) -> OutputDirLock | None:
    """Hold ``output_dir`` for this process until it exits (``OutputDirLock``); ``OutputDirInUse`` when taken.

    Only the main process locks (``main_process=training_args.process_index == 0``); calling
    it again for the same folder in the same process is a no-op.
    """
    if not main_process:
        return None
    key = os.path.realpath(output_dir)
    if key not in _held_locks:
        _held_locks[key] = OutputDirLock(output_dir).acquire()
    return _held_locks[key]


# --------------------------------------------------------------------------- same arguments on resume


def record_run_args(output_dir: str | os.PathLike, **groups) -> None:
    """Write the model and data arguments of a run to ``output_dir`` (compared on resume)."""
    path = Path(output_dir) / RUN_ARGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({name: asdict(value) for name, value in groups.items()}, indent=2, sort_keys=True, default=str)
    )


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


# --------------------------------------------------------------------------- what the recipe calls

# Arguments that may change between a run and its resumption (paths of caches, evaluation size, ...).
RESUMABLE_CHANGES = (
    "hupd_cache_dir",
    "preprocessing_num_workers",
    "max_eval_samples",
    "max_generate_samples",
    "log_samples",
    "max_new_tokens",
    "time_budget",
    "early_stopping_patience",
    "early_stopping_threshold",
    # Memory techniques give the same loss and gradients (tests/test_long_context_*): a run resumed
    # on another GPU may need other ones.
    "long_context",
    "max_host_memory",
)


def prepare_resume(training_args, **groups) -> str | None:
    """Take ``output_dir`` for this run and return the checkpoint to resume from (``None``: start fresh).

    The launcher's death reaches this process (``follow_launcher``); one run per output_dir
    (``lock_output_dir``, held until exit); staging a killed save left behind is cleared; only
    a complete checkpoint made with the same ``groups`` of arguments (e.g. ``model=``,
    ``data=``; ``RESUMABLE_CHANGES`` excepted) is resumed, and a fresh run records them.
    """
    follow_launcher()  # `kill <launcher pid>` reaches this process too: checkpoint, then stop (Linux)
    lock_output_dir(training_args.output_dir, main_process=training_args.process_index == 0)
    checkpoint = training_args.resume_from_checkpoint
    if not training_args.do_train:
        return checkpoint
    if training_args.should_save:
        clear_staging(training_args.output_dir)  # what a killed save left behind
    if checkpoint is None:
        checkpoint = find_resumable_checkpoint(training_args.output_dir)
    if checkpoint is not None:
        check_resume_args(training_args.output_dir, ignore=RESUMABLE_CHANGES, **groups)
        logger.warning("Resuming from %s (found in output_dir). Use a new output_dir to start over.", checkpoint)
    elif training_args.should_save:
        record_run_args(training_args.output_dir, **groups)
    return checkpoint


def report_stop(stop: GracefulStopCallback, step: int) -> int | None:
    """Say why training stopped early and how to go on; the exit status for a signal (128 + its number)."""
    if stop.stop_reason in ("SIGTERM", "SIGINT"):
        logger.warning(
            "Stopped by %s at step %d; the checkpoint is saved. To resume, run the same command again: %s",
            stop.stop_reason,
            step,
            resume_command(),
        )
        return 128 + signal.Signals[stop.stop_reason].value
    if stop.stop_reason == "time_budget":
        logger.warning(
            "Time budget reached at step %d; the checkpoint is saved (evaluation skipped). "
            "To continue, run the same command again: %s",
            step,
            resume_command(),
        )
    return None
