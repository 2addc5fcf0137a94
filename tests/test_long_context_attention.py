"""hfplug.long_context.attention: the same attention as transformers' sdpa, never through the math kernel."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend
from transformers import LlamaForCausalLM

from hfplug.long_context import attention
from hfplug.long_context.apply import load_kwargs
from hfplug.testing.tiny import tiny_llama_config


def _loss_and_grads(model, ids, mask):
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padded", [False, True])
def test_matches_sdpa_with_grouped_heads_and_padding(padded):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64, num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(2, 64, (2, 24))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0
    plain = _loss_and_grads(model, ids, mask if padded else None)
    model.set_attn_implementation(load_kwargs(("efficient_attention",))["attn_implementation"])
    assert model.config._attn_implementation == attention.ATTN_IMPLEMENTATION
    efficient = _loss_and_grads(model, ids, mask if padded else None)
    torch.testing.assert_close(efficient[0], plain[0])
    assert efficient[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(efficient[1][name], plain[1][name], atol=1e-6, rtol=1e-4)


def test_no_kernel_is_a_clear_error_not_the_math_fallback(monkeypatch):
    # Pretend the only allowed kernel is one the CPU lacks: SDPA must not fall back to math.
    monkeypatch.setattr(attention, "efficient_backends", lambda device: [SDPBackend.EFFICIENT_ATTENTION])
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64))
    model.set_attn_implementation(attention.register())
    with pytest.raises(RuntimeError, match=r"efficient_attention: none of EFFICIENT_ATTENTION.*math kernel"):
        model(input_ids=torch.randint(2, 64, (1, 8)))


def test_a_t4_gets_only_the_memory_efficient_kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert attention.efficient_backends(torch.device("cuda")) == [SDPBackend.EFFICIENT_ATTENTION]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert SDPBackend.FLASH_ATTENTION in attention.efficient_backends(torch.device("cuda"))
    assert SDPBackend.MATH not in attention.efficient_backends(torch.device("cuda"))
