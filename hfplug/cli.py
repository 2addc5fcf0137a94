"""How recipes start (imports without the cycle collector) and end: bad input is one ``error:`` paragraph.

``run(main)`` wraps a recipe's ``main()``. Bad input (a wrong flag or key, a missing file,
bad dates, a model that is not there, a Hub refusal) raises ``ValueError``, ``OSError`` or
one of hfplug's Hub/token errors with a message that says what was wrong and what to do;
``run`` prints that message, masked of anything shaped like a token, and exits 2. Any
other exception is a bug and keeps its traceback.

Under ``accelerate launch`` (single process) a non-zero exit makes the launcher raise
``CalledProcessError`` with the child's whole command line: a second traceback under the
message, and a token typed as a flag echoed into the log. So after printing the message
``run`` ends the launcher with SIGTERM (``hfplug.launcher.end_launcher``): the shell gets exit
status 143 and nothing more is printed. Multi-process launches (torchrun) print no command line
and are left alone.

Start-up: each recipe, run as a script, turns the cycle collector off before its other imports
(``gc.disable()``), and ``run`` freezes what they built and turns it back on, the pattern Python's ``gc.freeze``
documentation gives for processes that fork (as DataLoader workers do). Importing torch,
transformers and datasets otherwise triggers about nine full collections, each walking every
object imported so far, and every later full collection walks them again: 3.4 s of the
quickstart's 27 s went to the collector, against 0.2 s now (``gc.callbacks``, 2-core CPU).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from huggingface_hub import errors as hub_errors

from hfplug.hub import HubError
from hfplug.hub.auth import TokenError
from hfplug.hub.redaction import exit_status_for, mask_tokens
from hfplug.launcher import end_launcher, simple_launcher_pid
from hfplug.loading import cause_chain

USER_ERRORS = (ValueError, OSError, HubError, TokenError)
QUICKSTART_COMMAND = "python recipes/finetune_hupd.py --config recipes/configs/quickstart.yaml"

# The ``reason`` of hfplug's own errors (hub.errors, loading.explain_hub_error) when the Hub is out of reach.
_DOWNLOAD_REASONS = ("unreachable", "offline", "offline_not_cached")

_download_hint: str | None = None


def setup_logging(training_args, *names: str) -> None:
    """Log to stdout at the Trainer's process log level; hfplug (and ``names``) say what they decided at INFO.

    ``log_level`` "passive" leaves the libraries at their own level (warning); on the main
    process hfplug's choices (labels, pad token, resume, dropped records) are still shown.
    """
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    ours = logging.INFO if training_args.should_log and training_args.log_level == "passive" else log_level
    for name in ("hfplug", *names):
        logging.getLogger(name).setLevel(ours)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)


def set_download_hint(model: str | None = None, dataset: tuple[str, list[str]] | None = None) -> None:
    """Say what to download when a run needs a Hub file that cannot be fetched (offline, nothing cached).

    ``model`` is a model id or local path (an existing path needs no download); ``dataset``
    is ``(repo_id, [filenames])`` of a Hub dataset repo.
    """
    global _download_hint
    commands = [f"hf download {model}"] if model and not os.path.exists(os.path.expanduser(model)) else []
    if dataset and dataset[1]:
        commands.append(f"hf download {dataset[0]} --repo-type dataset {' '.join(dataset[1])}")
    if not commands:
        _download_hint = None
        return
    _download_hint = (
        "To try hfplug now with nothing to download, run the offline quickstart:\n"
        f"    {QUICKSTART_COMMAND}\n"
        "To run this job later, download what it needs once, on a machine with network (it stays in the "
        "Hugging Face cache; then HF_HUB_OFFLINE=1 runs offline):\n" + "\n".join(f"    {c}" for c in commands)
    )


def _needs_download(err: BaseException) -> bool:
    """True when ``err`` (or its cause) says a Hub file could not be fetched and is not cached."""
    return any(
        isinstance(cause, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled))
        or getattr(cause, "reason", None) in _DOWNLOAD_REASONS
        for cause in cause_chain(err)
    )


def error_message(err: BaseException) -> str:
    """The ``error:`` paragraph for a user error: its message (and notes), masked, plus the download hint."""
    parts = [str(err).strip() or type(err).__name__, *getattr(err, "__notes__", ())]
    if _download_hint and _needs_download(err):
        parts.append(_download_hint)
    return mask_tokens("error: " + "\n".join(parts))


def run(main: Callable[[], int | None]) -> None:
    """Run a recipe's ``main()`` and exit: its return value, or 2 with an ``error:`` paragraph on bad input."""
    _imports_done()
    try:
        status = main()
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, a prompt): no traceback, the usual status
        print("\n[interrupted]", file=sys.stderr)
        _exit(130)
    except USER_ERRORS as err:
        if os.environ.get("HFPLUG_TRACEBACK"):  # for bug reports: the full story
            raise
        sys.stdout.flush()
        print(error_message(err), file=sys.stderr, flush=True)
        status = exit_status_for(err)  # 0 for a token on the command line under the launcher: see there
        if status == 0:
            print(
                "Exiting with status 0 on purpose: under `accelerate launch`, a failing status makes the launcher "
                "print the full command line, token included. Nothing was run.",
                file=sys.stderr,
                flush=True,
            )
        launcher = simple_launcher_pid() if status else None
        if launcher is not None:
            end_launcher(launcher)
        _exit(status)
    _exit(status if isinstance(status, int) else 0)


def _imports_done() -> None:
    """Move everything imported so far out of the cycle collector's sight, then turn it back on.

    The recipe disabled it for its imports (see the module docstring). Modules, classes and
    functions live until the exit anyway; objects created from here on are collected as usual.
    """
    gc.freeze()
    gc.enable()


def _exit(status: int) -> NoReturn:
    """``sys.exit(status)``, sparing the interpreter's shutdown a walk of every object.

    While Python tears its modules down at exit it runs the cycle collector over the whole heap,
    more than once; with torch and transformers loaded that took 2.5 s of every run's exit
    (``python -c "from transformers import Trainer"``, 2-core CPU). One collection now, so that
    cyclic garbage is still finalized (an unclosed file still flushed), then ``gc.freeze()``:
    everything left lives until the exit anyway. The exit then takes 0.35 s.
    """
    gc.collect()
    gc.freeze()
    sys.exit(status)
