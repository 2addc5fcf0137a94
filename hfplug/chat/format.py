"""One chat format for chatting and for training: the template, the stop tokens, the assistant mask.

Used by the chat session (``hfplug.chat.session``) and by training and evaluation on chats
(``hfplug.training.chat_setup.training_chat_format``, ``hfplug.training.generation``); it imports nothing of hfplug.

    fmt = ChatFormat.from_tokenizer(tokenizer)                  # the tokenizer's own template, or a fallback
    ids = fmt.encode(messages, add_generation_prompt=True)      # exactly one BOS
    model.generate(torch.tensor([ids]), **fmt.stopping_kwargs(model.generation_config.eos_token_id))
    ids, mask = fmt.encode_with_assistant_mask(messages)         # training: loss where mask == 1

A tokenizer without a chat template (base Llama-3.1-8B) gets a built-in template chosen
from its special tokens: Llama 3 header tokens -> ``llama3``; ``<|im_start|>`` -> ``chatml``;
otherwise ``plain`` (``System:``/``User:``/``Assistant:``), with a warning that says which.
``override`` (the recipes' ``--chat_template``) is a built-in name or a ``.jinja`` file.

Encoding renders and tokenizes in one step with ``add_special_tokens=False`` (rendering to
text and tokenizing again would add a second BOS), and encodes control tokens typed
inside messages as plain text (``sanitize_control_tokens=True``, transformers >= 5.20),
so a user cannot end a turn or open a fake assistant turn by typing ``<|eot_id|>``.

A template that refuses a conversation (Gemma-2's raises on any system message) is a
:class:`ChatTemplateError` (a ``ValueError``) that quotes the template's reason.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources

import jinja2

logger = logging.getLogger(__name__)

# Built-in formats and the special tokens each needs to mean anything.
BUILTIN_TEMPLATES = {
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "plain": (),
}
# Tokens that end a turn (or the text) in the formats people use; whichever the
# vocabulary has become stop tokens, next to the tokenizer's eos.
END_OF_TURN_TOKENS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
)
# A base model chatting in the plain format goes on to write the user's next turn.
PLAIN_STOP_STRINGS = ("\nUser:",)


class ChatTemplateError(ValueError):
    """The chat template refused to render a conversation (``raise_exception`` in it, or a Jinja error)."""


def builtin_template(name: str) -> str:
    """The Jinja source of the built-in template ``name`` (a ``hfplug/chat/templates/*.jinja`` file)."""
    return resources.files("hfplug.chat").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def _common_prefix_len(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class ChatFormat:
    """A chat template bound to a tokenizer, with the tokens and strings that end a reply.

    Build it with :meth:`from_tokenizer`. ``name`` is ``"tokenizer"`` (the tokenizer's own
    template), a built-in name, or the path of a ``.jinja`` file. ``template_kwargs`` are
    passed to the template (e.g. ``{"date_string": "26 Jul 2024"}`` for the Llama 3 date line).
    """

    tokenizer: object = field(repr=False)
    template: str = field(repr=False)
    name: str
    stop_token_ids: list[int]
    stop_strings: list[str] = field(default_factory=list)
    template_kwargs: dict = field(default_factory=dict)
    # Whether the tokenizer puts BOS in front on its own: then a template that omits BOS gets one.
    adds_bos: bool = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tokenizer(
        cls, tokenizer, override: str | None = None, *, template_kwargs: dict | None = None
    ) -> ChatFormat:
        """The tokenizer's own template, else a built-in one picked from its special tokens (with a warning).

        ``override``: a built-in name (``llama3``, ``chatml``, ``plain``) or a path to a
        ``.jinja`` file; it wins over the tokenizer's template. An unknown name, a missing
        file, or a built-in format whose special tokens the tokenizer lacks is a ``ValueError``.
        """
        _require_control_token_sanitizing(tokenizer)
        vocab = tokenizer.get_vocab()
        if override:
            template, name = _load_override(override, vocab)
        elif tokenizer.chat_template is not None:
            template, name = tokenizer.get_chat_template(), "tokenizer"
        else:
            name = detect_builtin(vocab)
            template = builtin_template(name)
            logger.warning(
                "The tokenizer has no chat template; using hfplug's built-in '%s' format (%s). "
                "Pass --chat_template NAME or FILE.jinja to choose another (built-in: %s).",
                name,
                _why(name),
                ", ".join(BUILTIN_TEMPLATES),
            )
        bos = tokenizer.bos_token_id
        fmt = cls(
            tokenizer=tokenizer,
            template=template,
            name=name,
            stop_token_ids=_stop_token_ids(tokenizer, vocab),
            stop_strings=list(PLAIN_STOP_STRINGS) if name == "plain" else [],
            template_kwargs=dict(template_kwargs or {}),
            adds_bos=bos is not None and tokenizer("a").input_ids[:1] == [bos],
        )
        fmt._check_renders()
        return fmt

    def _check_renders(self) -> None:
        """Encode a one-message chat now, so a broken template fails here and not mid-conversation."""
        try:
            self.encode([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        except Exception as err:  # jinja2 TemplateError, or raise_exception() inside the template
            cause = err.__cause__ if isinstance(err, ChatTemplateError) and err.__cause__ else err
            raise ValueError(
                f"Chat template {self.name!r} does not render a simple chat: {type(cause).__name__}: {cause}"
            ) from err

    # ------------------------------------------------------------------ rendering and encoding

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat as text (for reading and debugging; use :meth:`encode` to get token ids).

        Text only: typed control tokens look the same as real ones here. ``sanitize_control_tokens``
        needs ``tokenize=True``, so it is :meth:`encode` that keeps them plain text.
        """
        with self._template_errors(messages):
            return self._render(messages, add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **self.template_kwargs,
        )

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the chat with exactly one BOS (when the tokenizer has one).

        Control tokens typed in a message (or in ``template_kwargs``) are encoded as plain
        text, whichever template is used (the tokenizer's, a built-in or a ``.jinja`` file):
        only the tokens the template writes itself become special tokens.
        """
        with self._template_errors(messages):
            ids = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=True,
                **self.template_kwargs,
            )
        return self._one_bos(list(ids))

    @contextmanager
    def _template_errors(self, messages: list[dict]) -> Iterator[None]:
        """A template's own refusal (``raise_exception``) or Jinja error -> :class:`ChatTemplateError`."""
        try:
            yield
        except jinja2.TemplateError as err:
            raise ChatTemplateError(self._refusal_message(err, messages)) from err

    def _refusal_message(self, err: jinja2.TemplateError, messages: list[dict]) -> str:
        which = "The tokenizer's chat template" if self.name == "tokenizer" else f"The chat template {self.name!r}"
        reason = str(err) or type(err).__name__
        if self._system_message_is_refused(messages):  # Gemma-2: "System role not supported"
            hint = (
                "This model's format has no system prompt: leave out --system (in a chat, '/system' with no "
                "text removes it) and put the instructions in your message instead"
            )
        else:
            hint = "Change the conversation (/reset starts over)"
        return (
            f"{which} refused this conversation: {reason}. {hint}, or choose another format with "
            f"--chat_template ({', '.join(BUILTIN_TEMPLATES)} or a .jinja file)."
        )

    def _system_message_is_refused(self, messages: list[dict]) -> bool:
        """Whether the same chat renders without its system message (then that message is what the template refuses)."""
        if not messages or messages[0].get("role") != "system":
            return False
        try:
            self._render(messages[1:] or [{"role": "user", "content": "hi"}], add_generation_prompt=True)
        except jinja2.TemplateError:
            return False
        return True

    def _one_bos(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return ids
        start = 0
        while start + 1 < len(ids) and ids[start] == ids[start + 1] == bos:  # a template that doubled it
            start += 1
        ids = ids[start:]
        if self.adds_bos and ids[:1] != [bos]:  # a template that leaves BOS to the tokenizer
            ids = [bos] + ids
        return ids

    def encode_with_assistant_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """``(input_ids, mask)``: mask is 1 on each assistant reply's tokens, end-of-turn token included.

        Loss on exactly these tokens trains the replies and the stop, not the prompts. The tokens
        of reply ``i`` are those of ``messages[:i+1]`` past the generation prompt of ``messages[:i]``,
        so the template must render that generation prompt as a prefix of the chat with the reply,
        and earlier turns the same once later turns follow. A template that does not (Mistral-Nemo's
        with a system message: the system text moves into the last user turn, and is dropped once
        a reply follows it) is a ``ValueError``, not a mask that labels prompt tokens.
        """
        ids = self.encode(messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("The chat starts with an assistant message; put a user (or system) message first.")
            # Compared as text: at the token level the prompt's last characters may merge with the
            # reply's first ones, which is fine; a prompt whose *text* is not a prefix is not.
            prompt_text = self.render(messages[:i], add_generation_prompt=True)
            upto_text = self.render(messages[: i + 1])
            if not upto_text.startswith(prompt_text):
                at = _common_prefix_len(prompt_text, upto_text)
                raise ValueError(
                    f"Chat template {self.name!r} does not render the generation prompt before assistant message {i} "
                    f"as a prefix of the chat with that reply (they differ from character {at}: "
                    f"{prompt_text[at : at + 40]!r} vs {upto_text[at : at + 40]!r}), so the reply's tokens cannot be "
                    "told from the prompt's, and the model would be trained on a prompt it never sees when chatting. "
                    + ("Leave out the system message, or use " if messages[0]["role"] == "system" else "Use ")
                    + "a built-in template (--chat_template llama3|chatml|plain)."
                )
            prompt = self.encode(messages[:i], add_generation_prompt=True)
            upto = ids if i == len(messages) - 1 else self.encode(messages[: i + 1])
            if upto != ids[: len(upto)]:
                raise ValueError(
                    f"Chat template {self.name!r} renders earlier turns differently once later turns follow, so "
                    "assistant tokens cannot be located; use a built-in template (--chat_template llama3|chatml|plain)."
                )
            # Where the prompt and the reply part ways (normally at the end of the generation
            # prompt; earlier if the tokenizer merges the prompt's last characters with the reply's).
            start = _common_prefix_len(prompt, upto)
            mask[start : len(upto)] = [1] * (len(upto) - start)
        return ids, mask

    # ------------------------------------------------------------------ generation

    def stopping_kwargs(self, extra_eos=None) -> dict:
        """``generate()`` keyword arguments that end a reply where this format ends a turn.

        ``extra_eos``: more stop ids, e.g. the model's ``generation_config.eos_token_id``
        (an int, a list or None). Stop strings need ``tokenizer=`` in ``generate``; it is included.
        """
        extra = [] if extra_eos is None else [extra_eos] if isinstance(extra_eos, int) else list(extra_eos)
        kwargs = {"eos_token_id": list(dict.fromkeys(self.stop_token_ids + extra))}
        if self.stop_strings:
            kwargs.update(stop_strings=list(self.stop_strings), tokenizer=self.tokenizer)
        return kwargs


# ---------------------------------------------------------------------- checks and reply text


def check_system_prompt(chat_format: ChatFormat, system: str | None) -> None:
    """Encode the system prompt with a first user turn now, so that a template that refuses system
    messages (Gemma-2's) is a ``ChatTemplateError`` (a ``ValueError``) with a hint when the prompt is
    given, before the model is loaded, and not a failed first reply."""
    if system:
        chat_format.encode(
            [{"role": "system", "content": system}, {"role": "user", "content": "hi"}], add_generation_prompt=True
        )


def visible_text(text: str, stop_strings: Iterable[str], *, final: bool) -> tuple[str, bool]:
    """The part of a reply to show, and whether a stop string ended it.

    Cuts at the first stop string. While the reply is still coming (``final=False``) it
    also holds back what could still turn out to be one (``"\\nUs"``), a half-decoded
    character, and trailing whitespace, so streamed text never has to be taken back.
    """
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    if cuts:
        return text[: min(cuts)].strip(), True
    if not final:
        text = text.rstrip("\ufffd")
        for stop in stop_strings:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if stop.startswith(text[-k:]):
                    text = text[:-k]
                    break
    return text.strip(), False


# ---------------------------------------------------------------------- helpers


def _require_control_token_sanitizing(tokenizer) -> None:
    """Refuse a transformers too old for ``sanitize_control_tokens`` (added in 5.20).

    Older versions pass unknown keyword arguments on to the template, so the flag would be
    silently ignored and a typed ``<|eot_id|>`` would become a real end of turn.
    """
    if "sanitize_control_tokens" not in inspect.signature(tokenizer.apply_chat_template).parameters:
        import transformers

        raise ValueError(
            f"transformers {transformers.__version__} cannot keep control tokens typed in a message as plain text "
            "(apply_chat_template(sanitize_control_tokens=True) needs transformers >= 5.20). "
            "Upgrade it: pip install -U 'transformers>=5.20'."
        )


def detect_builtin(vocab) -> str:
    """The built-in format whose special tokens are all in ``vocab``; ``plain`` when none is."""
    for name, needed in BUILTIN_TEMPLATES.items():
        if all(token in vocab for token in needed):
            return name
    return "plain"


def _why(name: str) -> str:
    if name == "plain":
        return "no Llama 3 or ChatML special tokens in its vocabulary; generation also stops at '\\nUser:'"
    return "chosen from its special tokens " + ", ".join(BUILTIN_TEMPLATES[name])


def _load_override(override: str, vocab) -> tuple[str, str]:
    """(template source, name) for ``--chat_template``: a built-in name or a ``.jinja`` file."""
    if override in BUILTIN_TEMPLATES:
        missing = [token for token in BUILTIN_TEMPLATES[override] if token not in vocab]
        if missing:
            raise ValueError(
                f"--chat_template {override} needs the special tokens {', '.join(missing)}, which this tokenizer "
                f"does not have. Use a format it supports (detected: {detect_builtin(vocab)}) or 'plain'."
            )
        return builtin_template(override), override
    if override.endswith(".jinja") or os.sep in override:
        path = os.path.expanduser(override)
        if not os.path.isfile(path):
            raise ValueError(
                f"--chat_template {override!r}: no such file. Give an existing .jinja file or a built-in name."
            )
        with open(path, encoding="utf-8") as f:
            return f.read(), override
    raise ValueError(
        f"Unknown chat template {override!r}. Built-in templates: {', '.join(BUILTIN_TEMPLATES)}; "
        "or give the path of a .jinja file."
    )


def _stop_token_ids(tokenizer, vocab) -> list[int]:
    """eos plus every end-of-turn token the vocabulary has, without duplicates."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    return list(dict.fromkeys(ids))
