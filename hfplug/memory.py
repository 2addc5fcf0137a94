"""Memory planner: will this fine-tuning run fit on the GPU, and if not, what will?

    python -m hfplug.fit --model meta-llama/Llama-3.1-8B --quant 4bit --lora_r 16 \\
        --task decision --max_length 512 --batch_size 8 --gpu t4

Reads only ``config.json`` (no weights are downloaded), builds the model on the meta
device to count parameters exactly per kind of module, and prints a breakdown of the
peak GPU memory of one training step with the largest batch size and sequence length
that fit. ``finetune_hupd.py`` calls ``estimate_memory`` before loading on a GPU.

What the estimate models (one CUDA training step with 16-bit autocast, as the Trainer's
``--fp16``/``--bf16`` run it, through ``hfplug.quantization.prepare_for_training``):

- quantized linear weights at bitsandbytes' exact sizes (NF4: 4 bits + uint8 absmax per
  64 values + fp32 second-level constants = ~4.127 bit/param; LLM.int8: 1 byte + an fp32
  scale per row). bitsandbytes replaces only ``nn.Linear`` and skips the output head.
- everything else (embeddings, lm_head, norms, task head). ``prepare_model_for_kbit_training``
  stores these in fp32 for a quantized base, which is more than they take at load time.
- trainable parameters (fp32), their gradients and optimizer states.
- activations saved for backward, per layer and token, from the tensors each op keeps
  (LoRA dropout masks and inputs, SDPA's q/k/v/out/logsumexp — a memory-efficient kernel,
  never the full attention matrix — the gated MLP, the fp32 residual stream); with
  gradient checkpointing only each layer's input is kept and one layer is recomputed.
- the loss: a causal LM's plain loss materialises batch x seq x vocab logits in 16-bit
  and fp32; ``hfplug.chunked_loss`` keeps one chunk at a time instead.
- bitsandbytes dequantization buffers, cuBLAS workspace, allocator fragmentation and the
  CUDA context (outside PyTorch's counters, but it takes GPU memory).
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from hfplug.loading import ConfigUnavailableError, load_config
from hfplug.quantization import SKIP_MODULES, detect_head_modules

GiB = 1024**3
MiB = 1024**2

# Memory the allocator can use. t4 is the "15 GiB usable" (a 16 GB card, Colab
# reports ~14.7 GB); the others are what torch reports as total_memory on those cards.
GPU_MEMORY = {
    "t4": 15.0 * GiB,
    "l4": 22.0 * GiB,
    "a100-40": 39.4 * GiB,
    "a100-80": 79.1 * GiB,
    "h100": 79.1 * GiB,
}
# GPUs without bf16: the planner assumes fp16 there (same size, noted for the user).
_NO_BF16 = {"t4"}

TASKS = ("decision", "ipc", "abstract", "causal_lm")
# Classification tasks get a sequence-classification head; abstract generation and
# language modelling get the LM head and vocab-sized logits.
CLASSIFICATION_TASKS = ("decision", "ipc")
DEFAULT_NUM_LABELS = {"decision": 2, "ipc": 637}  # accept/reject; IPC subclasses in HUPD

# Bytes of optimizer state per trainable parameter. 8-bit optimizers keep two uint8
# states for tensors of >= 4096 values (bitsandbytes' min_8bit_size) plus an fp32
# absmax per 256 values; smaller tensors keep fp32 states.
_ADAM_STATES = 2
OPTIMIZERS = {
    "adamw_torch": ("32bit", _ADAM_STATES),
    "adamw_torch_fused": ("32bit", _ADAM_STATES),
    "adamw_hf": ("32bit", _ADAM_STATES),
    "adamw_apex_fused": ("32bit", _ADAM_STATES),
    "adamw_anyprecision": ("32bit", _ADAM_STATES),
    "paged_adamw_32bit": ("32bit", _ADAM_STATES),
    "adamw_8bit": ("8bit", _ADAM_STATES),
    "adamw_bnb_8bit": ("8bit", _ADAM_STATES),
    "paged_adamw_8bit": ("8bit", _ADAM_STATES),
    "lion_32bit": ("32bit", 1),
    "paged_lion_32bit": ("32bit", 1),
    "lion_8bit": ("8bit", 1),
    "paged_lion_8bit": ("8bit", 1),
    "adagrad": ("32bit", 1),
    "rmsprop": ("32bit", 1),
    "sgd": ("32bit", 0),
    "adafactor": ("factored", 0),
}
_BNB_MIN_8BIT_SIZE = 4096
_BNB_OPTIM_BLOCK = 256

CUDA_CONTEXT = 512 * MiB  # CUDA runtime + cuBLAS/bitsandbytes kernels; outside torch's counters
CUBLAS_WORKSPACE = 32 * MiB  # allocated through the caching allocator
FRAGMENTATION = 0.08  # share of the per-step (activation/logit) churn the allocator cannot reuse


# --------------------------------------------------------------------------- counting


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
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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
    num_labels = _num_labels(task, num_labels)
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


def _num_labels(task: str, num_labels: int | None) -> int | None:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {', '.join(TASKS)}.")
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


# --------------------------------------------------------------------------- sizes


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
    kind, states = OPTIMIZERS.get(optim, ("32bit", _ADAM_STATES))
    total = 0
    for n in tensor_sizes:
        if kind == "8bit" and n >= _BNB_MIN_8BIT_SIZE:
            total += states * (n + math.ceil(n / _BNB_OPTIM_BLOCK) * 4)
        elif kind == "factored":
            total += 4 * int(2 * math.sqrt(n)) + 4  # row + column statistics (approx. for a matrix)
        else:
            total += states * 4 * n
    return total


def _dtype_bytes(dtype: str) -> int:
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose float16, bfloat16 or float32 for the estimate.")
    return 4 if dtype == "float32" else 2


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one training step, by part (bytes). ``total`` is their sum."""

    quantized_weights: int
    other_weights: int
    trainable_params: int
    gradients: int
    optimizer_states: int
    activations: int  # what layers keep alive at the peak (checkpoints + recomputed layer + grads)
    logits: int  # loss-side memory alive at the peak
    workspace: int  # dequantization buffers, cuBLAS workspace
    fragmentation: int
    cuda_context: int
    # Not summed: context for the reader.
    weights_at_load: int = 0  # quantized + unquantized weights right after from_pretrained
    peak_phase: str = ""
    activations_checkpointing: int = 0  # activations at the peak with checkpointing
    activations_no_checkpointing: int = 0  # ... and without
    logits_peak: int = 0  # the loss's own peak (forward or backward of the loss)
    trainable_count: int = 0
    lora_count: int = 0
    head_count: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)

    _PARTS = (
        "quantized_weights",
        "other_weights",
        "trainable_params",
        "gradients",
        "optimizer_states",
        "activations",
        "logits",
        "workspace",
        "fragmentation",
        "cuda_context",
    )

    @property
    def total(self) -> int:
        """Everything the process needs on the GPU at the peak, CUDA context included."""
        return sum(getattr(self, name) for name in self._PARTS)

    @property
    def peak_allocated(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should report (no context, no fragmentation)."""
        return self.total - self.cuda_context - self.fragmentation

    @property
    def peak_reserved(self) -> int:
        """What ``torch.cuda.max_memory_reserved`` should report (allocator, no CUDA context)."""
        return self.total - self.cuda_context


@dataclass(frozen=True)
class _Shape:
    """The config numbers the activation formulas need."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    gated: bool  # SwiGLU-style MLP (Llama, Mistral, Qwen): gate * up
    hidden_dropout: float  # BERT-style dropout on the residual branches


def _shape(config, counts: ModelCounts) -> _Shape:
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    block_names = {lin.name.rsplit(".", 1)[-1] for lin in counts.linears if lin.in_block}
    return _Shape(
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        layers=counts.num_layers,
        vocab=text.vocab_size,
        gated=bool(block_names & {"gate_proj", "w1", "gate_up_proj", "w3"}),
        hidden_dropout=float(getattr(text, "hidden_dropout_prob", 0.0) or 0.0),
    )


def _layer_saved_per_token(
    shape: _Shape, block_linears: list[Linear], lora_names: set[str], *, a: int, rb: int, r: int,
    lora_dropout: float, full_ft: bool, repeat_kv: bool,
) -> int:
    """Bytes one transformer layer saves for backward per token, its input excluded.

    a: compute bytes (2 under fp16/bf16 autocast); rb: bytes of the residual stream
    (fp32 when the embeddings are fp32, as after prepare_model_for_kbit_training).
    """
    h, i = shape.hidden, shape.intermediate
    saved = 0
    # LoRA: dropout mask (1 byte) + lora_A input in compute dtype + lora_B input (rank r).
    # A frozen 4-bit/8-bit base matmul saves only its packed weight (no activation).
    for lin in block_linears:
        if lin.name in lora_names:
            saved += lin.in_features * (a + (1 if lora_dropout > 0 else 0)) + r * a
        elif full_ft:
            saved += lin.in_features * a  # a trainable linear keeps its (cast) input
    # Attention through SDPA's memory-efficient/flash kernel: q, k, v, output, logsumexp.
    kv_heads = shape.heads if repeat_kv else shape.kv_heads
    saved += (2 * shape.heads + 2 * kv_heads) * shape.head_dim * a + shape.heads * 4
    if shape.gated:
        # pre-norm decoder: the mid-layer residual kept by the second RMSNorm, rsqrt of both
        # norms, and their fp32 upcasts when the residual is 16-bit.
        saved += rb * h + 2 * 4 + (2 * 4 * h if rb < 4 else 0)
        saved += 3 * i * a  # SiLU input, SiLU output, up projection (both kept by the product)
    else:
        # post-LN encoder (BERT): two LayerNorm inputs in fp32 + mean/rstd, GELU input,
        # dropout masks on both residual branches.
        saved += 2 * (4 * h + 8) + i * a + (2 * h if shape.hidden_dropout > 0 else 0)
    if full_ft:
        saved += 2 * 4 * h  # trainable norm weights also keep the normalized input
    return saved


def _layer_backward_transient_per_token(shape: _Shape, *, a: int, rb: int) -> int:
    """Gradient buffers alive while one layer runs backward (residual grads + MLP grads)."""
    return 2 * rb * shape.hidden + 3 * shape.intermediate * a


def estimate_memory(
    config,
    *,
    quant: str = "4bit",
    lora_r: int = 16,
    task: str = "decision",
    max_length: int = 512,
    batch_size: int = 8,
    gradient_checkpointing: bool = True,
    optim: str | None = None,
    num_labels: int | None = None,
    dtype: str = "float16",
    lora_target_modules: tuple[str, ...] | list[str] = ("all-linear",),
    lora_dropout: float = 0.05,
    loss_chunk_size: int = 0,
    offload_activations: bool = False,
) -> MemoryEstimate:
    """Estimate the peak GPU memory of one training step.

    ``lora_r=0`` means full fine-tuning (only valid with ``quant="none"``). ``optim``
    defaults like the recipe: ``paged_adamw_8bit`` with 4-bit, else ``adamw_torch``.
    ``loss_chunk_size`` > 0: the causal-LM loss is computed by ``hfplug.chunked_loss`` in
    chunks of that many tokens. ``offload_activations``: checkpointed layer inputs live in
    host memory (``activation_checkpointing_enable(offload=True)``).
    """
    if quant not in ("none", "8bit", "4bit"):
        raise ValueError(f"quant={quant!r}: choose none, 8bit or 4bit.")
    if lora_r < 0:
        raise ValueError(f"lora_r={lora_r} must be >= 0 (0 = full fine-tuning).")
    if quant != "none" and lora_r == 0:
        raise ValueError("A 4-bit/8-bit base cannot be fully fine-tuned: give lora_r > 0, or quant='none'.")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be >= 1.")
    optim = optim or ("paged_adamw_8bit" if quant == "4bit" else "adamw_torch")
    a = _dtype_bytes(dtype)
    counts = parameter_counts(config, task=task, num_labels=num_labels)
    shape = _shape(config, counts)
    tokens = batch_size * max_length
    notes: list[str] = []
    classification = task in CLASSIFICATION_TASKS
    full_ft = lora_r == 0

    # ---- weights
    if quant == "none":
        quantized_bytes = 0
        quantized_linears = []
    else:
        quantized_linears = [lin for lin in counts.linears if lin.quantized]
        quantized_bytes = sum(
            quantized_weight_bytes(lin.in_features * lin.out_features, lin.out_features, quant)
            for lin in quantized_linears
        )
    other = counts.total_params - sum(lin.in_features * lin.out_features for lin in quantized_linears)
    # prepare_model_for_kbit_training upcasts every non-quantized weight to fp32; a frozen
    # 16-bit base stays in 16-bit; full fine-tuning keeps fp32 master weights under fp16.
    if quant != "none":
        other_bytes_per = 4
        notes.append(
            f"unquantized weights are fp32 after prepare_model_for_kbit_training "
            f"({other * a / GiB:.2f} GiB at load time in 16-bit)"
        )
    elif full_ft:
        other_bytes_per = 4 if dtype != "bfloat16" else 2
    else:
        other_bytes_per = a
    head_params = sum(counts.head_tensors)
    # The head is both frozen original and trainable copy under PEFT (modules_to_save).
    other_bytes = other * other_bytes_per - (0 if full_ft else head_params * other_bytes_per)

    # ---- trainable parameters
    lora_names: set[str] = set()
    trainable_sizes: list[int] = []
    if full_ft:
        trainable_sizes = [counts.total_params]  # one number is enough for the arithmetic
        trainable_bytes = 0  # counted in other_bytes
        lora_count = 0
    else:
        targets = lora_targets(counts, tuple(lora_target_modules))
        lora_names = {lin.name for lin in targets}
        for lin in targets:
            trainable_sizes += [lora_r * lin.in_features, lin.out_features * lora_r]
        lora_count = sum(trainable_sizes)
        trainable_sizes += list(counts.head_tensors)
        # LoRA and the head copy in fp32, plus the frozen original head.
        trainable_bytes = 4 * sum(trainable_sizes) + head_params * other_bytes_per
    trainable_count = sum(trainable_sizes)
    grad_bytes = trainable_count * (other_bytes_per if full_ft else 4)
    optim_bytes = optimizer_state_bytes(trainable_sizes, optim)
    if optim not in OPTIMIZERS:
        notes.append(f"optimizer {optim!r} unknown to the planner: assumed AdamW (8 bytes/param)")
    if optim.startswith("paged_"):
        notes.append("paged optimizer states live in CUDA unified memory (not in torch's memory counters)")

    # ---- activations
    # fp32 residual stream when the embeddings are fp32 (quantized base after preparation,
    # or fp32 weights); under autocast a BERT's LayerNorm outputs fp32 as well.
    rb = 4 if (quant != "none" or other_bytes_per == 4 or not shape.gated) else a
    # Classification batches are padded: with a padding mask SDPA cannot use GQA and
    # transformers repeats k/v to all heads. Unpadded causal-LM batches keep GQA.
    repeat_kv = classification and shape.kv_heads != shape.heads
    block_linears = [lin for lin in counts.linears if lin.in_block]
    layer_lists = _group_by_layer(block_linears, shape.layers)
    saved_per_layer = max(
        (
            _layer_saved_per_token(
                shape, lins, lora_names, a=a, rb=rb, r=lora_r, lora_dropout=lora_dropout,
                full_ft=full_ft, repeat_kv=repeat_kv,
            )
            for lins in layer_lists
        ),
        default=0,
    )
    layer_inputs = shape.layers * rb * shape.hidden  # one per layer: the checkpoints
    # model-level: final norm input + rsqrt, rotary cos/sin, the head's (cast) input.
    extras = rb * shape.hidden + 8 + 2 * shape.head_dim * a
    if classification and counts.head_name == "score":
        extras += shape.hidden * a  # decoders score every position, then pool the last token
    if not shape.gated:
        extras += 4 * shape.hidden + 8 + (shape.hidden if shape.hidden_dropout > 0 else 0)  # embedding LayerNorm + dropout
    transient = _layer_backward_transient_per_token(shape, a=a, rb=rb)
    dequant = max((lin.in_features * lin.out_features for lin in quantized_linears), default=0) * a * 2

    stored_ckpt = (0 if offload_activations else layer_inputs) + extras
    act_ckpt = tokens * (stored_ckpt + saved_per_layer + transient)
    act_full = tokens * (layer_inputs + extras + shape.layers * saved_per_layer + transient)
    stored_at_loss = tokens * (stored_ckpt if gradient_checkpointing else layer_inputs + extras + shape.layers * saved_per_layer)
    layer_peak = act_ckpt if gradient_checkpointing else act_full

    # ---- loss
    lm_cast = counts.lm_head_params * a if (quant != "none" or other_bytes_per != a) else 0
    loss_fwd, loss_bwd, note = _loss_bytes(
        shape, task=task, num_labels=num_labels, batch_size=batch_size, max_length=max_length, a=a, rb=rb,
        lm_cast=lm_cast, loss_chunk_size=loss_chunk_size,
    )
    notes += [note] if note else []
    phases = {
        "end of forward": stored_at_loss + loss_fwd,
        "loss backward": stored_at_loss + loss_bwd,
        "layer backward": layer_peak,
    }
    peak_phase = max(phases, key=phases.get)
    activations = layer_peak if peak_phase == "layer backward" else stored_at_loss
    logits = phases[peak_phase] - activations
    workspace = CUBLAS_WORKSPACE + dequant
    frag = int(FRAGMENTATION * phases[peak_phase])
    if offload_activations:
        notes.append(f"{tokens * layer_inputs / GiB:.2f} GiB of checkpointed layer inputs offloaded to pinned host memory")
    return MemoryEstimate(
        quantized_weights=quantized_bytes,
        other_weights=other_bytes,
        trainable_params=trainable_bytes,
        gradients=grad_bytes,
        optimizer_states=optim_bytes,
        activations=activations,
        logits=logits,
        workspace=workspace,
        fragmentation=frag,
        cuda_context=CUDA_CONTEXT,
        weights_at_load=quantized_bytes + other * a,
        peak_phase=peak_phase,
        activations_checkpointing=act_ckpt,
        activations_no_checkpointing=act_full,
        logits_peak=max(loss_fwd, loss_bwd),
        trainable_count=trainable_count,
        lora_count=lora_count,
        head_count=head_params if not full_ft else 0,
        tokens=tokens,
        notes=notes,
    )


def _loss_bytes(shape: _Shape, *, task: str, num_labels: int | None, batch_size: int, max_length: int, a: int,
                rb: int, lm_cast: int, loss_chunk_size: int) -> tuple[int, int, str]:
    """(forward peak, backward peak, note) of the loss, beyond what the layers keep.

    ``lm_cast``: the 16-bit copy autocast makes of an fp32 LM head for its matmul.
    """
    tokens = batch_size * max_length
    if task in CLASSIFICATION_TASKS:
        return (tokens * (_num_labels(task, num_labels) or 2) * 4 * 3,) * 2 + ("",)
    if loss_chunk_size and loss_chunk_size > 0:
        chunk = min(loss_chunk_size, tokens)
        # one chunk at a time: its 16-bit logits, the fp32 logits turned into the gradient
        # in place, logsumexp's scratch; the 16-bit copy of an fp32 head; the gradient of
        # the hidden states, computed in forward and kept for backward.
        fwd = chunk * shape.vocab * (a + 4 + 4) + lm_cast + tokens * shape.hidden * rb
        return fwd, 2 * tokens * shape.hidden * rb, f"loss computed in chunks of {chunk} tokens (hfplug.chunked_loss)"
    # forward: 16-bit logits, their fp32 upcast, the log-softmax output (kept for backward);
    # backward: two fp32 gradient-sized buffers next to the kept output.
    note = (
        f"plain loss materialises {batch_size} x {max_length} x {shape.vocab} logits "
        f"({tokens * shape.vocab * (a + 8) / GiB:.2f} GiB in 16-bit + fp32): "
        "--loss_chunk_size 1024 (hfplug.chunked_loss) avoids it"
    )
    return tokens * shape.vocab * (a + 4 + 4) + lm_cast, tokens * shape.vocab * (4 + 4 + 4) + lm_cast, note


def _group_by_layer(block_linears: list[Linear], num_layers: int) -> list[list[Linear]]:
    """Split the in-block linears by layer index (the first integer in their name)."""
    groups: dict[str, list[Linear]] = {}
    for lin in block_linears:
        match = re.search(r"\.(\d+)\.", "." + lin.name + ".")
        groups.setdefault(match.group(1) if match else "", []).append(lin)
    return list(groups.values())


# --------------------------------------------------------------------------- search


def _fits(config, gpu_mem: int, **kwargs) -> bool:
    return estimate_memory(config, **kwargs).total <= gpu_mem


def _largest(fits, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with fits(n), assuming monotonic; lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    n = lo
    while n * 2 <= hi and fits(n * 2):
        n *= 2
    good, bad = n, min(n * 2, hi + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def max_batch_size(config, *, gpu_mem: int, limit: int = 65536, **kwargs) -> int:
    """Largest per-device batch size that fits ``gpu_mem`` bytes (0 if none)."""
    kwargs.pop("batch_size", None)
    return _largest(lambda b: _fits(config, gpu_mem, batch_size=b, **kwargs), 1, limit)


def max_seq_len(config, *, gpu_mem: int, limit: int | None = None, **kwargs) -> int:
    """Largest sequence length that fits ``gpu_mem`` bytes at the given batch size (0 if none)."""
    kwargs.pop("max_length", None)
    text = getattr(config, "get_text_config", lambda: config)()
    limit = limit or getattr(text, "max_position_embeddings", None) or 1 << 20
    return _largest(lambda s: _fits(config, gpu_mem, max_length=s, **kwargs), 1, limit)


def suggest_settings(config, *, gpu_mem: int, **kwargs) -> list[str]:
    """Settings that would fit, most useful first; ``[]`` when the run fits as given."""
    if _fits(config, gpu_mem, **kwargs):
        return []
    out = []
    batch = kwargs.get("batch_size", 8)
    best_batch = max_batch_size(config, gpu_mem=gpu_mem, **kwargs)
    if best_batch >= 1:
        accum = math.ceil(batch / best_batch)
        out.append(
            f"--per_device_train_batch_size {best_batch} --gradient_accumulation_steps {accum} "
            f"(same effective batch of {best_batch * accum})"
        )
    longest = max_seq_len(config, gpu_mem=gpu_mem, **kwargs)
    if longest >= 1:
        out.append(f"--max_length {longest} (at batch size {batch})")
    if not kwargs.get("gradient_checkpointing", True) and _fits(config, gpu_mem, **{**kwargs, "gradient_checkpointing": True}):
        out.append("--gradient_checkpointing")
    if kwargs.get("quant", "4bit") != "4bit":
        trial = {**kwargs, "quant": "4bit", "lora_r": kwargs.get("lora_r") or 16}
        if _fits(config, gpu_mem, **trial):
            out.append("--quant 4bit --lora")
    if kwargs.get("task") in ("abstract", "causal_lm") and not kwargs.get("loss_chunk_size"):
        if _fits(config, gpu_mem, **{**kwargs, "loss_chunk_size": 1024}):
            out.append("a chunked loss (hfplug.chunked_loss, chunks of 1024 tokens)")
    if not out:
        out.append("nothing fits this GPU even at batch size 1 and 1 token: use a larger GPU or a smaller model")
    return out


# --------------------------------------------------------------------------- CLI


def parse_memory(text: str) -> int:
    """``"15GiB"``, ``"16GB"``, ``"15"`` (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|mib|mb|g|m)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 15GiB, 16GB or 15000MiB")
    value, unit = float(match.group(1)), match.group(2) or "gib"
    scale = {"gib": GiB, "g": GiB, "gb": 1e9, "mib": MiB, "m": MiB, "mb": 1e6}[unit]
    return int(value * scale)


def format_report(est: MemoryEstimate, *, gpu_mem: int, gpu_name: str, header: str,
                  no_ckpt_total: int | None, best_batch: int, best_len: int, batch: int, length: int) -> str:
    """The table ``python -m hfplug.fit`` prints."""
    def row(label: str, value: int, note: str = "") -> str:
        return f"  {label:<48}{value / GiB:>8.2f}  {note}".rstrip()

    lines = [header, ""]
    lines.append(f"  {'part':<48}{'GiB':>8}")
    lines.append(row("quantized linear weights", est.quantized_weights))
    lines.append(row("other weights (embeddings, norms, heads, ...)", est.other_weights))
    lines.append(row("  (all weights right after loading)", est.weights_at_load, f"{est.weights_at_load / 1e9:.2f} GB"))
    lines.append(row("trainable parameters", est.trainable_params, f"{est.trainable_count:,} params"))
    lines.append(row("gradients", est.gradients))
    lines.append(row("optimizer states", est.optimizer_states))
    lines.append(row("activations at the peak", est.activations, f"phase: {est.peak_phase}"))
    lines.append(row("  with gradient checkpointing", est.activations_checkpointing, "(layer backward)"))
    lines.append(row("  without gradient checkpointing", est.activations_no_checkpointing, "(layer backward)"))
    lines.append(row("logits / loss at the peak", est.logits, f"loss peak alone {est.logits_peak / GiB:.2f} GiB"))
    lines.append(row("workspace (dequantization, cuBLAS)", est.workspace))
    lines.append(row("allocator fragmentation (est.)", est.fragmentation))
    lines.append(row("CUDA context", est.cuda_context))
    lines.append("  " + "-" * 56)
    verdict = "fits" if est.total <= gpu_mem else "DOES NOT FIT"
    lines.append(row("total", est.total, f"of {gpu_mem / GiB:.2f} GiB on {gpu_name}: {verdict}"))
    lines.append(row("  predicted torch peak allocated", est.peak_allocated))
    if no_ckpt_total is not None:
        lines.append(row("  total without gradient checkpointing", no_ckpt_total))
    lines.append("")
    lines.append(f"  largest batch size at {length} tokens: {best_batch if best_batch > 0 else 'none fits'}")
    lines.append(f"  largest sequence length at batch size {batch}: {best_len if best_len > 0 else 'none fits'}")
    lines.append("  (indented rows are details, not added to the total)")
    for note in est.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hfplug.fit",
        description="Estimate the GPU memory of a fine-tuning run from config.json alone.",
    )
    parser.add_argument("--model", required=True, help="Hub id or local directory with config.json")
    parser.add_argument("--task", choices=TASKS, default="decision")
    parser.add_argument("--num_labels", type=int, default=None, help="classes (default: decision 2, ipc 637)")
    parser.add_argument("--quant", choices=("none", "8bit", "4bit"), default="4bit")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank; 0 = full fine-tuning")
    parser.add_argument("--lora_target_modules", default="all-linear", help="comma-separated, or all-linear")
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--optim", default=None, help="Trainer optim name (default: paged_adamw_8bit with 4bit)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="compute dtype (default: float16 on a T4, bfloat16 elsewhere)")
    parser.add_argument("--loss_chunk_size", type=int, default=0, help="causal LM: chunked loss (0 = plain)")
    parser.add_argument("--offload_activations", action="store_true", help="checkpointed inputs in host memory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gpu", choices=sorted(GPU_MEMORY), default="t4")
    group.add_argument("--gpu_mem", type=parse_memory, default=None, help="memory of the GPU, e.g. 15GiB or 24GB")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    except ConfigUnavailableError as err:
        print(f"hfplug.fit: cannot read the config of {args.model}: {err}", file=sys.stderr)
        return 2
    gpu_name = args.gpu if args.gpu_mem is None else "custom GPU"
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else GPU_MEMORY[args.gpu]
    dtype = args.dtype or ("float16" if args.gpu_mem is None and args.gpu in _NO_BF16 else "bfloat16")
    kwargs = dict(
        quant=args.quant,
        lora_r=args.lora_r,
        task=args.task,
        max_length=args.max_length,
        batch_size=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing,
        optim=args.optim,
        num_labels=args.num_labels,
        dtype=dtype,
        lora_target_modules=tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip()),
        lora_dropout=args.lora_dropout,
        loss_chunk_size=args.loss_chunk_size,
        offload_activations=args.offload_activations,
    )
    try:
        est = estimate_memory(config, **kwargs)
        no_ckpt = estimate_memory(config, **{**kwargs, "gradient_checkpointing": False}).total if args.gradient_checkpointing else None
        best_batch = max_batch_size(config, gpu_mem=gpu_mem, **kwargs)
        best_len = max_seq_len(config, gpu_mem=gpu_mem, **kwargs)
    except ValueError as err:
        print(f"hfplug.fit: {err}", file=sys.stderr)
        return 2
    counts = parameter_counts(config, task=args.task, num_labels=args.num_labels)
    optim = args.optim or ("paged_adamw_8bit" if args.quant == "4bit" else "adamw_torch")
    lora = f"LoRA r={args.lora_r} on {args.lora_target_modules}" if args.lora_r else "full fine-tuning"
    header = (
        f"hfplug.fit  {args.model}  ({counts.architecture}, task {args.task})\n"
        f"  quant {args.quant}, {lora}, optim {optim}, {dtype} compute\n"
        f"  batch {args.batch_size} x {args.max_length} tokens, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}\n"
        f"  parameters: {counts.total_params:,} ({counts.quantizable_params:,} in quantizable linears); "
        f"trainable {est.trainable_count:,}"
        + (f" (LoRA {est.lora_count:,} + head {est.head_count:,})" if args.lora_r else "")
    )
    print(
        format_report(
            est, gpu_mem=gpu_mem, gpu_name=gpu_name, header=header, no_ckpt_total=no_ckpt,
            best_batch=best_batch, best_len=best_len, batch=args.batch_size, length=args.max_length,
        )
    )
    suggestions = suggest_settings(config, gpu_mem=gpu_mem, **kwargs)
    if suggestions:
        print("\n  suggested settings that fit:")
        for s in suggestions:
            print(f"    {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
