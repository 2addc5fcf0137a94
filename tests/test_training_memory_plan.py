"""hfplug.training.memory_plan: --long_context before loading, and an out-of-memory error that says what fits."""

from __future__ import annotations

import json
import types

import pytest
import torch

from hfplug.model_args import ModelArguments
from hfplug.testing.llama31 import LLAMA31_8B
from hfplug.training import memory_plan
from hfplug.training.memory_plan import DoesNotFitError, plan_memory

GiB = 1024**3


@pytest.fixture
def llama8b_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    return str(tmp_path)


def _training_args(*, batch=1, do_train=True, checkpointing=True):
    return types.SimpleNamespace(
        per_device_train_batch_size=batch,
        do_train=do_train,
        activation_checkpointing=checkpointing,
        optim="paged_adamw_8bit",
        device=torch.device("cpu"),
    )


@pytest.fixture
def on_a_t4(monkeypatch):
    """The planner sees a 15 GiB GPU (the T4's usable memory) without one being here."""
    monkeypatch.setattr(memory_plan, "device_type_for", lambda training_args: "cuda")
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=15 * GiB)
    )


def _args(path, long_context, **kw):
    return ModelArguments(
        model_name_or_path=path, quant="4bit", lora=True, lora_dropout=0.0, long_context=long_context,
        max_host_memory="7GiB", **kw,
    )  # fmt: skip


def test_auto_turns_on_nothing_when_the_run_fits_and_more_as_the_length_grows(llama8b_dir, on_a_t4):
    short = plan_memory(_args(llama8b_dir, "auto"), _training_args(), task="abstract", max_length=512, num_labels=0)
    assert short.long_context.techniques == ()
    long = plan_memory(_args(llama8b_dir, "auto"), _training_args(), task="abstract", max_length=32768, num_labels=0)
    assert "chunked_loss" in long.long_context.techniques  # 32k x 128,256 logits cannot fit 15 GiB
    assert long.long_context.tokens_per_step == 32768 and long.long_context.host_budget == 7 * GiB
    assert "--long_context " + ",".join(long.long_context.techniques) in long.planner_command


def test_a_length_that_cannot_fit_even_with_every_technique_is_refused_before_loading(llama8b_dir, on_a_t4):
    with pytest.raises(DoesNotFitError, match=r"--max_length 131072 does not fit.*longest is \d+ tokens") as err:
        plan_memory(_args(llama8b_dir, "off"), _training_args(), task="abstract", max_length=131072, num_labels=0)
    longest = int(str(err.value).split("longest is ")[1].split()[0])
    assert 0 < longest < 131072 and "python -m hfplug.fit" in str(err.value)


def test_without_a_gpu_explicit_techniques_are_kept_and_auto_is_none(llama8b_dir):
    args = _args(llama8b_dir, "all")
    cls = plan_memory(args, _training_args(), task="decision", max_length=512, num_labels=2)
    assert "chunked_loss" not in cls.long_context.techniques  # all = what applies to a classifier
    assert "tiled_mlp" in cls.long_context.techniques
    assert (
        plan_memory(
            _args(llama8b_dir, "auto"), _training_args(), task="abstract", max_length=512, num_labels=0
        ).long_context.techniques
        == ()
    )
    with pytest.raises(ValueError, match="chunked_loss replaces a causal LM"):
        plan_memory(_args(llama8b_dir, "chunked_loss"), _training_args(), task="ipc", max_length=512, num_labels=9)


def test_off_without_a_gpu_reads_nothing():
    plan = plan_memory(_args("does/not-exist", "off"), _training_args(), task="abstract", max_length=512, num_labels=0)
    assert plan.long_context.techniques == ()


def test_an_out_of_memory_error_names_the_planner_and_settings_that_fit(llama8b_dir, on_a_t4):
    plan = plan_memory(
        _args(llama8b_dir, "off"), _training_args(batch=8), task="abstract", max_length=4096, num_labels=0
    )
    with pytest.raises(DoesNotFitError) as err, plan.oom_hint():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.83 GiB")
    message = str(err.value)
    assert "ran out of memory" in message and "resumes from the last one" in message
    assert "python -m hfplug.fit --model_name_or_path" in message and "--max_length 4096" in message
    assert "--per_device_train_batch_size" in message  # a setting that fits


def test_too_little_host_ram_for_offloading_says_how_much_is_needed(llama8b_dir, on_a_t4):
    args = _args(llama8b_dir, "auto")
    args.max_host_memory = "1GiB"  # 4 of 32 layer inputs at 32k tokens
    with pytest.raises(DoesNotFitError, match=r"1\.0 GiB of host RAM.*give offload_activations (\d+\.\d) GiB") as err:
        plan_memory(args, _training_args(), task="abstract", max_length=32768, num_labels=0)
    assert "--max_host_memory" in str(err.value)
