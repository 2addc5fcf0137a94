"""Chat with a causal LM: arguments, history, trimming, streamed generation, /commands, stats.

``recipes/chat.py`` is a thin script over this module::

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
import logging
import math
import os
import signal
import sys
import threading
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hfplug.chat_template import ChatFormat
from hfplug.quantization import ModelArguments

DEFAULT_CHAT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
GiB = 1024**3

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- arguments


@dataclass
class ChatModelArguments(ModelArguments):
    """``ModelArguments`` for chatting: ``--model`` is short for ``--model_name_or_path``."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model"],
            "help": f"Hub id or local directory of the model. Default: the --adapter's base model, else {DEFAULT_CHAT_MODEL}.",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora:
            raise ValueError(
                "--lora trains new adapters and chat does not train; load a trained one with --adapter DIR_OR_HUB_ID."
            )


@dataclass
class GenerationSettings:
    """How replies are generated. Every field is a flag, a YAML key and a ``/set`` key."""

    max_new_tokens: int = field(default=512, metadata={"help": "Longest reply, in tokens."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (> 0; used with do_sample)."})
    top_p: float = field(
        default=0.9, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1]."}
    )
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only; 0 = no limit."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens; 1 = off."})
    do_sample: bool = field(
        default=True, metadata={"help": "Sample (true) or pick the most likely token (false: greedy, reproducible)."}
    )

    def __post_init__(self) -> None:
        # Checked here, so flags, YAML and /set all get the same rules. inf and nan are refused:
        # "temperature=inf" parses as a float, and generate() would sample from nan probabilities.
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer (e.g. 512).")
        if not _is_finite(self.temperature) or not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be a finite number > 0 (e.g. 0.6); "
                             "for deterministic replies set do_sample=false.")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; 1 turns nucleus sampling off.")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0; 0 turns it off.")
        if not _is_finite(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0; 1 turns it off.")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``generate``; sampling knobs only when sampling (greedy ignores them)."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                      repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A real number (not a bool, not a string), neither inf nor nan."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ChatArguments:
    """What to chat with and how the session runs."""

    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter (a directory or Hub id) to load onto the model."})
    system: str | None = field(default=None, metadata={"help": "System prompt."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat format: llama3, chatml, plain, or a .jinja file. Default: the tokenizer's own template, "
                          "else one chosen from its special tokens."},
    )
    prompt: str | None = field(default=None, metadata={"help": "Answer this one user turn, print the reply and exit."})
    max_context: int | None = field(
        default=None,
        metadata={"help": "Tokens of history + reply to keep (older turns are dropped). Default: the model's limit. "
                          "Lower it to bound memory on a small GPU."},
    )
    stats: bool = field(default=False, metadata={"help": "Print load time, memory, time to first token and tokens/s."})

    def __post_init__(self) -> None:
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt is empty. Give the text of the user turn, or leave --prompt out to chat interactively.")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context={self.max_context} is too small; give a number of tokens such as 4096.")


# --------------------------------------------------------------------------- loading


def resolve_model_name(model_args: ChatModelArguments, adapter: str | None) -> str:
    """Fill in ``model_name_or_path``: the adapter's base when none was given, else the default chat model.

    An adapter whose base differs from an explicit ``--model`` is a ``ValueError`` naming the base.
    """
    from hfplug.loading import check_adapter_base

    if adapter:
        base = check_adapter_base(adapter, model_args.model_name_or_path)
        model_args.model_name_or_path = model_args.model_name_or_path or base
    model_args.model_name_or_path = model_args.model_name_or_path or DEFAULT_CHAT_MODEL
    return model_args.model_name_or_path


def load_chat_tokenizer(model_args: ModelArguments, adapter: str | None = None):
    """``tokenizer_name``'s tokenizer if given, else the one saved with the adapter (a local directory
    or a Hub repo) if it has one, else the model's.

    The adapter's own tokenizer carries the chat format it was trained with, training date
    included: with the base model's, an adapter trained on the base is prompted with today's
    date (or with no template at all) instead.
    """
    from hfplug.loading import load_tokenizer

    if adapter and not model_args.tokenizer_name:
        folder = adapter_tokenizer_dir(adapter)
        if folder:
            logger.info("Using the tokenizer saved with the adapter %s (the chat format it was trained with).", adapter)
            model_args = dataclasses.replace(model_args, tokenizer_name=folder)
    return load_tokenizer(model_args)


# The files a saved tokenizer may consist of (transformers 5 writes the template to chat_template.jinja).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "additional_chat_templates/*", "tokenizer.model",
                   "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt")


