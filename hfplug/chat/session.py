"""A chat session with a causal LM: history, trimming, streamed generation, settings, saving.

``recipes/chat.py`` is a thin script over this module and ``hfplug.chat.loop`` (the /commands
and the loop that reads lines)::

    session = ChatSession(model, tokenizer, ChatFormat.from_tokenizer(tokenizer), GenerationSettings())
    reply = session.reply("Summarize claim 1.", on_text=print_piece)   # streamed; history kept
    run_chat(session)                                                  # --prompt / piped stdin / interactive

Generation always stops where the chat format ends a turn (``<|eot_id|>`` for Llama 3
even when the model's config names only ``<|end_of_text|>``; ``"\\nUser:"`` in the plain
format), and Ctrl-C during a reply stops that reply, not the session; Ctrl-C before the reply
starts (a long prompt being encoded) drops that message and returns to the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hfplug.chat.arguments import GenerationSettings
from hfplug.chat.format import ChatFormat, check_system_prompt, visible_text
from hfplug.chat.model import context_limit

# --------------------------------------------------------------------------- generation


@dataclass
class Reply:
    """One generated reply and how it went."""

    text: str
    prompt_tokens: int
    new_tokens: int
    stopped_by: str  # "stop token", "stop string", "max_new_tokens" or "interrupted"
    # From the call to the first new token (encoding + prefill + one step). On a GPU, generate()
    # hands tokens to the streamer one step late, so this includes one decoding step more.
    first_token_s: float
    total_s: float
    trimmed_turns: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed after the first token (prefill is in ``first_token_s``)."""
        decode_s = self.total_s - self.first_token_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else float("nan")

    def stats_line(self) -> str:
        return (
            f"[stats] {self.new_tokens} tokens in {self.total_s:.2f} s: first token after {self.first_token_s:.3f} s, "
            f"{self.tokens_per_s:.1f} tokens/s; prompt {self.prompt_tokens} tokens"
        )


class _ReplyStreamer(BaseStreamer):
    """Records when tokens arrive and, with ``on_text``, passes on each newly visible piece of text."""

    def __init__(self, tokenizer, stop_strings, on_text: Callable[[str], None] | None):
        self.tokenizer, self.stop_strings, self.on_text = tokenizer, list(stop_strings), on_text
        self.token_ids: list[int] = []
        self.first_token_at: float | None = None
        self._prompt_seen = False
        self._shown = 0
        self._done = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids.extend(value.reshape(-1).tolist())
        if self.on_text is not None:
            self._show(final=False)

    def end(self) -> None:
        if self.on_text is not None:
            self._show(final=True)

    def _show(self, *, final: bool) -> None:
        if self._done:
            return
        text, stopped = visible_text(
            self.tokenizer.decode(self.token_ids, skip_special_tokens=True), self.stop_strings, final=final
        )
        self._done = stopped
        if len(text) > self._shown:
            self.on_text(text[self._shown :])
            self._shown = len(text)


class _Interrupted(StoppingCriteria):
    """Stops generation once the session's interrupt flag is set (by Ctrl-C)."""

    def __init__(self, session: ChatSession):
        self.session = session

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.session.interrupted, dtype=torch.bool, device=input_ids.device)


class ContextError(ValueError):
    """A message that does not fit the model's context even with the history dropped."""


