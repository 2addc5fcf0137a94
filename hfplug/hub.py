"""The Hugging Face Hub side of a run: checked before training, pushed (adapter only) after.

- ``preflight_push``: before any data or model is loaded, resolve the token, ask
  ``whoami``, check the token can write to the target namespace, create the repo — and
  fail within seconds with a message that says what to fix.
- ``check_model_access``: the same early check for *reading* a gated base model (Llama).
- ``push_run``: push a finished ``output_dir`` in one ``upload_folder`` commit: the LoRA
  adapter (or a full fine-tune's weights), tokenizer, ``training_curves.png``, results JSON
  and a model card. Never ``training_args.bin``, checkpoints or optimizer states. Retrying
  is safe: unchanged files are skipped, so a second push of the same run commits nothing.
- ``plan_merge`` / ``merge_adapter_into_base``: ``--merge_adapter`` merges LoRA into the 16-bit base
  (never a 4-bit one), after checking that the base fits in memory.
- ``hub_settings`` / ``take_hub_token``: take ``--push_to_hub`` and ``--hub_token`` out of
  ``TrainingArguments``, so the Trainer neither pushes ``training_args.bin`` nor pickles the token.
- ``hub_push_callback`` (``HubPushCallback``): ``--hub_strategy every_save`` pushes each checkpoint's adapter.

Tokens come from ``hfplug.tokens`` and are passed explicitly to every Hub call.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfplug import __version__
from hfplug.tokens import (
    TOKEN_PATTERN,
    TOKEN_SETTINGS_URL,
    ResolvedToken,
    TokenError,
    redact,
    resolve_token,
    resolve_token_with_source,
)

logger = logging.getLogger(__name__)

HUPD_DATASET = "HUPD/hupd"
HUB_URL = "https://huggingface.co"
HTTP_TIMEOUT = 10.0  # seconds for each preflight request: a dead network fails fast, not after minutes
RETRY_SCRIPT = "python recipes/push_adapter.py"

# What a push sends. Exact top-level names: fnmatch's "*" also matches "/", so no wildcard
# here may reach into checkpoint-*/ folders (NEVER_PUSH excludes every sub-folder anyway).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-[0-9]*-of-[0-9]*.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model-[0-9]*-of-[0-9]*.bin",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
RESULT_FILES = ("training_curves.png", "all_results.json", "train_results.json", "eval_results.json")
CARD_FILE = "README.md"
NEVER_PUSH = (
    "*/*",  # checkpoint-*/, merged/, runs/: only top-level files are pushed
    "training_args.bin",
    "trainer_state.json",
    "optimizer.*",
    "scheduler.*",
    "scaler.*",
    "rng_state*",
    "*.pt",
    "*.pth",
)
TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".yaml", ".yml")  # scanned for tokens before a push
SCAN_LIMIT = 64 * 2**20

TASK_TITLES = {  # model-index task names
    "decision": "Patent acceptance prediction (HUPD decision)",
    "ipc": "IPC subclass classification (HUPD)",
}
TASK_PHRASES = {  # the same, inside a sentence
    "decision": "patent acceptance prediction (ACCEPTED vs REJECTED)",
    "ipc": "main IPC subclass classification",
}


# --------------------------------------------------------------------------- errors


class HubError(RuntimeError):
    """A Hub step that cannot go ahead; the message says what was wrong and what to do.

    ``reason`` names the case in one word (``no_token``, ``invalid_token``, ``read_only``,
    ``fine_grained_scope``, ``no_rights``, ``offline``, ``unreachable``, ``bad_repo_id``, ...).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(redact(message))
        self.reason = reason


class PreflightError(HubError):
    """``--push_to_hub`` cannot work with this token, repo id or network: found before training."""


class ModelAccessError(HubError):
    """The base model cannot be read with this token (gated, missing, or the token is rejected)."""


class PushError(HubError):
    """A push that did not complete. The local output is untouched; the message says how to retry."""


class MergeError(HubError):
    """``--merge_adapter`` refused: a quantized base, not enough memory, or no adapter to merge."""


# --------------------------------------------------------------------------- repo ids and settings


