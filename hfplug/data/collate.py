"""Collators: pad each batch to its own longest example, never every example to ``max_length``."""

from __future__ import annotations

from transformers import DataCollatorWithPadding

# Tensor cores (and CPU kernels) are fastest on lengths that are a multiple of 8.
PAD_TO_MULTIPLE_OF = 8


def padding_collator(tokenizer, *, pad_to_multiple_of: int | None = PAD_TO_MULTIPLE_OF) -> DataCollatorWithPadding:
    """Dynamic padding for classification batches (``input_ids``, ``attention_mask``, ``label``).

    transformers' ``DataCollatorWithPadding`` already does exactly this — pad to the
    longest sequence in the batch, rounded up to a multiple of 8, and rename
    ``label`` to ``labels`` — so hfplug configures it rather than rewriting it.
    The tokenizer must have a pad token (see ``hfplug.modeling.ensure_pad_token``).
    """
    if tokenizer.pad_token is None:
        raise ValueError("The tokenizer has no pad token; call hfplug.modeling.ensure_pad_token(tokenizer) first.")
    return DataCollatorWithPadding(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