class ChatSession:
    """A conversation with a model: system prompt, history, settings, generation and saving."""

    def __init__(
        self,
        model,
        tokenizer,
        chat_format: ChatFormat,
        settings: GenerationSettings | None = None,
        *,
        system: str | None = None,
        max_context: int | None = None,
        info: dict | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        self.model, self.tokenizer, self.format = model, tokenizer, chat_format
        self.settings = settings or GenerationSettings()
        self.system = system
        self.history: list[dict] = []
        self.context = context_limit(model, tokenizer, max_context)
        self.info = dict(info or {})  # what /save records about the model
        self.notify = notify or (lambda message: print(message, file=sys.stderr))
        self.interrupted = False
        self._check_room(self.settings.max_new_tokens)
        self._check_system(system)
        # Stop where the format ends a turn *and* where the model's own config says.
        self._stopping = chat_format.stopping_kwargs(getattr(model.generation_config, "eos_token_id", None))
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stopping["eos_token_id"][0]
        )

    # ------------------------------------------------------------------ state

    @property
    def messages(self) -> list[dict]:
        """System message (if any) + history: what the model sees."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reset(self) -> None:
        """Forget the history; the system prompt and settings stay."""
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        """Set (or, with no text, remove) the system prompt; a template that refuses it is a ``ValueError``."""
        self._check_system(text or None)
        self.system = text or None

    def _check_system(self, system: str | None) -> None:
        check_system_prompt(self.format, system)

    def set(self, assignment: str) -> str:
        """``/set key=value`` on the generation settings; returns what was set. Unknown keys are a ``ValueError``."""
        keys = [f.name for f in dataclasses.fields(GenerationSettings)]
        key, sep, value = (part.strip() for part in assignment.partition("="))
        if key not in keys:
            raise ValueError(f"Unknown setting {key!r}. Settable keys: {', '.join(keys)}.")
        if not sep or not value:
            raise ValueError(f"/set needs key=value, e.g. /set {key}={getattr(self.settings, key)}.")
        kind = typing.get_type_hints(GenerationSettings)[key]
        new = dataclasses.replace(self.settings, **{key: _parse_value(value, kind, key)})
        self._check_room(new.max_new_tokens)
        self.settings = new
        return f"{key}={getattr(new, key)}"

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the conversation, settings and model to ``path`` as JSON.

        An existing file is a ``ValueError`` unless ``overwrite`` (``/save!``): a typo in a
        file name should not silently replace an earlier conversation.
        """
        path = Path(path).expanduser()
        record = {
            **self.info,
            "chat_template": self.format.name,
            "settings": dataclasses.asdict(self.settings),
            "messages": self.messages,
        }
        try:
            # "x" creates the file or fails if it exists, in one step (no check-then-write race).
            with path.open("w" if overwrite else "x", encoding="utf-8") as f:
                f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        except FileExistsError:
            if path.is_dir():
                raise ValueError(f"{str(path)!r} is a folder; give a file name, e.g. {path / 'chat.json'}.") from None
            raise ValueError(
                f"{str(path)!r} already exists. Use /save! {path} to replace it, or give another name."
            ) from None
        except OSError as err:
            raise ValueError(
                f"Cannot write {str(path)!r}: {err.strerror}. Give a path in an existing, writable folder."
            ) from err
        return path

    def _check_room(self, max_new_tokens: int) -> None:
        if max_new_tokens >= self.context:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a context of "
                f"{self.context} tokens; use a smaller max_new_tokens."
            )

    # ------------------------------------------------------------------ replying

    def interrupt(self) -> None:
        """Stop the reply being generated (safe to call from a signal handler)."""
        self.interrupted = True

    def reply(self, text: str, *, on_text: Callable[[str], None] | None = None) -> Reply:
        """Add a user turn, generate the assistant's reply (streamed to ``on_text``), keep both in the history.

        If the turn does not fit, the template refuses it, generation fails or Ctrl-C
        (``KeyboardInterrupt``) comes before generation starts, the history is left as it was
        (turns dropped to make room included), so a retry starts clean.
        """
        if not text.strip():
            raise ValueError("The message is empty; type some text.")
        started = time.perf_counter()
        before = list(self.history)
        self.history.append({"role": "user", "content": text})
        try:
            ids, trimmed = self._fit_prompt()
            output, streamer = self._generate(ids, on_text)
            new_ids = output[0, len(ids) :].tolist()
            reply_text, by_string = visible_text(
                self.tokenizer.decode(new_ids, skip_special_tokens=True), self.format.stop_strings, final=True
            )
            self.history.append({"role": "assistant", "content": reply_text})
        except BaseException:
            self.history[:] = before
            raise
        if self.interrupted:
            stopped_by = "interrupted"
        elif new_ids and new_ids[-1] in self._stopping["eos_token_id"]:
            stopped_by = "stop token"
        else:
            stopped_by = "stop string" if by_string else "max_new_tokens"
        ended = time.perf_counter()
        return Reply(
            reply_text,
            len(ids),
            len(new_ids),
            stopped_by,
            first_token_s=(streamer.first_token_at or ended) - started,
            total_s=ended - started,
            trimmed_turns=trimmed,
        )

    def _fit_prompt(self) -> tuple[list[int], int]:
        """Prompt ids that leave ``max_new_tokens`` of room, dropping the oldest turns as needed."""
        budget = self.context - self.settings.max_new_tokens
        ids = self.format.encode(self.messages, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids, 0
        # Check the newest message on its own first, so that nothing is dropped in vain.
        system = [{"role": "system", "content": self.system}] if self.system else []
        alone = len(self.format.encode(system + self.history[-1:], add_generation_prompt=True))
        if alone > budget:
            raise ContextError(
                f"The message needs {alone} prompt tokens but only {budget} fit ({self.context} tokens of context "
                f"minus max_new_tokens={self.settings.max_new_tokens}). Shorten it, /set a smaller max_new_tokens, "
                "or shorten the system prompt."
            )
        dropped = 0
        while len(ids) > budget:
            self._drop_oldest_turn()
            dropped += 1
            ids = self.format.encode(self.messages, add_generation_prompt=True)
        self.notify(f"[history trimmed: dropped the oldest {dropped} turn(s) to fit {budget} prompt tokens]")
        return ids, dropped

    def _drop_oldest_turn(self) -> None:
        """Remove the first user message and the replies up to the next user message."""
        del self.history[0]
        while self.history and self.history[0]["role"] != "user":
            del self.history[0]

    def _generate(self, ids: list[int], on_text):
        streamer = _ReplyStreamer(self.tokenizer, self.format.stop_strings, on_text)
        input_ids = torch.tensor([ids], device=self.model.device)
        self.interrupted = False
        with torch.inference_mode(), self._ctrl_c_stops_reply():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Interrupted(self)]),
                pad_token_id=self._pad_id,
                **self._stopping,
                **self.settings.generate_kwargs(),
            )
        return output, streamer

    @contextmanager
    def _ctrl_c_stops_reply(self) -> Iterator[None]:
        """While generating, Ctrl-C sets the interrupt flag instead of raising ``KeyboardInterrupt``."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self.interrupt())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _parse_value(value: str, kind, key: str):
    """``/set`` text -> the setting's type (int, float or bool)."""
    try:
        if kind is bool:
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("true", "1", "yes", "on")
        return kind(value)
    except ValueError:
        expected = {bool: "true or false", int: "a whole number"}.get(kind, "a number")
        raise ValueError(f"/set {key}={value}: expected {expected}.") from None
