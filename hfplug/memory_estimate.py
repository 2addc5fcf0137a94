"""What the memory planner returns: :class:`MemoryEstimate`, the peak of one training step by part.

``hfplug.memory.estimate_memory`` fills it in; ``python -m hfplug.fit`` prints it. The GPU-side parts add up
to ``total``; ``peak_allocated``/``peak_reserved`` are what ``torch.cuda`` reports; ``peak_tensors`` is what a
tensor-level tracker measures on CPU (``benchmarks/memory_proxy.py``). The host side (``host_peak``) is the
training process's RAM with ``offload_activations`` (``hfplug.host_memory``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hfplug.host_memory import HOST_BASELINE
from hfplug.sizes import MiB

CUDA_CONTEXT = 512 * MiB  # CUDA runtime + cuBLAS/bitsandbytes kernels; outside torch's counters
CUBLAS_WORKSPACE = 32 * MiB  # allocated through the caching allocator
FRAGMENTATION = 0.08  # share of the per-step (activation/logit) churn the allocator cannot reuse


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one training step, by part (bytes). ``total`` is their sum. Host side below."""

    quantized_weights: int
    other_weights: int
    trainable_params: int
    gradients: int
    optimizer_states: int
    activations: int  # what layers keep alive at the peak (checkpoints + recomputed layer + grads)
    logits: int  # loss-side memory alive at the peak
    workspace: int  # dequantization buffer, cuBLAS workspace
    fragmentation: int
    cuda_context: int
    # Not summed: context for the reader.
    weights_at_load: int = 0  # quantized + unquantized weights right after from_pretrained
    peak_phase: str = ""
    activations_checkpointing: int = 0  # activations at the peak with checkpointing
    activations_no_checkpointing: int = 0  # ... and without
    logits_peak: int = 0  # the loss's own peak (forward or backward of the loss)
    trainable_count: int = 0
    lora_count: int = 0
    head_count: int = 0
    tokens: int = 0
    long_context: tuple[str, ...] = ()  # the techniques this estimate assumes (hfplug.long_context.TECHNIQUES)
    # Host memory: offload_activations' pinned buffers, and the process around them.
    layers_offloaded: int = 0
    host_offloaded: int = 0  # pinned host bytes holding offloaded layer inputs
    host_baseline: int = HOST_BASELINE  # the process itself (hfplug.host_memory)
    notes: list[str] = field(default_factory=list)

    _PARTS = (
        "quantized_weights",
        "other_weights",
        "trainable_params",
        "gradients",
        "optimizer_states",
        "activations",
        "logits",
        "workspace",
        "fragmentation",
        "cuda_context",
    )

    @property
    def total(self) -> int:
        """Everything the process needs on the GPU at the peak, CUDA context included."""
        return sum(getattr(self, name) for name in self._PARTS)

    @property
    def peak_allocated(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should report (no context, no fragmentation)."""
        return self.total - self.cuda_context - self.fragmentation

    @property
    def peak_reserved(self) -> int:
        """What ``torch.cuda.max_memory_reserved`` should report (allocator, no CUDA context)."""
        return self.total - self.cuda_context

    @property
    def peak_tensors(self) -> int:
        """The tensors alone: ``peak_allocated`` without the cuBLAS workspace, which only a GPU has. What a
        tensor-level tracker measures on CPU (``benchmarks/memory_proxy.py``)."""
        return self.peak_allocated - CUBLAS_WORKSPACE

    @property
    def host_peak(self) -> int:
        """Estimated host RAM of the training process: the baseline plus the pinned offload buffers."""
        return self.host_baseline + self.host_offloaded
