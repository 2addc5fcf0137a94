"""hfplug.quantization: arguments, dtype choice, 4-bit/8-bit loading and LoRA preparation on tiny models."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    HfArgumentParser,
    LlamaConfig,
    TrainingArguments,
)

from hfplug import quantization as mo
from hfplug.lora import get_peft_config
from hfplug.model_args import ModelArguments
from hfplug.quantization import (
    DeviceCapability,
    default_optim,
    get_quantization_config,
    prepare_for_training,
    resolve_dtype,
)
from hfplug.testing import tiny

R = 4  # LoRA rank used throughout
NUM_LABELS = 3


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        num_labels=NUM_LABELS,
    )
    values.update(overrides)
    return tiny.tiny_llama_config(300, **values)


def tiny_bert_config() -> BertConfig:
    return tiny.tiny_bert_config(
        300, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64, num_labels=NUM_LABELS
    )


@pytest.fixture(scope="module")
def llama_cls_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_cls")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(tiny_llama_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_lm")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bert_cls_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_cls")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(tiny_bert_config()).save_pretrained(path)
    return str(path)


@pytest.fixture
def on_cpu(monkeypatch):
    """Every capability query answers 'CPU', even on a machine with a GPU."""
    monkeypatch.setattr(mo, "device_capability", lambda device_type=None: DeviceCapability("cpu", "cpu", True))


def qlora_args(**overrides) -> ModelArguments:
    values = dict(quant="4bit", lora=True, lora_r=R, lora_alpha=2 * R, lora_dropout=0.0, dtype="float32")
    values.update(overrides)
    return ModelArguments(**values)


def load(path, args, cls=AutoModelForSequenceClassification):
    return cls.from_pretrained(
        path,
        quantization_config=get_quantization_config(args, device_type="cpu"),
        dtype=resolve_dtype(args.dtype, device_type="cpu"),
    )


def expected_lora_params(
    config, r, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
):
    """r * (in + out) for each adapted projection, from the config alone."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return config.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets)


# --------------------------------------------------------------------------- arguments


def test_arguments_parse_from_cli_and_yaml_style_dicts():
    parser = HfArgumentParser((ModelArguments, TrainingArguments))
    model_args, _ = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "/tmp/unused",
            "--quant",
            "4bit",
            "--lora",
            "--lora_target_modules",
            "q_proj,v_proj",
            "o_proj",
        ]
    )
    assert model_args.quant == "4bit" and model_args.lora
    assert model_args.lora_target_modules == ["q_proj", "v_proj", "o_proj"]
    (from_dict,) = HfArgumentParser(ModelArguments).parse_dict({"lora_target_modules": "q_proj, v_proj"})
    assert from_dict.lora_target_modules == ["q_proj", "v_proj"]
    assert ModelArguments().lora_target_modules == ["all-linear"]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("quant", "3bit", ["3bit", "none", "8bit", "4bit"]),
        ("dtype", "fp16", ["fp16", "float16", "bfloat16"]),
        ("lora_r", 0, ["lora_r=0", "positive"]),
        ("lora_alpha", -1, ["lora_alpha=-1"]),
        ("lora_dropout", 1.5, ["lora_dropout=1.5", "[0, 1)"]),
        ("lora_target_modules", ["all-linear", "q_proj"], ["all-linear"]),
        ("lora_target_modules", " , ", ["empty"]),
    ],
)
def test_invalid_arguments_name_what_was_given_and_allowed(field, value, words):
    with pytest.raises(ValueError) as err:
        ModelArguments(**{field: value})
    for word in words:
        assert word in str(err.value)


def test_default_optim_is_paged_8bit_only_for_4bit():
    assert default_optim(ModelArguments(quant="4bit", lora=True)) == "paged_adamw_8bit"
    assert default_optim(ModelArguments(quant="8bit", lora=True)) is None
    assert default_optim(ModelArguments()) is None


