"""Loading tokenizers, models, configs and adapters, with errors that say what to do.

One rule for "is this a Hub id or a local path" (:func:`is_hub_id`) and one translation of
huggingface_hub's errors (:func:`explain_hub_error`) serve every loader here, including
:func:`load_config`, which reads ``config.json`` alone (for the memory planner and the Hub
merge check). ``from_pretrained`` is wrapped so that a missing model is reported as what it
is (a local path that does not exist, offline and not cached, no such repo, gated), and so
that decoder tokenizers without a pad token (Llama) just work. :func:`model_load_kwargs`
turns hfplug's model options into ``from_pretrained`` arguments; :func:`load_causal_lm`
loads a model (and a LoRA adapter, checked against its base) for generation. Loading a
model for the Trainer is ``hfplug.training.model_setup``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import validate_repo_id

from hfplug.quantization import get_quantization_config, resolve_dtype

logger = logging.getLogger(__name__)

# Pad-token candidates for tokenizers that have none, best first. Llama 3.1 reserves
# <|finetune_right_pad_id|> for exactly this; reusing an existing token avoids
# resizing the embeddings (impossible to train on a 4-bit base anyway).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<|endoftext|>")


class ModelLoadError(OSError):
    """A model or tokenizer that could not be loaded, with the reason and the fix."""


def is_hub_id(name) -> bool:
    """Whether ``name`` is meant as a Hub repo id rather than a local path.

    A Hub id is ``name`` or ``namespace/name`` by the Hub's own rules (huggingface_hub's
    ``validate_repo_id``: ASCII letters, digits, ``-``, ``_`` and ``.``, at most 96 characters a
    part, no ``--`` or ``..``, not starting or ending with ``-`` or ``.``). It is not one when it
    exists on disk, or when its namespace is an existing local folder (``outputs/run-1`` with
    ``outputs/`` present is a missing local path, not a repo). So ``./x``, ``/x``, ``~/x``,
    ``a/b/c`` and ``my model`` are paths; ``gpt2`` and ``meta-llama/Llama-3.1-8B`` are ids.
    """
    if not isinstance(name, str) or not name or os.path.exists(os.path.expanduser(name)):
        return False
    if "/" in name and os.path.isdir(name.split("/", 1)[0]):
        return False
    try:
        validate_repo_id(name)
    except hub_errors.HFValidationError:
        return False
    return True


def missing_path_message(name: str) -> str:
    """What to say about a local path that does not exist (``name`` is not a Hub id either)."""
    return (
        f"No such local path: {name!r} does not exist, and it is not a Hub id. Pass an existing local directory "
        "with config.json (e.g. assets/tiny-bert) or a Hub id like anferico/bert-for-patents."
    )


def cause_chain(err: BaseException):
    """``err``, then its cause (or context), and so on, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def explain_hub_error(name: str, err: BaseException) -> tuple[str, str] | None:
    """``(reason, message)`` for a huggingface_hub failure in ``err`` or its causes, else ``None``.

    The one translation of Hub errors for hfplug's loaders; each caller wraps it in its own
    exception class. ``reason`` is one of ``gated``, ``no_such_repo`` (also a missing revision),
    ``no_such_path`` (not a valid repo id), ``offline_not_cached``, ``unreachable``,
    ``missing_file`` (the repo lacks the file asked for) or ``http_error`` (any other refusal).
    """
    causes = list(cause_chain(err))
    for cause in causes:
        if isinstance(cause, hub_errors.GatedRepoError):  # before RepositoryNotFoundError: it subclasses it
            return "gated", (
                f"{name!r} is a gated model and this token has no access. Request access on its Hub page "
                f"(https://huggingface.co/{name}: accept the license and wait for approval), then make a read "
                "token available (HF_TOKEN, or `hf auth login`)."
            )
        if isinstance(cause, hub_errors.RepositoryNotFoundError):
            return "no_such_repo", (
                f"No model repo {name!r} on the Hub: either there is no such model repo, or it is private and no "
                "token with access was given. Check the spelling, or pass a local directory that holds config.json."
            )
        if isinstance(cause, hub_errors.RevisionNotFoundError):
            return "no_such_repo", f"{name!r}: revision not found on the Hub ({cause})."
        if isinstance(cause, hub_errors.HFValidationError):
            return "no_such_path", missing_path_message(name)
        if isinstance(cause, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled)):
            if hub_constants.HF_HUB_OFFLINE:
                return "offline_not_cached", (
                    f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: offline, what is "
                    "not in the local cache cannot be downloaded. Run once with network access to download it "
                    "(it is cached afterwards), or pass a local directory."
                )
            return "unreachable", (
                f"{name!r} is not in the local Hugging Face cache and the Hub could not be reached. Check the "
                "connection (or HF_ENDPOINT) and run once with network access to download it (it is cached "
                "afterwards), or pass a local directory."
            )
        if isinstance(cause, hub_errors.EntryNotFoundError):
            return "missing_file", f"{name!r} exists but lacks a file the loader needs ({cause})."
    for cause in causes:
        if isinstance(cause, hub_errors.HfHubHTTPError):
            return "http_error", f"The Hub refused the request for {name!r}: {cause}"
    return None


