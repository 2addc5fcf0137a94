"""Technique ``efficient_attention``: SDPA that never holds batch x heads x seq^2 scores.

transformers' ``sdpa`` attention lets PyTorch pick a kernel, and on a T4 (sm_75) that
pick can be the math kernel, which materialises the whole score matrix: 32 heads at
32,768 tokens is 64 GiB in fp16. It happens for every Llama-3 model with no padding
mask, because transformers then passes ``enable_gqa=True`` (8 key/value heads for 32
query heads), which FlashAttention would take but a T4 has no FlashAttention, and the
memory-efficient kernel refuses grouped heads (transformers issue #48633).

So this registers one more attention implementation through transformers' own
``AttentionInterface`` and ``AttentionMaskInterface``, :data:`ATTN_IMPLEMENTATION`:

- key/value heads are expanded to the query heads first (``repeat_kv``, what
  transformers itself does when GQA is off), so the memory-efficient kernel accepts them;
- the call runs under ``torch.nn.attention.sdpa_kernel`` restricted to O(sequence)
  kernels: memory-efficient attention (xformers' cutlass kernel) on CUDA, plus
  FlashAttention and cuDNN on sm_80+; FlashAttention on CPU. No math fallback: inputs no
  such kernel takes are a clear error instead of a silent 64 GiB allocation.

Masks are built as for ``sdpa`` (none at all for an unpadded causal batch).
"""

from __future__ import annotations

import types

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTN_IMPLEMENTATION = "hfplug_efficient_sdpa"


def efficient_backends(device: torch.device) -> list[SDPBackend]:
    """The O(sequence) SDPA kernels to allow on ``device``, best first."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8:
            return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        return [SDPBackend.EFFICIENT_ATTENTION]  # Turing/Volta: no FlashAttention
    return [SDPBackend.FLASH_ATTENTION]  # PyTorch's CPU flash kernel (blocked, O(sequence))


def efficient_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa_attention_forward`` on expanded key/value heads, without the math kernel."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # The heads are expanded: a module without num_key_value_groups keeps
    # sdpa_attention_forward from expanding them again or asking for enable_gqa.
    plain = types.SimpleNamespace(is_causal=getattr(module, "is_causal", True))
    backends = efficient_backends(query.device)
    try:
        with sdpa_kernel(backends):
            return sdpa_attention_forward(plain, query, key, value, attention_mask, **kwargs)
    except RuntimeError as err:
        # CUDA says "No available kernel", the CPU dispatcher "No viable backend".
        if "No available kernel" not in str(err) and "No viable backend" not in str(err):
            raise
        raise RuntimeError(
            f"efficient_attention: none of {', '.join(b.name for b in backends)} accepts this attention call on "
            f"{query.device} ({query.dtype}, head_dim {query.shape[-1]}, "
            f"{'a mask' if attention_mask is not None else 'no mask'}), and the math kernel, which holds every "
            "score, is not allowed. Drop efficient_attention from --long_context to let PyTorch choose."
        ) from err


def register() -> str:
    """Make :data:`ATTN_IMPLEMENTATION` a valid ``attn_implementation`` (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, efficient_sdpa_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def check_supported(config) -> None:
    """Refuse a model whose attention does not go through transformers' attention interface."""
    from transformers import AutoModel

    model_type = getattr(config, "model_type", "?")
    try:
        model_class = AutoModel._model_mapping[type(config)]
    except KeyError:
        model_class = None
    if model_class is not None and not getattr(model_class, "_supports_sdpa", False):
        raise ValueError(
            f"efficient_attention needs a model with SDPA attention; {model_type} ({model_class.__name__}) "
            "has none. Drop efficient_attention from --long_context."
        )
