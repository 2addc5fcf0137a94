"""``offload_activations``: activation checkpointing whose saved layer inputs live in pinned host memory.

With activation checkpointing, what stays on the device between forward and backward is each decoder layer's
input, batch x seq x hidden: at 64k tokens of Llama-3.1-8B in bf16 that is 0.5 GiB a layer, 16 GiB for 32 layers,
more than a T4 has. Keeping those inputs in host RAM instead frees the device, at the cost of one copy out per
layer in forward and one copy back in backward; done on a side CUDA stream, the copies overlap compute.

What transformers 5.24 already gives (measured with a tiny Llama on torch 2.13):
``activation_checkpointing_enable(offload=True)`` wraps ``torch.utils.checkpoint`` in
``torch.autograd.graph.save_on_cpu(pin_memory=True)``. With non-reentrant checkpointing this does move the layer
input off the device: the checkpoint saves its positional inputs as saved tensors, which pass through the hooks, and
the layer's recompute closure (``partial(forward, self, **kwargs)``) only holds the keyword arguments, e.g. the rotary
cos/sin shared by all layers. (The few transformers models that pass ``hidden_states`` to their layers by keyword keep
it in the closure, on the device; that holds here too.) What it lacks:

- both copies run on the compute stream, and the copy back starts only when the recompute asks for the input, so
  each layer's backward waits for its own host-to-device copy;
- every checkpointed layer is offloaded: there is no host-RAM budget (a Colab T4 has about 12 GB of RAM);
- on a machine without CUDA it raises (pinned memory needs an accelerator).

So this module reuses the same place and the same checkpoint (the ``torch.utils.checkpoint`` partial that
``activation_checkpointing_enable`` installed on each ``GradientCheckpointingLayer``) and only replaces the
saved-tensor hooks around it: copies on a side stream, the next layer's input prefetched during the backward of the
layer after it, and only the first layers that fit ``max_host_bytes`` offloaded (the rest keep their inputs on the
device, checkpointed as before). Without CUDA the "host copy" is a plain CPU clone, so the same logic runs in tests.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

# Where a layer keeps the checkpoint function it had before offloading, so enabling twice re-plans from scratch.
_ORIGINAL_FUNC = "_hfplug_checkpoint_func"


@dataclass
class OffloadStats:
    """What the hooks did since :func:`enable_offloaded_checkpointing` (for tests and logs)."""

    tensors_offloaded: int = 0
    kept_over_budget: int = 0  # tensors of an offloading layer left on the device: the host budget was full
    prefetched: int = 0  # copies back started ahead of need, overlapping the backward of the layer after
    fetched_on_demand: int = 0  # copies back started only when the recompute asked (the last layer in backward)
    host_bytes: int = 0  # host memory the offloaded tensors hold now
    peak_host_bytes: int = 0


@dataclass
class OffloadPlan:
    """Which layers offload. ``host_bytes_per_layer`` is one layer input at ``tokens_per_step`` tokens, counted as the
    pinned allocator takes it (rounded up to a power of two on CUDA)."""

    layers_offloaded: int
    layers_total: int
    bytes_per_token_per_layer: int
    host_bytes_per_layer: int
    max_host_bytes: int
    stats: OffloadStats = field(default_factory=OffloadStats, repr=False)


def host_nbytes(nbytes: int) -> int:
    """Host RAM that ``nbytes`` of pinned memory takes: PyTorch's caching host allocator rounds each allocation up to
    a power of two (``pinned_max_round_threshold`` defaults to unlimited). Without CUDA copies are plain: exact."""
    if nbytes <= 0 or not torch.cuda.is_available():
        return max(nbytes, 0)
    return 1 << (nbytes - 1).bit_length()


class _Saved:
    """One tensor a checkpoint saved: either ``kept`` on the device or copied to ``host`` (with its copy back)."""

    def __init__(self, pass_id, *, kept=None, host=None, device=None, nbytes=0, release=None):
        self.pass_id, self.kept, self.host, self.device, self.nbytes = pass_id, kept, host, device, nbytes
        self.on_device = None  # the copy back, once started
        self.ready = None  # CUDA event: the copy back has finished
        self._release = release

    def __del__(self):
        # The graph dropped this saved tensor (backward done, or the graph freed): its host memory is free again.
        if self._release is not None:
            self._release(self.nbytes)


class _Offloader:
    """The saved-tensor hooks of all layers of one model, and the state they share."""

    def __init__(self, plan: OffloadPlan):
        self.plan, self.stats = plan, plan.stats
        self.lock = threading.Lock()  # the backward runs on autograd's device thread; releases can race packs
        self.saved: dict[int, list[weakref.ref]] = {}  # layer index -> its offloaded tensors, for prefetching
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.pass_id = 0  # one per forward: prefetch only tensors of the forward being backpropagated
        self.warned = False

    def stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.stats.host_bytes -= nbytes

    def pack(self, index: int, offload: bool, tensor: torch.Tensor) -> _Saved:
        # A host tensor on a CUDA machine has no device memory to free; without CUDA it is "offloaded" all the same
        # (cloned), so that CPU tests run the logic a GPU run does.
        if not offload or tensor.numel() == 0 or (tensor.device.type == "cpu" and torch.cuda.is_available()):
            return _Saved(self.pass_id, kept=tensor)
        nbytes = host_nbytes(tensor.numel() * tensor.element_size())
        with self.lock:
            over = self.stats.host_bytes + nbytes > self.plan.max_host_bytes
            if over:
                self.stats.kept_over_budget += 1
            else:
                self.stats.host_bytes += nbytes
                self.stats.peak_host_bytes = max(self.stats.peak_host_bytes, self.stats.host_bytes)
                self.stats.tensors_offloaded += 1
        if over:
            # More tokens than the plan assumed: the budget is a hard cap on host RAM, so this one stays on the device.
            if not self.warned:
                self.warned = True
                logger.warning(
                    "offload_activations: a layer input of %d bytes does not fit max_host_bytes=%d (%d in use); it "
                    "stays on the device. The step has more tokens than tokens_per_step assumed.",
                    nbytes,
                    self.plan.max_host_bytes,
                    self.stats.host_bytes,
                )
            return _Saved(self.pass_id, kept=tensor)
        stream = self.stream(tensor.device)
        if stream is None:
            host = tensor.detach().clone()
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            # The input was written on the compute stream: the copy waits for it, later compute does not wait.
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor.detach(), non_blocking=True)
            # The device memory must not be reused (after the forward frees it) before the copy has read it.
            tensor.record_stream(stream)
        saved = _Saved(self.pass_id, host=host, device=tensor.device, nbytes=nbytes, release=self.release)
        refs = [r for r in self.saved.get(index, ()) if r() is not None]
        self.saved[index] = refs + [weakref.ref(saved)]
        return saved

    def fetch(self, saved: _Saved) -> None:
        """Start the copy back to the device, on the side stream."""
        if saved.on_device is not None:
            return
        stream = self.stream(saved.device)
        if stream is None:
            saved.on_device = saved.host
            return
        with torch.cuda.stream(stream):
            saved.on_device = saved.host.to(saved.device, non_blocking=True)
            saved.ready = stream.record_event()

    def unpack(self, index: int, saved: _Saved) -> torch.Tensor:
        if saved.kept is not None:
            tensor = saved.kept
        else:
            if saved.on_device is None:
                self.stats.fetched_on_demand += 1
                self.fetch(saved)
            # Not kept here: the device copy goes when the recompute is done with it; a second unpack copies again.
            tensor, saved.on_device = saved.on_device, None
            if saved.ready is not None:
                compute = torch.cuda.current_stream(saved.device)
                compute.wait_event(saved.ready)
                tensor.record_stream(compute)  # allocated on the side stream, used on the compute stream
        # Backward runs layers last to first: while this layer recomputes, bring back the previous layer's input.
        for ref in self.saved.get(index - 1, ()):
            previous = ref()
            if previous is not None and previous.pass_id == saved.pass_id and previous.on_device is None:
                self.stats.prefetched += 1
                self.fetch(previous)
        return tensor


def _offloading_checkpoint(offloader, index, offload, original, function, *args, **kwargs):
    """A layer's checkpoint function: ``original`` (torch's checkpoint) under this layer's saved-tensor hooks."""
    if index == 0 and torch.is_grad_enabled():
        offloader.pass_id += 1
    with torch.autograd.graph.saved_tensors_hooks(
        functools.partial(offloader.pack, index, offload), functools.partial(offloader.unpack, index)
    ):
        return original(function, *args, **kwargs)


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def enable_offloaded_checkpointing(model, *, max_host_bytes: int, tokens_per_step: int) -> OffloadPlan:
    """Offload the inputs of the first checkpointed decoder layers of ``model`` (PEFT-wrapped or not) to host memory.

    Call after activation checkpointing is enabled non-reentrant (``activation_checkpointing_enable(
    {"use_reentrant": False})``, as hfplug does). ``tokens_per_step`` is the most tokens one forward sees
    (batch x max length); each layer input takes ``tokens_per_step x hidden x`` the embedding dtype's bytes, and the
    first ``max_host_bytes // that`` layers offload (``max_host_bytes=0``: none). The budget is also a hard cap at run
    time: a forward with more tokens keeps the inputs that do not fit on the device. Calling again re-plans.
    """
    if not isinstance(max_host_bytes, int) or max_host_bytes < 0:
        raise ValueError(f"max_host_bytes must be an int >= 0 (bytes of host RAM), got {max_host_bytes!r}.")
    if not isinstance(tokens_per_step, int) or tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be an int >= 1 (batch x max length), got {tokens_per_step!r}.")
    from transformers.modeling_layers import GradientCheckpointingLayer

    model_type = _model_type(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            f"offload_activations: model type {model_type!r} ({type(model).__name__}) has no transformers "
            "GradientCheckpointingLayer, so its layer inputs cannot be offloaded. Turn offload_activations off."
        )
    layers = [m for m in layers if m.gradient_checkpointing]
    if not layers:
        raise ValueError(
            f"offload_activations: activation checkpointing is off in model type {model_type!r}. Enable it first "
            "(--activation_checkpointing, i.e. activation_checkpointing_enable({'use_reentrant': False}))."
        )
    originals = [getattr(m, _ORIGINAL_FUNC, None) or m._gradient_checkpointing_func for m in layers]
    for func in originals:
        plain = isinstance(func, functools.partial) and func.func is checkpoint
        if not plain or func.keywords.get("use_reentrant") is not False:
            raise ValueError(
                f"offload_activations: the layers of model type {model_type!r} use the checkpoint function {func!r}; "
                "it needs torch.utils.checkpoint with use_reentrant=False, as activation_checkpointing_enable("
                "{'use_reentrant': False}) installs without offload=True (offload_activations replaces that)."
            )

    embedding = model.get_input_embeddings().weight
    per_token = embedding.shape[-1] * embedding.element_size()  # the residual stream has the embeddings' dtype
    per_layer = host_nbytes(tokens_per_step * per_token)
    plan = OffloadPlan(
        layers_offloaded=min(len(layers), max_host_bytes // per_layer),
        layers_total=len(layers),
        bytes_per_token_per_layer=per_token,
        host_bytes_per_layer=per_layer,
        max_host_bytes=max_host_bytes,
    )
    offloader = _Offloader(plan)
    for index, (layer, original) in enumerate(zip(layers, originals)):
        setattr(layer, _ORIGINAL_FUNC, original)
        # Layer n (the first one kept on the device) is hooked too: its unpack prefetches layer n-1's input.
        if plan.layers_offloaded and index <= plan.layers_offloaded:
            offload = index < plan.layers_offloaded
            layer._gradient_checkpointing_func = functools.partial(
                _offloading_checkpoint, offloader, index, offload, original
            )
        else:
            layer._gradient_checkpointing_func = original
    logger.info("offload_activations: %s", plan)
    return plan
