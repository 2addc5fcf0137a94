"""Time budget, graceful stop, atomic checkpoints, resumable-checkpoint detection, same-arguments check."""

import errno
import json
import time
from dataclasses import dataclass

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

from hfplug.training.checkpoints import STAGING_DIR, clear_staging, find_resumable_checkpoint
from hfplug.training.resilience import (
    GracefulStopCallback,
    check_resume_args,
    check_time_budget,
    parse_duration,
    record_run_args,
)
from hfplug.training.trainer import SafeCheckpointTrainer


@pytest.mark.parametrize(
    "text, seconds",
    [("11h30m", 41400), ("90m", 5400), ("45s", 45), ("1.5h", 5400), ("3600", 3600), (120, 120), ("1h0m30s", 3630)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "11:30", "-5", "0", "h"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="time_budget"):
        parse_duration(text)


def test_budget_too_short_to_save():
    check_time_budget(3600, pushing=True)
    with pytest.raises(ValueError, match="leaves no time to train: 60 s are kept for saving"):
        check_time_budget(30, pushing=False)
    with pytest.raises(ValueError, match="saving the final checkpoint and pushing"):
        check_time_budget(200, pushing=True)


def _checkpoint(root, step, *, complete=True):
    """A checkpoint as an older hfplug left it: no manifest."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        (path / name).write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    # else: killed before the trainer state was written
    return path


def test_newest_complete_checkpoint_is_found_and_half_written_skipped(tmp_path, caplog):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 30, complete=False)
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text("{truncated")
    with caplog.at_level("WARNING"):
        assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert "checkpoint-40: it is incomplete (trainer_state.json is damaged" in caplog.text
    assert "checkpoint-30: it is incomplete (trainer_state.json is missing" in caplog.text
    assert "checkpoint-20 has no hfplug_manifest.json" in caplog.text
    assert find_resumable_checkpoint(tmp_path / "nothing") is None


def test_clear_staging(tmp_path):
    (tmp_path / STAGING_DIR / "checkpoint-5").mkdir(parents=True)
    clear_staging(tmp_path)
    assert not (tmp_path / STAGING_DIR).exists()


@dataclass
class _Model:
    model_name_or_path: str = "m"
    lora_r: int = 8


@dataclass
class _Data:
    task: str = "decision"
    max_length: int = 128


def test_resume_with_other_arguments_names_each_difference(tmp_path):
    record_run_args(tmp_path, model=_Model(), data=_Data())
    check_resume_args(tmp_path, model=_Model(), data=_Data())  # same: fine
    with pytest.raises(
        ValueError, match=r"lora_r: 8 in the checkpoint, 16 now; task: 'decision' in the checkpoint, 'ipc' now"
    ):
        check_resume_args(tmp_path, model=_Model(lora_r=16), data=_Data(task="ipc"))
    check_resume_args(tmp_path, ignore=("max_length",), model=_Model(), data=_Data(max_length=64))


# --- a real Trainer on a tiny model -----------------------------------------------------------


def _trainer(tmp_path, callbacks=(), evaluate=False, **kwargs):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    model = BertForSequenceClassification(config)
    data = Dataset.from_dict(
        {"input_ids": [[2, i % 40 + 5, 3] for i in range(64)], "label": [i % 2 for i in range(64)]}
    )
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        use_cpu=True,
        report_to="none",
        save_strategy="steps",
        save_steps=4,
        logging_steps=100,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **kwargs})
    return SafeCheckpointTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data if evaluate else None, callbacks=list(callbacks)
    )


def test_checkpoints_are_renamed_into_place_and_rotated(tmp_path):
    trainer = _trainer(tmp_path, save_total_limit=2)
    trainer.train()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-12", "checkpoint-16"]
    assert not (tmp_path / STAGING_DIR).exists()
    assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-16")


def test_full_disk_on_save_is_clear_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    original = SafeCheckpointTrainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if self.state.global_step >= 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(SafeCheckpointTrainer, "save_model", save_model)
    with pytest.raises(
        OSError, match=r"No space left on the device while saving checkpoint-8.*checkpoint-4 is intact"
    ):
        trainer.train()
    assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-8").exists() and not (tmp_path / STAGING_DIR).exists()


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    stop = GracefulStopCallback(deadline=time.monotonic() + 1e-3)  # already (almost) over: stop after one step
    trainer = _trainer(tmp_path, callbacks=[stop], save_steps=1000)
    trainer.train()
    assert stop.stop_reason == "time_budget"
    assert trainer.state.global_step == 1
    assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")


def test_signal_stops_at_step_boundary_with_a_checkpoint(tmp_path):
    import os
    import signal

    class SendSigterm(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    stop = GracefulStopCallback()
    trainer = _trainer(tmp_path, callbacks=[SendSigterm(), stop], save_steps=1000)
    trainer.train()
    assert stop.stop_reason == "SIGTERM"
    assert trainer.state.global_step == 3
    assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert signal.getsignal(signal.SIGTERM) is not stop._handler  # handlers restored


def test_more_processes_than_gpus_is_refused(monkeypatch):
    from types import SimpleNamespace

    from hfplug.training.resilience import check_launch_matches_machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(
        ValueError, match=r"started 8 processes on this machine but it has 1 GPU\(s\). Use --num_processes 1"
    ):
        check_launch_matches_machine(SimpleNamespace(use_cpu=False))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_launch_matches_machine(SimpleNamespace(use_cpu=False))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    check_launch_matches_machine(SimpleNamespace(use_cpu=True))  # CPU processes are not GPUs


# --- issue 9: the private Trainer methods hfplug overrides or calls ----------------------------


def test_private_trainer_methods_hfplug_relies_on_still_exist():
    """Fails with the method's name when a transformers upgrade drops or changes one of them."""
    from transformers import Trainer

    from hfplug.training.generation import GenerativeTrainer
    from hfplug.training.trainer import TRAINER_PRIVATE_API, check_trainer_api

    for name in TRAINER_PRIVATE_API:
        assert callable(getattr(Trainer, name, None)), (
            f"transformers.Trainer has no {name} any more; SafeCheckpointTrainer relies on it (hfplug.training.checkpoints)"
        )
    check_trainer_api()  # the same check SafeCheckpointTrainer makes when it is built
    # Every private Trainer method hfplug overrides is listed (so the check above covers it).
    for cls in (SafeCheckpointTrainer, GenerativeTrainer):
        overridden = {n for n in vars(cls) if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)}
        assert overridden <= set(TRAINER_PRIVATE_API), (
            f"{cls.__name__} overrides unlisted private methods: {overridden}"
        )

    class Older(Trainer):
        _save_checkpoint = None

    with pytest.raises(
        RuntimeError,
        match=r"no Trainer._save_checkpoint; hfplug's SafeCheckpointTrainer needs "
        r"Trainer._save_checkpoint\(model, trial\)",
    ):
        check_trainer_api(Older)

    class Renamed(Trainer):
        def _get_output_dir(self, run):
            return ""

    with pytest.raises(RuntimeError, match=r"_get_output_dir\(run\).*needs Trainer._get_output_dir\(trial\)"):
        check_trainer_api(Renamed)


