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


# Linear layers that read the same input tensor (the output of one norm). With LoRA dropout 0 and an input
# already in the compute dtype, their LoRA branches save that one tensor (PEFT's dropout is an Identity, and
# autocast returns a 16-bit input as is); otherwise each LoRA saves its own dropout output or 16-bit cast.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "wqkv", "wo")
MLP_IN_NAMES = ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "c_fc")


@dataclass(frozen=True)
class LayerBytes:
    """What one transformer layer holds for its backward, in bytes per token (``*_scores``: per token and key).

    Measured op by op on the CPU proxy of Llama-3.1-8B (``benchmarks/memory_proxy.py``), whose tracker lists the
    tensors alive at the peak: a checkpointed layer peaks in its MLP backward (everything the layer saved
    is still alive, and the MLP's input gradient is being summed from its base and LoRA paths), in the
    backward of the norm between attention and MLP (with a tiled MLP, past ~12k tokens: RMSNorm's backward
    makes several fp32 tensors of the hidden width), or in its attention backward (the math kernel's
    seq x seq buffers are the largest).
    """

    kept: int  # saved outside the MLP: norm inputs, q/k/v LoRA inputs, attention (O(seq) part), LoRA-A outputs
    mlp_kept: int  # saved by the MLP until its backward: intermediates and gate/up LoRA inputs (tiled: its input)
    down_input: int  # the down projection's LoRA input: freed before the MLP backward peaks
    mlp_backward: int  # gradients while the MLP runs backward (untiled), besides the residual gradient
    mlp_tile: int  # per token of one tile: a tiled MLP's recompute and gradients (0 when untiled)
    attention_kept: int  # what the attention backward still holds (input norm, q/k/v LoRA inputs, SDPA saved)
    attention_backward: int  # SDPA's gradients (O(seq) part)
    kept_scores: int  # the math kernel's saved softmax, per token and key (0 for O(seq) kernels)
    backward_scores: int  # the math kernel's backward buffers, per token and key
    residual_grad: int  # the gradient flowing through the residual stream
    norm_backward: int = 0  # while the mid-layer norm runs backward (besides attention_kept)

    @property
    def saved(self) -> int:
        """Everything the layer keeps between its forward and its backward (without checkpointing)."""
        return self.kept + self.mlp_kept + self.down_input


def _lora_inputs(lins, lora_names, *, x_bytes: int, a: int, lora_dropout: float, shared_ok: bool) -> int:
    """Bytes per token the LoRA branches of ``lins`` save for their A matrices' gradients."""
    total, counted = 0, set()
    for lin in lins:
        if lin.name not in lora_names:
            continue
        suffix = lin.name.rsplit(".", 1)[-1]
        if lora_dropout > 0:  # its own dropout mask (1 byte) and output (saved as, or cast to, 16-bit)
            total += lin.in_features * (1 + a)
            continue
        if x_bytes != a:  # each LoRA-A makes (and saves) its own 16-bit cast of the input
            total += lin.in_features * a
            continue
        group = next((g for g in SHARED_INPUTS if suffix in g), (suffix,))
        if shared_ok and group not in counted:
            counted.add(group)
            total += lin.in_features * a
        elif not shared_ok:
            total += lin.in_features * a
    return total


