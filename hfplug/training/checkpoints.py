"""Checkpoints that are complete or absent: staging, the manifest that verifies them, the search for one to resume.

``hfplug.training.trainer.SafeCheckpointTrainer`` saves each checkpoint under
``output_dir/.checkpoint-staging``, records the final paths in its ``trainer_state.json``, writes
``hfplug_manifest.json`` (:func:`write_manifest`: every file's size and SHA-256), flushes it all to
disk, and only then renames the folder to ``checkpoint-N``. ``find_resumable_checkpoint`` resumes
only from a checkpoint whose every file is present and whole, and ``finished_run`` tells a
finished run from one to resume.

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
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"  # checkpoints are written here, then renamed into place
MANIFEST_FILE = "hfplug_manifest.json"
MANIFEST_FORMAT = "hfplug-checkpoint-manifest/1"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class NoCompleteCheckpointError(ValueError):
    """``output_dir`` has checkpoints, but none that can be resumed."""


# --------------------------------------------------------------------------- manifest


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(
    folder: str | os.PathLike, *, global_step: int | None = None, checksum: str | None = "sha256"
) -> None:
    """Record every file of ``folder`` (size, and SHA-256 unless ``checksum=None``) in ``hfplug_manifest.json``."""
    folder = Path(folder)
    files = {}
    for path in checkpoint_files(folder):
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
            problems.append(
                f"{name} is truncated ({size} of {entry.get('size')} bytes)"
                if size < entry.get("size", 0)
                else f"{name} has {size} bytes, not the {entry.get('size')} it was saved with"
            )
        elif checksum and entry.get("sha256") and _sha256(path) != entry["sha256"]:
            problems.append(f"{name} is damaged (its SHA-256 differs from the one saved in {MANIFEST_FILE})")
    return problems


_WEIGHTS = (
    "model.safetensors",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "adapter_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


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


def list_checkpoints(output_dir: Path) -> list[Path]:
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
    for child in list_checkpoints(output_dir):
        problems = checkpoint_problems(child)
        if not problems:
            if log and not (child / MANIFEST_FILE).is_file():
                logger.warning(
                    "%s has no %s (saved by an older hfplug): its files are there, but whether they "
                    "are whole cannot be checked.",
                    child,
                    MANIFEST_FILE,
                )
            return str(child)
        skipped.append(f"{child.name} ({'; '.join(problems)})")
        if log:
            logger.warning(
                "Skipping %s: it is incomplete (%s); trying the previous checkpoint.", child, "; ".join(problems)
            )
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
            None,
            trainer.args.per_device_train_batch_size,
        )
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
    logger.warning(
        "Training already finished at step %d (%s): nothing to train. Evaluation and the push run if they "
        "did not finish. To train longer, raise num_train_epochs or max_steps; to start over, use a new "
        "output_dir.",
        state["global_step"],
        checkpoint,
    )
    trainer._load_from_checkpoint(weights)
    if not saved:
        trainer.save_model()  # the run ended before its final model was saved, or while saving it
    evaluated = (output_dir / "eval_results.json").is_file()
    if evaluated and trainer.args.do_eval:
        logger.warning(
            "Evaluation already finished (%s); delete it to evaluate again.", output_dir / "eval_results.json"
        )
    return FinishedRun(step=state["global_step"], weights=weights, evaluated=evaluated)
