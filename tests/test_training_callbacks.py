"""hfplug.training.callbacks: real Trainer runs on a tiny randomly initialised BERT (CPU, no network)."""

import json
import logging
import sys

import matplotlib.image
import pytest
import torch
from datasets import Dataset
from transformers import (
    BertForSequenceClassification,
    EarlyStoppingCallback,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hfplug.arguments import RunArguments
from hfplug.testing.tiny import tiny_bert_config
from hfplug.training.callbacks import (
    ThroughputCallback,
    TrainingCurvesCallback,
    default_callbacks,
    early_stopping_callback,
    plot_training_curves,
)
from hfplug.training.metrics import compute_metrics_for

NUM_LABELS = 7
SEQ_LEN = 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_data():
    """Random token ids and labels: train 32 rows, eval 16 rows, all of length SEQ_LEN."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        return Dataset.from_dict(
            {
                "input_ids": torch.randint(1, 100, (n, SEQ_LEN), generator=g).tolist(),
                "attention_mask": [[1] * SEQ_LEN] * n,
                "labels": torch.randint(0, NUM_LABELS, (n,), generator=g).tolist(),
            }
        )

    return split(32), split(16)


def tiny_model():
    torch.manual_seed(0)
    config = tiny_bert_config(
        100, hidden_size=32, intermediate_size=64, max_position_embeddings=64, num_labels=NUM_LABELS
    )
    return BertForSequenceClassification(config)


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=6,
        logging_steps=2,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def run(tmp_path, tiny_data, callbacks, compute_metrics=None, **overrides):
    train, evaluation = tiny_data
    args = make_args(tmp_path, **overrides)
    trainer = Trainer(
        model=tiny_model(),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation if args.eval_strategy != "no" else None,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def train_logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def eval_logs(trainer):
    return [e for e in trainer.state.log_history if "eval_loss" in e]


# --- ThroughputCallback + TrainingCurvesCallback together, with eval ------------------------


@pytest.fixture(scope="module")
def trained_with_eval(tmp_path_factory, tiny_data):
    tmp_path = tmp_path_factory.mktemp("with_eval")
    trainer = run(
        tmp_path,
        tiny_data,
        [ThroughputCallback(), TrainingCurvesCallback()],
        compute_metrics=compute_metrics_for("ipc"),
        eval_strategy="steps",
        eval_steps=2,
        gradient_accumulation_steps=2,
    )
    return trainer, tmp_path


def test_throughput_keys_in_every_training_log(trained_with_eval):
    trainer, _ = trained_with_eval
    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == [2, 4, 6]
    for entry in logs:
        assert entry["samples_per_second"] > 0
        assert "tokens_per_second" not in entry  # include_num_input_tokens_seen is "no"
        assert "peak_memory_gib" not in entry  # CPU run


def test_eval_and_summary_logs_get_no_throughput(trained_with_eval):
    trainer, _ = trained_with_eval
    assert len(eval_logs(trainer)) == 3
    for entry in trainer.state.log_history:
        if "loss" not in entry:
            assert "samples_per_second" not in entry and "tokens_per_second" not in entry


def test_curves_png_written_after_training_with_eval(trained_with_eval):
    _, tmp_path = trained_with_eval
    png = tmp_path / "training_curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 100 and height > 100


def test_tokens_per_second_only_when_counting_tokens(tmp_path, tiny_data):
    trainer = run(tmp_path, tiny_data, [ThroughputCallback()], include_num_input_tokens_seen="all")
    logs = train_logs(trainer)
    assert logs
    for entry in logs:
        assert entry["tokens_per_second"] > 0
        # Same interval and every row is SEQ_LEN tokens, so the two rates differ by SEQ_LEN.
        assert entry["tokens_per_second"] / entry["samples_per_second"] == pytest.approx(SEQ_LEN, rel=1e-3)


def test_warns_once_without_token_counting(caplog):
    callback = ThroughputCallback()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    with caplog.at_level(logging.WARNING, logger="hfplug.training.callbacks"):
        for _ in range(2):
            callback.on_train_begin(args, TrainerState(), TrainerControl())
    messages = [r.getMessage() for r in caplog.records if "include_num_input_tokens_seen" in r.getMessage()]
    assert len(messages) == 1


def test_on_log_keeps_log_history_in_step_with_logs():
    """The printer sees ``logs``, trainer_state.json sees ``log_history``: both get the keys."""
    callback = ThroughputCallback()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", per_device_train_batch_size=2)
    state = TrainerState()
    callback.on_train_begin(args, state, TrainerControl())
    state.global_step = 3
    logs = {"loss": float("nan"), "learning_rate": 1e-3}
    state.log_history.append({**logs, "step": 3})  # what Trainer.log does before on_log
    callback.on_log(args, state, TrainerControl(), logs=logs)
    assert logs["samples_per_second"] > 0
    assert state.log_history[-1]["samples_per_second"] == logs["samples_per_second"]
    # An unrelated last entry is left alone.
    state.log_history.append({"something": "else", "step": 4})
    state.global_step = 5
    callback.on_log(args, state, TrainerControl(), logs={"loss": 1.0})
    assert "samples_per_second" not in state.log_history[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_cuda(tmp_path, tiny_data):
    trainer = run(tmp_path, tiny_data, [ThroughputCallback()], use_cpu=False)
    for entry in trainer.state.log_history:
        assert entry["peak_memory_gib"] > 0
        assert entry["peak_reserved_gib"] >= entry["peak_memory_gib"]


# --- TrainingCurvesCallback -----------------------------------------------------------------


def test_no_png_and_no_crash_without_logged_points(tmp_path, tiny_data, caplog):
    with caplog.at_level(logging.WARNING, logger="hfplug.training.callbacks"):
        trainer = run(tmp_path, tiny_data, [TrainingCurvesCallback()], logging_strategy="no", max_steps=2)
    assert not (tmp_path / "training_curves.png").exists()
    assert "train_loss" in trainer.state.log_history[-1]  # only the end-of-training summary
    assert any("No training curves written" in r.getMessage() for r in caplog.records)


def test_plot_training_curves_function(tmp_path):
    history = [
        {"loss": 2.0, "step": 1},
        {"loss": float("nan"), "step": 2},  # skipped, not a crash
        {
            "eval_loss": 1.5,
            "eval_f1": 0.4,
            "eval_runtime": 0.1,
            "eval_samples_per_second": 9.0,
            "epoch": 1.0,
            "step": 2,
        },
        {"loss": 1.0, "step": 3},
        {"train_runtime": 3.0, "train_loss": 1.5, "step": 3},
    ]
    path = tmp_path / "sub" / "curves.png"
    had_pyplot = "matplotlib.pyplot" in sys.modules
    assert plot_training_curves(history, path) == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot  # a notebook's pyplot state is not touched


def test_plot_training_curves_nothing_to_plot(tmp_path):
    path = tmp_path / "curves.png"
    assert plot_training_curves([], path) is None
    assert plot_training_curves([{"train_runtime": 1.0, "train_loss": 0.5, "step": 2}], path) is None
    assert not path.exists()


@pytest.mark.parametrize("filename", ["curves.jpg", "", "/abs/curves.png", None])
def test_curves_callback_rejects_bad_filename(filename):
    with pytest.raises(ValueError, match="relative path ending in .png"):
        TrainingCurvesCallback(filename)


# --- Early stopping ---------------------------------------------------------------------


def constant_metric(eval_pred):
    """A metric that never improves."""
    return {"const": 0.5}


def test_early_stopping_stops_on_a_metric_that_does_not_improve(tmp_path, tiny_data):
    args_kw = dict(
        max_steps=30,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="const",
        greater_is_better=True,
    )
    stopper = early_stopping_callback(2, 0.0, make_args(tmp_path, **args_kw))
    trainer = run(tmp_path, tiny_data, [stopper], compute_metrics=constant_metric, **args_kw)
    # Eval 1 sets the best value; evals 2 and 3 do not improve on it: patience 2 is used up.
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("patience", [None, 0])
def test_early_stopping_off(patience, tmp_path):
    assert early_stopping_callback(patience, 0.0, make_args(tmp_path)) is None


def test_early_stopping_names_every_missing_key(tmp_path):
    args = make_args(tmp_path)  # eval_strategy "no", no best model
    before = args.to_dict()
    with pytest.raises(ValueError) as info:
        early_stopping_callback(3, 0.0, args)
    message = str(info.value)
    assert message.startswith("early_stopping_patience=3 needs")
    for key in ("eval_strategy: steps or epoch (got 'no')", "load_best_model_at_end: true", "metric_for_best_model"):
        assert key in message
    assert args.to_dict() == before  # args are never changed behind the user's back


def test_early_stopping_save_strategy_must_follow_eval(tmp_path):
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="no")
    with pytest.raises(ValueError) as info:
        early_stopping_callback(3, None, args)
    message = str(info.value)
    assert "save_strategy: steps like eval_strategy, or best (got 'no')" in message
    assert "eval_strategy: steps or epoch" not in message


@pytest.mark.parametrize("patience, threshold", [(-1, 0.0), (1.5, 0.0), (True, 0.0), (2, -0.1), (2, float("nan"))])
def test_early_stopping_rejects_bad_values(patience, threshold, tmp_path):
    with pytest.raises(ValueError, match="early_stopping_(patience|threshold) must be"):
        early_stopping_callback(patience, threshold, make_args(tmp_path))


def best_model_args(tmp_path):
    return make_args(
        tmp_path, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="f1"
    )


def test_early_stopping_callback_built_from_valid_args(tmp_path):
    callback = early_stopping_callback(4, 0.01, best_model_args(tmp_path))
    assert isinstance(callback, EarlyStoppingCallback)
    assert (callback.early_stopping_patience, callback.early_stopping_threshold) == (4, 0.01)


# --- default_callbacks ---------------------------------------------------------------------


def test_default_callbacks(tmp_path):
    kinds = [type(cb) for cb in default_callbacks(make_args(tmp_path))]
    assert kinds == [ThroughputCallback, TrainingCurvesCallback]
    run_args = RunArguments(early_stopping_patience=2)
    kinds = [type(cb) for cb in default_callbacks(best_model_args(tmp_path), run_args)]
    assert kinds == [ThroughputCallback, TrainingCurvesCallback, EarlyStoppingCallback]
    with pytest.raises(ValueError, match="early_stopping_patience=2 needs"):
        default_callbacks(make_args(tmp_path), run_args)


# --- Sample generations (--task abstract) ----------------------------------------------------


@pytest.fixture(scope="module")
def llama_parts():
    """A tiny Llama-3-style model, its training chat format and two generation records."""
    from hfplug.data.tasks import encode_abstract_example
    from hfplug.testing.tiny import build_llama3_tokenizer, build_tiny_llama
    from hfplug.training.chat_setup import training_chat_format
    from hfplug.training.generation import generation_records

    tok = build_llama3_tokenizer(["A widget comprising a wheel. 1. A widget."] * 20, vocab_size=300)
    chat_format = training_chat_format(tok)
    examples = [
        encode_abstract_example(chat_format, {"claims": c}, "A widget.", 512) for c in ("1. A widget.", "1. A wheel.")
    ]
    records = generation_records(
        Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}), 2, tok
    )
    return build_tiny_llama(tok, max_position_embeddings=512).eval(), chat_format, records


def test_sample_callback_appends_generations_with_step(tmp_path, llama_parts, caplog):
    from hfplug.training.callbacks import SampleGenerationCallback

    model, chat_format, records = llama_parts
    callback = SampleGenerationCallback(chat_format, records, max_new_tokens=4)
    args = make_args(tmp_path, per_device_eval_batch_size=1)
    with caplog.at_level(logging.INFO, logger="hfplug.training.callbacks"):
        for step in (3, 6):
            callback.on_evaluate(args, TrainerState(global_step=step), TrainerControl(), model=model)
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(line["step"], line["index"], line["reference"]) for line in lines] == [
        (3, 0, "A widget."),
        (3, 1, "A widget."),
        (6, 0, "A widget."),
        (6, 1, "A widget."),
    ]
    assert lines[0]["generated"] == lines[2]["generated"]  # greedy, fixed records: comparable across steps
    assert "Sample generation, step 6, validation record 1" in caplog.text


def test_sample_callback_writes_on_the_main_process_only(tmp_path, llama_parts):
    from hfplug.training.callbacks import SampleGenerationCallback

    model, chat_format, records = llama_parts
    state = TrainerState(global_step=1)
    state.is_world_process_zero = False
    SampleGenerationCallback(chat_format, records).on_evaluate(
        make_args(tmp_path), state, TrainerControl(), model=model
    )
    assert not (tmp_path / "samples.jsonl").exists()


def test_sample_callback_checks_settings_when_built(llama_parts):
    from hfplug.training.callbacks import SampleGenerationCallback, sample_generation_callback

    _, chat_format, records = llama_parts
    with pytest.raises(ValueError, match="at least one record"):
        SampleGenerationCallback(chat_format, [])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        SampleGenerationCallback(chat_format, records, max_new_tokens=0)
    with pytest.raises(ValueError, match="ending in .jsonl"):
        SampleGenerationCallback(chat_format, records, filename="/tmp/samples.jsonl")
    assert sample_generation_callback(chat_format, records, RunArguments(log_samples=0)) is None
    assert len(sample_generation_callback(chat_format, records, RunArguments(log_samples=1)).records) == 1
