"""Tokens, preflight, push and merge against a loopback Hub (tests/hub_server.py), with the real huggingface_hub client.

The conftest sets HF_HUB_OFFLINE=1 for the session; tests that talk to the loopback server
switch it off for their client (``online``) or their subprocess. Nothing leaves 127.0.0.1.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import types

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from conftest import REPO, TINY_BERT, run_command
from hub_server import HubServer, Token, fine_grained
from hfplug import hub as hfhub
from hfplug import tokens as hftokens
from hfplug.hub import (
    MergeError,
    ModelAccessError,
    PreflightError,
    PushError,
    check_merge_target,
    check_model_access,
    hub_settings,
    plan_merge,
    preflight_push,
    push_run,
    take_hub_token,
)
from hfplug.tokens import TokenError, install_token_redaction, resolve_token, resolve_token_with_source

WRITE = "hf_" + "WriteTokenAlice0123456789abcdefghij"
READ = "hf_" + "ReadOnlyTokenAlice0123456789abcdefg"
FG_NAMESPACE = "hf_" + "FineGrainedAliceNamespace0123456789"
FG_REPO = "hf_" + "FineGrainedAliceOneRepo0123456789ab"
FG_NO_GATED = "hf_" + "FineGrainedNoGatedReads0123456789ab"
REVOKED = "hf_" + "RevokedTokenAlice0123456789abcdefgh"
GATED_OK = "hf_" + "ReadTokenWithLlamaAccess0123456789a"
ALL_TOKENS = (WRITE, READ, FG_NAMESPACE, FG_REPO, FG_NO_GATED, REVOKED, GATED_OK)
LLAMA = "meta-llama/Llama-3.1-8B"
CARD_BASE = "hfplug-test/tiny-bert"  # a Hub id for the card's base_model (the adapter itself was trained on a local copy)

EVAL_RESULTS = {"epoch": 2.0, "eval_accuracy": 0.625, "eval_f1": 0.6, "eval_precision": 0.61, "eval_recall": 0.59,
                "eval_loss": 0.66, "eval_runtime": 1.2, "eval_samples_per_second": 40.0, "eval_samples": 48}
TRAIN_RESULTS = {"epoch": 2.0, "train_loss": 0.69, "train_runtime": 3.5, "train_samples": 96}
EXPECTED_ADAPTER_FILES = {
    "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
    "training_curves.png", "all_results.json", "train_results.json", "eval_results.json",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch, tmp_path):
    """No token from this machine leaks in: no env token, an empty login cache, not Colab."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "COLAB_RELEASE_TAG", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))


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
        monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        yield server
        assert not server.unhandled, f"the client called endpoints the test hub lacks: {server.unhandled}"


def _png() -> bytes:
    import zlib

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def adapter_template(tmp_path_factory):
    """A finished LoRA classification run as finetune_hupd leaves it, built with peft on the tiny BERT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter_run") / "output"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(TINY_BERT), num_labels=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                        modules_to_save=["classifier"])
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


def _digests(folder, skip=("README.md",)):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def _assert_no_token(*texts_or_bytes):
    for item in texts_or_bytes:
        data = item if isinstance(item, bytes) else str(item).encode()
        for token in ALL_TOKENS:
            assert token.encode() not in data, "a token leaked"


# --------------------------------------------------------------------------- token resolution


class _UserData(types.ModuleType):
    """Stand-in for google.colab.userdata."""

    class SecretNotFoundError(Exception):
        pass

    def __init__(self, secrets):
        super().__init__("google.colab.userdata")
        self.secrets = secrets

    def get(self, key):
        if key not in self.secrets:
            raise self.SecretNotFoundError(key)
        return self.secrets[key]


def _fake_colab(monkeypatch, secrets):
    userdata = _UserData(secrets)
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)


class _Stdin(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_resolution_order(monkeypatch):
    """argument -> HF_TOKEN -> Colab secret -> cached login -> prompt (TTY and required only)."""
    login_file = huggingface_hub.constants.HF_TOKEN_PATH
    os.makedirs(os.path.dirname(login_file))
    with open(login_file, "w") as f:
        f.write(f"{READ}\n")
    _fake_colab(monkeypatch, {"HF_TOKEN": FG_NAMESPACE})
    monkeypatch.setenv("HF_TOKEN", f"  {WRITE}\n")  # pasted with whitespace
    prompts = []
    monkeypatch.setattr("getpass.getpass", lambda text: prompts.append(text) or GATED_OK)
    monkeypatch.setattr(sys, "stdin", _Stdin(tty=True))

    assert resolve_token_with_source(FG_REPO).value == FG_REPO
    found = resolve_token_with_source()
    assert (found.value, found.source) == (WRITE, hftokens.SOURCE_ENV)
    assert WRITE not in repr(found) and WRITE not in str(found)
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_token_with_source().source == hftokens.SOURCE_COLAB
    _fake_colab(monkeypatch, {})  # the notebook has no HF_TOKEN secret
    found = resolve_token_with_source()
    assert (found.value, found.source) == (READ, hftokens.SOURCE_LOGIN)
    os.remove(login_file)
    assert resolve_token() is None and not prompts  # not required: no prompt
    found = resolve_token_with_source(required=True)
    assert (found.value, found.source) == (GATED_OK, hftokens.SOURCE_PROMPT) and len(prompts) == 1
    monkeypatch.setattr(sys, "stdin", _Stdin(tty=False))
    with pytest.raises(TokenError, match="HF_TOKEN.*hf auth login"):
        resolve_token(required=True)
    assert len(prompts) == 1  # never prompts without a terminal


def test_cached_login_from_hf_home(tmp_path):
    """A real `hf auth login` cache: $HF_HOME/token, read by huggingface_hub in a fresh process."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text(WRITE)
    code = ("from hfplug.tokens import resolve_token_with_source as r\n"
            f"t = r()\nprint(t.source, t.value == {WRITE!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HOME": str(home)}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{hftokens.SOURCE_LOGIN} True"


