"""Generation for evaluation: replies to tokenized prompts, and a Trainer that scores them.

    records = generation_records(encoded["validation"], 64, tokenizer)   # prompts + reference replies
    trainer = GenerativeTrainer(..., generation=GenerationEval(chat_format, records, max_new_tokens=256))
    trainer.evaluate()  # eval_loss, eval_perplexity, eval_rouge1/2/L, eval_generated_samples

A record's prompt is its training example up to the reply (the claims cut exactly as in
training), and its reference is the reply the labels hold. Generation is greedy, in
batches of prompts of similar length (left-padded), and stops at the chat format's stop
tokens (``<|eot_id|>`` for Llama 3 even when the model's config names only
``<|end_of_text|>``) or strings. With several processes each generates whole batches of
one fixed plan and the replies are gathered, so every record counts once and the
scores do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import torch
from transformers import GenerationConfig

from hfplug.data.tasks import IGNORE_INDEX
from hfplug.training.metrics import perplexity, rouge_scores
from hfplug.training.trainer import SafeCheckpointTrainer

# generate() fills every setting left unset from the model's own generation_config: Llama
# Instruct's sampling temperature/top_p would only draw warnings, but a repetition penalty
# would change the text. These are the values at which each does nothing (top_k=50 is the
# library default, so greedy decoding does not warn about it).
GREEDY = dict(
    do_sample=False, num_beams=1, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0, no_repeat_ngram_size=0
)


@dataclass
class GenerationRecord:
    """One validation example to generate for."""

    index: int  # position in the (encoded) validation split
    prompt_ids: list[int]  # the example's tokens before the reply: system, user turn, generation prompt
    reference: str  # the reply the example trains towards


def generation_records(dataset, limit: int, tokenizer) -> list[GenerationRecord]:
    """The first ``limit`` examples of an encoded split (``input_ids`` + ``labels``) as records.

    The prompt ends where the labels start; the reference is the labelled tokens decoded
    without special tokens (so it is compared as the model would write it).
    """
    records = []
    for index, example in enumerate(islice(iter(dataset), limit)):
        labels = list(example["labels"])
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        reply = [label for label in labels[start:] if label != IGNORE_INDEX]
        records.append(
            GenerationRecord(
                index, list(example["input_ids"][:start]), tokenizer.decode(reply, skip_special_tokens=True).strip()
            )
        )
    return records


def plan_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts`` in batches of ``batch_size``, by length: little padding, and one fixed plan."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: ties keep their order
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate_batch(
    model, chat_format, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int
) -> list[str]:
    """Greedy replies to one batch of tokenized prompts, in order, as text.

    Prompts are left-padded (the replies then start at the same position); the model is put
    in eval mode for the call and back as it was after.
    """
    from hfplug.chat.format import visible_text

    stopping = chat_format.stopping_kwargs(getattr(model.generation_config, "eos_token_id", None))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=stopping["eos_token_id"],
        stop_strings=stopping.get("stop_strings"),
        use_cache=True,  # checkpointing turns the cache off for training, not here
        **GREEDY,
    )
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                tokenizer=stopping.get("tokenizer"),
            )
    finally:
        model.train(was_training)
    texts = chat_format.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [visible_text(text, chat_format.stop_strings, final=True)[0] for text in texts]


@dataclass
class GenerationEval:
    """What :class:`GenerativeTrainer` generates at each evaluation."""

    chat_format: object  # hfplug.chat_template.ChatFormat
    records: list[GenerationRecord]  # may be empty: loss and perplexity only
    max_new_tokens: int = 256


class GenerativeTrainer(SafeCheckpointTrainer):
    """A ``Trainer`` for causal-LM fine-tuning whose evaluation also reports perplexity and ROUGE.

    Every evaluation adds ``{prefix}_perplexity`` (``exp`` of the eval loss) and, when
    ``generation.records`` is not empty, generates a reply per record and adds
    ``{prefix}_rouge1``, ``_rouge2``, ``_rougeL`` (mean F1, ``hfplug.training.metrics.rouge_scores``)
    and ``{prefix}_generated_samples`` (how many replies were scored). The metrics are in the
    logs, in ``evaluate()``'s result, and usable as ``metric_for_best_model`` (e.g. ``rougeL``).
    """

    def __init__(self, *args, generation: GenerationEval, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation = generation

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        if self.generation.records:
            scores = self.generation_scores()
            output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in scores.items()})
        return output

    def generation_scores(self) -> dict[str, float]:
        """ROUGE of the replies to ``generation.records``: each process generates its share of the batches."""
        records = self.generation.records
        batches = plan_batches([r.prompt_ids for r in records], self.args.per_device_eval_batch_size)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        model = self.accelerator.unwrap_model(self.model)  # generate() is not routed through DDP
        pad_token_id = self.processing_class.pad_token_id
        replies = {}
        for batch in batches[rank::world]:  # the same batches for any number of processes
            texts = generate_batch(
                model,
                self.generation.chat_format,
                [records[i].prompt_ids for i in batch],
                max_new_tokens=self.generation.max_new_tokens,
                pad_token_id=pad_token_id,
            )
            replies.update(zip(batch, texts))
        if world > 1:
            from accelerate.utils import gather_object

            gathered = {}
            for part in gather_object([replies]):  # one dict per process
                gathered.update(part)
            replies = gathered
        order = sorted(replies)
        scores = rouge_scores([replies[i] for i in order], [records[i].reference for i in order])
        scores["generated_samples"] = len(order)
        return scores
