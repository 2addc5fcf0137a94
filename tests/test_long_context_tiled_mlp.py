"""hfplug.long_context.tiled_mlp: same loss and gradients as the untiled MLP, tiles really used, errors.

Each test computes the untiled reference first on the same model, then patches it: the weights (4-bit ones
included) are the very same.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertModel, BitsAndBytesConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from hfplug.long_context.tiled_mlp import enable_tiled_mlp
from hfplug.testing.tiny import tiny_bert_config, tiny_llama_config

LAYERS, BATCH, SEQ, VOCAB, HIDDEN, INTERMEDIATE = 2, 2, 16, 128, 64, 128
TILE_TOKENS = 8  # 4 positions a tile at batch 2: 4 tiles of the 16-long sequence
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: threads only contend (the test machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_llama(*, checkpointing=False, model=None, dropout=0.0):
    torch.manual_seed(0)
    model = model or LlamaForCausalLM(tiny_llama_config(VOCAB, num_hidden_layers=LAYERS))
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    # Random B (init_lora_weights=False), so every LoRA gradient is non-zero.
    config = LoraConfig(r=4, target_modules=TARGETS, lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(model, config).train()


def down_proj_inputs(model):
    """Record the positions (dim -2) of every input of every down_proj: one per tile when tiled."""
    seen = []
    for layer in model.get_base_model().model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2:]))
    return seen


def step(model, *, autocast=False):
    torch.manual_seed(1)
    embeds = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(inputs_embeds=embeds, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), embeds.grad, grads


def assert_same(result, reference, *, rtol=1e-5, atol=1e-6):
    (loss, embeds_grad, grads), (ref_loss, ref_embeds_grad, ref_grads) = result, reference
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(embeds_grad, ref_embeds_grad, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * len(TARGETS) * LAYERS
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_same_loss_and_gradients_as_untiled_with_lora(checkpointing):
    model = lora_llama(checkpointing=checkpointing)
    reference = step(model)
    assert enable_tiled_mlp(model, tile_tokens=TILE_TOKENS) == LAYERS
    seen = down_proj_inputs(model)
    assert_same(step(model), reference)
    # Every down_proj call saw one tile: forward, the backward's recompute (and the checkpoint's recompute).
    assert set(seen) == {torch.Size([4, INTERMEDIATE])}
    assert len(seen) == LAYERS * 4 * (3 if checkpointing else 2)


def test_with_offloaded_checkpointing_too():
    from hfplug.long_context.offload import enable_offloaded_checkpointing

    model = lora_llama(checkpointing=True)
    reference = step(model)
    enable_tiled_mlp(model, tile_tokens=TILE_TOKENS)
    plan = enable_offloaded_checkpointing(model, max_host_bytes=10**9, tokens_per_step=BATCH * SEQ)
    seen = down_proj_inputs(model)
    assert_same(step(model), reference)
    assert plan.stats.tensors_offloaded == LAYERS and set(seen) == {torch.Size([4, INTERMEDIATE])}


def test_4bit_base_with_lora_under_checkpointing(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(VOCAB, num_hidden_layers=LAYERS)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    assert type(base.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    model = lora_llama(checkpointing=True, model=base)
    reference = step(model)
    enable_tiled_mlp(model, tile_tokens=TILE_TOKENS)
    seen = down_proj_inputs(model)
    assert_same(step(model), reference)
    assert set(seen) == {torch.Size([4, INTERMEDIATE])}


def test_autocast_is_restored_in_the_backward_recompute():
    model = lora_llama(checkpointing=True)
    reference = step(model, autocast=True)
    enable_tiled_mlp(model, tile_tokens=TILE_TOKENS)
    states = []
    for layer in model.get_base_model().model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _, args: states.append((torch.is_autocast_enabled("cpu"), args[0].dtype))
        )
    result = step(model, autocast=True)
    assert set(states) == {(True, torch.bfloat16)} and len(states) == LAYERS * 4 * 3
    assert_same(result, reference, rtol=2e-2, atol=2e-3)  # bf16 matmuls over tiles round differently


class DropoutMLP(nn.Module):
    """Any module mapping (batch, seq, hidden) to the same shape; random, like LoRA dropout."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return nn.functional.dropout(x @ self.weight, p=0.5, training=self.training)


class Block(GradientCheckpointingLayer):
    def __init__(self):
        super().__init__()
        self.mlp = DropoutMLP()

    def forward(self, x):
        return self.mlp(x)


def test_backward_replays_the_forward_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(Block()).train()
    assert enable_tiled_mlp(model, tile_tokens=6) == 1  # 3 positions a tile at batch 2
    x = torch.randn(2, 10, 8, requires_grad=True)
    weight_out = torch.randn(2, 10, 8)
    y = model(x)
    (y * weight_out).sum().backward()
    # The gradients that the forward's own masks give (a kept element was scaled by 2, a dropped one is 0).
    upstream = (y != 0) * 2.0 * weight_out
    torch.testing.assert_close(x.grad, upstream @ model[0].mlp.weight.detach().T)
    torch.testing.assert_close(model[0].mlp.weight.grad, torch.einsum("bsi,bso->io", x.detach(), upstream))


def test_lora_dropout_under_checkpointing_gives_the_uncheckpointed_gradients():
    # Three runs of each tile (forward, checkpoint recompute, tiled backward) must draw the same dropout masks.
    results = []
    for checkpointing in (False, True):
        model = lora_llama(checkpointing=checkpointing, dropout=0.3)
        enable_tiled_mlp(model, tile_tokens=TILE_TOKENS)
        results.append(step(model))
    assert_same(results[1], results[0])


def test_untiled_in_eval_without_grad_and_when_short():
    model = lora_llama()
    enable_tiled_mlp(model, tile_tokens=TILE_TOKENS)
    seen = down_proj_inputs(model)
    embeds = torch.randn(BATCH, SEQ, HIDDEN)
    with torch.no_grad():
        model(inputs_embeds=embeds)
    model.eval()
    model(inputs_embeds=embeds)
    model.train()
    enable_tiled_mlp(model, tile_tokens=BATCH * SEQ)  # again: one tile covers the whole sequence
    model(inputs_embeds=embeds).logits.sum().backward()
    assert set(seen) == {torch.Size([SEQ, INTERMEDIATE])} and len(seen) == 3 * LAYERS


def test_clear_errors():
    with pytest.raises(ValueError, match=r"model type 'bert' \(BertModel\) has no decoder-layer MLP"):
        enable_tiled_mlp(BertModel(tiny_bert_config(100)))
    with pytest.raises(ValueError, match="tile_tokens must be an int >= 1"):
        enable_tiled_mlp(lora_llama(), tile_tokens=0)

    class TupleMLP(nn.Module):
        def forward(self, x):
            return x, None

    block = Block()
    block.mlp = TupleMLP()
    enable_tiled_mlp(nn.Sequential(block), tile_tokens=2)
    with pytest.raises(ValueError, match="'Sequential' returned tuple.*only MLPs returning one tensor"):
        block(torch.randn(1, 4, 8, requires_grad=True))
