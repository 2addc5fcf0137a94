"""Checks before any data or model is loaded, so that a run fails within seconds and not after training.

- ``preflight_push``: for ``--push_to_hub``, resolve the token, ask the Hub who it is
  (``whoami``), check that it can write to the target namespace, plan a ``--merge_adapter``,
  and create the repo (a model repo for a training run, a dataset repo for an export:
  ``repo_type``); a ``PreflightError`` says what to fix.
- ``check_model_access``: the same early check for *reading* a gated base model (Llama),
  with ``auth_check``; a ``ModelAccessError`` says how to get access.
"""

from __future__ import annotations

import logging
import os
from functools import partial

from huggingface_hub.constants import REPO_TYPES_URL_PREFIXES

from hfplug.hub.arguments import check_repo_id
from hfplug.hub.auth import (
    HTTP_TIMEOUT,
    HUB_URL,
    ResolvedToken,
    TokenError,
    auth_check,
    hub_api,
    resolve_token_with_source,
    token_access,
    whoami,
    write_access_problem,
)
from hfplug.hub.errors import (
    ModelAccessError,
    PreflightError,
    hub_call,
    invalid_token_message,
    offline,
    offline_message,
    repo_label,
    status_of,
    unreachable_message,
)
from hfplug.hub.merge import plan_merge
from hfplug.hub.push import PushTarget, retry_command, upload_command
from hfplug.hub.redaction import TOKEN_SETTINGS_URL
from hfplug.loading import is_hub_id

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- push preflight


REPO_TYPES = ("model", "dataset")
PUSHED_OUTPUT = {"model": "run", "dataset": "export"}  # what hfplug pushes to each kind of repo, in messages


