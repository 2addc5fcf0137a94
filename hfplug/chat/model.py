"""What to chat with: the model name (an adapter's base), the tokenizer saved with an adapter,
the context a chat may fill, and the memory in use (for ``--stats``).

The model itself is loaded by ``hfplug.loading.load_causal_lm``; this module only decides
what to load and reads back what was loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from hfplug.chat.arguments import DEFAULT_CHAT_MODEL, ChatModelArguments
from hfplug.loading import check_adapter_base, explain_load_error, is_hub_id, load_tokenizer, model_max_positions
from hfplug.model_args import ModelArguments

GiB = 1024**3
# The files a saved tokenizer may consist of (transformers 5 writes the template to chat_template.jinja).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)

logger = logging.getLogger(__name__)


def resolve_model_name(model_args: ChatModelArguments, adapter: str | None) -> str:
    """Fill in ``model_name_or_path``: the adapter's base when none was given, else the default chat model.

    An adapter whose base differs from an explicit ``--model`` is a ``ValueError`` naming the base.
    """
    if adapter:
        base = check_adapter_base(adapter, model_args.model_name_or_path)
        model_args.model_name_or_path = model_args.model_name_or_path or base
    model_args.model_name_or_path = model_args.model_name_or_path or DEFAULT_CHAT_MODEL
    return model_args.model_name_or_path


def load_chat_tokenizer(model_args: ModelArguments, adapter: str | None = None):
    """``tokenizer_name``'s tokenizer if given, else the one saved with the adapter (a local directory
    or a Hub repo) if it has one, else the model's.

    The adapter's own tokenizer carries the chat format it was trained with, training date
    included: with the base model's, an adapter trained on the base is prompted with today's
    date (or with no template at all) instead.
    """
    if adapter and not model_args.tokenizer_name:
        folder = adapter_tokenizer_dir(adapter)
        if folder:
            logger.info(
                "Using the tokenizer saved with the adapter %s (the chat format it was trained with).", adapter
            )
            model_args = dataclasses.replace(model_args, tokenizer_name=folder)
    return load_tokenizer(model_args)


def adapter_tokenizer_dir(adapter: str) -> str | None:
    """The local folder holding the tokenizer saved with the adapter ``adapter``, or ``None`` if it has none.

    ``adapter`` is a directory or a Hub repo. A repo is asked for ``tokenizer_config.json`` with
    ``hf_hub_download`` (cached, so this works offline once the adapter has been downloaded);
    one without it is ``None``, and so is one that cannot be checked (offline and not cached),
    with a warning. A missing or gated repo is a ``ModelLoadError``.
    """
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, snapshot_download, try_to_load_from_cache
    from huggingface_hub import errors as hub_errors

    path = os.path.expanduser(adapter)
    if not is_hub_id(adapter):
        return path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else None
    try:
        hf_hub_download(adapter, "tokenizer_config.json")
        # The whole tokenizer, as a folder: AutoTokenizer given the repo id also asks for the repo's
        # config.json, which an adapter repo lacks, and offline that fails unless the Hub's "no such
        # file" answer happens to be cached.
        return snapshot_download(adapter, allow_patterns=list(TOKENIZER_FILES))
    except hub_errors.LocalEntryNotFoundError:  # offline (or no connection) and not in the cache
        if try_to_load_from_cache(adapter, "tokenizer_config.json") is not _CACHED_NO_EXIST:  # not known to be absent
            logger.warning(
                "Could not check whether the adapter %s has its own tokenizer (offline and not cached); "
                "using the base model's, whose chat format may differ from the one it was trained with.",
                adapter,
            )
        return None
    except hub_errors.EntryNotFoundError:  # the Hub says the repo has no such file
        return None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, hub_errors.OfflineModeIsEnabled) as err:
        raise explain_load_error(adapter, err) from err


def context_limit(model, tokenizer, max_context: int | None = None) -> int:
    """Tokens a chat may use (prompt + reply): the smallest of the model's, the tokenizer's and ``max_context``."""
    limits = [
        n
        for n in (model_max_positions(model.config), getattr(tokenizer, "model_max_length", None), max_context)
        if isinstance(n, int) and 0 < n < 10**8
    ]  # transformers uses ~1e30 for "no limit"
    return min(limits) if limits else 4096


def memory_in_use(device_type: str) -> str:
    """CUDA memory allocated on a GPU, the process's resident memory otherwise."""
    if device_type == "cuda":
        return f"{torch.cuda.memory_allocated() / GiB:.2f} GiB CUDA allocated"
    import psutil

    return f"{psutil.Process().memory_info().rss / GiB:.2f} GiB process RSS"
