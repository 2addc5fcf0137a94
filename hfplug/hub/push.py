"""Pushing a finished run: which files go, one ``upload_folder`` commit, the retry command, and the
``--hub_strategy every_save`` callback.

A push sends the LoRA adapter (or a full fine-tune's weights, or with ``merge_adapter`` the
base merged with the adapter), the tokenizer, ``training_curves.png``, the results JSON and a
model card. Never ``training_args.bin``, checkpoints or optimizer states. Retrying is safe:
unchanged files are skipped, so a second push of the same run commits nothing.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from transformers import TrainerCallback

from hfplug.hub.arguments import PUSH_SCRIPT, HubSettings, check_repo_id
from hfplug.hub.auth import HTTP_TIMEOUT, ResolvedToken, TokenError, hub_api, resolve_token_with_source
from hfplug.hub.card import CARD_FILE, CURVES_FILE, build_model_card, read_json
from hfplug.hub.errors import HubError, MergeError, PushError, hub_call, offline, status_of
from hfplug.hub.merge import merge_adapter_into_base
from hfplug.hub.redaction import TOKEN_PATTERN, TOKEN_SETTINGS_URL
from hfplug.loading import is_hub_id

logger = logging.getLogger(__name__)

# What a push sends, as upload_folder patterns (huggingface_hub's filter_repo_objects: fnmatch, where
# "*" also matches "/"). Exact top-level names: no wildcard here may reach into checkpoint-*/ folders
# (NEVER_PUSH excludes every sub-folder anyway).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "model-[0-9]*-of-[0-9]*.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model-[0-9]*-of-[0-9]*.bin",
)
MODEL_FILES = ("config.json", "generation_config.json", *MODEL_WEIGHTS)
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
RESULT_FILES = (CURVES_FILE, "all_results.json", "train_results.json", "eval_results.json")
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


# --------------------------------------------------------------------------- what a run holds


def _select(names, allow, ignore=()) -> list[str]:
    """``names`` that ``upload_folder`` would send with these patterns (the same filter: ``filter_repo_objects``)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(names, allow_patterns=list(allow), ignore_patterns=list(ignore)))