# --------------------------------------------------------------------------- redaction


def test_redaction_filter_masks_tokens_in_hfplug_and_transformers_logs():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root, tf_logger = logging.getLogger(), logging.getLogger("transformers")
    tf_handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    tf_logger.addHandler(tf_handler)
    try:
        secret = "not-token-shaped-secret-42"
        install_token_redaction(secret)
        flt = install_token_redaction()  # idempotent
        assert handler.filters.count(flt) == 1 and tf_logger.filters.count(flt) == 1
        child = logging.getLogger("hfplug.created.after.install")  # covered through the root handler
        child.setLevel(logging.INFO)
        child.warning("token %s and url https://x/?t=%s", WRITE, secret)
        child.warning("shaped like one: hf_%s", "Z" * 31)
        logging.getLogger("transformers.trainer").warning("Trainer got %s", READ)
        try:
            raise RuntimeError(f"bad token {FG_REPO}")
        except RuntimeError:
            child.exception("failed")
        child.info("plain %s message, %d", "ordinary", 3)
    finally:
        root.removeHandler(handler)
        tf_logger.removeHandler(tf_handler)
    text = stream.getvalue()
    _assert_no_token(text)
    assert secret not in text and "Z" * 31 not in text
    assert text.count(hftokens.MASK) >= 5
    assert "plain ordinary message, 3" in text and "hf_" not in text.split("plain")[1]
    assert "RuntimeError: bad token hf_***" in text


# --------------------------------------------------------------------------- preflight


def test_preflight_creates_the_repo(hub):
    start = len(hub.requests)
    target = preflight_push("alice/hupd-lora", token=WRITE, private=True, endpoint=hub.url)
    assert (target.repo_id, target.user) == ("alice/hupd-lora", "alice")
    assert hub.repos["alice/hupd-lora"].private
    assert len(hub.requests) - start <= 4
    _assert_no_token(repr(target))
    # a bare name goes to the user's namespace; org with the write role; fine-grained scoped to the namespace
    assert preflight_push("hupd-lora-2", token=WRITE, endpoint=hub.url).repo_id == "alice/hupd-lora-2"
    assert preflight_push("acme/hupd", token=WRITE, endpoint=hub.url).repo_id == "acme/hupd"
    assert preflight_push("alice/fg", token=FG_NAMESPACE, endpoint=hub.url).repo_id == "alice/fg"
    hub.add_repo("alice/scoped")  # a repo-scoped fine-grained token can push to its existing repo
    assert preflight_push("alice/scoped", token=FG_REPO, endpoint=hub.url).repo_id == "alice/scoped"
    # again: exist_ok
    assert preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url).url.endswith("/alice/hupd-lora")


def test_preflight_token_from_env(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE)
    target = preflight_push("alice/env", endpoint=hub.url)
    assert target.token_source == hftokens.SOURCE_ENV


