"""hfplug.memory (the planner's arithmetic, --long_context techniques and host memory), hfplug.memory_search (what
fits), hfplug.param_counts, and benchmarks/t4_fit.py's model builder and memory_proxy.py's tracker, on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
)

from hfplug import memory, memory_search
from hfplug.fit import GPU_MEMORY
from hfplug.host_memory import COLAB_HOST_BUDGET, HOST_BASELINE, pinned_bytes, plan_offload
from hfplug.loading import load_config
from hfplug.long_context import TECHNIQUES
from hfplug.long_context.loss import causal_lm_loss
from hfplug.model_args import ModelArguments
from hfplug.param_counts import CLASSIFICATION_TASKS, DEFAULT_NUM_LABELS, parameter_counts
from hfplug.quantization import DeviceCapability, get_quantization_config, prepare_for_training
from hfplug.testing.llama31 import LLAMA31_8B

GiB = 1024**3
REPO = Path(__file__).resolve().parents[1]


def tiny_llama(**overrides) -> LlamaConfig:
    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=300,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_bert() -> BertConfig:
    return BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=300,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama checkpoint (classification head, 2 labels) on disk."""
    path = tmp_path_factory.mktemp("fit_llama")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(tiny_llama(num_labels=2)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama31_8b")
    (path / "config.json").write_text(json.dumps(LLAMA31_8B))
    return path


@pytest.fixture(scope="module")
def llama8b(llama8b_dir):
    return load_config(str(llama8b_dir))


@pytest.fixture
def on_cpu(monkeypatch):
    from hfplug import quantization

    monkeypatch.setattr(
        quantization, "device_capability", lambda device_type=None: DeviceCapability("cpu", "cpu", True)
    )


# --------------------------------------------------------------------------- counting


@pytest.mark.parametrize(
    "config_fn, task",
    [(tiny_llama, "decision"), (tiny_llama, "causal_lm"), (tiny_bert, "decision"), (tiny_bert, "ipc")],
)
def test_parameter_counts_match_the_instantiated_model(config_fn, task):
    config = config_fn()
    counts = parameter_counts(config, task=task)
    cls = AutoModelForSequenceClassification if task in CLASSIFICATION_TASKS else AutoModelForCausalLM
    if task in CLASSIFICATION_TASKS:
        config.num_labels = DEFAULT_NUM_LABELS[task]
    model = cls.from_config(config)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    heads = ("lm_head", "score", "classifier")
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear and not n.endswith(heads)
    )
    assert counts.quantizable_params == linear


def test_quantized_sizes_match_bitsandbytes_exactly(llama_dir, on_cpu):
    """Packed weights + quantization constants of a really loaded model, byte for byte."""
    config = load_config(str(llama_dir))
    for quant in ("4bit", "8bit"):
        args = ModelArguments(quant=quant, lora=True, dtype="float32")
        model = AutoModelForSequenceClassification.from_pretrained(
            llama_dir, quantization_config=get_quantization_config(args, device_type="cpu"), dtype=torch.float32
        )
        actual = 0
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if type(weight).__name__ == "Params4bit":
                actual += weight.numel() * weight.element_size()
                actual += sum(
                    t.numel() * t.element_size() for t in weight.quant_state.as_dict().values() if torch.is_tensor(t)
                )
            elif type(weight).__name__ == "Int8Params":
                actual += weight.numel() + module.weight.SCB.numel() * 4
        est = memory.estimate_memory(config, quant=quant, lora_r=4, task="decision", max_length=8, batch_size=1)
        assert est.quantized_weights == actual, quant