@pytest.mark.parametrize(
    "values, words",
    [
        (dict(quant="4bit", quant_storage="int4"), ["int4", "uint8", "bfloat16"]),
        (dict(quant="8bit", quant_storage="bfloat16"), ["4-bit weights only", "quant='8bit'", "--quant 4bit"]),
        (dict(quant_storage="float32"), ["quant='none'"]),
    ],
)
def test_invalid_quant_storage(values, words):
    with pytest.raises(ValueError) as err:
        ModelArguments(lora=True, **values)
    for word in words:
        assert word in str(err.value)


def test_quant_storage_parses_from_the_cli():
    parser = HfArgumentParser(ModelArguments)
    (args,) = parser.parse_args_into_dataclasses(["--quant", "4bit", "--quant_storage", "bfloat16"])
    assert args.quant_storage == "bfloat16"
    assert ModelArguments().quant_storage == "auto"


# --------------------------------------------------------------------------- dtype

CPU = DeviceCapability("cpu", "cpu", True)
T4 = DeviceCapability("cuda", "Tesla T4", False)
A100 = DeviceCapability("cuda", "NVIDIA A100-SXM4-40GB", True)


@pytest.mark.parametrize(
    "cap, expected", [(CPU, torch.float32), (T4, torch.float16), (A100, torch.bfloat16)], ids=["cpu", "t4", "a100"]
)
def test_auto_dtype_follows_the_hardware(monkeypatch, cap, expected):
    monkeypatch.setattr(mo, "device_capability", lambda device_type=None: cap)
    assert resolve_dtype("auto") == expected


def test_explicit_dtypes_pass_through(monkeypatch):
    monkeypatch.setattr(mo, "device_capability", lambda device_type=None: A100)
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("float32") == torch.float32
    monkeypatch.setattr(mo, "device_capability", lambda device_type=None: T4)
    assert resolve_dtype("float16") == torch.float16


def test_bf16_on_a_t4_is_an_error_naming_the_gpu_and_the_fix(monkeypatch):
    monkeypatch.setattr(mo, "device_capability", lambda device_type=None: T4)
    with pytest.raises(ValueError) as err:
        resolve_dtype("bfloat16")
    assert "Tesla T4" in str(err.value) and "--dtype float16" in str(err.value)
    # ... and it is raised by get_quantization_config too, i.e. before any weights load.
    with pytest.raises(ValueError, match="Tesla T4"):
        get_quantization_config(ModelArguments(quant="4bit", dtype="bfloat16", lora=True))


def test_fp16_on_cpu_warns(monkeypatch):
    monkeypatch.setattr(mo, "device_capability", lambda device_type=None: CPU)
    with pytest.warns(UserWarning, match="float16 on CPU"):
        assert resolve_dtype("float16") == torch.float16


def test_capability_query_goes_through_torch_cuda(monkeypatch):
    """The real query (not the fake) reads torch.cuda: a T4-like answer gives fp16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert mo.device_capability() == T4
    assert resolve_dtype("auto") == torch.float16
    assert resolve_dtype("auto", device_type="cpu") == torch.float32  # --use_cpu on a GPU machine


# --------------------------------------------------------------------------- configs


def test_quantization_config(on_cpu):
    assert get_quantization_config(ModelArguments()) is None
    four = get_quantization_config(ModelArguments(quant="4bit", lora=True))
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float32  # auto on CPU
    assert four.bnb_4bit_quant_storage == torch.uint8  # left at bitsandbytes' default
    eight = get_quantization_config(ModelArguments(quant="8bit", lora=True))
    assert eight.load_in_8bit and not eight.load_in_4bit


@pytest.fixture
def under_fsdp(monkeypatch):
    """The environment ``accelerate launch`` gives an FSDP run."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")


