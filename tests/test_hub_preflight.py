"""hfplug.hub.preflight against the loopback Hub: push preflight (token, write access, repo) and gated-model access."""

import socket
import time

import huggingface_hub
import pytest
from conftest import TINY_BERT
from hub_fixtures import (  # noqa: F401
    CARD_BASE,
    FG_NAMESPACE,
    FG_NO_GATED,
    FG_REPO,
    GATED_OK,
    LLAMA,
    READ,
    REVOKED,
    WRITE,
    assert_no_token,
    hub,
    no_ambient_token,
    online,
)
from hub_server import Token

from hfplug.hub import auth as hfauth
from hfplug.hub.errors import ModelAccessError, PreflightError
from hfplug.hub.preflight import check_model_access, preflight_push

# --------------------------------------------------------------------------- preflight


def test_preflight_creates_the_repo(hub):
    start = len(hub.requests)
    target = preflight_push("alice/hupd-lora", token=WRITE, private=True, endpoint=hub.url)
    assert (target.repo_id, target.user) == ("alice/hupd-lora", "alice")
    assert hub.repos["alice/hupd-lora"].private
    assert len(hub.requests) - start <= 4
    assert_no_token(repr(target))
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
    assert target.token_source == hfauth.SOURCE_ENV


@pytest.mark.parametrize(
    "token, repo_id, reason, needles",
    [
        (None, "alice/x", "no_token", ["HF_TOKEN", "hf auth login", "Colab", "settings/tokens"]),
        (REVOKED, "alice/x", "invalid_token", ["401", "revoked", "settings/tokens", "token argument"]),
        (READ, "alice/x", "read_only", ["read-only", "write token", "fine-grained", "settings/tokens"]),
        (
            FG_NAMESPACE,
            "acme/x",
            "fine_grained_scope",
            ["no write access to acme/x", "alice (user)", "settings/tokens"],
        ),
        (FG_REPO, "alice/scoped", "fine_grained_scope", ["does not exist yet", "new-model"]),
        (WRITE, "bigcorp/x", "no_rights", ["not a member of the organization 'bigcorp'", "alice/x"]),
        (WRITE, "readers/x", "no_rights", ["read role", "readers"]),
        (WRITE, "alice/a/b", "bad_repo_id", ["namespace/name"]),
        (WRITE, "-alice/x", "bad_repo_id", ["not a valid Hub repo id"]),
        (WRITE, "https://huggingface.co/alice/x", "bad_repo_id", ["URL"]),
        (WRITE, "", "bad_repo_id", ["empty"]),
    ],
)
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
    assert_no_token(str(info.value))