def test_trainable_counts_match_peft(llama_dir, on_cpu):
    config = load_config(str(llama_dir))
    args = ModelArguments(quant="4bit", lora=True, lora_r=4, dtype="float32")
    model = AutoModelForSequenceClassification.from_pretrained(
        llama_dir, quantization_config=get_quantization_config(args, device_type="cpu"), dtype=torch.float32
    )
    model = prepare_for_training(model, args, activation_checkpointing=False)
    est = memory.estimate_memory(
        config, quant="4bit", lora_r=4, task="decision", max_length=8, batch_size=1, num_labels=2
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.trainable_count == trainable
    assert est.head_count == 64 * 2 and est.lora_count == trainable - 64 * 2


# --------------------------------------------------------------------------- Llama-3.1-8B facts


def test_llama31_8b_weights_and_lora_match_the_published_numbers(llama8b):
    counts = parameter_counts(llama8b, task="causal_lm")
    assert round(counts.total_params / 1e9, 2) == 8.03
    assert round(counts.quantizable_params / 1e9, 2) == 6.98
    est = memory.estimate_memory(llama8b, quant="4bit", lora_r=16, task="causal_lm", max_length=2048, batch_size=1)
    assert est.lora_count == 41_943_040
    assert abs(est.weights_at_load / 1e9 - 5.70) < 0.02  # NF4 + double quant, 16-bit embeddings/head
    no_dq = sum(
        memory.quantized_weight_bytes(lin.in_features * lin.out_features, lin.out_features, "4bit", double_quant=False)
        for lin in counts.linears
        if lin.quantized
    )
    assert abs((no_dq + counts.other_params * 2) / 1e9 - 6.03) < 0.02
    # prepare_model_for_kbit_training keeps embeddings and lm_head in fp32 for training.
    assert est.other_weights == counts.other_params * 4


def test_llama31_8b_qlora_decision_fits_a_t4_and_full_logits_are_the_cost(llama8b):
    t4 = GPU_MEMORY["t4"]
    est = memory.estimate_memory(llama8b, quant="4bit", lora_r=16, task="decision", max_length=512, batch_size=8)
    assert est.total < t4
    assert (
        memory.estimate_memory(llama8b, quant="none", lora_r=16, task="decision", max_length=512, batch_size=8).total
        > t4
    )  # 16 GB of bf16 weights never fit
    plain = memory.estimate_memory(llama8b, quant="4bit", lora_r=16, task="causal_lm", max_length=8192, batch_size=1)
    chunked = memory.estimate_memory(
        llama8b, quant="4bit", lora_r=16, task="causal_lm", max_length=8192, batch_size=1, long_context="chunked_loss"
    )
    assert plain.logits_peak > 8 * GiB > chunked.logits_peak
    # (ported from loss_chunk_size=1024, offload_activations=True: the planner now also models the math-kernel
    # attention a T4 falls back to without efficient_attention, 24 GiB of scores at 8k tokens)
    assert (
        memory_search.max_seq_len(
            llama8b,
            gpu_mem=t4,
            quant="4bit",
            lora_r=16,
            task="causal_lm",
            batch_size=1,
            long_context=("efficient_attention", "chunked_loss", "offload_activations"),
        )
        >= 8192
    )


# --------------------------------------------------------------------------- arithmetic


def test_activation_arithmetic_scales_with_tokens_and_checkpointing():
    config = tiny_llama(
        hidden_size=256, intermediate_size=896, num_attention_heads=8, vocab_size=1000, num_hidden_layers=4
    )
    # (ported from loss_chunk_size=128 and offload_activations=True; linear in tokens up to the per-step
    # constant of autocast's 16-bit LoRA weight copies, with O(seq) attention)
    lc = ("efficient_attention", "chunked_loss")
    kw = dict(quant="4bit", lora_r=8, task="causal_lm", batch_size=2, loss_chunk_size=128, long_context=lc)
    one, two, four = (memory.estimate_memory(config, max_length=n, **kw) for n in (256, 512, 1024))
    for field in ("activations_checkpointing", "activations_no_checkpointing"):
        assert getattr(four, field) - getattr(two, field) == 2 * (getattr(two, field) - getattr(one, field))
    assert one.activations_checkpointing < one.activations_no_checkpointing
    off = memory.estimate_memory(config, max_length=256, **{**kw, "long_context": lc + ("offload_activations",)})
    assert off.activations_checkpointing < one.activations_checkpointing
    # the static parts do not depend on the batch
    assert (one.quantized_weights, one.optimizer_states) == (two.quantized_weights, two.optimizer_states)
    assert one.total == sum(getattr(one, p) for p in memory.MemoryEstimate._PARTS)


def test_optimizer_state_sizes():
    sizes = [4096, 100]  # one tensor large enough for 8-bit states, one kept in fp32
    assert memory.optimizer_state_bytes(sizes, "adamw_torch") == 8 * 4196
    assert memory.optimizer_state_bytes(sizes, "paged_adamw_8bit") == 2 * (4096 + 16 * 4) + 8 * 100
    assert memory.optimizer_state_bytes(sizes, "sgd") == 0


def test_max_batch_and_length_are_the_largest_that_fit(llama8b):
    kw = dict(quant="4bit", lora_r=16, task="decision", activation_checkpointing=True)
    gpu = GPU_MEMORY["t4"]
    best = memory_search.max_batch_size(llama8b, gpu_mem=gpu, max_length=512, **kw)
    assert best >= 8
    assert memory.estimate_memory(llama8b, max_length=512, batch_size=best, **kw).total <= gpu
    assert memory.estimate_memory(llama8b, max_length=512, batch_size=best + 1, **kw).total > gpu
    longest = memory_search.max_seq_len(llama8b, gpu_mem=gpu, batch_size=8, **kw)
    assert memory.estimate_memory(llama8b, max_length=longest, batch_size=8, **kw).total <= gpu
    assert memory.estimate_memory(llama8b, max_length=longest + 1, batch_size=8, **kw).total > gpu
    assert memory_search.max_batch_size(llama8b, gpu_mem=1 * GiB, max_length=512, **kw) == 0
    assert memory_search.suggest_settings(llama8b, gpu_mem=gpu, max_length=512, batch_size=8, **kw) == []
    tips = memory_search.suggest_settings(llama8b, gpu_mem=gpu, max_length=512, batch_size=64, **kw)
    assert any("--gradient_accumulation_steps" in t for t in tips)


def test_bad_planner_inputs():
    config = tiny_llama()
    with pytest.raises(ValueError, match="cannot be fully fine-tuned"):
        memory.estimate_memory(config, quant="4bit", lora_r=0)
    with pytest.raises(ValueError, match="task="):
        memory.estimate_memory(config, task="summarize")


# --------------------------------------------------------------------------- benchmark


@pytest.fixture(scope="module")
def t4_fit():
    spec = importlib.util.spec_from_file_location("t4_fit", REPO / "benchmarks" / "t4_fit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["t4_fit"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("t4_fit", None)


def test_benchmark_builds_a_quantized_random_model_through_from_pretrained(t4_fit, on_cpu):
    """The GPU benchmark's loader, on CPU with a tiny config: same quantization path as real loading."""
    small = dict(
        t4_fit.LLAMA31_8B,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    args = ModelArguments(quant="4bit", lora=True, lora_r=4, dtype="float32")
    model = t4_fit.build_model(
        small,
        "causal_lm",
        device="cpu",
        quantization_config=get_quantization_config(args, device_type="cpu"),
        dtype=torch.float32,
    )
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_state.nested
    assert type(model.lm_head).__name__ == "Linear"
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 0.005
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    model = prepare_for_training(model, args, activation_checkpointing=True)
    batch = t4_fit.make_batch("causal_lm", 2, 16, 300, "cpu", padded=False)
    loss = causal_lm_loss(model, chunk_size=8, **batch)
    assert torch.isfinite(loss)
    est = t4_fit.planned(LlamaConfig(**t4_fit.LLAMA31_8B), "decision", 8, 512, long_context=(), lora_r=16)
    assert est.total < 15 * GiB


def test_benchmark_exits_clearly_without_a_gpu(t4_fit, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert t4_fit.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# --------------------------------------------------------------------------- long context

LONG = dict(quant="4bit", lora_r=16, task="causal_lm", batch_size=1, lora_dropout=0.0)


def test_each_technique_lowers_the_llama31_8b_peak_at_32k(llama8b):
    """The issue's headline: 32,768 tokens fit 15 GiB with all five techniques, and 12 GiB of host RAM."""
    rows = [
        memory.estimate_memory(
            llama8b, max_length=32768, long_context=TECHNIQUES[:n], max_host_memory=COLAB_HOST_BUDGET, **LONG
        )
        for n in range(len(TECHNIQUES) + 1)
    ]
    totals = [r.total for r in rows]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    assert rows[-1].total <= GPU_MEMORY["t4"] < rows[-2].total
    assert rows[-1].host_peak <= 12 * GiB and rows[-1].layers_offloaded == 27  # 6.83 GiB // 256 MiB per layer
    assert rows[-1].long_context == TECHNIQUES


def test_frozen_16bit_keeps_frozen_weights_and_the_residual_16bit(llama8b):
    counts = parameter_counts(llama8b, task="causal_lm")
    kw = dict(max_length=8192, **LONG)
    upcast = memory.estimate_memory(llama8b, long_context=("efficient_attention", "chunked_loss"), **kw)
    frozen = memory.estimate_memory(
        llama8b, long_context=("frozen_16bit", "efficient_attention", "chunked_loss"), **kw
    )
    assert upcast.other_weights == counts.other_params * 4 and frozen.other_weights == counts.other_params * 2
    assert frozen.activations < 0.6 * upcast.activations  # 16-bit residual, MLP and shared LoRA inputs
    # a 16-bit base was never upcast: nothing changes
    none = dict(kw, quant="none")
    assert (
        memory.estimate_memory(llama8b, **none).total
        == memory.estimate_memory(llama8b, long_context="frozen_16bit", **none).total
    )


def test_efficient_attention_removes_the_quadratic_scores(llama8b):
    def act(n, *techniques):
        return memory.estimate_memory(llama8b, max_length=n, long_context=("chunked_loss", *techniques), **LONG)

    assert act(16384).activations > 3.5 * act(8192).activations  # the math kernel: batch x heads x seq^2
    assert act(16384, "efficient_attention").activations < 2.1 * act(8192, "efficient_attention").activations
    assert any("math kernel" in note for note in act(8192).notes)
    # a padded classification batch has a mask: O(seq) kernels either way
    cls = dict(LONG, task="decision", batch_size=4, max_length=2048)
    assert (
        memory.estimate_memory(llama8b, **cls).total
        == memory.estimate_memory(llama8b, long_context="efficient_attention", **cls).total
    )


def test_chunked_loss_and_tiled_mlp_apply_where_they_can(llama8b):
    kw = dict(max_length=8192, **LONG)
    plain = memory.estimate_memory(llama8b, long_context="efficient_attention", **kw)
    chunked = memory.estimate_memory(llama8b, long_context="efficient_attention,chunked_loss", **kw)
    assert chunked.logits_peak < plain.logits_peak / 5
    decision = dict(kw, task="decision")
    assert memory.estimate_memory(llama8b, long_context="chunked_loss", **decision).total == (
        memory.estimate_memory(llama8b, **decision).total
    )
    assert "chunked_loss" not in memory.applicable_techniques(llama8b, task="decision")
    # tiled_mlp tiles only sequences longer than a tile (the runtime runs shorter ones untiled)
    lc = ("efficient_attention", "chunked_loss")
    for n, smaller in ((4096, False), (8192, True)):
        untiled = memory.estimate_memory(llama8b, long_context=lc, **{**kw, "max_length": n})
        tiled = memory.estimate_memory(llama8b, long_context=(*lc, "tiled_mlp"), **{**kw, "max_length": n})
        assert (tiled.total < untiled.total) == smaller
    # a BERT has no decoder MLP: left out with a note, as "all" leaves it out (the runtime refuses it by name)
    bert = memory.estimate_memory(tiny_bert(), long_context="tiled_mlp")
    assert bert.long_context == () and any("tiled_mlp does nothing here" in note for note in bert.notes)
    assert bert.total == memory.estimate_memory(tiny_bert()).total
    assert "tiled_mlp" not in memory.applicable_techniques(tiny_bert(), task="decision")


def test_offload_follows_the_host_budget(llama8b):
    lc = ("frozen_16bit", "efficient_attention", "chunked_loss", "tiled_mlp", "offload_activations")

    def est(budget, n=32768, **kw):
        return memory.estimate_memory(llama8b, max_length=n, long_context=lc, max_host_memory=budget, **LONG, **kw)

    one = est(GiB)  # 256 MiB per layer input (32768 x 4096 x fp16)
    assert (one.layers_offloaded, one.host_offloaded) == (4, GiB)
    assert one.host_peak == HOST_BASELINE + GiB
    assert est(None).layers_offloaded == 32 and est(0).layers_offloaded == 0
    assert est(0).total > one.total > est(None).total
    # pinned host memory is rounded up to a power of two: one token more doubles a layer's share
    assert est(GiB, n=32769).layers_offloaded == 2
    no_ckpt = memory.estimate_memory(llama8b, long_context="offload_activations", activation_checkpointing=False)
    assert no_ckpt.layers_offloaded == 0 and any("activation checkpointing is off" in n for n in no_ckpt.notes)


def test_choose_techniques_is_the_shortest_prefix_that_fits(llama8b):
    t4 = GPU_MEMORY["t4"]

    def choose(n):
        return memory_search.choose_techniques(llama8b, gpu_mem=t4, host_mem=COLAB_HOST_BUDGET, max_length=n, **LONG)

    assert tuple(choose(1024)) == () and choose(1024).fits
    four_k = choose(4096)
    assert four_k.techniques and four_k.estimate.total <= memory_search.AUTO_HEADROOM * t4  # room for the plan's error
    shorter = memory.estimate_memory(llama8b, max_length=4096, long_context=four_k.techniques[:-1], **LONG)
    assert shorter.total > memory_search.AUTO_HEADROOM * t4  # one technique fewer would not leave that room
    long = choose(32768)
    assert tuple(long) == TECHNIQUES and long.fits and "turns on" in long.message
    too_long = choose(65536)
    assert not too_long.fits and too_long.techniques == TECHNIQUES and "does not fit" in too_long.message
    best = too_long.longest_with_all
    kw = dict(long_context=TECHNIQUES, max_host_memory=COLAB_HOST_BUDGET, **LONG)
    assert memory.estimate_memory(llama8b, max_length=best, **kw).total <= t4
    assert memory.estimate_memory(llama8b, max_length=best + 1, **kw).total > t4
    tips = memory_search.suggest_settings(
        llama8b, gpu_mem=t4, max_length=16384, max_host_memory=COLAB_HOST_BUDGET, **LONG
    )
    assert any(t.startswith("--long_context auto (turns on frozen_16bit, efficient_attention") for t in tips)


def test_bad_long_context_values(llama8b):
    with pytest.raises(ValueError, match="choose_techniques"):
        memory.estimate_memory(llama8b, long_context="auto")
    with pytest.raises(ValueError, match="unknown"):
        memory.estimate_memory(llama8b, long_context="flash_loss")


def test_the_planner_uses_the_runtimes_defaults():
    """One number per concept: the planner's chunk, tile, host reserve and pinned rounding are the runtime's."""
    import inspect

    from hfplug.long_context import offload
    from hfplug.long_context.loss import install_chunked_loss
    from hfplug.long_context.tiled_mlp import enable_tiled_mlp

    planner = inspect.signature(memory.estimate_memory).parameters
    assert planner["tile_tokens"].default == inspect.signature(enable_tiled_mlp).parameters["tile_tokens"].default
    assert (
        planner["loss_chunk_size"].default == inspect.signature(install_chunked_loss).parameters["chunk_size"].default
    )
    import psutil

    from hfplug.host_memory import host_budget

    assert host_budget("auto") == psutil.virtual_memory().total - HOST_BASELINE  # the recipe's auto budget
    for n in (1, 1000, 2**20, 3 * 2**20 + 1):
        assert pinned_bytes(n) == 1 << (n - 1).bit_length() and pinned_bytes(n) >= offload.host_nbytes(n)


def test_plan_offload_matches_the_runtime_plan():
    """enable_offloaded_checkpointing picks the same number of layers as the planner (power-of-two sizes, where
    the CPU's exact host bytes and the GPU's rounded ones agree)."""
    from hfplug.long_context.offload import enable_offloaded_checkpointing

    config = tiny_llama(num_hidden_layers=4)
    model = AutoModelForCausalLM.from_config(config)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    tokens, per_layer = 256, 256 * 64 * 4  # fp32 embeddings
    for budget in (0, per_layer, 3 * per_layer + 1, 100 * per_layer):
        runtime = enable_offloaded_checkpointing(model, max_host_bytes=budget, tokens_per_step=tokens)
        planned = plan_offload(layers=4, tokens=tokens, hidden=64, residual_bytes=4, max_host_memory=budget)
        assert runtime.layers_offloaded == planned.layers_offloaded, budget


# --------------------------------------------------------------------------- the planner against a tracker


@pytest.fixture(scope="module")
def memory_proxy():
    spec = importlib.util.spec_from_file_location("memory_proxy", REPO / "benchmarks" / "memory_proxy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_proxy"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("memory_proxy", None)


def test_the_proxys_tracker_counts_known_allocations(memory_proxy):
    assert memory_proxy.tracker_check().endswith(": ok")


def test_planner_within_10_percent_of_fake_steps_on_a_small_llama(memory_proxy, on_cpu):
    """benchmarks/memory_proxy.py's method in small: a 4-bit + LoRA Llama (narrow, 2 layers) through hfplug's
    preparation and each --long_context technique's switch, fake training steps measured by the tracker,
    against estimate_memory for the same config. (The benchmark does it at Llama-3.1-8B's width.)"""
    config = memory_proxy.config_dict(
        2,
        hidden_size=256,
        intermediate_size=896,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=2000,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    rows = memory_proxy.section_rows(
        config, [2048], dtype="float16", real=set(), host_budget=1 << 20, chunk=256, tile=256, section="test"
    )
    assert [r.techniques for r in rows] == [TECHNIQUES[:n] for n in range(len(TECHNIQUES) + 1)]
    for row in rows:
        assert 0.9 < row.ratio < 1.1, (memory_proxy.label(row.techniques), row.ratio)
    offload = rows[-1]
    assert offload.host_measured == offload.host_planned > 0  # 1 MiB: one layer input of 2048 x 256 fp16
    assert rows[0].measured > 5 * rows[-1].measured  # the techniques matter, here too
