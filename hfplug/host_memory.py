"""The host side of the memory plan: what ``offload_activations`` puts in pinned host RAM, and the process's peak.

``offload_activations`` (:mod:`hfplug.long_context.offload`) moves the checkpointed inputs of the first
decoder layers to pinned host memory, as many layers as fit ``--max_host_memory`` (the budget for those
buffers); the other layers keep theirs on the GPU. :func:`plan_offload` does the same arithmetic before
anything is loaded, so ``hfplug.memory.estimate_memory`` can put each layer input on one side or the other.

The host peak the planner reports is :data:`HOST_PROCESS_RESERVE` plus the pinned buffers: the reserve the
runtime also leaves the process itself when it sizes ``--max_host_memory auto``
(``hfplug.long_context.apply.host_budget``), one number for both. It is a planning figure, not a
measurement of a given machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from hfplug.sizes import GiB, parse_memory

# Host memory the training process needs besides offloaded activations: Python, the torch/CUDA libraries,
# the tokenizer, the dataset's Arrow maps, one checkpoint shard while loading.
HOST_PROCESS_RESERVE = 5 * GiB
HOST_BASELINE = HOST_PROCESS_RESERVE
# A free Colab session's RAM (reference.md: ~12.7 GB; ``free`` shows 12.67 GB). ``python -m hfplug.fit``
# plans for it by default: the offload budget is this minus the baseline, ~6.8 GiB, as ``auto`` gives there.
COLAB_HOST_RAM = int(12.7e9)
COLAB_HOST_BUDGET = COLAB_HOST_RAM - HOST_BASELINE


def pinned_bytes(nbytes: int) -> int:
    """Host RAM ``nbytes`` of pinned memory take on a CUDA machine: PyTorch's caching host allocator rounds each
    allocation up to a power of two (as ``hfplug.long_context.offload.host_nbytes`` does with CUDA present; the
    planner always assumes CUDA, since it plans GPU runs from any machine)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


@dataclass(frozen=True)
class OffloadPlan:
    """Which checkpointed layer inputs go to host memory (the first ``layers_offloaded``), and their size."""

    layers_offloaded: int
    bytes_per_layer: int  # one layer input in pinned host memory (rounded up to a power of two)

    @property
    def host_bytes(self) -> int:
        return self.layers_offloaded * self.bytes_per_layer


def plan_offload(
    *, layers: int, tokens: int, hidden: int, residual_bytes: int, max_host_memory: int | None
) -> OffloadPlan:
    """As ``enable_offloaded_checkpointing`` plans it: ``min(layers, budget // pinned bytes of one layer input)``.

    ``max_host_memory=None``: no budget (every layer offloads). A layer input is ``tokens x hidden`` in the
    residual stream's dtype (the embeddings' dtype: fp32 after ``prepare_model_for_kbit_training``, 16-bit with
    ``frozen_16bit``).
    """
    if max_host_memory is not None and max_host_memory < 0:
        raise ValueError(f"max_host_memory={max_host_memory} must be >= 0 bytes (or None for no limit).")
    per_layer = pinned_bytes(tokens * hidden * residual_bytes)
    if max_host_memory is None:
        return OffloadPlan(layers, per_layer)
    return OffloadPlan(min(layers, max_host_memory // per_layer) if per_layer else layers, per_layer)


def host_budget(max_host_memory: str) -> int:
    """Bytes of pinned host memory ``offload_activations`` may use (``auto``: RAM minus the reserve)."""
    if max_host_memory == "auto":
        return max(0, psutil.virtual_memory().total - HOST_PROCESS_RESERVE)
    return parse_memory(max_host_memory)
