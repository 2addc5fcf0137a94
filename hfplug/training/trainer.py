"""``SafeCheckpointTrainer``: a ``Trainer`` whose checkpoints are complete or absent, and one clear error when a save fails.

It redirects the Trainer's checkpoint writing to the staging folder, finishes the checkpoint
there (final paths in the trainer state, the manifest of ``hfplug.training.checkpoints``,
everything flushed to disk), renames it into place, and only then rotates older checkpoints.
A failure while saving (a full disk included) becomes one ``CheckpointSaveError`` saying how
much space a checkpoint needs and whether the previous one is intact. ``check_trainer_api``
fails clearly when a private ``Trainer`` method this relies on has changed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from hfplug.training.checkpoints import (
    MANIFEST_FILE,
    STAGING_DIR,
    TRAINER_STATE,
    checkpoint_files,
    checkpoint_problems,
    list_checkpoints,
    write_manifest,
)

logger = logging.getLogger(__name__)

_DISK_FULL = re.compile(r"no space left|os error 28|errno 28|disk quota exceeded|enospc", re.IGNORECASE)

# transformers.Trainer methods hfplug overrides or calls that are not public API, with the
# parameters it relies on (tests/test_resilience.py checks each against the installed version).
# No public hook runs before a checkpoint's files are written, so redirecting them to the
# staging folder takes the first two; everything else uses callbacks and public functions.
TRAINER_PRIVATE_API = {
    "_save_checkpoint": ("model", "trial"),  # overridden: stage, manifest, rename
    "_get_output_dir": ("trial",),  # overridden: points _save_checkpoint at the staging folder
    "_load_from_checkpoint": ("resume_from_checkpoint",),  # called: a finished run's final weights
}


class CheckpointSaveError(OSError):
    """Saving a checkpoint failed (``errno`` is ``ENOSPC`` when the disk is full); the previous one is intact."""


def check_trainer_api(cls=Trainer) -> None:
    """Fail clearly when a private ``Trainer`` method hfplug relies on is gone or changed."""
    import inspect

    for name, params in TRAINER_PRIVATE_API.items():
        method = getattr(cls, name, None)
        found = list(inspect.signature(method).parameters)[1:] if callable(method) else None
        if found is None or list(params) != found[: len(params)]:
            raise RuntimeError(
                f"transformers {_transformers_version()} has "
                + (f"{name}({', '.join(found)})" if found is not None else f"no Trainer.{name}")
                + f"; hfplug's SafeCheckpointTrainer needs Trainer.{name}({', '.join(params)}) to write checkpoints "
                "atomically. Install the transformers version in hfplug's requirements, or update hfplug.training.trainer."
            )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------- atomic save


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:  # directories cannot be fsynced on some systems
        if not path.is_dir() or err.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _is_disk_full(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _DISK_FULL.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


class _Housekeeping(TrainerCallback):
    """Public-hook part of ``SafeCheckpointTrainer``: repairs a best checkpoint recorded by an older hfplug."""

    def on_train_begin(self, args, state, control, **kwargs):
        best = getattr(state, "best_global_step", None)
        if state.best_model_checkpoint is None and best:
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
            if os.path.isdir(path):  # its state named the staging folder, which the Trainer then dropped
                state.best_model_checkpoint = path
                logger.info("Best checkpoint so far: %s", path)


class SafeCheckpointTrainer(Trainer):
    """A ``Trainer`` whose checkpoints are complete or absent.

    Each is written under ``output_dir/.checkpoint-staging``; its ``trainer_state.json`` then
    gets the final paths (``best_model_checkpoint`` never names the staging folder), a manifest
    of every file's size and SHA-256 is added, everything is flushed to disk, and the folder
    is renamed to ``checkpoint-N`` (the atomic step); only then are older checkpoints rotated
    out. A kill mid-save leaves the staging folder (cleared on the next start); any failure
    while saving (full disk included) removes it, keeps the previous checkpoint, and raises one
    ``CheckpointSaveError`` saying how much space a checkpoint needs and where. All processes
    agree on success before anyone goes on, so one failing rank does not leave the others waiting.

    The Trainer's own ``push_to_hub`` with ``hub_strategy="checkpoint"``/``"all_checkpoints"``
    would upload from the staging folder while it is renamed; hfplug pushes with its own
    callback (``hfplug.hub``) instead.
    """

    manifest_checksum: str | None = "sha256"  # None: sizes only (see the module docstring)
    _staging = False

    def __init__(self, *args, **kwargs):
        check_trainer_api()
        super().__init__(*args, **kwargs)
        self.add_callback(_Housekeeping())

    def _get_output_dir(self, trial=None) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _agree(self, ok: bool) -> bool:
        """Whether every process succeeded (also a barrier)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return ok
        device = self.args.device if self.args.device.type == "cuda" else "cpu"
        flag = torch.tensor([1 if ok else 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _save_checkpoint(self, model, trial) -> None:
        for callback in self.callback_handler.callbacks:  # the time budget learns how long a save takes
            if callable(getattr(callback, "mark_save_start", None)):
                callback.mark_save_start()
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = run_dir / STAGING_DIR, run_dir / name
        main = self.args.should_save
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        error = None
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:  # noqa: BLE001 - every process must reach _agree below
            error = err
        finally:
            self._staging = False
        ok = self._agree(error is None)  # also the barrier: every process's files are written
        if ok and main:
            try:
                if not (staging / name).is_dir():
                    raise RuntimeError(
                        f"transformers {_transformers_version()}'s Trainer._save_checkpoint did not "
                        f"write {staging / name}: hfplug.training.trainer needs updating for it."
                    )
                self._finish_staged(run_dir, staging / name)
                if final.is_dir():  # a checkpoint of the same step from an earlier attempt
                    shutil.rmtree(final)
                os.replace(staging / name, final)  # the atomic step
                _fsync(run_dir)
            except Exception as err:  # noqa: BLE001
                error = err
        if ok:
            ok = self._agree(error is None)
        if not ok:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            if error is None:
                raise CheckpointSaveError(
                    f"Saving {name} in {run_dir} failed on another process (see its log); "
                    "the previous checkpoint is intact."
                )
            converted = self._save_error(error, name, run_dir)
            if converted is error:
                raise error
            raise converted from error
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            # The Trainer rotated inside the staging folder; rotate where the checkpoints live, now that the new
            # one is complete (never before: a failure must leave the previous one).
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _finish_staged(self, run_dir: Path, staged: Path) -> None:
        """Final paths into the trainer state, the manifest, and everything flushed to disk."""
        state = self.state
        best = getattr(state, "best_global_step", None)
        if best:
            path = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best}"
            if best == state.global_step or path.is_dir():
                state.best_model_checkpoint = str(path)
        if state.best_model_checkpoint and STAGING_DIR in Path(state.best_model_checkpoint).parts:
            state.best_model_checkpoint = state.best_model_checkpoint.replace(os.path.join(STAGING_DIR, ""), "")
        if (staged / TRAINER_STATE).is_file():
            state.save_to_json(str(staged / TRAINER_STATE))
        write_manifest(staged, global_step=state.global_step, checksum=self.manifest_checksum)
        for path in checkpoint_files(staged) + [staged / MANIFEST_FILE, staged]:
            _fsync(path)

    def _space_needed(self, run_dir: Path) -> tuple[int, str]:
        previous = [c for c in list_checkpoints(run_dir)]
        if previous:
            return _folder_bytes(previous[0]), f"the size of {previous[0].name}"
        total = 0
        try:
            model = self.accelerator.unwrap_model(self.model)
            frozen = any(not p.requires_grad for p in model.parameters())  # e.g. LoRA: only the adapter is saved
            tensors = (
                [p for p in model.parameters() if p.requires_grad] if frozen else list(model.state_dict().values())
            )
            total += sum(t.numel() * t.element_size() for t in tensors)
            if self.optimizer is not None:
                for values in self.optimizer.state_dict().get("state", {}).values():
                    total += sum(v.numel() * v.element_size() for v in values.values() if torch.is_tensor(v))
        except Exception:  # noqa: BLE001 - an estimate only
            pass
        return total, "the weights it saves and the optimizer state"

    def _save_error(self, err: BaseException, name: str, run_dir: Path) -> BaseException:
        """One clear ``CheckpointSaveError`` for a full disk or any OSError/RuntimeError; other errors as they are."""
        full = _is_disk_full(err)
        if not (full or isinstance(err, (OSError, RuntimeError))):
            return err
        need, basis = self._space_needed(run_dir)
        try:
            free = f"{_human(shutil.disk_usage(run_dir).free)} free"
        except OSError:
            free = "an unknown amount free"
        previous = next(
            (str(c) for c in list_checkpoints(run_dir) if not checkpoint_problems(c, checksum=False)), None
        )
        where = f"a checkpoint in {run_dir} needs about {_human(need)} ({basis}) and its disk has {free}."
        kept = f" The previous checkpoint {previous} is intact." if previous else " There is no earlier checkpoint."
        if full:
            message = (
                f"No space left on the device while saving {name}: {where}{kept} Free some space (or lower "
                "save_total_limit, or use an output_dir on a bigger disk), then rerun the same command to "
                + ("resume." if previous else "start again.")
            )
        else:
            message = (
                f"Saving {name} failed ({type(err).__name__}: {err}); {where}{kept} Fix the cause, then rerun "
                "the same command to " + ("resume." if previous else "start again.")
            )
        error = CheckpointSaveError(message)
        error.errno = errno.ENOSPC if full else getattr(err, "errno", None)
        return error
