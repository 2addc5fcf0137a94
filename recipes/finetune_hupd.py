"""Fine-tune on HUPD (Harvard USPTO Patent Dataset) with ``transformers.Trainer``: a classifier, or an abstract writer.

With no flags, the default job (recipes/configs/hupd_bert_for_patents.yaml): bert-for-patents
on HUPD's January-2016 `sample`, with the dates of HUPD's README example (network, GPU):

    accelerate launch recipes/finetune_hupd.py

Offline quickstart (embedded sample, tiny model, CPU):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/finetune_hupd.py --config recipes/configs/quickstart.yaml

The real setup (network, GPU):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/finetune_hupd.py --config recipes/configs/hupd_bert_for_patents.yaml

Llama-3.1-8B-Instruct in 4-bit + LoRA on a T4, writing abstracts from claims:

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/finetune_hupd.py --config recipes/configs/hupd_llama31_8b_abstract_qlora_t4.yaml
    python recipes/chat.py --adapter outputs/hupd_llama31_8b_abstract_qlora --quant 4bit --do_sample false --prompt "$(cat prompt.txt)"

Tasks: ``--task decision`` (ACCEPTED vs REJECTED), ``--task ipc`` (main IPC subclass), or
``--task abstract``: causal-LM fine-tuning to write the abstract from the claims (the HUPD
paper's summarization task) through a chat format (``hfplug.chat_template``): the user
turn is ``hfplug.data.tasks.abstract_prompt`` ("Write the abstract of a patent application
from its claims.", a blank line, "Claims:" and the claims), the reply is the abstract and
only the reply (with its end-of-turn token) is in the loss. Claims are cut to fit
``max_length``; the abstract stays whole (records whose abstract alone does not fit, or
with an empty abstract or claims, are dropped and counted). Evaluation reports loss,
perplexity and ROUGE-1/2/L of abstracts generated for the first ``max_generate_samples``
validation records; ``log_samples`` of them go to the log and ``output_dir/samples.jsonl``
at each evaluation. The tokenizer is saved with the chat template used, so
``recipes/chat.py --adapter OUTPUT_DIR`` prompts exactly as training did.

Every field of ModelArguments, HupdArguments, RunArguments, HubArguments and
TrainingArguments is a flag and a YAML key; flags override the YAML. Rerunning the
same command resumes from the last checkpoint in ``output_dir``. With
``--push_to_hub --hub_model_id user/name`` the token and write access are checked
before anything is loaded, and the adapter (or model) is pushed with a model card.
"""

import logging
import signal
import sys
import time
from pathlib import Path

import datasets
import transformers
from transformers import TrainingArguments, set_seed

from hfplug.arguments import HupdArguments, RunArguments, check_training_args
from hfplug.callbacks import default_callbacks, sample_generation_callback
from hfplug.cli import run, set_download_hint
from hfplug.config import parse_args
from hfplug.data import load_hupd, padding_collator, prepare_task, tokenize_splits
from hfplug.data.hupd import HUB_REPO_ID
from hfplug.data.collate import causal_lm_collator
from hfplug.data.tasks import is_generative, tokenize_abstract_splits
from hfplug.generation import GenerationEval, GenerativeTrainer, generation_records
from hfplug.hub import HubArguments, hub_settings, take_hub_token
from hfplug.hub.auth import resolve_token
from hfplug.hub.preflight import check_model_access, preflight_push
from hfplug.hub.push import hub_push_callback, push_run
from hfplug.hub.redaction import install_token_redaction
from hfplug.metrics import compute_metrics_for
from hfplug.quantization import ModelArguments
from hfplug.loading import (check_causal_lm, check_max_length, load_causal_lm_for_training, load_classifier,
                             load_tokenizer, prepare_training_args, training_chat_format, warn_if_wont_fit)
from hfplug.resilience import (GracefulStopCallback, SafeCheckpointTrainer, check_launch_matches_machine,
                               check_resume_args, check_time_budget, clear_staging, find_resumable_checkpoint,
                               parse_duration, record_run_args, resume_command, save_reserve)

logger = logging.getLogger("hfplug.recipes.finetune_hupd")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "hupd_bert_for_patents.yaml"  # used when no --config is given


# Arguments that may change between a run and its resumption (paths of caches, evaluation size, ...).
RESUMABLE_CHANGES = ("hupd_cache_dir", "preprocessing_num_workers", "max_eval_samples", "max_generate_samples",
                     "log_samples", "max_new_tokens", "time_budget", "early_stopping_patience", "early_stopping_threshold")