def explain_load_error(name: str, err: BaseException) -> ModelLoadError:
    """Turn a ``from_pretrained`` failure into a ``ModelLoadError`` that names the cause and the fix."""
    if not is_hub_id(name) and not os.path.exists(os.path.expanduser(name)):
        return ModelLoadError(missing_path_message(name))
    explained = explain_hub_error(name, err)
    return ModelLoadError(explained[1] if explained else f"Could not load {name!r}: {err}")


class ConfigUnavailableError(OSError):
    """``config.json`` could not be read; ``reason`` says why in one word.

    ``no_such_path``, ``no_config`` (a directory or repo without config.json), ``invalid``
    (it does not parse), or a Hub reason of :func:`explain_hub_error`.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def load_config(name_or_path: str, *, token: str | bool | None = None, trust_remote_code: bool = False):
    """``AutoConfig`` for a local directory, a config.json file or a Hub id, reading ``config.json`` only.

    Raises ``ConfigUnavailableError`` whose message says which problem it is: no such
    local path, a directory without config.json, no such repo (or no access), a gated
    repo, offline and not cached, Hub unreachable and not cached.
    """
    from huggingface_hub import hf_hub_download
    from transformers import AutoConfig

    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ConfigUnavailableError(f"{name_or_path} is a directory without a config.json.", "no_config")
        return _parse_config(AutoConfig, expanded, trust_remote_code)
    if os.path.isfile(expanded) and expanded.endswith(".json"):
        return _parse_config(AutoConfig, expanded, trust_remote_code)
    if not is_hub_id(name_or_path):
        raise ConfigUnavailableError(missing_path_message(name_or_path), "no_such_path")
    try:
        path = hf_hub_download(name_or_path, "config.json", token=token)
    except (
        hub_errors.HfHubHTTPError,
        hub_errors.EntryNotFoundError,
        hub_errors.OfflineModeIsEnabled,
        hub_errors.HFValidationError,
    ) as err:
        reason, message = explain_hub_error(name_or_path, err)
        raise ConfigUnavailableError(message, "no_config" if reason == "missing_file" else reason) from err
    return _parse_config(AutoConfig, path, trust_remote_code)


def _parse_config(auto_config, path: str, trust_remote_code: bool):
    try:
        if path.endswith(".json"):
            return auto_config.from_pretrained(os.path.dirname(path) or ".", trust_remote_code=trust_remote_code)
        return auto_config.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        raise ConfigUnavailableError(f"config.json at {path} could not be parsed: {err}", "invalid") from err


_SAVED_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "adapter_config.json")


def from_pretrained(cls, name: str, **kwargs):
    """``cls.from_pretrained(name, **kwargs)`` with a clear ``ModelLoadError`` on failure."""
    if not is_hub_id(name) and not os.path.exists(os.path.expanduser(name)):
        raise ModelLoadError(missing_path_message(name))
    folder = os.path.expanduser(name)
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f)) for f in _SAVED_FILES):
        # Else transformers guesses a tokenizer type and asks for sentencepiece or tiktoken.
        raise ModelLoadError(
            f"Model folder {name!r} holds none of {', '.join(_SAVED_FILES)}: it is not a saved model. "
            "Pass a folder written by save_pretrained (e.g. a run's output_dir) or a Hub id "
            "such as anferico/bert-for-patents."
        )
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, hub_errors.HfHubHTTPError) as err:  # transformers reports Hub failures as OSError
        raise explain_load_error(name, err) from err


def ensure_pad_token(tokenizer, *, avoid: Iterable[int] = ()) -> str:
    """Give ``tokenizer`` a pad token if it has none (decoders such as Llama), reusing an existing token.

    Returns the pad token and logs the choice: the first of ``PAD_CANDIDATES`` in the
    vocabulary, else unk, else eos. eos as pad is fine for classification (the attention
    mask hides padding), but not for a model trained to *generate*: ``avoid`` lists token
    ids the pad must not be (the tokens a reply ends with, :func:`reply_end_ids`). A pad
    token among them is replaced, and eos is never the fallback; when no other token is
    left, ``ValueError`` saying how to add one.
    """
    avoid = set(avoid)
    if tokenizer.pad_token is not None and tokenizer.pad_token_id not in avoid:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    fallbacks = [tokenizer.unk_token] if avoid else [tokenizer.unk_token, tokenizer.eos_token]
    choice = next((tok for tok in (*PAD_CANDIDATES, *fallbacks) if tok in vocab and vocab[tok] not in avoid), None)
    if choice is None:
        raise ValueError(_no_pad_message(tokenizer, avoid))
    previous = tokenizer.pad_token
    tokenizer.pad_token = choice
    if previous is None:
        logger.info("The tokenizer has no pad token; padding with %r (id %d).", choice, tokenizer.pad_token_id)
    else:
        logger.warning(
            "The tokenizer pads with %r, which also ends a reply: a model trained to generate with it "
            "may never learn to stop. Padding with %r (id %d) instead.",
            previous,
            choice,
            tokenizer.pad_token_id,
        )
    return choice


def _no_pad_message(tokenizer, avoid: set[int]) -> str:
    if not avoid:
        return "The tokenizer has no pad, unk or eos token to pad with; add a pad token to the tokenizer."
    # Adding a token would resize the embeddings and the LM head: a 4-bit base cannot train the new
    # rows, the adapter would have to carry both full matrices, and chat.py would have to resize the
    # base the same way before loading it. So hfplug refuses and says how to do it deliberately.
    return (
        "The tokenizer has no token to pad with other than the ones a reply ends with "
        f"({', '.join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(avoid))}), and a model trained to "
        f"generate with such a pad may never learn to stop. hfplug looks for {', '.join(PAD_CANDIDATES)} or an unk "
        "token. Add a pad token yourself (tokenizer.add_special_tokens({'pad_token': '<pad>'}); "
        "model.resize_token_embeddings(len(tokenizer)); save both) and pass that directory with --model_name_or_path."
    )


def model_max_positions(config) -> int | None:
    """The longest input the model's position embeddings allow, when the config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(max_length: int, tokenizer, config) -> None:
    """Refuse a ``max_length`` longer than the model can read, before any compute is spent."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}.")
    limits = []
    positions = model_max_positions(config)
    if positions is not None:
        limits.append((positions, "max_position_embeddings in its config"))
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**8:  # transformers uses ~1e30 for "no limit"
        limits.append((tok_limit, "the tokenizer's model_max_length"))
    for limit, source in limits:
        if max_length > limit:
            raise ValueError(
                f"max_length {max_length} is above this model's limit of {limit} tokens ({source}). "
                f"Use --max_length {limit} or less."
            )


def load_tokenizer(model_args, *, token: str | None = None):
    """The model's tokenizer (or ``tokenizer_name``'s), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = from_pretrained(AutoTokenizer, name, trust_remote_code=model_args.trust_remote_code, token=token)
    ensure_pad_token(tokenizer)
    return tokenizer


