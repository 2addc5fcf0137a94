"""recipes/finetune_hupd.py end to end on the embedded sample and tiny BERT: 1 and 2 processes, resume, bad input."""

import json
from pathlib import Path

import pytest
from conftest import finetune_command, qlora_flags, run_command, run_dirs

pytestmark = pytest.mark.slow  # end-to-end recipe runs: skip with -m "not slow"


def _results(out, name):
    return json.loads((out / name).read_text())


def _short(out, *flags):
    """A short training run's flags (the tests need the recipe's behaviour, not its accuracy)."""
    return (*run_dirs(out), "--num_train_epochs", "1", "--logging_steps", "2", *flags)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short single-process training run, shared by the checks below."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_command(finetune_command(*_short(out)))
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out, proc.stdout


def test_writes_results_model_tokenizer_and_curves(trained):
    out, log = trained
    for name in (
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "trainer_state.json",
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "training_curves.png",
    ):
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
        (
            ("--train_filing_start_date", "2019-01-01", "--train_filing_end_date", "2019-02-01"),
            "selects no records; the HUPD metadata has 600 records filed 2016-01-01 to 2016-01-31",
        ),
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
    proc = run_command(
        finetune_command(*_short(out, "--task", "ipc", "--max_steps", "4", "--group_by_length", "true"))
    )
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
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), (
        "streaming must not build the Arrow cache"
    )


# --- 4-bit + LoRA (issue: Llama-3.1-8B on a T4, here in miniature) ---------------------------


