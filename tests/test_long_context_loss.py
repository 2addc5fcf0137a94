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


def _lora_llama(tmp_path, *, chunked: bool, vocab: int = 300):
    """The same 4-bit + LoRA tiny Llama, with or without install_chunked_loss."""
    from hfplug.long_context.loss import install_chunked_loss

    if not (tmp_path / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_llama_config(vocab, pad_token_id=0)).save_pretrained(tmp_path)
    args = ModelArguments(quant="4bit", lora=True, lora_r=4, lora_dropout=0.0, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=get_quantization_config(args, device_type="cpu"), dtype=torch.float32
    )
    if chunked:
        assert install_chunked_loss(model, chunk_size=5) == "hfplug"  # no CUDA here: never Liger
    torch.manual_seed(1)  # the same LoRA initialisation for both
    model = prepare_for_training(model, args, activation_checkpointing=True)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so that every LoRA weight gets a gradient
            torch.nn.init.normal_(param, std=0.05)
    return model


def test_installed_chunked_loss_gives_the_model_loss_and_gradients_without_logits(tmp_path, on_cpu):
    torch.manual_seed(2)
    ids = torch.randint(3, 300, (2, 16))
    labels = ids.clone()
    labels[1, :5] = -100
    results = []
    for chunked in (False, True):
        model = _lora_llama(tmp_path, chunked=chunked)
        model.train()
        # what the Trainer passes: the PEFT model, labels and the accumulated token count
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40))
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():  # evaluation: no gradients, mean over the counted tokens
            eval_loss = model(input_ids=ids, labels=labels).loss
        results.append((out, torch.autograd.grad(out.loss, params), eval_loss))
    (plain, plain_grads, plain_eval), (chunked, chunked_grads, chunked_eval) = results
    assert plain.logits is not None and chunked.logits is None  # no batch x seq x vocab tensor
    torch.testing.assert_close(chunked.loss, plain.loss)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(chunked_eval, plain_eval)
    with torch.no_grad():  # generation (no labels) still gets the logits
        assert model(input_ids=ids).logits.shape == (2, 16, 300)


def test_chunked_loss_refuses_a_model_that_rescales_its_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from hfplug.long_context.loss import install_chunked_loss

    config = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"gemma2.*final_logit_softcapping.*--long_context"):
        install_chunked_loss(Gemma2ForCausalLM(config))
