"""recipes/finetune_hupd.py end to end on the embedded sample and tiny BERT: 1 and 2 processes, resume, bad input."""

import json

import pytest

from conftest import finetune_command, run_command


def _results(out, name):
    return json.loads((out / name).read_text())


def _short(out, *flags):
    """A short training run's flags (the tests need the recipe's behaviour, not its accuracy)."""
    return ("--output_dir", str(out), "--hupd_cache_dir", str(out.parent / "cache"), "--num_train_epochs", "1",
            "--logging_steps", "2", *flags)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short single-process training run, shared by the checks below."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_command(finetune_command(*_short(out)))
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out, proc.stdout


def test_writes_results_model_tokenizer_and_curves(trained):
    out, log = trained
    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json",
                 "model.safetensors", "config.json", "tokenizer.json", "training_curves.png"):
        assert (out / name).is_file(), name
    results = _results(out, "all_results.json")
    assert results["eval_samples"] == 142  # every ACCEPTED/REJECTED validation record of the sample
    assert results["eval_dropped_records"] == 60  # CONT-*, PENDING
    assert {"eval_accuracy", "eval_f1", "eval_precision", "eval_recall", "train_samples"} <= set(results)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "REJECTED", "1": "ACCEPTED"}
    history = _results(out, "trainer_state.json")["log_history"]
    assert any("tokens_per_second" in entry for entry in history), "throughput callback logged nothing"


def test_rerun_resumes_from_last_checkpoint(trained, tmp_path):
    out, _ = trained
    proc = run_command(finetune_command(*_short(out, "--num_train_epochs", "2")))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Resuming from" in proc.stdout and "checkpoint-" in proc.stdout
    state = _results(out, "trainer_state.json")
    assert state["epoch"] == pytest.approx(2.0)


def test_two_processes_train_and_count_every_validation_record_once(trained, tmp_path):
    out, _ = trained
    # Evaluate the same trained model with 1 and with 2 processes: identical metrics.
    one = tmp_path / "eval1"
    two = tmp_path / "eval2"
    eval_flags = ("--model_name_or_path", str(out), "--do_train", "false", "--do_eval", "true")
    p1 = run_command(finetune_command(*_short(one, *eval_flags)))
    assert p1.returncode == 0, p1.stdout[-4000:]
    p2 = run_command(finetune_command(*_short(two, *eval_flags), processes=2))
    assert p2.returncode == 0, p2.stdout[-4000:]
    r1, r2 = _results(one, "eval_results.json"), _results(two, "eval_results.json")
    assert r1["eval_samples"] == r2["eval_samples"] == 142
    for key in ("eval_accuracy", "eval_f1", "eval_precision", "eval_recall"):
        assert r2[key] == pytest.approx(r1[key]), key
    assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=1e-4)

    # And training itself runs with 2 processes (DDP over gloo).
    ddp = tmp_path / "ddp"
    p3 = run_command(finetune_command(*_short(ddp, "--max_steps", "3"), processes=2))
    assert p3.returncode == 0, p3.stdout[-4000:]
    assert _results(ddp, "trainer_state.json")["global_step"] == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--task", "novelty"), "Unknown task 'novelty'"),
        (("--text_fields", "title,drawings"), "Unknown section(s) in text_fields: drawings"),
        (("--train_filing_start_date", "2016/01/01"), "YYYY-MM-DD"),
        (("--train_filing_end_date", "2015-12-01"), "must be after train_filing_start_date"),
        (("--train_filing_start_date", "2019-01-01", "--train_filing_end_date", "2019-02-01"), "selects no records; the HUPD metadata has 600 records filed 2016-01-01 to 2016-01-31"),
        (("--task", "ipc", "--ipcr_label", "G06F"), "at least 2 IPC subclasses"),
        (("--max_length", "1024"), "above this model's limit of 512"),
        (("--model_name_or_path", "assets/no-such-model"), "does not exist"),
        (("--streaming", "true"), "--max_steps"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, flags, message):
    proc = run_command(finetune_command(*_short(tmp_path / "out", *flags)))
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-3000:]