# --- issue 10.4: complete means complete (manifest) ------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """checkpoint-4 and checkpoint-8 as SafeCheckpointTrainer writes them."""
    out = tmp_path_factory.mktemp("saved")
    _trainer(out, max_steps=8).train()
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_checkpoint_has_a_manifest_of_every_file(two_checkpoints):
    from hfplug.training.checkpoints import MANIFEST_FILE, checkpoint_problems

    checkpoint = two_checkpoints / "checkpoint-8"
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert manifest["global_step"] == 8 and manifest["checksum"] == "sha256"
    names = {p.name for p in checkpoint.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == names
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names
    assert all(
        entry["size"] == (checkpoint / n).stat().st_size and len(entry["sha256"]) == 64
        for n, entry in manifest["files"].items()
    )
    assert checkpoint_problems(checkpoint) == []


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))  # the right size, the wrong bytes (power lost before the flush)


@pytest.mark.parametrize(
    "name, damage, problem",
    [
        ("optimizer.pt", _truncate, "optimizer.pt is truncated"),
        ("model.safetensors", _truncate, "model.safetensors is truncated"),
        ("scheduler.pt", _truncate, "scheduler.pt is truncated"),
        ("rng_state.pth", _truncate, "rng_state.pth is truncated"),
        ("optimizer.pt", lambda p: p.unlink(), "optimizer.pt is missing"),
        ("scheduler.pt", lambda p: p.unlink(), "scheduler.pt is missing"),
        ("model.safetensors", _zero, "model.safetensors is damaged (its SHA-256 differs"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_naming_the_file(
    two_checkpoints, tmp_path, caplog, name, damage, problem
):
    out = _copy(two_checkpoints, tmp_path / "out")
    damage(out / "checkpoint-8" / name)
    with caplog.at_level("WARNING"):
        assert find_resumable_checkpoint(out) == str(out / "checkpoint-4")
    assert f"checkpoint-8: it is incomplete ({problem}" in caplog.text


def test_resuming_after_a_damaged_checkpoint_continues_from_the_previous_one(two_checkpoints, tmp_path):
    out = _copy(two_checkpoints, tmp_path / "out")
    _truncate(out / "checkpoint-8" / "optimizer.pt")
    checkpoint = find_resumable_checkpoint(out)
    trainer = _trainer(out, max_steps=8)
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 8
    assert find_resumable_checkpoint(out) == str(out / "checkpoint-8")  # saved again, whole


def test_no_complete_checkpoint_left_says_what_to_do(two_checkpoints, tmp_path):
    from hfplug.training.checkpoints import NoCompleteCheckpointError

    out = _copy(two_checkpoints, tmp_path / "my out")
    _truncate(out / "checkpoint-8" / "optimizer.pt")
    (out / "checkpoint-4" / "scheduler.pt").unlink()
    with pytest.raises(NoCompleteCheckpointError) as info:
        find_resumable_checkpoint(out)
    message = str(info.value)
    assert "has checkpoints but none that can be resumed: checkpoint-8 (optimizer.pt is truncated" in message
    assert "checkpoint-4 (scheduler.pt is missing)" in message
    assert f"rm -r '{out}/checkpoint-8' '{out}/checkpoint-4'" in message  # shlex-quoted: the path has a space
    assert isinstance(info.value, ValueError)


def test_a_checkpoint_without_manifest_needs_its_optimizer_and_scheduler(tmp_path, caplog):
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8)
    (tmp_path / "checkpoint-8" / "optimizer.pt").unlink()
    with caplog.at_level("WARNING"):
        assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-8: it is incomplete (optimizer.pt is missing)" in caplog.text


# --- issue 10.5: a failure while saving is one clear error ---------------------------------------


def _tokenizers_disk_full():
    return Exception("No space left on device (os error 28)")  # what tokenizers' Rust save raises: a plain Exception


@pytest.mark.parametrize(
    "where, exc, expected",
    [
        (
            "save_model",
            lambda: OSError(errno.ENOSPC, "No space left on device"),
            r"No space left on the device while saving checkpoint-8",
        ),
        (
            "optimizer",
            lambda: RuntimeError(
                "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                "file data/0: file write failed"
            ),
            r"Saving checkpoint-8 failed \(RuntimeError: .*file write failed\)",
        ),
        ("save_model", _tokenizers_disk_full, r"No space left on the device while saving checkpoint-8"),
    ],
)
def test_a_failure_while_saving_is_one_clear_error(tmp_path, monkeypatch, where, exc, expected):
    from hfplug.training.trainer import CheckpointSaveError

    trainer = _trainer(tmp_path)
    if where == "save_model":
        original = SafeCheckpointTrainer.save_model

        def save_model(self, output_dir=None, _internal_call=False):
            if self.state.global_step >= 8:
                raise exc()
            return original(self, output_dir, _internal_call)

        monkeypatch.setattr(SafeCheckpointTrainer, "save_model", save_model)
    else:  # torch.save of optimizer.pt fails, as it does on a full disk
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.pt") and "checkpoint-8" in str(f):
                raise exc()
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointSaveError, match=expected) as info:
        trainer.train()
    message = str(info.value)
    size = sum(p.stat().st_size for p in (tmp_path / "checkpoint-4").iterdir())
    assert f"a checkpoint in {tmp_path} needs about" in message and "(the size of checkpoint-4)" in message
    assert f"{size / 1e6:.1f} MB" in message or f"{size / 1e3:.1f} KB" in message
    assert "free" in message and f"The previous checkpoint {tmp_path / 'checkpoint-4'} is intact" in message
    assert "rerun the same command to resume" in message
    assert isinstance(info.value, OSError) and not message.startswith("[Errno")
    if "No space" in expected:
        assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / STAGING_DIR).exists() and not (tmp_path / "checkpoint-8").exists()
    assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


