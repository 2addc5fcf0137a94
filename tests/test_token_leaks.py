"""Issue 10, "No token on any path": a canary token given the wrong way must never be printed.

The four leak paths, each with a short canary (masked only by shape, never registered in this
process) and a full-length one:

1. a token flag on the command line of the real recipe (``recipes/push_run.py``), including
   flags the parser does not know (whose error would echo every argument);
2. the same under ``accelerate launch``, whose simple launcher prints the child's whole argv
   when the child exits non-zero;
3. a failed push whose Hub error (here: a server echoing the Authorization header) would be
   printed, unmasked, as the cause above hfplug's ``PushError``;
4. log records holding a short token that was never registered with the redaction filter.
"""

import io
import logging
import sys
import traceback

import pytest
from conftest import REPO, run_command

# The loopback-Hub fixtures (no ambient token, client online to 127.0.0.1 only, a finished adapter run).
from hub_fixtures import adapter_run, adapter_template, no_ambient_token, online  # noqa: F401
from hub_server import HubServer, Token

from hfplug import launcher
from hfplug.hub import redaction
from hfplug.hub.errors import PushError
from hfplug.hub.preflight import preflight_push
from hfplug.hub.push import push_run, retry_command
from hfplug.hub.redaction import (
    TokenOnCommandLineError,
    exit_status_for,
    install_token_redaction,
    mask_tokens,
    refuse_token_flags,
)

SHORT = "hf_CanaryTok3n"  # shorter than any real token: masked by shape only
LONG = "hf_" + "CanaryLongToken0123456789abcdefghij"  # 37 characters, a real token's shape
CANARIES = (SHORT, LONG)
PUSH_SCRIPT = str(REPO / "recipes" / "push_run.py")
CPU_CONFIG = str(REPO / "accelerate_configs" / "cpu.yaml")
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _assert_no_canary(text):
    for canary in CANARIES:
        assert canary not in text, f"the canary token {canary[:5]}… leaked:\n{text[-3000:]}"


@pytest.fixture
def quiet_hub(tmp_path):
    """A loopback Hub that would accept the canaries; the recipes must never get as far as calling it."""
    with HubServer({SHORT: Token("alice"), LONG: Token("alice")}, lifetime=300) as server:
        yield (
            server,
            {
                "HF_ENDPOINT": server.url,
                "HF_HUB_OFFLINE": "0",
                "HF_HOME": str(tmp_path / "hf_home"),
                "HF_HUB_DISABLE_TELEMETRY": "1",
            },
        )


# --------------------------------------------------------------------------- the rules, in-process


def test_mask_tokens_masks_any_length_and_keeps_identifiers():
    for text in (SHORT, LONG, "hf_a1", "hf_" + "q" * 16, "hf_oauth_abcDEF123"):
        assert mask_tokens(f"x={text}&y") == "x=hf_***&y"
    assert mask_tokens(f"Authorization: Bearer {SHORT}.") == "Authorization: Bearer hf_***."
    assert mask_tokens(f"token%3D{LONG}") == "token%3Dhf_***"  # URL-encoded "=" before it
    assert mask_tokens(f"{LONG}_suffix") == "hf_***_suffix"
    ordinary = "--hf_token, hf_hub_download, HF_TOKEN, hf_xet, hf_transfer, hf_T5_model, self.hf_quantizer"
    assert mask_tokens(ordinary) == ordinary


@pytest.mark.parametrize(
    "argv, where",
    [
        (["run", "--hub_model_id", "a/b", "--hub_token", SHORT], "--hub_token"),
        (["run", f"--hub_token={LONG}"], "--hub_token"),
        (["run", "--hf_token", SHORT], "--hf_token"),
        (["run", "--token", LONG], "--token"),
        (["run", "--hub-token", "not-token-shaped-secret"], "--hub-token"),
        (["run", "--hub_tok", SHORT], "--hub_tok"),  # argparse would take the abbreviation
        (["run", "--hub_model_id", "a/b", SHORT], "argument 4"),
        (["run", f"--license={LONG}"], "the value of --license"),
        (["run", f"HF_TOKEN={SHORT}"], "argument 2"),
    ],
)
def test_refuse_token_flags(argv, where, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for name in launcher.SIMPLE_LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TokenOnCommandLineError) as info:
        refuse_token_flags(argv)
    message = str(info.value)
    assert info.value.where == where and isinstance(info.value, ValueError)
    assert "HF_TOKEN" in message and "hf auth login" in message and "Colab" in message
    _assert_no_canary(message + repr(info.value))
    assert "not-token-shaped-secret" not in message
    assert info.value.exit_status == 2
    # The refused value is registered: a later log line cannot show it, shaped like a token or not.
    value = argv[-1].split("=", 1)[-1]
    assert value not in redaction.redact(f"value {value}.")


