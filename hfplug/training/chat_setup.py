"""The chat format of the generative ``abstract`` task, with the tokenizer made ready for it.

Training fixes the template's date (:data:`TRAINING_DATE_STRING`), picks a pad token that
is no stop token (:func:`reply_end_ids`), and saves the template on the tokenizer with that
date as its default (:func:`template_with_default_date`), so ``recipes/chat.py`` prompts
exactly as training did.
"""

from __future__ import annotations

from hfplug.chat.format import ChatFormat  # the format training shares with chat; it imports nothing of hfplug
from hfplug.loading import ensure_pad_token

# Llama 3.1's release date, and the date Meta's own template falls back to. Fixed for training,
# so that the Llama 3 system block ("Today Date: ...") does not change the tokens every day.
TRAINING_DATE_STRING = "26 Jul 2024"


def training_chat_format(tokenizer, chat_template: str | None = None):
    """The chat format of a generative task's examples, with ``tokenizer`` made ready for it.

    - the format is ``ChatFormat.from_tokenizer(tokenizer, chat_template)`` with a fixed
      ``date_string``, so the same records encode to the same tokens on any day;
    - the pad token is neither eos nor the token that ends a reply (:func:`reply_end_ids`).
      The labels here are computed before padding, so padding cannot mask them; the distinct
      pad keeps the saved tokenizer safe for tools that derive labels from ``input_ids != pad``
      (``DataCollatorForLanguageModeling``), which would otherwise drop the stop token;
    - ``tokenizer.chat_template`` becomes this format, with the training date as its default:
      the tokenizer saved with the model (or adapter) then makes ``recipes/chat.py``
      prompt exactly as training did.
    """
    chat_format = ChatFormat.from_tokenizer(
        tokenizer, chat_template, template_kwargs={"date_string": TRAINING_DATE_STRING}
    )
    ensure_pad_token(tokenizer, avoid=reply_end_ids(chat_format))
    tokenizer.chat_template = template_with_default_date(chat_format.template, TRAINING_DATE_STRING)
    return chat_format


def reply_end_ids(chat_format) -> list[int]:
    """The tokens a model must learn to emit to end a reply: eos, and the stop tokens the format puts after a reply.

    ``<|eot_id|>`` for Llama 3, ``<|im_end|>`` for ChatML, eos for the plain format. A pad
    token must be none of these. Other stop tokens may pad (Qwen pads with ``<|endoftext|>``,
    which its ChatML replies never contain).
    """
    ids, mask = chat_format.encode_with_assistant_mask(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    stops = set(chat_format.stop_token_ids)
    ends = [token for token, m in zip(ids, mask) if m and token in stops]
    eos = chat_format.tokenizer.eos_token_id
    return list(dict.fromkeys(ends + ([eos] if eos is not None else [])))


def template_with_default_date(template: str, date_string: str) -> str:
    """``template`` with ``date_string`` as the value of its ``date_string`` variable unless one is passed.

    Templates without the variable come back unchanged; so does one that already has this default.
    """
    if "date_string" not in template:
        return template
    default = '{%- if date_string is not defined %}{%- set date_string = "' + date_string + '" %}{%- endif -%}\n'
    return template if template.startswith(default) else default + template
