"""Keeping Hugging Face tokens out of every output: logs, messages, and the command line.

- ``mask_tokens``: replaces anything shaped like a token, of any length, with ``hf_***``
  (identifiers like ``hf_token`` and ``hf_hub_download`` stay);
- ``TokenRedactingFilter`` / ``install_token_redaction``: the same in the log records of hfplug,
  transformers and huggingface_hub, plus the exact value of every token hfplug resolved
  (``hfplug.hub.auth`` registers each one with ``redactor()``);
- ``refuse_token_flags``: a token on a recipe's command line is refused before anything runs:
  a command line is visible in process lists and shell history, and ``accelerate launch``
  prints it whole when the script exits non-zero. ``hfplug.cli.run`` prints the refusal
  (masked) and picks the exit status (``exit_status_for``): 0 in one case, see there.

A token is never printed, logged, or written anywhere by hfplug. This module imports
nothing of hfplug but ``hfplug.launcher`` (which imports nothing of hfplug): the config
parser and the recipes' exit path (``hfplug.config``, ``hfplug.cli``) use it before anything
else is loaded.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Sequence

from hfplug.launcher import launched_by_accelerate_simple_launcher

TOKEN_SETTINGS_URL = "https://huggingface.co/settings/tokens"
MASK = "hf_***"
# User access tokens: "hf_" + 34 alphanumerics today; 30+ leaves room for other lengths.
# The strict shape: used to refuse pushing a *file* that holds one (a false positive there
# blocks a push, so it stays strict). Log and message redaction uses ``mask_tokens`` instead.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
# Anything starting "hf_": the alphanumeric run after it, an optional "_" right after the run,
# and OAuth access tokens ("hf_oauth_" + alphanumerics). ``_mask_match`` decides which to mask.
_TOKEN_LIKE = re.compile(r"hf_oauth_[A-Za-z0-9]+|hf_([A-Za-z0-9]+)(_?)")
_TOKEN_CHARS = re.compile(r"[A-Z0-9]")
# An all-lowercase run at least this long is masked too (no hfplug/transformers/huggingface_hub
# identifier has a single lowercase word this long after "hf_"; a random token almost surely is).
LOWERCASE_TOKEN_LENGTH = 16
TOKEN_FLAGS = (
    "hub_token",
    "hf_token",
    "token",
    "use_auth_token",
    "auth_token",
    "hub_auth_token",
    "huggingface_token",
    "hugging_face_hub_token",
    "hf_hub_token",
)
REDACTED_LOGGERS = ("hfplug", "transformers", "huggingface_hub")


class TokenOnCommandLineError(ValueError):
    """A Hugging Face token was passed on a recipe's command line. The message never holds the value.

    ``where`` names the flag (``--hub_token``) or the argument's position, never its value.
    ``exit_status`` is what the recipe should exit with (see ``exit_status_for``).
    """

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where

    @property
    def exit_status(self) -> int:
        return exit_status_for(self)


def clean_token(value) -> str | None:
    """Strip whitespace and newlines (pasted tokens often carry them); ``""`` means no token."""
    if value is None:
        return None
    value = str(value).replace("\r", "").replace("\n", "").strip()
    return value or None


# --------------------------------------------------------------------------- masking


def _mask_match(match: re.Match) -> str:
    """Which ``hf_…`` strings are tokens: the rule of ``mask_tokens``.

    Tokens are "hf_" + random letters and digits (34 today; tests and older tokens are
    shorter), never an underscore after the prefix. Ordinary text has identifiers that
    also start with "hf_" (``hf_token``, ``hf_hub_download``, ``hf_xet``, ``--hf_token``):
    lowercase words, often followed by "_". So an "hf_" + alphanumeric run is masked when

    - the run is 16+ characters long, whatever follows it (a real token, even one glued to
      an underscore, or an all-lowercase random one); or
    - the run holds an uppercase letter or a digit and is not followed by "_" (a random
      string of any length, e.g. ``hf_CanaryTok3n``; ``hf_T5_model`` stays).

    What stays is a short all-lowercase word (``hf_token``, ``hf_hub``) or an identifier
    continuing with "_". No left boundary is required: a token right after ``%3D`` (a
    URL-encoded "=") or ``Bearer`` must still be masked. A false positive only turns a
    word into ``hf_***``; a false negative would leak a token, so the rule leans to masking.
    An all-lowercase short token (``hf_abcdef``) is masked only once registered (``add_secret``).
    """
    run = match.group(1)
    if run is None:  # hf_oauth_…
        return MASK
    underscore = match.group(2)
    if len(run) >= LOWERCASE_TOKEN_LENGTH or (not underscore and _TOKEN_CHARS.search(run)):
        return MASK + underscore
    return match.group(0)


def mask_tokens(text) -> str:
    """``text`` with every Hugging Face token-shaped string (any length) replaced by ``hf_***``.

    See ``_mask_match`` for the rule (``hf_`` + letters/digits with an uppercase letter or a
    digit, or 16+ characters; ``hf_oauth_…``); identifiers like ``hf_token`` and
    ``hf_hub_download`` are left alone. Registered secrets are masked by ``redact`` as well.
    """
    text = str(text)
    if "hf_" not in text:
        return text
    return _TOKEN_LIKE.sub(_mask_match, text)


def _is_token_shaped(value: str) -> bool:
    """``value`` (quotes and spaces stripped) is a token as a whole, or holds a full-length one."""
    value = value.strip().strip("'\"").strip()
    if TOKEN_PATTERN.search(value):
        return True
    return bool(value) and value.startswith("hf_") and mask_tokens(value) == MASK


# --------------------------------------------------------------------------- tokens on the command line


def _flag_name(arg: str) -> str | None:
    """``--hub-token=x`` -> ``hub_token``; ``None`` for a non-flag."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    return arg.lstrip("-").split("=", 1)[0].replace("-", "_").lower()