def test_unknown_config_key_is_named(tmp_path, repo):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((repo / "recipes/configs/quickstart.yaml").read_text() + "\nlearning_rte: 0.1\n")
    cmd = finetune_command(*_short(tmp_path / "out"))
    cmd[cmd.index("--config") + 1] = str(cfg)
    proc = run_command(cmd)
    assert proc.returncode != 0
    assert "'learning_rte' (did you mean 'learning_rate'?)" in proc.stdout


def test_ipc_task_reports_top_k(tmp_path):
    out = tmp_path / "ipc"
    proc = run_command(finetune_command(*_short(out, "--task", "ipc", "--max_steps", "4", "--group_by_length", "true")))
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = _results(out, "eval_results.json")
    assert {"eval_top1_accuracy", "eval_top5_accuracy", "eval_accuracy", "eval_f1"} <= set(results)
    assert results["eval_top1_accuracy"] == pytest.approx(results["eval_accuracy"])
    assert results["eval_top5_accuracy"] >= results["eval_top1_accuracy"]
    assert "Task ipc: 8 labels" in proc.stdout


def test_streaming_trains_with_max_steps(tmp_path):
    out = tmp_path / "stream"
    proc = run_command(finetune_command(*_short(out, "--streaming", "true", "--max_steps", "3", "--do_eval", "false")))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert _results(out, "trainer_state.json")["global_step"] == 3
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "streaming must not build the Arrow cache"


# --- 4-bit + LoRA (issue: Llama-3.1-8B on a T4, here in miniature) ---------------------------

def _tensor_names(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("task", ["decision", "ipc"])
def test_4bit_lora_llama_trains_head_saves_adapter_and_reloads_identically(tmp_path, tiny_llama_dir, task):
    out = tmp_path / "qlora"
    flags = ("--model_name_or_path", str(tiny_llama_dir), "--quant", "4bit", "--lora", "true", "--lora_r", "8",
             "--task", task, "--max_length", "128", "--max_steps", "6", "--learning_rate", "0.001",
             "--activation_checkpointing", "true")
    proc = run_command(finetune_command(*_short(out, *flags)))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "padding with '<|finetune_right_pad_id|>'" in proc.stdout  # Llama has no pad token
    assert "optim=paged_adamw_8bit" in proc.stdout
    # Only the adapter (+ the trained classification head) is saved, not the 4-bit base.
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    names = _tensor_names(out / "adapter_model.safetensors")
    assert any("lora_A" in n for n in names)
    assert any(".score." in n for n in names), names  # the head trained and travels with the adapter
    trained_eval = _results(out, "eval_results.json")

    # --do_eval from the saved adapter: the same logits, so the same loss and metrics.
    again = tmp_path / "reload"
    reload_flags = ("--model_name_or_path", str(out), "--quant", "4bit", "--task", task, "--max_length", "128",
                    "--do_train", "false", "--do_eval", "true")
    proc = run_command(finetune_command(*_short(again, *reload_flags)))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Loading the LoRA adapter" in proc.stdout
    reloaded = _results(again, "eval_results.json")
    assert reloaded["eval_loss"] == pytest.approx(trained_eval["eval_loss"], rel=1e-6)
    assert reloaded["eval_accuracy"] == trained_eval["eval_accuracy"]


def test_lora_on_an_encoder_with_8bit(tmp_path):
    out = tmp_path / "bert8"
    proc = run_command(finetune_command(*_short(out, "--quant", "8bit", "--lora", "true", "--max_steps", "3")))
    assert proc.returncode == 0, proc.stdout[-4000:]
    names = _tensor_names(out / "adapter_model.safetensors")
    assert any(".classifier." in n for n in names), names


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--quant", "4bit"), "cannot be fully fine-tuned"),
        (("--lora", "true", "--lora_target_modules", "q_proj,v_proj"), "Its linear layers are: dense, key, query, value"),
        (("--quant", "3bit"), "quant"),
    ],
)
def test_model_option_errors(tmp_path, flags, message):
    proc = run_command(finetune_command(*_short(tmp_path / "out", *flags)))
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-3000:]


