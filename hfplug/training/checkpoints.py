"""Checkpoints that are complete or absent: written aside, verified by a manifest, renamed into place.

``SafeCheckpointTrainer`` saves each checkpoint under ``output_dir/.checkpoint-staging``,
records the final paths in its ``trainer_state.json``, writes ``hfplug_manifest.json`` (every
file's size and SHA-256), flushes it all to disk, and only then renames the folder to
``checkpoint-N``. ``find_resumable_checkpoint`` resumes only from a checkpoint whose every
file is present and whole, and ``finished_run`` tells a finished run from one to resume.

Why SHA-256 and not only sizes: a kill mid-write or a full disk leaves a short file, which
sizes catch, but a machine that loses power before the data reaches the disk can leave files
of the right size full of zeros, which only a checksum catches. SHA-256 runs at 1-2 GB/s on
a current CPU: a LoRA checkpoint costs milliseconds, an 8B full fine-tune (16 GB of weights +
32 GB of optimizer state) about half a minute per save and per resume, small next to writing
those 48 GB. Set ``SafeCheckpointTrainer.manifest_checksum = None`` to record sizes only.

Checkpoints saved before manifests existed count as complete when ``trainer_state.json``
reads, and the weights, ``optimizer.*`` and ``scheduler.pt`` are there and not empty (the
Trainer silently starts a fresh optimizer when they are missing); truncation inside them
cannot be detected, which the warning says.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"  # checkpoints are written here, then renamed into place
MANIFEST_FILE = "hfplug_manifest.json"
MANIFEST_FORMAT = "hfplug-checkpoint-manifest/1"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
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


class NoCompleteCheckpointError(ValueError):
    """``output_dir`` has checkpoints, but none that can be resumed."""


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
                "atomically. Install the transformers version in hfplug's requirements, or update hfplug.training.checkpoints."
            )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------- manifest


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, *, global_step: int | None = None, checksum: str | None = "sha256") -> None:
    """Record every file of ``folder`` (size, and SHA-256 unless ``checksum=None``) in ``hfplug_manifest.json``."""
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        entry = {"size": path.stat().st_size}
        if checksum:
            entry[checksum] = _sha256(path)
        files[path.relative_to(folder).as_posix()] = entry
    manifest = {"format": MANIFEST_FORMAT, "global_step": global_step, "checksum": checksum, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _verify_manifest(folder: Path, *, checksum: bool = True) -> list[str]:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST_FILE} is damaged"]
    problems = []
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{name} is truncated ({size} of {entry.get('size')} bytes)" if size < entry.get("size", 0)
                            else f"{name} has {size} bytes, not the {entry.get('size')} it was saved with")
        elif checksum and entry.get("sha256") and _sha256(path) != entry["sha256"]:
            problems.append(f"{name} is damaged (its SHA-256 differs from the one saved in {MANIFEST_FILE})")
    return problems


_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin",
            "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _legacy_problems(folder: Path) -> list[str]:
    """A checkpoint without manifest (saved before hfplug wrote them): the files a resume reads must be there."""
    problems = []
    try:
        json.loads((folder / TRAINER_STATE).read_text())
    except FileNotFoundError:
        problems.append(f"{TRAINER_STATE} is missing")
    except (OSError, ValueError):
        problems.append(f"{TRAINER_STATE} is damaged")
    deepspeed = any(folder.glob("global_step*"))
    weights = [folder / n for n in _WEIGHTS if (folder / n).is_file()] + list(folder.glob("pytorch_model_fsdp*"))
    if not weights and not deepspeed:
        problems.append("the model weights (model.safetensors or adapter_model.safetensors) are missing")
    optimizer = [p for p in folder.iterdir() if p.name.startswith("optimizer")] if folder.is_dir() else []
    if not optimizer and not deepspeed:
        problems.append("optimizer.pt is missing")
    if not (folder / "scheduler.pt").is_file() and not deepspeed:
        problems.append("scheduler.pt is missing")
    for path in weights + optimizer + [folder / "scheduler.pt"]:
        if path.is_file() and path.stat().st_size == 0:
            problems.append(f"{path.name} is empty")
    return problems


def checkpoint_problems(path: str | os.PathLike, *, checksum: bool = True) -> list[str]:
    """What keeps ``path`` from being resumed (each damaged or missing file named); empty when it is complete."""
    folder = Path(path)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    if (folder / MANIFEST_FILE).is_file():
        return _verify_manifest(folder, checksum=checksum)
    return _legacy_problems(folder)


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when every file a resume from ``path`` reads is present and whole."""
    return not checkpoint_problems(path)


