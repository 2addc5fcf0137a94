"""What the chat recipe is configured by: the model, how replies are generated, and the session.

Every field of ``ChatModelArguments``, ``GenerationSettings`` and ``ChatArguments`` is a flag of
``recipes/chat.py`` and a key of its ``--config`` YAML; ``GenerationSettings`` fields are also
``/set`` keys in a running chat. Values are checked in ``__post_init__``, so flags, YAML and
``/set`` get the same rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hfplug.model_args import ModelArguments

DEFAULT_CHAT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# A chat reply's token budget. Not the same concept as finetune_hupd's --max_new_tokens (RunArguments,
# 256): that one bounds a generated abstract at evaluation (USPTO abstracts have at most 150 words).
CHAT_MAX_NEW_TOKENS = 512


@dataclass
class ChatModelArguments(ModelArguments):
    """``ModelArguments`` for chatting: ``--model`` is short for ``--model_name_or_path``."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model"],
            "help": f"Hub id or local directory of the model. Default: the --adapter's base model, else {DEFAULT_CHAT_MODEL}.",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora:
            raise ValueError(
                "--lora trains new adapters and chat does not train; load a trained one with --adapter DIR_OR_HUB_ID."
            )


@dataclass
class GenerationSettings:
    """How replies are generated. Every field is a flag, a YAML key and a ``/set`` key."""

    max_new_tokens: int = field(
        default=CHAT_MAX_NEW_TOKENS,
        metadata={
            "help": f"Longest reply, in tokens (default {CHAT_MAX_NEW_TOKENS}: room for a long answer). Not finetune_hupd's "
            "--max_new_tokens, the longest abstract generated at evaluation (default 256); when chatting with an "
            "abstract adapter, 256 is enough."
        },
    )
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (> 0; used with do_sample)."})
    top_p: float = field(
        default=0.9,
        metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1]."},
    )
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only; 0 = no limit."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens; 1 = off."})
    do_sample: bool = field(
        default=True, metadata={"help": "Sample (true) or pick the most likely token (false: greedy, reproducible)."}
    )

    def __post_init__(self) -> None:
        # Checked here, so flags, YAML and /set all get the same rules. inf and nan are refused:
        # "temperature=inf" parses as a float, and generate() would sample from nan probabilities.
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens!r} must be a positive integer (e.g. {CHAT_MAX_NEW_TOKENS})."
            )
        if not _is_finite(self.temperature) or not self.temperature > 0:
            raise ValueError(
                f"temperature={self.temperature!r} must be a finite number > 0 (e.g. 0.6); "
                "for deterministic replies set do_sample=false."
            )
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; 1 turns nucleus sampling off.")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0; 0 turns it off.")
        if not _is_finite(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0; 1 turns it off."
            )

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``generate``; sampling knobs only when sampling (greedy ignores them)."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, repetition_penalty=self.repetition_penalty
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A real number (not a bool, not a string), neither inf nor nan."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ChatArguments:
    """What to chat with and how the session runs."""

    adapter: str | None = field(
        default=None, metadata={"help": "LoRA adapter (a directory or Hub id) to load onto the model."}
    )
    system: str | None = field(default=None, metadata={"help": "System prompt."})
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Chat format: llama3, chatml, plain, or a .jinja file. Default: the tokenizer's own template, "
            "else one chosen from its special tokens."
        },
    )
    prompt: str | None = field(default=None, metadata={"help": "Answer this one user turn, print the reply and exit."})
    max_context: int | None = field(
        default=None,
        metadata={
            "help": "Tokens of history + reply to keep (older turns are dropped). Default: the model's limit. "
            "Lower it to bound memory on a small GPU."
        },
    )
    stats: bool = field(default=False, metadata={"help": "Print load time, memory, time to first token and tokens/s."})

    def __post_init__(self) -> None:
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError(
                "--prompt is empty. Give the text of the user turn, or leave --prompt out to chat interactively."
            )
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context={self.max_context} is too small; give a number of tokens such as 4096.")
