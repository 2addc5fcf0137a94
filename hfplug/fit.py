"""The memory planner's command line: will this fine-tuning run fit on the GPU, and if not, what will?

    python -m hfplug.fit --model_name_or_path meta-llama/Llama-3.1-8B --quant 4bit --lora_r 16 \\
        --task decision --max_length 512 --per_device_train_batch_size 8 --gpu t4
    python -m hfplug.fit --model_name_or_path meta-llama/Llama-3.1-8B --task causal_lm \\
        --max_length 32768 --per_device_train_batch_size 1 --lora_dropout 0 --long_context auto

Reads only ``config.json`` (no weights are downloaded) and prints a breakdown of the peak
GPU memory of one training step, the largest batch size and sequence length that fit, and
settings that fit when the run does not; then one row per ``--long_context`` technique,
turned on cumulatively (cheapest first), with the GPU and host peaks, whether it fits and
the longest ``--max_length`` that does, and what ``--long_context auto`` would turn on.
Flags that the recipe also has carry the recipe's names and meanings. The arithmetic is
``hfplug.memory``.
"""

from __future__ import annotations

import argparse
import sys

from transformers.hf_argparser import string_to_bool

from hfplug.host_memory import COLAB_HOST_BUDGET, COLAB_HOST_RAM, HOST_BASELINE, host_budget
from hfplug.loading import ConfigUnavailableError, load_config
from hfplug.long_context import AUTO, parse_long_context
from hfplug.memory import MemoryEstimate, applicable_techniques, estimate_memory
from hfplug.memory_search import choose_techniques, max_batch_size, max_seq_len, suggest_settings
from hfplug.param_counts import PLANNER_TASKS, parameter_counts
from hfplug.sizes import GiB
from hfplug.sizes import parse_memory as _parse_size

# Memory the allocator can use. t4 is the "15 GiB usable" (a 16 GB card, Colab
# reports ~14.7 GB); the others are what torch reports as total_memory on those cards.
GPU_MEMORY = {
    "t4": 15.0 * GiB,
    "l4": 22.0 * GiB,
    "a100-40": 39.4 * GiB,
    "a100-80": 79.1 * GiB,
    "h100": 79.1 * GiB,
}
# GPUs without bf16: the planner assumes fp16 there (same size, noted for the user).
_NO_BF16 = {"t4"}

# Flags renamed to the recipe's names: the old spelling is refused with the new one.
RENAMED_FLAGS = {
    "--model": "--model_name_or_path",
    "--batch_size": "--per_device_train_batch_size",
    "--gradient_checkpointing": "--activation_checkpointing",
    "--no-gradient_checkpointing": "--activation_checkpointing false",
    "--loss_chunk_size": "--long_context chunked_loss",
    "--offload_activations": "--long_context offload_activations",
}


def parse_memory(text: str) -> int:
    """``"15GiB"``, ``"16GB"``, ``"15"`` (GiB) -> bytes (``hfplug.sizes.parse_memory``, as the recipe parses it)."""
    try:
        return _parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_host_memory(text: str) -> int:
    """``--max_host_memory``: ``colab`` (the default), ``auto`` (this machine, as the recipe's auto) or a size."""
    if text == "colab":
        return COLAB_HOST_BUDGET
    if text == "auto":
        return host_budget("auto")
    return parse_memory(text)


