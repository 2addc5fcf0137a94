"""Which launcher started this process, and living with it: everything hfplug knows about its parent.

A recipe runs under plain ``python``, under ``accelerate launch`` (its simple launcher, a
plain ``Popen``, for one process) or under torch elastic (``torchrun``, and accelerate's
multi-GPU/FSDP/DeepSpeed launches). Three things depend on which:

- stopping (``follow_launcher``): a launcher killed alone must stop the run too, with a
  checkpoint (``hfplug.training.resilience`` calls it);
- resuming (``resume_command``): the command to run again is the launcher's, as read at start;
- failing (``launched_by_accelerate_simple_launcher``, ``simple_launcher_pid``,
  ``end_launcher``): on a non-zero exit the simple launcher prints the child's whole command
  line, token included (``hfplug.hub.redaction.exit_status_for``, ``hfplug.cli.run``).

Only the environment and ``/proc`` are read. This module imports nothing of hfplug, so the
config parser and the exit path use it before anything else is loaded.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# Set by accelerate's simple launcher (accelerate.utils.launch.prepare_simple_launcher_cmd_env)
# for every child, whatever the config; torchrun-based launchers set TORCHELASTIC_RUN_ID as well.
SIMPLE_LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"
# Either one says a launcher started this process: accelerate's simple launcher / torch elastic.
_LAUNCHER_ENV = ("ACCELERATE_USE_CPU", TORCHRUN_ENV)
_PARENT_AT_START = os.getppid()  # read at import, early in the recipe: the launcher
_PR_SET_PDEATHSIG = 1
_following = False


def launched_by_launcher() -> bool:
    """True when ``accelerate launch`` or ``torchrun`` started this process."""
    return any(name in os.environ for name in _LAUNCHER_ENV)


def launched_by_accelerate_simple_launcher(environ=None) -> bool:
    """True when this process looks started by ``accelerate launch``'s simple launcher.

    That launcher (one process, CPU, one GPU, MPS: ``simple_launcher`` in
    ``accelerate/commands/launch.py``) waits for the script and, on any non-zero exit, raises
    ``subprocess.CalledProcessError(cmd=cmd)`` unless ``--quiet`` was given: the traceback
    prints the script's whole argv, token included. The script cannot change what its parent
    prints. torchrun-based launchers (multi-GPU, FSDP, DeepSpeed on one node) report a failed
    script by name only. Detected by the environment the simple launcher sets for every child
    (``SIMPLE_LAUNCHER_ENV``) without torchrun's ``TORCHELASTIC_RUN_ID``. Only the environment
    is read: it is inherited through ``mpirun`` and works where ``/proc`` does not.
    """
    env = os.environ if environ is None else environ
    return all(name in env for name in SIMPLE_LAUNCHER_ENV) and TORCHRUN_ENV not in env


def _cmdline(pid: int) -> list[str] | None:
    """The command line of process ``pid`` (Linux ``/proc``); None where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]


