"""hfplug.long_context.loss: the same loss and gradients as transformers' causal-LM loss, chunk by chunk."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfplug import quantization
from hfplug.long_context.loss import causal_lm_loss, chunked_cross_entropy
from hfplug.model_args import ModelArguments
from hfplug.quantization import DeviceCapability, get_quantization_config, prepare_for_training
from hfplug.testing.tiny import tiny_llama_config


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(
        quantization, "device_capability", lambda device_type=None: DeviceCapability("cpu", "cpu", True)
    )


def test_chunked_loss_matches_the_plain_loss_and_gradients():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100
    labels[2, -3:] = -100
    for num_items in (None, 17):
        ref = ForCausalLMLoss(hidden @ weight.t() + bias, labels, 50, num_items_in_batch=num_items)
        ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
        for chunk in (1, 4, 7, 1000):
            loss = chunked_cross_entropy(
                hidden, weight, labels, bias=bias, chunk_size=chunk, num_items_in_batch=num_items
            )
            grads = torch.autograd.grad(loss, (hidden, weight, bias))
            torch.testing.assert_close(loss, ref)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want)


def test_chunked_loss_through_a_lora_model_matches_the_model_loss(tmp_path, on_cpu):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(300, pad_token_id=0)).save_pretrained(tmp_path)
    args = ModelArguments(quant="4bit", lora=True, lora_r=4, lora_dropout=0.0, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=get_quantization_config(args, device_type="cpu"), dtype=torch.float32
    )
    model = prepare_for_training(model, args, activation_checkpointing=True)
    model.train()
    ids = torch.randint(3, 300, (2, 16))
    labels = ids.clone()
    labels[1, :5] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(input_ids=ids, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, params)
    loss = causal_lm_loss(model, input_ids=ids, labels=labels, chunk_size=5)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
