"""What can go wrong on the Hub side of a run, and the one place where a failed Hub call is translated.

- ``HubError`` and its kinds (``PreflightError``, ``ModelAccessError``, ``PushError``,
  ``MergeError``): a step that cannot go ahead, with a message that says what to fix and a
  one-word ``reason``. Messages are masked of tokens.
- ``failure_kind``: what a failed ``huggingface_hub`` call means (gated, not found, a rejected
  token, forbidden, another answer, offline, unreachable, local I/O).
- ``hub_call``: runs a Hub call and turns its failure into a ``HubError`` with the wording
  of the step that made it, raised ``from None``: the client's exception may quote the server's
  answer or request headers, and must not be printed above hfplug's (masked) message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hfplug.hub.redaction import TOKEN_SETTINGS_URL, redact


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


# --------------------------------------------------------------------------- what a failure means


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: huggingface_hub refuses every request."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def failure_kind(err: BaseException) -> str | None:
    """What a failed Hub call means, in one word; ``None`` for anything else (a bug: let it through).

    ``gated`` (a gated repo this token may not read), ``not_found`` (no such repo, or not visible
    to this token), ``invalid_token`` (401), ``forbidden`` (403), ``http`` (any other error answer),
    ``offline`` (no request made: ``HF_HUB_OFFLINE``), ``unreachable`` (refused, reset, timed out),
    ``io`` (a local file could not be read).
    """
    import httpx2
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        return "gated"
    if isinstance(err, RepositoryNotFoundError):
        return "not_found"
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        return {401: "invalid_token", 403: "forbidden"}.get(status, "http")
    if isinstance(err, (httpx2.HTTPError, ConnectionError, TimeoutError)):  # OfflineModeIsEnabled is a ConnectionError
        return "offline" if offline() else "unreachable"
    if isinstance(err, OSError):
        return "io"
    return None


def status_of(err: BaseException) -> int | None:
    """The HTTP status of a Hub answer (``None`` when there was none)."""
    return getattr(getattr(err, "response", None), "status_code", None)


Explain = Callable[[str, BaseException], "tuple[str, str] | None"]


@contextmanager
def hub_call(error: type[HubError], explain: Explain) -> Iterator[None]:
    """Run the Hub call in the ``with`` block; turn its failure into ``error(message, reason)``.

    ``explain(kind, err)`` gives ``(reason, message)`` for a ``failure_kind``, in the words of the
    step that called the Hub, or ``None`` to let the original exception through (as does an
    exception that is no Hub failure at all). The ``HubError`` is raised ``from None``.
    """
    try:
        yield
    except Exception as err:
        kind = failure_kind(err)
        explained = explain(kind, err) if kind else None
        if explained is None:
            raise
        reason, message = explained
        raise error(message, reason) from None


# --------------------------------------------------------------------------- wording shared by the steps


def invalid_token_message(source: str) -> str:
    """A token the Hub rejected (401), from ``source``."""
    return (
        f"The Hugging Face token from {source} was rejected (401 Unauthorized): it is invalid, expired "
        f"or revoked. Create a new token at {TOKEN_SETTINGS_URL} and replace the one in {source}."
    )


def repo_label(repo_id: str, repo_type: str = "model", *, start: bool = False) -> str:
    """How a message names a repo: ``alice/x`` for a model (as its URL does), ``the dataset repo alice/x`` otherwise.

    ``start``: the label opens a sentence (``The dataset repo ...``).
    """
    if repo_type == "model":
        return repo_id
    return f"{'The' if start else 'the'} {repo_type} repo {repo_id}"


def offline_message(what: str, retry: str, *, output: str = "run") -> str:
    """``HF_HUB_OFFLINE`` stops ``what``; ``retry`` pushes the finished ``output`` (``run``, ``export``) later."""
    return (
        f"HF_HUB_OFFLINE=1 is set, so {what} cannot reach the Hub. Unset HF_HUB_OFFLINE (or set it to 0) "
        f"and run again, or leave --push_to_hub out now and push the finished {output} later with: {retry}"
    )


def unreachable_message(endpoint: str, err: BaseException, retry: str, *, output: str = "run") -> str:
    """The Hub at ``endpoint`` did not answer; ``retry`` pushes the finished ``output`` (``run``, ``export``) later."""
    return (
        f"Could not reach the Hub at {endpoint} ({type(err).__name__}: {err}). Check the network "
        f"connection (and HF_ENDPOINT, if set), then run again; or leave --push_to_hub out now and push the "
        f"finished {output} later with: {retry}"
    )