def decoder_layer_bytes(
    shape: Shape,
    block_linears: list[Linear],
    lora_names: set[str],
    *,
    a: int,
    rb: int,
    mlp_b: int,
    r: int,
    lora_dropout: float,
    full_ft: bool,
    repeat_kv: bool,
    math_attention: bool,
    tiled_mlp: bool,
) -> LayerBytes:
    """Per-token bytes of one gated (Llama-style, pre-norm) decoder layer; see :class:`LayerBytes`.

    a: compute bytes (2 under fp16/bf16 autocast); rb: the residual stream's bytes (fp32 when the embeddings are
    fp32, as after ``prepare_model_for_kbit_training``); mlp_b: the MLP intermediates' bytes (bitsandbytes returns
    its output in the input's dtype, so fp32 with an fp32 residual; 16-bit for plain linear layers).
    """
    h, i, hd = shape.hidden, shape.intermediate, shape.head_dim
    attn_lins = [lin for lin in block_linears if lin.name.rsplit(".", 1)[-1] in ATTENTION_NAMES]
    mlp_in = [lin for lin in block_linears if lin.name.rsplit(".", 1)[-1] in MLP_IN_NAMES]
    down = [lin for lin in block_linears if lin not in attn_lins and lin not in mlp_in]
    qkv = [lin for lin in attn_lins if not lin.name.endswith(("o_proj", "wo"))]
    lora_out = sum(r * a for lin in block_linears if lin.name in lora_names)  # LoRA-B inputs (rank r)
    # Norms: RMSNorm saves its fp32 input (an fp32 copy of a 16-bit residual) and rsqrt. With an fp32 residual
    # the input norm saves the layer input itself, which is the checkpoint: only the mid-layer one is new.
    norm_in = (4 * h if rb < 4 else 0) + 4
    norm_mid = 4 * h + 4
    # Fix (measured): the norm outputs are the q/k/v and gate/up inputs; they are shared by the LoRA branches
    # only when already 16-bit (a frozen 16-bit base), else each LoRA-A saves a 16-bit cast of its own.
    qkv_in = _lora_inputs(qkv, lora_names, x_bytes=rb, a=a, lora_dropout=lora_dropout, shared_ok=True)
    mlp_lora_in = _lora_inputs(mlp_in, lora_names, x_bytes=rb, a=a, lora_dropout=lora_dropout, shared_ok=True)
    down_in = _lora_inputs(down, lora_names, x_bytes=mlp_b, a=a, lora_dropout=lora_dropout, shared_ok=True)
    if full_ft:  # trainable linears keep their (cast) inputs, trainable norms their normalized inputs
        qkv_in += 3 * h * a
        mlp_lora_in += h * a
        down_in += i * a
        norm_in += 4 * h
        norm_mid += 4 * h
    kv_heads = shape.heads if repeat_kv else shape.kv_heads
    if math_attention:
        # The math kernel upcasts to fp32 (PyTorch >= 2.5, CPU and CUDA alike) and keeps q, k, v (k/v repeated to
        # all heads) and the softmax (heads x seq x seq); its output is copied for o_proj's LoRA input. In
        # backward, the softmax's gradient and its input's are two more fp32 seq x seq buffers.
        sdpa = 3 * shape.heads * hd * 4 + shape.heads * hd * a
        sdpa_grad = 0
        kept_scores, backward_scores = shape.heads * 4, 2 * shape.heads * 4
    else:
        # O(seq) kernels (memory-efficient, flash): q, k, v, output (which is also o_proj's LoRA input: the
        # kernels write it in the layout o_proj reads) and the fp32 logsumexp; their gradients in backward.
        sdpa = (2 * shape.heads + 2 * kv_heads) * hd * a + shape.heads * 4
        sdpa_grad = (2 * shape.heads + 2 * kv_heads) * hd * a
        kept_scores = backward_scores = 0
    if tiled_mlp:
        # The tiled MLP keeps only its input; its backward writes the input gradient (full length) and
        # recomputes one tile at a time: that tile's intermediates and gradients, LoRA casts, gradient sum.
        mlp_kept, mlp_backward = h * rb, h * rb
        mlp_tile = 6 * i * mlp_b + mlp_lora_in + h * rb
        down_in = 0
    else:
        # Fix (measured): the MLP backward peaks when the gradient of the down projection's input is summed
        # from its base and LoRA paths: two partial gradients and their sum next to the saved gate, up and
        # SiLU outputs = 6 x intermediate x mlp_b. The down input itself is freed by then.
        mlp_kept, mlp_backward, mlp_tile = 3 * i * mlp_b + mlp_lora_in, 3 * i * mlp_b, 0
    # Fix (measured): RMSNorm's backward in fp32 holds its saved input and five fp32 temporaries of the hidden
    # width (grad casts, x * grad, pow and mean backward), next to the incoming gradient.
    norm_backward = norm_mid + 5 * 4 * h + rb * h
    return LayerBytes(
        kept=norm_in + norm_mid + qkv_in + sdpa + lora_out,
        mlp_kept=mlp_kept,
        down_input=down_in,
        mlp_backward=mlp_backward,
        mlp_tile=mlp_tile,
        attention_kept=norm_in + qkv_in + sdpa,
        attention_backward=sdpa_grad,
        kept_scores=kept_scores,
        backward_scores=backward_scores,
        residual_grad=rb * h,
        norm_backward=norm_backward,
    )


