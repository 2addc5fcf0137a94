"""Model options for every recipe: which model, its dtype, bitsandbytes quantization and LoRA.

``ModelArguments`` (``--quant``, ``--dtype``, ``--lora``...) is parsed by ``HfArgumentParser`` next to ``TrainingArguments``.
The helpers turn it into what ``from_pretrained`` and PEFT want, and return
``None`` when a feature is off so that a recipe reads straight down::

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn

if TYPE_CHECKING:  # imported lazily at run time: peft and bitsandbytes are heavy
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

logger = logging.getLogger(__name__)

QUANT_CHOICES = ("none", "8bit", "4bit")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
QUANT_STORAGE_CHOICES = ("auto", "uint8", "float16", "bfloat16", "float32")
# PEFT's shorthand for "every linear layer except the output/classification head".
ALL_LINEAR = "all-linear"
# Output and task heads bitsandbytes must leave in 16/32-bit (matched as a name, a
# "name." prefix or a suffix, so "classifier" also covers "pre_classifier" and RoBERTa's
# "classifier.dense"). transformers' own default misses a head with a bias (BERT's
# "classifier" gets quantized and then cannot train), and passing a list replaces that
# default, so the LM head is listed too.
SKIP_MODULES = ("lm_head", "score", "classifier", "qa_outputs")


# --------------------------------------------------------------------------- arguments


def _split_commas(values: Iterable[str] | str) -> list[str]:
    """``"q_proj,v_proj"`` or ``["q_proj,v_proj", "o_proj"]`` -> ``["q_proj", "v_proj", "o_proj"]``."""
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


@dataclass
class ModelArguments:
    """Which model to load, how to quantize it, and whether to train LoRA adapters on it."""

    model_name_or_path: str = field(
        default="anferico/bert-for-patents",
        metadata={"help": "Hub model id or local directory of the base model."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Hub id or directory of the tokenizer, if not the model's own."},
    )
    quant: str = field(
        default="none",
        metadata={
            "help": "Weight quantization at load time: none, 8bit (LLM.int8) or 4bit (NF4 + double quantization). "
            "A quantized base trains only with --lora.",
            "choices": list(QUANT_CHOICES),
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weight/compute dtype. auto = bfloat16 where the GPU supports it, float16 on GPUs without "
            "bf16 (T4, V100), float32 on CPU.",
            "choices": list(DTYPE_CHOICES),
        },
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (+ the task head) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: [ALL_LINEAR],
        metadata={
            "help": "Module names to adapt, space- or comma-separated (e.g. q_proj,v_proj); "
            "'all-linear' = every linear layer except the head."
        },
    )
    quant_storage: str = field(
        default="auto",
        metadata={
            "help": "dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage; values are unchanged, "
            "only the container). auto = uint8, or the model's --dtype under FSDP, which shards only float "
            "tensors of one dtype. With --quant 4bit only.",
            "choices": list(QUANT_STORAGE_CHOICES),
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository (only for repos you trust)."}
    )

    def __post_init__(self) -> None:
        if self.quant not in QUANT_CHOICES:
            raise ValueError(f"quant={self.quant!r} is not supported; choose one of {', '.join(QUANT_CHOICES)}.")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}.")
        if self.quant_storage not in QUANT_STORAGE_CHOICES:
            raise ValueError(f"quant_storage={self.quant_storage!r} is not supported; "
                             f"choose one of {', '.join(QUANT_STORAGE_CHOICES)}.")
        if self.quant_storage != "auto" and self.quant != "4bit":
            raise ValueError(
                f"quant_storage={self.quant_storage!r} applies to 4-bit weights only, but quant={self.quant!r}; "
                "add --quant 4bit or leave quant_storage at auto."
            )
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r!r} must be a positive integer (typical: 8, 16, 64).")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int) or self.lora_alpha < 1:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a positive integer (typical: 2 * lora_r).")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be a number in [0, 1).")
        # YAML and the CLI may hand over "q_proj,v_proj" as one string.
        self.lora_target_modules = _split_commas(self.lora_target_modules)
        if not self.lora_target_modules:
            raise ValueError(
                "lora_target_modules is empty; give module names (e.g. q_proj,v_proj) or 'all-linear'."
            )
        if ALL_LINEAR in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise ValueError(
                f"lora_target_modules={self.lora_target_modules!r} mixes 'all-linear' with names; "
                "use either 'all-linear' or a list of module names."
            )


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


def resolve_quant_storage(args: ModelArguments, compute_dtype: torch.dtype, *,
                          sharded: str | None | bool = True) -> torch.dtype:
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
            "slower), or a GPU with bf16 (--dtype bfloat16).", backend
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


# --------------------------------------------------------------------------- LoRA


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
    return [
        name
        for name, child in model.named_children()
        if name != prefix and any(True for _ in child.parameters())
    ]


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
        target
        for target in targets
        if not any(name == target or name.endswith("." + target) for name in module_names)
    ]
    if missing:
        raise ValueError(
            f"lora_target_modules {missing} not found in {type(model).__name__}. "
            f"Its linear layers are: {', '.join(linear_module_names(model, exclude))} "
            f"(or use 'all-linear')."
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


def prepare_for_training(
    model: nn.Module,
    args: ModelArguments,
    *,
    activation_checkpointing: bool,
    head_modules: list[str] | None = None,
) -> nn.Module:
    """Make a loaded model ready for the Trainer: k-bit preparation, checkpointing, LoRA.

    - quantized base: ``peft.prepare_model_for_kbit_training`` (freezes the base, keeps
      norms and the non-quantized weights in fp32); LoRA is then required.
    - activation checkpointing, when asked, always with ``use_reentrant=False``.
    - ``--lora``: ``get_peft_model`` with the task head (detected, or ``head_modules``)
      in ``modules_to_save`` so that it trains and is saved with the adapter; targets the
      model lacks raise ``ValueError`` listing its linear layers.
    - trainable fp16 parameters are stored in fp32 (what fp16 mixed precision expects).

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
    if quantized and not sharded:
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
        logger.info("%s: parameters kept in their load dtypes (no k-bit preparation, no fp32 upcast) so that they "
                    "can be sharded.", sharded)
    return model


def default_optim(args: ModelArguments) -> str | None:
    """``paged_adamw_8bit`` for 4-bit runs (the QLoRA setup), else ``None`` (keep the Trainer's default).

    The recipe applies it only when the user left ``--optim`` at its default. Not under
    FSDP: PEFT documents that ``paged_adamw_8bit`` fails when an FSDP + QLoRA run saves a
    checkpoint, and the optimizer state is sharded there anyway.
    """
    return "paged_adamw_8bit" if args.quant == "4bit" and not running_under_fsdp() else None
