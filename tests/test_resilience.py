"""Time budget, graceful stop, atomic checkpoints, resumable-checkpoint detection, same-arguments check."""

import errno
import json
import time
from dataclasses import dataclass

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

from hfplug.resilience import (
    STAGING_DIR,
    GracefulStopCallback,
    SafeCheckpointTrainer,
    check_resume_args,
    check_time_budget,
    clear_staging,
    find_resumable_checkpoint,
    parse_duration,
    record_run_args,
)


@pytest.mark.parametrize("text, seconds", [("11h30m", 41400), ("90m", 5400), ("45s", 45), ("1.5h", 5400),
                                           ("3600", 3600), (120, 120), ("1h0m30s", 3630)])
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
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "model.safetensors").write_bytes(b"x")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    else:
        (path / "model.safetensors").write_bytes(b"x")  # killed before the trainer state was written
    return path


def test_newest_complete_checkpoint_is_found_and_half_written_skipped(tmp_path, caplog):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 30, complete=False)
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text("{truncated")
    with caplog.at_level("WARNING"):
        assert find_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert "checkpoint-40: it is incomplete" in caplog.text and "checkpoint-30: it is incomplete" in caplog.text
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
    with pytest.raises(ValueError, match=r"lora_r: 8 in the checkpoint, 16 now; task: 'decision' in the checkpoint, 'ipc' now"):
        check_resume_args(tmp_path, model=_Model(lora_r=16), data=_Data(task="ipc"))
    check_resume_args(tmp_path, ignore=("max_length",), model=_Model(), data=_Data(max_length=64))


# --- a real Trainer on a tiny model -----------------------------------------------------------

def _trainer(tmp_path, callbacks=(), **kwargs):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        num_labels=2)
    model = BertForSequenceClassification(config)
    data = Dataset.from_dict({"input_ids": [[2, i % 40 + 5, 3] for i in range(64)], "label": [i % 2 for i in range(64)]})
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, use_cpu=True,
                    report_to="none", save_strategy="steps", save_steps=4, logging_steps=100, disable_tqdm=True)
    args = TrainingArguments(**{**settings, **kwargs})
    return SafeCheckpointTrainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))


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
    with pytest.raises(OSError, match=r"No space left on the device while saving checkpoint-8.*checkpoint-4 is intact"):
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

    from hfplug.resilience import check_launch_matches_machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match=r"started 8 processes on this machine but it has 1 GPU\(s\). Use --num_processes 1"):
        check_launch_matches_machine(SimpleNamespace(use_cpu=False))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_launch_matches_machine(SimpleNamespace(use_cpu=False))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    check_launch_matches_machine(SimpleNamespace(use_cpu=True))  # CPU processes are not GPUs
