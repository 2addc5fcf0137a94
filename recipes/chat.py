"""Chat with a causal LM (Llama-3.1-8B-Instruct by default) from the terminal, e.g. on a Colab T4.

    python recipes/chat.py --quant 4bit                                   # interactive, streamed
    python recipes/chat.py --adapter OUTPUT_DIR --prompt "Write an abstract for: ..."   # one turn
    printf 'Hello\\nAnd then?\\n' | python recipes/chat.py --do_sample false   # one turn per line
    python recipes/chat.py --config my_chat.yaml --stats                  # flags override the YAML

The model's own chat template is used; a tokenizer without one (base Llama-3.1-8B)
gets a built-in format chosen from its special tokens (--chat_template overrides).
Replies always stop at the format's end-of-turn tokens. Interactive commands: /help.
Every field of ChatModelArguments, GenerationSettings and ChatArguments is a flag and
a YAML key; `--model` is short for `--model_name_or_path`.
"""

import gc

if __name__ == "__main__":  # run as a script: no full collections over the imports (3 s); run() resumes them
    gc.disable()

import logging
import sys
import time

from hfplug.chat.arguments import ChatArguments, ChatModelArguments, GenerationSettings
from hfplug.chat.format import ChatFormat, check_system_prompt
from hfplug.chat.loop import run_chat
from hfplug.chat.model import load_chat_tokenizer, memory_in_use, resolve_model_name
from hfplug.chat.session import ChatSession
from hfplug.cli import run
from hfplug.config import parse_args
from hfplug.loading import load_causal_lm


def main(argv=None) -> int:
    # --- Arguments ------------------------------------------------------------
    model_args, settings, chat_args = parse_args((ChatModelArguments, GenerationSettings, ChatArguments), argv)

    # --- Logging (stderr, so stdout carries only the replies) -------------------
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hfplug").setLevel(logging.INFO)

    # --- Tokenizer and chat format: cheap, so bad input fails before the model loads
    resolve_model_name(model_args, chat_args.adapter)
    tokenizer = load_chat_tokenizer(model_args, chat_args.adapter)
    chat_format = ChatFormat.from_tokenizer(tokenizer, chat_args.chat_template)
    check_system_prompt(chat_format, chat_args.system)  # Gemma-2's template refuses any system prompt

    # --- Model ----------------------------------------------------------------
    start = time.perf_counter()
    model = load_causal_lm(model_args, adapter=chat_args.adapter)
    load_s = time.perf_counter() - start
    if chat_args.stats:
        print(f"[stats] loaded in {load_s:.1f} s; memory {memory_in_use(model.device.type)}", file=sys.stderr)

    # --- Chat -----------------------------------------------------------------
    session = ChatSession(
        model,
        tokenizer,
        chat_format,
        settings,
        system=chat_args.system,
        max_context=chat_args.max_context,
        info={"model": model_args.model_name_or_path, "adapter": chat_args.adapter},
    )
    return run_chat(session, prompt=chat_args.prompt, show_stats=chat_args.stats)


if __name__ == "__main__":
    run(main)  # bad input or a model that cannot be loaded: one `error:` paragraph and exit status 2
