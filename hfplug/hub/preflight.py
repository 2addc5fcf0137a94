"""Checks before any data or model is loaded, so that a run fails within seconds and not after training.

- ``preflight_push``: for ``--push_to_hub``, resolve the token, ask the Hub who it is
  (``whoami``), check that it can write to the target namespace, plan a ``--merge_adapter``,
  and create the repo; a ``PreflightError`` says what to fix.
- ``check_model_access``: the same early check for *reading* a gated base model (Llama),
  with ``auth_check``; a ``ModelAccessError`` says how to get access.
"""

from __future__ import annotations

import logging
import os
from functools import partial

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
    status_of,
    unreachable_message,
)
from hfplug.hub.merge import plan_merge
from hfplug.hub.push import PushTarget, retry_command
from hfplug.hub.redaction import TOKEN_SETTINGS_URL
from hfplug.loading import is_hub_id

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- push preflight


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

    In order: the repo id's form; offline mode; the token (see ``hfplug.hub.auth``; the prompt
    only with ``prompt`` and a terminal); ``whoami`` (401 = invalid or revoked); write access
    to the namespace (read-only token, fine-grained scope, organization role); with
    ``merge_adapter``, whether ``base_model`` can be merged in 16-bit in this machine's memory;
    then ``create_repo(exist_ok=True)``, honouring ``private`` for a new repo. A bare ``name``
    becomes ``<user>/name``. Raises ``PreflightError`` (or ``MergeError``) saying what to fix.
    """
    repo_id = check_repo_id(repo_id)
    retry = retry_command(output_dir or "OUTPUT_DIR", repo_id, private=private, merge_adapter=merge_adapter)
    if offline():
        raise PreflightError(offline_message(f"the push to {repo_id}", retry), "offline")
    try:
        found = resolve_token_with_source(token, required=True, prompt=prompt, purpose=f"--push_to_hub ({repo_id})")
    except TokenError as err:
        raise PreflightError(str(err), "no_token") from None
    api = hub_api(endpoint)
    with hub_call(PreflightError, partial(_whoami_failure, endpoint=api.endpoint, found=found, retry=retry)):
        who = whoami(found, endpoint=endpoint, timeout=timeout)
    user = who.get("name", "")
    full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    problem = write_access_problem(who, full_id, source=found.source)
    if problem:
        raise PreflightError(problem[1], problem[0])
    if merge_adapter and base_model:
        plan_merge(base_model, token=found.value)
    explain = partial(_create_failure, repo_id=full_id, found=found, who=who, endpoint=api.endpoint, retry=retry)
    with hub_call(PreflightError, explain):
        url = api.create_repo(full_id, token=found.value, private=private, exist_ok=True, repo_type="model")
    if private:
        _warn_if_public(api, full_id, found)
    logger.info("Hub preflight passed: %s (token from %s) can push to %s.", user, found.source, url)
    return PushTarget(full_id, str(url), user, private, found.value, found.source, endpoint)


def _whoami_failure(
    kind: str, err: BaseException, *, endpoint: str, found: ResolvedToken, retry: str
) -> tuple[str, str] | None:
    if kind == "invalid_token":
        return "invalid_token", invalid_token_message(found.source)
    if kind == "offline":
        return "offline", offline_message("the token check", retry)
    if kind == "unreachable":
        return "unreachable", unreachable_message(endpoint, err, retry)
    if kind in ("not_found", "gated", "forbidden", "http"):
        return "hub_error", f"The Hub answered whoami with an error ({status_of(err)}): {err}"
    return None


def _create_failure(
    kind: str, err: BaseException, *, repo_id: str, found: ResolvedToken, who: dict, endpoint: str, retry: str
) -> tuple[str, str] | None:
    namespace = repo_id.split("/")[0]
    if kind == "invalid_token":
        return "invalid_token", invalid_token_message(found.source)
    if kind == "forbidden" and token_access(who).get("role") == "fineGrained":
        return "fine_grained_scope", (
            f"{repo_id} does not exist yet and the fine-grained token from {found.source} may write to it "
            f"but not create repos in {namespace}. Create the repo at {HUB_URL}/new-model, or give "
            f"the token write access to all repos under {namespace} at {TOKEN_SETTINGS_URL}."
        )
    if kind == "forbidden":
        return "no_rights", (
            f"The Hub refused to create {repo_id} (403 Forbidden): the token from {found.source} has no right to "
            f"create repos in {namespace}. Use a write token of an account that may, at {TOKEN_SETTINGS_URL}."
        )
    if kind in ("offline", "unreachable"):
        return "unreachable", unreachable_message(endpoint, err, retry)
    if kind in ("not_found", "gated", "http"):
        return "create_failed", f"The Hub refused to create {repo_id} ({status_of(err)}): {err}"
    return None


def _warn_if_public(api, repo_id: str, found: ResolvedToken) -> None:
    """``--hub_private_repo`` cannot change a repo that already exists: say so when it is public."""
    try:
        info = api.model_info(repo_id, token=found.value, timeout=HTTP_TIMEOUT)
    except Exception as err:  # informational only
        logger.debug("Could not read %s's visibility: %s", repo_id, type(err).__name__)
        return
    if info.private is False:
        logger.warning(
            "%s already exists and is public; --hub_private_repo only applies to new repos. Make it "
            "private in its settings (%s/%s/settings) before pushing if it must be.",
            repo_id,
            HUB_URL,
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
