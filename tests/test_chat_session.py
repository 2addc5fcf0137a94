"""Chat: stopping, streaming, Ctrl-C, history trimming, /commands, adapters, and recipes/chat.py end to end.

The model is a tiny Llama whose greedy output is scripted: attention and MLP outputs are
zeroed, so the last hidden state is the current token's embedding, and ``lm_head`` maps
each scripted token to its successor. After the Llama 3 generation prompt it writes
"Hello world<|eot_id|>" and then, if nothing stops it, "Hello world" again and again.
Its config names only <|end_of_text|> as eos, like older Llama 3 configs.
"""

import hashlib
import http.server
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_command
from test_chat_format import GEMMA2_TEMPLATE
from transformers import AutoTokenizer, LlamaForCausalLM

from hfplug.chat.arguments import ChatModelArguments, GenerationSettings
from hfplug.chat.format import ChatFormat, ChatTemplateError, visible_text
from hfplug.chat.loop import HELP, run_chat
from hfplug.chat.model import load_chat_tokenizer
from hfplug.chat.session import ChatSession, ContextError
from hfplug.config import ConfigError
from hfplug.loading import ModelLoadError, load_causal_lm
from hfplug.testing.tiny import build_llama3_tokenizer, build_tiny_llama
from hfplug.training.chat_setup import TRAINING_DATE_STRING, training_chat_format

TEXTS = ["Hello world. Sure.\n\nUser: a patent claim about a device\nUser: and a method\n\nAssistant: Sure."] * 50
GREEDY = ["--do_sample", "false", "--max_new_tokens", "12"]


def _unit(vector):
    return vector / vector.norm()


