"""The model a training run starts from: ``TrainingArguments`` adjusted to the model options, then the model.

:func:`prepare_training_args` applies what ``--quant``/``--dtype`` imply (non-reentrant
checkpointing, QLoRA's paged AdamW, mixed precision on a 16-bit GPU model);
:func:`load_classifier` and :func:`load_causal_lm_for_training` share one loading
path (a trained adapter directory loads for evaluation, anything else goes through
``hfplug.quantization.prepare_for_training``); :func:`check_causal_lm` refuses a model that
cannot write text before any data is loaded.
"""

from __future__ import annotations

import logging

from hfplug.loading import adapter_base_model, from_pretrained, model_load_kwargs
from hfplug.long_context.apply import LongContextPlan, apply_techniques
from hfplug.long_context.apply import load_kwargs as long_context_load_kwargs
from hfplug.quantization import default_optim, prepare_for_training, resolve_dtype

logger = logging.getLogger(__name__)
NO_TECHNIQUES = LongContextPlan()


def device_type_for(training_args) -> str:
    """The device the Trainer will use: ``cpu`` when ``use_cpu`` is set or no GPU is present."""
    return training_args.device.type


def optim_name(training_args) -> str:
    """``training_args.optim`` as its plain name (``TrainingArguments`` holds an ``OptimizerNames`` enum)."""
    return getattr(training_args.optim, "value", training_args.optim)


def prepare_training_args(training_args, model_args, data_args=None) -> None:
    """Settings the model and data options imply, applied before the Trainer is built (each change logged).

    - ``--group_by_length`` (a data option) batches similar lengths: ``train_sampling_strategy``;
    - checkpointing runs non-reentrant (needed for LoRA on a frozen or 4-bit base);
    - 4-bit runs default to the paged 8-bit AdamW of QLoRA when ``optim`` was left at its default;
    - a 16-bit model on a GPU trains under the matching mixed precision (fp16 on a T4).
    """
    from transformers import TrainingArguments
    from transformers.training_args import OptimizerNames

    if data_args is not None and data_args.group_by_length:
        training_args.train_sampling_strategy = "group_by_length"
    if training_args.activation_checkpointing and not training_args.activation_checkpointing_kwargs:
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}
    optim = default_optim(model_args)
    if optim and optim_name(training_args) == TrainingArguments.optim:
        logger.info(
            "--quant %s: using optim=%s (QLoRA's paged 8-bit AdamW); set --optim to choose another.",
            model_args.quant,
            optim,
        )
        training_args.optim = OptimizerNames(optim)
    device_type = device_type_for(training_args)
    dtype = resolve_dtype(model_args.dtype, device_type=device_type)
    if device_type == "cuda" and training_args.mixed_precision == "no":
        import torch

        if dtype in (torch.float16, torch.bfloat16):
            precision = "fp16" if dtype == torch.float16 else "bf16"
            logger.warning(
                "dtype %s on a GPU: enabling %s mixed precision (set --%s or mixed_precision in the accelerate config to be explicit).",
                dtype,
                precision,
                precision,
            )
            training_args.mixed_precision = precision
            setattr(training_args, precision, True)