def test_ordinary_command_lines_pass():
    refuse_token_flags(
        [
            "outputs/hf_run2",
            "--hub_model_id",
            "alice/hf_Model1",
            "--max_new_tokens",
            "64",
            "--output_dir=/content/drive/My Drive/hf_runs",
            "--hub_token",
            "",
            "--push_to_hub",
            "true",
        ]
    )


def test_exit_status_is_zero_only_for_a_refused_token_under_the_simple_launcher():
    # (how the simple launcher is told from torchrun: tests/test_launcher.py)
    simple = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    refused = TokenOnCommandLineError("m", "--hub_token")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in simple.items():
            mp.setenv(name, value)
        mp.delenv("TORCHELASTIC_RUN_ID", raising=False)
        assert exit_status_for(refused) == 0 and exit_status_for(ValueError("bad flag")) == 2
        mp.setenv("TORCHELASTIC_RUN_ID", "none")
        assert exit_status_for(refused) == 2


def test_retry_command_quotes_paths():
    command = retry_command("/content/drive/My Drive/runs/llama lora", "alice/hupd-lora", private=True)
    assert command == (
        "python recipes/push_run.py '/content/drive/My Drive/runs/llama lora' "
        "--hub_model_id alice/hupd-lora --hub_private_repo"
    )
    assert (
        retry_command("outputs/quick", "alice/x") == "python recipes/push_run.py outputs/quick --hub_model_id alice/x"
    )


# --------------------------------------------------------------------------- 1. the recipe's command line


@pytest.mark.slow  # runs hfplug in a subprocess: left out of the fast local subset
@pytest.mark.parametrize(
    "flags",
    [
        ["--hub_token", SHORT],
        [f"--hub_token={LONG}"],
        ["--hf_token", LONG],  # not a flag of the recipe: its "unknown argument" error would echo it
        ["--token", SHORT],
        ["--hub_private_repo", LONG],  # a token where another value belongs
    ],
    ids=["hub_token", "hub_token=", "hf_token", "token", "stray"],
)
def test_push_script_refuses_a_token_flag_without_echoing_it(flags, quiet_hub, adapter_run):
    server, env = quiet_hub
    out = run_command(
        [sys.executable, PUSH_SCRIPT, str(adapter_run), "--hub_model_id", "alice/leak", *flags], env=env, timeout=120
    )
    assert out.returncode == 2, out.stdout
    assert "error: " in out.stdout and "HF_TOKEN" in out.stdout and "hf auth login" in out.stdout
    assert "Traceback" not in out.stdout
    _assert_no_canary(out.stdout)
    assert not server.requests  # refused before any Hub call


@pytest.mark.slow  # runs hfplug in a subprocess: left out of the fast local subset
def test_push_script_user_errors_exit_2_without_traceback(quiet_hub, tmp_path):
    _, env = quiet_hub
    out = run_command(
        [sys.executable, PUSH_SCRIPT, str(tmp_path / "missing"), "--hub_model_id", "alice/x"],
        env={**env, "HF_TOKEN": SHORT},
        timeout=120,
    )
    assert out.returncode == 2, out.stdout
    assert "error: " in out.stdout and "is not a directory" in out.stdout
    assert "Traceback" not in out.stdout
    _assert_no_canary(out.stdout)


# --------------------------------------------------------------------------- 2. under accelerate launch