def test_preflight_offline_and_unreachable(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PreflightError, match="HF_HUB_OFFLINE=1") as info:
        preflight_push("alice/x", token=WRITE, endpoint=hub.url)
    assert info.value.reason == "offline" and "push_run.py" in str(info.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(PreflightError, match="Could not reach the Hub") as info:
        preflight_push("alice/x", token=WRITE, endpoint=dead)
    assert info.value.reason == "unreachable" and time.monotonic() - start < 5


def test_preflight_gives_up_on_a_hub_that_never_answers(online):
    """huggingface_hub's client has no timeout: preflight's whoami is given up after ``timeout`` seconds."""
    with socket.socket() as sock:  # accepts connections (the kernel's backlog) and never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        silent = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(PreflightError, match="Could not reach the Hub.*TimeoutError") as info:
            preflight_push("alice/x", token=WRITE, endpoint=silent, timeout=1)
        assert info.value.reason == "unreachable" and time.monotonic() - start < 5
        with pytest.raises(ModelAccessError, match="Could not reach the Hub") as info:
            check_model_access(LLAMA, WRITE, endpoint=silent, timeout=1)
        assert info.value.reason == "unreachable" and time.monotonic() - start < 10


# --------------------------------------------------------------------------- dataset repos (an export)


def test_preflight_dataset_repo(hub, caplog):
    target = preflight_push("alice/ds", repo_type="dataset", token=WRITE, private=True, endpoint=hub.url)
    assert target.repo_id == "alice/ds" and "/datasets/alice/ds" in target.url
    assert hub.datasets["alice/ds"].private and "alice/ds" not in hub.repos
    assert preflight_push("ds-2", repo_type="dataset", token=FG_NAMESPACE, endpoint=hub.url).repo_id == "alice/ds-2"
    # a fine-grained scope names a dataset repo for a dataset, a model repo for a model; not the other way round
    scoped = "hf_" + "FineGrainedAliceOneDatasetRepo0123"
    entry = {"entity": {"_id": "id-ds", "type": "dataset", "name": "alice/ds"}, "permissions": ["repo.write"]}
    hub.tokens[scoped] = Token("alice", "fineGrained", [entry])
    assert preflight_push("alice/ds", repo_type="dataset", token=scoped, endpoint=hub.url).repo_id == "alice/ds"
    hub.add_repo("alice/ds")
    with pytest.raises(PreflightError, match="no write access to alice/ds .*alice/ds \\(dataset\\)") as info:
        preflight_push("alice/ds", token=scoped, endpoint=hub.url)
    assert info.value.reason == "fine_grained_scope"
    hub.add_dataset("alice/scoped", files={})  # FG_REPO may write the model repo alice/scoped only
    with pytest.raises(PreflightError) as info:
        preflight_push("alice/scoped", repo_type="dataset", token=FG_REPO, endpoint=hub.url)
    assert info.value.reason == "fine_grained_scope"
    assert "no write access to the dataset repo alice/scoped" in str(info.value)
    assert "or write access to the dataset repo alice/scoped;" in str(info.value)
    # --hub_private_repo cannot make an existing public dataset private: said, with its settings page
    hub.add_dataset("alice/public", files={})
    preflight_push("alice/public", repo_type="dataset", token=WRITE, private=True, endpoint=hub.url)
    assert "The dataset repo alice/public already exists and is public" in caplog.text
    assert "https://huggingface.co/datasets/alice/public/settings" in caplog.text


@pytest.mark.parametrize(
    "token, repo_id, reason, needles",
    [
        (READ, "alice/ds", "read_only", ["pushing to the dataset repo alice/ds needs write access"]),
        (WRITE, "bigcorp/ds", "no_rights", ["cannot push to the dataset repo bigcorp/ds", "alice/ds"]),
        (WRITE, "https://huggingface.co/datasets/alice/ds", "bad_repo_id", ["--hub_dataset_id", "URL"]),
    ],
)
def test_preflight_dataset_repo_failures(hub, token, repo_id, reason, needles):
    with pytest.raises(PreflightError) as info:
        preflight_push(repo_id, repo_type="dataset", token=token, endpoint=hub.url, prompt=False)
    assert info.value.reason == reason
    for needle in needles:
        assert needle in str(info.value)
    assert not hub.datasets


def test_preflight_dataset_offline_and_unreachable_say_how_to_upload_the_export(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PreflightError) as info:
        preflight_push("alice/ds", repo_type="dataset", token=WRITE, endpoint=hub.url, output_dir="out/my ds")
    message = str(info.value)
    assert "the push to the dataset repo alice/ds" in message and "push the finished export later" in message
    assert message.endswith("hf upload alice/ds 'out/my ds' --repo-type dataset")
    with pytest.raises(PreflightError, match="finished run later with: python recipes/push_run.py OUTPUT_DIR"):
        preflight_push("alice/x", token=WRITE, endpoint=hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(PreflightError, match="Could not reach the Hub") as info:
        preflight_push("alice/ds", repo_type="dataset", token=WRITE, endpoint=dead, retry="my upload command")
    assert info.value.reason == "unreachable"
    assert str(info.value).endswith("push the finished export later with: my upload command")
    with pytest.raises(ValueError, match="repo_type must be one of model, dataset, got 'space'"):
        preflight_push("alice/x", repo_type="space", token=WRITE, endpoint=hub.url)


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