def check_repo_id(repo_id: str | None, *, flag: str = "--hub_model_id") -> str:
    """``repo_id`` stripped, when it is ``name`` or ``namespace/name`` as the Hub allows; else ``PreflightError``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    value = (repo_id or "").strip()
    example = "e.g. alice/hupd-bert-lora (or just hupd-bert-lora for your own namespace)"
    if not value:
        raise PreflightError(f"{flag} is empty: give the repo to push to, {example}.", "bad_repo_id")
    if value.startswith(("http://", "https://")):
        raise PreflightError(f"{flag} {value!r} is a URL; give the repo id only, {example}.", "bad_repo_id")
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise PreflightError(
            f"{flag} {value!r} is not a valid Hub repo id ({err}). Use 'name' or 'namespace/name' with letters, "
            f"digits, '-', '_' and '.', at most 96 characters, {example}.",
            "bad_repo_id",
        ) from None
    return value


@dataclass
class HubSettings:
    """What ``--push_to_hub`` asked for, taken over from ``TrainingArguments`` by hfplug."""

    repo_id: str
    private: bool | None
    strategy: str  # "end" or "every_save"


HONOURED_STRATEGIES = ("end", "every_save")


def take_hub_token(training_args) -> str | None:
    """Remove ``hub_token`` from ``training_args`` and return it (``None`` when not given).

    The Trainer pickles its arguments into every checkpoint's ``training_args.bin``;
    with the token taken out, none of them holds it. Call before building the Trainer.
    """
    token = getattr(training_args, "hub_token", None)
    training_args.hub_token = None
    token = token.strip() if isinstance(token, str) else None
    if token:
        logger.warning(
            "hub_token was given in a config file or as an argument, where config files, notebooks and copies "
            "of them keep it. Prefer the HF_TOKEN environment variable, a Colab secret, or `hf auth login`. "
            "(On the command line, --hub_token is refused.)"
        )
    return token or None


def hub_settings(training_args) -> HubSettings | None:
    """``--push_to_hub`` settings, with the Trainer's own push switched off; ``None`` without ``--push_to_hub``.

    The Trainer's push uploads ``output_dir`` as it is (``training_args.bin`` included);
    hfplug pushes instead (``push_run``, ``HubPushCallback``). ``hub_strategy``: ``end``
    pushes once at the end, ``every_save`` also pushes each checkpoint's adapter;
    ``checkpoint`` and ``all_checkpoints`` would upload optimizer states and are refused.
    """
    if not getattr(training_args, "push_to_hub", False):
        return None
    strategy = getattr(training_args.hub_strategy, "value", training_args.hub_strategy)
    if strategy not in HONOURED_STRATEGIES:
        raise PreflightError(
            f"--hub_strategy {strategy} would upload checkpoint folders (optimizer states, training_args.bin). "
            "hfplug pushes the adapter and results only: use --hub_strategy every_save (push the adapter at each "
            "save) or end (push once at the end). To resume elsewhere, copy output_dir instead.",
            "hub_strategy",
        )
    if getattr(training_args, "hub_revision", None):
        raise PreflightError(
            f"--hub_revision {training_args.hub_revision} is not supported by hfplug's push, which commits to main. "
            "Leave it unset, or push to another repo with --hub_model_id.",
            "hub_revision",
        )
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    settings = HubSettings(check_repo_id(repo_id), training_args.hub_private_repo, strategy)
    training_args.push_to_hub = False
    logger.info("--push_to_hub: hfplug pushes the adapter/model, tokenizer, results and a model card to %s "
                "(hub_strategy=%s); the Trainer's own push is switched off.", settings.repo_id, strategy)
    return settings


# --------------------------------------------------------------------------- HTTP helpers


def _api(endpoint: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, library_name="hfplug", library_version=__version__)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _get(api, path: str, token: str | None, timeout: float):
    """GET ``{endpoint}{path}`` with an explicit token and timeout; raises huggingface_hub's typed errors."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(token=token if token else False, library_name="hfplug", library_version=__version__)
    response = get_session().get(f"{api.endpoint}{path}", headers=headers, timeout=timeout)
    hf_raise_for_status(response)
    return response


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "no answer from the Hub" (refused, reset, timed out, offline mode)."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (httpx2.TransportError, OfflineModeIsEnabled)


def _offline_message(what: str, retry: str) -> str:
    return (f"HF_HUB_OFFLINE=1 is set, so {what} cannot reach the Hub. Unset HF_HUB_OFFLINE (or set it to 0) "
            f"and run again, or leave --push_to_hub out now and push the finished run later with: {retry}")


def _unreachable_message(api, err: BaseException, retry: str) -> str:
    return (f"Could not reach the Hub at {api.endpoint} ({type(err).__name__}: {err}). Check the network "
            f"connection (and HF_ENDPOINT, if set), then run again; or leave --push_to_hub out now and push the "
            f"finished run later with: {retry}")


def _invalid_token_message(found: ResolvedToken) -> str:
    return (f"The Hugging Face token from {found.source} was rejected (401 Unauthorized): it is invalid, expired "
            f"or revoked. Create a new token at {TOKEN_SETTINGS_URL} and replace the one in {found.source}.")


def _whoami(api, found: ResolvedToken, *, timeout: float = HTTP_TIMEOUT, retry: str = "") -> dict:
    """``/api/whoami-v2`` for this token, with each failure turned into a ``PreflightError``."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return _get(api, "/api/whoami-v2", found.value, timeout).json()
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise PreflightError(_invalid_token_message(found), "invalid_token") from None
        raise PreflightError(f"The Hub answered whoami with an error ({status}): {err}", "hub_error") from None
    except _network_errors() as err:
        if _offline():
            raise PreflightError(_offline_message("the token check", retry), "offline") from None
        raise PreflightError(_unreachable_message(api, err, retry), "unreachable") from None


# --------------------------------------------------------------------------- write access


def _scoped_writes(access: dict) -> list[tuple[str, str]]:
    """``(entity type, entity name)`` of every fine-grained scope that grants ``repo.write``."""
    scoped = (access.get("fineGrained") or {}).get("scoped") or []
    return [
        ((entry.get("entity") or {}).get("type", ""), (entry.get("entity") or {}).get("name", ""))
        for entry in scoped
        if "repo.write" in (entry.get("permissions") or [])
    ]


def write_access_problem(who: dict, repo_id: str, *, source: str = "this token") -> tuple[str, str] | None:
    """Why this ``whoami`` answer cannot push to ``repo_id``, as ``(reason, message)``; ``None`` if it can.

    Reads the account (``name``, ``orgs[].roleInOrg``) and the token
    (``auth.accessToken.role``: ``read`` / ``write`` / ``fineGrained``; for fine-grained tokens the
    ``fineGrained.scoped`` entries granting ``repo.write`` on a user, an org or this repo).
    """
    namespace = repo_id.split("/")[0]
    user = who.get("name", "?")
    orgs = {org.get("name"): org.get("roleInOrg") for org in who.get("orgs") or []}
    access = (who.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    token_name = f" ('{access['displayName']}')" if access.get("displayName") else ""
    if namespace != user and namespace not in orgs:
        return "no_rights", (
            f"The token from {source}{token_name} belongs to {user}, who is not a member of the organization "
            f"{namespace!r}, so it cannot push to {repo_id}. Push to {user}/{repo_id.split('/')[1]} instead, or ask "
            f"an admin of {namespace} to add {user} with the write role, then run again."
        )
    if namespace in orgs and orgs[namespace] == "read":
        return "no_rights", (
            f"{user} has the read role in the organization {namespace}, which cannot create or write repos. "
            f"Ask an admin of {namespace} for the write role, or push to {user}/{repo_id.split('/')[1]}."
        )
    if role == "read":
        return "read_only", (
            f"The token from {source}{token_name} is read-only; pushing to {repo_id} needs write access. Create a "
            f"write token, or a fine-grained token with write access to {namespace} (or to this one repo), at "
            f"{TOKEN_SETTINGS_URL}, and use it instead (HF_TOKEN, the Colab secret HF_TOKEN, or `hf auth login`). "
            "Keep the read token for downloads."
        )
    if role == "fineGrained":
        writes = _scoped_writes(access)
        if any(kind in ("user", "org") and name == namespace for kind, name in writes):
            return None
        if any(kind == "model" and name == repo_id for kind, name in writes):
            return None  # can write the repo; creating it is checked by create_repo
        can = ", ".join(f"{name} ({kind})" for kind, name in writes) or "nothing"
        return "fine_grained_scope", (
            f"The fine-grained token from {source}{token_name} has no write access to {repo_id} (it can write to: "
            f"{can}). Edit the token at {TOKEN_SETTINGS_URL}: add 'Write access to contents/settings of all repos' "
            f"under {namespace}, or write access to the repo {repo_id}; or use a write token."
        )
    return None  # classic write tokens, OAuth and unknown kinds: create_repo has the last word


def _create_repo(api, repo_id: str, *, token: ResolvedToken, private: bool | None, who: dict, retry: str) -> str:
    """Create ``repo_id`` (``exist_ok``); its URL. Refusals become ``PreflightError``."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(repo_id, token=token.value, private=private, exist_ok=True, repo_type="model")
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise PreflightError(_invalid_token_message(token), "invalid_token") from None
        if status == 403:
            access = (who.get("auth") or {}).get("accessToken") or {}
            if access.get("role") == "fineGrained":
                raise PreflightError(
                    f"{repo_id} does not exist yet and the fine-grained token from {token.source} may write to it "
                    f"but not create repos in {repo_id.split('/')[0]}. Create the repo at {HUB_URL}/new-model, or give "
                    f"the token write access to all repos under {repo_id.split('/')[0]} at {TOKEN_SETTINGS_URL}.",
                    "fine_grained_scope",
                ) from None
            raise PreflightError(
                f"The Hub refused to create {repo_id} (403 Forbidden): the token from {token.source} has no right to "
                f"create repos in {repo_id.split('/')[0]}. Use a write token of an account that may, at "
                f"{TOKEN_SETTINGS_URL}.",
                "no_rights",
            ) from None
        raise PreflightError(f"The Hub refused to create {repo_id} ({status}): {err}", "create_failed") from None
    except _network_errors() as err:
        raise PreflightError(_unreachable_message(api, err, retry), "unreachable") from None
    if private:
        _warn_if_public(api, repo_id, token)
    return str(url)