def _checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in output_dir.iterdir() if c.is_dir() and (m := _CHECKPOINT.match(c.name))]
    return [c for _, c in sorted(found, reverse=True)]


def find_resumable_checkpoint(output_dir: str | os.PathLike, *, log: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``; damaged ones are skipped, naming the file.

    ``None`` when there is no checkpoint. With checkpoints but none complete it raises
    ``NoCompleteCheckpointError`` saying what to do (restore, delete or use another output_dir),
    rather than silently starting over. In a multi-process run, process 0 checks and the others
    take its answer.
    """
    dist = torch.distributed
    if log and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # One process reads and hashes the checkpoints (not every rank, all at once); all use its answer.
        answer = [None, None]
        if dist.get_rank() == 0:
            try:
                answer[0] = _find_resumable(Path(output_dir), log=True)
            except NoCompleteCheckpointError as err:
                answer[1] = str(err)
        dist.broadcast_object_list(answer, src=0)
        if answer[1]:
            raise NoCompleteCheckpointError(answer[1])
        return answer[0]
    return _find_resumable(Path(output_dir), log=log)


def _find_resumable(output_dir: Path, *, log: bool) -> str | None:
    skipped = []
    for child in _checkpoints(output_dir):
        problems = checkpoint_problems(child)
        if not problems:
            if log and not (child / MANIFEST_FILE).is_file():
                logger.warning("%s has no %s (saved by an older hfplug): its files are there, but whether they "
                               "are whole cannot be checked.", child, MANIFEST_FILE)
            return str(child)
        skipped.append(f"{child.name} ({'; '.join(problems)})")
        if log:
            logger.warning("Skipping %s: it is incomplete (%s); trying the previous checkpoint.", child, "; ".join(problems))
    if skipped and log:
        damaged = " ".join(shlex.quote(str(output_dir / s.split(" ", 1)[0])) for s in skipped)
        raise NoCompleteCheckpointError(
            f"{output_dir} has checkpoints but none that can be resumed: {', '.join(skipped)}. Restore the named "
            f"files from a copy and rerun the same command, or delete the checkpoints to start over (rm -r {damaged}), "
            "or use a new output_dir."
        )
    return None


def clear_staging(output_dir: str | os.PathLike) -> None:
    """Remove what an interrupted save left behind (main process, before training, under the output_dir lock)."""
    staging = Path(output_dir) / STAGING_DIR
    if staging.exists():
        logger.warning("Removing %s, left by a save that was interrupted.", staging)
        shutil.rmtree(staging, ignore_errors=True)


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
                    raise RuntimeError(f"transformers {_transformers_version()}'s Trainer._save_checkpoint did not "
                                       f"write {staging / name}: hfplug.training.checkpoints needs updating for it.")
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
                raise CheckpointSaveError(f"Saving {name} in {run_dir} failed on another process (see its log); "
                                          "the previous checkpoint is intact.")
            converted = self._save_error(error, name, run_dir)
            if converted is error:
                raise error
            raise converted from error
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            # The Trainer rotated inside the staging folder; rotate where the checkpoints live, now that the new
            # one is complete (never before: a failure must leave the previous one).
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

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
        for path in _files(staged) + [staged / MANIFEST_FILE, staged]:
            _fsync(path)

    def _space_needed(self, run_dir: Path) -> tuple[int, str]:
        previous = [c for c in _checkpoints(run_dir)]
        if previous:
            return _folder_bytes(previous[0]), f"the size of {previous[0].name}"
        total = 0
        try:
            model = self.accelerator.unwrap_model(self.model)
            frozen = any(not p.requires_grad for p in model.parameters())  # e.g. LoRA: only the adapter is saved
            tensors = [p for p in model.parameters() if p.requires_grad] if frozen else list(model.state_dict().values())
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
        previous = next((str(c) for c in _checkpoints(run_dir) if not checkpoint_problems(c, checksum=False)), None)
        where = f"a checkpoint in {run_dir} needs about {_human(need)} ({basis}) and its disk has {free}."
        kept = (f" The previous checkpoint {previous} is intact." if previous else " There is no earlier checkpoint.")
        if full:
            message = (f"No space left on the device while saving {name}: {where}{kept} Free some space (or lower "
                       "save_total_limit, or use an output_dir on a bigger disk), then rerun the same command to "
                       + ("resume." if previous else "start again."))
        else:
            message = (f"Saving {name} failed ({type(err).__name__}: {err}); {where}{kept} Fix the cause, then rerun "
                       "the same command to " + ("resume." if previous else "start again."))
        error = CheckpointSaveError(message)
        error.errno = errno.ENOSPC if full else getattr(err, "errno", None)
        return error


# --------------------------------------------------------------------------- a finished run


@dataclass
class FinishedRun:
    """A run whose training already reached its last step: ``finished_run`` loaded its final weights."""

    step: int
    weights: str  # the folder the final weights came from (the best checkpoint with load_best_model_at_end)
    evaluated: bool  # eval_results.json is there: evaluation finished too


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None
    except (OSError, ValueError):
        return None


def _planned_max_steps(trainer, state: dict) -> int | None:
    """The optimizer steps this run trains to, as ``Trainer.train`` computes them."""
    try:
        return int(trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1])
    except AttributeError:  # transformers without set_initial_training_values
        if trainer.args.max_steps > 0:
            return trainer.args.max_steps
        same = state.get("num_train_epochs") == trainer.args.num_train_epochs and state.get("train_batch_size") in (
            None, trainer.args.per_device_train_batch_size)
        return state.get("max_steps") if same else None


def finished_run(trainer: Trainer, checkpoint: str | None) -> FinishedRun | None:
    """Whether rerunning resumes a run that already finished training; if so, load its final weights.

    Finished means: the resumed checkpoint's ``trainer_state.json`` (or the final one the run
    wrote to ``output_dir`` after saving its model, when the Trainer deleted its last checkpoint)
    has ``global_step`` at or past the steps *these* arguments train to, so a rerun with more
    epochs or ``max_steps`` trains on. A finished run trains nothing: the final weights (the
    best checkpoint's with ``load_best_model_at_end``) are loaded for evaluation, the model is
    saved to ``output_dir`` again if the run ended before ``train_results.json`` was written, and
    ``evaluated`` says whether ``eval_results.json`` is already there. ``None`` otherwise.
    """
    if checkpoint is None:  # (resuming is what checked the arguments against the run's)
        return None
    output_dir = Path(trainer.args.output_dir)
    saved = (output_dir / "train_results.json").is_file()  # written after the final model
    candidates = [(s, Path(checkpoint)) for s in [_read_state(Path(checkpoint) / TRAINER_STATE)] if s]
    if saved and (root := _read_state(output_dir / TRAINER_STATE)):
        candidates.append((root, output_dir))
    if not candidates:
        return None
    state, source = max(candidates, key=lambda c: c[0]["global_step"])
    planned = _planned_max_steps(trainer, state)
    if planned is None or state["global_step"] < planned:
        return None
    best = state.get("best_model_checkpoint")
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir() and not checkpoint_problems(best):
        weights = best
    else:
        weights = str(source)
    logger.warning("Training already finished at step %d (%s): nothing to train. Evaluation and the push run if they "
                   "did not finish. To train longer, raise num_train_epochs or max_steps; to start over, use a new "
                   "output_dir.", state["global_step"], checkpoint)
    trainer._load_from_checkpoint(weights)
    if not saved:
        trainer.save_model()  # the run ended before its final model was saved, or while saving it
    evaluated = (output_dir / "eval_results.json").is_file()
    if evaluated and trainer.args.do_eval:
        logger.warning("Evaluation already finished (%s); delete it to evaluate again.", output_dir / "eval_results.json")
    return FinishedRun(step=state["global_step"], weights=weights, evaluated=evaluated)