def preflight_push(
    repo_id: str,
    *,
    repo_type: str = "model",
    token: str | None = None,
    private: bool | None = None,
    merge_adapter: bool = False,
    base_model: str | None = None,
    endpoint: str | None = None,
    prompt: bool = True,
    output_dir: str | os.PathLike | None = None,
    retry: str | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> PushTarget:
    """Check, before any model or data is loaded, that a push to ``repo_id`` will work; create the repo.

    In order: the repo id's form; offline mode; the token (see ``hfplug.hub.auth``; the prompt
    only with ``prompt`` and a terminal); ``whoami`` (401 = invalid or revoked); write access
    to the namespace (read-only token, fine-grained scope, organization role); with
    ``merge_adapter``, whether ``base_model`` can be merged in 16-bit in this machine's memory;
    then ``create_repo(exist_ok=True)``, honouring ``private`` for a new repo. A bare ``name``
    becomes ``<user>/name``. Raises ``PreflightError`` (or ``MergeError``) saying what to fix.

    ``repo_type``: ``"model"`` (a training run, ``--hub_model_id``) or ``"dataset"`` (an export,
    ``--hub_dataset_id``). ``retry``: the command that pushes ``output_dir`` later, quoted when the
    Hub cannot be reached now; by default ``recipes/push_run.py`` for a model, ``hf upload`` for a dataset.
    """
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {', '.join(REPO_TYPES)}, got {repo_type!r}.")
    repo_id = check_repo_id(repo_id, flag=f"--hub_{repo_type}_id")
    folder = output_dir or "OUTPUT_DIR"
    if retry is None and repo_type == "model":
        retry = retry_command(folder, repo_id, private=private, merge_adapter=merge_adapter)
    elif retry is None:
        retry = upload_command(folder, repo_id, repo_type=repo_type)
    output = PUSHED_OUTPUT[repo_type]
    if offline():
        what = f"the push to {repo_label(repo_id, repo_type)}"
        raise PreflightError(offline_message(what, retry, output=output), "offline")
    try:
        found = resolve_token_with_source(token, required=True, prompt=prompt, purpose=f"--push_to_hub ({repo_id})")
    except TokenError as err:
        raise PreflightError(str(err), "no_token") from None
    api = hub_api(endpoint)
    explain = partial(_whoami_failure, endpoint=api.endpoint, found=found, retry=retry, output=output)
    with hub_call(PreflightError, explain):
        who = whoami(found, endpoint=endpoint, timeout=timeout)
    user = who.get("name", "")
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    problem = write_access_problem(who, full_id, source=found.source, repo_type=repo_type)
    if problem:
        raise PreflightError(problem[1], problem[0])
    if merge_adapter and base_model:
        plan_merge(base_model, token=found.value)
    explain = partial(
        _create_failure, repo_id=full_id, repo_type=repo_type, found=found, who=who, endpoint=api.endpoint, retry=retry
    )
    with hub_call(PreflightError, explain):
        url = api.create_repo(full_id, token=found.value, private=private, exist_ok=True, repo_type=repo_type)
    if private:
        _warn_if_public(api, full_id, repo_type, found)
    pushed_to = repo_label(str(url), repo_type)
    logger.info("Hub preflight passed: %s (token from %s) can push to %s.", user, found.source, pushed_to)
    return PushTarget(full_id, str(url), user, private, found.value, found.source, endpoint)


def _whoami_failure(
    kind: str, err: BaseException, *, endpoint: str, found: ResolvedToken, retry: str, output: str
) -> tuple[str, str] | None:
    if kind == "invalid_token":
        return "invalid_token", invalid_token_message(found.source)
    if kind == "offline":
        return "offline", offline_message("the token check", retry, output=output)
    if kind == "unreachable":
        return "unreachable", unreachable_message(endpoint, err, retry, output=output)
    if kind in ("not_found", "gated", "forbidden", "http"):
        return "hub_error", f"The Hub answered whoami with an error ({status_of(err)}): {err}"
    return None


def _create_failure(
    kind: str,
    err: BaseException,
    *,
    repo_id: str,
    repo_type: str,
    found: ResolvedToken,
    who: dict,
    endpoint: str,
    retry: str,
) -> tuple[str, str] | None:
    namespace = repo_id.split("/")[0]
    repo = repo_label(repo_id, repo_type)
    if kind == "invalid_token":
        return "invalid_token", invalid_token_message(found.source)
    if kind == "forbidden" and token_access(who).get("role") == "fineGrained":
        return "fine_grained_scope", (
            f"{repo_label(repo_id, repo_type, start=True)} does not exist yet and the fine-grained token from "
            f"{found.source} may write to it but not create repos in {namespace}. Create the repo at "
            f"{HUB_URL}/new-{repo_type}, or give the token write access to all repos under {namespace} at "
            f"{TOKEN_SETTINGS_URL}."
        )
    if kind == "forbidden":
        return "no_rights", (
            f"The Hub refused to create {repo} (403 Forbidden): the token from {found.source} has no right to "
            f"create repos in {namespace}. Use a write token of an account that may, at {TOKEN_SETTINGS_URL}."
        )
    if kind in ("offline", "unreachable"):
        return "unreachable", unreachable_message(endpoint, err, retry, output=PUSHED_OUTPUT[repo_type])
    if kind in ("not_found", "gated", "http"):
        return "create_failed", f"The Hub refused to create {repo} ({status_of(err)}): {err}"
    return None


def _warn_if_public(api, repo_id: str, repo_type: str, found: ResolvedToken) -> None:
    """``--hub_private_repo`` cannot change a repo that already exists: say so when it is public."""
    try:
        info = api.repo_info(repo_id, repo_type=repo_type, token=found.value, timeout=HTTP_TIMEOUT)
    except Exception as err:  # informational only
        logger.debug("Could not read %s's visibility: %s", repo_id, type(err).__name__)
        return
    if info.private is False:
        logger.warning(
            "%s already exists and is public; --hub_private_repo only applies to new repos. Make it "
            "private in its settings (%s/%s%s/settings) before pushing if it must be.",
            repo_label(repo_id, repo_type, start=True),
            HUB_URL,
            REPO_TYPES_URL_PREFIXES.get(repo_type, ""),
            repo_id,
        )


# --------------------------------------------------------------------------- gated base models


def check_model_access(
    model_id: str, token: str | None = None, *, endpoint: str | None = None, timeout: float = HTTP_TIMEOUT
) -> None:
    """Check early that ``model_id`` (e.g. a gated Llama) can be read with the resolved token.

    Local paths, and offline mode (the cache is then all there is), are not checked.
    Raises ``ModelAccessError`` for a gated model without access (how to request it), a
    missing or private repo, a rejected token, or an unreachable Hub.
    """
    if not is_hub_id(model_id) or offline():
        return
    found = resolve_token_with_source(token, required=False)
    explain = partial(
        _access_failure, model_id=model_id, found=found, endpoint=hub_api(endpoint).endpoint, timeout=timeout
    )
    with hub_call(ModelAccessError, explain):
        auth_check(model_id, found, endpoint=endpoint, timeout=timeout)


def _access_failure(
    kind: str, err: BaseException, *, model_id: str, found: ResolvedToken | None, endpoint: str, timeout: float
) -> tuple[str, str] | None:
    if kind == "gated":
        return "gated", _gated_message(model_id, found, endpoint, timeout)
    if kind == "not_found":
        hint = (
            "no token was found, so only public models can be read: set HF_TOKEN or run `hf auth login`"
            if found is None
            else f"the token from {found.source} has no access to it"
        )
        return "not_found", (
            f"Model {model_id!r} was not found on the Hub, or it is private/gated and {hint}. "
            "Check the spelling, or pass a local directory."
        )
    if kind == "invalid_token" and found is not None:
        return "invalid_token", invalid_token_message(found.source)
    if kind in ("invalid_token", "forbidden", "http"):
        return "hub_error", f"The Hub refused to check access to {model_id} ({status_of(err)}): {err}"
    if kind in ("offline", "unreachable"):
        return "unreachable", (
            f"Could not reach the Hub at {endpoint} to check access to {model_id} ({type(err).__name__}). "
            "Check the network (and HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use the local cache only."
        )
    return None


def _gated_message(model_id: str, found: ResolvedToken | None, endpoint: str, timeout: float) -> str:
    page = f"{HUB_URL}/{model_id}"
    if found is None:
        return (
            f"{model_id} is a gated model and no token was found. Request access on {page} (log in, accept the "
            "license, wait for approval), then make a read token of that account available: HF_TOKEN, the Colab "
            "secret HF_TOKEN, or `hf auth login`."
        )
    message = (
        f"{model_id} is a gated model and the account of the token from {found.source} has no access yet. "
        f"Open {page}, log in as that account, accept the license / request access, and wait for approval "
        "(you get an email); then run again. A read token is enough to download it."
    )
    try:  # a fine-grained token may lack the gated-repo permission even when the account has access
        access = token_access(whoami(found, endpoint=endpoint, timeout=timeout))
        if access.get("role") == "fineGrained" and not (access.get("fineGrained") or {}).get("canReadGatedRepos"):
            message += (
                " Note: this fine-grained token lacks 'Read access to contents of all public gated repos you "
                f"can access'; enable it at {TOKEN_SETTINGS_URL} (access granted to the account alone is not "
                "enough for such a token)."
            )
    except Exception:  # only a note: the message above stands without it
        pass
    return message
