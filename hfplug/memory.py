"""The memory planner's arithmetic: the peak GPU (and host) memory of one fine-tuning step.

``estimate_memory(config, ...)`` sizes a run from ``config.json`` alone (parameters counted
exactly per kind of module by ``hfplug.param_counts``) and returns a ``MemoryEstimate``
(``hfplug.memory_estimate``) broken down by part; ``applicable_techniques`` says which
``--long_context`` techniques change a run. The search for settings that fit a GPU
(``max_batch_size``, ``max_seq_len``, ``suggest_settings``, and ``choose_techniques``, which is
``--long_context auto``) is ``hfplug.memory_search``. The command line is ``python -m hfplug.fit``
(``hfplug/fit.py``); ``finetune_hupd.py`` runs the planner before loading on a GPU. The per-token
formulas for a layer's activations and the loss are ``hfplug.activations``; host memory is
``hfplug.host_memory``.

What the estimate models (one CUDA training step with 16-bit autocast, as the Trainer's
``--fp16``/``--bf16`` run it, through ``hfplug.quantization.prepare_for_training``):

- quantized linear weights at bitsandbytes' exact sizes (NF4: 4 bits + uint8 absmax per
  64 values + fp32 second-level constants = ~4.127 bit/param; LLM.int8: 1 byte + an fp32
  scale per row). bitsandbytes replaces only ``nn.Linear`` and skips the output head.
- everything else (embeddings, lm_head, norms, task head). ``prepare_model_for_kbit_training``
  stores these in fp32 for a quantized base; ``frozen_16bit`` keeps them 16-bit.
- trainable parameters (fp32), their gradients and optimizer states.
- activations, from the tensors each op keeps (``hfplug.activations.LayerBytes``), with the
  ``--long_context`` techniques (``hfplug.long_context``): the attention's math-kernel scores
  unless ``efficient_attention``, the loss's batch x seq x vocab logits unless ``chunked_loss``,
  the MLP's intermediates over a tile with ``tiled_mlp``, checkpointed layer inputs in pinned
  host memory (within ``max_host_memory``) with ``offload_activations``.
- bitsandbytes dequantization buffers, cuBLAS workspace, allocator fragmentation and the
  CUDA context (outside PyTorch's counters, but it takes GPU memory).

The formulas were checked against a tensor-level tracker on a CPU proxy of Llama-3.1-8B
(``benchmarks/memory_proxy.py``: real and FakeTensorMode training steps at reduced depth);
each place a measurement changed a formula says "Fix (measured)".
"""

from __future__ import annotations

from hfplug.activations import (
    GiB,
    loss_bytes,
    model_shape,
    step_activations,
)
from hfplug.host_memory import OffloadPlan, plan_offload
from hfplug.long_context import AUTO, TECHNIQUES, parse_long_context
from hfplug.memory_estimate import (  # noqa: F401  (re-exported)
    CUBLAS_WORKSPACE,
    CUDA_CONTEXT,
    FRAGMENTATION,
    MemoryEstimate,
)
from hfplug.param_counts import (  # noqa: F401  (sizes re-exported: the planner's public names)
    CLASSIFICATION_TASKS,
    OPTIMIZERS,
    lora_targets,
    optimizer_state_bytes,
    parameter_counts,
    quantized_weight_bytes,
)


def _dtype_bytes(dtype: str) -> int:
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose float16, bfloat16 or float32 for the estimate.")
    return 4 if dtype == "float32" else 2


def named_techniques(long_context) -> tuple[str, ...]:
    """The techniques ``long_context`` names.

    ``"auto"`` is refused: ``hfplug.memory_search.choose_techniques`` decides it, from the estimates made here.
    """
    parsed = parse_long_context(long_context)
    if parsed == AUTO:
        raise ValueError(
            "long_context='auto' is decided by choose_techniques(); estimate_memory needs the techniques."
        )
    return parsed