@pytest.mark.parametrize("token, repo_id, reason, needles", [
    (None, "alice/x", "no_token", ["HF_TOKEN", "hf auth login", "Colab", "settings/tokens"]),
    (REVOKED, "alice/x", "invalid_token", ["401", "revoked", "settings/tokens", "token argument"]),
    (READ, "alice/x", "read_only", ["read-only", "write token", "fine-grained", "settings/tokens"]),
    (FG_NAMESPACE, "acme/x", "fine_grained_scope", ["no write access to acme/x", "alice (user)", "settings/tokens"]),
    (FG_REPO, "alice/scoped", "fine_grained_scope", ["does not exist yet", "new-model"]),
    (WRITE, "bigcorp/x", "no_rights", ["not a member of the organization 'bigcorp'", "alice/x"]),
    (WRITE, "readers/x", "no_rights", ["read role", "readers"]),
    (WRITE, "alice/a/b", "bad_repo_id", ["namespace/name"]),
    (WRITE, "-alice/x", "bad_repo_id", ["not a valid Hub repo id"]),
    (WRITE, "https://huggingface.co/alice/x", "bad_repo_id", ["URL"]),
    (WRITE, "", "bad_repo_id", ["empty"]),
])
def test_preflight_failures(hub, token, repo_id, reason, needles):
    start = time.monotonic()
    repos = set(hub.repos)
    with pytest.raises(PreflightError) as info:
        preflight_push(repo_id, token=token, endpoint=hub.url, prompt=False)
    assert time.monotonic() - start < 5
    assert info.value.reason == reason
    for needle in needles:
        assert needle in str(info.value)
    assert set(hub.repos) == repos  # nothing created
    _assert_no_token(str(info.value))


