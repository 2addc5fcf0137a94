"""The model card of a pushed run: ``README.md`` with metadata (base model, datasets, license, eval
results as ``model-index``) and text that says what the model is and how to load, evaluate or chat with it.

Deterministic (no dates), so pushing the same run twice commits nothing new.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from hfplug.hub.auth import HUB_URL
from hfplug.loading import is_hub_id

HUPD_DATASET = "HUPD/hupd"
CARD_FILE = "README.md"
CURVES_FILE = "training_curves.png"

TASK_TITLES = {  # model-index task names
    "decision": "Patent acceptance prediction (HUPD decision)",
    "ipc": "IPC subclass classification (HUPD)",
}
TASK_PHRASES = {  # the same, inside a sentence
    "decision": "patent acceptance prediction (ACCEPTED vs REJECTED)",
    "ipc": "main IPC subclass classification",
}


def read_json(path: Path) -> dict:
    """A run's JSON file (``adapter_config.json``, ``eval_results.json``, ...); ``{}`` when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def eval_results_for_card(metrics: dict, *, task: str | None, hupd_config: str | None = None) -> list:
    """``EvalResult``s (the card's ``model-index``) from ``eval_results.json``'s metrics."""
    from huggingface_hub import EvalResult

    names = {
        "accuracy": "Accuracy",
        "f1": "Macro F1",
        "precision": "Macro precision",
        "recall": "Macro recall",
        "loss": "Loss",
    }
    results = []
    for key in sorted(metrics):
        value = metrics[key]
        metric = key.removeprefix("eval_")
        top_k = re.fullmatch(r"top(\d+)_accuracy", metric)
        if metric not in names and not top_k:
            continue  # runtime, samples/s, counts: not model quality
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        metric_type, label = ("accuracy", f"Top-{top_k.group(1)} accuracy") if top_k else (metric, names[metric])
        results.append(
            EvalResult(
                task_type="text-classification",
                task_name=TASK_TITLES.get(task or "", "Text classification"),
                dataset_type=HUPD_DATASET,
                dataset_name="HUPD (Harvard USPTO Patent Dataset)",
                dataset_config=hupd_config,
                dataset_split="validation",
                metric_type=metric_type,
                metric_name=label,
                metric_value=round(float(value), 4),
                metric_args={"average": "macro"} if metric in ("f1", "precision", "recall") else None,
            )
        )
    return results


def _infer_task(metrics: dict, task_type: str | None) -> str | None:
    if task_type == "CAUSAL_LM":
        return None
    if any(re.fullmatch(r"eval_top\d+_accuracy", key) for key in metrics):
        return "ipc"
    return "decision" if metrics or task_type == "SEQ_CLS" else None


