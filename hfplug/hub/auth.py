"""Hugging Face tokens: where hfplug finds one, and what the Hub says it may do.

Resolution order (first hit wins), see ``resolve_token``:

1. the ``token`` argument (e.g. ``hub_token`` from a ``--config`` file, taken out of ``TrainingArguments``;
   ``--hub_token`` on the command line is refused by ``hfplug.hub.redaction.refuse_token_flags``);
2. the ``HF_TOKEN`` environment variable (or the legacy ``HUGGING_FACE_HUB_TOKEN``);
3. the Colab secret ``HF_TOKEN`` (only when running in Colab; ``google.colab`` is imported lazily);
4. the token cached by ``hf auth login`` (``huggingface_hub.get_token()``: the token file under ``HF_HOME``);
5. a hidden prompt (``getpass``), only when a token is *required* and stdin is a terminal.

Every resolved token is registered with the log redaction filter (``hfplug.hub.redaction``).

What a token may do is asked of the Hub with ``HfApi.whoami`` (who it is, its role and
fine-grained scopes: ``write_access_problem`` reads them) and ``HfApi.auth_check`` (may it
read this repo), each given up after ``HTTP_TIMEOUT`` seconds so that a dead network fails
fast. Failures come out as huggingface_hub's own errors; ``hfplug.hub.errors.hub_call``
turns them into messages.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
import threading
from dataclasses import dataclass, field

from hfplug import __version__
from hfplug.hub.errors import repo_label
from hfplug.hub.redaction import TOKEN_SETTINGS_URL, clean_token, redactor

logger = logging.getLogger(__name__)

HUB_URL = "https://huggingface.co"
HTTP_TIMEOUT = 10.0  # seconds for each check: a dead network fails fast, not after minutes
ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
COLAB_SECRET = "HF_TOKEN"

SOURCE_ARGUMENT = "the token argument (hub_token in a --config file, or token= in Python)"
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


def in_colab() -> bool:
    """True inside a Colab notebook kernel (which imports ``google.colab`` at startup).

    A script launched from a cell (``!python ...``) is not the kernel: Colab's secret store
    answers only the kernel, so there the token must come from ``HF_TOKEN`` (see docs/tokens.md).
    """
    return "google.colab" in sys.modules


def _token_from_env() -> str | None:
    for name in ENV_VARS:
        value = clean_token(os.environ.get(name))
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
        return clean_token(userdata.get(COLAB_SECRET))
    except Exception as err:  # SecretNotFoundError, NotebookAccessError, or Colab's own errors
        # The class name says which (missing secret / access not granted); the value is never in it.
        logger.info(
            "Colab secret %s not available (%s); trying the cached login next.", COLAB_SECRET, type(err).__name__
        )
        return None


def _token_from_login() -> str | None:
    """The token ``hf auth login`` cached (huggingface_hub's token file under ``HF_HOME``)."""
    from huggingface_hub import constants, get_token

    if in_colab():  # get_token() would ask Colab's secret store a second time (another access popup)
        try:
            return clean_token(open(constants.HF_TOKEN_PATH, encoding="utf-8").read())
        except FileNotFoundError:
            return None
    return clean_token(get_token())


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # closed or replaced stdin
        return False


def _token_from_prompt() -> str | None:
    """Ask for a token with echo off (``getpass``)."""
    value = getpass.getpass(f"Hugging Face token (input hidden; create one at {TOKEN_SETTINGS_URL}): ")
    return clean_token(value)


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
        (SOURCE_ARGUMENT, lambda: clean_token(token)),
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


def resolve_token(
    token: str | None = None, *, required: bool = False, prompt: bool = True, purpose: str = "this step"
) -> str | None:
    """The token value from ``resolve_token_with_source`` (``None`` when none and not required)."""
    found = resolve_token_with_source(token, required=required, prompt=prompt, purpose=purpose)
    return found.value if found else None


# --------------------------------------------------------------------------- what the Hub says a token may do


def hub_api(endpoint: str | None = None):
    """An ``HfApi`` for ``endpoint`` (default: ``HF_ENDPOINT``, else the Hub) that names hfplug in its user agent."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, library_name="hfplug", library_version=__version__)


def _within(timeout: float, call, *args, **kwargs):
    """``call(*args, **kwargs)``, or ``TimeoutError`` when it has not returned after ``timeout`` seconds.

    huggingface_hub's ``whoami`` and ``auth_check`` take no timeout (its HTTP client waits forever),
    so the call runs in a daemon thread that is left behind, not waited for, when the deadline passes.
    """
    result: dict = {}

    def target():
        try:
            result["value"] = call(*args, **kwargs)
        except BaseException as err:  # handed to the caller's thread below
            result["error"] = err

    worker = threading.Thread(target=target, name="hfplug-hub-check", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def whoami(found: ResolvedToken, *, endpoint: str | None = None, timeout: float = HTTP_TIMEOUT) -> dict:
    """``HfApi.whoami`` for this token: the account, its organizations and roles, the token's role and scopes."""
    api = hub_api(endpoint)
    return _within(timeout, api.whoami, token=found.value)


def auth_check(
    repo_id: str, found: ResolvedToken | None, *, endpoint: str | None = None, timeout: float = HTTP_TIMEOUT
) -> None:
    """``HfApi.auth_check``: may this token (or no token) read the model ``repo_id``? Raises huggingface_hub's errors."""
    api = hub_api(endpoint)
    _within(timeout, api.auth_check, repo_id, token=found.value if found else False)


def _scoped_writes(access: dict) -> list[tuple[str, str]]:
    """``(entity type, entity name)`` of every fine-grained scope that grants ``repo.write``."""
    scoped = (access.get("fineGrained") or {}).get("scoped") or []
    return [
        ((entry.get("entity") or {}).get("type", ""), (entry.get("entity") or {}).get("name", ""))
        for entry in scoped
        if "repo.write" in (entry.get("permissions") or [])
    ]


def token_access(who: dict) -> dict:
    """The token part of a ``whoami`` answer (``role``, ``displayName``, ``fineGrained``)."""
    return (who.get("auth") or {}).get("accessToken") or {}


def write_access_problem(
    who: dict, repo_id: str, *, source: str = "this token", repo_type: str = "model"
) -> tuple[str, str] | None:
    """Why this ``whoami`` answer cannot push to ``repo_id``, as ``(reason, message)``; ``None`` if it can.

    Reads the account (``name``, ``orgs[].roleInOrg``) and the token
    (``auth.accessToken.role``: ``read`` / ``write`` / ``fineGrained``; for fine-grained tokens the
    ``fineGrained.scoped`` entries granting ``repo.write`` on a user, an org or this repo, whose
    entity type must be ``repo_type``: ``model`` or ``dataset``).
    """
    namespace = repo_id.split("/")[0]
    repo = repo_label(repo_id, repo_type)
    user = who.get("name", "?")
    orgs = {org.get("name"): org.get("roleInOrg") for org in who.get("orgs") or []}
    access = token_access(who)
    role = access.get("role")
    token_name = f" ('{access['displayName']}')" if access.get("displayName") else ""
    if namespace != user and namespace not in orgs:
        return "no_rights", (
            f"The token from {source}{token_name} belongs to {user}, who is not a member of the organization "
            f"{namespace!r}, so it cannot push to {repo}. Push to {user}/{repo_id.split('/')[1]} instead, or ask "
            f"an admin of {namespace} to add {user} with the write role, then run again."
        )
    if namespace in orgs and orgs[namespace] == "read":
        return "no_rights", (
            f"{user} has the read role in the organization {namespace}, which cannot create or write repos. "
            f"Ask an admin of {namespace} for the write role, or push to {user}/{repo_id.split('/')[1]}."
        )
    if role == "read":
        return "read_only", (
            f"The token from {source}{token_name} is read-only; pushing to {repo} needs write access. Create a "
            f"write token, or a fine-grained token with write access to {namespace} (or to this one repo), at "
            f"{TOKEN_SETTINGS_URL}, and use it instead (HF_TOKEN, the Colab secret HF_TOKEN, or `hf auth login`). "
            "Keep the read token for downloads."
        )
    if role == "fineGrained":
        writes = _scoped_writes(access)
        if any(kind in ("user", "org") and name == namespace for kind, name in writes):
            return None
        if any(kind == repo_type and name == repo_id for kind, name in writes):
            return None  # can write the repo; creating it is checked by create_repo
        can = ", ".join(f"{name} ({kind})" for kind, name in writes) or "nothing"
        this_repo = f"the repo {repo_id}" if repo_type == "model" else repo
        return "fine_grained_scope", (
            f"The fine-grained token from {source}{token_name} has no write access to {repo} (it can write to: "
            f"{can}). Edit the token at {TOKEN_SETTINGS_URL}: add 'Write access to contents/settings of all repos' "
            f"under {namespace}, or write access to {this_repo}; or use a write token."
        )
    return None  # classic write tokens, OAuth and unknown kinds: create_repo has the last word