def adapter_tokenizer_dir(adapter: str) -> str | None:
    """The local folder holding the tokenizer saved with the adapter ``adapter``, or ``None`` if it has none.

    ``adapter`` is a directory or a Hub repo. A repo is asked for ``tokenizer_config.json`` with
    ``hf_hub_download`` (cached, so this works offline once the adapter has been downloaded);
    one without it is ``None``, and so is one that cannot be checked (offline and not cached),
    with a warning. A missing or gated repo is a ``ModelLoadError``.
    """
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, snapshot_download, try_to_load_from_cache
    from huggingface_hub import errors as hub_errors

    from hfplug.loading import explain_load_error, is_hub_id

    path = os.path.expanduser(adapter)
    if not is_hub_id(adapter):
        return path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else None
    try:
        hf_hub_download(adapter, "tokenizer_config.json")
        # The whole tokenizer, as a folder: AutoTokenizer given the repo id also asks for the repo's
        # config.json, which an adapter repo lacks, and offline that fails unless the Hub's "no such
        # file" answer happens to be cached.
        return snapshot_download(adapter, allow_patterns=list(TOKENIZER_FILES))
    except hub_errors.LocalEntryNotFoundError:  # offline (or no connection) and not in the cache
        if try_to_load_from_cache(adapter, "tokenizer_config.json") is not _CACHED_NO_EXIST:  # not known to be absent
            logger.warning("Could not check whether the adapter %s has its own tokenizer (offline and not cached); "
                           "using the base model's, whose chat format may differ from the one it was trained with.",
                           adapter)
        return None
    except hub_errors.EntryNotFoundError:  # the Hub says the repo has no such file
        return None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, hub_errors.OfflineModeIsEnabled) as err:
        raise explain_load_error(adapter, err) from err


def check_system_prompt(chat_format: ChatFormat, system: str | None) -> None:
    """Encode the system prompt with a first user turn now, so that a template that refuses system
    messages (Gemma-2's) is a ``ChatTemplateError`` (a ``ValueError``) with a hint when the prompt is
    given, before the model is loaded, and not a failed first reply."""
    if system:
        chat_format.encode([{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
                           add_generation_prompt=True)


def context_limit(model, tokenizer, max_context: int | None = None) -> int:
    """Tokens a chat may use (prompt + reply): the smallest of the model's, the tokenizer's and ``max_context``."""
    from hfplug.loading import model_max_positions

    limits = [n for n in (model_max_positions(model.config), getattr(tokenizer, "model_max_length", None), max_context)
              if isinstance(n, int) and 0 < n < 10**8]  # transformers uses ~1e30 for "no limit"
    return min(limits) if limits else 4096


def memory_in_use(device_type: str) -> str:
    """CUDA memory allocated on a GPU, the process's resident memory otherwise."""
    if device_type == "cuda":
        return f"{torch.cuda.memory_allocated() / GiB:.2f} GiB CUDA allocated"
    import psutil

    return f"{psutil.Process().memory_info().rss / GiB:.2f} GiB process RSS"


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
        return (f"[stats] {self.new_tokens} tokens in {self.total_s:.2f} s: first token after {self.first_token_s:.3f} s, "
                f"{self.tokens_per_s:.1f} tokens/s; prompt {self.prompt_tokens} tokens")


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
        text, stopped = visible_text(self.tokenizer.decode(self.token_ids, skip_special_tokens=True),
                                     self.stop_strings, final=final)
        self._done = stopped
        if len(text) > self._shown:
            self.on_text(text[self._shown:])
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

    def __init__(self, model, tokenizer, chat_format: ChatFormat, settings: GenerationSettings | None = None, *,
                 system: str | None = None, max_context: int | None = None, info: dict | None = None,
                 notify: Callable[[str], None] | None = None):
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
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stopping["eos_token_id"][0]

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
        record = {**self.info, "chat_template": self.format.name, "settings": dataclasses.asdict(self.settings),
                  "messages": self.messages}
        try:
            # "x" creates the file or fails if it exists, in one step (no check-then-write race).
            with path.open("w" if overwrite else "x", encoding="utf-8") as f:
                f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        except FileExistsError:
            if path.is_dir():
                raise ValueError(f"{str(path)!r} is a folder; give a file name, e.g. {path / 'chat.json'}.") from None
            raise ValueError(f"{str(path)!r} already exists. Use /save! {path} to replace it, or give another name.") from None
        except OSError as err:
            raise ValueError(
                f"Cannot write {str(path)!r}: {err.strerror}. Give a path in an existing, writable folder."
            ) from err
        return path

    def _check_room(self, max_new_tokens: int) -> None:
        if max_new_tokens >= self.context:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a context of "
                             f"{self.context} tokens; use a smaller max_new_tokens.")

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
            new_ids = output[0, len(ids):].tolist()
            reply_text, by_string = visible_text(self.tokenizer.decode(new_ids, skip_special_tokens=True),
                                                 self.format.stop_strings, final=True)
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
        return Reply(reply_text, len(ids), len(new_ids), stopped_by,
                     first_token_s=(streamer.first_token_at or ended) - started, total_s=ended - started,
                     trimmed_turns=trimmed)

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
                "or shorten the system prompt.")
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