def _set_parent_death_signal(sig: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` when the parent dies (0: nothing). Linux only;
    ``OSError`` when the kernel refuses."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# --------------------------------------------------------------------------- stopping with the launcher

# A process started by `accelerate launch` (one process: its simple launcher, a plain Popen)
# is a child that nobody signals when the launcher alone gets SIGTERM (`kill <launcher pid>`):
# the launcher dies and the trainer trains on, unsupervised. Torch elastic (torchrun, and
# accelerate's multi-GPU/FSDP launches) does forward SIGTERM/SIGINT/SIGHUP/SIGQUIT to its
# workers and SIGKILLs them after --shutdown_timeout (30 s), but not when it is SIGKILLed
# itself. On Linux, prctl(PR_SET_PDEATHSIG) makes the kernel send this process SIGTERM when
# its parent dies, whatever the reason; GracefulStopCallback then saves and stops.


def follow_launcher(sig: int = signal.SIGTERM) -> bool:
    """Get ``sig`` when the launcher that started this process dies (Linux); True when that is arranged.

    Call it early (the recipe does, in its Resume section; ``GracefulStopCallback`` does at the
    start of training). Before training the signal simply ends the process (there is nothing
    to save); during training the callback saves a checkpoint and stops. A launcher that died
    before this call is noticed (the parent changed) and treated the same way. Elsewhere
    (macOS, Windows), it logs how to stop the run properly: signal the whole process group.
    Outside a launcher it does nothing.
    """
    global _following
    if not launched_by_launcher():
        return False
    if not sys.platform.startswith("linux"):
        if not _following:
            _following = True
            pgid = os.getpgid(0) if hasattr(os, "getpgid") else None
            logger.info(
                "To stop this run with a checkpoint, signal its whole process group (kill -TERM -%s), not the "
                "launcher alone: on %s the launcher does not pass signals on.",
                pgid or "<pgid>",
                sys.platform,
            )
        return False
    if not _following:
        try:
            _set_parent_death_signal(sig)
        except OSError as err:
            logger.warning(
                "prctl(PR_SET_PDEATHSIG) failed (%s): stop this run with kill -TERM -%d (its process group).",
                err.strerror,
                os.getpgid(0),
            )
            return False
        _following = True
    if os.getppid() != _PARENT_AT_START or _PARENT_AT_START == 1:  # the launcher died before prctl took effect
        logger.warning(
            "The launcher (pid %d) is gone: stopping%s.",
            _PARENT_AT_START,
            " with a checkpoint" if signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN) else "",
        )
        os.kill(os.getpid(), sig)
    return True


# --------------------------------------------------------------------------- resuming: the launcher's command


def _launcher_argv() -> list[str] | None:
    """The command line of the launcher that started this process (Linux), read while it is alive."""
    argv = _cmdline(_PARENT_AT_START)
    if argv is None:
        return None
    if len(argv) >= 2 and Path(argv[0]).name.startswith("python") and Path(argv[1]).name in ("accelerate", "torchrun"):
        argv = [Path(argv[1]).name, *argv[2:]]  # .../bin/python .../bin/accelerate launch ... -> accelerate launch ...
    return (
        argv if any(word in " ".join(argv[:3]) for word in ("accelerate", "torchrun", "torch.distributed")) else None
    )


_LAUNCHER_ARGV = _launcher_argv() if launched_by_launcher() else None


def resume_command() -> str:
    """How to run this process again, every word quoted with ``shlex.quote``: the launcher's own command line
    when ``accelerate launch``/``torchrun`` started it (as read at start), else ``python`` and its arguments."""
    if _LAUNCHER_ARGV:
        return shlex.join(_LAUNCHER_ARGV)
    args = shlex.join(sys.argv)
    launched = any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "LOCAL_RANK"))
    return f"accelerate launch LAUNCH_FLAGS {args}" if launched else f"python {args}"


# --------------------------------------------------------------------------- failing: ending the simple launcher


def simple_launcher_pid() -> int | None:
    """The pid of the ``accelerate launch`` process that started this one as its only process, else None."""
    if not launched_by_accelerate_simple_launcher():
        return None
    parent = os.getppid()
    argv = _cmdline(parent) or []  # nothing off Linux: leave the launcher alone
    return parent if any("accelerate" in a for a in argv) else None  # `accelerate launch`, `python -m accelerate...`


def end_launcher(pid: int) -> None:
    """SIGTERM to the launcher ``pid`` (this process's parent), then wait up to 1 s until it is gone."""
    try:  # follow_launcher may have asked for SIGTERM when the launcher dies: not now, we are ending anyway
        _set_parent_death_signal(0)
    except (OSError, AttributeError):
        pass
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):  # wait (up to 1 s) until it is gone, so it cannot still print
        if os.getppid() != pid:
            break
        time.sleep(0.02)