def test_preflight_offline_and_unreachable(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PreflightError, match="HF_HUB_OFFLINE=1") as info:
        preflight_push("alice/x", token=WRITE, endpoint=hub.url)
    assert info.value.reason == "offline" and "push_adapter.py" in str(info.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(PreflightError, match="Could not reach the Hub") as info:
        preflight_push("alice/x", token=WRITE, endpoint=dead)
    assert info.value.reason == "unreachable" and time.monotonic() - start < 5


# --------------------------------------------------------------------------- gated base models


def test_check_model_access(hub, tmp_path):
    check_model_access(LLAMA, GATED_OK, endpoint=hub.url)  # access granted
    check_model_access(CARD_BASE, None, endpoint=hub.url)  # public, no token needed
    with pytest.raises(ModelAccessError) as info:
        check_model_access(LLAMA, WRITE, endpoint=hub.url)
    assert info.value.reason == "gated"
    assert f"https://huggingface.co/{LLAMA}" in str(info.value) and "request access" in str(info.value)
    with pytest.raises(ModelAccessError, match="canReadGatedRepos|Read access to contents of all public gated"):
        check_model_access(LLAMA, FG_NO_GATED, endpoint=hub.url)
    with pytest.raises(ModelAccessError, match="no token was found") as info:
        check_model_access(LLAMA, None, endpoint=hub.url)
    with pytest.raises(ModelAccessError, match="not found") as info:
        check_model_access("alice/no-such-model", WRITE, endpoint=hub.url)
    with pytest.raises(ModelAccessError, match="401") as info:
        check_model_access(LLAMA, REVOKED, endpoint=hub.url)
    start = len(hub.requests)
    check_model_access(str(TINY_BERT), WRITE, endpoint=hub.url)  # a local path: nothing to check
    assert len(hub.requests) == start


# --------------------------------------------------------------------------- push


def test_push_adapter_files_card_and_no_token(hub, adapter_run, caplog):
    caplog.set_level(logging.DEBUG)
    before = _digests(adapter_run)
    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    result = push_run(adapter_run, target.repo_id, token=target.token, endpoint=hub.url, base_model=CARD_BASE,
                      task="decision", hupd_config="sample")

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert set(commit.files) == EXPECTED_ADAPTER_FILES == set(result.files)
    assert commit.files["adapter_model.safetensors"] == (adapter_run / "adapter_model.safetensors").read_bytes()
    # local output intact (only README.md, the card, is (re)written)
    assert _digests(adapter_run) == before
    assert (adapter_run / "README.md").read_bytes() == commit.files["README.md"]

    card = ModelCard(commit.files["README.md"].decode())
    data = card.data
    assert data.base_model == CARD_BASE and data.library_name == "peft" and data.datasets == ["HUPD/hupd"]
    assert data.license == "apache-2.0"  # inherited from the base model's card
    assert {"hfplug", "lora", "hupd"} <= set(data.tags) and data.pipeline_tag == "text-classification"
    metrics = {r.metric_name: (r.metric_type, r.metric_value) for r in data.eval_results}
    assert metrics == {"Accuracy": ("accuracy", 0.625), "Macro F1": ("f1", 0.6), "Macro precision": ("precision", 0.61),
                       "Macro recall": ("recall", 0.59), "Loss": ("loss", 0.66)}
    assert {r.dataset_type for r in data.eval_results} == {"HUPD/hupd"}
    assert {r.dataset_config for r in data.eval_results} == {"sample"}
    assert "AutoPeftModelForSequenceClassification.from_pretrained(\"alice/hupd-lora\")" in card.text
    assert "is gated" not in card.text
    assert ("accelerate launch recipes/finetune_hupd.py --model_name_or_path alice/hupd-lora --do_train false "
            "--do_eval true --task decision --hupd_config sample") in card.text

    for content in commit.files.values():
        _assert_no_token(content)
    for path in adapter_run.rglob("*"):
        if path.is_file():
            _assert_no_token(path.read_bytes())
    _assert_no_token(caplog.text, repr(result))


def test_push_again_commits_nothing_and_changes_only_what_changed(hub, adapter_run):
    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    push_run(adapter_run, target.repo_id, token=WRITE, endpoint=hub.url, license="apache-2.0")
    push_run(adapter_run, target.repo_id, token=WRITE, endpoint=hub.url, license="apache-2.0")
    assert len(hub.commits) == 1  # identical second push: no empty commit
    results = json.loads((adapter_run / "eval_results.json").read_text())
    (adapter_run / "eval_results.json").write_text(json.dumps({**results, "eval_accuracy": 0.75}))
    push_run(adapter_run, target.repo_id, token=WRITE, endpoint=hub.url, license="apache-2.0")
    assert len(hub.commits) == 2 and set(hub.commits[1].files) == {"eval_results.json", "README.md"}


def test_push_interrupted_half_way_then_retried(hub, adapter_run):
    """An every_save push landed, the final push is killed mid-commit; rerunning finishes it exactly once."""
    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    push_run(adapter_run / "checkpoint-2", target.repo_id, token=WRITE, endpoint=hub.url, step=2, license="mit")
    assert len(hub.commits) == 1
    before = _digests(adapter_run)

    hub.interrupt_commits()
    code = (f"from hfplug.hub import push_run\n"
            f"push_run({str(adapter_run)!r}, 'alice/hupd-lora', endpoint={hub.url!r}, license='mit')\n")
    env = {**os.environ, "HF_TOKEN": WRITE, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
           "HF_HOME": str(adapter_run.parent / "home")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.commit_received.wait(60), "the push never reached the commit"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        hub.release_commits()
    assert len(hub.commits) == 1  # the interrupted commit did not land
    assert _digests(adapter_run) == before  # nothing local lost

    result = push_run(adapter_run, "alice/hupd-lora", token=WRITE, endpoint=hub.url, license="mit")
    assert len(hub.commits) == 2
    # unchanged files from the checkpoint push are skipped; the rest completes the repo
    assert "tokenizer.json" not in hub.commits[1].files
    assert {"README.md", "eval_results.json", "training_curves.png"} <= set(hub.commits[1].files)
    assert set(hub.files("alice/hupd-lora")) == EXPECTED_ADAPTER_FILES | {".gitattributes"}
    assert set(result.files) == EXPECTED_ADAPTER_FILES
    push_run(adapter_run, "alice/hupd-lora", token=WRITE, endpoint=hub.url, license="mit")
    assert len(hub.commits) == 2  # retrying a complete push is a no-op


def test_push_failures_keep_the_output_and_say_how_to_retry(hub, adapter_run, monkeypatch):
    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    before = _digests(adapter_run)
    hub.tokens[WRITE].revoked = True  # revoked during training
    with pytest.raises(PushError) as info:
        push_run(adapter_run, target.repo_id, token=WRITE, endpoint=hub.url, license="mit")
    message = str(info.value)
    assert info.value.reason == "invalid_token" and "401" in message
    assert f"python recipes/push_adapter.py {adapter_run} --hub_model_id alice/hupd-lora" in message
    assert "intact" in message and _digests(adapter_run) == before and not hub.commits
    _assert_no_token(message)

    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)  # skip backoff waits
    endpoint = hub.url
    hub.stop()  # the network goes away
    with pytest.raises(PushError) as info:
        push_run(adapter_run, target.repo_id, token=READ, endpoint=endpoint, license="mit")
    assert info.value.reason == "network" and "push_adapter.py" in str(info.value)
    assert _digests(adapter_run) == before


def test_push_refuses_files_holding_a_token(hub, adapter_run):
    preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    (adapter_run / "train_results.json").write_text(json.dumps({"hub_token": WRITE}))
    with pytest.raises(PushError, match="train_results.json contains a Hugging Face token"):
        push_run(adapter_run, "alice/hupd-lora", token=WRITE, endpoint=hub.url, license="mit")
    assert not hub.commits


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

    from hfplug.tiny import build_llama3_tokenizer, build_tiny_llama

    tokenizer = build_llama3_tokenizer(["a patent claim about a gate electrode"] * 20, vocab_size=300)
    model = get_peft_model(build_tiny_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
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


def test_every_save_callback_pushes_checkpoints_only_safe_files(hub, adapter_run, caplog):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    callback = hfhub.hub_push_callback(target, hfhub.HubSettings("alice/hupd-lora", None, "every_save"), license="mit")
    assert hfhub.hub_push_callback(target, hfhub.HubSettings("alice/hupd-lora", None, "end")) is None
    args = TrainingArguments(output_dir=str(adapter_run), report_to="none")
    state = TrainerState()
    state.global_step = 2
    callback.on_save(args, state, TrainerControl())
    assert hub.commits[0].summary == "Training in progress, step 2"
    assert set(hub.commits[0].files) == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                         "tokenizer_config.json", "README.md"}
    assert "Training in progress" in hub.commits[0].files["README.md"].decode()
    hub.tokens[WRITE].revoked = True
    caplog.set_level(logging.WARNING)
    callback.on_save(args, state, TrainerControl())  # a failed push never stops training
    assert "training goes on" in caplog.text and len(hub.commits) == 1


# --------------------------------------------------------------------------- TrainingArguments


def test_token_and_push_taken_out_of_training_args(tmp_path):
    import torch
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), push_to_hub=True, hub_token=WRITE,
                             hub_model_id="alice/hupd", hub_private_repo=True, report_to="none")
    assert take_hub_token(args) == WRITE and args.hub_token is None
    settings = hub_settings(args)
    assert (settings.repo_id, settings.private, settings.strategy) == ("alice/hupd", True, "every_save")
    assert args.push_to_hub is False  # the Trainer will not push training_args.bin
    buffer = io.BytesIO()
    torch.save(args, buffer)
    _assert_no_token(buffer.getvalue(), args.to_json_string())
    assert hub_settings(TrainingArguments(output_dir=str(tmp_path), report_to="none")) is None
    for strategy in ("checkpoint", "all_checkpoints"):
        bad = TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_strategy=strategy, report_to="none")
        with pytest.raises(PreflightError, match="optimizer states"):
            hub_settings(bad)


