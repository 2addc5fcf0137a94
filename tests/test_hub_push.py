"""hfplug.hub.push against the loopback Hub: which files go, the card, retries, failures, the every_save
callback, and recipes/push_run.py as a user runs it."""

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_command
from hub_fixtures import (  # noqa: F401
    CARD_BASE,
    EXPECTED_ADAPTER_FILES,
    READ,
    WRITE,
    adapter_run,
    adapter_template,
    assert_no_token,
    digests,
    hub,
    no_ambient_token,
    online,
)
from huggingface_hub import ModelCard

from hfplug.config import ConfigError
from hfplug.hub import HubSettings
from hfplug.hub.errors import PushError
from hfplug.hub.preflight import preflight_push
from hfplug.hub.push import HubPushCallback, hub_push_callback, push_run

# --------------------------------------------------------------------------- push


def test_push_adapter_files_card_and_no_token(hub, adapter_run, caplog):
    caplog.set_level(logging.DEBUG)
    before = digests(adapter_run)
    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    result = push_run(
        adapter_run,
        target.repo_id,
        token=target.token,
        endpoint=hub.url,
        base_model=CARD_BASE,
        task="decision",
        hupd_config="sample",
    )

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert set(commit.files) == EXPECTED_ADAPTER_FILES == set(result.files)
    assert commit.files["adapter_model.safetensors"] == (adapter_run / "adapter_model.safetensors").read_bytes()
    # local output intact (only README.md, the card, is (re)written)
    assert digests(adapter_run) == before
    assert (adapter_run / "README.md").read_bytes() == commit.files["README.md"]

    card = ModelCard(commit.files["README.md"].decode())
    data = card.data
    assert data.base_model == CARD_BASE and data.library_name == "peft" and data.datasets == ["HUPD/hupd"]
    assert data.license == "apache-2.0"  # inherited from the base model's card
    assert {"hfplug", "lora", "hupd"} <= set(data.tags) and data.pipeline_tag == "text-classification"
    metrics = {r.metric_name: (r.metric_type, r.metric_value) for r in data.eval_results}
    assert metrics == {
        "Accuracy": ("accuracy", 0.625),
        "Macro F1": ("f1", 0.6),
        "Macro precision": ("precision", 0.61),
        "Macro recall": ("recall", 0.59),
        "Loss": ("loss", 0.66),
    }
    assert {r.dataset_type for r in data.eval_results} == {"HUPD/hupd"}
    assert {r.dataset_config for r in data.eval_results} == {"sample"}
    assert 'AutoPeftModelForSequenceClassification.from_pretrained("alice/hupd-lora")' in card.text
    assert "is gated" not in card.text
    assert (
        "accelerate launch recipes/finetune_hupd.py --model_name_or_path alice/hupd-lora --do_train false "
        "--do_eval true --task decision --hupd_config sample"
    ) in card.text

    for content in commit.files.values():
        assert_no_token(content)
    for path in adapter_run.rglob("*"):
        if path.is_file():
            assert_no_token(path.read_bytes())
    assert_no_token(caplog.text, repr(result))


def test_push_again_commits_nothing_and_changes_only_what_changed(hub, adapter_run):
    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    push_run(adapter_run, target.repo_id, token=WRITE, endpoint=hub.url, license="apache-2.0")
    push_run(adapter_run, target.repo_id, token=WRITE, endpoint=hub.url, license="apache-2.0")
    assert len(hub.commits) == 1  # identical second push: no empty commit
    results = json.loads((adapter_run / "eval_results.json").read_text())
    (adapter_run / "eval_results.json").write_text(json.dumps({**results, "eval_accuracy": 0.75}))
    push_run(adapter_run, target.repo_id, token=WRITE, endpoint=hub.url, license="apache-2.0")
    assert len(hub.commits) == 2 and set(hub.commits[1].files) == {"eval_results.json", "README.md"}