def _warn_if_public(api, repo_id: str, token: ResolvedToken) -> None:
    """``--hub_private_repo`` cannot change a repo that already exists: say so when it is public."""
    try:
        info = _get(api, f"/api/models/{repo_id}", token.value, HTTP_TIMEOUT).json()
    except Exception as err:  # informational only
        logger.debug("Could not read %s's visibility: %s", repo_id, type(err).__name__)
        return
    if info.get("private") is False:
        logger.warning("%s already exists and is public; --hub_private_repo only applies to new repos. Make it "
                       "private in its settings (%s/%s/settings) before pushing if it must be.",
                       repo_id, HUB_URL, repo_id)


@dataclass
class PushTarget:
    """Where a run will be pushed, checked by ``preflight_push``. The token never shows in ``repr``."""

    repo_id: str
    url: str
    user: str
    private: bool | None
    token: str = field(repr=False)
    token_source: str
    endpoint: str | None = None


def preflight_push(
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    merge_adapter: bool = False,
    base_model: str | None = None,
    endpoint: str | None = None,
    prompt: bool = True,
    output_dir: str | os.PathLike | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> PushTarget:
    """Check, before any model is loaded, that a push to ``repo_id`` will work; create the repo.

    In order: the repo id's form; offline mode; the token (see ``hfplug.tokens``; the prompt
    only with ``prompt`` and a terminal); ``whoami`` (401 = invalid or revoked); write access
    to the namespace (read-only token, fine-grained scope, organization role); with
    ``merge_adapter``, whether ``base_model`` can be merged in 16-bit in this machine's memory;
    then ``create_repo(exist_ok=True)``, honouring ``private`` for a new repo. A bare ``name``
    becomes ``<user>/name``. Raises ``PreflightError`` (or ``MergeError``) saying what to fix.
    """
    repo_id = check_repo_id(repo_id)
    retry = retry_command(output_dir or "OUTPUT_DIR", repo_id, private=private, merge_adapter=merge_adapter)
    if _offline():
        raise PreflightError(_offline_message(f"the push to {repo_id}", retry), "offline")
    try:
        found = resolve_token_with_source(token, required=True, prompt=prompt, purpose=f"--push_to_hub ({repo_id})")
    except TokenError as err:
        raise PreflightError(str(err), "no_token") from None
    api = _api(endpoint)
    who = _whoami(api, found, timeout=timeout, retry=retry)
    user = who.get("name", "")
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    problem = write_access_problem(who, full_id, source=found.source)
    if problem:
        raise PreflightError(problem[1], problem[0])
    if merge_adapter and base_model:
        plan_merge(base_model, token=found.value)
    url = _create_repo(api, full_id, token=found, private=private, who=who, retry=retry)
    logger.info("Hub preflight passed: %s (token from %s) can push to %s.", user, found.source, url)
    return PushTarget(full_id, url, user, private, found.value, found.source, endpoint)


# --------------------------------------------------------------------------- gated base models


def _looks_like_hub_id(name: str | None) -> bool:
    """``namespace/name`` (or ``name``) that is not an existing local path."""
    if not name or os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")):
        return False
    return bool(re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name))