def encoder_layer_bytes(
    shape: Shape,
    block_linears: list[Linear],
    lora_names: set[str],
    *,
    a: int,
    r: int,
    lora_dropout: float,
    full_ft: bool,
) -> LayerBytes:
    """Per-token bytes of a post-LN encoder layer (BERT), as one block: no tiling, O(seq) attention."""
    h, i = shape.hidden, shape.intermediate
    saved = 0
    for lin in block_linears:  # LoRA: dropout mask + input in compute dtype + lora_B input (rank r)
        if lin.name in lora_names:
            saved += lin.in_features * (a + (1 if lora_dropout > 0 else 0)) + r * a
        elif full_ft:
            saved += lin.in_features * a
    saved += 4 * shape.heads * shape.head_dim * a + shape.heads * 4  # SDPA: q, k, v, output, logsumexp
    # two LayerNorm inputs in fp32 + mean/rstd, GELU input, dropout masks on both residual branches
    saved += 2 * (4 * h + 8) + i * a + (2 * h if shape.hidden_dropout > 0 else 0)
    if full_ft:
        saved += 2 * 4 * h
    return LayerBytes(
        kept=saved,
        mlp_kept=0,
        down_input=0,
        mlp_backward=3 * i * a + 4 * h,
        mlp_tile=0,
        attention_kept=saved,
        attention_backward=0,
        kept_scores=0,
        backward_scores=0,
        residual_grad=4 * h,
    )


@dataclass(frozen=True)
class StepActivations:
    """Activation bytes of a whole step at its layer-backward peak, and while the loss runs."""

    checkpointing: int  # the layer-backward peak with activation checkpointing
    no_checkpointing: int  # ... and without
    at_loss_checkpointing: int  # what the layers keep while the loss runs forward and backward
    at_loss_no_checkpointing: int
    math_attention: bool  # the attention runs on SDPA's math kernel (seq x seq scores)