def run_kind(folder: str | os.PathLike) -> str:
    """``adapter`` (PEFT files) or ``model`` (full weights) for a finished run's folder; ``PushError`` otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a directory; pass a run's output_dir.", "no_output")
    if (folder / "adapter_config.json").is_file():
        if not any((folder / name).is_file() for name in ADAPTER_FILES[1:]):
            raise PushError(
                f"{folder} has adapter_config.json but no adapter weights (adapter_model.safetensors).", "no_output"
            )
        return "adapter"
    if (folder / "config.json").is_file() and _select([p.name for p in folder.iterdir()], MODEL_WEIGHTS):
        return "model"
    raise PushError(
        f"{folder} holds neither a LoRA adapter (adapter_config.json) nor model weights (config.json + "
        "model.safetensors). Pass the output_dir of a finished run (or one of its checkpoint-N folders).",
        "no_output",
    )


def allow_patterns(kind: str) -> list[str]:
    """The files a push of this kind sends: weights (adapter or model), tokenizer, results, the card."""
    weights = ADAPTER_FILES if kind == "adapter" else MODEL_FILES
    return [*weights, *TOKENIZER_FILES, *RESULT_FILES, CARD_FILE]


def files_to_push(folder: str | os.PathLike, kind: str) -> list[str]:
    """The top-level files of ``folder`` that a push sends, sorted (the same filter as ``upload_folder``)."""
    names = [p.name for p in Path(folder).iterdir() if p.is_file()]
    return sorted(_select(names, allow_patterns(kind), NEVER_PUSH))


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


# --------------------------------------------------------------------------- push


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
    command = f"{PUSH_SCRIPT} {shlex.quote(str(output_dir))} --hub_model_id {shlex.quote(str(repo_id))}"
    return command + (" --hub_private_repo" if private else "") + (" --merge_adapter" if merge_adapter else "")


def upload_command(folder, repo_id: str, *, repo_type: str = "model", delete: str | None = None) -> str:
    """``hf upload`` of ``folder`` to ``repo_id`` (safe to repeat), for what no hfplug script pushes (an export).

    ``delete``: a pattern of remote files the upload replaces (removed unless sent again). Quoted as
    ``retry_command``'s arguments are.
    """
    command = f"hf upload {shlex.quote(str(repo_id))} {shlex.quote(str(folder))} --repo-type {repo_type}"
    return command + (f" --delete {shlex.quote(delete)}" if delete else "")


def _push_failure(
    kind: str, err: BaseException, *, repo_id: str, found: ResolvedToken, retry: str, folder: Path
) -> tuple[str, str]:
    """``(reason, message)`` for a failed upload: the cause, that the local files are intact, how to retry."""
    if kind in ("not_found", "gated"):
        cause, reason = (
            (
                f"the repo {repo_id} does not exist (deleted?) or the token from {found.source} cannot see "
                "it; the push script creates it"
            ),
            "not_found",
        )
    elif kind == "invalid_token":
        cause, reason = (
            (
                f"the token from {found.source} was rejected (401): invalid, expired or revoked. Create a new "
                f"one at {TOKEN_SETTINGS_URL}"
            ),
            "invalid_token",
        )
    elif kind == "forbidden":
        cause, reason = (
            (
                f"the token from {found.source} may not write to {repo_id} (403). Use a write token, or a "
                f"fine-grained one with write access to it ({TOKEN_SETTINGS_URL})"
            ),
            "no_rights",
        )
    elif kind == "http":
        cause, reason = f"the Hub answered {status_of(err)}: {err}", "hub_error"
    elif kind == "offline":
        cause, reason = "HF_HUB_OFFLINE=1 is set; unset it to push", "offline"
    else:  # unreachable, or a local file that could not be read
        cause, reason = f"the Hub could not be reached ({type(err).__name__}: {err})", "network"
    intact = f"The run's files in {folder} are intact (nothing local was deleted)."
    return reason, (
        f"Pushing {folder} to {repo_id} failed: {cause}. {intact} Retry (safe to repeat: files already "
        f"on the Hub are skipped) with: {retry}"
    )


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
        raise PushError(
            f"push_run needs the full repo id (namespace/name), got {repo_id!r}; preflight_push returns it.",
            "bad_repo_id",
        )
    retry = retry_command(output_dir, repo_id, private=private, merge_adapter=merge_adapter)
    try:
        found = resolve_token_with_source(token, required=True, purpose=f"pushing to {repo_id}")
    except TokenError as err:
        raise PushError(
            f"{err} Nothing was pushed; {folder} is intact. Then retry with: {retry}", "no_token"
        ) from None
    api = hub_api(endpoint)
    if merge_adapter:
        if kind != "adapter":
            raise MergeError(
                f"--merge_adapter needs a LoRA adapter, but {folder} holds full model weights, which are "
                "pushed as they are. Leave --merge_adapter out.",
                "no_adapter",
            )
        base_model = base_model or read_json(folder / "adapter_config.json").get("base_model_name_or_path")
        merged = merge_adapter_into_base(
            folder, folder / "merged", base_model=base_model, token=found.value, label_names=label_names, task=task
        )
        _copy_run_files(folder, merged)
        folder, kind = merged, "merged"
    base = base_model or read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    facts = _base_facts(api, base, found.value)
    card = build_model_card(
        folder,
        repo_id,
        kind=kind,
        base_model=base,
        license=license or facts.get("license"),
        task=task,
        hupd_config=hupd_config,
        step=step,
        base_gated=bool(facts.get("gated")),
    )
    card.save(folder / CARD_FILE)
    files = files_to_push(folder, "adapter" if kind == "adapter" else "model")
    check_no_secrets(folder, files, secrets=[found.value])
    logger.info("Pushing %d files of %s to %s: %s", len(files), folder, repo_id, ", ".join(files))
    with hub_call(PushError, partial(_push_failure, repo_id=repo_id, found=found, retry=retry, folder=folder)):
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=allow_patterns("adapter" if kind == "adapter" else "model"),
            ignore_patterns=list(NEVER_PUSH),
            commit_message=commit_message or f"Upload {kind} trained with hfplug",
            token=found.value,
        )
    logger.info("Pushed to %s/%s", api.endpoint, repo_id)
    return PushResult(repo_id, getattr(info, "commit_url", None), files, kind, str(folder))


def _base_facts(api, base: str | None, token: str) -> dict:
    """The base model's ``license`` (from its Hub card) and whether it is ``gated``; best effort, ``{}`` if unknown."""
    if not is_hub_id(base) or offline():
        return {}
    try:
        info = api.model_info(base, token=token, timeout=HTTP_TIMEOUT)
    except Exception as err:
        logger.debug("Could not read the model info of %s (%s).", base, type(err).__name__)
        return {}
    license = getattr(info.card_data, "license", None)
    return {"license": license if isinstance(license, str) else None, "gated": bool(info.gated)}


# --------------------------------------------------------------------------- every_save callback


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
            push_run(
                checkpoint,
                self.target.repo_id,
                token=self.target.token,
                endpoint=self.target.endpoint,
                commit_message=f"Training in progress, step {state.global_step}",
                step=state.global_step,
                **self.card_kwargs,
            )
        except HubError as err:
            logger.warning(
                "Push of the checkpoint at step %d failed; training goes on and the final push will send it all: %s",
                state.global_step,
                err,
            )


def hub_push_callback(
    target: PushTarget | None, settings: HubSettings | None, **card_kwargs
) -> HubPushCallback | None:
    """A ``HubPushCallback`` for ``--hub_strategy every_save``; ``None`` otherwise (or without a target)."""
    if target is None or settings is None or settings.strategy != "every_save":
        return None
    return HubPushCallback(target, **card_kwargs)