def main(argv=None):
    started = time.monotonic()  # the time budget counts from here
    # --- Arguments ------------------------------------------------------------
    model_args, data_args, run_args, hub_args, training_args = parse_args(
        (ModelArguments, HupdArguments, RunArguments, HubArguments, TrainingArguments), argv,
        default_config=DEFAULT_CONFIG,
    )
    check_training_args(training_args)  # counts > 0, output_dir not a file, ...
    # Said only if a Hub file cannot be fetched (offline, nothing cached): the quickstart, and what to download.
    set_download_hint(model=model_args.model_name_or_path, dataset=(HUB_REPO_ID, data_args.hub_files_needed()))
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ValueError("streaming=True has no dataset length to derive epochs from; set --max_steps (e.g. 1000).")
    if data_args.group_by_length:
        training_args.train_sampling_strategy = "group_by_length"

    # --- Logging --------------------------------------------------------------
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()  # "passive": the libraries keep their own (warning)
    # hfplug says what it decided (labels, pad token, resume, dropped records) at INFO on the main process.
    ours = logging.INFO if training_args.should_log and training_args.log_level == "passive" else log_level
    for name in ("hfplug", logger.name):
        logging.getLogger(name).setLevel(ours)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("Process %d of %d, device %s", training_args.process_index, training_args.world_size, training_args.device)
    check_launch_matches_machine(training_args)  # e.g. 8 processes on 1 GPU

    # --- Hub: token, push and gated-model checks, before any data or model -----
    hub_token = take_hub_token(training_args)  # out of TrainingArguments, so no training_args.bin holds it
    install_token_redaction(hub_token)  # masks tokens in hfplug's, transformers' and huggingface_hub's logs
    hub = hub_settings(training_args)  # None without --push_to_hub; the Trainer's own push is switched off
    target = None
    if hub is not None:  # token, whoami, write access, repo creation: fails in seconds, not after training
        target = preflight_push(
            hub.repo_id, token=hub_token, private=hub.private, merge_adapter=hub_args.merge_adapter,
            base_model=hub_args.merge_base_model or model_args.model_name_or_path,
            output_dir=training_args.output_dir, prompt=training_args.world_size == 1,
        )
    token = target.token if target is not None else resolve_token(hub_token)  # None is fine for public models
    check_model_access(model_args.model_name_or_path, token)
    generative = is_generative(data_args.task)
    if generative:  # reads config.json only: a BERT is refused before any data is loaded
        check_causal_lm(model_args, token=token)

    deadline = None
    if run_args.time_budget is not None:  # Colab ends sessions at ~12 h: stop, with a checkpoint, before that
        budget = parse_duration(run_args.time_budget)
        check_time_budget(budget, pushing=hub is not None)
        deadline = started + budget

    # --- Resume ---------------------------------------------------------------
    # One run per output_dir; only a complete checkpoint made with the same model and data arguments is resumed.
    from hfplug.resilience import finished_run, follow_launcher, lock_output_dir
    follow_launcher()  # `kill <launcher pid>` reaches this process too: checkpoint, then stop (Linux)
    lock_output_dir(training_args.output_dir, main_process=training_args.process_index == 0)  # held until exit
    checkpoint = training_args.resume_from_checkpoint
    if training_args.do_train:
        if training_args.should_save:
            clear_staging(training_args.output_dir)  # what a killed save left behind
        if checkpoint is None:
            checkpoint = find_resumable_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            check_resume_args(training_args.output_dir, ignore=RESUMABLE_CHANGES, model=model_args, data=data_args)
            logger.warning("Resuming from %s (found in output_dir). Use a new output_dir to start over.", checkpoint)
        elif training_args.should_save:
            record_run_args(training_args.output_dir, model=model_args, data=data_args)

    set_seed(training_args.seed)

    # --- Data -----------------------------------------------------------------
    # The main process builds the Arrow cache; the others then read it.
    with training_args.main_process_first(desc="load HUPD"):
        splits = load_hupd(**data_args.load_hupd_kwargs(), token=token)
    task = prepare_task(splits, data_args.task, text_fields=data_args.sections)
    splits = _limit(task.splits, data_args)
    if generative:
        logger.info("Task %s: writing the abstract from %s", data_args.task, data_args.text_fields)
    else:
        logger.info("Task %s: %d labels (%s)", data_args.task, task.num_labels, ", ".join(task.label_names[:10]))

    # --- Tokenizer and model --------------------------------------------------
    prepare_training_args(training_args, model_args)
    if training_args.do_train:
        warn_if_wont_fit(model_args, training_args, task=data_args.task, max_length=data_args.max_length,
                         num_labels=task.num_labels, token=token)
    tokenizer = load_tokenizer(model_args, token=token)
    if generative:
        # Fixed date, pad token distinct from the stop tokens, tokenizer.chat_template = this format.
        chat_format = training_chat_format(tokenizer, data_args.chat_template)
        model = load_causal_lm_for_training(model_args, tokenizer, training_args, token=token)
    else:
        model = load_classifier(model_args, task.label_names, tokenizer, training_args, token=token)
    check_max_length(data_args.max_length, tokenizer, model.config)

    tokenize_kwargs = dict(
        text_fields=data_args.sections,
        max_length=data_args.max_length,
        add_length=training_args.train_sampling_strategy == "group_by_length",
        num_proc=data_args.preprocessing_num_workers,
    )
    with training_args.main_process_first(desc="tokenize"):
        if generative:
            encoded, too_long = tokenize_abstract_splits(splits, chat_format, **tokenize_kwargs)
            task.add_dropped(too_long)
        else:
            encoded = tokenize_splits(splits, tokenizer, **tokenize_kwargs)

    # --- Trainer --------------------------------------------------------------
    callbacks = default_callbacks(training_args, run_args)
    push_callback = hub_push_callback(target, hub, license=hub_args.hub_license, task=data_args.task,
                                      hupd_config=data_args.hupd_config)  # --hub_strategy every_save only
    if push_callback is not None:
        callbacks.append(push_callback)
    stop = GracefulStopCallback(deadline=deadline, reserve_s=save_reserve(pushing=hub is not None))
    callbacks.append(stop)  # SIGTERM/SIGINT/time budget: checkpoint at the step boundary, then stop
    trainer_class, extra = SafeCheckpointTrainer, {}  # checkpoints written aside, then renamed into place
    if generative:  # perplexity and ROUGE at each evaluation; sample abstracts in the log and samples.jsonl
        records = generation_records(encoded["validation"], max(run_args.max_generate_samples, run_args.log_samples),
                                     tokenizer) if training_args.do_eval else []
        trainer_class = GenerativeTrainer
        extra["generation"] = GenerationEval(chat_format, records[: run_args.max_generate_samples], run_args.max_new_tokens)
        sample_callback = sample_generation_callback(chat_format, records, run_args)
        if sample_callback is not None:
            callbacks.append(sample_callback)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=causal_lm_collator(tokenizer) if generative else padding_collator(tokenizer),
        compute_metrics=compute_metrics_for(data_args.task),  # None for abstract: GenerativeTrainer scores it
        callbacks=callbacks,
        **extra,
    )

    # --- Train ----------------------------------------------------------------
    finished = finished_run(trainer, checkpoint) if training_args.do_train else None  # a finished run trains nothing
    if finished is not None and finished.evaluated:
        training_args.do_eval = False  # eval_results.json is there; the push still runs
    if training_args.do_train and finished is None:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # model (or adapter) + tokenizer
        metrics = dict(result.metrics)
        if not data_args.streaming:
            metrics["train_samples"] = len(encoded["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if stop.stop_reason in ("SIGTERM", "SIGINT"):
            logger.warning("Stopped by %s at step %d; the checkpoint is saved. To resume, run the same command again: %s",
                           stop.stop_reason, trainer.state.global_step, resume_command())
            sys.exit(128 + signal.Signals[stop.stop_reason].value)
        if stop.stop_reason == "time_budget":
            logger.warning("Time budget reached at step %d; the checkpoint is saved (evaluation skipped). "
                           "To continue, run the same command again: %s", trainer.state.global_step, resume_command())

    # --- Evaluate -------------------------------------------------------------
    if training_args.do_eval and stop.stop_reason is None:
        metrics = trainer.evaluate()
        if not data_args.streaming:
            metrics["eval_samples"] = len(encoded["validation"])
            metrics["eval_dropped_records"] = task.dropped.get("validation", 0)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # --- Push -----------------------------------------------------------------
    if target is not None and training_args.should_save:
        push_run(training_args.output_dir, target.repo_id, token=target.token, private=hub.private,
                 merge_adapter=hub_args.merge_adapter, base_model=hub_args.merge_base_model or model_args.model_name_or_path,
                 license=hub_args.hub_license, task=data_args.task, hupd_config=data_args.hupd_config)
    return trainer


def _limit(splits, data_args):
    """Apply max_train_samples / max_eval_samples (first N records)."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    for name, limit in limits.items():
        if limit is not None and name in splits:
            split = splits[name]
            splits[name] = split.take(limit) if data_args.streaming else split.select(range(min(limit, len(split))))
    return splits


if __name__ == "__main__":
    run(main)  # bad input: one `error:` paragraph and exit status 2; a bug: the traceback