def check_model_access(model_id: str, token: str | None = None, *, endpoint: str | None = None,
                       timeout: float = HTTP_TIMEOUT) -> None:
    """Check early that ``model_id`` (e.g. a gated Llama) can be read with the resolved token.

    Local paths, and offline mode (the cache is then all there is), are not checked.
    Raises ``ModelAccessError`` for a gated model without access (how to request it), a
    missing or private repo, a rejected token, or an unreachable Hub.
    """
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if not _looks_like_hub_id(model_id) or _offline():
        return
    found = resolve_token_with_source(token, required=False)
    api = _api(endpoint)
    try:
        _get(api, f"/api/models/{model_id}/auth-check", found.value if found else None, timeout)
    except GatedRepoError:
        raise ModelAccessError(_gated_message(api, model_id, found, timeout), "gated") from None
    except RepositoryNotFoundError:
        hint = ("no token was found, so only public models can be read: set HF_TOKEN or run `hf auth login`"
                if found is None else f"the token from {found.source} has no access to it")
        raise ModelAccessError(
            f"Model {model_id!r} was not found on the Hub, or it is private/gated and {hint}. "
            "Check the spelling, or pass a local directory.",
            "not_found",
        ) from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401 and found is not None:
            raise ModelAccessError(_invalid_token_message(found), "invalid_token") from None
        raise ModelAccessError(f"The Hub refused to check access to {model_id} ({status}): {err}", "hub_error") from None
    except _network_errors() as err:
        raise ModelAccessError(
            f"Could not reach the Hub at {api.endpoint} to check access to {model_id} ({type(err).__name__}). "
            "Check the network (and HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use the local cache only.",
            "unreachable",
        ) from None


def _gated_message(api, model_id: str, found: ResolvedToken | None, timeout: float) -> str:
    page = f"{HUB_URL}/{model_id}"
    if found is None:
        return (f"{model_id} is a gated model and no token was found. Request access on {page} (log in, accept the "
                "license, wait for approval), then make a read token of that account available: HF_TOKEN, the Colab "
                "secret HF_TOKEN, or `hf auth login`.")
    message = (f"{model_id} is a gated model and the account of the token from {found.source} has no access yet. "
               f"Open {page}, log in as that account, accept the license / request access, and wait for approval "
               "(you get an email); then run again. A read token is enough to download it.")
    try:  # a fine-grained token may lack the gated-repo permission even when the account has access
        who = _get(api, "/api/whoami-v2", found.value, timeout).json()
        access = (who.get("auth") or {}).get("accessToken") or {}
        if access.get("role") == "fineGrained" and not (access.get("fineGrained") or {}).get("canReadGatedRepos"):
            message += (" Note: this fine-grained token lacks 'Read access to contents of all public gated repos you "
                        f"can access'; enable it at {TOKEN_SETTINGS_URL} (access granted to the account alone is not "
                        "enough for such a token).")
    except Exception:
        pass
    return message


# --------------------------------------------------------------------------- what a run holds


