"""Causal-LM loss without materialising batch x seq x vocab logits.

The plain loss of a causal LM projects every position onto the vocabulary, upcasts the
logits to fp32 and keeps a log-softmax of the same size for backward: for Llama-3.1-8B
(vocab 128,256) and 8,192 tokens that is ~10 GB at the loss alone, more than the model.
Here the final hidden states are projected a chunk of tokens at a time; each chunk's
softmax becomes its gradient on the spot (softmax - one_hot) and is turned into the
gradient of the hidden states (and of the head weight, if it trains) before the next
chunk is computed. Peak extra memory: one chunk of logits, a 16-bit copy of the head
weight, and the gradient of the hidden states.

    loss = causal_lm_loss(model, input_ids=ids, attention_mask=mask, labels=labels, chunk_size=1024)
    loss.backward()

It gives the same loss and gradients as ``transformers``' ``ForCausalLMLoss`` (the
labels are shifted by one inside; ``-100`` is ignored; ``num_items_in_batch``
normalises by a token count across gradient-accumulation steps, as the Trainer does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hfplug.data.tasks import IGNORE_INDEX


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would use here, else the hidden states' own dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over tokens of ``hidden @ weight.T (+ bias)``, chunk by chunk.

    Gradients are computed in forward (one pass over the chunks) and only scaled in
    backward, so no logits are kept between the two passes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, compute_dtype):
        # hidden: (N, H); targets: (N,) already shifted; returns the summed loss (fp32).
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        # fp32 softmax for 16-bit compute (as ForCausalLMLoss upcasts); float64 stays float64.
        acc = torch.promote_types(compute_dtype, torch.float32)
        w = weight.to(compute_dtype)  # one 16-bit copy for all chunks (the head may be stored in fp32)
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs_bias else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(compute_dtype)
                y = targets[start : start + chunk_size]
                logits = (h @ w.t()).to(acc)
                if bias is not None:
                    logits += bias.to(acc)
                valid = y != ignore_index
                safe_y = torch.where(valid, y, torch.zeros_like(y))
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_y[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum()
                if grad_hidden is None and grad_weight is None and grad_bias is None:
                    continue
                # d(sum CE)/d(logits) = softmax - one_hot, zero on ignored tokens. Computed in
                # place so that one chunk-sized fp32 buffer holds logits, then gradient.
                grad = logits.sub_(lse[:, None]).exp_()
                del logits
                grad[torch.arange(y.shape[0], device=y.device), safe_y] -= 1.0
                grad *= valid[:, None]
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
                grad16 = grad.to(compute_dtype)
                del grad
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = (grad16 @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad16.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output
        out_hidden = grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None
        out_weight = (grad_weight * scale.to(grad_weight.dtype)).to(weight_dtype) if grad_weight is not None else None
        out_bias = (grad_bias * scale.to(grad_bias.dtype)).to(bias_dtype) if grad_bias is not None else None
        return out_hidden, out_weight, out_bias, None, None, None, None


def chunked_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy of ``hidden_states @ weight.T`` against ``labels`` shifted by one.

    ``hidden_states``: (batch, seq, hidden) final hidden states (after the last norm);
    ``weight``: (vocab, hidden) output head; ``labels``: (batch, seq), ``ignore_index``
    where no loss is wanted. Mean over counted tokens, or sum / ``num_items_in_batch``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    if hidden_states.shape[:2] != labels.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} do not match.")
    targets = _shifted_targets(labels, ignore_index, hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    total = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, chunk_size, ignore_index, _compute_dtype(hidden)
    )
    return _mean(total, targets, ignore_index, num_items_in_batch)


def _shifted_targets(labels: torch.Tensor, ignore_index: int, device) -> torch.Tensor:
    """Position t predicts token t+1; the last position has no target (as in ForCausalLMLoss)."""
    return F.pad(labels, (0, 1), value=ignore_index)[:, 1:].reshape(-1).to(device)


def _mean(total: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_items_in_batch) -> torch.Tensor:
    """The summed loss over the counted targets, or over ``num_items_in_batch`` (the Trainer's count)."""
    if num_items_in_batch is None:
        count = (targets != ignore_index).sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=total.device)
    return total / count.clamp(min=1).to(total.dtype)


