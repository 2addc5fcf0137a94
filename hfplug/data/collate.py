"""Collators: pad each batch to its own longest example, never every example to ``max_length``."""

from __future__ import annotations

from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from hfplug.data.tasks import IGNORE_INDEX

# Tensor cores (and CPU kernels) are fastest on lengths that are a multiple of 8.
PAD_TO_MULTIPLE_OF = 8


def _check_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        raise ValueError("The tokenizer has no pad token; call hfplug.loading.ensure_pad_token(tokenizer) first.")


def padding_collator(tokenizer, *, pad_to_multiple_of: int | None = PAD_TO_MULTIPLE_OF) -> DataCollatorWithPadding:
    """Dynamic padding for classification batches (``input_ids``, ``attention_mask``, ``label``).

    transformers' ``DataCollatorWithPadding`` already does exactly this — pad to the
    longest sequence in the batch, rounded up to a multiple of 8, and rename
    ``label`` to ``labels`` — so hfplug configures it rather than rewriting it.
    The tokenizer must have a pad token (see ``hfplug.loading.ensure_pad_token``).
    """
    _check_pad_token(tokenizer)
    return DataCollatorWithPadding(
        tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt"
    )


def causal_lm_collator(tokenizer, *, pad_to_multiple_of: int | None = PAD_TO_MULTIPLE_OF) -> DataCollatorForSeq2Seq:
    """Dynamic padding for causal-LM batches whose ``labels`` were computed in ``datasets.map``.

    Pads ``input_ids`` with the pad token, ``attention_mask`` with 0 and ``labels`` with
    -100, on the tokenizer's padding side, to the longest example rounded up to a multiple
    of 8. transformers' ``DataCollatorForSeq2Seq`` does exactly that (without a ``model``
    it adds no decoder inputs). Unlike ``DataCollatorForLanguageModeling`` it never
    derives labels from ``input_ids``, so it cannot mask the eos token a model must
    learn to emit, whatever the pad token is.
    """
    _check_pad_token(tokenizer)
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding="longest",
        pad_to_multiple_of=pad_to_multiple_of,
        label_pad_token_id=IGNORE_INDEX,
        return_tensors="pt",
    )