@pytest.mark.slow
def test_accelerate_simple_launcher_prints_the_argv_of_a_failing_script(tmp_path):
    """The leak exists: accelerate's simple launcher echoes a failing child's argv (this is what hfplug works around).

    If this fails, accelerate stopped printing the command: the status-0 exception in
    ``hfplug.hub.redaction.exit_status_for`` can then go.
    """
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(3)\n")
    out = run_command([*ACCELERATE, "--config_file", CPU_CONFIG, str(script), "--hub_token", SHORT], timeout=120)
    assert out.returncode != 0 and SHORT in out.stdout and "CalledProcessError" in out.stdout


@pytest.mark.slow
def test_accelerate_launch_with_a_token_flag_prints_no_token(quiet_hub, adapter_run):
    """Simple launcher (CPU, one process): the recipe refuses and exits 0, so the launcher prints nothing."""
    server, env = quiet_hub
    launch = [*ACCELERATE, "--config_file", CPU_CONFIG, PUSH_SCRIPT, str(adapter_run), "--hub_model_id", "alice/leak"]
    out = run_command([*launch, "--hub_token", LONG], env=env, timeout=180)
    _assert_no_canary(out.stdout)
    assert out.returncode == 0, out.stdout  # on purpose: see hfplug.hub.redaction.exit_status_for
    assert "error: " in out.stdout and "HF_TOKEN" in out.stdout and "status 0 on purpose" in out.stdout
    assert "CalledProcessError" not in out.stdout and "Traceback" not in out.stdout
    assert not server.requests


@pytest.mark.slow
def test_accelerate_torchrun_launch_with_a_token_flag_prints_no_token(quiet_hub, adapter_run):
    """torchrun-based launch (--multi_gpu; the script refuses before touching a device): non-zero, no token."""
    server, env = quiet_hub
    launch = [
        *ACCELERATE,
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        PUSH_SCRIPT,
        str(adapter_run),
        "--hub_model_id",
        "alice/leak",
    ]
    out = run_command([*launch, "--hf_token", SHORT], env=env, timeout=180)
    _assert_no_canary(out.stdout)
    assert out.returncode != 0, out.stdout
    assert "error: " in out.stdout and "push_run.py FAILED" in out.stdout
    assert not server.requests


# --------------------------------------------------------------------------- 3. chained Hub errors


@pytest.mark.parametrize("canary", CANARIES, ids=["short", "long"])
@pytest.mark.parametrize("failure", ["revoked", "commit_400"])
def test_failed_push_traceback_holds_no_token(canary, failure, online, adapter_run, monkeypatch, tmp_path):
    import huggingface_hub

    with HubServer({canary: Token("alice")}, echo_authorization=True) as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        target = preflight_push("alice/leak", token=canary, endpoint=server.url)
        if failure == "revoked":
            server.tokens[canary].revoked = True  # 401, "...Authorization: Bearer <token>"
        else:
            server.fail_commits = 400  # a plain Hub error whose text the PushError quotes
        with pytest.raises(PushError) as info:
            push_run(adapter_run, target.repo_id, token=canary, endpoint=server.url, license="mit")
    err = info.value
    # The server did echo the token into the client's exception: the leak this test guards against.
    assert canary in str(err.__context__)
    printed = "".join(traceback.format_exception(err))
    _assert_no_canary(printed + str(err) + repr(err))
    assert err.__cause__ is None and err.__suppress_context__
    assert "PushError" in printed and "push_run.py" in printed
    assert err.reason == ("invalid_token" if failure == "revoked" else "hub_error")


# --------------------------------------------------------------------------- 4. logs, unregistered short tokens


def test_log_filter_masks_unregistered_short_tokens():
    short = "hf_NeverRegistered7"  # used nowhere else, so no code path registered it
    assert short not in redaction.redactor()._secrets
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_token_redaction()
        log = logging.getLogger("hfplug.test_token_leaks")
        log.warning("header Bearer %s", short)
        logging.getLogger("huggingface_hub.utils").warning("token=%s&x=1", SHORT)
        try:
            raise RuntimeError(f"bad token {short}")
        except RuntimeError:
            log.exception("failed")
        log.warning("see hf_hub_download and --hf_token")
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert short not in text and SHORT not in text
    assert "Bearer hf_***" in text and "RuntimeError: bad token hf_***" in text
    assert "see hf_hub_download and --hf_token" in text
