"""Chatting with a causal LM, and the chat format that training shares.

    hfplug.chat.format      ChatFormat: the template (own, or built-in llama3 / chatml / plain from
                            templates/*.jinja), one BOS, stop tokens, the assistant mask, reply text
    hfplug.chat.arguments   ChatModelArguments, GenerationSettings, ChatArguments (flags, YAML, /set)
    hfplug.chat.model       what to chat with: the adapter's base, the tokenizer saved with it, context
    hfplug.chat.session     ChatSession (history, trimming, streaming, Ctrl-C, /set, /save)
    hfplug.chat.loop        run_chat: --prompt, piped lines or interactive; the /commands

Nothing is re-exported here: ``hfplug.chat.format`` is used by training (``hfplug.training.chat_setup``,
``hfplug.training.generation``) and must not pull in the session (torch, the generation streamer).
"""
