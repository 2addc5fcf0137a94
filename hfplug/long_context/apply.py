"""Turn ``--long_context`` into techniques on a model: which apply, and installing them.

    techniques = resolve_techniques(model_args.long_context, causal_lm=True, planned=...)
    load kwargs += load_kwargs(techniques)                  # efficient_attention: at load time
    model = prepare_for_training(..., frozen_16bit="frozen_16bit" in techniques)
    apply_techniques(model, LongContextPlan(techniques, tokens_per_step, host_budget(...)))  # the rest

``auto`` is decided by the memory planner (``hfplug.memory_search.choose_techniques``) in
``hfplug.training.model_setup``; this module only knows what each technique needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hfplug.long_context import AUTO, TECHNIQUES, attention, parse_long_context
from hfplug.long_context.loss import install_chunked_loss
from hfplug.long_context.offload import enable_offloaded_checkpointing
from hfplug.long_context.tiled_mlp import enable_tiled_mlp

logger = logging.getLogger(__name__)

# Techniques that only mean something for a causal LM's loss.
CAUSAL_LM_ONLY = ("chunked_loss",)


@dataclass(frozen=True)
class LongContextPlan:
    """What a run installs: the techniques, and the step size and host budget offloading is sized for."""

    techniques: tuple[str, ...] = ()
    tokens_per_step: int = 0
    host_budget: int = 0

    def __contains__(self, technique: str) -> bool:
        return technique in self.techniques


def resolve_techniques(
    long_context: str, *, applicable: tuple[str, ...], auto: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """The techniques to install for ``--long_context``.

    ``applicable``: those that change this run (``hfplug.memory.applicable_techniques``);
    ``all`` means them, ``auto`` the planner's choice ``auto``. A technique named
    explicitly that cannot apply is an error rather than silently ignored.
    """
    parsed = parse_long_context(long_context)
    if parsed == AUTO:
        return tuple(auto)
    if parsed == TECHNIQUES:
        return applicable
    misplaced = [t for t in parsed if t in CAUSAL_LM_ONLY and t not in applicable]
    if misplaced:
        raise ValueError(
            f"--long_context {long_context}: {', '.join(misplaced)} replaces a causal LM's vocabulary-sized "
            "loss; a classifier's loss is already small. Drop it (or use --long_context auto or all)."
        )
    return parsed


def load_kwargs(techniques: tuple[str, ...], config=None) -> dict:
    """``from_pretrained`` keyword arguments the techniques need (the attention implementation)."""
    if "efficient_attention" not in techniques:
        return {}
    if config is not None:
        attention.check_supported(config)
    return {"attn_implementation": attention.register()}


def apply_techniques(model, plan: LongContextPlan) -> list[str]:
    """Install ``chunked_loss``, ``tiled_mlp`` and ``offload_activations`` on a prepared model.

    ``model`` may be a PEFT model; ``frozen_16bit`` and ``efficient_attention`` were applied
    at preparation and load. Returns one line per technique for the log.
    """
    techniques = plan.techniques
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lines = []
    if "frozen_16bit" in techniques:
        lines.append("frozen_16bit: frozen weights kept in 16-bit, trainable parameters in fp32")
    if "efficient_attention" in techniques:
        lines.append("efficient_attention: SDPA limited to O(sequence) kernels (memory-efficient on a T4)")
    if "chunked_loss" in techniques:
        backend = install_chunked_loss(base)
        name = "Liger's fused linear cross-entropy" if backend == "liger" else "hfplug's chunked loss"
        lines.append(f"chunked_loss: {name}, no batch x seq x vocab logits")
    if "tiled_mlp" in techniques:
        count = enable_tiled_mlp(base)
        lines.append(f"tiled_mlp: {count} MLPs run in sequence tiles")
    if "offload_activations" in techniques:
        if not getattr(base, "is_activation_checkpointing", False):
            raise ValueError(
                "offload_activations moves checkpointed layer inputs to host memory, but activation "
                "checkpointing is off: add --activation_checkpointing true."
            )
        plan = enable_offloaded_checkpointing(
            base, max_host_bytes=plan.host_budget, tokens_per_step=plan.tokens_per_step
        )
        lines.append(f"offload_activations: {plan}")
    return lines
