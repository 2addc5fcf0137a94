"""Shared pieces of the Hub tests: tokens the loopback Hub knows, the fixtures, and a finished adapter run.

The conftest sets HF_HUB_OFFLINE=1 for the session; tests that talk to the loopback server
(tests/hub_server.py) switch it off for their client (``online``) or their subprocess. Nothing
leaves 127.0.0.1. A test module uses these fixtures by importing them (``no_ambient_token`` is
autouse in every module that imports it).
"""

import hashlib
import json
import shutil
import socket
import sys

import huggingface_hub
import huggingface_hub.constants  # huggingface_hub loads submodules lazily: the fixtures patch this one
import pytest
from conftest import TINY_BERT
from hub_server import HubServer, Token, fine_grained

WRITE = "hf_" + "WriteTokenAlice0123456789abcdefghij"
READ = "hf_" + "ReadOnlyTokenAlice0123456789abcdefg"
FG_NAMESPACE = "hf_" + "FineGrainedAliceNamespace0123456789"
FG_REPO = "hf_" + "FineGrainedAliceOneRepo0123456789ab"
FG_NO_GATED = "hf_" + "FineGrainedNoGatedReads0123456789ab"
REVOKED = "hf_" + "RevokedTokenAlice0123456789abcdefgh"
GATED_OK = "hf_" + "ReadTokenWithLlamaAccess0123456789a"
ALL_TOKENS = (WRITE, READ, FG_NAMESPACE, FG_REPO, FG_NO_GATED, REVOKED, GATED_OK)
LLAMA = "meta-llama/Llama-3.1-8B"
CARD_BASE = (
    "hfplug-test/tiny-bert"  # a Hub id for the card's base_model (the adapter itself was trained on a local copy)
)

EVAL_RESULTS = {
    "epoch": 2.0,
    "eval_accuracy": 0.625,
    "eval_f1": 0.6,
    "eval_precision": 0.61,
    "eval_recall": 0.59,
    "eval_loss": 0.66,
    "eval_runtime": 1.2,
    "eval_samples_per_second": 40.0,
    "eval_samples": 48,
}
TRAIN_RESULTS = {"epoch": 2.0, "train_loss": 0.69, "train_runtime": 3.5, "train_samples": 96}
EXPECTED_ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "training_curves.png",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch, tmp_path):
    """No token from this machine leaks in: no env token, an empty login cache, not Colab."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "COLAB_RELEASE_TAG", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens")
    )


@pytest.fixture
def online(monkeypatch):
    """Let this process's huggingface_hub client make requests, to the loopback server only (enforced)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to connect to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture
def hub(online, monkeypatch, tmp_path):
    """The loopback Hub; huggingface_hub's default endpoint points at it too, so no implicit call leaves 127.0.0.1."""
    tokens = {
        WRITE: Token("alice"),
        READ: Token("alice", "read"),
        FG_NAMESPACE: fine_grained("alice", namespaces=["alice"]),
        FG_REPO: fine_grained("alice", repos=["alice/scoped"]),
        FG_NO_GATED: fine_grained("alice", namespaces=["alice"], can_read_gated=False, gated_access=(LLAMA,)),
        REVOKED: Token("alice", revoked=True),
        GATED_OK: Token("alice", "read", gated_access=(LLAMA,)),
    }
    with HubServer(tokens, orgs={"acme": {"alice": "write"}, "readers": {"alice": "read"}}) as server:
        server.add_repo(LLAMA, gated=True, card_data={"license": "llama3.1"})
        server.add_repo(CARD_BASE, card_data={"license": "apache-2.0"})
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        # hf_hub_url builds file URLs from this template, which HF_ENDPOINT sets at import
        monkeypatch.setattr(
            huggingface_hub.constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        yield server
        assert not server.unhandled, f"the client called endpoints the test hub lacks: {server.unhandled}"


def _png() -> bytes:
    import zlib

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def adapter_template(tmp_path_factory):
    """A finished LoRA classification run as finetune_hupd leaves it, built with peft on the tiny BERT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter_run") / "output"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(TINY_BERT), num_labels=2)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"]
    )
    model = get_peft_model(model, config)
    with torch.no_grad():  # a trained adapter: B != 0, so merging changes the weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(TINY_BERT)).save_pretrained(out)
    (out / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    (out / "train_results.json").write_text(json.dumps(TRAIN_RESULTS))
    (out / "all_results.json").write_text(json.dumps({**EVAL_RESULTS, **TRAIN_RESULTS}))
    (out / "training_curves.png").write_bytes(_png())
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    (out / "training_args.bin").write_bytes(b"pickled TrainingArguments")
    checkpoint = out / "checkpoint-2"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(out / name, checkpoint / name)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        (checkpoint / name).write_bytes(b"state")
    return out


@pytest.fixture
def adapter_run(adapter_template, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter_template, run)
    return run


def digests(folder, skip=("README.md",)):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def assert_no_token(*texts_or_bytes):
    for item in texts_or_bytes:
        data = item if isinstance(item, bytes) else str(item).encode()
        for token in ALL_TOKENS:
            assert token.encode() not in data, "a token leaked"
