"""hfplug.hub.auth: where the token comes from (argument, HF_TOKEN, Colab secret, cached login, prompt)."""

import io
import os
import subprocess
import sys
import types

import huggingface_hub
import pytest
from hub_fixtures import FG_NAMESPACE, FG_REPO, GATED_OK, READ, WRITE, no_ambient_token  # noqa: F401

from hfplug.hub import auth as hfauth
from hfplug.hub.auth import TokenError, resolve_token, resolve_token_with_source


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
    assert (found.value, found.source) == (WRITE, hfauth.SOURCE_ENV)
    assert WRITE not in repr(found) and WRITE not in str(found)
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_token_with_source().source == hfauth.SOURCE_COLAB
    _fake_colab(monkeypatch, {})  # the notebook has no HF_TOKEN secret
    found = resolve_token_with_source()
    assert (found.value, found.source) == (READ, hfauth.SOURCE_LOGIN)
    os.remove(login_file)
    assert resolve_token() is None and not prompts  # not required: no prompt
    found = resolve_token_with_source(required=True)
    assert (found.value, found.source) == (GATED_OK, hfauth.SOURCE_PROMPT) and len(prompts) == 1
    monkeypatch.setattr(sys, "stdin", _Stdin(tty=False))
    with pytest.raises(TokenError, match="HF_TOKEN.*hf auth login"):
        resolve_token(required=True)
    assert len(prompts) == 1  # never prompts without a terminal


def test_cached_login_from_hf_home(tmp_path):
    """A real `hf auth login` cache: $HF_HOME/token, read by huggingface_hub in a fresh process."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text(WRITE)
    code = (
        f"from hfplug.hub.auth import resolve_token_with_source as r\nt = r()\nprint(t.source, t.value == {WRITE!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "HF_HOME": str(home)}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{hfauth.SOURCE_LOGIN} True"
