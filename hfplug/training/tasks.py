"""One object per task for the recipe: everything that differs between a classifier and an abstract writer.

    task = task_for(data_args, run_args)          # ClassifierTask (decision, ipc) or AbstractTask
    task.check_model(model_args, token=token)     # before any data: a BERT cannot write abstracts
    data = task.prepare(splits)                   # the records the task keeps, labels
    model = task.load_model(model_args, tokenizer, training_args, data, token=token, long_context=plan.long_context)
    encoded = task.tokenize(data, tokenizer, training_args)
    trainer = task.trainer(model, training_args, encoded, tokenizer, callbacks)

The data-level rules (labels, sections, how an example is tokenized) are in
``hfplug.data.tasks``; this module adds the model, collator, Trainer class, metrics and
callbacks each task trains with, so the recipe reads top to bottom with no task branches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import TrainerCallback

from hfplug.data.collate import causal_lm_collator, padding_collator
from hfplug.data.tasks import TaskData, is_generative, prepare_task, tokenize_abstract_splits, tokenize_splits
from hfplug.training.callbacks import sample_generation_callback
from hfplug.training.chat_setup import training_chat_format
from hfplug.training.generation import GenerationEval, GenerativeTrainer, generation_records
from hfplug.training.metrics import compute_metrics_for
from hfplug.training.model_setup import check_causal_lm, load_causal_lm_for_training, load_classifier
from hfplug.training.trainer import SafeCheckpointTrainer

logger = logging.getLogger(__name__)


@dataclass
class ClassifierTask:
    """``decision`` (ACCEPTED vs REJECTED) or ``ipc`` (main IPC subclass): sequence classification."""

    data_args: object  # hfplug.arguments.HupdArguments
    run_args: object  # hfplug.arguments.RunArguments

    @property
    def name(self) -> str:
        return self.data_args.task

    def check_model(self, model_args, *, token=None) -> None:
        """Any model with a sequence-classification head will do: nothing to check before loading."""

    def prepare(self, splits) -> TaskData:
        data = prepare_task(splits, self.name, text_fields=self.data_args.text_fields)
        logger.info("Task %s: %d labels (%s)", self.name, data.num_labels, ", ".join(data.label_names[:10]))
        return data

    def load_model(self, model_args, tokenizer, training_args, data: TaskData, *, token=None, long_context=None):
        return load_classifier(
            model_args, data.label_names, tokenizer, training_args, token=token, long_context=long_context
        )

    def tokenize(self, data: TaskData, tokenizer, training_args):
        return tokenize_splits(data.splits, tokenizer, **_tokenize_kwargs(self.data_args, training_args))

    def trainer(self, model, training_args, encoded, tokenizer, callbacks: list[TrainerCallback]):
        return SafeCheckpointTrainer(
            model=model,
            args=training_args,
            processing_class=tokenizer,
            data_collator=padding_collator(tokenizer),
            compute_metrics=compute_metrics_for(self.name),
            callbacks=callbacks,
            **_datasets(encoded, training_args),
        )


@dataclass
class AbstractTask:
    """``abstract``: write the abstract from the claims, causal-LM fine-tuning through a chat format.

    Evaluation adds perplexity and ROUGE of abstracts generated for the first
    ``max_generate_samples`` validation records; ``log_samples`` of them are logged.
    """

    data_args: object
    run_args: object
    chat_format: object = None  # hfplug.chat.format.ChatFormat, set by load_model

    name = "abstract"

    def check_model(self, model_args, *, token=None) -> None:
        check_causal_lm(model_args, token=token)  # reads config.json only

    def prepare(self, splits) -> TaskData:
        logger.info("Task abstract: writing the abstract from %s", self.data_args.text_fields)
        return prepare_task(splits, self.name, text_fields=self.data_args.text_fields)

    def load_model(self, model_args, tokenizer, training_args, data: TaskData, *, token=None, long_context=None):
        # Fixed date, pad token distinct from the stop tokens, tokenizer.chat_template = this format.
        self.chat_format = training_chat_format(tokenizer, self.data_args.chat_template)
        return load_causal_lm_for_training(
            model_args, tokenizer, training_args, token=token, long_context=long_context
        )

    def tokenize(self, data: TaskData, tokenizer, training_args):
        encoded, too_long = tokenize_abstract_splits(
            data.splits, self.chat_format, **_tokenize_kwargs(self.data_args, training_args)
        )
        data.add_dropped(too_long)  # abstracts that do not fit max_length on their own
        return encoded

    def trainer(self, model, training_args, encoded, tokenizer, callbacks: list[TrainerCallback]):
        run = self.run_args
        wanted = max(run.max_generate_samples, run.log_samples) if training_args.do_eval else 0
        records = generation_records(encoded["validation"], wanted, tokenizer) if wanted else []
        samples = sample_generation_callback(self.chat_format, records, run)
        return GenerativeTrainer(
            model=model,
            args=training_args,
            processing_class=tokenizer,
            data_collator=causal_lm_collator(tokenizer),
            callbacks=[*callbacks, *([samples] if samples is not None else [])],
            generation=GenerationEval(self.chat_format, records[: run.max_generate_samples], run.max_new_tokens),
            **_datasets(encoded, training_args),
        )


def task_for(data_args, run_args) -> ClassifierTask | AbstractTask:
    """The task object for ``data_args.task``."""
    return (AbstractTask if is_generative(data_args.task) else ClassifierTask)(data_args, run_args)


def _tokenize_kwargs(data_args, training_args) -> dict:
    return dict(
        text_fields=data_args.text_fields,
        max_length=data_args.max_length,
        add_length=training_args.train_sampling_strategy == "group_by_length",
        num_proc=data_args.preprocessing_num_workers,
    )


def _datasets(encoded, training_args) -> dict:
    return dict(
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded["validation"] if training_args.do_eval else None,
    )