def _is_token_flag(name: str | None) -> bool:
    if not name:
        return False
    if name in TOKEN_FLAGS:
        return True
    # argparse accepts unambiguous abbreviations: --hub_tok X is --hub_token X.
    return len(name) >= len("hub_t") and "hub_token".startswith(name)


def command_line_token_message(where: str) -> str:
    """Why a token on the command line is refused, and the three ways to give it instead."""
    return (
        f"A Hugging Face token was given on the command line ({where}); hfplug refuses it and ran nothing. "
        "A command line is visible to other users in process lists, stays in shell history, and is printed "
        "whole by `accelerate launch` when a script fails. Remove it and provide the token in one of these ways: "
        "set the HF_TOKEN environment variable; in Colab, add a secret named HF_TOKEN (key icon in the left panel) "
        "and grant this notebook access; or run `hf auth login` once on this machine. If others can see this "
        f"machine's processes or your shell history, revoke the token at {TOKEN_SETTINGS_URL}."
    )


def refuse_token_flags(argv: Sequence[str] | None = None) -> None:
    """Raise ``TokenOnCommandLineError`` when ``argv`` (default ``sys.argv[1:]``) holds a token.

    Refused: ``--hub_token X`` / ``--hub_token=X`` (also ``--hf_token``, ``--token``,
    ``--use_auth_token`` and the like, dashes or underscores, and argparse abbreviations
    such as ``--hub_tok``) with a non-empty value, and any argument, or ``--flag=`` value,
    that is shaped like a token (``mask_tokens``' rule; a full-length one anywhere inside it).
    The message names the flag or the argument's position, never the value, and says how
    to provide the token instead. Each value found is registered with the redaction filter,
    so a later log line cannot show it either. Call it before parsing arguments.
    """
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    found: list[tuple[str, str]] = []  # (where, value)
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = _flag_name(arg)
        if _is_token_flag(name):
            flag = arg.split("=", 1)[0]
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = ""
            if clean_token(value):
                found.append((flag, clean_token(value)))
        else:
            value = arg.split("=", 1)[1] if "=" in arg else arg  # --flag=VALUE, NAME=VALUE
            if _is_token_shaped(arg) or _is_token_shaped(value):
                label = (
                    f"the value of {mask_tokens(arg.split('=', 1)[0])}"
                    if name and value != arg
                    else f"argument {i + 1}"
                )
                found.append((label, clean_token(value) or arg))
        i += 1
    if not found:
        return
    for _, value in found:
        redactor().add_secret(value)
    where = "; ".join(w for w, _ in found)
    raise TokenOnCommandLineError(command_line_token_message(where), where)


