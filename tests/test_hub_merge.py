"""hfplug.hub.merge: refusals (quantized base, not enough memory) and a merged adapter pushed to the loopback Hub."""

import json

import pytest
from conftest import TINY_BERT
from hub_fixtures import WRITE, adapter_run, adapter_template, hub, no_ambient_token, online  # noqa: F401
from huggingface_hub import ModelCard

from hfplug.hub.errors import MergeError
from hfplug.hub.merge import check_merge_target, plan_merge
from hfplug.hub.preflight import preflight_push
from hfplug.hub.push import push_run


def test_merge_refusals(tmp_path):
    quantized = tmp_path / "llama-bnb-4bit"
    quantized.mkdir()
    config = json.loads((TINY_BERT / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="4-bit.*precision loss.*--merge_base_model") as info:
        plan_merge(str(quantized))
    assert info.value.reason == "quantized_base"
    with pytest.raises(MergeError, match="Not enough memory.*Push the adapter instead") as info:
        plan_merge(str(TINY_BERT), available_bytes=2**20)
    assert info.value.reason == "memory"
    plan = plan_merge(str(TINY_BERT))
    assert plan.params > 0 and plan.needed_bytes < plan.available_bytes

    class FourBitModel:  # what transformers sets on a model loaded with BitsAndBytesConfig(load_in_4bit=True)
        is_loaded_in_4bit = True
        config = None

    with pytest.raises(MergeError, match="model in memory, which is 4-bit"):
        check_merge_target(FourBitModel())


def test_merge_adapter_then_push(hub, adapter_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    preflight_push("alice/merged", token=WRITE, endpoint=hub.url, merge_adapter=True, base_model=str(TINY_BERT))
    result = push_run(
        adapter_run, "alice/merged", token=WRITE, endpoint=hub.url, merge_adapter=True, license="apache-2.0"
    )
    merged_dir = adapter_run / "merged"
    assert result.kind == "merged" and result.folder == str(merged_dir)
    files = set(hub.commits[0].files)
    assert {"config.json", "model.safetensors", "tokenizer.json", "eval_results.json", "README.md"} <= files
    assert not files & {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"}
    assert ModelCard(hub.commits[0].files["README.md"].decode()).data.library_name == "transformers"

    inputs = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    base = AutoModelForSequenceClassification.from_pretrained(str(TINY_BERT), num_labels=2)
    expected = PeftModel.from_pretrained(base, str(adapter_run)).eval()(**inputs).logits
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()
    assert merged.config.id2label == {0: "REJECTED", 1: "ACCEPTED"}
    torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
