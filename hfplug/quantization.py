"""What the model options do: the dtype, bitsandbytes quantization, 4-bit storage, preparation for training.

``hfplug.model_args.ModelArguments`` (``--quant``, ``--dtype``, ``--lora``...) is parsed by ``HfArgumentParser``
next to ``TrainingArguments``; LoRA's own pieces are in :mod:`hfplug.lora`. The helpers here turn
it into what ``from_pretrained`` and PEFT want, and return ``None`` when a feature is off so
that a recipe reads straight down::

    dtype = resolve_dtype(model_args.dtype, device_type="cpu" if training_args.use_cpu else None)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        dtype=dtype,
        quantization_config=get_quantization_config(model_args),  # None: full precision
    )
    model = prepare_for_training(model, model_args, activation_checkpointing=training_args.activation_checkpointing)
    training_args.optim = default_optim(model_args) or training_args.optim

The checks here fail *before* anything large is loaded: bf16 on a GPU without it
(a T4), 4-bit where bitsandbytes cannot run, LoRA targets the model lacks, a
4-bit base with LoRA off, a 4-bit storage dtype FSDP cannot shard.

Under sharded training (FSDP or DeepSpeed ZeRO-3, e.g. ``accelerate launch --config_file
accelerate_configs/fsdp_qlora.yaml``) the same calls do what sharded QLoRA needs, detected
from the launcher's environment: the packed 4-bit weights are stored in the model's dtype
(``bnb_4bit_quant_storage``), and the model is not passed through
``prepare_model_for_kbit_training`` (see :func:`prepare_for_training`).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn

from hfplug.lora import check_target_modules, count_parameters, detect_head_modules, get_peft_config, infer_task_type
from hfplug.model_args import DTYPE_CHOICES, ModelArguments

if TYPE_CHECKING:  # imported lazily at run time: bitsandbytes is heavy
    from transformers import BitsAndBytesConfig

logger = logging.getLogger(__name__)

# Output and task heads bitsandbytes must leave in 16/32-bit (matched as a name, a
# "name." prefix or a suffix, so "classifier" also covers "pre_classifier" and RoBERTa's
# "classifier.dense"). transformers' own default misses a head with a bias (BERT's
# "classifier" gets quantized and then cannot train), and passing a list replaces that
# default, so the LM head is listed too.
SKIP_MODULES = ("lm_head", "score", "classifier", "qa_outputs")


# --------------------------------------------------------------------------- dtype


@dataclass(frozen=True)
class DeviceCapability:
    """What the accelerator the run will use can do, as far as dtypes go."""

    device_type: str  # "cuda", "cpu", "mps", "xpu", ...
    name: str  # e.g. "Tesla T4"; "cpu" on CPU
    supports_bf16: bool


def device_capability(device_type: str | None = None) -> DeviceCapability:
    """Query the device the run will use (CUDA if present, else CPU, unless ``device_type`` says).

    Every hardware query in this module goes through this function, so tests fake a T4
    or an A100 by monkeypatching it.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device_type='cuda' was requested but torch sees no CUDA GPU.")
        # including_emulation=False: emulated bf16 on pre-Ampere GPUs runs but is slow and
        # is not what "supports bf16" should mean for picking a training dtype.
        return DeviceCapability(
            "cuda", torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(including_emulation=False)
        )
    if device_type == "cpu":
        return DeviceCapability("cpu", "cpu", True)  # bf16 works on CPU; whether it is fast depends on the CPU
    # mps / xpu / npu: trust torch's autocast support check.
    return DeviceCapability(device_type, device_type, torch.amp.autocast_mode.is_autocast_available(device_type))