# --------------------------------------------------------------------------- exiting without leaking

USAGE_ERROR_STATUS = 2


def exit_status_for(err: BaseException) -> int:
    """The exit status for a user error: 2 (a usage error), except in one case, 0.

    The exception: a ``TokenOnCommandLineError`` under accelerate's simple launcher. Any
    non-zero status there makes ``accelerate launch`` print the command line, token included,
    after our masked refusal (see ``hfplug.launcher.launched_by_accelerate_simple_launcher``). Options weighed:
    killing the launcher (SIGTERM to the parent) leaves status 143 and prints nothing, but
    signals a process we do not own, and a wrapper above it (``subprocess.run(check=True)``,
    CI) still echoes its own command line, token included, on the failure; ``--quiet`` is the
    user's to pass. Exiting 0 is the only way the token is printed by no one. It costs a
    success status for a run that did nothing, which the printed error (and the note that
    the status is 0 on purpose) says; nothing was trained or pushed, so nothing downstream
    finds a half-made result. Everywhere else (plain ``python``, torchrun) the status is 2.
    """
    if isinstance(err, TokenOnCommandLineError) and launched_by_accelerate_simple_launcher():
        return 0
    return USAGE_ERROR_STATUS


# --------------------------------------------------------------------------- redaction


class TokenRedactingFilter(logging.Filter):
    """Masks Hugging Face tokens in log records: the message, its args, and formatted tracebacks.

    Masks anything shaped like a token, of any length (``mask_tokens``: ``hf_`` + letters and
    digits with an uppercase letter or a digit, or 16+ long; identifiers like ``hf_token``
    stay) and the exact value of every registered secret (``add_secret``). A record that
    needed masking has its message formatted and replaced (``args`` cleared); other
    records pass through untouched. Never drops a record.
    """

    def __init__(self):
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add_secret(self, value: str | None) -> None:
        """Mask this exact value from now on (values shorter than 8 characters are ignored)."""
        if value and len(value) >= 8:
            with self._lock:
                self._secrets.add(value)

    def redact(self, text: str) -> str:
        """``text`` with every registered secret and token-shaped string replaced by ``hf_***``."""
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return mask_tokens(text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let the handler report it as usual
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


_REDACTOR = TokenRedactingFilter()


def redactor() -> TokenRedactingFilter:
    """The process-wide filter that ``install_token_redaction`` installs."""
    return _REDACTOR


def redact(text: str) -> str:
    """``text`` with tokens masked (registered secrets and anything token-shaped)."""
    return _REDACTOR.redact(text)


def _add_once(target, flt: logging.Filter) -> None:
    if flt not in target.filters:
        target.addFilter(flt)


def install_token_redaction(*secrets: str | None, loggers=REDACTED_LOGGERS) -> TokenRedactingFilter:
    """Mask tokens in the log output of hfplug, transformers and huggingface_hub. Safe to call again.

    Puts the filter on each named logger, on its existing child loggers, on their
    handlers, and on the root logger's handlers (where ``hfplug.*`` records end up after
    propagating; a logger's own filter does not see records of its children). Call it
    after logging is configured so that the handlers exist. ``secrets`` are extra
    values to mask (tokens are also registered when ``resolve_token`` finds them).
    """
    flt = redactor()
    for secret in secrets:
        flt.add_secret(secret)
    prefixes = tuple(loggers)
    names = set(prefixes) | {
        name for name in logging.root.manager.loggerDict if name.startswith(tuple(p + "." for p in prefixes))
    }
    for name in sorted(names):
        log = logging.getLogger(name)
        _add_once(log, flt)
        for handler in log.handlers:
            _add_once(handler, flt)
    for handler in logging.getLogger().handlers:
        _add_once(handler, flt)
    return flt
