"""The Hub flags of a training run: hfplug's own (``HubArguments``) and those it takes over from ``TrainingArguments``.

- ``HubArguments``: ``--merge_adapter``, ``--merge_base_model``, ``--hub_license`` (the push
  script, ``recipes/push_run.py``, uses the same names).
- ``take_hub_token`` / ``hub_settings``: take ``--hub_token`` and ``--push_to_hub`` out of
  ``TrainingArguments``, so the Trainer neither pickles the token into ``training_args.bin`` nor
  pushes that file; hfplug pushes instead (``hfplug.hub.push``).
- ``check_repo_id``: ``--hub_model_id`` in the form the Hub allows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hfplug.hub.errors import PreflightError

logger = logging.getLogger(__name__)

HONOURED_STRATEGIES = ("end", "every_save")
PUSH_SCRIPT = "python recipes/push_run.py"  # pushes a finished run later; its flags have the names below


@dataclass
class HubArguments:
    """hfplug's Hub flags beside TrainingArguments' ``--push_to_hub``, ``--hub_model_id``, ``--hub_private_repo``."""

    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "Push the base model with the LoRA adapter merged in (loaded in 16-bit; refused for a 4-bit base or "
            "when it will not fit in memory) instead of the adapter alone."
        },
    )
    merge_base_model: str | None = field(
        default=None,
        metadata={
            "help": "The 16-bit model to merge into (default: the adapter's base). Set it when training used a "
            "pre-quantized 4-bit checkpoint."
        },
    )
    hub_license: str | None = field(
        default=None, metadata={"help": "License for the model card (default: the base model's license on the Hub)."}
    )


@dataclass
class HubSettings:
    """What ``--push_to_hub`` asked for, taken over from ``TrainingArguments`` by hfplug."""

    repo_id: str
    private: bool | None
    strategy: str  # "end" or "every_save"


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
    logger.info(
        "--push_to_hub: hfplug pushes the adapter/model, tokenizer, results and a model card to %s "
        "(hub_strategy=%s); the Trainer's own push is switched off.",
        settings.repo_id,
        strategy,
    )
    return settings
