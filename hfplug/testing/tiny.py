"""Tiny models and tokenizers built locally, for tests, the offline quickstart and smoke runs.

Nothing here downloads anything: tokenizers are trained with the `tokenizers`
library on text you pass in, models are randomly initialised from a config.
The shapes follow the real families (BERT for bert-for-patents, Llama for
Llama-3.1) so the same code paths run as with the real checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Llama 3 special tokens, in Llama 3's order. The base model has no pad token,
# which is exactly what the pad-token handling must cope with.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]


def build_bert_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 2000, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """A lower-cased WordPiece tokenizer (BERT's recipe) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def build_llama3_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 1000, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama 3's special tokens, BOS added, and no pad token (like Llama 3.1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        model_max_length=model_max_length,
    )


def tiny_bert_config(vocab_size: int, **overrides) -> BertConfig:
    """A 2-layer, 64-wide BERT: trains in seconds on a CPU."""
    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A 2-layer Llama with grouped-query attention, like Llama-3.1 in miniature."""
    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def build_tiny_bert(tokenizer, *, seed: int = 0, **overrides) -> BertModel:
    """A randomly initialised tiny ``BertModel`` matching ``tokenizer``'s vocabulary."""
    torch.manual_seed(seed)
    config = tiny_bert_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, **overrides)
    return BertModel(config)


def build_tiny_llama(tokenizer, *, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny ``LlamaForCausalLM`` matching ``tokenizer``'s vocabulary and special tokens."""
    torch.manual_seed(seed)
    config = tiny_llama_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    return LlamaForCausalLM(config)
