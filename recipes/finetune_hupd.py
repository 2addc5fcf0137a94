"""Fine-tune on HUPD (Harvard USPTO Patent Dataset) with ``transformers.Trainer``: a classifier, or an abstract writer.

With no flags, the default job (recipes/configs/hupd_bert_for_patents.yaml): bert-for-patents
on HUPD's January-2016 `sample`, with the dates of HUPD's README example (network, GPU):

    accelerate launch recipes/finetune_hupd.py

Offline quickstart (embedded sample, tiny model, CPU; one process needs no launcher):

    python recipes/finetune_hupd.py --config recipes/configs/quickstart.yaml

The real setup (network, GPU):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/finetune_hupd.py --config recipes/configs/hupd_bert_for_patents.yaml

Llama-3.1-8B-Instruct in 4-bit + LoRA on a T4, writing abstracts from claims:

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/finetune_hupd.py --config recipes/configs/hupd_llama31_8b_abstract_qlora_t4.yaml
    python recipes/chat.py --adapter outputs/hupd_llama31_8b_abstract_qlora --quant 4bit --do_sample false --prompt "$(cat prompt.txt)"

Tasks: ``--task decision`` (ACCEPTED vs REJECTED), ``--task ipc`` (main IPC subclass), or
``--task abstract``: causal-LM fine-tuning to write the abstract from the claims (the HUPD
paper's summarization task) through a chat format (``hfplug.chat.format``): the user
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

import gc

if __name__ == "__main__":  # run as a script: no full collections over the imports (3 s); run() resumes them
    gc.disable()

import logging
import sys
import time
from pathlib import Path

from transformers import TrainingArguments, set_seed

from hfplug.arguments import HupdArguments, RunArguments, check_training_args
from hfplug.cli import run, set_download_hint, setup_logging
from hfplug.config import parse_args
from hfplug.data import load_hupd
from hfplug.data.hupd import HUB_REPO_ID
from hfplug.data.tasks import task_columns
from hfplug.hub import HubArguments, hub_settings, take_hub_token
from hfplug.hub.auth import resolve_token
from hfplug.hub.preflight import check_model_access, preflight_push
from hfplug.hub.push import hub_push_callback, push_run
from hfplug.hub.redaction import install_token_redaction
from hfplug.loading import check_max_length, load_tokenizer
from hfplug.model_args import ModelArguments
from hfplug.training.callbacks import default_callbacks
from hfplug.training.checkpoints import finished_run
from hfplug.training.memory_plan import plan_memory
from hfplug.training.model_setup import prepare_training_args
from hfplug.training.resilience import (
    GracefulStopCallback,
    check_launch_matches_machine,
    check_time_budget,
    parse_duration,
    prepare_resume,
    report_stop,
    save_reserve,
)
from hfplug.training.tasks import task_for

logger = logging.getLogger("hfplug.recipes.finetune_hupd")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "hupd_bert_for_patents.yaml"  # used when no --config is given


def main(argv=None):
    started = time.monotonic()  # the time budget counts from here
    # --- Arguments ------------------------------------------------------------
    model_args, data_args, run_args, hub_args, training_args = parse_args(
        (ModelArguments, HupdArguments, RunArguments, HubArguments, TrainingArguments),
        argv,
        default_config=DEFAULT_CONFIG,
    )
    check_training_args(training_args, data_args)  # counts > 0, output_dir not a file, ...
    # Said only if a Hub file cannot be fetched (offline, nothing cached): the quickstart, and what to download.
    set_download_hint(model=model_args.model_name_or_path, dataset=(HUB_REPO_ID, data_args.hub_files_needed()))
    task = task_for(data_args, run_args)  # what differs between a classifier and an abstract writer

    # --- Logging --------------------------------------------------------------
    setup_logging(training_args, logger.name)
    prepare_training_args(training_args, model_args, data_args)  # implied: optim, fp16, group_by_length, ...
    logger.info(
        "Process %d of %d, device %s", training_args.process_index, training_args.world_size, training_args.device
    )
    check_launch_matches_machine(training_args)  # e.g. 8 processes on 1 GPU

    # --- Hub: token, push and gated-model checks, before any data or model -----
    hub_token = take_hub_token(training_args)  # out of TrainingArguments, so no training_args.bin holds it
    install_token_redaction(hub_token)  # masks tokens in hfplug's, transformers' and huggingface_hub's logs
    hub = hub_settings(training_args)  # None without --push_to_hub; the Trainer's own push is switched off
    target = None
    if hub is not None:  # token, whoami, write access, repo creation: fails in seconds, not after training
        target = preflight_push(
            hub.repo_id,
            token=hub_token,
            private=hub.private,
            merge_adapter=hub_args.merge_adapter,
            base_model=hub_args.merge_base_model or model_args.model_name_or_path,
            output_dir=training_args.output_dir,
            prompt=training_args.world_size == 1,
        )
    token = target.token if target is not None else resolve_token(hub_token)  # None is fine for public models
    check_model_access(model_args.model_name_or_path, token)
    task.check_model(model_args, token=token)  # reads config.json only: a BERT cannot write abstracts
    deadline = None
    if run_args.time_budget is not None:  # Colab ends sessions at ~12 h: stop, with a checkpoint, before that
        budget = parse_duration(run_args.time_budget)
        check_time_budget(budget, pushing=hub is not None)
        deadline = started + budget

    # --- Resume: one run per output_dir; a complete checkpoint with the same model and data arguments
    checkpoint = prepare_resume(training_args, model=model_args, data=data_args)
    set_seed(training_args.seed)

    # --- Data (the main process builds the Arrow cache; the others then read it)
    columns = task_columns(data_args.task, data_args.text_fields)  # the cache keeps only what the task reads
    with training_args.main_process_first(desc="load HUPD"):
        splits = load_hupd(**data_args.load_hupd_kwargs(), columns=columns, token=token)
    data = task.prepare(splits)
    data.limit(data_args.max_train_samples, data_args.max_eval_samples)

    # --- Tokenizer and model --------------------------------------------------
    plan = plan_memory(  # from config.json: --long_context (auto on a GPU), a length that cannot fit
        model_args, training_args, task=task.name, max_length=data_args.max_length, num_labels=data.num_labels,
        token=token,
    )  # fmt: skip
    tokenizer = load_tokenizer(model_args, token=token)
    model = task.load_model(model_args, tokenizer, training_args, data, token=token, long_context=plan.long_context)
    check_max_length(data_args.max_length, tokenizer, model.config)
    with training_args.main_process_first(desc="tokenize"):
        encoded = task.tokenize(data, tokenizer, training_args)

    # --- Trainer --------------------------------------------------------------
    stop = GracefulStopCallback(deadline=deadline, reserve_s=save_reserve(pushing=hub is not None))
    callbacks = [*default_callbacks(training_args, run_args), stop]  # stop: SIGTERM/SIGINT/time budget -> checkpoint
    push_callback = hub_push_callback(
        target, hub, license=hub_args.hub_license, task=data_args.task, hupd_config=data_args.hupd_config
    )  # --hub_strategy every_save only
    callbacks += [push_callback] if push_callback is not None else []
    trainer = task.trainer(model, training_args, encoded, tokenizer, callbacks)

    # --- Train (a finished run trains nothing) -----------------------------------
    finished = finished_run(trainer, checkpoint) if training_args.do_train else None
    if training_args.do_train and finished is None:
        with plan.oom_hint():  # out of memory: one paragraph naming the planner and settings that fit
            result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # model (or adapter) + tokenizer
        metrics = {**result.metrics, **({} if data_args.streaming else {"train_samples": len(encoded["train"])})}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        status = report_stop(stop, trainer.state.global_step)  # SIGTERM/SIGINT: exit 128 + signal after the save
        if status is not None:
            sys.exit(status)

    # --- Evaluate (unless stopped early, or a finished run already did) -----------
    if training_args.do_eval and stop.stop_reason is None and not (finished and finished.evaluated):
        metrics = trainer.evaluate()
        if not data_args.streaming:
            metrics.update(
                eval_samples=len(encoded["validation"]), eval_dropped_records=data.dropped.get("validation", 0)
            )
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # --- Push -----------------------------------------------------------------
    if target is not None and training_args.should_save:
        push_run(
            training_args.output_dir,
            target.repo_id,
            token=target.token,
            private=hub.private,
            merge_adapter=hub_args.merge_adapter,
            base_model=hub_args.merge_base_model or model_args.model_name_or_path,
            license=hub_args.hub_license,
            task=data_args.task,
            hupd_config=data_args.hupd_config,
        )
    return trainer


if __name__ == "__main__":
    run(main)  # bad input: one `error:` paragraph and exit status 2; a bug: the traceback