def resolve_dtype(dtype: str, *, device_type: str | None = None) -> torch.dtype:
    """Turn ``--dtype`` into a ``torch.dtype`` for the device the run will use.

    ``auto``: bfloat16 on GPUs that support it, float16 on GPUs without it (T4, sm_75),
    float32 on CPU. ``bfloat16`` on a GPU without it raises ``ValueError`` (before any
    weights are loaded) naming the GPU and the fix. ``float16`` on CPU is allowed (it
    halves the memory of a model loaded only for evaluation) but warns: CPU kernels run
    fp16 slowly and the Trainer's ``--fp16`` mixed precision needs a GPU.
    """
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}.")
    cap = device_capability(device_type)
    if dtype == "auto":
        if cap.device_type == "cpu":
            return torch.float32
        return torch.bfloat16 if cap.supports_bf16 else torch.float16
    if dtype == "bfloat16" and cap.device_type != "cpu" and not cap.supports_bf16:
        raise ValueError(
            f"--dtype bfloat16 was requested but the {cap.device_type} device '{cap.name}' does not support bf16 "
            "(a T4 or V100 has no bf16 units). Use --dtype float16 (or --dtype auto), and --fp16 instead of --bf16."
        )
    if dtype == "float16" and cap.device_type == "cpu":
        message = (
            "--dtype float16 on CPU: CPU kernels run float16 slowly and the Trainer's --fp16 mixed precision needs "
            "a GPU. Use --dtype float32 (or auto) to train on CPU; float16 only saves memory here."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)
    return getattr(torch, dtype)


# --------------------------------------------------------------------------- quantization


def check_bitsandbytes(device_type: str | None = None) -> None:
    """Raise ``RuntimeError`` saying what to do unless bitsandbytes imports and quantizes on this device."""
    cap_device = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    fix = "or run with --quant none"
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise RuntimeError(
            f"--quant needs bitsandbytes, which cannot be imported ({err}). "
            f"Install it with `pip install -U bitsandbytes`, {fix}."
        ) from err
    supported = getattr(bnb, "supported_torch_devices", None)
    version = getattr(bnb, "__version__", "?")
    if supported is not None and cap_device not in supported:
        raise RuntimeError(
            f"bitsandbytes {version} has no backend for device '{cap_device}' (it supports {sorted(supported)}). "
            f"Install a build for your device (`pip install -U bitsandbytes`), {fix}."
        )
    # A tiny quantize/dequantize round trip catches a build that imports but has no working
    # kernels for this device (e.g. a CUDA build missing this GPU's architecture).
    try:
        probe = torch.randn(64, 64, device=cap_device)
        packed, state = bnb.functional.quantize_4bit(probe, quant_type="nf4")
        bnb.functional.dequantize_4bit(packed, state)
    except Exception as err:  # noqa: BLE001 - any failure means "cannot run here"
        raise RuntimeError(
            f"bitsandbytes {version} imports but cannot quantize on '{cap_device}': {type(err).__name__}: {err}. "
            f"Reinstall it for this device (`pip install -U bitsandbytes`), {fix}."
        ) from err