def step_activations(
    shape: Shape,
    block_linears: list[Linear],
    lora_names: set[str],
    *,
    a: int,
    rb: int,
    mlp_b: int,
    r: int,
    lora_dropout: float,
    full_ft: bool,
    classification: bool,
    score_head: bool,
    efficient_attention: bool,
    tiled_mlp: bool,
    tile_tokens: int,
    batch_size: int,
    max_length: int,
    lora_count: int,
    checkpoints: tuple[int, int],
) -> StepActivations:
    """Add up one step's activations from :class:`LayerBytes` and the model-level tensors.

    ``checkpoints``: how many layer inputs are on the GPU while the loss runs and at the layer-backward peak
    (all layers, less those ``offload_activations`` moves to host memory; see ``hfplug.memory``).
    """
    tokens = batch_size * max_length
    # Attention kernels. Padded classification batches carry a mask: transformers repeats k/v to all heads
    # and SDPA runs an O(seq) kernel. Unpadded causal-LM batches ask SDPA for grouped-query attention, which
    # a T4's memory-efficient kernel refuses: it falls back to the math kernel, seq x seq scores per head;
    # efficient_attention repeats k/v and pins the O(seq) kernels (hfplug.long_context.attention).
    gqa = shape.kv_heads != shape.heads
    math_attention = shape.gated and gqa and not efficient_attention and not classification
    repeat_kv = gqa and (classification or efficient_attention)
    # The runtime tiles positions: tile_tokens // batch of them; a sequence no longer than that runs untiled.
    tile = max(1, tile_tokens // batch_size) * batch_size
    tiled = tiled_mlp and max_length > tile // batch_size
    kw = dict(a=a, r=r, lora_dropout=lora_dropout, full_ft=full_ft)
    # Layers of the same structure (all of them, in most models) are sized once.
    groups = {}
    for lins in group_by_layer(block_linears, shape.layers):
        signature = tuple((lin.name.rsplit(".", 1)[-1], lin.in_features, lin.name in lora_names) for lin in lins)
        groups.setdefault(signature, lins)
    per_layer = [
        decoder_layer_bytes(
            shape,
            lins,
            lora_names,
            rb=rb,
            mlp_b=mlp_b,
            repeat_kv=repeat_kv,
            math_attention=math_attention,
            tiled_mlp=tiled,
            **kw,
        )
        if shape.gated
        else encoder_layer_bytes(shape, lins, lora_names, **kw)
        for lins in groups.values()
    ]
    layer = max(per_layer, key=lambda lb: lb.saved, default=None) or LayerBytes(*([0] * 10))
    # Model-level tensors. Gated decoders: rotary cos/sin (residual dtype) all along; the final norm's fp32
    # input and rsqrt until the loss's backward is done. Encoders: the embedding LayerNorm and dropout.
    if shape.gated:
        extras_layer = 2 * shape.head_dim * rb
        extras_loss = extras_layer + 4 * shape.hidden + 4
    else:
        extras_layer = extras_loss = 5 * shape.hidden + 16 + (shape.hidden if shape.hidden_dropout > 0 else 0)
    if classification and score_head:  # decoders score every position, then pool the last token
        extras_layer += shape.hidden * a
        extras_loss += shape.hidden * a
    # Autocast's 16-bit copies of the fp32 LoRA weights: cached for the forward, kept by their matmuls for
    # backward (measured).
    lora_cast = lora_count * a if a < 4 else 0
    h_rb, layers = rb * shape.hidden, shape.layers
    score_tokens = tokens * max_length  # per-token-and-key terms (batch x heads x seq x seq in total)
    mlp = tokens * (layer.kept + layer.mlp_kept + layer.mlp_backward + layer.residual_grad)
    mlp += score_tokens * layer.kept_scores + (min(tile, tokens) * layer.mlp_tile if tiled else 0)
    attn = tokens * (layer.attention_kept + layer.attention_backward + layer.residual_grad)
    norm = tokens * (layer.attention_kept + layer.norm_backward) + score_tokens * layer.kept_scores
    peak_layer = max(mlp, norm, attn + score_tokens * (layer.kept_scores + layer.backward_scores))
    ckpt_fwd, ckpt_bwd = checkpoints
    # Without checkpointing every layer keeps what it saved; the last one runs backward first.
    all_saved = tokens * (layers * h_rb + layers * layer.saved) + score_tokens * layers * layer.kept_scores
    return StepActivations(
        checkpointing=tokens * (ckpt_bwd * h_rb + extras_layer) + lora_cast + peak_layer,
        no_checkpointing=all_saved
        - tokens * layer.saved
        - score_tokens * layer.kept_scores
        + tokens * extras_layer
        + lora_cast
        + peak_layer,
        at_loss_checkpointing=tokens * (ckpt_fwd * h_rb + extras_loss) + lora_cast,
        at_loss_no_checkpointing=all_saved + tokens * extras_loss + lora_cast,
        math_attention=math_attention,
    )


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
    up = 4 if a < 4 else 0  # the fp32 copy of 16-bit logits (none when computing in fp32)
    if loss_chunk_size and loss_chunk_size > 0:
        chunk = min(loss_chunk_size, tokens)
        # Fix (measured): one chunk at a time: its 16-bit logits and their fp32 copy (turned into the gradient
        # in place), next to the previous chunk's 16-bit gradient, still referenced while the next chunk's
        # logits are computed (one chunk alone: its own 16-bit gradient, made from the fp32 one; in fp32 the
        # logits are the gradient); the 16-bit copy of an fp32 head; the final hidden states, and their
        # gradient, computed in forward and kept for backward (where it is scaled into a second one).
        per_logit = 2 * a + up if tokens > chunk else (a + up if a < 4 else a)
        fwd = chunk * shape.vocab * per_logit + lm_cast + 2 * tokens * shape.hidden * rb + chunk * shape.hidden * a
        return (
            fwd,
            2 * tokens * shape.hidden * rb,
            f"loss computed in chunks of {chunk} tokens (hfplug.long_context.loss)",
        )
    # forward: 16-bit logits, their fp32 upcast, the log-softmax output (kept for backward);
    # backward: two fp32 gradient-sized buffers next to the kept output.
    note = (
        f"plain loss materialises {batch_size} x {max_length} x {shape.vocab} logits "
        f"({tokens * shape.vocab * (a + up + 4) / GiB:.2f} GiB): --long_context chunked_loss "
        "(hfplug.long_context.loss) avoids it"
    )
    return tokens * shape.vocab * (a + up + 4) + lm_cast, tokens * shape.vocab * (4 + 4 + 4) + lm_cast, note


def group_by_layer(block_linears: list[Linear], num_layers: int) -> list[list[Linear]]:
    """Split the in-block linears by layer index (the first integer in their name)."""
    groups: dict[str, list[Linear]] = {}
    for lin in block_linears:
        match = re.search(r"\.(\d+)\.", "." + lin.name + ".")
        groups.setdefault(match.group(1) if match else "", []).append(lin)
    return list(groups.values())