# --------------------------------------------------------------------------- merge


def test_merge_refusals(tmp_path):
    quantized = tmp_path / "llama-bnb-4bit"
    quantized.mkdir()
    config = json.loads((TINY_BERT / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="4-bit.*precision loss.*--base_model") as info:
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
    result = push_run(adapter_run, "alice/merged", token=WRITE, endpoint=hub.url, merge_adapter=True,
                      license="apache-2.0")
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


# --------------------------------------------------------------------------- the push script


def test_push_adapter_script(hub, adapter_run):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": READ, "HF_HOME": str(adapter_run.parent / "home")}
    script = [sys.executable, str(REPO / "recipes" / "push_adapter.py"), str(adapter_run), "--hub_model_id"]
    out = run_command([*script, "alice/script", "--private"], env=env, timeout=120)
    assert out.returncode == 2, out.stdout  # a user error: "error: ...", status 2
    assert "error: " in out.stdout and "read-only" in out.stdout and "Traceback" not in out.stdout
    assert "alice/script" not in hub.repos

    out = run_command([*script, "script", "--private", "--license", "mit"], env={**env, "HF_TOKEN": WRITE}, timeout=120)
    assert out.returncode == 0, out.stdout
    assert hub.repos["alice/script"].private and len(hub.commits) == 1
    assert set(hub.commits[0].files) == EXPECTED_ADAPTER_FILES
    _assert_no_token(out.stdout)
