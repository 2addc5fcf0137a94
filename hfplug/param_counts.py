"""A model's parameters counted by kind from its ``config.json`` alone, for the memory planner.

``parameter_counts`` builds the task model (a sequence-classification head for ``decision``
and ``ipc``, the LM head for ``abstract`` and plain ``causal_lm``) on the meta device, so no
weight is allocated or downloaded, and records every linear layer: its shape, whether
bitsandbytes would quantize it with hfplug's quantization config, whether it sits in a
repeated transformer layer. ``hfplug.memory`` sizes a training step from these counts;
``lora_targets`` says which layers LoRA adapts; ``quantized_weight_bytes`` and
``optimizer_state_bytes`` give the bytes of quantized weights and of optimizer states.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hfplug.lora import detect_head_modules
from hfplug.quantization import SKIP_MODULES

# What the planner can size: the recipe's tasks (hfplug.data.tasks.TASKS) and plain causal
# language modelling. Classification tasks get a sequence-classification head; abstract
# generation and language modelling get the LM head and vocab-sized logits.
PLANNER_TASKS = ("decision", "ipc", "abstract", "causal_lm")
CLASSIFICATION_TASKS = ("decision", "ipc")
DEFAULT_NUM_LABELS = {"decision": 2, "ipc": 637}  # accept/reject; IPC subclasses in HUPD


# Optimizer name (TrainingArguments.optim) -> (state precision, states per parameter).
# 8-bit optimizers keep uint8 states for tensors of >= 4096 values (bitsandbytes'
# min_8bit_size) plus an fp32 absmax per 256 values; smaller tensors keep fp32 states.
OPTIMIZERS = {
    **dict.fromkeys(
        (
            "adamw_torch",
            "adamw_torch_fused",
            "adamw_hf",
            "adamw_apex_fused",
            "adamw_anyprecision",
            "paged_adamw_32bit",
        ),
        ("32bit", 2),
    ),
    **dict.fromkeys(("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"), ("8bit", 2)),
    **dict.fromkeys(("lion_32bit", "paged_lion_32bit", "adagrad", "rmsprop"), ("32bit", 1)),
    **dict.fromkeys(("lion_8bit", "paged_lion_8bit"), ("8bit", 1)),
    "sgd": ("32bit", 0),
    "adafactor": ("factored", 0),
}
_BNB_MIN_8BIT_SIZE = 4096
_BNB_OPTIM_BLOCK = 256


@dataclass(frozen=True)
class Linear:
    """One linear layer of the model: where it sits and its shape."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    quantized: bool  # bitsandbytes would replace it
    in_block: bool  # inside a repeated transformer layer


@dataclass(frozen=True)
class ModelCounts:
    """Exact parameter counts of the model, from a meta-device instance."""

    architecture: str
    total_params: int
    linears: tuple[Linear, ...]
    other_params: int  # not in quantizable linear weights: embeddings, lm_head, norms, biases, head
    head_tensors: tuple[int, ...]  # numel of each parameter of the task head (modules_to_save)
    head_name: str | None
    lm_head_params: int  # output embedding kept unquantized (0 for classification)
    lm_head_name: str | None
    num_layers: int

    @property
    def quantizable_params(self) -> int:
        return sum(lin.in_features * lin.out_features for lin in self.linears if lin.quantized)


def _model_class(config, task: str):
    return AutoModelForSequenceClassification if task in CLASSIFICATION_TASKS else AutoModelForCausalLM


def _skip_modules(model) -> list[str]:
    """Modules bitsandbytes leaves unquantized with hfplug's quantization config: its head
    names (which replace transformers' default list) plus the model's fp32 modules."""
    return list(SKIP_MODULES) + list(getattr(model, "_keep_in_fp32_modules", None) or [])


def _should_quantize(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, skip)
    except ImportError:
        return not any(name == key or name.startswith(key + ".") or name.endswith(key) for key in skip)