# --- Kill-safe resume and time budget (Colab ends sessions without warning) ---------------------

def _direct_command(*flags):
    """The recipe without the accelerate launcher, so a signal reaches the training process itself."""
    import sys

    from conftest import QUICKSTART, REPO

    return [sys.executable, str(REPO / "recipes" / "finetune_hupd.py"), "--config", str(QUICKSTART), *flags]


def _final(out):
    history = _results(out, "trainer_state.json")["log_history"]
    last_loss = [e for e in history if "loss" in e][-1]
    return last_loss["step"], last_loss["loss"], _results(out, "eval_results.json")["eval_loss"]


def test_sigterm_saves_and_the_same_command_resumes_to_the_same_result(tmp_path):
    import signal
    import subprocess

    flags = ("--max_steps", "40", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
             "--hupd_cache_dir", str(tmp_path / "cache"), "--disable_tqdm", "true")
    straight = tmp_path / "straight"
    proc = run_command(_direct_command(*flags, "--output_dir", str(straight)))
    assert proc.returncode == 0, proc.stdout[-3000:]

    killed = tmp_path / "killed"
    command = _direct_command(*flags, "--output_dir", str(killed))
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in child.stdout:  # wait until training has taken a few steps, then "preempt" it
        lines.append(line)
        if "'loss'" in line and len([x for x in lines if "'loss'" in x]) >= 3:
            child.send_signal(signal.SIGTERM)
            break
    lines += child.stdout.readlines()
    log = "".join(lines)
    assert child.wait(timeout=120) == 128 + signal.SIGTERM, log[-3000:]
    assert "Stopped by SIGTERM" in log and "run the same command again" in log
    checkpoints = sorted(killed.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and 3 <= int(checkpoints[0].name.split("-")[1]) < 40

    proc = run_command(command)  # the same command again
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"Resuming from {checkpoints[0]}" in proc.stdout
    step, loss, eval_loss = _final(killed)
    s_step, s_loss, s_eval_loss = _final(straight)
    assert step == s_step == 40
    assert loss == pytest.approx(s_loss, abs=1e-4)
    assert eval_loss == pytest.approx(s_eval_loss, abs=1e-4)


def test_half_written_checkpoint_is_skipped_and_other_arguments_refused(trained, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    broken = out / "checkpoint-999"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")  # killed before trainer_state.json was written
    proc = run_command(finetune_command(*_short(out, "--num_train_epochs", "2")))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Skipping" in proc.stdout and "checkpoint-999: it is incomplete" in proc.stdout
    assert "Resuming from" in proc.stdout

    proc = run_command(finetune_command(*_short(out, "--num_train_epochs", "3", "--max_length", "64")))
    assert proc.returncode != 0
    assert "max_length: 128 in the checkpoint, 64 now" in proc.stdout


def test_time_budget_stops_cleanly_with_a_checkpoint(tmp_path):
    out = tmp_path / "budget"
    proc = run_command(finetune_command(*_short(out, "--time_budget", "61s", "--num_train_epochs", "100",
                                                "--save_strategy", "no")))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Time budget reached at step" in proc.stdout
    assert len(list(out.glob("checkpoint-*"))) == 1 and (out / "train_results.json").is_file()


def test_time_budget_too_short_to_save(tmp_path):
    proc = run_command(finetune_command(*_short(tmp_path / "out", "--time_budget", "30s")))
    assert proc.returncode != 0
    assert "leaves no time to train" in proc.stdout
