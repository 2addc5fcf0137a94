"""The per-token part of the memory planner: what one transformer layer and the loss keep for backward.

:func:`model_shape` reads the numbers the formulas need from a config;
:func:`layer_saved_per_token` counts the bytes a layer saves per token (LoRA inputs and
dropout masks, SDPA's q/k/v/out/logsumexp, the MLP, norms); :func:`loss_bytes` sizes the
loss (classification, plain causal-LM logits, or ``hfplug.long_context.loss``). ``hfplug.memory``
multiplies them by the tokens of a step and adds weights, gradients and optimizer states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hfplug.param_counts import CLASSIFICATION_TASKS, Linear, ModelCounts, num_labels_for

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Shape:
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


def model_shape(config, counts: ModelCounts) -> Shape:
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    block_names = {lin.name.rsplit(".", 1)[-1] for lin in counts.linears if lin.in_block}
    return Shape(
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


def layer_saved_per_token(
    shape: Shape,
    block_linears: list[Linear],
    lora_names: set[str],
    *,
    a: int,
    rb: int,
    r: int,
    lora_dropout: float,
    full_ft: bool,
    repeat_kv: bool,
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


def layer_backward_transient_per_token(shape: Shape, *, a: int, rb: int) -> int:
    """Gradient buffers alive while one layer runs backward (residual grads + MLP grads)."""
    return 2 * rb * shape.hidden + 3 * shape.intermediate * a


def loss_bytes(
    shape: Shape,
    *,
    task: str,
    num_labels: int | None,
    batch_size: int,
    max_length: int,
    a: int,
    rb: int,
    lm_cast: int,
    loss_chunk_size: int,
) -> tuple[int, int, str]:
    """(forward peak, backward peak, note) of the loss, beyond what the layers keep.

    ``lm_cast``: the 16-bit copy autocast makes of an fp32 LM head for its matmul.
    """
    tokens = batch_size * max_length
    if task in CLASSIFICATION_TASKS:
        return (tokens * (num_labels_for(task, num_labels) or 2) * 4 * 3,) * 2 + ("",)
    if loss_chunk_size and loss_chunk_size > 0:
        chunk = min(loss_chunk_size, tokens)
        # one chunk at a time: its 16-bit logits, the fp32 logits turned into the gradient
        # in place, logsumexp's scratch; the 16-bit copy of an fp32 head; the gradient of
        # the hidden states, computed in forward and kept for backward.
        fwd = chunk * shape.vocab * (a + 4 + 4) + lm_cast + tokens * shape.hidden * rb
        return fwd, 2 * tokens * shape.hidden * rb, f"loss computed in chunks of {chunk} tokens (hfplug.long_context.loss)"
    # forward: 16-bit logits, their fp32 upcast, the log-softmax output (kept for backward);
    # backward: two fp32 gradient-sized buffers next to the kept output.
    note = (
        f"plain loss materialises {batch_size} x {max_length} x {shape.vocab} logits "
        f"({tokens * shape.vocab * (a + 8) / GiB:.2f} GiB in 16-bit + fp32): "
        "--loss_chunk_size 1024 (hfplug.long_context.loss) avoids it"
    )
    return tokens * shape.vocab * (a + 4 + 4) + lm_cast, tokens * shape.vocab * (4 + 4 + 4) + lm_cast, note


def group_by_layer(block_linears: list[Linear], num_layers: int) -> list[list[Linear]]:
    """Split the in-block linears by layer index (the first integer in their name)."""
    groups: dict[str, list[Linear]] = {}
    for lin in block_linears:
        match = re.search(r"\.(\d+)\.", "." + lin.name + ".")
        groups.setdefault(match.group(1) if match else "", []).append(lin)
    return list(groups.values())
