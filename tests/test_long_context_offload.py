"""hfplug.long_context.offload: same loss and gradients as plain checkpointing, the host budget, prefetch, errors.

The models run on the GPU when there is one (side-stream copies to pinned memory), else on the CPU, where the "host
copy" is a clone and the same hooks run. Whether a layer input left the device is seen by its storage being freed
after the forward: the graph holds only the copy.
"""

import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import BertModel, LlamaForCausalLM

from hfplug.long_context.offload import enable_offloaded_checkpointing, host_nbytes
from hfplug.testing.tiny import tiny_bert_config, tiny_llama_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS, BATCH, SEQ, VOCAB = 3, 2, 16, 128
TOKENS = BATCH * SEQ
LAYER_BYTES = host_nbytes(TOKENS * 64 * 4)  # one float32 layer input of the 64-wide tiny Llama


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: threads only contend (the test machine's cores are shared), 4x slower with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(*, lora=True, checkpointing=True, device=DEVICE):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, num_hidden_layers=LAYERS)).to(device)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if lora:  # random B (init_lora_weights=False), so every LoRA gradient is non-zero
        targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    return model.train()


def decoder_layers(model):
    return model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers


def step(model, *, seq=SEQ, device=DEVICE):
    """One forward + backward; returns loss, input grad, trainable grads, and which layer inputs outlived the forward."""
    torch.manual_seed(1)
    embeds = torch.randn(BATCH, seq, 64, device=device, requires_grad=True)
    labels = torch.randint(0, VOCAB, (BATCH, seq), device=device)
    inputs = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, args: inputs.append(StorageWeakRef(args[0].untyped_storage())))
        for layer in decoder_layers(model)
    ]
    # A copy goes in, so the test holds no reference to layer 0's input; the gradient still reaches `embeds`.
    loss = model(inputs_embeds=embeds * 1.0, labels=labels).loss
    alive = [not ref.expired() for ref in inputs]
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), embeds.grad, grads, alive