def _tensor_names(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("task", ["decision", "ipc"])
def test_4bit_lora_llama_trains_head_saves_adapter_and_reloads_identically(tmp_path, tiny_llama_dir, task):
    out = tmp_path / "qlora"
    flags = (*qlora_flags(tiny_llama_dir), "--task", task, "--max_length", "128", "--max_steps", "6")
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
    reload_flags = (
        "--model_name_or_path",
        str(out),
        "--quant",
        "4bit",
        "--task",
        task,
        "--max_length",
        "128",
        "--do_train",
        "false",
        "--do_eval",
        "true",
    )
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
        (
            ("--lora", "true", "--lora_target_modules", "q_proj,v_proj"),
            "Its linear layers are: dense, key, query, value",
        ),
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

    flags = (
        "--max_steps",
        "40",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--disable_tqdm",
        "true",
    )
    straight = tmp_path / "straight"
    proc = run_command(_direct_command(*flags, *run_dirs(straight)))
    assert proc.returncode == 0, proc.stdout[-3000:]

    killed = tmp_path / "killed"
    command = _direct_command(*flags, *run_dirs(killed))
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
    proc = run_command(
        finetune_command(*_short(out, "--time_budget", "61s", "--num_train_epochs", "100", "--save_strategy", "no"))
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Time budget reached at step" in proc.stdout
    assert len(list(out.glob("checkpoint-*"))) == 1 and (out / "train_results.json").is_file()


def test_time_budget_too_short_to_save(tmp_path):
    proc = run_command(finetune_command(*_short(tmp_path / "out", "--time_budget", "30s")))
    assert proc.returncode != 0
    assert "leaves no time to train" in proc.stdout


# --- issue 10: faults survived --------------------------------------------------------------------


class _Lines:
    """A child's merged output, read by a thread: wait for a line without blocking past a deadline."""

    def __init__(self, stream):
        import threading

        self.lines, self.done = [], threading.Event()
        self._new = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        self.done.set()
        with self._new:
            self._new.notify_all()

    def wait_for(self, predicate, timeout):
        """Until ``predicate(lines so far)`` holds (asserting it does before the output ends or ``timeout`` s)."""
        with self._new:
            assert self._new.wait_for(lambda: predicate(self.lines) or self.done.is_set(), timeout), self.text[-3000:]
            assert predicate(self.lines), self.text[-3000:]

    @property
    def text(self):
        return "".join(self.lines)


def _session_processes(sid):
    """Live (not zombie) processes of session ``sid``."""
    import os

    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


def test_sigterm_to_the_launcher_alone_stops_the_trainer_with_a_checkpoint(tmp_path):
    """`kill <pid of accelerate launch>`: the trainer saves a stop checkpoint and exits; nothing is left running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    from hfplug.training.checkpoints import find_resumable_checkpoint

    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux only")
    out = tmp_path / "out"
    command = finetune_command(
        *_short(
            out,
            "--max_steps",
            "100000",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",
            "--disable_tqdm",
            "true",
        )
    )
    launcher = subprocess.Popen(
        command,
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = _Lines(launcher.stdout)
        output.wait_for(lambda lines: any("'loss'" in x for x in lines), timeout=300)  # training has taken a step
        launcher.send_signal(signal.SIGTERM)  # the launcher alone, as `kill <pid>` does
        assert launcher.wait(timeout=60) == -signal.SIGTERM
        assert output.done.wait(timeout=300), "the trainer is still running: " + output.text[-3000:]
        deadline = time.monotonic() + 60
        while _session_processes(launcher.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_processes(launcher.pid) == [], "an orphan is left running"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = output.text
    assert "Stopped by SIGTERM at step" in log, log[-3000:]
    assert "run the same command again: " in log and "accelerate.commands.launch --config_file" in log
    checkpoint = find_resumable_checkpoint(out)
    assert checkpoint is not None and int(checkpoint.rsplit("-", 1)[1]) >= 1, log[-3000:]


def test_the_best_model_survives_a_kill_and_resume(tmp_path):
    """load_best_model_at_end: killed after a checkpoint and resumed, the run ends on the straight run's best model."""
    import signal
    import subprocess

    from conftest import REPO

    flags = (
        "--max_steps",
        "16",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--load_best_model_at_end",
        "true",
        "--metric_for_best_model",
        "loss",
        "--greater_is_better",
        "true",  # the best is an early checkpoint
        "--disable_tqdm",
        "true",
    )
    straight = tmp_path / "straight"
    proc = run_command(_direct_command(*flags, *run_dirs(straight)))
    assert proc.returncode == 0, proc.stdout[-3000:]

    killed = tmp_path / "killed"
    command = _direct_command(*flags, *run_dirs(killed))
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _Lines(child.stdout)
    try:  # SIGKILL (no stop checkpoint) once step 3 has run: the newest checkpoint is then the best one, step 2
        output.wait_for(lambda lines: sum("'loss'" in x for x in lines) >= 3, timeout=300)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert any(killed.glob("checkpoint-*")), output.text[-3000:]
    proc = run_command(command)  # the same command again
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Resuming from" in proc.stdout
    for state in [killed / "trainer_state.json", *killed.glob("checkpoint-*/trainer_state.json")]:
        assert ".checkpoint-staging" not in state.read_text(), state
    best = _results(killed, "trainer_state.json")["best_model_checkpoint"]
    straight_best = _results(straight, "trainer_state.json")["best_model_checkpoint"]
    assert best == str(killed / Path(straight_best).name) and Path(best).is_dir(), (best, straight_best)
    assert _results(killed, "eval_results.json")["eval_loss"] == pytest.approx(
        _results(straight, "eval_results.json")["eval_loss"], abs=1e-4
    )


def test_rerunning_a_finished_run_trains_nothing(tmp_path):
    import os

    out = tmp_path / "done"
    command = finetune_command(*_short(out, "--max_steps", "3"))
    proc = run_command(command)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    evaluated = _results(out, "eval_results.json")["eval_loss"]

    (out / "eval_results.json").unlink()  # as if the first run had been killed during evaluation
    proc = run_command(command)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Training already finished at step 3" in proc.stdout
    assert "'loss'" not in proc.stdout and "train_runtime" not in proc.stdout  # nothing trained
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert _results(out, "trainer_state.json")["global_step"] == 3
    assert _results(out, "eval_results.json")["eval_loss"] == pytest.approx(evaluated, rel=1e-6)  # the final weights

    before = os.stat(out / "eval_results.json").st_mtime_ns
    proc = run_command(command)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Training already finished at step 3" in proc.stdout and "Evaluation already finished" in proc.stdout
    assert os.stat(out / "eval_results.json").st_mtime_ns == before
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]


def test_a_second_run_on_the_same_output_dir_fails_at_once(tmp_path):
    import os

    from hfplug.training.resilience import OutputDirLock

    out = tmp_path / "busy"
    with OutputDirLock(out):  # "another run" holds the folder
        proc = run_command(finetune_command(*_short(out)))
    assert proc.returncode != 0, proc.stdout[-3000:]  # 2 from the recipe; the launcher reports it as it does
    assert f"error: {out} is in use by another run (pid {os.getpid()} on host " in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and not any(out.glob("checkpoint-*"))
