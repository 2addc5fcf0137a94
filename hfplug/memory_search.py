"""Searching the memory planner's settings for what fits a GPU: the largest batch and length, ``--long_context auto``.

``max_batch_size`` and ``max_seq_len`` find the largest per-device batch size and sequence length whose
``hfplug.memory.estimate_memory`` plan fits ``gpu_mem`` bytes (a doubling then bisecting search);
``choose_techniques`` is ``--long_context auto`` (the shortest prefix of the applicable techniques whose plan
fits ``AUTO_HEADROOM`` of the GPU), answered as a ``TechniqueChoice``; ``suggest_settings`` lists the flags that would fit when a run
does not. ``python -m hfplug.fit`` prints them, and
``hfplug.training.memory_plan`` uses them before loading. Only the search is here: each plan is
``hfplug.memory``'s arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hfplug.memory import applicable_techniques, estimate_memory, named_techniques
from hfplug.memory_estimate import MemoryEstimate
from hfplug.sizes import GiB


def _fits(config, gpu_mem: int, **kwargs) -> bool:
    return estimate_memory(config, **kwargs).total <= gpu_mem


def _largest(fits, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with fits(n), assuming monotonic; lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    n = lo
    while n * 2 <= hi and fits(n * 2):
        n *= 2
    good, bad = n, min(n * 2, hi + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def max_batch_size(config, *, gpu_mem: int, limit: int = 65536, **kwargs) -> int:
    """Largest per-device batch size that fits ``gpu_mem`` bytes (0 if none)."""
    kwargs.pop("batch_size", None)
    return _largest(lambda b: _fits(config, gpu_mem, batch_size=b, **kwargs), 1, limit)


def max_seq_len(config, *, gpu_mem: int, limit: int | None = None, **kwargs) -> int:
    """Largest sequence length that fits ``gpu_mem`` bytes at the given batch size (0 if none)."""
    kwargs.pop("max_length", None)
    text = getattr(config, "get_text_config", lambda: config)()
    limit = limit or getattr(text, "max_position_embeddings", None) or 1 << 20
    return _largest(lambda s: _fits(config, gpu_mem, max_length=s, **kwargs), 1, limit)


@dataclass(frozen=True)
class TechniqueChoice:
    """What ``--long_context auto`` turns on: :func:`choose_techniques`' answer.

    Iterating gives the techniques, so ``tuple(choice)`` is the ``long_context`` to install.
    """

    techniques: tuple[str, ...]  # the shortest prefix of the applicable techniques that fits; all of them if none
    fits: bool  # whether ``techniques`` fit the GPU at the given length
    estimate: MemoryEstimate  # the plan with ``techniques``
    longest_with_all: int  # the longest max_length that fits with every applicable technique (0: none)
    applicable: tuple[str, ...] = ()

    def __iter__(self):
        return iter(self.techniques)

    def __len__(self) -> int:
        return len(self.techniques)

    @property
    def message(self) -> str:
        if self.fits:
            return f"--long_context auto turns on: {', '.join(self.techniques) or 'nothing (the run fits as is)'}"
        return (
            f"does not fit even with every technique ({', '.join(self.applicable)}): planned "
            f"{self.estimate.total / GiB:.2f} GiB; the longest max_length that fits with all of them is "
            f"{self.longest_with_all or 'none'}"
        )


# --long_context auto keeps this share of the GPU for what the plan cannot see (the planner's target is
# +-10 % of the measured peak): a technique costs only time, an out-of-memory error costs the run.
AUTO_HEADROOM = 0.9


def choose_techniques(config, *, gpu_mem: int, host_mem: int | None = None, **kwargs) -> TechniqueChoice:
    """``--long_context auto``: the shortest prefix of the applicable techniques (cheapest first, as
    ``hfplug.long_context.TECHNIQUES`` lists them) whose plan fits ``AUTO_HEADROOM`` of ``gpu_mem`` bytes
    (else the shortest that fits all of it, else all of them).

    ``host_mem``: bytes of host RAM ``offload_activations`` may fill (``--max_host_memory``); the layers whose
    inputs do not fit it stay on the GPU, so host memory never exceeds it and the GPU decides what fits.
    ``kwargs``: the other ``estimate_memory`` settings (``long_context`` is ignored).
    """
    kwargs.pop("long_context", None)
    kwargs["max_host_memory"] = host_mem if host_mem is not None else kwargs.get("max_host_memory")
    applicable = applicable_techniques(config, **kwargs)
    plans = [estimate_memory(config, long_context=applicable[:n], **kwargs) for n in range(len(applicable) + 1)]
    estimate = next(
        (plan for plan in plans if plan.total <= AUTO_HEADROOM * gpu_mem),
        next((plan for plan in plans if plan.total <= gpu_mem), plans[-1]),
    )
    fits = estimate.total <= gpu_mem
    longest = max_seq_len(config, gpu_mem=gpu_mem, long_context=applicable, **kwargs)
    return TechniqueChoice(estimate.long_context, fits, estimate, longest, applicable)


def suggest_settings(config, *, gpu_mem: int, **kwargs) -> list[str]:
    """Settings that would fit, most useful first; ``[]`` when the run fits as given."""
    if _fits(config, gpu_mem, **kwargs):
        return []
    out = []
    batch = kwargs.get("batch_size", 8)
    best_batch = max_batch_size(config, gpu_mem=gpu_mem, **kwargs)
    if best_batch >= 1:
        accum = math.ceil(batch / best_batch)
        out.append(
            f"--per_device_train_batch_size {best_batch} --gradient_accumulation_steps {accum} "
            f"(same effective batch of {best_batch * accum})"
        )
    longest = max_seq_len(config, gpu_mem=gpu_mem, **kwargs)
    if longest >= 1:
        out.append(f"--max_length {longest} (at batch size {batch})")
    if not kwargs.get("activation_checkpointing", True) and _fits(
        config, gpu_mem, **{**kwargs, "activation_checkpointing": True}
    ):
        out.append("--activation_checkpointing true")
    if kwargs.get("quant", "4bit") != "4bit":
        trial = {**kwargs, "quant": "4bit", "lora_r": kwargs.get("lora_r") or 16}
        if _fits(config, gpu_mem, **trial):
            out.append("--quant 4bit --lora")
    given = set(named_techniques(kwargs.get("long_context", ())))
    choice = choose_techniques(config, gpu_mem=gpu_mem, **kwargs)
    if set(choice.applicable) - given:
        if choice.fits:
            out.append(f"--long_context auto (turns on {', '.join(choice.techniques)})")
        elif choice.longest_with_all >= 1:
            out.append(
                f"--long_context all --max_length {choice.longest_with_all} (the longest that fits with "
                f"{', '.join(choice.applicable)})"
            )
    if not out:
        out.append("nothing fits this GPU even at batch size 1 and 1 token: use a larger GPU or a smaller model")
    return out
