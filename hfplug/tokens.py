"""Hugging Face tokens: where hfplug finds one, and keeping it out of every log line.

Resolution order (first hit wins), see ``resolve_token``:

1. the ``token`` argument (e.g. ``--hub_token``, taken out of ``TrainingArguments``);
2. the ``HF_TOKEN`` environment variable (or the legacy ``HUGGING_FACE_HUB_TOKEN``);
3. the Colab secret ``HF_TOKEN`` (only when running in Colab; ``google.colab`` is imported lazily);
4. the token cached by ``hf auth login`` (``huggingface_hub.get_token()``: the token file under ``HF_HOME``);
5. a hidden prompt (``getpass``), only when a token is *required* and stdin is a terminal.

A token is never printed, logged, or written anywhere by hfplug. Every resolved token
is registered with the redaction filter, which masks it (and anything shaped like a
Hugging Face token) in log records; ``install_token_redaction()`` puts that filter on
hfplug's, transformers' and huggingface_hub's loggers and handlers.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

TOKEN_SETTINGS_URL = "https://huggingface.co/settings/tokens"
ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
COLAB_SECRET = "HF_TOKEN"
MASK = "hf_***"
# User access tokens: "hf_" + 34 alphanumerics today; 30+ leaves room for other lengths.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
REDACTED_LOGGERS = ("hfplug", "transformers", "huggingface_hub")

SOURCE_ARGUMENT = "the token argument (--hub_token)"
SOURCE_ENV = "the HF_TOKEN environment variable"
SOURCE_COLAB = "the Colab secret HF_TOKEN"
SOURCE_LOGIN = "the cached login (`hf auth login`)"
SOURCE_PROMPT = "the token typed at the prompt"


class TokenError(RuntimeError):
    """No usable token where one is required; the message lists the ways to provide one."""


@dataclass(frozen=True)
class ResolvedToken:
    """A token and where it came from. ``repr`` and ``str`` never show the value."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"<token from {self.source}>"


def _clean(value) -> str | None:
    """Strip whitespace and newlines (pasted tokens often carry them); ``""`` means no token."""
    if value is None:
        return None
    value = str(value).replace("\r", "").replace("\n", "").strip()
    return value or None


def in_colab() -> bool:
    """True inside a Colab notebook kernel (which imports ``google.colab`` at startup).

    A script launched from a cell (``!python ...``) is not the kernel: Colab's secret store
    answers only the kernel, so there the token must come from ``HF_TOKEN`` (see docs/tokens.md).
    """
    return "google.colab" in sys.modules


def _token_from_env() -> str | None:
    for name in ENV_VARS:
        value = _clean(os.environ.get(name))
        if value:
            return value
    return None


def _token_from_colab() -> str | None:
    """The Colab secret ``HF_TOKEN`` when this notebook was granted access to it, else ``None``."""
    if not in_colab():
        return None
    try:
        from google.colab import userdata  # only exists in Colab
    except ImportError:
        return None
    try:
        return _clean(userdata.get(COLAB_SECRET))
    except Exception as err:  # SecretNotFoundError, NotebookAccessError, or Colab's own errors
        # The class name says which (missing secret / access not granted); the value is never in it.
        logger.info("Colab secret %s not available (%s); trying the cached login next.", COLAB_SECRET, type(err).__name__)
        return None


def _token_from_login() -> str | None:
    """The token ``hf auth login`` cached (huggingface_hub's token file under ``HF_HOME``)."""
    from huggingface_hub import constants, get_token

    if in_colab():  # get_token() would ask Colab's secret store a second time (another access popup)
        try:
            return _clean(open(constants.HF_TOKEN_PATH, encoding="utf-8").read())
        except FileNotFoundError:
            return None
    return _clean(get_token())


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # closed or replaced stdin
        return False


def _token_from_prompt() -> str | None:
    """Ask for a token with echo off (``getpass``)."""
    value = getpass.getpass(f"Hugging Face token (input hidden; create one at {TOKEN_SETTINGS_URL}): ")
    return _clean(value)


def no_token_message(purpose: str = "this step") -> str:
    """What to do when no token was found."""
    return (
        f"No Hugging Face token found, and {purpose} needs one. Provide it in one of these ways: "
        "set the HF_TOKEN environment variable; in Colab, add a secret named HF_TOKEN (key icon in the left "
        "panel) and grant this notebook access; or run `hf auth login` once on this machine. "
        f"Create a token at {TOKEN_SETTINGS_URL} (read access to download gated models; write access, "
        "or a fine-grained token with write access to the target repo, to push)."
    )


def resolve_token_with_source(
    token: str | None = None, *, required: bool = False, prompt: bool = True, purpose: str = "this step"
) -> ResolvedToken | None:
    """The first token found in hfplug's order (see the module docstring), with its source.

    ``required``: raise ``TokenError`` when none is found (after the prompt, which only
    appears when ``prompt`` is true and stdin is a terminal). Otherwise return ``None``.
    The token found is registered with the log redaction filter.
    """
    candidates = (
        (SOURCE_ARGUMENT, lambda: _clean(token)),
        (SOURCE_ENV, _token_from_env),
        (SOURCE_COLAB, _token_from_colab),
        (SOURCE_LOGIN, _token_from_login),
    )
    for source, lookup in candidates:
        value = lookup()
        if value:
            return _found(value, source)
    if required and prompt and _stdin_is_tty():
        value = _token_from_prompt()
        if value:
            return _found(value, SOURCE_PROMPT)
    if required:
        raise TokenError(no_token_message(purpose))
    return None


def _found(value: str, source: str) -> ResolvedToken:
    redactor().add_secret(value)
    logger.debug("Using the Hugging Face token from %s.", source)
    return ResolvedToken(value, source)


def resolve_token(token: str | None = None, *, required: bool = False, prompt: bool = True,
                  purpose: str = "this step") -> str | None:
    """The token value from ``resolve_token_with_source`` (``None`` when none and not required)."""
    found = resolve_token_with_source(token, required=required, prompt=prompt, purpose=purpose)
    return found.value if found else None


# --------------------------------------------------------------------------- redaction


class TokenRedactingFilter(logging.Filter):
    """Masks Hugging Face tokens in log records: the message, its args, and formatted tracebacks.

    Masks anything shaped like a user access token (``hf_`` + 30 or more letters/digits)
    and the exact value of every registered secret (``add_secret``). A record that
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
        return TOKEN_PATTERN.sub(MASK, text)

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