def build_model_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    kind: str,
    base_model: str | None = None,
    license: str | None = None,
    task: str | None = None,
    hupd_config: str | None = None,
    step: int | None = None,
    base_gated: bool = False,
):
    """A ``huggingface_hub.ModelCard`` for the run in ``folder``: metadata and how to use it.

    Metadata: ``base_model`` (when it is a Hub id), ``library_name`` (``peft`` for adapters),
    ``datasets: [HUPD/hupd]``, tags, ``license``, ``pipeline_tag`` and the eval metrics as
    ``model-index``. Text: results, how to load it (PEFT snippet), how to evaluate a
    classifier or chat with a causal-LM adapter, and what the repo deliberately lacks.
    Deterministic (no dates), so pushing the same run twice commits nothing new.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    adapter = read_json(folder / "adapter_config.json")
    task_type = adapter.get("task_type")
    base = base_model or adapter.get("base_model_name_or_path")
    metrics = read_json(folder / "eval_results.json") or {
        k: v for k, v in read_json(folder / "all_results.json").items() if k.startswith("eval_")
    }
    task = task or _infer_task(metrics, task_type)
    architectures = read_json(folder / "config.json").get("architectures") or []
    causal = task_type == "CAUSAL_LM" or (kind != "adapter" and any(a.endswith("ForCausalLM") for a in architectures))
    hub_base = base if is_hub_id(base) else None
    tags = (
        ["hfplug", "patents", "hupd"]
        + (["lora", "peft"] if kind == "adapter" else [])
        + (["merged-lora"] if kind == "merged" else [])
        + ([] if causal else ["text-classification"])
    )
    data = ModelCardData(
        base_model=hub_base,
        library_name="peft" if kind == "adapter" else "transformers",
        datasets=[HUPD_DATASET],
        license=license or "other",
        tags=tags,
        pipeline_tag="text-generation" if causal else "text-classification",
        model_name=repo_id.split("/")[-1],
        eval_results=(eval_results_for_card(metrics, task=task, hupd_config=hupd_config) or None)
        if not causal
        else None,
    )
    body = _card_body(
        repo_id,
        kind=kind,
        base=base,
        hub_base=hub_base,
        base_gated=base_gated,
        causal=causal,
        task=task,
        hupd_config=hupd_config,
        metrics=metrics,
        adapter=adapter,
        license=license,
        step=step,
        train=read_json(folder / "train_results.json"),
        has_curves=(folder / CURVES_FILE).is_file(),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _card_body(
    repo_id,
    *,
    kind,
    base,
    hub_base,
    base_gated,
    causal,
    task,
    hupd_config,
    metrics,
    adapter,
    license,
    step,
    train,
    has_curves,
) -> str:
    """The model card's Markdown text."""
    name = repo_id.split("/")[-1]
    # A local base path is shown by its folder name only (the rest of the path is the trainer's machine).
    base_ref = (
        f"[{base}]({HUB_URL}/{base})"
        if hub_base
        else f"the local model `{Path(base).name}`"
        if base
        else "its base model"
    )
    what = {
        "adapter": f"A LoRA adapter for {base_ref}",
        "merged": f"{base_ref} with a LoRA adapter merged in",
        "model": f"A fine-tune of {base_ref}",
    }[kind]
    job = TASK_PHRASES.get(task or "", "text generation" if causal else "text classification")
    lines = [
        f"# {name}",
        "",
        f"{what}, trained with hfplug on the Harvard USPTO Patent Dataset "
        f"([{HUPD_DATASET}]({HUB_URL}/datasets/{HUPD_DATASET})) for {job}.",
    ]
    if step is not None:
        lines += ["", f"**Training in progress**: this is the checkpoint at step {step}; results follow at the end."]
    if metrics and not causal:
        lines += [
            "",
            "## Results",
            "",
            f"Validation split{f' of the `{hupd_config}` config' if hupd_config else ''}:",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [
            f"| {k.removeprefix('eval_')} | {v:.4f} |"
            for k, v in sorted(metrics.items())
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and not k.endswith(("runtime", "per_second", "samples", "epoch", "dropped_records"))
        ]
    lines += ["", "## How to load it", "", "```python"]
    auto = "ForCausalLM" if causal else "ForSequenceClassification"
    if kind == "adapter":
        lines += [
            f"from peft import AutoPeftModel{auto}",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModel{auto}.from_pretrained("{repo_id}")  # the base model + this adapter',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        ]
        if not hub_base:
            lines += [
                "# The adapter was trained on a local base model: load that base yourself, then",
                f'# PeftModel.from_pretrained(base, "{repo_id}").',
            ]
    else:
        lines += [
            f"from transformers import AutoModel{auto}, AutoTokenizer",
            "",
            f'model = AutoModel{auto}.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        ]
    lines += ["```"]
    if base_gated:
        lines += [
            "",
            f"{base} is gated: request access on {HUB_URL}/{base} first, then log in with a read token "
            "(`hf auth login`, or the HF_TOKEN environment variable / Colab secret).",
        ]
    if causal:
        lines += ["", "## Chat with it", "", "```bash", f"python recipes/chat.py --adapter {repo_id}", "```"]
    else:
        config = f" --hupd_config {hupd_config}" if hupd_config else ""
        lines += [
            "",
            "## Evaluate it",
            "",
            "With hfplug, on the same validation split:",
            "",
            "```bash",
            f"accelerate launch recipes/finetune_hupd.py --model_name_or_path {repo_id} "
            f"--do_train false --do_eval true --task {task or 'decision'}{config} --output_dir eval-{name}",
            "```",
            "",
            "Add the data flags of the training run (filing dates, text_fields, max_length).",
        ]
    lines += _training_section(adapter, train, has_curves)
    lines += [
        "",
        "## Files",
        "",
        "Weights ("
        + (
            "`adapter_model.safetensors` + `adapter_config.json`"
            if kind == "adapter"
            else "`model.safetensors` + `config.json`"
        )
        + "), the tokenizer, the results JSON and "
        "`training_curves.png`. Checkpoints, optimizer states and `training_args.bin` are deliberately not "
        "pushed.",
        "",
        f"License: {license or 'the license of the base model applies'}.",
    ]
    return "\n".join(lines) + "\n"


def _training_section(adapter: dict, train: dict, has_curves: bool) -> list[str]:
    lines = []
    if adapter:
        targets = adapter.get("target_modules")
        targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
        lines.append(
            f"- LoRA: r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, "
            f"dropout={adapter.get('lora_dropout')}, target modules: {targets}"
        )
        if adapter.get("modules_to_save"):
            lines.append(
                f"- trained in full and saved with the adapter: {', '.join(sorted(set(adapter['modules_to_save'])))}"
            )
    for key in ("epoch", "train_loss", "train_runtime", "train_samples"):
        if isinstance(train.get(key), (int, float)):
            lines.append(f"- {key}: {train[key]:.4g}")
    if has_curves:
        lines.append("- loss and metric curves: `training_curves.png`")
    return ["", "## Training", "", *lines] if lines else []