def run_kind(folder: str | os.PathLike) -> str:
    """``adapter`` (PEFT files) or ``model`` (full weights) for a finished run's folder; ``PushError`` otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a directory; pass a run's output_dir.", "no_output")
    if (folder / "adapter_config.json").is_file():
        if not any((folder / name).is_file() for name in ADAPTER_FILES[1:]):
            raise PushError(f"{folder} has adapter_config.json but no adapter weights (adapter_model.safetensors).",
                            "no_output")
        return "adapter"
    if (folder / "config.json").is_file() and any(_matches(p.name, MODEL_FILES[2:]) for p in folder.iterdir()):
        return "model"
    raise PushError(
        f"{folder} holds neither a LoRA adapter (adapter_config.json) nor model weights (config.json + "
        "model.safetensors). Pass the output_dir of a finished run (or one of its checkpoint-N folders).",
        "no_output",
    )


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def allow_patterns(kind: str) -> list[str]:
    """The files a push of this kind sends: weights (adapter or model), tokenizer, results, the card."""
    weights = ADAPTER_FILES if kind == "adapter" else MODEL_FILES
    return [*weights, *TOKENIZER_FILES, *RESULT_FILES, CARD_FILE]


def files_to_push(folder: str | os.PathLike, kind: str) -> list[str]:
    """The top-level files of ``folder`` that a push sends, sorted (the same filter as ``upload_folder``)."""
    folder = Path(folder)
    allow, ignore = allow_patterns(kind), list(NEVER_PUSH)
    return sorted(
        p.name for p in folder.iterdir()
        if p.is_file() and _matches(p.name, allow) and not _matches(p.name, ignore)
    )


def check_no_secrets(folder: str | os.PathLike, names, secrets=()) -> None:
    """Refuse to push a text file that holds a token (a given secret, or anything shaped like one)."""
    for name in names:
        path = Path(folder) / name
        if not name.endswith(TEXT_SUFFIXES) or path.stat().st_size > SCAN_LIMIT:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(secret and secret in text for secret in secrets) or TOKEN_PATTERN.search(text):
            raise PushError(
                f"{path} contains a Hugging Face token (or a string shaped like one); hfplug will not push it. "
                f"Remove the token from that file, revoke it at {TOKEN_SETTINGS_URL} if it was shared, and push again.",
                "token_in_file",
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- model card


def eval_results_for_card(metrics: dict, *, task: str | None, hupd_config: str | None = None) -> list:
    """``EvalResult``s (the card's ``model-index``) from ``eval_results.json``'s metrics."""
    from huggingface_hub import EvalResult

    names = {"accuracy": "Accuracy", "f1": "Macro F1", "precision": "Macro precision", "recall": "Macro recall",
             "loss": "Loss"}
    results = []
    for key in sorted(metrics):
        value = metrics[key]
        metric = key.removeprefix("eval_")
        top_k = re.fullmatch(r"top(\d+)_accuracy", metric)
        if metric not in names and not top_k:
            continue  # runtime, samples/s, counts: not model quality
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        metric_type, label = ("accuracy", f"Top-{top_k.group(1)} accuracy") if top_k else (metric, names[metric])
        results.append(EvalResult(
            task_type="text-classification",
            task_name=TASK_TITLES.get(task or "", "Text classification"),
            dataset_type=HUPD_DATASET,
            dataset_name="HUPD (Harvard USPTO Patent Dataset)",
            dataset_config=hupd_config,
            dataset_split="validation",
            metric_type=metric_type,
            metric_name=label,
            metric_value=round(float(value), 4),
            metric_args={"average": "macro"} if metric in ("f1", "precision", "recall") else None,
        ))
    return results


def _infer_task(metrics: dict, task_type: str | None) -> str | None:
    if task_type == "CAUSAL_LM":
        return None
    if any(re.fullmatch(r"eval_top\d+_accuracy", key) for key in metrics):
        return "ipc"
    return "decision" if metrics or task_type == "SEQ_CLS" else None


def build_model_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    kind: str,
    base_model: str | None = None,
    license: str | None = None,
    task: str | None = None,
    hupd_config: str | None = None,
    step: int | None = None,
    base_gated: bool = False,
):
    """A ``huggingface_hub.ModelCard`` for the run in ``folder``: metadata and how to use it.

    Metadata: ``base_model`` (when it is a Hub id), ``library_name`` (``peft`` for adapters),
    ``datasets: [HUPD/hupd]``, tags, ``license``, ``pipeline_tag`` and the eval metrics as
    ``model-index``. Text: results, how to load it (PEFT snippet), how to evaluate a
    classifier or chat with a causal-LM adapter, and what the repo deliberately lacks.
    Deterministic (no dates), so pushing the same run twice commits nothing new.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    adapter = _read_json(folder / "adapter_config.json")
    task_type = adapter.get("task_type")
    base = base_model or adapter.get("base_model_name_or_path")
    metrics = _read_json(folder / "eval_results.json") or {
        k: v for k, v in _read_json(folder / "all_results.json").items() if k.startswith("eval_")
    }
    task = task or _infer_task(metrics, task_type)
    architectures = _read_json(folder / "config.json").get("architectures") or []
    causal = task_type == "CAUSAL_LM" or (kind != "adapter" and any(a.endswith("ForCausalLM") for a in architectures))
    hub_base = base if _looks_like_hub_id(base) else None
    tags = ["hfplug", "patents", "hupd"] + (["lora", "peft"] if kind == "adapter" else []) + (
        ["merged-lora"] if kind == "merged" else []) + ([] if causal else ["text-classification"])
    data = ModelCardData(
        base_model=hub_base,
        library_name="peft" if kind == "adapter" else "transformers",
        datasets=[HUPD_DATASET],
        license=license or "other",
        tags=tags,
        pipeline_tag="text-generation" if causal else "text-classification",
        model_name=repo_id.split("/")[-1],
        eval_results=(eval_results_for_card(metrics, task=task, hupd_config=hupd_config) or None) if not causal else None,
    )
    body = _card_body(repo_id, kind=kind, base=base, hub_base=hub_base, base_gated=base_gated, causal=causal, task=task,
                      hupd_config=hupd_config, metrics=metrics, adapter=adapter, license=license, step=step,
                      train=_read_json(folder / "train_results.json"), has_curves=(folder / RESULT_FILES[0]).is_file())
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _card_body(repo_id, *, kind, base, hub_base, base_gated, causal, task, hupd_config, metrics, adapter, license, step,
               train, has_curves) -> str:
    """The model card's Markdown text."""
    name = repo_id.split("/")[-1]
    # A local base path is shown by its folder name only (the rest of the path is the trainer's machine).
    base_ref = f"[{base}]({HUB_URL}/{base})" if hub_base else f"the local model `{Path(base).name}`" if base else "its base model"
    what = {"adapter": f"A LoRA adapter for {base_ref}", "merged": f"{base_ref} with a LoRA adapter merged in",
            "model": f"A fine-tune of {base_ref}"}[kind]
    job = TASK_PHRASES.get(task or "", "text generation" if causal else "text classification")
    lines = [f"# {name}", "", f"{what}, trained with hfplug on the Harvard USPTO Patent Dataset "
             f"([{HUPD_DATASET}]({HUB_URL}/datasets/{HUPD_DATASET})) for {job}."]
    if step is not None:
        lines += ["", f"**Training in progress**: this is the checkpoint at step {step}; results follow at the end."]
    if metrics and not causal:
        lines += ["", "## Results", "", f"Validation split{f' of the `{hupd_config}` config' if hupd_config else ''}:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k.removeprefix('eval_')} | {v:.4f} |" for k, v in sorted(metrics.items())
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(
                      ("runtime", "per_second", "samples", "epoch", "dropped_records"))]
    lines += ["", "## How to load it", "", "```python"]
    auto = "ForCausalLM" if causal else "ForSequenceClassification"
    if kind == "adapter":
        lines += [f"from peft import AutoPeftModel{auto}", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModel{auto}.from_pretrained("{repo_id}")  # the base model + this adapter',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
        if not hub_base:
            lines += ["# The adapter was trained on a local base model: load that base yourself, then",
                      f'# PeftModel.from_pretrained(base, "{repo_id}").']
    else:
        lines += [f"from transformers import AutoModel{auto}, AutoTokenizer", "",
                  f'model = AutoModel{auto}.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    lines += ["```"]
    if base_gated:
        lines += ["", f"{base} is gated: request access on {HUB_URL}/{base} first, then log in with a read token "
                  "(`hf auth login`, or the HF_TOKEN environment variable / Colab secret)."]
    if causal:
        lines += ["", "## Chat with it", "", "```bash", f"python recipes/chat.py --adapter {repo_id}", "```"]
    else:
        config = f" --hupd_config {hupd_config}" if hupd_config else ""
        lines += ["", "## Evaluate it", "", "With hfplug, on the same validation split:",
                  "", "```bash", f"accelerate launch recipes/finetune_hupd.py --model_name_or_path {repo_id} "
                  f"--do_train false --do_eval true --task {task or 'decision'}{config} --output_dir eval-{name}",
                  "```", "", "Add the data flags of the training run (filing dates, text_fields, max_length)."]
    lines += _training_section(adapter, train, has_curves)
    lines += ["", "## Files", "", "Weights (" + ("`adapter_model.safetensors` + `adapter_config.json`" if kind ==
              "adapter" else "`model.safetensors` + `config.json`") + "), the tokenizer, the results JSON and "
              "`training_curves.png`. Checkpoints, optimizer states and `training_args.bin` are deliberately not "
              "pushed.", "", f"License: {license or 'the license of the base model applies'}."]
    return "\n".join(lines) + "\n"


def _training_section(adapter: dict, train: dict, has_curves: bool) -> list[str]:
    lines = []
    if adapter:
        targets = adapter.get("target_modules")
        targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
        lines.append(f"- LoRA: r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, "
                     f"dropout={adapter.get('lora_dropout')}, target modules: {targets}")
        if adapter.get("modules_to_save"):
            lines.append(f"- trained in full and saved with the adapter: {', '.join(sorted(set(adapter['modules_to_save'])))}")
    for key in ("epoch", "train_loss", "train_runtime", "train_samples"):
        if isinstance(train.get(key), (int, float)):
            lines.append(f"- {key}: {train[key]:.4g}")
    if has_curves:
        lines.append("- loss and metric curves: `training_curves.png`")
    return ["", "## Training", "", *lines] if lines else []


# --------------------------------------------------------------------------- push


@dataclass
class PushResult:
    """What ``push_run`` did: the repo, the commit (the repo's head when nothing had changed), the files."""

    repo_id: str
    commit_url: str | None
    files: list[str]
    kind: str
    folder: str


def retry_command(output_dir, repo_id: str, *, private: bool | None = None, merge_adapter: bool = False) -> str:
    """The command that pushes this run again (safe to repeat), ready to paste into a shell.

    Every argument is quoted with ``shlex.quote``: Colab's Drive folder is ``/content/drive/My Drive/…``.
    The ``OUTPUT_DIR`` placeholder (no run folder known yet) stays bare.
    """
    command = f"{RETRY_SCRIPT} {shlex.quote(str(output_dir))} --hub_model_id {shlex.quote(str(repo_id))}"
    return command + (" --private" if private else "") + (" --merge_adapter" if merge_adapter else "")


def _push_failure(err: BaseException, repo_id: str, found: ResolvedToken, retry: str, folder: Path) -> PushError:
    """A ``PushError`` that names the cause and how to retry."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    intact = f"The run's files in {folder} are intact (nothing local was deleted)."
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, RepositoryNotFoundError):
        cause, reason = (f"the repo {repo_id} does not exist (deleted?) or the token from {found.source} cannot see "
                         "it; the push script creates it"), "not_found"
    elif isinstance(err, HfHubHTTPError) and status == 401:
        cause, reason = (f"the token from {found.source} was rejected (401): invalid, expired or revoked. Create a new "
                         f"one at {TOKEN_SETTINGS_URL}"), "invalid_token"
    elif isinstance(err, HfHubHTTPError) and status == 403:
        cause, reason = (f"the token from {found.source} may not write to {repo_id} (403). Use a write token, or a "
                         f"fine-grained one with write access to it ({TOKEN_SETTINGS_URL})"), "no_rights"
    elif isinstance(err, HfHubHTTPError):
        cause, reason = f"the Hub answered {status}: {err}", "hub_error"
    elif _offline():
        cause, reason = "HF_HUB_OFFLINE=1 is set; unset it to push", "offline"
    else:
        cause, reason = f"the Hub could not be reached ({type(err).__name__}: {err})", "network"
    return PushError(f"Pushing {folder} to {repo_id} failed: {cause}. {intact} Retry (safe to repeat: files already "
                     f"on the Hub are skipped) with: {retry}", reason)


def _copy_run_files(src: Path, dst: Path) -> None:
    """Tokenizer and result files of ``src`` copied next to merged weights in ``dst``."""
    for name in files_to_push(src, "adapter"):
        if name not in ADAPTER_FILES and name != CARD_FILE:
            shutil.copy2(src / name, dst / name)


def push_run(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    merge_adapter: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    task: str | None = None,
    hupd_config: str | None = None,
    label_names: list[str] | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    step: int | None = None,
) -> PushResult:
    """Push a finished run to ``repo_id`` (``namespace/name``, existing: ``preflight_push`` creates it).

    Sends, in one ``upload_folder`` commit, the adapter files (or the model weights of a full
    fine-tune; with ``merge_adapter``, the base merged with the adapter in 16-bit, saved under
    ``output_dir/merged``), the tokenizer, ``training_curves.png``, the results JSON and a model
    card written to ``README.md``. Checkpoints, optimizer states and ``training_args.bin`` are
    never sent. Files already on the Hub unchanged are skipped, so repeating a push (after a
    failure or an interruption) is safe and a repeated complete push commits nothing.
    ``license``: default, the base model's (read from the Hub), else ``other``.
    On failure, raises ``PushError`` naming the cause and the retry command; local files stay.
    """
    folder = Path(output_dir)
    kind = run_kind(folder)
    repo_id = check_repo_id(repo_id)
    if "/" not in repo_id:
        raise PushError(f"push_run needs the full repo id (namespace/name), got {repo_id!r}; preflight_push returns it.",
                        "bad_repo_id")
    retry = retry_command(output_dir, repo_id, private=private, merge_adapter=merge_adapter)
    try:
        found = resolve_token_with_source(token, required=True, purpose=f"pushing to {repo_id}")
    except TokenError as err:
        raise PushError(f"{err} Nothing was pushed; {folder} is intact. Then retry with: {retry}", "no_token") from None
    api = _api(endpoint)
    if merge_adapter:
        if kind != "adapter":
            raise MergeError(f"--merge_adapter needs a LoRA adapter, but {folder} holds full model weights, which are "
                             "pushed as they are. Leave --merge_adapter out.", "no_adapter")
        base_model = base_model or _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
        merged = merge_adapter_into_base(folder, folder / "merged", base_model=base_model, token=found.value,
                                         label_names=label_names, task=task)
        _copy_run_files(folder, merged)
        folder, kind = merged, "merged"
    base = base_model or _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    facts = _base_facts(api, base, found.value)
    card = build_model_card(folder, repo_id, kind=kind, base_model=base, license=license or facts.get("license"),
                            task=task, hupd_config=hupd_config, step=step, base_gated=bool(facts.get("gated")))
    card.save(folder / CARD_FILE)
    files = files_to_push(folder, "adapter" if kind == "adapter" else "model")
    check_no_secrets(folder, files, secrets=[found.value])
    logger.info("Pushing %d files of %s to %s: %s", len(files), folder, repo_id, ", ".join(files))
    try:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=allow_patterns("adapter" if kind == "adapter" else "model"),
            ignore_patterns=list(NEVER_PUSH),
            commit_message=commit_message or f"Upload {kind} trained with hfplug",
            token=found.value,
        )
    except Exception as err:
        import httpx2

        # HfHubHTTPError (an httpx2.HTTPError), transport errors, OfflineModeIsEnabled and local I/O (OSError).
        # "from None": the cause (an HfHubHTTPError whose text is the server's answer, or a request
        # error naming headers) would be printed unmasked above the PushError in any traceback. The
        # PushError's own message says what the cause was, masked.
        if isinstance(err, (OSError, httpx2.HTTPError)):
            raise _push_failure(err, repo_id, found, retry, folder) from None
        raise
    logger.info("Pushed to %s/%s", api.endpoint, repo_id)
    return PushResult(repo_id, getattr(info, "commit_url", None), files, kind, str(folder))


def _base_facts(api, base: str | None, token: str) -> dict:
    """The base model's ``license`` (from its Hub card) and whether it is ``gated``; best effort, ``{}`` if unknown."""
    if not _looks_like_hub_id(base) or _offline():
        return {}
    try:
        info = _get(api, f"/api/models/{base}", token, HTTP_TIMEOUT).json()
    except Exception as err:
        logger.debug("Could not read the model info of %s (%s).", base, type(err).__name__)
        return {}
    license = (info.get("cardData") or {}).get("license")
    return {"license": license if isinstance(license, str) else None, "gated": bool(info.get("gated"))}


# --------------------------------------------------------------------------- merge


@dataclass
class MergePlan:
    """What merging into ``base_model`` needs: its parameter count, the bytes in 16-bit, what is free."""

    base_model: str
    params: int
    needed_bytes: int
    available_bytes: int
    device: str


MERGE_OVERHEAD = 1.2  # the merged copy being written, the adapter, allocator slack
MERGE_SLACK = 512 * 2**20


def available_memory(device: str = "cpu") -> int:
    """Bytes free for a merge on ``device`` (``cpu``: available RAM; ``cuda``: free GPU memory)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _quantization_of(config) -> str | None:
    """A description of the quantization a checkpoint was saved with, or ``None`` for plain weights."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else getattr(quant, "to_dict", lambda: {})()
    if quant.get("load_in_4bit") or quant.get("bits") == 4:
        return "4-bit"
    if quant.get("load_in_8bit") or quant.get("bits") == 8:
        return "8-bit"
    return str(quant.get("quant_method", "quantized"))


def _quantized_refusal(what: str, quant: str) -> str:
    return (f"Refusing to merge the LoRA adapter into {what}, which is {quant}: the merged weights would be rounded to "
            f"{quant} and lose what the adapter learned (precision loss). Push the adapter (the default), or merge "
            "into the 16-bit base: python recipes/push_adapter.py OUTPUT_DIR --hub_model_id user/name --merge_adapter "
            "--base_model <the original 16-bit model>.")


def _count_params(config) -> int:
    from hfplug.param_counts import parameter_counts

    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    return parameter_counts(config, task="causal_lm" if causal else "decision").total_params


def plan_merge(base_model: str, *, token: str | None = None, device: str = "cpu",
               available_bytes: int | None = None) -> MergePlan:
    """Check that the adapter can be merged into ``base_model`` here: a 16-bit checkpoint that fits in memory.

    Reads ``config.json`` only. Raises ``MergeError`` for a quantized (4-bit/8-bit) checkpoint,
    or when ``params x 2 bytes`` (plus overhead) exceeds the memory available on ``device``.
    """
    from hfplug.loading import ConfigUnavailableError, load_config

    try:
        config = load_config(base_model, token=token)
    except ConfigUnavailableError as err:
        raise MergeError(f"Cannot plan the merge: {err}", "no_base") from None
    quant = _quantization_of(config)
    if quant:
        raise MergeError(_quantized_refusal(f"the checkpoint {base_model}", quant), "quantized_base")
    params = _count_params(config)
    needed = int(params * 2 * MERGE_OVERHEAD) + MERGE_SLACK
    available = available_memory(device) if available_bytes is None else available_bytes
    gib = 2**30
    if needed > available:
        raise MergeError(
            f"Not enough memory to merge the adapter into {base_model}: {params / 1e9:.2f}B parameters in 16-bit need "
            f"~{needed / gib:.1f} GiB on {device}, and {available / gib:.1f} GiB is available. Push the adapter "
            "instead (leave --merge_adapter out; load it with PEFT on top of the base), or merge later on a machine "
            "with more memory: python recipes/push_adapter.py OUTPUT_DIR --hub_model_id user/name --merge_adapter.",
            "memory",
        )
    return MergePlan(base_model, params, needed, available, device)


def check_merge_target(model) -> None:
    """Refuse to merge into a model object loaded in 4-bit or 8-bit (e.g. the QLoRA model just trained)."""
    loaded_4bit = getattr(model, "is_loaded_in_4bit", False)
    loaded_8bit = getattr(model, "is_loaded_in_8bit", False)
    quant = "4-bit" if loaded_4bit else "8-bit" if loaded_8bit else _quantization_of(getattr(model, "config", None))
    if quant:
        raise MergeError(_quantized_refusal("the model in memory", quant), "quantized_base")


def _head_size(adapter_dir: Path, adapter: dict) -> int | None:
    """Number of labels of a classification adapter, from its saved head (``modules_to_save``)."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    heads = set(adapter.get("modules_to_save") or [])
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if key.endswith(".weight") and len(parts) >= 2 and parts[-2] in heads:
                return int(f.get_slice(key).get_shape()[0])
    return None


def _merge_dtype(base_model: str, token: str | None):
    """The dtype to merge in: the checkpoint's own float dtype, else bfloat16. Never quantized."""
    import torch

    from hfplug.loading import load_config

    name = str(getattr(load_config(base_model, token=token), "dtype", None) or "").replace("torch.", "")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.bfloat16)


def merge_adapter_into_base(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    token: str | None = None,
    device: str = "cpu",
    label_names: list[str] | None = None,
    task: str | None = None,
) -> Path:
    """Load ``base_model`` in 16-bit (never quantized), merge the LoRA adapter into it, save to ``out_dir``.

    ``base_model`` defaults to the adapter's ``base_model_name_or_path``; pass the original
    16-bit model when the adapter was trained on a pre-quantized checkpoint. Runs
    ``plan_merge`` first (refuses quantized checkpoints and merges that will not fit).
    Classification adapters get their label count from the saved head; names from
    ``label_names`` (HUPD's decision labels for a 2-class decision task).
    """
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    adapter = _read_json(adapter_dir / "adapter_config.json")
    if not adapter:
        raise MergeError(f"{adapter_dir} has no adapter_config.json: nothing to merge.", "no_adapter")
    base_model = base_model or adapter.get("base_model_name_or_path")
    plan = plan_merge(base_model, token=token, device=device)
    logger.info("Merging the adapter in %s into %s (%.2fB params, ~%.1f GiB needed, %.1f GiB available).",
                adapter_dir, base_model, plan.params / 1e9, plan.needed_bytes / 2**30, plan.available_bytes / 2**30)
    kwargs: dict[str, Any] = {"dtype": _merge_dtype(base_model, token), "token": token}
    task_type = adapter.get("task_type")
    if task_type == "SEQ_CLS":
        model_cls = AutoModelForSequenceClassification
        num_labels = len(label_names) if label_names else _head_size(adapter_dir, adapter)
        if num_labels:
            kwargs["num_labels"] = num_labels
            from hfplug.data.tasks import DECISION_LABELS

            names = label_names or (DECISION_LABELS if num_labels == 2 and task in (None, "decision") else None)
            if names:
                kwargs["id2label"] = dict(enumerate(names))
                kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    else:
        model_cls = AutoModelForCausalLM if task_type == "CAUSAL_LM" else AutoModel
    base = model_cls.from_pretrained(base_model, **kwargs)
    if device != "cpu":
        base = base.to(device)
    check_merge_target(base)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        if merged.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            merged.config.pad_token_id = tokenizer.pad_token_id
    except (OSError, ValueError):
        pass  # no tokenizer saved with the adapter: the config keeps the base's pad token
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- every_save callback


def hub_push_callback(target: PushTarget | None, settings: HubSettings | None, **card_kwargs):
    """A ``HubPushCallback`` for ``--hub_strategy every_save``; ``None`` otherwise (or without a target)."""
    if target is None or settings is None or settings.strategy != "every_save":
        return None
    return _callback_class()(target, **card_kwargs)


def _callback_class():
    """``HubPushCallback``, defined on first use so that importing hfplug.hub does not import transformers."""
    global _HubPushCallback
    if _HubPushCallback is not None:
        return _HubPushCallback
    from transformers import TrainerCallback

    class HubPushCallback(TrainerCallback):
        """``hub_strategy=every_save``: after each checkpoint save, push its adapter (or weights) and a card.

        Only the main process pushes, and only the files ``push_run`` allows (no optimizer
        states, no ``training_args.bin``). A failed push is logged and training goes on; the
        final push at the end sends everything again.
        """

        def __init__(self, target: PushTarget, **card_kwargs):
            if not isinstance(target, PushTarget):
                raise TypeError(f"HubPushCallback needs the PushTarget from preflight_push, got {type(target).__name__}.")
            self.target = target
            self.card_kwargs = card_kwargs

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not checkpoint.is_dir():
                return
            try:
                push_run(checkpoint, self.target.repo_id, token=self.target.token, endpoint=self.target.endpoint,
                         commit_message=f"Training in progress, step {state.global_step}", step=state.global_step,
                         **self.card_kwargs)
            except HubError as err:
                logger.warning("Push of the checkpoint at step %d failed; training goes on and the final push "
                               "will send it all: %s", state.global_step, err)

    _HubPushCallback = HubPushCallback
    return HubPushCallback


_HubPushCallback = None


def __getattr__(name: str):
    if name == "HubPushCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- arguments


@dataclass
class HubArguments:
    """hfplug's Hub flags beside TrainingArguments' ``--push_to_hub``, ``--hub_model_id``, ``--hub_private_repo``."""

    merge_adapter: bool = field(default=False, metadata={
        "help": "Push the base model with the LoRA adapter merged in (loaded in 16-bit; refused for a 4-bit base or "
                "when it will not fit in memory) instead of the adapter alone."})
    merge_base_model: str | None = field(default=None, metadata={
        "help": "The 16-bit model to merge into (default: the adapter's base). Set it when training used a "
                "pre-quantized 4-bit checkpoint."})
    hub_license: str | None = field(default=None, metadata={
        "help": "License for the model card (default: the base model's license on the Hub)."})


__all__ = [
    "HubArguments", "HubError", "HubSettings", "MergeError", "MergePlan", "ModelAccessError",
    "PreflightError", "PushError", "PushResult", "PushTarget", "allow_patterns", "build_model_card",
    "check_merge_target", "check_model_access", "check_no_secrets", "check_repo_id", "files_to_push",
    "hub_push_callback", "hub_settings", "merge_adapter_into_base", "plan_merge", "preflight_push", "push_run",
    "resolve_token", "retry_command", "run_kind", "take_hub_token", "write_access_problem",
]