def test_other_errors_while_saving_pass_through_and_leave_no_staging(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    original = SafeCheckpointTrainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if self.state.global_step >= 8:
            raise KeyError("a bug")
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(SafeCheckpointTrainer, "save_model", save_model)
    with pytest.raises(KeyError, match="a bug"):
        trainer.train()
    assert not (tmp_path / STAGING_DIR).exists() and find_resumable_checkpoint(tmp_path) == str(
        tmp_path / "checkpoint-4"
    )


# --- issue 10.2: final paths in the trainer state; the best model survives a kill -----------------


def _eval_trainer(tmp_path, callbacks=(), **kwargs):
    return _trainer(
        tmp_path,
        callbacks=callbacks,
        evaluate=True,
        eval_strategy="steps",
        eval_steps=4,
        save_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        per_device_eval_batch_size=64,
        learning_rate=1e-2,
        **kwargs,
    )  # "best" = highest loss: an early one


class _StopAt(TrainerCallback):
    """What GracefulStopCallback does on SIGTERM, at a chosen step (the kill, without racing a signal)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def test_trainer_state_records_final_paths_and_kill_resume_ends_on_the_same_best_model(tmp_path):
    straight = _eval_trainer(tmp_path / "straight")
    straight.train()
    best = straight.state.best_model_checkpoint
    assert best == str(tmp_path / "straight" / "checkpoint-4"), best  # not the last: loading it matters
    expected = straight.evaluate()["eval_loss"]

    out = tmp_path / "killed"  # killed right after the best checkpoint was saved: resumed from it
    _eval_trainer(out, callbacks=[_StopAt(4)]).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    for state_file in out.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        assert STAGING_DIR not in state_file.read_text(), state_file
        assert state["best_model_checkpoint"] == str(out / "checkpoint-4")
    resumed = _eval_trainer(out)
    resumed.train(resume_from_checkpoint=find_resumable_checkpoint(out))
    assert resumed.state.best_model_checkpoint == str(out / "checkpoint-4")
    assert resumed.evaluate()["eval_loss"] == pytest.approx(expected, abs=1e-6)


def test_a_best_checkpoint_recorded_under_the_staging_folder_is_repaired_on_resume(tmp_path):
    out = tmp_path / "old"
    _eval_trainer(out, callbacks=[_StopAt(6)]).train()
    state_file = out / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["best_model_checkpoint"] = str(out / STAGING_DIR / "checkpoint-4")  # as hfplug < this fix wrote it
    state_file.write_text(json.dumps(state))
    (out / "checkpoint-6" / "hfplug_manifest.json").unlink()  # an old checkpoint: no manifest either

    class Record(TrainerCallback):
        seen: list = []  # noqa: RUF012

        def on_step_begin(self, args, state, control, **kwargs):
            self.seen.append(state.best_model_checkpoint)

    resumed = _eval_trainer(out, callbacks=[Record()])
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert Record.seen[0] == str(out / "checkpoint-4")  # repaired at the start, before any new save
    assert resumed.state.best_model_checkpoint == str(out / "checkpoint-4")


# --- issue 10.3: a finished run trains nothing ---------------------------------------------------


def test_finished_run_is_recognised_and_its_final_weights_loaded(two_checkpoints, tmp_path, caplog):
    from hfplug.training.checkpoints import finished_run

    out = _copy(two_checkpoints, tmp_path / "out")
    checkpoint = find_resumable_checkpoint(out)
    trainer = _trainer(out, max_steps=8)  # the same arguments: finished
    with caplog.at_level("WARNING"):
        finished = finished_run(trainer, checkpoint)
    assert finished is not None and finished.step == 8 and finished.weights == checkpoint
    assert "Training already finished at step 8" in caplog.text
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoint-8" / "model.safetensors"))
    for name, value in trainer.model.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name
    assert (out / "model.safetensors").is_file()  # no train_results.json: the final model is saved again
    assert finished.evaluated is False
    (out / "eval_results.json").write_text("{}")
    (out / "train_results.json").write_text("{}")
    assert finished_run(_trainer(out, max_steps=8), checkpoint).evaluated is True

    assert finished_run(_trainer(out, max_steps=12), checkpoint) is None  # more steps asked for: train on
    assert finished_run(_trainer(out, max_steps=8), None) is None
    assert finished_run(_trainer(out, max_steps=8), str(out / "checkpoint-4")) is None


# --- issue 10.6: one run per output_dir -------------------------------------------------------


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    import os
    import socket

    from hfplug.training.resilience import OutputDirInUse, OutputDirLock, lock_output_dir

    with OutputDirLock(tmp_path / "out") as lock:
        assert lock.held
        with pytest.raises(
            OutputDirInUse,
            match=rf"out is in use by another run \(pid {os.getpid()} on host "
            rf"{socket.gethostname()}, started .*One run per output_dir",
        ):
            OutputDirLock(tmp_path / "out").acquire()
    OutputDirLock(tmp_path / "out").acquire().release()  # released on exit from the with block
    assert lock_output_dir(tmp_path / "out", main_process=False) is None
    held = lock_output_dir(tmp_path / "out")
    assert lock_output_dir(tmp_path / "out") is held  # the same process again: fine
    with pytest.raises(OSError, match="in use by another run"):
        OutputDirLock(tmp_path / "out").acquire()
    held.release()


def test_the_lock_of_a_killed_run_is_free_at_once(tmp_path):
    import signal
    import subprocess
    import sys

    from hfplug.training.resilience import OutputDirInUse, OutputDirLock

    code = (
        "import sys, time; from hfplug.training.resilience import OutputDirLock; OutputDirLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUse, match=f"pid {holder.pid} "):
            OutputDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    OutputDirLock(tmp_path).acquire().release()  # a crash leaves no stale lock
