"""Shared fixtures: the repo's embedded assets and a way to run recipes. No test touches the network."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "assets" / "hupd_sample"
TINY_BERT = REPO / "assets" / "tiny-bert"
QUICKSTART = REPO / "recipes" / "configs" / "quickstart.yaml"

# Nothing in the suite may reach the Hub: fail fast instead of waiting on a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def run_command(args, *, cwd=REPO, timeout=600, env=None):
    """Run a command as a user would, returning the CompletedProcess (stdout+stderr merged)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        args, cwd=cwd, env=full_env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finetune_command(*flags, processes=1):
    """``accelerate launch ... recipes/finetune_hupd.py --config quickstart.yaml FLAGS`` on CPU."""
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu.yaml"),
    ]
    if processes > 1:
        launch += ["--num_processes", str(processes)]
    return launch + [str(REPO / "recipes" / "finetune_hupd.py"), "--config", str(QUICKSTART), *flags]


def run_dirs(out) -> tuple[str, ...]:
    """``--output_dir OUT --hupd_cache_dir CACHE``: a recipe run's folder, with the HUPD cache beside it
    (so the runs of one test share it)."""
    return ("--output_dir", str(out), "--hupd_cache_dir", str(Path(out).parent / "cache"))


def qlora_flags(model_dir) -> tuple[str, ...]:
    """The recipe's QLoRA path on a tiny model: 4-bit base, LoRA r=8, activation checkpointing, a learning rate
    that moves a few steps."""
    return (
        "--model_name_or_path",
        str(model_dir),
        "--quant",
        "4bit",
        "--lora",
        "true",
        "--lora_r",
        "8",
        "--learning_rate",
        "0.001",
        "--activation_checkpointing",
        "true",
    )


def sample_texts(n=200):
    """Titles and abstracts of the embedded sample: the text tiny tokenizers are trained on."""
    import json
    import tarfile

    texts = []
    with tarfile.open(SAMPLE_DIR / "sample-jan-2016.tar.gz", "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json") and len(texts) < 2 * n:
                record = json.load(tar.extractfile(member))
                texts += [record["title"], record["abstract"]]
    return texts


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama-3-style causal LM + tokenizer (no pad token, like Llama 3.1), saved like a Hub checkpoint."""
    from hfplug.testing.tiny import build_llama3_tokenizer, build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_llama3_tokenizer(sample_texts(), vocab_size=600, model_max_length=512)
    build_tiny_llama(tokenizer, max_position_embeddings=512).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
