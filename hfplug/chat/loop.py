"""The chat loop: one ``--prompt``, a turn per piped line, or an interactive prompt; the /commands.

``run_chat(session)`` picks the mode; lines starting with ``/`` go to :func:`handle_command`
(``/help``, ``/reset``, ``/system``, ``/set``, ``/save``, ``/exit``), anything else is one turn
of the ``hfplug.chat.session.ChatSession`` (:func:`answer`), streamed when the output is a terminal.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from typing import TextIO

import torch

from hfplug.chat.session import ChatSession, Reply

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


def run_chat(
    session: ChatSession,
    *,
    prompt: str | None = None,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    show_stats: bool = False,
) -> int:
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
        print(
            f"Chatting with {session.info.get('model', 'the model')} ({session.format.name} format). "
            "/help lists commands; /exit or Ctrl-D quits.",
            file=out,
        )
    for line in _terminal_lines(stdin, out) if interactive else (line.rstrip("\n") for line in stdin):
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not handle_command(session, line, out, err):
                break
            continue
        try:
            answer(
                session,
                line[1:] if line.startswith("//") else line,
                out=out,
                err=err,
                stream=stream,
                show_stats=show_stats,
            )
        except KeyboardInterrupt:  # Ctrl-C before generation took it over (e.g. while a long prompt was encoded)
            print("\n[stopped before the reply started; the message was not kept]", file=err)
        except ValueError as error:  # ContextError, ChatTemplateError (a template that refuses the chat), ...
            print(f"error: {error}", file=err)
        except torch.OutOfMemoryError:
            print(
                "error: out of GPU memory for this reply; /reset the conversation or start with a smaller "
                "--max_context. The message was not kept.",
                file=err,
            )
    return 0
