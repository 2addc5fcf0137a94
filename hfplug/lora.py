"""LoRA: the ``LoraConfig`` from ``ModelArguments``, target-module checks, task-head detection, parameter counts.

:func:`check_target_modules` fails before PEFT touches the model when a target matches
no module (PEFT itself complains only when *none* matches). :func:`detect_head_modules`
finds the classification head that trains in full and is saved with the adapter
(``modules_to_save``). :func:`hfplug.quantization.prepare_for_training` puts these together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

from hfplug.model_args import ALL_LINEAR, ModelArguments

if TYPE_CHECKING:  # imported lazily at run time: peft is heavy
    from peft import LoraConfig


def get_peft_config(args: ModelArguments, *, task_type, modules_to_save: list[str] | None = None) -> LoraConfig | None:
    """``LoraConfig`` from the arguments, or ``None`` when ``--lora`` is off.

    ``task_type``: a ``peft.TaskType`` or its name ("SEQ_CLS", "CAUSAL_LM", ...).
    ``modules_to_save``: modules trained in full and saved with the adapter (the task head).
    """
    if not args.lora:
        return None
    from peft import LoraConfig

    targets = args.lora_target_modules
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        # PEFT expands the shorthand only when it is given as a plain string.
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        bias="none",
        task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )


def infer_task_type(model: nn.Module) -> str:
    """PEFT task type from the model class name (``LlamaForSequenceClassification`` -> ``SEQ_CLS``)."""
    name = type(model).__name__
    for suffix, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def detect_head_modules(model: nn.Module) -> list[str]:
    """Names of the task-head modules that a classification model adds on top of its base model.

    These are the top-level children other than the base model that hold parameters:
    ``score`` for decoders, ``classifier`` for BERT, ``pre_classifier`` + ``classifier``
    for DistilBERT. A generation model's ``lm_head`` is *not* a head to train: it is
    pretrained and large, so causal LMs get ``[]``.
    """
    if infer_task_type(model) not in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        return []
    prefix = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children() if name != prefix and any(True for _ in child.parameters())]


def linear_module_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Sorted short names (``q_proj``, ``dense``, ...) of the model's linear layers, bitsandbytes ones included."""
    excluded = tuple(exclude)
    names = set()
    for full_name, module in model.named_modules():
        # bnb's Linear4bit / Linear8bitLt subclass nn.Linear, so quantized layers count too.
        if isinstance(module, nn.Linear) and not any(
            full_name == head or full_name.startswith(head + ".") for head in excluded
        ):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: nn.Module, targets: list[str], exclude: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` listing the model's linear layers if a target matches no module.

    Matching follows PEFT: a target matches a module whose full name equals it or ends
    with ``"." + target``. PEFT itself only complains when *no* target matches, so a
    typo next to a valid name would silently train less than asked.
    """
    if targets == [ALL_LINEAR]:
        if not linear_module_names(model, exclude):
            raise ValueError(f"{type(model).__name__} has no linear layers for lora_target_modules='all-linear'.")
        return
    module_names = [name for name, _ in model.named_modules() if name]
    missing = [
        target for target in targets if not any(name == target or name.endswith("." + target) for name in module_names)
    ]
    if missing:
        raise ValueError(
            f"lora_target_modules {missing} not found in {type(model).__name__}. "
            f"Its linear layers are: {', '.join(linear_module_names(model, exclude))} "
            f"(or use 'all-linear')."
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit weight counts as its unpacked size.

    PEFT's ``get_nb_trainable_parameters`` for a ``PeftModel``, transformers' ``num_parameters``
    for a plain model (both unpack 4-bit weights whatever their storage dtype).
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    if hasattr(model, "num_parameters"):
        return model.num_parameters(only_trainable=True), model.num_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
