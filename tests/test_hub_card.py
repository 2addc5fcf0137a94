"""hfplug.hub.card: the model card of a pushed full fine-tune and of a causal-LM adapter (through a real push)."""

import json
import shutil

from conftest import TINY_BERT
from hub_fixtures import LLAMA, WRITE, hub, no_ambient_token, online  # noqa: F401
from huggingface_hub import ModelCard

from hfplug.hub.preflight import preflight_push
from hfplug.hub.push import push_run


def test_push_full_finetune_sends_the_weights(hub, tmp_path):
    run = tmp_path / "full"
    shutil.copytree(TINY_BERT, run)
    (run / "training_args.bin").write_bytes(b"args")
    (run / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.5, "eval_top5_accuracy": 0.9}))
    preflight_push("alice/full", token=WRITE, endpoint=hub.url)
    push_run(run, "alice/full", token=WRITE, endpoint=hub.url, license="apache-2.0")
    files = set(hub.commits[0].files)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "eval_results.json"} <= files
    assert "training_args.bin" not in files
    card = ModelCard(hub.commits[0].files["README.md"].decode())
    assert card.data.library_name == "transformers"
    assert {r.metric_name for r in card.data.eval_results} == {"Accuracy", "Top-5 accuracy"}
    assert card.data.eval_results[0].task_name.startswith("IPC")  # top-k metrics: the ipc task


def test_causal_lm_adapter_card_says_how_to_chat(hub, tmp_path):
    from peft import LoraConfig, get_peft_model

    from hfplug.testing.tiny import build_llama3_tokenizer, build_tiny_llama

    tokenizer = build_llama3_tokenizer(["a patent claim about a gate electrode"] * 20, vocab_size=300)
    model = get_peft_model(
        build_tiny_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    run = tmp_path / "chat"
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    preflight_push("alice/llama-lora", token=WRITE, endpoint=hub.url)
    push_run(run, "alice/llama-lora", token=WRITE, endpoint=hub.url, base_model=LLAMA)
    card = ModelCard(hub.commits[0].files["README.md"].decode())
    assert card.data.base_model == LLAMA and card.data.license == "llama3.1"
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "peft"
    assert "python recipes/chat.py --adapter alice/llama-lora" in card.text
    assert "AutoPeftModelForCausalLM" in card.text and "gated" in card.text