def applicable_techniques(
    config,
    *,
    task: str = "causal_lm",
    quant: str = "4bit",
    activation_checkpointing: bool = True,
    num_labels: int | None = None,
    **_,
) -> tuple[str, ...]:
    """The techniques of ``TECHNIQUES`` that change this run, cheapest first (what ``all`` and ``auto`` may use).

    frozen_16bit needs a quantized base (a 16-bit base is already frozen in 16-bit); chunked_loss a causal
    LM's loss; tiled_mlp a gated decoder MLP; offload_activations activation checkpointing.
    """
    counts = parameter_counts(config, task=task, num_labels=num_labels)
    shape = model_shape(config, counts)
    skip = set()
    if quant == "none":
        skip.add("frozen_16bit")
    if task in CLASSIFICATION_TASKS:
        skip.add("chunked_loss")
    if not shape.gated:
        skip.add("tiled_mlp")
    if not activation_checkpointing:
        skip.add("offload_activations")
    return tuple(t for t in TECHNIQUES if t not in skip)


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
    long_context: tuple[str, ...] | list[str] | str = (),
    max_host_memory: int | None = None,
    loss_chunk_size: int = 1024,
    tile_tokens: int = 4096,
) -> MemoryEstimate:
    """Estimate the peak GPU memory (and the host memory) of one training step.

    ``lora_r=0`` means full fine-tuning (only valid with ``quant="none"``). ``optim``
    defaults like the recipe: ``paged_adamw_8bit`` with 4-bit, else ``adamw_torch``.
    ``long_context``: the techniques of ``hfplug.long_context.TECHNIQUES`` the run turns on (names, a
    comma list, ``"all"`` or ``"off"``); ``loss_chunk_size`` and ``tile_tokens`` are the chunk of
    ``chunked_loss`` and the tile of ``tiled_mlp`` (the runtime's defaults). ``max_host_memory``: bytes of
    pinned host RAM ``offload_activations`` may fill (``--max_host_memory``; ``None``: no limit).
    """
    if quant not in ("none", "8bit", "4bit"):
        raise ValueError(f"quant={quant!r}: choose none, 8bit or 4bit.")
    if lora_r < 0:
        raise ValueError(f"lora_r={lora_r} must be >= 0 (0 = full fine-tuning).")
    if quant != "none" and lora_r == 0:
        raise ValueError("A 4-bit/8-bit base cannot be fully fine-tuned: give lora_r > 0, or quant='none'.")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be >= 1.")
    if loss_chunk_size < 1 or tile_tokens < 1:
        raise ValueError(f"loss_chunk_size={loss_chunk_size} and tile_tokens={tile_tokens} must be >= 1.")
    techniques = named_techniques(long_context)
    optim = optim or ("paged_adamw_8bit" if quant == "4bit" else "adamw_torch")
    a = _dtype_bytes(dtype)
    counts = parameter_counts(config, task=task, num_labels=num_labels)
    shape = model_shape(config, counts)
    tokens = batch_size * max_length
    notes: list[str] = []
    classification = task in CLASSIFICATION_TASKS
    full_ft = lora_r == 0
    # A technique that cannot apply to this run is left out with a note, as "all" and "auto" leave it out
    # (the runtime refuses one named explicitly: tiled_mlp without a decoder MLP, offload without checkpointing).
    applicable = applicable_techniques(
        config, task=task, quant=quant, activation_checkpointing=activation_checkpointing, num_labels=num_labels
    )
    why = {
        "frozen_16bit": "a 16-bit base is not upcast",
        "chunked_loss": "a classifier's loss is small",
        "tiled_mlp": f"{counts.architecture} has no decoder MLP to tile",
        "offload_activations": "it moves checkpointed layer inputs, and activation checkpointing is off",
    }
    for technique in techniques:
        if technique not in applicable:
            notes.append(f"{technique} does nothing here ({why[technique]}): not counted")
    techniques = tuple(t for t in techniques if t in applicable)
    frozen_16bit = "frozen_16bit" in techniques
    chunked = "chunked_loss" in techniques

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
    # prepare_model_for_kbit_training upcasts every non-quantized weight to fp32; frozen_16bit
    # skips it (they stay 16-bit); full fine-tuning keeps fp32 master weights under fp16.
    if quant != "none" and not frozen_16bit:
        other_bytes_per = 4
        notes.append(
            f"unquantized weights are fp32 after prepare_model_for_kbit_training "
            f"({other * a / GiB:.2f} GiB at load time in 16-bit): --long_context frozen_16bit keeps them 16-bit"
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

    # ---- activations (hfplug.activations: bytes per token, times the step's tokens)
    # The residual stream has the embeddings' dtype: fp32 for a quantized base after preparation (or fp32
    # weights), 16-bit with frozen_16bit; under autocast a BERT's LayerNorm outputs fp32 as well.
    rb = 4 if (other_bytes_per == 4 or not shape.gated) else a
    # bitsandbytes returns a linear's output in its input's dtype: an fp32 residual makes the MLP fp32.
    mlp_b = rb if quant != "none" else a
    # Checkpointed layer inputs on the GPU. offload_activations moves the first layers' to pinned host
    # memory; what stays (measured on the proxy): the layers that did not fit the budget; layer 0's input
    # anyway, held by autograd as a leaf that requires grad (PEFT's enable_input_require_grads); in backward
    # the copy back of the next layer's input (prefetched); and, with an fp32 residual, the recomputed
    # layer's own copy back, which its input norm keeps.
    offload = (
        plan_offload(
            layers=shape.layers,
            tokens=tokens,
            hidden=shape.hidden,
            residual_bytes=rb,
            max_host_memory=max_host_memory,
        )
        if "offload_activations" in techniques
        else OffloadPlan(0, 0)
    )
    n_off, layers = offload.layers_offloaded, shape.layers
    held = 1 if n_off and not full_ft else 0
    ckpt_fwd = layers - n_off + held
    ckpt_bwd = ckpt_fwd + (1 if n_off and n_off >= layers - 1 else 0) + (1 if n_off == layers and rb == 4 else 0)
    acts = step_activations(
        shape,
        [lin for lin in counts.linears if lin.in_block],
        lora_names,
        a=a,
        rb=rb,
        mlp_b=mlp_b,
        r=lora_r,
        lora_dropout=lora_dropout,
        full_ft=full_ft,
        classification=classification,
        score_head=counts.head_name == "score",
        efficient_attention="efficient_attention" in techniques,
        tiled_mlp="tiled_mlp" in techniques,
        tile_tokens=tile_tokens,
        batch_size=batch_size,
        max_length=max_length,
        lora_count=lora_count,
        checkpoints=(ckpt_fwd, ckpt_bwd),
    )
    act_ckpt, act_full = acts.checkpointing, acts.no_checkpointing
    stored_at_loss = acts.at_loss_checkpointing if activation_checkpointing else acts.at_loss_no_checkpointing
    layer_peak = act_ckpt if activation_checkpointing else act_full
    if acts.math_attention:
        notes.append(
            f"attention: grouped-query SDPA without a mask falls back to the math kernel on a T4 "
            f"({tokens * max_length * shape.heads * 12 / GiB:.2f} GiB of fp32 scores in a layer's backward): "
            "--long_context efficient_attention avoids it"
        )
    dequant = max((lin.in_features * lin.out_features for lin in quantized_linears), default=0) * a

    # ---- loss
    lm_cast = counts.lm_head_params * a if (other_bytes_per != a and a < 4) else 0
    loss_fwd, loss_bwd, note = loss_bytes(
        shape,
        task=task,
        num_labels=num_labels,
        batch_size=batch_size,
        max_length=max_length,
        a=a,
        rb=rb,
        lm_cast=lm_cast,
        loss_chunk_size=loss_chunk_size if chunked else 0,
    )
    notes += [note] if note else []
    # Fix (measured): one dequantized weight, and only while a layer runs. bitsandbytes dequantizes a 4-bit
    # weight for each matmul and frees it right after; the proxy's layer peaks hold at most one, its loss
    # peaks none (the head is not quantized).
    phases = {
        "end of forward": stored_at_loss + loss_fwd,
        "loss backward": stored_at_loss + loss_bwd,
        "layer backward": layer_peak + dequant,
    }
    peak_phase = max(phases, key=phases.get)
    activations = layer_peak if peak_phase == "layer backward" else stored_at_loss
    workspace = CUBLAS_WORKSPACE + (dequant if peak_phase == "layer backward" else 0)
    logits = phases[peak_phase] - activations - (workspace - CUBLAS_WORKSPACE)
    frag = int(FRAGMENTATION * phases[peak_phase])
    if n_off:
        notes.append(
            f"offload_activations: {n_off} of {layers} layer inputs in pinned host memory "
            f"({offload.host_bytes / GiB:.2f} GiB), {layers - n_off} on the GPU"
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
        long_context=techniques,
        layers_offloaded=n_off,
        host_offloaded=offload.host_bytes,
        notes=notes,
    )