def model_load_kwargs(model_args, *, device_type: str, full_finetune: bool = False) -> dict:
    """``from_pretrained`` keyword arguments for hfplug's model options: dtype, quantization, remote code.

    ``full_finetune``: every weight trains, so an unquantized model is kept in float32:
    fp16/bf16 speed comes from mixed precision, since fp16 master weights cannot be
    unscaled by the gradient scaler.
    """
    import torch

    quantization_config = get_quantization_config(model_args, device_type=device_type)
    dtype = resolve_dtype(model_args.dtype, device_type=device_type)
    if full_finetune and quantization_config is None:
        dtype = torch.float32
    return dict(dtype=dtype, quantization_config=quantization_config, trust_remote_code=model_args.trust_remote_code)


def adapter_base_model(path: str, *, hub: bool = False) -> str | None:
    """The base model of a PEFT adapter, or ``None`` when ``path`` is not one.

    ``path`` is a local directory; with ``hub=True`` a Hub id is looked up too, with
    ``hf_hub_download`` (cached, so it works offline once downloaded). That lookup is
    opt-in because it costs a request (and retries without a network) for every plain
    model name. A repo without ``adapter_config.json``, or one not in the cache while
    offline, gives ``None``; a gated or missing repo is a ``ModelLoadError`` saying what to do.
    """
    import json

    if not hub or not is_hub_id(path):
        config = os.path.join(os.path.expanduser(path), "adapter_config.json")
        if not os.path.isfile(config):
            return None
    else:
        from huggingface_hub import hf_hub_download

        try:
            config = hf_hub_download(path, "adapter_config.json")
        except hub_errors.EntryNotFoundError:  # also LocalEntryNotFoundError: offline and not cached
            return None
        except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, hub_errors.OfflineModeIsEnabled) as err:
            raise explain_load_error(path, err) from err
    with open(config) as f:
        return json.load(f)["base_model_name_or_path"]


