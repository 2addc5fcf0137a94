"""``--merge_adapter``: the LoRA adapter merged into its 16-bit base, checked first so that it fails early.

``plan_merge`` reads the base's ``config.json`` only and refuses a quantized (4-bit/8-bit)
checkpoint, whose merged weights would lose what the adapter learned, and a merge that will
not fit in memory. ``merge_adapter_into_base`` then loads the base in 16-bit, merges and saves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hfplug.hub.arguments import PUSH_SCRIPT
from hfplug.hub.card import read_json
from hfplug.hub.errors import MergeError
from hfplug.loading import ConfigUnavailableError, load_config
from hfplug.param_counts import parameter_counts

logger = logging.getLogger(__name__)

MERGE_COMMAND = f"{PUSH_SCRIPT} OUTPUT_DIR --hub_model_id user/name --merge_adapter"  # merge later, elsewhere


@dataclass
class MergePlan:
    """What merging into ``base_model`` needs: its parameter count, the bytes in 16-bit, what is free."""

    base_model: str
    params: int
    needed_bytes: int
    available_bytes: int
    device: str


MERGE_OVERHEAD = 1.2  # the merged copy being written, the adapter, allocator slack
MERGE_SLACK = 512 * 2**20


def available_memory(device: str = "cpu") -> int:
    """Bytes free for a merge on ``device`` (``cpu``: available RAM; ``cuda``: free GPU memory)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _quantization_of(config) -> str | None:
    """A description of the quantization a checkpoint was saved with, or ``None`` for plain weights."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else getattr(quant, "to_dict", lambda: {})()
    if quant.get("load_in_4bit") or quant.get("bits") == 4:
        return "4-bit"
    if quant.get("load_in_8bit") or quant.get("bits") == 8:
        return "8-bit"
    return str(quant.get("quant_method", "quantized"))


def _quantized_refusal(what: str, quant: str) -> str:
    return (
        f"Refusing to merge the LoRA adapter into {what}, which is {quant}: the merged weights would be rounded to "
        f"{quant} and lose what the adapter learned (precision loss). Push the adapter (the default), or merge "
        f"into the 16-bit base: {MERGE_COMMAND} --merge_base_model <the original 16-bit model>."
    )


def _count_params(config) -> int:
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    return parameter_counts(config, task="causal_lm" if causal else "decision").total_params


def plan_merge(
    base_model: str, *, token: str | None = None, device: str = "cpu", available_bytes: int | None = None
) -> MergePlan:
    """Check that the adapter can be merged into ``base_model`` here: a 16-bit checkpoint that fits in memory.

    Reads ``config.json`` only. Raises ``MergeError`` for a quantized (4-bit/8-bit) checkpoint,
    or when ``params x 2 bytes`` (plus overhead) exceeds the memory available on ``device``.
    """
    try:
        config = load_config(base_model, token=token)
    except ConfigUnavailableError as err:
        raise MergeError(f"Cannot plan the merge: {err}", "no_base") from None
    quant = _quantization_of(config)
    if quant:
        raise MergeError(_quantized_refusal(f"the checkpoint {base_model}", quant), "quantized_base")
    params = _count_params(config)
    needed = int(params * 2 * MERGE_OVERHEAD) + MERGE_SLACK
    available = available_memory(device) if available_bytes is None else available_bytes
    gib = 2**30
    if needed > available:
        raise MergeError(
            f"Not enough memory to merge the adapter into {base_model}: {params / 1e9:.2f}B parameters in 16-bit need "
            f"~{needed / gib:.1f} GiB on {device}, and {available / gib:.1f} GiB is available. Push the adapter "
            "instead (leave --merge_adapter out; load it with PEFT on top of the base), or merge later on a machine "
            f"with more memory: {MERGE_COMMAND}.",
            "memory",
        )
    return MergePlan(base_model, params, needed, available, device)


def check_merge_target(model) -> None:
    """Refuse to merge into a model object loaded in 4-bit or 8-bit (e.g. the QLoRA model just trained)."""
    loaded_4bit = getattr(model, "is_loaded_in_4bit", False)
    loaded_8bit = getattr(model, "is_loaded_in_8bit", False)
    quant = "4-bit" if loaded_4bit else "8-bit" if loaded_8bit else _quantization_of(getattr(model, "config", None))
    if quant:
        raise MergeError(_quantized_refusal("the model in memory", quant), "quantized_base")


def _head_size(adapter_dir: Path, adapter: dict) -> int | None:
    """Number of labels of a classification adapter, from its saved head (``modules_to_save``)."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    heads = set(adapter.get("modules_to_save") or [])
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if key.endswith(".weight") and len(parts) >= 2 and parts[-2] in heads:
                return int(f.get_slice(key).get_shape()[0])
    return None


def _merge_dtype(base_model: str, token: str | None):
    """The dtype to merge in: the checkpoint's own float dtype, else bfloat16. Never quantized."""
    name = str(getattr(load_config(base_model, token=token), "dtype", None) or "").replace("torch.", "")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.bfloat16)


def merge_adapter_into_base(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    token: str | None = None,
    device: str = "cpu",
    label_names: list[str] | None = None,
    task: str | None = None,
) -> Path:
    """Load ``base_model`` in 16-bit (never quantized), merge the LoRA adapter into it, save to ``out_dir``.

    ``base_model`` defaults to the adapter's ``base_model_name_or_path``; pass the original
    16-bit model when the adapter was trained on a pre-quantized checkpoint. Runs
    ``plan_merge`` first (refuses quantized checkpoints and merges that will not fit).
    Classification adapters get their label count from the saved head; names from
    ``label_names`` (HUPD's decision labels for a 2-class decision task).
    """
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    adapter = read_json(adapter_dir / "adapter_config.json")
    if not adapter:
        raise MergeError(f"{adapter_dir} has no adapter_config.json: nothing to merge.", "no_adapter")
    base_model = base_model or adapter.get("base_model_name_or_path")
    plan = plan_merge(base_model, token=token, device=device)
    logger.info(
        "Merging the adapter in %s into %s (%.2fB params, ~%.1f GiB needed, %.1f GiB available).",
        adapter_dir,
        base_model,
        plan.params / 1e9,
        plan.needed_bytes / 2**30,
        plan.available_bytes / 2**30,
    )
    kwargs: dict[str, Any] = {"dtype": _merge_dtype(base_model, token), "token": token}
    task_type = adapter.get("task_type")
    if task_type == "SEQ_CLS":
        model_cls = AutoModelForSequenceClassification
        num_labels = len(label_names) if label_names else _head_size(adapter_dir, adapter)
        if num_labels:
            kwargs["num_labels"] = num_labels
            from hfplug.data.tasks import DECISION_LABELS  # here, not at the top: it imports datasets

            names = label_names or (DECISION_LABELS if num_labels == 2 and task in (None, "decision") else None)
            if names:
                kwargs["id2label"] = dict(enumerate(names))
                kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    else:
        model_cls = AutoModelForCausalLM if task_type == "CAUSAL_LM" else AutoModel
    base = model_cls.from_pretrained(base_model, **kwargs)
    if device != "cpu":
        base = base.to(device)
    check_merge_target(base)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        if merged.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            merged.config.pad_token_id = tokenizer.pad_token_id
    except (OSError, ValueError):
        pass  # no tokenizer saved with the adapter: the config keeps the base's pad token
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    return out_dir
