"""finetune_hupd with --push_to_hub against a loopback Hub: checked before training, pushed after, no token anywhere."""

import os

import pytest
from conftest import finetune_command, run_command, run_dirs
from hub_server import HubServer, Token

pytestmark = pytest.mark.slow  # end-to-end recipe runs: skip with -m "not slow"


WRITE = "hf_" + "RecipeWriteToken0123456789abcdefghij"
READ = "hf_" + "RecipeReadOnlyToken0123456789abcdefg"
PUSH = ("--push_to_hub", "true", "--hub_model_id", "alice/hupd-quick")


def _train_and_push(out):
    """Two LoRA steps on the quickstart, then the push: the recipe's command."""
    return finetune_command(*run_dirs(out), "--max_steps", "2", "--lora", "true", *PUSH)


def _env(server, token, tmp_path):
    return {
        "HF_ENDPOINT": server.url,
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": token,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def _all_bytes(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                yield os.path.join(root, name), f.read()


def test_trained_adapter_is_pushed_with_card_and_no_token(tmp_path):
    out = tmp_path / "out"
    with HubServer({WRITE: Token("alice")}, lifetime=300) as server:
        proc = run_command(_train_and_push(out), env=_env(server, WRITE, tmp_path))
        assert proc.returncode == 0, proc.stdout[-4000:]
        pushed = server.files("alice/hupd-quick")
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "all_results.json",
        "training_curves.png",
        "tokenizer.json",
    } <= set(pushed)
    assert "training_args.bin" not in pushed and not any(name.startswith("checkpoint-") for name in pushed)
    card = pushed["README.md"].decode()
    assert "library_name: peft" in card and "HUPD/hupd" in card
    # The token is in no log line, no pushed file and no local output (training_args.bin included).
    assert WRITE not in proc.stdout
    assert not [name for name, data in pushed.items() if WRITE.encode() in data]
    assert not [path for path, data in _all_bytes(out) if WRITE.encode() in data]


def test_read_only_token_fails_before_training(tmp_path):
    out = tmp_path / "out"
    with HubServer({READ: Token("alice", "read")}, lifetime=120) as server:
        proc = run_command(_train_and_push(out), env=_env(server, READ, tmp_path))
    assert proc.returncode != 0
    assert "read-only" in proc.stdout and "https://huggingface.co/settings/tokens" in proc.stdout
    assert READ not in proc.stdout
    assert not (out / "train_results.json").exists() and not list(out.glob("checkpoint-*"))


def test_token_flag_is_refused_under_accelerate_launch_without_echo(tmp_path):
    """Issue 10: `accelerate launch ... --hub_token hf_…` must print the token nowhere, the launcher's error included."""
    short, long = "hf_CanaryTok3n", "hf_" + "CanaryLongToken0123456789abcdefghij"
    out = tmp_path / "out"
    with HubServer({WRITE: Token("alice")}, lifetime=120) as server:
        for flags in (("--hub_token", long), ("--hf_token", short)):  # a TrainingArguments flag, and an unknown one
            command = finetune_command(*run_dirs(out), *PUSH, *flags)
            proc = run_command(command, env=_env(server, WRITE, tmp_path), timeout=300)
            assert short not in proc.stdout and long not in proc.stdout, proc.stdout[-4000:]
            assert "CalledProcessError" not in proc.stdout and "Traceback" not in proc.stdout, proc.stdout[-4000:]
            assert "HF_TOKEN" in proc.stdout and "hf auth login" in proc.stdout
            assert proc.returncode == 0, proc.stdout[-4000:]  # on purpose: hfplug.hub.redaction.exit_status_for
        assert not server.requests  # refused before any Hub call
    assert not (out / "train_results.json").exists()