def check_adapter_base(adapter: str, model_name_or_path: str | None) -> str:
    """The adapter's base model; a ``ValueError`` naming it when it differs from ``model_name_or_path``.

    ``adapter`` is a LoRA directory or Hub id. An empty ``model_name_or_path`` accepts any base.
    Local paths are compared as real paths: PEFT records the path as given at training
    time, which may be relative or reached through a symlink.
    """

    def canonical(name: str) -> str:
        name = os.path.expanduser(name)
        return os.path.realpath(name) if os.path.exists(name) else os.path.normpath(name)

    base = adapter_base_model(adapter, hub=True)
    if base is None:
        raise ModelLoadError(
            f"{adapter!r} is not a LoRA adapter: no adapter_config.json in it (or, for a Hub id, it is not in the "
            "local cache while HF_HUB_OFFLINE is set). Pass the directory or Hub repo that a LoRA run saved."
        )
    if model_name_or_path and canonical(base) != canonical(model_name_or_path):
        raise ValueError(
            f"The adapter {adapter!r} was trained on base model {base!r}, not {model_name_or_path!r}. "
            f"Pass --model {base} (or leave --model out to use the adapter's base)."
        )
    return base


def load_causal_lm(model_args, *, adapter: str | None = None, device_type: str | None = None):
    """``AutoModelForCausalLM`` with hfplug's model options (``--quant``, ``--dtype``), for generation.

    With ``adapter`` (a LoRA directory or Hub id), the adapter's base model is checked
    against ``model_args.model_name_or_path`` (empty: the adapter's base is loaded) and the
    adapter is loaded on top. The model is put on the GPU when there is one and set to eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    name = model_args.model_name_or_path
    if adapter:
        base = check_adapter_base(adapter, name)
        name = name or base
    model = from_pretrained(
        AutoModelForCausalLM,
        name,
        device_map={"": 0} if device_type == "cuda" else None,
        **model_load_kwargs(model_args, device_type=device_type),
    )
    if adapter:
        from peft import PeftModel

        logger.info("Loading the LoRA adapter %s onto %s.", adapter, name)
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        except (OSError, hub_errors.HfHubHTTPError) as err:
            raise explain_load_error(adapter, err) from err
    return model.eval()
