"""``ModelArguments``: the model options every recipe shares (``--quant``, ``--dtype``, ``--lora``...).

Parsed by ``HfArgumentParser`` next to ``TrainingArguments``, or read from a YAML config;
``__post_init__`` rejects bad values before anything is loaded. What the options turn
into lives beside: dtype and bitsandbytes in :mod:`hfplug.quantization`, LoRA in
:mod:`hfplug.lora`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hfplug.long_context import parse_long_context
from hfplug.sizes import parse_memory

QUANT_CHOICES = ("none", "8bit", "4bit")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
QUANT_STORAGE_CHOICES = ("auto", "uint8", "float16", "bfloat16", "float32")
# PEFT's shorthand for "every linear layer except the output/classification head".
ALL_LINEAR = "all-linear"


def _split_commas(values: Iterable[str] | str) -> list[str]:
    """``"q_proj,v_proj"`` or ``["q_proj,v_proj", "o_proj"]`` -> ``["q_proj", "v_proj", "o_proj"]``."""
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


@dataclass
class ModelArguments:
    """Which model to load, how to quantize it, and whether to train LoRA adapters on it."""

    model_name_or_path: str = field(
        default="anferico/bert-for-patents",
        metadata={"help": "Hub model id or local directory of the base model."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Hub id or directory of the tokenizer, if not the model's own."},
    )
    quant: str = field(
        default="none",
        metadata={
            "help": "Weight quantization at load time: none, 8bit (LLM.int8) or 4bit (NF4 + double quantization). "
            "A quantized base trains only with --lora.",
            "choices": list(QUANT_CHOICES),
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weight/compute dtype. auto = bfloat16 where the GPU supports it, float16 on GPUs without "
            "bf16 (T4, V100), float32 on CPU.",
            "choices": list(DTYPE_CHOICES),
        },
    )
    lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters (+ the task head) instead of all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: [ALL_LINEAR],
        metadata={
            "help": "Module names to adapt, space- or comma-separated (e.g. q_proj,v_proj); "
            "'all-linear' = every linear layer except the head."
        },
    )
    quant_storage: str = field(
        default="auto",
        metadata={
            "help": "dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage; values are unchanged, "
            "only the container). auto = uint8, or the model's --dtype under FSDP, which shards only float "
            "tensors of one dtype. With --quant 4bit only.",
            "choices": list(QUANT_STORAGE_CHOICES),
        },
    )
    long_context: str = field(
        default="off",
        metadata={
            "help": "Memory techniques for long sequences: off; auto (those the memory planner says --max_length "
            "needs on this GPU); all; or a comma-separated list of frozen_16bit, efficient_attention, chunked_loss, "
            "tiled_mlp, offload_activations (see hfplug.long_context)."
        },
    )
    max_host_memory: str = field(
        default="auto",
        metadata={
            "help": "Host RAM that offload_activations may fill with pinned layer inputs, e.g. 6GiB. auto = total "
            "RAM minus 5 GiB kept for the process itself (about 6.8 GiB on Colab's 12.7 GB)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository (only for repos you trust)."}
    )

    def __post_init__(self) -> None:
        if self.quant not in QUANT_CHOICES:
            raise ValueError(f"quant={self.quant!r} is not supported; choose one of {', '.join(QUANT_CHOICES)}.")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}.")
        if self.quant_storage not in QUANT_STORAGE_CHOICES:
            raise ValueError(
                f"quant_storage={self.quant_storage!r} is not supported; "
                f"choose one of {', '.join(QUANT_STORAGE_CHOICES)}."
            )
        if self.quant_storage != "auto" and self.quant != "4bit":
            raise ValueError(
                f"quant_storage={self.quant_storage!r} applies to 4-bit weights only, but quant={self.quant!r}; "
                "add --quant 4bit or leave quant_storage at auto."
            )
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r!r} must be a positive integer (typical: 8, 16, 64).")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int) or self.lora_alpha < 1:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a positive integer (typical: 2 * lora_r).")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be a number in [0, 1).")
        self.long_context = ",".join(self.long_context) if isinstance(self.long_context, list) else self.long_context
        parse_long_context(self.long_context)  # unknown technique names fail here, before any loading
        if self.max_host_memory != "auto":
            try:
                parse_memory(str(self.max_host_memory))
            except ValueError as err:
                raise ValueError(f"max_host_memory: {err}, or auto.") from None
        # YAML and the CLI may hand over "q_proj,v_proj" as one string.
        self.lora_target_modules = _split_commas(self.lora_target_modules)
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; give module names (e.g. q_proj,v_proj) or 'all-linear'.")
        if ALL_LINEAR in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise ValueError(
                f"lora_target_modules={self.lora_target_modules!r} mixes 'all-linear' with names; "
                "use either 'all-linear' or a list of module names."
            )
