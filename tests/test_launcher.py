"""Which launcher started the process: its death reaches the trainer, its command resumes the run, it is ended quietly.

The end-to-end checks (a launcher killed alone, a failed run under ``accelerate launch``) are in
tests/test_finetune_hupd.py and tests/test_cli.py.
"""

import os
import signal
import subprocess
import sys

import pytest

from hfplug import launcher

SIMPLE = {
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
}  # as accelerate's simple launcher sets


def test_the_simple_launcher_is_told_by_its_environment():
    assert launcher.launched_by_accelerate_simple_launcher(SIMPLE)
    assert not launcher.launched_by_accelerate_simple_launcher({**SIMPLE, "TORCHELASTIC_RUN_ID": "none"})  # torchrun
    assert not launcher.launched_by_accelerate_simple_launcher({})


# --- issue 10.1: the launcher's death reaches the trainer ------------------------------------------


def test_under_a_launcher_the_parent_death_signal_is_sigterm():
    code = (
        "import ctypes, signal; from hfplug.launcher import follow_launcher; print(follow_launcher()); "
        "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID")}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    launched = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "ACCELERATE_USE_CPU": "True"},
        capture_output=True,
        text=True,
        check=True,
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    assert plain.stdout.split() == ["False", "0"]
    assert launched.stdout.split() == ["True", str(int(signal.SIGTERM))]


def test_a_launcher_gone_before_follow_launcher_is_noticed(monkeypatch):
    received = []
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setattr(launcher, "_following", True)  # prctl itself is covered above, in a child process
    monkeypatch.setattr(launcher, "_PARENT_AT_START", os.getppid() + 100000)  # "the parent changed"
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        assert launcher.follow_launcher() is True
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]


# --- resuming: the launcher's own command line -------------------------------------------------------


def test_resume_command_quotes_every_word(monkeypatch):
    monkeypatch.setattr(
        launcher,
        "_LAUNCHER_ARGV",
        [
            "accelerate",
            "launch",
            "--config_file",
            "my configs/cpu.yaml",
            "recipes/finetune_hupd.py",
            "--output_dir",
            "out dir;rm",
        ],
    )
    assert launcher.resume_command() == (
        "accelerate launch --config_file 'my configs/cpu.yaml' recipes/finetune_hupd.py --output_dir 'out dir;rm'"
    )
    monkeypatch.setattr(launcher, "_LAUNCHER_ARGV", None)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("sys.argv", ["recipe.py", "--output_dir", "a b"])
    assert launcher.resume_command() == "python recipe.py --output_dir 'a b'"


# --- failing: only accelerate's simple launcher is ended ---------------------------------------------


@pytest.mark.parametrize(
    "env, parent_argv, ended",
    [
        (SIMPLE, ["/venv/bin/python", "/venv/bin/accelerate", "launch", "recipe.py"], True),
        (SIMPLE, ["/venv/bin/python", "-m", "accelerate.commands.launch", "recipe.py"], True),
        (SIMPLE, ["/bin/bash", "run.sh"], False),  # a parent that is not the launcher
        (SIMPLE, None, False),  # no /proc (not Linux)
        ({**SIMPLE, "TORCHELASTIC_RUN_ID": "none"}, ["torchrun", "recipe.py"], False),  # prints no command line
        ({}, ["/venv/bin/accelerate", "launch", "recipe.py"], False),
    ],
)
def test_simple_launcher_pid(monkeypatch, env, parent_argv, ended):
    for name in (*SIMPLE, "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(launcher, "_cmdline", lambda pid: parent_argv if pid == os.getppid() else None)
    assert launcher.simple_launcher_pid() == (os.getppid() if ended else None)


def test_end_launcher_stops_the_parent_and_waits_for_it():
    """A child that ends its parent (the launcher's place) with ``end_launcher``: the parent gets SIGTERM."""
    code = (
        "import os, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
        "'import os; from hfplug.launcher import end_launcher; end_launcher(os.getppid())']); time.sleep(60)"
    )
    parent = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert parent.returncode == -signal.SIGTERM
