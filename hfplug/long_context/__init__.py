"""Long-context training: the names of the memory techniques, and ``--long_context`` parsing.

Each technique is one switch, named the same in the CLI, the YAML configs, the planner
(``python -m hfplug.fit``) and the code. They are listed cheapest first: ``auto`` turns
on the shortest prefix of this list that the planner says fits.

- ``frozen_16bit``: frozen non-quantized weights (embeddings, ``lm_head``, norms) stay in
  16-bit instead of the fp32 that ``peft.prepare_model_for_kbit_training`` gives them;
  only trainable parameters are fp32 (:mod:`hfplug.quantization`).
- ``efficient_attention``: SDPA restricted to kernels that are O(sequence) in memory
  (memory-efficient on a T4, flash on Ampere+ and CPU), never the math fallback that
  holds batch x heads x seq^2 scores (:mod:`hfplug.long_context.attention`).
- ``chunked_loss``: the causal-LM loss never holds batch x seq x vocab logits: Liger's
  fused linear cross-entropy on CUDA when installed, else hfplug's own chunked loss
  (:mod:`hfplug.long_context.loss`), in training and evaluation.
- ``tiled_mlp``: the MLP runs in sequence tiles in forward and backward, so the
  intermediate (e.g. 14,336-wide) activations of a long sequence never exist at once
  (:mod:`hfplug.long_context.tiled_mlp`).
- ``offload_activations``: checkpointed layer inputs go to pinned host memory, copied on a
  side stream that overlaps compute, within ``--max_host_memory``
  (:mod:`hfplug.long_context.offload`).

This module imports nothing heavy, so the planner can use the names without torch.
"""

from __future__ import annotations

from collections.abc import Iterable

TECHNIQUES = ("frozen_16bit", "efficient_attention", "chunked_loss", "tiled_mlp", "offload_activations")
AUTO = "auto"
OFF = "off"


def parse_long_context(value: str | Iterable[str] | None) -> tuple[str, ...] | str:
    """``"off"``/``None`` -> ``()``; ``"auto"`` -> ``"auto"``; ``"chunked_loss,tiled_mlp"`` ->
    those techniques in :data:`TECHNIQUES` order. Unknown names raise ``ValueError``."""
    if value is None:
        return ()
    parts = [value] if isinstance(value, str) else list(value)
    names = [p.strip() for part in parts for p in str(part).split(",") if p.strip()]
    if not names or names == [OFF]:
        return ()
    if names == [AUTO]:
        return AUTO
    if "all" in names:
        return TECHNIQUES
    unknown = [n for n in names if n not in TECHNIQUES]
    if unknown or AUTO in names or OFF in names:
        bad = unknown or [AUTO if AUTO in names else OFF]
        raise ValueError(
            f"--long_context {','.join(names)}: {', '.join(map(repr, bad))} cannot be combined or is unknown. "
            f"Give off, auto, all, or a comma-separated list of: {', '.join(TECHNIQUES)}."
        )
    return tuple(t for t in TECHNIQUES if t in names)
