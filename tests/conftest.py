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


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def run_command(args, *, cwd=REPO, timeout=600, env=None):
    """Run a command as a user would, returning the CompletedProcess (stdout+stderr merged)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(args, cwd=cwd, env=full_env, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finetune_command(*flags, processes=1):
    """``accelerate launch ... recipes/finetune_hupd.py --config quickstart.yaml FLAGS`` on CPU."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml")]
    if processes > 1:
        launch += ["--num_processes", str(processes)]
    return launch + [str(REPO / "recipes" / "finetune_hupd.py"), "--config", str(QUICKSTART), *flags]
