"""Loading errors that say what to do; pad tokens for decoders; max_length limits."""

import http.server
import os
import subprocess
import sys
import threading

import pytest
from transformers import AutoConfig

from hfplug.loading import (
    ConfigUnavailableError,
    ModelLoadError,
    check_max_length,
    ensure_pad_token,
    from_pretrained,
    is_hub_id,
    load_config,
)
from hfplug.testing.tiny import build_bert_tokenizer, build_llama3_tokenizer, tiny_bert_config

TEXT = ["a semiconductor device with a gate electrode", "a method of encoding data in a memory"] * 10


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        from_pretrained(AutoConfig, str(tmp_path / "no-model"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        from_pretrained(AutoConfig, "./models/nothing/here")


def test_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = (
        "from transformers import AutoConfig\n"
        "from hfplug.loading import from_pretrained\n"
        "from_pretrained(AutoConfig, 'someone/not-cached-model')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in out.stderr


class _NotFoundHub(http.server.BaseHTTPRequestHandler):
    """Answers like the Hub does for a repo that does not exist."""

    def _not_found(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _not_found

    def log_message(self, *args):
        pass


def test_no_such_repo_distinguished_from_offline(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = (
            "from transformers import AutoConfig\n"
            "from hfplug.loading import from_pretrained\n"
            "from_pretrained(AutoConfig, 'someone/no-such-model')\n"
        )
        env = dict(
            os.environ,
            HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
            HF_HUB_CACHE=str(tmp_path),
            HF_HUB_OFFLINE="0",
            HF_HUB_ETAG_TIMEOUT="5",
            HF_HUB_DOWNLOAD_TIMEOUT="5",
        )
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert out.returncode != 0
    assert "No model repo 'someone/no-such-model' on the Hub" in out.stderr, out.stderr[-2000:]


def test_pad_token_chosen_for_llama_style_tokenizer(caplog):
    tok = build_llama3_tokenizer(TEXT, vocab_size=400)
    assert tok.pad_token is None
    with caplog.at_level("INFO", logger="hfplug.loading"):
        assert ensure_pad_token(tok) == "<|finetune_right_pad_id|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert "padding with '<|finetune_right_pad_id|>'" in caplog.text


def test_pad_token_kept_when_present():
    tok = build_bert_tokenizer(TEXT, vocab_size=200)
    assert ensure_pad_token(tok) == "[PAD]"


def test_max_length_above_model_limit():
    tok = build_bert_tokenizer(TEXT, vocab_size=200, model_max_length=512)
    config = tiny_bert_config(len(tok), max_position_embeddings=128)
    check_max_length(128, tok, config)
    with pytest.raises(
        ValueError, match=r"max_length 256 is above this model's limit of 128 tokens.*--max_length 128"
    ):
        check_max_length(256, tok, config)


def test_memory_plan_message_warns_with_settings_that_fit():
    from hfplug.fit import memory_plan_message
    from hfplug.testing.tiny import tiny_llama_config

    config = tiny_llama_config(
        32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    settings = dict(
        quant="4bit",
        lora_r=16,
        task="decision",
        max_length=2048,
        batch_size=64,
        activation_checkpointing=True,
        optim="paged_adamw_8bit",
        num_labels=2,
    )
    fits, roomy = memory_plan_message(config, gpu_mem=80 * 2**30, model_name="m", **settings)
    assert fits and roomy.startswith("Memory plan: ~") and "of 80.0 GiB" in roomy
    fits, tight = memory_plan_message(config, gpu_mem=4 * 2**30, model_name="m", **settings)
    assert not fits and tight.startswith("This run is planned at ~") and "GPU has 4.0 GiB" in tight
    assert "--per_device_train_batch_size" in tight and "--gradient_accumulation_steps" in tight


def test_unreadable_local_configs(tmp_path):
    with pytest.raises(ConfigUnavailableError) as err:
        load_config(str(tmp_path / "missing"))
    assert err.value.reason == "no_such_path"
    with pytest.raises(ConfigUnavailableError) as err:
        load_config(str(tmp_path))  # exists, no config.json
    assert err.value.reason == "no_config"


def _hub_error(cls, message):
    err = cls.__new__(cls)  # their __init__ wants an HTTP response; the message is what matters
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize(
    "error, offline, reason, words",
    [
        ("GatedRepoError", False, "gated", ["gated", "license", "HF_TOKEN"]),
        ("RepositoryNotFoundError", False, "no_such_repo", ["no such model repo"]),
        ("LocalEntryNotFoundError", True, "offline_not_cached", ["HF_HUB_OFFLINE", "not in the local cache"]),
        ("LocalEntryNotFoundError", False, "unreachable", ["could not be reached"]),
    ],
)
def test_unreadable_hub_configs_say_why(monkeypatch, error, offline, reason, words):
    import huggingface_hub
    from huggingface_hub import constants, errors

    cls = getattr(errors, error)

    def fake_download(*args, **kwargs):
        raise cls("nope") if error == "LocalEntryNotFoundError" else _hub_error(cls, "nope")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises(ConfigUnavailableError) as err:
        load_config("meta-llama/Llama-3.1-8B")
    assert err.value.reason == reason
    for word in words:
        assert word in str(err.value)


def test_one_hub_id_rule(tmp_path, monkeypatch):
    """``name`` or ``namespace/name`` by the Hub's rules, and not a local path (nor under an existing folder)."""
    for name in ("gpt2", "meta-llama/Llama-3.1-8B", "anferico/bert-for-patents", "Qwen/Qwen2.5-0.5B-Instruct"):
        assert is_hub_id(name), name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "gpt2").mkdir()
    for name in (
        "",
        "./x",
        "../x",
        "/x",
        "~/x",
        "a/b/c",
        "a//b",
        "my model",
        "a--b",
        "a..b",
        ".x",
        "x.git",
        "outputs",
        "outputs/run-1",
        "gpt2",
        "x" * 97,
    ):
        assert not is_hub_id(name), name