def _load_for_trainer(
    auto_class, model_args, tokenizer, training_args, *, token: str | None, long_context=NO_TECHNIQUES, **config_kwargs
):
    """``auto_class`` from ``model_name_or_path`` with the model options, ready for the Trainer.

    Shared by :func:`load_classifier` and :func:`load_causal_lm_for_training`. A directory
    with a trained LoRA adapter loads its base model (quantized as asked) and the adapter on
    top, for evaluation; otherwise, for training, the model goes through
    ``hfplug.quantization.prepare_for_training`` (k-bit preparation, checkpointing, LoRA).
    ``long_context``: the techniques :func:`plan_memory` chose (``hfplug.long_context``).
    """
    long_context = long_context or NO_TECHNIQUES
    adapter = adapter_base_model(model_args.model_name_or_path)
    full_finetune = training_args.do_train and not model_args.lora
    model = from_pretrained(
        auto_class,
        adapter or model_args.model_name_or_path,
        token=token,
        **model_load_kwargs(model_args, device_type=device_type_for(training_args), full_finetune=full_finetune),
        **long_context_load_kwargs(long_context.techniques),
        **config_kwargs,
    )
    # Decoders find the last real token (classification) and pad batches (generation) through
    # pad_token_id; keep config, generation config and tokenizer in agreement.
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapter:
        from peft import PeftModel

        logger.info("Loading the LoRA adapter in %s onto its base model %s.", model_args.model_name_or_path, adapter)
        model = PeftModel.from_pretrained(model, model_args.model_name_or_path, is_trainable=False, token=token)
    elif training_args.do_train:
        model = prepare_for_training(
            model,
            model_args,
            activation_checkpointing=bool(training_args.activation_checkpointing),
            frozen_16bit="frozen_16bit" in long_context,
        )
    for line in apply_techniques(model, long_context):
        logger.info("--long_context %s", line)
    return model


def load_classifier(
    model_args, label_names, tokenizer, training_args, *, token: str | None = None, long_context=NO_TECHNIQUES
):
    """``AutoModelForSequenceClassification`` for ``label_names``, with hfplug's model options applied.

    Quantization (``--quant``), dtype (``--dtype``) and LoRA (``--lora``) come from
    ``hfplug.quantization``; for training, the model is prepared there (k-bit
    preparation, activation checkpointing, LoRA with the classification head trainable).
    ``model_name_or_path`` may also be a directory with a trained LoRA adapter: its base
    model is loaded (quantized as asked) and the adapter, with its head, put on top.
    """
    from transformers import AutoModelForSequenceClassification

    return _load_for_trainer(
        AutoModelForSequenceClassification,
        model_args,
        tokenizer,
        training_args,
        token=token,
        long_context=long_context,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )


def load_causal_lm_for_training(
    model_args, tokenizer, training_args, *, token: str | None = None, long_context=NO_TECHNIQUES
):
    """``AutoModelForCausalLM`` for a generative task (``--task abstract``), with hfplug's model options.

    As :func:`load_classifier`, without a task head: LoRA adapts every linear layer
    but the LM head (``all-linear``), and nothing goes to ``modules_to_save``. Check the
    model with :func:`check_causal_lm` first, before any data is loaded.
    """
    from transformers import AutoModelForCausalLM

    return _load_for_trainer(
        AutoModelForCausalLM, model_args, tokenizer, training_args, token=token, long_context=long_context
    )


# Class-name endings of models that generate text left to right (ForConditionalGeneration:
# multimodal decoders such as Gemma 3; encoder-decoders are refused on their config flag).
CAUSAL_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_causal_lm(model_args, *, token: str | None = None) -> None:
    """Refuse a model that cannot be fine-tuned to write text (BERT, T5), reading only its config.

    A config without ``architectures`` passes: nothing there says what the model is.
    """
    from transformers import AutoConfig

    name = adapter_base_model(model_args.model_name_or_path) or model_args.model_name_or_path
    config = from_pretrained(AutoConfig, name, trust_remote_code=model_args.trust_remote_code, token=token)
    architectures = list(getattr(config, "architectures", None) or [])
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder or (architectures and not any(a.endswith(CAUSAL_LM_ARCHITECTURES) for a in architectures)):
        what = "an encoder-decoder" if encoder_decoder else f"a {', '.join(architectures)} ({config.model_type})"
        raise ValueError(
            f"--task abstract writes text, so it needs a causal (decoder-only) language model such as "
            f"meta-llama/Llama-3.1-8B-Instruct; {name!r} is {what} model. Pass a causal LM with "
            "--model_name_or_path, or use --task decision or --task ipc with this model."
        )