@pytest.mark.slow  # runs hfplug in a subprocess: left out of the fast local subset
def test_push_interrupted_half_way_then_retried(hub, adapter_run):
    """An every_save push landed, the final push is killed mid-commit; rerunning finishes it exactly once."""
    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    push_run(adapter_run / "checkpoint-2", target.repo_id, token=WRITE, endpoint=hub.url, step=2, license="mit")
    assert len(hub.commits) == 1
    before = digests(adapter_run)

    hub.interrupt_commits()
    code = (
        f"from hfplug.hub.push import push_run\n"
        f"push_run({str(adapter_run)!r}, 'alice/hupd-lora', endpoint={hub.url!r}, license='mit')\n"
    )
    env = {
        **os.environ,
        "HF_TOKEN": WRITE,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(adapter_run.parent / "home"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert hub.commit_received.wait(60), "the push never reached the commit"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        hub.release_commits()
    assert len(hub.commits) == 1  # the interrupted commit did not land
    assert digests(adapter_run) == before  # nothing local lost

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
    before = digests(adapter_run)
    hub.tokens[WRITE].revoked = True  # revoked during training
    with pytest.raises(PushError) as info:
        push_run(adapter_run, target.repo_id, token=WRITE, endpoint=hub.url, license="mit")
    message = str(info.value)
    assert info.value.reason == "invalid_token" and "401" in message
    assert f"python recipes/push_run.py {adapter_run} --hub_model_id alice/hupd-lora" in message
    assert "intact" in message and digests(adapter_run) == before and not hub.commits
    assert_no_token(message)

    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)  # skip backoff waits
    endpoint = hub.url
    hub.stop()  # the network goes away
    with pytest.raises(PushError) as info:
        push_run(adapter_run, target.repo_id, token=READ, endpoint=endpoint, license="mit")
    assert info.value.reason == "network" and "push_run.py" in str(info.value)
    assert digests(adapter_run) == before


def test_push_refuses_files_holding_a_token(hub, adapter_run):
    preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    (adapter_run / "train_results.json").write_text(json.dumps({"hub_token": WRITE}))
    with pytest.raises(PushError, match="train_results.json contains a Hugging Face token"):
        push_run(adapter_run, "alice/hupd-lora", token=WRITE, endpoint=hub.url, license="mit")
    assert not hub.commits


def test_every_save_callback_pushes_checkpoints_only_safe_files(hub, adapter_run, caplog):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    target = preflight_push("alice/hupd-lora", token=WRITE, endpoint=hub.url)
    callback = hub_push_callback(target, HubSettings("alice/hupd-lora", None, "every_save"), license="mit")
    assert isinstance(callback, HubPushCallback)
    assert hub_push_callback(target, HubSettings("alice/hupd-lora", None, "end")) is None
    args = TrainingArguments(output_dir=str(adapter_run), report_to="none")
    state = TrainerState()
    state.global_step = 2
    callback.on_save(args, state, TrainerControl())
    assert hub.commits[0].summary == "Training in progress, step 2"
    assert set(hub.commits[0].files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    }
    assert "Training in progress" in hub.commits[0].files["README.md"].decode()
    hub.tokens[WRITE].revoked = True
    caplog.set_level(logging.WARNING)
    callback.on_save(args, state, TrainerControl())  # a failed push never stops training
    assert "training goes on" in caplog.text and len(hub.commits) == 1


# --------------------------------------------------------------------------- the push script


@pytest.mark.slow  # runs hfplug in a subprocess: left out of the fast local subset
def test_push_run_script(hub, adapter_run):
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": READ,
        "HF_HOME": str(adapter_run.parent / "home"),
    }
    script = [sys.executable, str(REPO / "recipes" / "push_run.py"), str(adapter_run), "--hub_model_id"]
    out = run_command([*script, "alice/script", "--hub_private_repo"], env=env, timeout=120)
    assert out.returncode == 2, out.stdout  # a user error: "error: ...", status 2
    assert "error: " in out.stdout and "read-only" in out.stdout and "Traceback" not in out.stdout
    assert "alice/script" not in hub.repos

    out = run_command(
        [*script, "script", "--hub_private_repo", "--hub_license", "mit"], env={**env, "HF_TOKEN": WRITE}, timeout=120
    )
    assert out.returncode == 0, out.stdout
    assert hub.repos["alice/script"].private and len(hub.commits) == 1
    assert set(hub.commits[0].files) == EXPECTED_ADAPTER_FILES
    assert_no_token(out.stdout)


def load_push_recipe():
    spec = importlib.util.spec_from_file_location("push_run_recipe", REPO / "recipes" / "push_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "flag, new",
    [
        (["--private"], "--hub_private_repo"),
        (["--private=true"], "--hub_private_repo"),
        (["--base_model", "meta-llama/Llama-3.1-8B"], "--merge_base_model"),
        (["--license", "mit"], "--hub_license"),
    ],
)
def test_push_run_old_flag_names_say_the_new_name(flag, new, adapter_run):
    """push_adapter.py's --private/--base_model/--license are push_run.py's --hub_private_repo/--merge_base_model/
    --hub_license (the names finetune_hupd uses): the old name is a ConfigError naming the new one, before anything runs."""
    with pytest.raises(ConfigError) as info:
        load_push_recipe().main([str(adapter_run), "--hub_model_id", "alice/x", *flag])
    message = str(info.value)
    assert flag[0].split("=")[0] in message and new in message


@pytest.mark.slow  # runs hfplug in a subprocess: left out of the fast local subset
def test_push_run_old_flag_name_exits_2_with_the_new_name(adapter_run):
    out = run_command(
        [
            sys.executable,
            str(REPO / "recipes" / "push_run.py"),
            str(adapter_run),
            "--hub_model_id",
            "alice/x",
            "--private",
        ],
        timeout=120,
    )
    assert out.returncode == 2, out.stdout
    assert "error: " in out.stdout and "--hub_private_repo" in out.stdout and "Traceback" not in out.stdout
