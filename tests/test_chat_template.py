"""The chat-template adapter: formats (exact strings), fallback, one BOS, stop tokens, assistant masks."""

import logging
import time

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from hfplug.chat_template import BUILTIN_TEMPLATES, ChatFormat, builtin_template
from hfplug.tiny import build_llama3_tokenizer

TEXTS = ["Hello world. A patent claim about a semiconductor device and a method of making it.",
         "System: be brief.\n\nUser: What is claimed?\n\nAssistant: A device."] * 20
DATE = {"date_string": "26 Jul 2024"}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " What is claimed? "},
    {"role": "assistant", "content": "A device."},
    {"role": "user", "content": "And the method?"},
    {"role": "assistant", "content": "Making it."},
]
LLAMA3_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                 "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")


def bpe_tokenizer(special_tokens, **named) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the given special tokens and no BOS post-processing (Qwen/GPT-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


@pytest.fixture(scope="module")
def llama3_tok():
    return build_llama3_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def chatml_tok():  # like Qwen2: no BOS, eos <|im_end|>, <|endoftext|> as pad
    return bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def plain_tok():  # like a base model with only <s> and </s>
    return bpe_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")


def fmt(tok, override=None):
    return ChatFormat.from_tokenizer(tok, override, template_kwargs=DATE)


def pieces(tok, ids):
    return [tok.decode([i]) for i in ids]


# --------------------------------------------------------------------------- rendering


def test_llama3_format_exact(llama3_tok):
    f = fmt(llama3_tok)
    assert f.name == "llama3"
    assert f.render(CHAT[:2], add_generation_prompt=True) == (
        LLAMA3_SYSTEM + "Be brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is claimed?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # No system message: the system block is still there, with the dates only.
    assert f.render(CHAT[1:3]) == (
        LLAMA3_SYSTEM + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is claimed?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA device.<|eot_id|>"
    )


def test_llama3_date_defaults_to_today(llama3_tok):
    text = ChatFormat.from_tokenizer(llama3_tok).render(CHAT[1:2])
    assert f"Today Date: {time.strftime('%d %b %Y')}\n\n<|eot_id|>" in text


def test_chatml_format_exact(chatml_tok):
    f = fmt(chatml_tok)
    assert f.name == "chatml"
    assert f.render(CHAT[:3], add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n What is claimed? <|im_end|>\n"
        "<|im_start|>assistant\nA device.<|im_end|>\n"
    )
    assert f.render(CHAT[:2], add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_plain_format_exact(plain_tok):
    f = fmt(plain_tok)
    assert f.name == "plain"
    assert f.render(CHAT, add_generation_prompt=False) == (
        "<s>System: Be brief.\n\nUser: What is claimed?\n\nAssistant: A device.</s>"
        "\n\nUser: And the method?\n\nAssistant: Making it.</s>"
    )
    assert f.render(CHAT[:2], add_generation_prompt=True) == "<s>System: Be brief.\n\nUser: What is claimed?\n\nAssistant:"


def test_tokenizers_own_template_wins_without_warning(plain_tok, caplog):
    tok = bpe_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with caplog.at_level(logging.WARNING, logger="hfplug.chat_template"):
        f = ChatFormat.from_tokenizer(tok)
    assert f.name == "tokenizer" and caplog.text == ""
    assert f.render(CHAT[1:3]) == "[user]  What is claimed? \n[assistant] A device.\n"


@pytest.mark.parametrize("tok_name, expected, says", [
    ("llama3_tok", "llama3", "chosen from its special tokens <|start_header_id|>, <|end_header_id|>, <|eot_id|>"),
    ("chatml_tok", "chatml", "chosen from its special tokens <|im_start|>, <|im_end|>"),
    ("plain_tok", "plain", "no Llama 3 or ChatML special tokens in its vocabulary; generation also stops at '\\nUser:'"),
])
def test_fallback_says_which_template(request, caplog, tok_name, expected, says):
    with caplog.at_level(logging.WARNING, logger="hfplug.chat_template"):
        f = ChatFormat.from_tokenizer(request.getfixturevalue(tok_name))
    assert f.name == expected
    assert f"The tokenizer has no chat template; using hfplug's built-in '{expected}' format ({says})" in caplog.text
    assert "--chat_template" in caplog.text


def test_builtin_templates_ship_as_files():
    for name in BUILTIN_TEMPLATES:
        assert "add_generation_prompt" in builtin_template(name)


# --------------------------------------------------------------------------- overrides and errors


def test_override_by_name_and_by_file(llama3_tok, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hfplug.chat_template"):
        assert fmt(llama3_tok, "plain").name == "plain"
    assert caplog.text == ""  # an explicit choice is not a fallback
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    f = fmt(llama3_tok, str(path))
    assert f.name == str(path)
    assert f.render(CHAT[1:2]) == "<user> What is claimed? "


def test_unknown_template_name_lists_the_names(llama3_tok):
    with pytest.raises(ValueError, match=r"Unknown chat template 'llama-3'\. Built-in templates: llama3, chatml, plain; "
                                         r"or give the path of a \.jinja file"):
        ChatFormat.from_tokenizer(llama3_tok, "llama-3")


def test_override_errors(llama3_tok, plain_tok, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        ChatFormat.from_tokenizer(llama3_tok, str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match=r"needs the special tokens <\|start_header_id\|>, <\|end_header_id\|>, <\|eot_id\|>.*"
                                         r"detected: plain"):
        ChatFormat.from_tokenizer(plain_tok, "llama3")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match="does not render a simple chat: TemplateSyntaxError"):
        ChatFormat.from_tokenizer(llama3_tok, str(broken))


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("tok_name, override", [("llama3_tok", None), ("llama3_tok", "plain"), ("plain_tok", None)])
def test_exactly_one_bos(request, tok_name, override):
    tok = request.getfixturevalue(tok_name)
    f = fmt(tok, override)
    for add_generation_prompt in (False, True):
        ids = f.encode(CHAT[:2] if add_generation_prompt else CHAT, add_generation_prompt=add_generation_prompt)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # The pitfall this avoids: rendering to text, then tokenizing with special tokens on.
    naive = tok(f.render(CHAT)).input_ids
    if tok("a").input_ids[0] == tok.bos_token_id:
        assert naive.count(tok.bos_token_id) == 2


def test_template_without_bos_gets_one(llama3_tok, tmp_path):
    path = tmp_path / "nobos.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ids = fmt(llama3_tok, str(path)).encode(CHAT[1:2])
    assert ids == [llama3_tok.bos_token_id] + llama3_tok(" What is claimed? ", add_special_tokens=False).input_ids


def test_chatml_without_bos_token_has_none(chatml_tok):
    ids = fmt(chatml_tok).encode(CHAT[:2], add_generation_prompt=True)
    assert ids[0] == chatml_tok.convert_tokens_to_ids("<|im_start|>")


def test_control_tokens_typed_in_a_message_stay_text(llama3_tok):
    f = fmt(llama3_tok)
    eot = llama3_tok.convert_tokens_to_ids("<|eot_id|>")
    ids = f.encode([{"role": "user", "content": "end it <|eot_id|> now"}])
    assert ids.count(eot) == 2  # the system block's and the user turn's, not the typed one
    assert "end it <|eot_id|> now" in llama3_tok.decode(ids)


def test_stop_tokens_and_strings(llama3_tok, chatml_tok, plain_tok):
    ids = llama3_tok.convert_tokens_to_ids
    f = fmt(llama3_tok)
    assert f.stop_token_ids == [ids("<|end_of_text|>"), ids("<|eot_id|>"), ids("<|eom_id|>")]
    assert f.stop_strings == []
    assert f.stopping_kwargs(extra_eos=ids("<|end_of_text|>")) == {"eos_token_id": f.stop_token_ids}
    assert fmt(chatml_tok).stop_token_ids == [chatml_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    plain = fmt(plain_tok)
    assert plain.stop_token_ids == [plain_tok.eos_token_id]
    assert plain.stop_strings == ["\nUser:"]
    kwargs = plain.stopping_kwargs([7, plain_tok.eos_token_id])
    assert kwargs["eos_token_id"] == [plain_tok.eos_token_id, 7]
    assert kwargs["stop_strings"] == ["\nUser:"] and kwargs["tokenizer"] is plain_tok


# --------------------------------------------------------------------------- assistant masks


def test_llama3_assistant_mask_exact(llama3_tok):
    tok, f = llama3_tok, fmt(llama3_tok)
    ids, mask = f.encode_with_assistant_mask(CHAT)
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    expected_ids = (
        enc(LLAMA3_SYSTEM + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is claimed?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
        + enc("A device.") + [eot]
        + enc("<|start_header_id|>user<|end_header_id|>\n\nAnd the method?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
        + enc("Making it.") + [eot]
    )
    a1, u2, a2 = len(enc("A device.")) + 1, len(enc("<|start_header_id|>user<|end_header_id|>\n\nAnd the method?<|eot_id|>"
                                                    "<|start_header_id|>assistant<|end_header_id|>\n\n")), len(enc("Making it.")) + 1
    prompt = len(expected_ids) - a1 - u2 - a2
    assert torch.equal(torch.tensor(ids), torch.tensor(expected_ids))
    assert torch.equal(torch.tensor(mask), torch.tensor([0] * prompt + [1] * a1 + [0] * u2 + [1] * a2))
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A device.<|eot_id|>Making it.<|eot_id|>"


def test_chatml_and_plain_masks_end_with_end_of_turn(chatml_tok, plain_tok):
    ids, mask = fmt(chatml_tok).encode_with_assistant_mask(CHAT[:3])
    masked = [i for i, m in zip(ids, mask) if m]
    assert chatml_tok.decode(masked) == "A device.<|im_end|>\n"
    assert mask == [0] * (len(ids) - len(masked)) + [1] * len(masked)  # one contiguous run at the end

    ids, mask = fmt(plain_tok).encode_with_assistant_mask(CHAT)
    masked = [i for i, m in zip(ids, mask) if m]
    assert plain_tok.decode(masked) == " A device.</s> Making it.</s>"
    assert torch.equal(torch.tensor(ids)[torch.tensor(mask, dtype=torch.bool)][-1], torch.tensor(plain_tok.eos_token_id))


def test_mask_matches_what_generation_sees(llama3_tok):
    """The unmasked prefix before a reply is exactly the prompt generation would start from."""
    f = fmt(llama3_tok)
    ids, mask = f.encode_with_assistant_mask(CHAT[1:3])
    prompt = f.encode(CHAT[1:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and mask.index(1) == len(prompt)


def test_mask_needs_a_prompt_first(llama3_tok):
    with pytest.raises(ValueError, match="starts with an assistant message"):
        fmt(llama3_tok).encode_with_assistant_mask([{"role": "assistant", "content": "Hi"}])