def script_model(model, chain: dict[int, int], strength: float = 10.0) -> None:
    """Make greedy decoding follow ``chain`` (token id -> next token id), whatever came before."""
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream keeps only the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        for source, target in chain.items():
            model.lm_head.weight[target] += strength * _unit(embeddings[source])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A scripted tiny Llama + Llama-3-style tokenizer, saved like a Hub checkpoint."""
    tok = build_llama3_tokenizer(TEXTS, vocab_size=400, model_max_length=256)
    ids = tok.convert_tokens_to_ids
    t = SimpleNamespace(
        tok=tok,
        hello=ids("Hello"),
        world=ids("Ġworld"),
        sure=ids("ĠSure"),
        nl=ids("Ċ"),
        user=ids("User"),
        colon=ids(":"),
        eot=ids("<|eot_id|>"),
        end=ids("<|end_of_text|>"),
    )
    fmt = ChatFormat.from_tokenizer(tok)
    t.llama3_prompt_end = fmt.encode([{"role": "user", "content": "hi"}], add_generation_prompt=True)[-1]
    assert ChatFormat.from_tokenizer(tok, "plain").encode([{"role": "user", "content": "hi"}], True)[-1] == t.colon
    # Llama 3 format: the generation prompt ends in "\n\n" (two "\n" tokens here).
    chain = {t.llama3_prompt_end: t.hello, t.hello: t.world, t.world: t.eot, t.eot: t.hello}
    assert None not in chain and len(chain) == 4, chain
    t.model = build_tiny_llama(tok, max_position_embeddings=256).eval()
    script_model(t.model, chain)
    # Plain format: "Assistant:" -> " Sure\nUser: Sure\nUser:..." (its own model: "\n" leads elsewhere here).
    plain_chain = {t.colon: t.sure, t.sure: t.nl, t.nl: t.user, t.user: t.colon}
    assert None not in plain_chain and len(plain_chain) == 4, plain_chain
    t.plain_model = build_tiny_llama(tok, max_position_embeddings=256).eval()
    script_model(t.plain_model, plain_chain)
    t.dir = tmp_path_factory.mktemp("scripted-llama")
    t.model.save_pretrained(t.dir)
    tok.save_pretrained(t.dir)
    return t


def session(tiny, *, template=None, model=None, **kwargs):
    settings = GenerationSettings(do_sample=False, max_new_tokens=kwargs.pop("max_new_tokens", 12))
    chat_format = ChatFormat.from_tokenizer(tiny.tok, template, template_kwargs={"date_string": "26 Jul 2024"})
    return ChatSession(
        model or tiny.model, tiny.tok, chat_format, settings, notify=kwargs.pop("notify", lambda m: None), **kwargs
    )


def load_recipe():
    spec = importlib.util.spec_from_file_location("chat_recipe", REPO / "recipes" / "chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- stopping


def test_stops_at_eot_although_config_eos_is_end_of_text(tiny):
    assert tiny.model.generation_config.eos_token_id == tiny.end  # only <|end_of_text|>
    s = session(tiny)
    reply = s.reply("hi")
    assert (reply.text, reply.new_tokens, reply.stopped_by) == ("Hello world", 3, "stop token")
    assert s.history[-1] == {"role": "assistant", "content": "Hello world"}
    # Without the format's stop tokens the same model runs on to max_new_tokens.
    prompt = torch.tensor([s.format.encode([{"role": "user", "content": "hi"}], add_generation_prompt=True)])
    bare = tiny.model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert bare.shape[1] - prompt.shape[1] == 12


def test_plain_format_stops_at_user_string(tiny):
    s = session(tiny, template="plain", model=tiny.plain_model)
    streamed = []
    reply = s.reply("hi", on_text=streamed.append)
    assert (reply.text, reply.stopped_by) == ("Sure", "stop string")
    assert "".join(streamed) == "Sure"  # "\nUser" never reaches the screen


def test_streamed_text_is_the_reply(tiny):
    streamed = []
    reply = session(tiny).reply("hi", on_text=streamed.append)
    assert "".join(streamed) == reply.text == "Hello world" and len(streamed) == 2
    assert 0 < reply.first_token_s <= reply.total_s and reply.prompt_tokens > 0


def test_visible_text_holds_back_possible_stop_strings():
    assert visible_text("Sure\nUs", ["\nUser:"], final=False) == ("Sure", False)
    assert visible_text("Sure\nUser: more", ["\nUser:"], final=False) == ("Sure", True)
    assert visible_text("caf\ufffd", [], final=False) == ("caf", False)
    assert visible_text(" Sure\nUs", ["\nUser:"], final=True) == ("Sure\nUs", False)


def test_ctrl_c_stops_the_reply_not_the_session(tiny):
    s = session(tiny)
    handler_before = signal.getsignal(signal.SIGINT)
    reply = s.reply("hi", on_text=lambda piece: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C at the first piece
    # generate() checks its stopping criteria before streaming a token, so one more token may come.
    assert reply.stopped_by == "interrupted" and reply.new_tokens < 3 and "Hello world".startswith(reply.text)
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert s.reply("again").text == "Hello world"  # the session goes on, history intact
    assert [m["content"] for m in s.history] == ["hi", reply.text, "again", "Hello world"]


def test_ctrl_c_while_the_prompt_is_encoded_returns_to_the_prompt(tiny, monkeypatch):
    """Ctrl-C while a long paste is tokenized (before generate() takes Ctrl-C over) drops that message only."""
    s = session(tiny)
    encode, calls = s.format.encode, []

    def interrupted_once(messages, add_generation_prompt=False):
        calls.append(messages[-1]["content"])
        if len(calls) == 1:
            raise KeyboardInterrupt  # what SIGINT raises in the main thread while the tokenizer runs
        return encode(messages, add_generation_prompt)

    monkeypatch.setattr(s.format, "encode", interrupted_once)
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(s, stdin=io.StringIO("a very long paste\nagain\n"), out=out, err=err) == 0
    assert "[stopped before the reply started; the message was not kept]" in err.getvalue()
    assert out.getvalue() == "Hello world\n"  # the session went on to the next line
    assert s.history == [{"role": "user", "content": "again"}, {"role": "assistant", "content": "Hello world"}]


def test_ctrl_c_while_trimming_restores_the_history(tiny, monkeypatch):
    encode = session(tiny).format.encode
    user = lambda i: {"role": "user", "content": f"turn {i}"}  # noqa: E731
    one_turn = len(encode([user(1)], add_generation_prompt=True))
    per_turn = len(encode([user(1), {"role": "assistant", "content": "Hello world"}, user(2)], True)) - one_turn
    s = session(tiny, max_context=one_turn + per_turn + 12)
    s.reply("turn 1"), s.reply("turn 2")
    before, calls = list(s.history), []

    def interrupted_after_a_drop(messages, add_generation_prompt=False):
        calls.append(len(messages))
        if len(calls) == 3:  # whole chat, newest message alone, then the chat after dropping turn 1
            raise KeyboardInterrupt
        return encode(messages, add_generation_prompt)

    monkeypatch.setattr(s.format, "encode", interrupted_after_a_drop)
    with pytest.raises(KeyboardInterrupt):
        s.reply("turn 3")
    assert s.history == before  # turn 1, dropped to make room for a message that was never sent, is back


def test_4bit_model_chats(tiny):
    model = load_causal_lm(ChatModelArguments(model_name_or_path=str(tiny.dir), quant="4bit"))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    s = ChatSession(
        model, tiny.tok, ChatFormat.from_tokenizer(tiny.tok), GenerationSettings(do_sample=False, max_new_tokens=12)
    )
    assert s.reply("hi").text == "Hello world"


# --------------------------------------------------------------------------- history and settings


def test_history_trimmed_oldest_turns_first(tiny):
    notices = []
    encode = session(tiny).format.encode
    user = lambda i: {"role": "user", "content": f"turn {i}"}  # noqa: E731
    answer = {"role": "assistant", "content": "Hello world"}
    one_turn = len(encode([user(1)], add_generation_prompt=True))
    per_turn = len(encode([user(1), answer, user(2)], add_generation_prompt=True)) - one_turn
    # Room for exactly two turns of prompt, plus max_new_tokens=12 for the reply.
    s = session(tiny, max_context=one_turn + per_turn + 12, notify=notices.append)
    for i in range(1, 5):
        assert s.reply(f"turn {i}").text == "Hello world"
    assert s.history == [user(3), answer, user(4), answer]
    assert (
        notices == [f"[history trimmed: dropped the oldest 1 turn(s) to fit {one_turn + per_turn} prompt tokens]"] * 2
    )


def test_message_too_long_is_refused_and_nothing_is_lost(tiny):
    s = session(tiny, max_context=120)
    s.reply("hi")
    before = list(s.history)
    with pytest.raises(ContextError, match=r"needs \d+ prompt tokens but only \d+ fit .*Shorten it"):
        s.reply("patent " * 200)
    assert s.history == before


def test_set_validates_keys_and_values(tiny):
    s = session(tiny)
    assert s.set("temperature=0.3") == "temperature=0.3" and s.settings.temperature == 0.3
    assert s.set(" do_sample = yes ") == "do_sample=True"
    with pytest.raises(
        ValueError,
        match=r"Unknown setting 'temprature'\. Settable keys: max_new_tokens, temperature, "
        r"top_p, top_k, repetition_penalty, do_sample",
    ):
        s.set("temprature=0.3")
    with pytest.raises(ValueError, match="expected a whole number"):
        s.set("top_k=many")
    with pytest.raises(ValueError, match=r"top_p=1\.5 must be in \(0, 1\]"):
        s.set("top_p=1.5")
    with pytest.raises(ValueError, match="leaves no room for the prompt"):
        s.set(f"max_new_tokens={s.context}")
    assert s.settings.top_p == 0.9  # a rejected /set changes nothing


@pytest.mark.parametrize(
    "assignment, says",
    [
        ("temperature=inf", r"temperature=inf must be a finite number > 0"),
        ("temperature=1e400", r"temperature=inf must be a finite number > 0"),  # overflows to inf
        ("temperature=nan", r"temperature=nan must be a finite number > 0"),
        ("temperature=-0.5", r"temperature=-0\.5 must be a finite number > 0"),
        ("temperature=0", r"temperature=0\.0 must be a finite number > 0.*set do_sample=false"),
        ("top_p=nan", r"top_p=nan must be in \(0, 1\]"),
        ("top_p=inf", r"top_p=inf must be in \(0, 1\]"),
        ("top_p=0", r"top_p=0\.0 must be in \(0, 1\]"),
        ("top_k=-1", r"top_k=-1 must be an integer >= 0"),
        ("top_k=2.5", r"/set top_k=2\.5: expected a whole number"),
        ("top_k=inf", r"/set top_k=inf: expected a whole number"),
        ("repetition_penalty=inf", r"repetition_penalty=inf must be a finite number > 0"),
    ],
)
def test_set_refuses_non_finite_and_out_of_range_values(tiny, assignment, says):
    s = session(tiny)
    before = s.settings
    with pytest.raises(ValueError, match=says):
        s.set(assignment)
    assert s.settings is before


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("temperature", -1.0),
        ("temperature", True),
        ("top_p", math.nan),
        ("top_p", 1.01),
        ("top_p", -math.inf),
        ("top_k", -3),
        ("top_k", 2.0),
        ("top_k", True),
        ("repetition_penalty", math.inf),
        ("max_new_tokens", 0),
    ],
)
def test_generation_settings_refuse_bad_values(field, value):
    """The dataclass itself checks, so flags and YAML get the same rules as /set."""
    with pytest.raises(ValueError, match=f"{field}="):
        GenerationSettings(**{field: value})
    assert GenerationSettings(temperature=1e-3, top_p=1, top_k=50, repetition_penalty=1.2).top_p == 1


def test_settings_flags_refuse_inf(tiny):
    with pytest.raises(ValueError, match="temperature=inf must be a finite number"):
        load_recipe().main(["--model", str(tiny.dir), "--temperature", "inf", "--prompt", "hi"])


def test_save_refuses_to_overwrite_unless_asked(tiny, tmp_path):
    s = session(tiny, info={"model": "scripted"})
    target = tmp_path / "chat.json"
    target.write_text("an earlier conversation")
    lines = ["hi", f"/save {target}", "/help", f"/save! {target}", f"/save {tmp_path}", "/save!"]
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(s, stdin=io.StringIO("\n".join(lines) + "\n"), out=out, err=err) == 0
    assert (
        f"error: '{target}' already exists. Use /save! {target} to replace it, or give another name." in err.getvalue()
    )
    assert "/save! FILE        the same, replacing FILE if it exists" in out.getvalue()
    assert f"[saved 2 messages to {target}]" in err.getvalue()  # only /save! wrote
    assert json.loads(target.read_text())["messages"][-1] == {"role": "assistant", "content": "Hello world"}
    assert f"error: '{tmp_path}' is a folder; give a file name, e.g. {tmp_path / 'chat.json'}." in err.getvalue()
    assert "error: /save! needs a file name, e.g. /save! chat.json." in err.getvalue()
    assert "/save! FILE" in HELP


def test_commands_and_save_through_the_loop(tiny, tmp_path):
    s = session(tiny, info={"model": "scripted"})
    lines = [
        "/help",
        "/system Be brief.",
        "hi",
        "/set nope=1",
        "/set max_new_tokens=8",
        "/frobnicate",
        f"/save {tmp_path / 'chat.json'}",
        "/reset",
        "//again",
        "/exit",
        "never sent",
    ]
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(s, stdin=io.StringIO("\n".join(lines) + "\n"), out=out, err=err) == 0
    assert "/save FILE" in out.getvalue()
    assert out.getvalue().endswith("Hello world\nHello world\n")
    assert "error: Unknown setting 'nope'. Settable keys: max_new_tokens" in err.getvalue()
    assert "error: Unknown command '/frobnicate'. Commands: /help, /reset" in err.getvalue()
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["model"] == "scripted" and saved["chat_template"] == "llama3"
    assert saved["settings"]["max_new_tokens"] == 8 and saved["settings"]["do_sample"] is False
    assert saved["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello world"},
    ]
    assert s.history == [{"role": "user", "content": "/again"}, {"role": "assistant", "content": "Hello world"}]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_interactive_mode_streams_and_prompts(tiny):
    s = session(tiny, info={"model": "scripted"})
    out, err = _Terminal(), io.StringIO()
    assert run_chat(s, stdin=_Terminal("hi\n/set max_new_tokens=2\nagain\n"), out=out, err=err, show_stats=True) == 0
    assert out.getvalue() == (
        "Chatting with scripted (llama3 format). /help lists commands; /exit or Ctrl-D quits.\n"
        "\n>>> Hello world\n\n>>> \n>>> Hello world\n\n>>> \n"
    )  # Ctrl-D (end of input) quits
    assert "[max_new_tokens=2]" in err.getvalue() and "[reply cut at max_new_tokens=2]" in err.getvalue()
    assert err.getvalue().count("[stats] ") == 2


# --------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def adapter_dir(tiny, tmp_path_factory):
    """A LoRA adapter on lm_head that makes <|eot_id|> follow "Hello": replies become "Hello"."""
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(tiny.dir)  # so the adapter records tiny.dir as its base
    model = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"]))
    with torch.no_grad():
        lora_a, lora_b = (
            model.base_model.model.lm_head.lora_A["default"],
            model.base_model.model.lm_head.lora_B["default"],
        )
        lora_a.weight.copy_(_unit(base.model.embed_tokens.weight[tiny.hello])[None])
        lora_b.weight.zero_()
        lora_b.weight[tiny.eot, 0], lora_b.weight[tiny.world, 0] = 30.0, -30.0
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path, save_embedding_layers=False)  # the adapter alone: lm_head is not trained here
    return path


def test_adapter_loads_onto_its_base(tiny, adapter_dir, capsys):
    # No --model: the adapter's base is used.
    assert load_recipe().main(["--adapter", str(adapter_dir), "--prompt", "hi", *GREEDY]) == 0
    assert capsys.readouterr().out == "Hello\n"


def test_adapter_on_another_base_names_the_base_it_needs(tiny, adapter_dir, tmp_path):
    other = tmp_path / "other"
    tiny.model.save_pretrained(other)
    tiny.tok.save_pretrained(other)
    with pytest.raises(
        ValueError, match=rf"trained on base model '{tiny.dir}', not '{other}'\. Pass --model {tiny.dir}"
    ):
        load_recipe().main(["--model", str(other), "--adapter", str(adapter_dir), "--prompt", "hi"])
    with pytest.raises(ModelLoadError, match="is not a LoRA adapter: no adapter_config.json"):
        load_recipe().main(["--adapter", str(other), "--prompt", "hi"])


def test_hub_adapter_id_resolves_its_base(tiny, adapter_dir, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    from hfplug.loading import check_adapter_base

    def fake_download(repo_id, filename, **kwargs):
        assert filename == "adapter_config.json"
        if repo_id == "someone/abstract-lora":
            return str(adapter_dir / filename)
        raise errors.LocalEntryNotFoundError("not in the cache and offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert check_adapter_base("someone/abstract-lora", None) == str(tiny.dir)
    with pytest.raises(ValueError, match=rf"Pass --model {tiny.dir}"):
        check_adapter_base("someone/abstract-lora", "meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(ModelLoadError, match="not in the local cache while HF_HUB_OFFLINE is set"):
        check_adapter_base("someone/uncached-lora", None)


def test_tokenizer_saved_with_the_adapter_is_preferred(tiny, adapter_dir, tmp_path):
    with_tok = tmp_path / "adapter-with-tokenizer"
    with_tok.mkdir()
    (with_tok / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny.dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(with_tok)
    args = ChatModelArguments(model_name_or_path=str(tiny.dir))
    assert load_chat_tokenizer(args, str(with_tok)).chat_template == tok.chat_template
    assert load_chat_tokenizer(args, str(adapter_dir)).chat_template is None


# --------------------------------------------------------------------------- templates that refuse a chat


@pytest.fixture
def gemma2_file(tmp_path):
    path = tmp_path / "gemma2.jinja"
    path.write_text(GEMMA2_TEMPLATE)  # Gemma-2's real template: raises on any system message
    return path


def test_template_refusing_the_system_prompt_fails_at_startup_with_a_hint(tiny, gemma2_file, monkeypatch):
    with pytest.raises(
        ChatTemplateError,
        match="refused this conversation: System role not supported. This model's "
        "format has no system prompt: leave out --system",
    ):
        session(tiny, template=str(gemma2_file), system="Be brief.")
    recipe = load_recipe()
    monkeypatch.setattr(recipe, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="System role not supported"):  # recipes/chat.py: `error: ...`, exit 2
        recipe.main(
            ["--model", str(tiny.dir), "--chat_template", str(gemma2_file), "--system", "Be brief.", "--prompt", "hi"]
        )


def test_template_error_mid_session_keeps_the_session_and_conversation(tiny, gemma2_file):
    s = session(tiny, template=str(gemma2_file), max_new_tokens=4)
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(s, stdin=io.StringIO("hi\n/system Be brief.\nagain\n"), out=out, err=err) == 0
    assert (
        f"error: The chat template '{gemma2_file}' refused this conversation: System role not supported."
        in err.getvalue()
    )
    assert "[system prompt set]" not in err.getvalue() and s.system is None
    assert [m["content"] for m in s.history if m["role"] == "user"] == ["hi", "again"]

    s.system = "Be brief."  # set behind the check's back (the API allows it): the reply fails, the session lives
    history = list(s.history)
    err = io.StringIO()
    assert run_chat(s, stdin=io.StringIO("more\n/system\nmore\n"), out=io.StringIO(), err=err) == 0
    assert err.getvalue().count("error: The chat template") == 1 and "[system prompt removed]" in err.getvalue()
    assert s.history[: len(history)] == history and [m["content"] for m in s.history[len(history) :]][0] == "more"
    assert len(s.history) == len(history) + 2


# --------------------------------------------------------------------------- Hub adapters: their own tokenizer


def _cache_repo(cache, repo_id: str, files, *, known_missing=()):
    """Put ``files`` in the HF cache as a download of ``repo_id`` at main would (refs/main -> snapshot), and
    record ``known_missing`` the way the client does after the Hub answered 404 (``.no_exist``)."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)
    for name in known_missing:
        (repo / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
        (repo / ".no_exist" / commit / name).touch()


@pytest.fixture
def hub_cache(tiny, adapter_dir, tmp_path, monkeypatch):
    """An offline HF cache with three adapter repos on tiny.dir: one saved with its training tokenizer, one
    that the Hub said has none, and one whose tokenizer was never looked up."""
    import huggingface_hub

    cache = tmp_path / "hub"
    adapter_files = [adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"]
    tokenizer = AutoTokenizer.from_pretrained(tiny.dir)
    training_chat_format(tokenizer)  # what a LoRA run saves: the format, with the training date as default
    saved = tmp_path / "saved-tokenizer"
    tokenizer.save_pretrained(saved)
    _cache_repo(cache, "someone/abstract-lora", adapter_files + sorted(saved.iterdir()))
    _cache_repo(cache, "someone/bare-lora", adapter_files, known_missing=["tokenizer_config.json"])
    _cache_repo(cache, "someone/unchecked-lora", adapter_files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return SimpleNamespace(cache=cache, tokenizer=tokenizer)


def test_hub_adapter_uses_the_tokenizer_saved_with_it(tiny, hub_cache, caplog):
    args = ChatModelArguments(model_name_or_path=str(tiny.dir))
    hi = [{"role": "user", "content": "hi"}]
    with caplog.at_level(logging.INFO, logger="hfplug"):
        tok = load_chat_tokenizer(args, "someone/abstract-lora")
    assert "Using the tokenizer saved with the adapter someone/abstract-lora" in caplog.text
    assert tok.chat_template == hub_cache.tokenizer.chat_template
    assert f"Today Date: {TRAINING_DATE_STRING}\n\n" in ChatFormat.from_tokenizer(tok).render(hi)
    # What it replaces: the base model's tokenizer has no template, so the built-in one dates the prompt today.
    base = ChatFormat.from_tokenizer(load_chat_tokenizer(args)).render(hi)
    assert f"Today Date: {time.strftime('%d %b %Y')}\n\n" in base


def test_hub_adapter_without_a_tokenizer_falls_back_to_the_base(tiny, hub_cache, caplog):
    args = ChatModelArguments(model_name_or_path=str(tiny.dir))
    with caplog.at_level(logging.WARNING, logger="hfplug"):
        assert load_chat_tokenizer(args, "someone/bare-lora").chat_template is None  # the base's
    assert caplog.text == ""  # the Hub said it has none: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="hfplug"):
        assert load_chat_tokenizer(args, "someone/unchecked-lora").chat_template is None
    assert "Could not check whether the adapter someone/unchecked-lora has its own tokenizer" in caplog.text


def test_hub_adapter_chats_end_to_end(tiny, hub_cache, capsys):
    assert load_recipe().main(["--adapter", "someone/abstract-lora", "--prompt", "hi", *GREEDY]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello\n"  # the adapter is on: "Hello" then <|eot_id|>


# --------------------------------------------------------------------------- the recipe: bad input


def test_bad_input_is_refused_before_loading(tiny):
    recipe = load_recipe()
    with pytest.raises(ConfigError, match="--prompt is empty"):
        recipe.main(["--model", str(tiny.dir), "--prompt", "  "])
    with pytest.raises(
        ValueError, match=r"Unknown chat template 'llama-3'\. Built-in templates: llama3, chatml, plain"
    ):
        recipe.main(["--model", str(tiny.dir), "--chat_template", "llama-3", "--prompt", "hi"])
    with pytest.raises(ConfigError, match="chat does not train"):
        recipe.main(["--model", str(tiny.dir), "--lora", "true"])


def test_config_file_and_model_alias(tiny, tmp_path, capsys):
    config = tmp_path / "chat.yaml"
    config.write_text(f"model_name_or_path: {tiny.dir}\ndo_sample: false\nmax_new_tokens: 12\nsystem: Be brief.\n")
    assert load_recipe().main(["--config", str(config), "--prompt", "hi", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello world\n"
    assert "[stats] loaded in" in captured.err and "process RSS" in captured.err
    assert "first token after" in captured.err and "tokens/s" in captured.err


# --------------------------------------------------------------------------- the recipe as a user runs it


def test_prompt_mode(tiny):
    result = run_command(
        [sys.executable, "recipes/chat.py", "--model", str(tiny.dir), "--prompt", "hi", *GREEDY], timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.endswith("Hello world\n")
    assert "using hfplug's built-in 'llama3' format" in result.stdout


def test_stdin_mode_one_turn_per_line(tiny):
    import subprocess

    out = subprocess.run(
        [sys.executable, "recipes/chat.py", "--model", str(tiny.dir), *GREEDY],
        input="hi\n\nagain\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "Hello world\nHello world\n"


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers like the Hub does for a gated repo the token has no access to."""

    def _gated(self):
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model someone/gated-model is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _gated

    def log_message(self, *args):
        pass


def test_gated_model_says_how_to_get_access(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = dict(
            HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
            HF_HUB_CACHE=str(tmp_path),
            HF_HUB_OFFLINE="0",
            HF_HUB_ETAG_TIMEOUT="5",
            HF_HUB_DOWNLOAD_TIMEOUT="5",
        )
        result = run_command(
            [sys.executable, "recipes/chat.py", "--model", "someone/gated-model", "--prompt", "hi"],
            env=env,
            timeout=300,
        )
    finally:
        server.shutdown()
    assert result.returncode == 2
    assert (
        "error: 'someone/gated-model' is a gated model and this token has no access. Request access" in result.stdout
    )
    assert "HF_TOKEN" in result.stdout