def test_sharding_is_detected_from_the_launcher_environment(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    assert not mo.running_under_fsdp() and mo.sharded_training() is None
    for value, expected in (("true", True), ("1", True), ("True", True), ("false", False), ("0", False)):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
        assert mo.running_under_fsdp() is expected
        assert mo.sharded_training() == ("FSDP" if expected else None)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # ZeRO-2 shards optimizer states, not weights
    assert mo.sharded_training() is None
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert mo.sharded_training() == "DeepSpeed ZeRO-3"


def test_quant_storage_auto_is_uint8_outside_fsdp(on_cpu, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    four = get_quantization_config(ModelArguments(quant="4bit", lora=True, quant_storage="auto"))
    assert four.bnb_4bit_quant_storage == torch.uint8
    explicit = get_quantization_config(ModelArguments(quant="4bit", lora=True, quant_storage="bfloat16"))
    assert explicit.bnb_4bit_quant_storage == torch.bfloat16  # allowed (and harmless) without FSDP


def test_quant_storage_follows_the_compute_dtype_under_fsdp(under_fsdp, monkeypatch):
    """FSDP flattens packed weights with the model's others: one float dtype for all."""
    monkeypatch.setattr(mo, "device_capability", lambda device_type=None: A100)
    config = get_quantization_config(ModelArguments(quant="4bit", lora=True, dtype="auto"))
    assert config.bnb_4bit_quant_storage == config.bnb_4bit_compute_dtype == torch.bfloat16
    assert (
        mo.resolve_quant_storage(ModelArguments(quant="4bit", quant_storage="float32"), torch.float32) == torch.float32
    )
    with pytest.raises(ValueError) as err:
        mo.resolve_quant_storage(ModelArguments(quant="4bit", quant_storage="uint8"), torch.bfloat16)
    assert "under FSDP" in str(err.value) and "--quant_storage bfloat16 (or auto)" in str(err.value)
    assert mo.resolve_quant_storage(ModelArguments(quant="4bit"), torch.bfloat16, sharded=False) == torch.uint8


def test_fp16_storage_under_fsdp_warns_with_peft_advice(under_fsdp, monkeypatch, caplog):
    monkeypatch.setattr(mo, "device_capability", lambda device_type=None: T4)
    config = get_quantization_config(ModelArguments(quant="4bit", lora=True, dtype="float16"))
    assert config.bnb_4bit_quant_storage == torch.float16
    assert "PEFT advises float32 storage" in caplog.text


def test_no_paged_optimizer_under_fsdp(under_fsdp):
    """PEFT: paged_adamw_8bit fails when an FSDP + QLoRA run saves a checkpoint."""
    assert default_optim(ModelArguments(quant="4bit", lora=True)) is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fsdp_qlora_preparation_keeps_one_dtype(llama_cls_dir, on_cpu, under_fsdp, monkeypatch, dtype):
    """What FSDP needs to flatten a block: packed weights, norms, adapters and head all in ``dtype``."""
    args = qlora_args(dtype=dtype)
    model = load(llama_cls_dir, args)
    assert {type(p).__name__ for p in model.parameters()} == {"Params4bit", "Parameter"}
    model = prepare_for_training(model, args, activation_checkpointing=True)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}  # no fp32 upcasts
    config = tiny_llama_config()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected_lora_params(config, R) + config.hidden_size * NUM_LABELS
    model.train()
    ids = torch.randint(3, 300, (2, 8))
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    # the parameter count reads packed weights right whatever their container (uint8 without FSDP)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    plain = prepare_for_training(load(llama_cls_dir, qlora_args()), qlora_args(), activation_checkpointing=False)
    assert mo.count_parameters(model) == mo.count_parameters(plain)


def test_quantization_without_bitsandbytes_says_what_to_do(on_cpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(RuntimeError) as err:
        get_quantization_config(ModelArguments(quant="4bit", lora=True))
    assert "pip install" in str(err.value) and "--quant none" in str(err.value)


def test_quantization_on_a_device_bitsandbytes_lacks(on_cpu, monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)
    with pytest.raises(RuntimeError, match="no backend for device 'cpu'"):
        get_quantization_config(ModelArguments(quant="8bit", lora=True), device_type="cpu")


def test_peft_config_is_none_when_lora_is_off():
    assert get_peft_config(ModelArguments(), task_type="SEQ_CLS") is None
    config = get_peft_config(ModelArguments(lora=True), task_type="SEQ_CLS", modules_to_save=["score"])
    assert config.target_modules == "all-linear" and config.modules_to_save == ["score"]
    assert config.r == 16 and config.lora_alpha == 32
    named = get_peft_config(ModelArguments(lora=True, lora_target_modules=["q_proj", "v_proj"]), task_type="CAUSAL_LM")
    assert set(named.target_modules) == {"q_proj", "v_proj"}


# --------------------------------------------------------------------------- loading + LoRA


def lora_and_head_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_4bit_llama_classifier_trains_only_lora_and_head(llama_cls_dir, on_cpu, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    args = qlora_args()
    model = load(llama_cls_dir, args)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(model.score).__name__ == "Linear"  # bitsandbytes leaves the head alone
    model = prepare_for_training(model, args, activation_checkpointing=True)

    config = tiny_llama_config()
    head = config.hidden_size * NUM_LABELS
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected_lora_params(config, R) + head
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("score.modules_to_save" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    layer = model.get_base_model().model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False

    # One paged 8-bit AdamW step: LoRA and head weights move, nothing else does.
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = torch.randint(3, 300, (4, 12))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    lora_b = {k for k in before if "lora_B" in k}
    assert changed, "nothing trained"
    assert lora_b <= changed  # B starts at zero and must move
    assert any("score.modules_to_save" in k for k in changed)
    assert all("lora_" in k or "modules_to_save" in k for k in changed), sorted(changed)

    # Save the adapter (+ head) and load it back onto a fresh 4-bit base: same logits.
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = set(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            tmp_path / "adapter" / "adapter_model.safetensors"
        )
    )
    assert any("score" in k for k in saved) and all("lora_" in k or "score" in k for k in saved)
    reloaded = PeftModel.from_pretrained(load(llama_cls_dir, args), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_8bit_llama_loads_and_backpropagates(llama_cls_dir, on_cpu):
    args = qlora_args(quant="8bit")
    model = load(llama_cls_dir, args)
    assert model.is_loaded_in_8bit
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    model = prepare_for_training(model, args, activation_checkpointing=False)
    config = tiny_llama_config()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected_lora_params(config, R) + config.hidden_size * NUM_LABELS
    model.train()
    ids = torch.randint(3, 300, (2, 8))
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_4bit_bert_detects_classifier_and_counts_exactly(bert_cls_dir, on_cpu):
    args = qlora_args()
    model = load(bert_cls_dir, args)
    assert mo.detect_head_modules(model) == ["classifier"]
    assert type(model.classifier).__name__ == "Linear"  # kept unquantized so that it can train
    model = prepare_for_training(model, args, activation_checkpointing=True)
    c = tiny_bert_config()
    h, i, r = c.hidden_size, c.intermediate_size, R
    # query, key, value, attention.output.dense (h->h), intermediate.dense (h->i),
    # output.dense (i->h) per layer; the pooler's dense (h->h) once; classifier w + b.
    per_layer = 4 * r * (h + h) + r * (h + i) + r * (i + h)
    expected = c.num_hidden_layers * per_layer + r * (h + h) + (h * NUM_LABELS + NUM_LABELS)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    model.train()
    ids = torch.randint(1, 300, (2, 10))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    head_grad = [p.grad for n, p in model.named_parameters() if "classifier.modules_to_save" in n]
    assert head_grad and all(g is not None for g in head_grad)


def test_causal_lm_gets_no_head_in_modules_to_save(llama_lm_dir, on_cpu):
    model = prepare_for_training(
        load(llama_lm_dir, qlora_args(), AutoModelForCausalLM), qlora_args(), activation_checkpointing=False
    )
    names = lora_and_head_names(model)
    assert names and all("lora_" in n for n in names)  # lm_head stays frozen
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_lora_params(
        tiny_llama_config(), R
    )


def test_named_targets(llama_cls_dir, on_cpu):
    args = qlora_args(lora_target_modules=["q_proj", "v_proj"])
    model = prepare_for_training(load(llama_cls_dir, args), args, activation_checkpointing=False)
    config = tiny_llama_config()
    expected = expected_lora_params(config, R, ("q_proj", "v_proj")) + config.hidden_size * NUM_LABELS
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_16bit_base_with_lora_keeps_trainables_in_fp32(llama_cls_dir, on_cpu):
    """fp16 AMP's GradScaler cannot unscale fp16 gradients: LoRA and the head copy are fp32."""
    args = ModelArguments(lora=True, lora_r=R, dtype="float16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 on CPU warns; that is tested above
        model = AutoModelForSequenceClassification.from_pretrained(llama_cls_dir, dtype=resolve_dtype("float16"))
    model = prepare_for_training(model, args, activation_checkpointing=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float16 for p in frozen)  # the base keeps its 16-bit memory


def test_frozen_16bit_keeps_frozen_weights_16bit_with_the_same_loss_and_gradients(llama_lm_dir, on_cpu):
    """--long_context frozen_16bit: no fp32 upcast of embeddings/lm_head/norms; training is unchanged."""
    args = qlora_args(dtype="float16")
    results = {}
    for frozen_16bit in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float16 on CPU warns
            base = load(llama_lm_dir, args, AutoModelForCausalLM)
        torch.manual_seed(1)  # the same LoRA initialisation
        model = prepare_for_training(base, args, activation_checkpointing=True, frozen_16bit=frozen_16bit)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trainable = [p for p in model.parameters() if p.requires_grad]
        ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))
        model.train()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        results[frozen_16bit] = (frozen, trainable, loss, torch.autograd.grad(loss, trainable))
    assert results[False][0] == {torch.float32, torch.uint8}  # PEFT's k-bit preparation upcasts
    assert results[True][0] == {torch.float16, torch.uint8}  # the technique keeps 16-bit
    assert all(p.dtype == torch.float32 for p in results[True][1])
    # fp16 vs fp32 residual stream: equal up to fp16 rounding
    torch.testing.assert_close(results[True][2], results[False][2], atol=2e-3, rtol=2e-3)
    for got, want in zip(results[True][3], results[False][3]):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


# --------------------------------------------------------------------------- errors


def test_missing_target_modules_list_the_linear_layers(llama_cls_dir, on_cpu):
    args = qlora_args(lora_target_modules=["q_proj", "query"])
    with pytest.raises(ValueError) as err:
        prepare_for_training(load(llama_cls_dir, args), args, activation_checkpointing=False)
    message = str(err.value)
    assert "['query']" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    assert "score" not in message.split("linear layers are:")[1]  # the head is not a LoRA target


def test_a_quantized_head_is_refused(bert_cls_dir, on_cpu):
    """transformers' default skip list quantizes BERT's classifier (it has a bias)."""
    from transformers import BitsAndBytesConfig

    model = AutoModelForSequenceClassification.from_pretrained(
        bert_cls_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True), dtype=torch.float32
    )
    with pytest.raises(ValueError, match="head 'classifier' was quantized"):
        prepare_for_training(model, qlora_args(), activation_checkpointing=False)


def test_quantized_base_without_lora_cannot_be_fully_fine_tuned(llama_cls_dir, on_cpu):
    args = ModelArguments(quant="4bit", dtype="float32")
    model = load(llama_cls_dir, args)
    with pytest.raises(ValueError) as err:
        prepare_for_training(model, args, activation_checkpointing=False)
    assert "cannot be fully fine-tuned" in str(err.value)
    assert "--lora" in str(err.value) and "--quant none" in str(err.value)
