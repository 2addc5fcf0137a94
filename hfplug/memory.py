"""The memory planner's arithmetic: the peak GPU memory of one fine-tuning step, and what fits.

``estimate_memory(config, ...)`` sizes a run from ``config.json`` alone (parameters counted
exactly per kind of module by ``hfplug.param_counts``) and returns a ``MemoryEstimate``
broken down by part; ``max_batch_size``, ``max_seq_len`` and ``suggest_settings`` search
for settings that fit a GPU. The command line is ``python -m hfplug.fit`` (``hfplug/fit.py``);
``finetune_hupd.py`` runs the planner before loading on a GPU (``hfplug.training.model_setup.warn_if_wont_fit``).
The per-token formulas for a layer's activations and the loss are ``hfplug.activations``.

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
  activation checkpointing only each layer's input is kept and one layer is recomputed.
- the loss: a causal LM's plain loss materialises batch x seq x vocab logits in 16-bit
  and fp32; ``hfplug.long_context.loss`` keeps one chunk at a time instead.
- bitsandbytes dequantization buffers, cuBLAS workspace, allocator fragmentation and the
  CUDA context (outside PyTorch's counters, but it takes GPU memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hfplug.activations import (
    GiB,
    MiB,
    group_by_layer,
    layer_backward_transient_per_token,
    layer_saved_per_token,
    loss_bytes,
    model_shape,
)
from hfplug.param_counts import CLASSIFICATION_TASKS, lora_targets, parameter_counts

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

CUDA_CONTEXT = 512 * MiB  # CUDA runtime + cuBLAS/bitsandbytes kernels; outside torch's counters
CUBLAS_WORKSPACE = 32 * MiB  # allocated through the caching allocator
FRAGMENTATION = 0.08  # share of the per-step (activation/logit) churn the allocator cannot reuse


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


def estimate_memory(
    config,
    *,
    quant: str = "4bit",
    lora_r: int = 16,
    task: str = "decision",
    max_length: int = 512,
    batch_size: int = 8,
    activation_checkpointing: bool = True,
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
    ``loss_chunk_size`` > 0: the causal-LM loss is computed by ``hfplug.long_context.loss`` in
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
    shape = model_shape(config, counts)
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
    layer_lists = group_by_layer(block_linears, shape.layers)
    saved_per_layer = max(
        (
            layer_saved_per_token(
                shape,
                lins,
                lora_names,
                a=a,
                rb=rb,
                r=lora_r,
                lora_dropout=lora_dropout,
                full_ft=full_ft,
                repeat_kv=repeat_kv,
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
        extras += (
            4 * shape.hidden + 8 + (shape.hidden if shape.hidden_dropout > 0 else 0)
        )  # embedding LayerNorm + dropout
    transient = layer_backward_transient_per_token(shape, a=a, rb=rb)
    dequant = max((lin.in_features * lin.out_features for lin in quantized_linears), default=0) * a * 2

    stored_ckpt = (0 if offload_activations else layer_inputs) + extras
    act_ckpt = tokens * (stored_ckpt + saved_per_layer + transient)
    act_full = tokens * (layer_inputs + extras + shape.layers * saved_per_layer + transient)
    stored_at_loss = tokens * (
        stored_ckpt if activation_checkpointing else layer_inputs + extras + shape.layers * saved_per_layer
    )
    layer_peak = act_ckpt if activation_checkpointing else act_full

    # ---- loss
    lm_cast = counts.lm_head_params * a if (quant != "none" or other_bytes_per != a) else 0
    loss_fwd, loss_bwd, note = loss_bytes(
        shape,
        task=task,
        num_labels=num_labels,
        batch_size=batch_size,
        max_length=max_length,
        a=a,
        rb=rb,
        lm_cast=lm_cast,
        loss_chunk_size=loss_chunk_size,
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
        notes.append(
            f"{tokens * layer_inputs / GiB:.2f} GiB of checkpointed layer inputs offloaded to pinned host memory"
        )
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
    if not kwargs.get("activation_checkpointing", True) and _fits(
        config, gpu_mem, **{**kwargs, "activation_checkpointing": True}
    ):
        out.append("--activation_checkpointing true")
    if kwargs.get("quant", "4bit") != "4bit":
        trial = {**kwargs, "quant": "4bit", "lora_r": kwargs.get("lora_r") or 16}
        if _fits(config, gpu_mem, **trial):
            out.append("--quant 4bit --lora")
    if kwargs.get("task") in ("abstract", "causal_lm") and not kwargs.get("loss_chunk_size"):
        if _fits(config, gpu_mem, **{**kwargs, "loss_chunk_size": 1024}):
            out.append("a chunked loss (hfplug.long_context.loss, chunks of 1024 tokens)")
    if not out:
        out.append("nothing fits this GPU even at batch size 1 and 1 token: use a larger GPU or a smaller model")
    return out