def parse_techniques(text: str) -> tuple[str, ...] | str:
    """``--long_context``: off, auto, all or a comma list (``hfplug.long_context.parse_long_context``)."""
    try:
        return parse_long_context(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def format_report(
    est: MemoryEstimate,
    *,
    gpu_mem: int,
    gpu_name: str,
    header: str,
    no_ckpt_total: int | None,
    best_batch: int,
    best_len: int,
    batch: int,
    length: int,
) -> str:
    """The table ``python -m hfplug.fit`` prints."""

    def row(label: str, value: int, note: str = "") -> str:
        return f"  {label:<48}{value / GiB:>8.2f}  {note}".rstrip()

    lines = [header, ""]
    lines.append(f"  {'part':<48}{'GiB':>8}")
    lines.append(row("quantized linear weights", est.quantized_weights))
    lines.append(row("other weights (embeddings, norms, heads, ...)", est.other_weights))
    lines.append(
        row("  (all weights right after loading)", est.weights_at_load, f"{est.weights_at_load / 1e9:.2f} GB")
    )
    lines.append(row("trainable parameters", est.trainable_params, f"{est.trainable_count:,} params"))
    lines.append(row("gradients", est.gradients))
    lines.append(row("optimizer states", est.optimizer_states))
    lines.append(row("activations at the peak", est.activations, f"phase: {est.peak_phase}"))
    lines.append(row("  with gradient checkpointing", est.activations_checkpointing, "(layer backward)"))
    lines.append(row("  without gradient checkpointing", est.activations_no_checkpointing, "(layer backward)"))
    lines.append(row("logits / loss at the peak", est.logits, f"loss peak alone {est.logits_peak / GiB:.2f} GiB"))
    lines.append(row("workspace (dequantization, cuBLAS)", est.workspace))
    lines.append(row("allocator fragmentation (est.)", est.fragmentation))
    lines.append(row("CUDA context", est.cuda_context))
    lines.append("  " + "-" * 56)
    verdict = "fits" if est.total <= gpu_mem else "DOES NOT FIT"
    lines.append(row("total", est.total, f"of {gpu_mem / GiB:.2f} GiB on {gpu_name}: {verdict}"))
    lines.append(row("  predicted torch peak allocated", est.peak_allocated))
    if no_ckpt_total is not None:
        lines.append(row("  total without gradient checkpointing", no_ckpt_total))
    lines.append("")
    if est.layers_offloaded:
        lines.append(
            row(
                "host: offloaded layer inputs (pinned)",
                est.host_offloaded,
                f"{est.layers_offloaded} layers; host peak {est.host_peak / GiB:.2f} GiB "
                f"(+ {est.host_baseline / GiB:.0f} GiB process baseline)",
            )
        )
    lines.append(f"  largest batch size at {length} tokens: {best_batch if best_batch > 0 else 'none fits'}")
    lines.append(f"  largest sequence length at batch size {batch}: {best_len if best_len > 0 else 'none fits'}")
    lines.append("  (indented rows are details, not added to the total)")
    for note in est.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def technique_rows(config, *, gpu_mem: int, host_mem: int, **kwargs) -> list[tuple[str, MemoryEstimate, int]]:
    """(label, estimate, longest max_length that fits) with the applicable techniques turned on one by one,
    cheapest first: plain, +frozen_16bit, +efficient_attention, ..."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("long_context", "max_host_memory")}
    applicable = applicable_techniques(config, **kwargs)
    rows = []
    for n in range(len(applicable) + 1):
        techniques = applicable[:n]
        est = estimate_memory(config, long_context=techniques, max_host_memory=host_mem, **kwargs)
        longest = max_seq_len(config, gpu_mem=gpu_mem, long_context=techniques, max_host_memory=host_mem, **kwargs)
        rows.append(("+" + techniques[-1] if techniques else "plain", est, longest))
    return rows


def format_technique_table(rows, *, gpu_mem: int, host_mem: int, length: int, batch: int, auto) -> str:
    """The ``--long_context`` table ``python -m hfplug.fit`` prints under the breakdown."""
    lines = [
        f"  --long_context, cumulative (cheapest first), at {length} tokens x batch {batch}; host budget "
        f"(--max_host_memory) {host_mem / GiB:.2f} GiB",
        f"  {'techniques':<24}{'GPU GiB':>9}{'host GiB':>10}{'fits':>6}{'longest max_length':>20}",
    ]
    for label, est, longest in rows:
        fits = "yes" if est.total <= gpu_mem else "no"
        offloaded = f" ({est.layers_offloaded} layers offloaded)" if est.layers_offloaded else ""
        lines.append(
            f"  {label:<24}{est.total / GiB:>9.2f}{est.host_peak / GiB:>10.2f}{fits:>6}"
            f"{(f'{longest:,}' if longest > 0 else 'none'):>20}{offloaded}"
        )
    lines.append(
        f"  (GPU = total with CUDA context; host = {HOST_BASELINE / GiB:.0f} GiB process baseline + pinned offload "
        f"buffers; longest on {gpu_mem / GiB:.2f} GiB)"
    )
    lines.append(f"  {auto.message}")
    return "\n".join(lines)


def memory_plan_message(config, *, gpu_mem: int, model_name: str, **settings) -> tuple[bool, str]:
    """Whether a run fits ``gpu_mem`` bytes, and one line saying so (with settings that fit when it does not)."""
    gib = 2**30
    total = estimate_memory(config, **settings).total
    if total <= gpu_mem:
        return True, f"Memory plan: ~{total / gib:.1f} GiB of {gpu_mem / gib:.1f} GiB on this GPU."
    return False, (
        f"This run is planned at ~{total / gib:.1f} GiB but the GPU has {gpu_mem / gib:.1f} GiB: it will likely run "
        f"out of memory. Settings that fit: {'; '.join(suggest_settings(config, gpu_mem=gpu_mem, **settings))}. "
        f"(Details: python -m hfplug.fit --model_name_or_path {model_name} ...)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hfplug.fit",
        description="Estimate the GPU memory of a fine-tuning run from config.json alone.",
        allow_abbrev=False,  # an old flag such as --model must not pass as an abbreviation of the new one
    )
    parser.add_argument("--model_name_or_path", required=True, help="Hub id or local directory with config.json")
    parser.add_argument("--task", choices=PLANNER_TASKS, default="decision")
    parser.add_argument("--num_labels", type=int, default=None, help="classes (default: decision 2, ipc 637)")
    parser.add_argument("--quant", choices=("none", "8bit", "4bit"), default="4bit")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank; 0 = full fine-tuning")
    parser.add_argument("--lora_target_modules", default="all-linear", help="comma-separated, or all-linear")
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument(
        "--activation_checkpointing",
        type=string_to_bool,
        nargs="?",
        const=True,
        default=True,
        help="recompute activations in backward (true/false; default true)",
    )
    parser.add_argument("--optim", default=None, help="Trainer optim name (default: paged_adamw_8bit with 4bit)")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="compute dtype (default: float16 on a T4, bfloat16 elsewhere)",
    )
    parser.add_argument(
        "--long_context",
        type=parse_techniques,
        default=(),
        help="memory techniques: off (default), auto (the planner's choice), all, or a comma list of "
        "frozen_16bit,efficient_attention,chunked_loss,tiled_mlp,offload_activations (hfplug.long_context)",
    )
    parser.add_argument(
        "--max_host_memory",
        type=parse_host_memory,
        default=COLAB_HOST_BUDGET,
        help="host RAM offload_activations may fill with pinned layer inputs, as the recipe's flag: a size (e.g. "
        f"6GiB), auto (this machine's RAM minus the {HOST_BASELINE / GiB:.0f} GiB process reserve) or colab "
        f"(default: a free Colab's {COLAB_HOST_RAM / 1e9:.1f} GB minus the reserve = {COLAB_HOST_BUDGET / GiB:.2f} GiB)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gpu", choices=sorted(GPU_MEMORY), default="t4")
    group.add_argument("--gpu_mem", type=parse_memory, default=None, help="memory of the GPU, e.g. 15GiB or 24GB")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def refuse_renamed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Exit with a usage error naming the new flag when ``argv`` uses an old one (``--model``)."""
    for arg in argv:
        new = RENAMED_FLAGS.get(arg.split("=", 1)[0])
        if new is not None:
            parser.error(f"{arg.split('=', 1)[0]} is now {new} (the recipe's name for it).")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    refuse_renamed_flags(parser, argv)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except ConfigUnavailableError as err:
        print(f"hfplug.fit: cannot read the config of {args.model_name_or_path}: {err}", file=sys.stderr)
        return 2
    gpu_name = args.gpu if args.gpu_mem is None else "custom GPU"
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else GPU_MEMORY[args.gpu]
    dtype = args.dtype or ("float16" if args.gpu_mem is None and args.gpu in _NO_BF16 else "bfloat16")
    kwargs = dict(
        quant=args.quant,
        lora_r=args.lora_r,
        task=args.task,
        max_length=args.max_length,
        batch_size=args.per_device_train_batch_size,
        activation_checkpointing=args.activation_checkpointing,
        optim=args.optim,
        num_labels=args.num_labels,
        dtype=dtype,
        lora_target_modules=tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip()),
        lora_dropout=args.lora_dropout,
        max_host_memory=args.max_host_memory,
    )
    try:
        auto = choose_techniques(config, gpu_mem=gpu_mem, host_mem=args.max_host_memory, **kwargs)
        techniques = auto.techniques if args.long_context == AUTO else args.long_context
        kwargs["long_context"] = techniques
        est = estimate_memory(config, **kwargs)
        no_ckpt = (
            estimate_memory(
                config,
                **{
                    **kwargs,
                    "activation_checkpointing": False,
                    "long_context": tuple(t for t in techniques if t != "offload_activations"),
                },
            ).total
            if args.activation_checkpointing
            else None
        )
        best_batch = max_batch_size(config, gpu_mem=gpu_mem, **kwargs)
        best_len = max_seq_len(config, gpu_mem=gpu_mem, **kwargs)
        rows = technique_rows(config, gpu_mem=gpu_mem, host_mem=args.max_host_memory, **kwargs)
    except ValueError as err:
        print(f"hfplug.fit: {err}", file=sys.stderr)
        return 2
    counts = parameter_counts(config, task=args.task, num_labels=args.num_labels)
    optim = args.optim or ("paged_adamw_8bit" if args.quant == "4bit" else "adamw_torch")
    lora = f"LoRA r={args.lora_r} on {args.lora_target_modules}" if args.lora_r else "full fine-tuning"
    header = (
        f"hfplug.fit  {args.model_name_or_path}  ({counts.architecture}, task {args.task})\n"
        f"  quant {args.quant}, {lora}, optim {optim}, {dtype} compute\n"
        f"  batch {args.per_device_train_batch_size} x {args.max_length} tokens, activation checkpointing "
        f"{'on' if args.activation_checkpointing else 'off'}, LoRA dropout {args.lora_dropout}\n"
        f"  --long_context {','.join(techniques) or 'off'}"
        + (" (auto)" if args.long_context == AUTO else "")
        + f", --max_host_memory {args.max_host_memory / GiB:.2f} GiB\n"
        f"  parameters: {counts.total_params:,} ({counts.quantizable_params:,} in quantizable linears); "
        f"trainable {est.trainable_count:,}"
        + (f" (LoRA {est.lora_count:,} + head {est.head_count:,})" if args.lora_r else "")
    )
    print(
        format_report(
            est,
            gpu_mem=gpu_mem,
            gpu_name=gpu_name,
            header=header,
            no_ckpt_total=no_ckpt,
            best_batch=best_batch,
            best_len=best_len,
            batch=args.per_device_train_batch_size,
            length=args.max_length,
        )
    )
    print()
    print(
        format_technique_table(
            rows,
            gpu_mem=gpu_mem,
            host_mem=args.max_host_memory,
            length=args.max_length,
            batch=args.per_device_train_batch_size,
            auto=auto,
        )
    )
    suggestions = suggest_settings(config, gpu_mem=gpu_mem, **kwargs)
    if suggestions:
        print("\n  suggested settings that fit:")
        for s in suggestions:
            print(f"    {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