def _block_prefixes(model, num_layers: int) -> list[str]:
    """Names of the repeated transformer layers (the ModuleList with one entry per layer)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers > 0:
            return [f"{name}.{i}" for i in range(num_layers)]
    return []


_COUNT_CACHE: dict[tuple, ModelCounts] = {}


def parameter_counts(config, *, task: str, num_labels: int | None = None) -> ModelCounts:
    """Instantiate the task model on the meta device and count its parameters by kind."""
    num_labels = num_labels_for(task, num_labels)
    key = (config.to_json_string(use_diff=False), task, num_labels)
    if key in _COUNT_CACHE:
        return _COUNT_CACHE[key]
    config = copy.deepcopy(config)  # num_labels is set on a copy, never on the caller's config
    if num_labels is not None:
        config.num_labels = num_labels
    with torch.device("meta"):
        model = _model_class(config, task).from_config(config)
    num_layers = getattr(config, "num_hidden_layers", 0) or 0
    blocks = tuple(p + "." for p in _block_prefixes(model, num_layers))
    skip = _skip_modules(model)
    linears = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear or type(module).__name__ == "Conv1D":
            weight = module.weight
            in_f, out_f = (weight.shape[1], weight.shape[0]) if type(module) is nn.Linear else tuple(weight.shape)
            linears.append(
                Linear(
                    name,
                    in_f,
                    out_f,
                    getattr(module, "bias", None) is not None,
                    _should_quantize(name, skip),
                    name.startswith(blocks),
                )
            )
    total = sum(p.numel() for p in model.parameters())
    quantizable = sum(lin.in_features * lin.out_features for lin in linears if lin.quantized)
    head_name, head_tensors = None, ()
    if task in CLASSIFICATION_TASKS:
        heads = detect_head_modules(model)
        head_name = ", ".join(heads) or None
        head_tensors = tuple(p.numel() for h in heads for p in getattr(model, h).parameters())
    out_emb = model.get_output_embeddings() if task not in CLASSIFICATION_TASKS else None
    counts = ModelCounts(
        architecture=type(model).__name__,
        total_params=total,
        linears=tuple(linears),
        other_params=total - quantizable,
        head_tensors=head_tensors,
        head_name=head_name,
        lm_head_params=out_emb.weight.numel() if out_emb is not None else 0,
        lm_head_name=next((n for n, m in model.named_modules() if out_emb is not None and m is out_emb), None),
        num_layers=num_layers,
    )
    _COUNT_CACHE[key] = counts
    return counts


def num_labels_for(task: str, num_labels: int | None = None) -> int | None:
    """The classes of a classification task (``num_labels`` or the HUPD default); ``None`` for LM tasks."""
    if task not in PLANNER_TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {', '.join(PLANNER_TASKS)}.")
    if task not in CLASSIFICATION_TASKS:
        return None
    return num_labels or DEFAULT_NUM_LABELS[task]


def lora_targets(counts: ModelCounts, targets: tuple[str, ...] | list[str]) -> list[Linear]:
    """The linear layers LoRA adapts: PEFT's all-linear (every linear but the heads) or name suffixes."""
    excluded = tuple(h.strip() for h in (counts.head_name or "").split(",") if h.strip())
    excluded += (counts.lm_head_name,) if counts.lm_head_name else ()
    candidates = [
        lin for lin in counts.linears if not any(lin.name == h or lin.name.startswith(h + ".") for h in excluded)
    ]
    if list(targets) == ["all-linear"]:
        return candidates
    return [lin for lin in candidates if any(lin.name == t or lin.name.endswith("." + t) for t in targets)]


# --------------------------------------------------------------------------- sizes in bytes


def quantized_weight_bytes(numel: int, out_features: int, quant: str, *, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one quantized weight (packed codes + constants)."""
    if quant == "4bit":
        blocks = math.ceil(numel / 64)  # one absmax per 64 values
        packed = math.ceil(numel / 2)
        code = 16 * 4  # the NF4 code book, fp32
        if double_quant:
            # absmax re-quantized to uint8 in blocks of 256, with fp32 absmax and a 256-entry code
            return packed + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + code
        return packed + blocks * 4 + code
    if quant == "8bit":
        return numel + out_features * 4  # int8 codes + fp32 scale per row (SCB)
    raise ValueError(f"quant={quant!r} is not a quantized mode")


def optimizer_state_bytes(tensor_sizes, optim: str) -> int:
    """Optimizer state for trainable tensors of the given sizes."""
    kind, states = OPTIMIZERS.get(optim, ("32bit", 2))
    total = 0
    for n in tensor_sizes:
        if kind == "8bit" and n >= _BNB_MIN_8BIT_SIZE:
            total += states * (n + math.ceil(n / _BNB_OPTIM_BLOCK) * 4)
        elif kind == "factored":
            total += 4 * int(2 * math.sqrt(n)) + 4  # row + column statistics (approx. for a matrix)
        else:
            total += states * 4 * n
    return total