# --------------------------------------------------------------------------- the loop

HELP = """Commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /system TEXT       set the system prompt (no TEXT: remove it)
  /set key=value     change a generation setting; /set alone shows them
  /save FILE         write the conversation and settings to FILE (JSON); an existing FILE is kept
  /save! FILE        the same, replacing FILE if it exists
  /exit              quit (Ctrl-D too)
Ctrl-C stops the reply being written (before it starts: drops the message).
Start a message with // to send a leading /."""
COMMANDS = ("/help", "/reset", "/system", "/set", "/save", "/save!", "/exit")


def handle_command(session: ChatSession, line: str, out: TextIO, err: TextIO) -> bool:
    """Run one /command; returns False for /exit. Bad input is reported on ``err`` and the session goes on."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    try:
        if name == "/exit":
            return False
        if name == "/help":
            print(HELP, file=out)
        elif name == "/reset":
            session.reset()
            print("[conversation cleared]", file=err)
        elif name == "/system":
            session.set_system(arg)
            print(f"[system prompt {'set' if arg else 'removed'}]", file=err)
        elif name == "/set":
            if not arg:
                print(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(session.settings).items()), file=out)
            else:
                print(f"[{session.set(arg)}]", file=err)
        elif name in ("/save", "/save!"):
            if not arg:
                raise ValueError(f"{name} needs a file name, e.g. {name} chat.json.")
            path = session.save(arg, overwrite=name == "/save!")
            print(f"[saved {len(session.messages)} messages to {path}]", file=err)
        else:
            raise ValueError(f"Unknown command {name!r}. Commands: {', '.join(COMMANDS)} (/help explains them).")
    except ValueError as error:
        print(f"error: {error}", file=err)
    return True


def _terminal_lines(stdin: TextIO, out: TextIO) -> Iterator[str]:
    """Lines typed at a terminal; Ctrl-C at the prompt clears the line, Ctrl-D ends."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            if stdin is sys.stdin and out is sys.stdout:
                line = input("\n>>> ")
            else:
                out.write("\n>>> ")
                out.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(Ctrl-C stops a reply; /exit or Ctrl-D quits)\n")
            continue
        yield line.rstrip("\n")


def _isatty(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def answer(session: ChatSession, text: str, *, out: TextIO, err: TextIO, stream: bool, show_stats: bool) -> Reply:
    """One turn: the reply is streamed to ``out`` (``stream``) or printed whole, then notes and stats on ``err``."""
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    reply = session.reply(text, on_text=write if stream else None)
    print("" if stream else reply.text, file=out, flush=True)
    if reply.stopped_by == "interrupted":
        print("[reply stopped]", file=err)
    elif reply.stopped_by == "max_new_tokens":
        print(f"[reply cut at max_new_tokens={session.settings.max_new_tokens}]", file=err)
    if show_stats:
        print(reply.stats_line(), file=err)
    return reply


def run_chat(session: ChatSession, *, prompt: str | None = None, stdin: TextIO | None = None,
             out: TextIO | None = None, err: TextIO | None = None, show_stats: bool = False) -> int:
    """The chat modes: ``prompt`` -> one turn; stdin not a terminal -> a turn per line; else interactive.

    Replies are streamed when ``out`` is a terminal. Lines starting with ``/`` are commands
    (piped or typed). Returns the exit status.
    """
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    stream = _isatty(out)
    if prompt is not None:
        answer(session, prompt, out=out, err=err, stream=stream, show_stats=show_stats)
        return 0
    interactive = _isatty(stdin)
    if interactive:
        print(f"Chatting with {session.info.get('model', 'the model')} ({session.format.name} format). "
              "/help lists commands; /exit or Ctrl-D quits.", file=out)
    for line in _terminal_lines(stdin, out) if interactive else (line.rstrip("\n") for line in stdin):
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not handle_command(session, line, out, err):
                break
            continue
        try:
            answer(session, line[1:] if line.startswith("//") else line, out=out, err=err, stream=stream,
                   show_stats=show_stats)
        except KeyboardInterrupt:  # Ctrl-C before generation took it over (e.g. while a long prompt was encoded)
            print("\n[stopped before the reply started; the message was not kept]", file=err)
        except ValueError as error:  # ContextError, ChatTemplateError (a template that refuses the chat), ...
            print(f"error: {error}", file=err)
        except torch.OutOfMemoryError:
            print("error: out of GPU memory for this reply; /reset the conversation or start with a smaller "
                  "--max_context. The message was not kept.", file=err)
    return 0