def assert_same(result, reference, rtol=1e-5, atol=1e-6):
    loss, embeds_grad, grads, _ = result
    ref_loss, ref_embeds_grad, ref_grads, _ = reference
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(embeds_grad, ref_embeds_grad, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4 * LAYERS * 2  # lora_A and lora_B of 4 targets
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference():
    return step(make_model())


@pytest.mark.parametrize("layers", [1, LAYERS])
def test_same_loss_and_gradients_as_plain_checkpointing(reference, layers):
    model = make_model()
    plan = enable_offloaded_checkpointing(model, max_host_bytes=layers * LAYER_BYTES, tokens_per_step=TOKENS)
    result = step(model)
    assert_same(result, reference)
    assert plan.layers_offloaded == layers and plan.stats.tensors_offloaded == layers
    assert reference[3] == [True] * LAYERS  # plain checkpointing keeps every layer input
    assert result[3] == [False] * layers + [True] * (LAYERS - layers)  # offloaded inputs are gone from the "device"


@pytest.mark.parametrize(("budget", "offloaded"), [(0, 0), (LAYER_BYTES - 1, 0), (LAYER_BYTES, 1), (10**12, LAYERS)])
def test_the_host_budget_decides_how_many_layers_offload(budget, offloaded):
    model = make_model(lora=False)
    plan = enable_offloaded_checkpointing(model, max_host_bytes=budget, tokens_per_step=TOKENS)
    assert (plan.layers_offloaded, plan.layers_total) == (offloaded, LAYERS)
    assert plan.bytes_per_token_per_layer == 64 * 4 and plan.host_bytes_per_layer == LAYER_BYTES
    *_, alive = step(model)
    assert alive == [False] * offloaded + [True] * (LAYERS - offloaded)
    assert plan.stats.peak_host_bytes == offloaded * LAYER_BYTES <= budget


@pytest.mark.parametrize(("layers", "prefetched", "on_demand"), [(2, 2, 0), (LAYERS, LAYERS - 1, 1)])
def test_backward_prefetches_and_frees_host_memory(layers, prefetched, on_demand):
    model = make_model(lora=False)
    plan = enable_offloaded_checkpointing(model, max_host_bytes=layers * LAYER_BYTES, tokens_per_step=TOKENS)
    step(model)
    # The layer after the offloaded ones prefetches the last of them; only with all layers offloaded does the first
    # one backward reaches (the last layer) wait for its own copy.
    assert (plan.stats.prefetched, plan.stats.fetched_on_demand) == (prefetched, on_demand)
    assert plan.stats.host_bytes == 0  # the graph is gone, so are the host copies
    step(model)
    assert plan.stats.tensors_offloaded == 2 * layers and plan.stats.peak_host_bytes == layers * LAYER_BYTES


def test_more_tokens_than_planned_stay_on_the_device_within_budget(caplog):
    model = make_model()
    plan = enable_offloaded_checkpointing(model, max_host_bytes=2 * LAYER_BYTES, tokens_per_step=TOKENS)
    assert plan.layers_offloaded == 2
    reference = step(make_model(), seq=2 * SEQ)
    result = step(model, seq=2 * SEQ)  # each input is now 2 planned layers' worth: only the first one fits
    assert_same(result, reference)
    assert result[3] == [False, True, True]
    assert (plan.stats.tensors_offloaded, plan.stats.kept_over_budget) == (1, 1)
    assert plan.stats.peak_host_bytes <= plan.max_host_bytes
    assert "does not fit max_host_bytes" in caplog.text


def test_enabling_again_replans_from_the_original_checkpoint():
    model = make_model(lora=False)
    enable_offloaded_checkpointing(model, max_host_bytes=10**12, tokens_per_step=TOKENS)
    plan = enable_offloaded_checkpointing(model, max_host_bytes=0, tokens_per_step=TOKENS)
    assert plan.layers_offloaded == 0
    funcs = [layer._gradient_checkpointing_func for layer in decoder_layers(model)]
    assert all(isinstance(f, functools.partial) and f.func is torch.utils.checkpoint.checkpoint for f in funcs)


def test_clear_errors():
    with pytest.raises(ValueError, match="activation checkpointing is off in model type 'llama'"):
        enable_offloaded_checkpointing(make_model(checkpointing=False), max_host_bytes=1, tokens_per_step=1)
    with pytest.raises(ValueError, match="Sequential.*no transformers GradientCheckpointingLayer"):
        enable_offloaded_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), max_host_bytes=1, tokens_per_step=1)
    bert = BertModel(tiny_bert_config(100))  # BERT's layers checkpoint too: there, the error is that it is off
    with pytest.raises(ValueError, match="'bert'.*Enable it first"):
        enable_offloaded_checkpointing(bert, max_host_bytes=1, tokens_per_step=1)
    own_offload = make_model(lora=False, checkpointing=False)
    own_offload.activation_checkpointing_enable({"use_reentrant": False}, offload=True)
    with pytest.raises(ValueError, match=r"use_reentrant=False.*without offload=True"):
        enable_offloaded_checkpointing(own_offload, max_host_bytes=1, tokens_per_step=1)
    with pytest.raises(ValueError, match="max_host_bytes must be an int >= 0"):
        enable_offloaded_checkpointing(make_model(lora=False), max_host_bytes=-1, tokens_per_step=1)
    with pytest.raises(ValueError, match="tokens_per_step must be an int >= 1"):
        enable_offloaded_checkpointing(make_model(lora=False), max_host_bytes=1, tokens_per_step=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_layer_inputs_leave_device_memory():
    def allocated_after_forward(model):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        labels = torch.randint(0, VOCAB, (BATCH, 256), device="cuda")
        loss = model(inputs_embeds=torch.randn(BATCH, 256, 64, device="cuda", requires_grad=True), labels=labels).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # a malloc processes finished side-stream events: frees what copies held
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        return held

    plain = allocated_after_forward(make_model(device="cuda"))
    model = make_model(device="cuda")
    plan = enable_offloaded_checkpointing(model, max_host_bytes=10**12, tokens_per_step=BATCH * 256)
    offloaded = allocated_after_forward(model)
    assert plain - offloaded >= (LAYERS - 1) * BATCH * 256 * 64 * 4  # layer 0's input is the caller's embeds
    assert plan.host_bytes_per_layer == 1 << (BATCH * 256 * 64 * 4 - 1).bit_length()  # pinned: a power of two