def causal_lm_loss(
    model: nn.Module,
    *,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Run a ``*ForCausalLM`` (or a PEFT model around one) to its final hidden states and
    return the chunked loss; the model's own logits are never computed.

    The output head must be a plain linear layer (``nn.Linear``); a LoRA-wrapped or
    quantized head is not supported here (use the model's own loss for those).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(
            f"causal_lm_loss needs a plain nn.Linear output head; {type(base).__name__} has {type(head).__name__}."
        )
    return _decoder_loss(
        decoder,
        head,
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        chunk_size=chunk_size,
        num_items_in_batch=num_items_in_batch,
        **model_kwargs,
    )


def _decoder_loss(
    decoder, head, *, input_ids, attention_mask, labels, chunk_size, num_items_in_batch, backend="hfplug", **kwargs
):
    """The loss of ``head`` over ``decoder``'s final hidden states, its logits never materialised."""
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return linear_cross_entropy(
        hidden,
        head.weight,
        labels,
        bias=head.bias,
        chunk_size=chunk_size,
        num_items_in_batch=num_items_in_batch,
        backend=backend,
    )


# Config attributes with which a causal LM's forward changes its logits after the head:
# the loss here would then differ from the model's own, so such models are refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def liger_available(device: torch.device) -> bool:
    """Liger-Kernel's fused linear cross-entropy runs (Triton, CUDA) and is installed."""
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "hfplug",
) -> torch.Tensor:
    """:func:`chunked_cross_entropy`, or Liger's fused kernel with ``backend="liger"`` (same contract)."""
    if backend != "liger":
        return chunked_cross_entropy(
            hidden_states, weight, labels, bias=bias, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch
        )
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    targets = _shifted_targets(labels, IGNORE_INDEX, hidden_states.device)
    dtype = _compute_dtype(hidden_states)  # Liger wants input and weight in one (16-bit) dtype
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1]).to(dtype)
    total = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
        weight.to(dtype), hidden, targets, None if bias is None else bias.to(dtype)
    )
    return _mean(total.float(), targets, IGNORE_INDEX, num_items_in_batch)


def install_chunked_loss(model: nn.Module, *, chunk_size: int = 1024, backend: str = "auto") -> str:
    """Make a ``*ForCausalLM``'s own ``forward`` compute its loss without logits, when given labels.

    The instance's ``forward`` is replaced, so everything that calls the model — PEFT's
    wrapper, DDP, the Trainer's training and evaluation loss — gets the loss from
    :func:`linear_cross_entropy` and ``logits=None``; without labels (generation) the
    original forward runs. ``backend``: ``auto`` = Liger on CUDA when installed, else
    hfplug's chunked loss. Returns the backend used. Pass the causal LM itself (for a
    PEFT model, ``model.get_base_model()``).
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    config = model.config
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1.0)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if transforms or type(head) is not nn.Linear or not hasattr(model, "get_decoder"):
        why = f"it scales its logits ({', '.join(transforms)})" if transforms else "it has no plain linear LM head"
        raise ValueError(
            f"chunked_loss supports causal LMs whose logits are hidden_states @ lm_head; "
            f"{type(model).__name__} ({config.model_type}) is not one: {why}. Drop chunked_loss from --long_context."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    device = head.weight.device
    chosen = ("liger" if liger_available(device) else "hfplug") if backend == "auto" else backend
    original = model.forward

    def forward(input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        for unused in ("logits_to_keep", "use_cache", "return_dict"):
            kwargs.pop(unused, None)
        loss = _decoder_loss(
            model.get_decoder(),
            head,
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            chunk_size=chunk_size,
            num_items_in_batch=num_items_in_batch,
            backend=chosen,
            **kwargs,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = forward
    model.chunked_loss_backend = chosen
    return chosen