def running_under_fsdp() -> bool:
    """True when this process was started for FSDP training.

    ``accelerate launch`` with an FSDP config (and ``TrainingArguments(fsdp=...)``) export
    ``ACCELERATE_USE_FSDP=true``; transformers and accelerate read the same variable. It is
    known before the model loads, which is when the storage dtype must be chosen.
    """
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def sharded_training() -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` when parameters will be sharded across processes, else None.

    Both shard the model's parameters, so both need float 4-bit storage. Read from what
    ``accelerate launch`` exports, like :func:`running_under_fsdp`. (transformers'
    ``is_fsdp_enabled`` / ``is_deepspeed_zero3_enabled`` answer later: the first needs an
    initialised process group and cpu-RAM-efficient loading, the second a live
    ``HfDeepSpeedConfig``; the storage dtype is chosen before either exists.)
    """
    if running_under_fsdp():
        return "FSDP"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def resolve_quant_storage(
    args: ModelArguments, compute_dtype: torch.dtype, *, sharded: str | None | bool = True
) -> torch.dtype:
    """The ``bnb_4bit_quant_storage`` dtype for ``--quant 4bit``.

    ``auto``: ``uint8`` (bitsandbytes' default), or under sharded training (FSDP, ZeRO-3)
    ``compute_dtype``, which is also the dtype hfplug loads the rest of the model in. FSDP
    flattens each wrapped block's parameters into one tensor, so they must all share a
    float dtype: packed 4-bit weights in ``uint8`` cannot be sharded, and in another dtype
    than the norms and embeddings around them they cannot be flattened together. An
    explicit choice that breaks this is a ``ValueError`` saying which dtype to use.
    ``sharded``: the backend name, or False; True (default) detects it (:func:`sharded_training`).
    """
    backend = sharded_training() if sharded is True else sharded
    storage = getattr(torch, args.quant_storage) if args.quant_storage != "auto" else None
    if not backend:
        return storage or torch.uint8
    name = str(compute_dtype).removeprefix("torch.")
    if storage is not None and storage != compute_dtype:
        raise ValueError(
            f"--quant_storage {args.quant_storage} under {backend}: it shards the packed 4-bit weights together with "
            f"the model's {name} weights, so they must share that dtype. Use --quant_storage {name} (or auto), "
            "or change --dtype."
        )
    if compute_dtype == torch.float16:
        logger.warning(
            "%s + 4-bit in float16: PEFT advises float32 storage for stable fp16 mixed precision (--dtype float32, "
            "slower), or a GPU with bf16 (--dtype bfloat16).",
            backend,
        )
    return compute_dtype


def get_quantization_config(args: ModelArguments, *, device_type: str | None = None) -> BitsAndBytesConfig | None:
    """``BitsAndBytesConfig`` for ``from_pretrained(quantization_config=...)``, or ``None`` for ``--quant none``.

    4bit is NF4 with double quantization (the QLoRA recipe: ~0.37 bit/param saved over
    plain 4-bit constants), computes in ``resolve_dtype(args.dtype)`` and stores the packed
    weights in :func:`resolve_quant_storage` (the compute dtype under FSDP); 8bit is LLM.int8.
    """
    if args.quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    check_bitsandbytes(device_type)
    if args.quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    compute_dtype = resolve_dtype(args.dtype, device_type=device_type)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=list(SKIP_MODULES),  # (the name is historical: it applies to 4-bit too)
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=resolve_quant_storage(args, compute_dtype),
    )


# --------------------------------------------------------------------------- preparation


def is_quantized(model: nn.Module) -> bool:
    """True when the model was loaded with bitsandbytes 4-bit or 8-bit weights."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: it propagates gradients to LoRA weights inside frozen blocks."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # the deprecated name of older releases
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _upcast_trainable_fp16(model: nn.Module) -> int:
    """Store trainable float16 parameters in float32; returns how many were cast.

    fp16 mixed precision (``--fp16``) keeps fp32 master weights: its GradScaler refuses to
    unscale fp16 gradients ("Attempting to unscale FP16 gradients"), and fp16 weights
    would round small updates away. Frozen weights stay in 16-bit (that is the memory).
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
            cast += 1
    return cast


def prepare_for_training(
    model: nn.Module,
    args: ModelArguments,
    *,
    activation_checkpointing: bool,
    head_modules: list[str] | None = None,
    frozen_16bit: bool = False,
) -> nn.Module:
    """Make a loaded model ready for the Trainer: k-bit preparation, checkpointing, LoRA.

    - quantized base: ``peft.prepare_model_for_kbit_training`` (freezes the base, keeps
      norms and the non-quantized weights in fp32); LoRA is then required.
    - activation checkpointing, when asked, always with ``use_reentrant=False``.
    - ``--lora``: ``get_peft_model`` with the task head (detected, or ``head_modules``)
      in ``modules_to_save`` so that it trains and is saved with the adapter; targets the
      model lacks raise ``ValueError`` listing its linear layers.
    - trainable fp16 parameters are stored in fp32 (what fp16 mixed precision expects).
    - ``frozen_16bit`` (a ``--long_context`` technique): a quantized base is not passed
      through ``prepare_model_for_kbit_training``, whose fp32 upcast of every frozen
      non-quantized weight costs Llama-3.1-8B ~2 GiB (embeddings and ``lm_head``) and makes
      the residual stream fp32; the base is frozen and only trainable parameters are fp32.

    Under sharded training (:func:`sharded_training`: FSDP, ZeRO-3) every parameter keeps
    the dtype it was loaded in, as TRL does for sharded QLoRA: FSDP flattens a block's
    parameters into one tensor of one dtype, which the fp32 upcasts above would break. So a
    quantized base skips ``prepare_model_for_kbit_training`` (``get_peft_model`` freezes the
    base anyway), the adapters are not autocast to fp32, and nothing is upcast.

    Returns the model to train (a ``PeftModel`` with ``--lora``) and logs the trainable count.
    """
    quantized = is_quantized(model)
    if quantized and not args.lora:
        raise ValueError(
            f"{type(model).__name__} was loaded with {args.quant if args.quant != 'none' else 'quantized'} weights, "
            "and a 4-bit/8-bit base cannot be fully fine-tuned (its weights are frozen integer codes). "
            "Add --lora to train adapters on it, or use --quant none for full fine-tuning."
        )
    heads = list(head_modules) if head_modules is not None else detect_head_modules(model)
    for head in heads:
        if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.get_submodule(head).parameters()):
            raise ValueError(
                f"The head '{head}' was quantized at load time, so it cannot train. Load with "
                "quantization_config=get_quantization_config(...), which keeps task heads unquantized."
            )
    if args.lora:
        # Check before the (slow) k-bit preparation and before any module is replaced.
        check_target_modules(model, args.lora_target_modules, exclude=heads)

    sharded = sharded_training()
    if quantized and frozen_16bit and not sharded:
        for param in model.parameters():
            param.requires_grad_(False)  # what k-bit preparation does, without its fp32 upcast
        if activation_checkpointing:
            _enable_activation_checkpointing(model)
    elif quantized and not sharded:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=activation_checkpointing,  # PEFT's name for it
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif activation_checkpointing:
        _enable_activation_checkpointing(model)

    if args.lora:
        from peft import get_peft_model

        peft_config = get_peft_config(args, task_type=infer_task_type(model), modules_to_save=heads)
        model = get_peft_model(model, peft_config, autocast_adapter_dtype=not sharded)
        if activation_checkpointing and hasattr(model, "enable_input_require_grads"):
            # Harmless with non-reentrant checkpointing, and keeps gradients flowing if a
            # caller (e.g. the Trainer with other kwargs) re-enables reentrant checkpointing.
            model.enable_input_require_grads()

    cast = 0 if sharded else _upcast_trainable_fp16(model)
    trainable, total = count_parameters(model)
    logger.info(
        "trainable params: %s of %s (%.4f%%)%s%s",
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
        f"; head modules trained in full: {', '.join(heads)}" if args.lora and heads else "",
        f"; {cast} fp16 trainable tensors stored in fp32" if cast else "",
    )
    if sharded:
        logger.info(
            "%s: parameters kept in their load dtypes (no k-bit preparation, no fp32 upcast) so that they "
            "can be sharded.",
            sharded,
        )
    return model


def default_optim(args: ModelArguments) -> str | None:
    """``paged_adamw_8bit`` for 4-bit runs (the QLoRA setup), else ``None`` (keep the Trainer's default).

    The recipe applies it only when the user left ``--optim`` at its default. Not under
    FSDP: PEFT documents that ``paged_adamw_8bit`` fails when an FSDP + QLoRA run saves a
    checkpoint, and the optimizer state is sharded there anyway.
    """
    return "paged_adamw_8bit" if args.quant == "4bit" and not running_under_fsdp() else None
