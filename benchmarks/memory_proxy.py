"""Does the memory planner predict real training steps? A CPU proxy of Llama-3.1-8B QLoRA, technique by technique.

    python benchmarks/memory_proxy.py                      # ~10 min on 2 cores
    python benchmarks/memory_proxy.py --lengths 1024,2048,4096,8192,16384 --real_lengths 256,512
    python benchmarks/memory_proxy.py --skip narrow real --explain 8192:+tiled_mlp   # what is alive at a peak

The model is Llama-3.1-8B at full width (hidden 4,096, MLP 14,336, 32/8 heads, the full 128,256 vocabulary)
and reduced depth, loaded through ``from_pretrained`` from a lazy random checkpoint (benchmarks/t4_fit.py's
loader) with hfplug's bitsandbytes config (NF4 + double quantization; bitsandbytes 0.50 quantizes and runs
4-bit on CPU), prepared by ``hfplug.quantization.prepare_for_training`` (LoRA r=16 on all linear layers,
dropout 0, activation checkpointing), trained with the recipe's 8-bit AdamW. The ``--long_context``
techniques are turned on cumulatively, cheapest first, each through the switch a run uses
(``prepare_for_training(frozen_16bit=True)``, the ``efficient_attention`` attention implementation,
``hfplug.long_context.apply.apply_techniques`` for chunked_loss, tiled_mlp and offload_activations).

Method. ``PeakMemory`` is a ``TorchDispatchMode`` that sees every ATen op a step runs (forward, recompute,
backward, optimizer) and tracks tensor storages: an op output whose storage is new (not an input's, not
an alias by the op's schema: views, in-place and out= results) is an allocation of ``storage.nbytes()``,
freed when the storage object dies (``weakref.finalize``; PyTorch keeps one Python object per storage).
Measured peak = the static tensors alive before the step (parameters, buffers, bitsandbytes' quantization
constants, optimizer states, each storage once) + the tracker's peak during the step. The tracker is
checked first on known allocations (``torch.empty`` of N bytes -> N; a view -> 0; freed -> 0). It sees
op outputs only: scratch memory inside one kernel is not counted (on a GPU that is the cuBLAS workspace,
which the planner adds separately, so the planned column is ``MemoryEstimate.peak_tensors`` =
``peak_allocated`` without the cuBLAS workspace; no CUDA context or fragmentation either).

CPU FLOPs are the limit (2 cores; fp16 matmuls run at ~0.5 GFLOP/s here, fp32 at ~90). So:
[1] fp16 real steps on a narrow Llama next to FakeTensorMode steps of the same settings (fake/real = 1.0000
    means the fake steps allocate exactly what real ones do, fp16 autocast included);
[2] fp32 real steps at full width (1 decoder layer, short sequence, chunk and tile scaled down so that both
    techniques do something), also run fake (fake/real) and timed: the speed section;
[3] fp16 — the T4's compute dtype — FakeTensorMode steps at full width, 3 decoder layers, 1k-16k tokens:
    the same ops and autograd graph with no FLOPs (``FakeTensorMode``), against the planner;
[4] the planner for the full 32-layer config (the extrapolation), to 32,768 tokens.

Where a CPU run would differ from a T4's, the step is made to do what CUDA does (``gpu_semantics``):
PEFT's bitsandbytes LoRA asks ``torch.is_autocast_enabled()`` without a device (= CUDA) and would add casts
on CPU; efficient_attention off means the math kernel, as a T4 must use for grouped-query attention
without a mask (its memory-efficient kernel refuses GQA; the CPU would pick its flash kernel); under
FakeTensorMode transformers cannot read position ids and would build a seq x seq mask a real unpacked
batch never gets. offload_activations on CPU has no device to free, so the tracker counts the
offloader's host copies (allocations inside its pack hook) as host memory, and its copy back as a clone,
which is what ``.to(device)`` allocates on a GPU: the measured column is what would stay on, or come back
to, the device; host = the pinned buffers.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------- the tracker


@dataclass
class _Alloc:
    nbytes: int
    op: str
    shape: tuple
    dtype: torch.dtype
    host: bool
    backward: bool


@dataclass
class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by the ops run under it (see the module docstring)."""

    explain: bool = False
    live: int = 0
    peak: int = 0
    host_live: int = 0
    host_peak: int = 0
    peak_in_backward: bool = False
    peak_snapshot: list = field(default_factory=list)
    host_scope: bool = False  # allocations made while True are host (offloaded) memory

    def __post_init__(self):
        super().__init__()
        self._allocs: dict[int, _Alloc] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        returns = getattr(getattr(func, "_schema", None), "returns", ())
        aliases = [r.alias_info is not None for r in returns]
        for i, t in enumerate(tree_leaves(out)):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            # An output sharing an input's storage, or that the op's schema declares an alias of an input (a
            # view, an in-place or out= result), is no new memory. (The schema check matters under FakeTensorMode:
            # a real parameter's view gets a fake storage of its own.)
            if key in inputs or key in self._allocs or (i < len(aliases) and aliases[i]):
                continue
            self._add(key, storage, func, t)
        return out

    def _add(self, key, storage, func, t):
        alloc = _Alloc(
            storage.nbytes(),
            str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func),
            tuple(t.shape),
            t.dtype,
            self.host_scope,
            torch._C._current_graph_task_id() != -1,
        )
        self._allocs[key] = alloc
        weakref.finalize(storage, self._free, key)
        if alloc.host:
            self.host_live += alloc.nbytes
            self.host_peak = max(self.host_peak, self.host_live)
            return
        self.live += alloc.nbytes
        if self.live > self.peak:
            self.peak = self.live
            self.peak_in_backward = alloc.backward
            if self.explain:
                self.peak_snapshot = [a for a in self._allocs.values() if not a.host]

    def _free(self, key):
        alloc = self._allocs.pop(key)
        if alloc.host:
            self.host_live -= alloc.nbytes
        else:
            self.live -= alloc.nbytes

    def summary(self, top: int = 25) -> str:
        groups: dict[tuple, list[int]] = {}
        for a in self.peak_snapshot:
            k = (a.op, a.shape, str(a.dtype).removeprefix("torch."), "bwd" if a.backward else "fwd")
            groups.setdefault(k, [0, 0])
            groups[k][0] += a.nbytes
            groups[k][1] += 1
        rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
        return "\n".join(
            f"    {b / MiB:9.1f} MiB  x{n:<3} {op:<28} {shape} {dt} {ph}" for (op, shape, dt, ph), (b, n) in rows
        )


# --------------------------------------------------------------------------- the model


def _t4_fit():
    """benchmarks/t4_fit.py, for its lazy random checkpoint loader (same quantization path as real loading)."""
    import importlib.util

    if "t4_fit" not in sys.modules:
        spec = importlib.util.spec_from_file_location("t4_fit", os.path.join(os.path.dirname(__file__), "t4_fit.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["t4_fit"] = module
        spec.loader.exec_module(module)
    return sys.modules["t4_fit"]


def config_dict(layers: int, **overrides) -> dict:
    from hfplug.testing.llama31 import LLAMA31_8B

    return dict(LLAMA31_8B, num_hidden_layers=layers, **overrides)


def model_args(dtype: str, lora_r: int = 16):
    """4-bit NF4 + LoRA on all linear layers, dropout 0 (what the long-context configs use)."""
    from hfplug.model_args import ModelArguments

    return ModelArguments(quant="4bit", dtype=dtype, lora=True, lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)


def load(config: dict, *, dtype: str):
    """The model quantized by ``from_pretrained`` from a lazy random checkpoint (benchmarks/t4_fit.py's loader)."""
    import warnings

    from hfplug import quantization

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "--dtype float16 on CPU": known, fp16 rows only measure memory
        qconfig = quantization.get_quantization_config(model_args(dtype), device_type="cpu")
        return _t4_fit().build_model(
            config, "causal_lm", device="cpu", quantization_config=qconfig, dtype=getattr(torch, dtype)
        )


def prepare(model, *, dtype: str, frozen_16bit: bool):
    """``hfplug.quantization.prepare_for_training``, as a run calls it; in training mode."""
    from hfplug import quantization

    model = quantization.prepare_for_training(
        model, model_args(dtype), activation_checkpointing=True, frozen_16bit=frozen_16bit
    )
    model.train()
    return model


def build(layers: int, *, dtype: str, frozen_16bit: bool):
    """Llama-3.1-8B's shape at ``layers`` depth, loaded and prepared for training."""
    return prepare(load(config_dict(layers), dtype=dtype), dtype=dtype, frozen_16bit=frozen_16bit)


def install(model, technique: str, *, tokens: int, host_budget: int, chunk: int, tile: int) -> str:
    """Turn one technique on, through the switch a run uses (hfplug.long_context.apply); returns its log line.
    ``chunk``/``tile``: chunked_loss's chunk and tiled_mlp's tile, when not the runtime's defaults."""
    from hfplug.long_context.apply import LongContextPlan, apply_techniques, load_kwargs
    from hfplug.long_context.loss import install_chunked_loss
    from hfplug.long_context.tiled_mlp import enable_tiled_mlp

    base = model.get_base_model()
    if technique == "frozen_16bit":  # a preparation-time switch: the caller prepared the model with it
        return "frozen_16bit: prepare_for_training(frozen_16bit=True)"
    if technique == "efficient_attention":  # a load-time switch; set on the loaded model instead of loading again
        base.set_attn_implementation(load_kwargs((technique,))["attn_implementation"])
        return "efficient_attention: SDPA without the math kernel"
    (line,) = apply_techniques(model, LongContextPlan((technique,), tokens, host_budget))
    if technique == "chunked_loss" and chunk != 1024:
        install_chunked_loss(base, chunk_size=chunk)
        line += f" (chunks of {chunk} tokens)"
    if technique == "tiled_mlp" and tile != 4096:
        enable_tiled_mlp(base, tile_tokens=tile)
        line += f" (tiles of {tile} tokens)"
    return line


def offloaders(model) -> list:
    """The offload hooks' shared state, from the checkpoint functions offload_activations installed."""
    found = []
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(func, functools.partial) and func.args and type(func.args[0]).__name__ == "_Offloader":
            if all(func.args[0] is not f for f in found):
                found.append(func.args[0])
    return found


def static_bytes(model, optimizer=None) -> int:
    """Bytes of every tensor alive between steps: parameters, buffers, bitsandbytes' quantization constants,
    gradients and optimizer states (each storage once)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        add(t.grad)
        state = getattr(t, "quant_state", None)
        while state is not None:  # absmax, code book, and the nested (double-quantization) state's
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                add(value)
    return sum(seen.values())


# --------------------------------------------------------------------------- one step


@contextlib.contextmanager
def gpu_semantics(tracker: PeakMemory, model, *, fake: bool, math_attention: bool):
    """What a CUDA step does, where the CPU would differ (each is printed in the report's method notes):

    - PEFT's bnb LoRA layer asks ``torch.is_autocast_enabled()`` without a device, which means CUDA: on CPU it
      would cast the LoRA input to fp32 and back, copies a GPU run does not make. It is answered for the CPU here.
    - efficient_attention off: a T4 runs grouped-query SDPA without a mask on the math kernel (its
      memory-efficient kernel refuses GQA, it has no FlashAttention); the CPU would pick its flash kernel. The
      math kernel is forced.
    - under FakeTensorMode transformers cannot read the position ids, assumes packed sequences and builds a
      seq x seq mask a real unpacked batch never gets: it is told the batch is not packed.
    - offload_activations: its host copies (a CPU clone here) are counted as host memory, and its copy back to
      the device (none on CPU: the host tensor is used as is) is a clone, as ``.to(device)`` allocates on a GPU.
    """
    import transformers.masking_utils as masking
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    is_autocast_enabled = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda device_type=None: is_autocast_enabled(device_type or "cpu")
    stack.callback(setattr, torch, "is_autocast_enabled", is_autocast_enabled)
    if fake:
        packed = masking.find_packed_sequence_indices
        masking.find_packed_sequence_indices = lambda position_ids: None
        stack.callback(setattr, masking, "find_packed_sequence_indices", packed)
    if math_attention:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    for offloader in offloaders(model):
        pack, fetch = offloader.pack, offloader.fetch

        def host_pack(*args, _pack=pack):
            tracker.host_scope = True
            try:
                return _pack(*args)
            finally:
                tracker.host_scope = False

        def device_fetch(saved, _fetch=fetch):
            was_fetched = saved.on_device is not None
            _fetch(saved)
            if not was_fetched and saved.on_device is saved.host:
                saved.on_device = saved.host.clone()

        offloader.pack, offloader.fetch = host_pack, device_fetch
        stack.callback(setattr, offloader, "pack", pack)
        stack.callback(setattr, offloader, "fetch", fetch)
    with stack:
        yield


@dataclass
class Step:
    peak: int  # static tensors + the step's peak (bytes)
    host_peak: int
    seconds: float
    cpu_seconds: float  # this process's CPU time (both threads): steadier than wall time on a shared machine
    in_backward: bool
    tracker: PeakMemory


def train_step(model, tokens: int, *, dtype: str, fake: bool, math_attention: bool, optimizer=None, explain=False):
    """One forward + backward (+ optimizer step when real) of ``tokens`` random token ids, measured."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen)
    static = static_bytes(model, optimizer)
    tracker = PeakMemory(explain=explain)
    autocast = torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    start, cpu_start = time.perf_counter(), time.process_time()
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(gpu_semantics(tracker, model, fake=fake, math_attention=math_attention))
        with tracker:
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            if optimizer is not None and not fake:
                optimizer.step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    return Step(static + tracker.peak, tracker.host_peak, seconds, cpu_seconds, tracker.peak_in_backward, tracker)


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    section: str
    length: int
    techniques: tuple[str, ...]
    measured: int  # bytes: static tensors + the step's peak
    planned: int  # MemoryEstimate.peak_tensors
    kind: str  # "real" or "fake"
    host_measured: int = 0
    host_planned: int = 0
    fake: int = 0  # the fake step's peak at the same settings (real rows)
    seconds: float = float("nan")
    cpu_seconds: float = float("nan")
    phase: str = ""

    @property
    def ratio(self) -> float:
        return self.measured / self.planned


def label(techniques: tuple[str, ...]) -> str:
    return "+" + techniques[-1] if techniques else "plain"


def planned(config: dict, length: int, techniques, *, dtype: str, host_budget: int, chunk: int, tile: int):
    """The planner's estimate for the proxy's settings (``estimate_memory`` with the same reduced config)."""
    from transformers import LlamaConfig

    from hfplug.memory import estimate_memory

    return estimate_memory(
        LlamaConfig(**config),
        quant="4bit",
        lora_r=16,
        task="causal_lm",
        max_length=length,
        batch_size=1,
        dtype=dtype,
        lora_dropout=0.0,
        optim="paged_adamw_8bit",
        long_context=techniques,
        max_host_memory=host_budget,
        loss_chunk_size=chunk,
        tile_tokens=tile,
    )


def init_optimizer(model):
    """The recipe's 4-bit optimizer (bitsandbytes' paged 8-bit AdamW, CPU here), states created by one step on
    zero gradients, so that they count among the static tensors as in a run's later steps."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def cumulative(model, config, lengths, counts, *, dtype, real, host_budget, chunk, tile, section, explain=None):
    """Measure the rows ``TECHNIQUES[:n]`` for n in ``counts``, turning ``TECHNIQUES[n - 1]`` on before each.
    Every row runs a fake step; rows with n in ``real`` also a real one (then the row reports the real step)."""
    from hfplug.long_context import TECHNIQUES

    optimizer = init_optimizer(model)
    rows = []
    for n in counts:
        techniques = TECHNIQUES[:n]
        if n:
            line = install(model, techniques[-1], tokens=max(lengths), host_budget=host_budget, chunk=chunk, tile=tile)
            print(f"  {line}", flush=True)
        for length in lengths:
            if "offload_activations" in techniques:  # offloading is planned for the step's tokens, as in a run
                install(model, "offload_activations", tokens=length, host_budget=host_budget, chunk=chunk, tile=tile)
            math_attention = "efficient_attention" not in techniques
            est = planned(config, length, techniques, dtype=dtype, host_budget=host_budget, chunk=chunk, tile=tile)
            show = explain is not None and explain == (length, label(techniques))
            fake = train_step(
                model, length, dtype=dtype, fake=True, math_attention=math_attention, optimizer=optimizer, explain=show
            )
            row = Row(section, length, techniques, fake.peak, est.peak_tensors, "fake", fake.host_peak)
            row.host_planned, row.phase = (
                est.host_offloaded,
                f"{'bwd' if fake.in_backward else 'fwd'}/{est.peak_phase}",
            )
            if n in real:
                step = train_step(
                    model, length, dtype=dtype, fake=False, math_attention=math_attention, optimizer=optimizer
                )
                row.kind, row.fake, row.measured = "real", fake.peak, step.peak
                row.seconds, row.cpu_seconds = step.seconds, step.cpu_seconds
                row.host_measured = step.host_peak
            print(format_row(row), flush=True)
            if show:
                print(fake.tracker.summary())
            rows.append(row)
    return rows


def format_row(row: Row) -> str:
    text = (
        f"  {row.length:>6} {label(row.techniques):<22} {row.kind:<5}{row.measured / GiB:>9.3f}{row.planned / GiB:>9.3f}"
        f"{row.ratio:>7.3f}  {row.phase:<18}"
    )
    if row.host_planned or row.host_measured:
        text += f" host {row.host_measured / GiB:.3f}/{row.host_planned / GiB:.3f}"
    if row.kind == "real":
        text += f"  fake/real {row.fake / row.measured:.4f}  {row.seconds:5.1f} s wall, {row.cpu_seconds:5.1f} s CPU"
    return text


HEADER = (
    f"  {'tokens':>6} {'techniques (cumulative)':<22} {'kind':<5}{'measured':>9}{'planned':>9}{'ratio':>7}  "
    f"{'peak (meas/plan)':<18}"
)


# --------------------------------------------------------------------------- main


def tracker_check() -> str:
    """The tracker on known allocations: torch.empty of N bytes -> N, real and under FakeTensorMode; a view and
    an in-place op -> nothing; a freed tensor -> back to 0."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n = 12_345_679
    results = []
    for fake in (False, True):
        with contextlib.ExitStack() as stack:
            if fake:
                stack.enter_context(FakeTensorMode())
            with PeakMemory() as tracker:
                t = torch.empty(n, dtype=torch.uint8)
                t.view(-1, 1).add_(1)
                after = tracker.live
                del t
            results.append((after, tracker.live, tracker.peak))
    ok = all(r == (n, 0, n) for r in results)
    if not ok:
        raise SystemExit(f"tracker check failed: {results} (want ({n}, 0, {n}) real and fake)")
    return f"tracker check: torch.empty({n:,} bytes) -> {n:,} live, a view and an in-place add -> +0, freed -> 0 (real and fake): ok"


def section_rows(config, lengths, *, dtype, real, host_budget, chunk, tile, section, explain=None, one_model=False):
    """All cumulative rows: ``plain`` on a model prepared as without ``frozen_16bit`` (fp32 frozen weights), the
    others on one prepared with it, the techniques added in order. ``one_model``: fp32 compute, where
    frozen_16bit changes nothing, so one model serves every row."""
    import copy

    from hfplug.long_context import TECHNIQUES

    everything = range(len(TECHNIQUES) + 1)
    kw = dict(
        dtype=dtype, real=real, host_budget=host_budget, chunk=chunk, tile=tile, section=section, explain=explain
    )
    base = load(config, dtype=dtype)
    if one_model:
        return cumulative(prepare(base, dtype=dtype, frozen_16bit=False), config, lengths, everything, **kw)
    plain = prepare(copy.deepcopy(base), dtype=dtype, frozen_16bit=False)
    rows = cumulative(plain, config, lengths, [0], **kw)
    del plain
    gc.collect()
    return rows + cumulative(prepare(base, dtype=dtype, frozen_16bit=True), config, lengths, everything[1:], **kw)


def main(argv=None) -> int:
    import argparse
    import platform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="decoder layers of the fp16 (fake-step) proxy")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="fp16 rows' lengths (fake steps)")
    parser.add_argument("--real_layers", type=int, default=1, help="decoder layers of the fp32 real-step proxy")
    parser.add_argument("--real_lengths", default="256", help="fp32 real rows' lengths (each also run fake)")
    parser.add_argument("--real_chunk", type=int, default=64, help="chunked_loss chunk in the real rows")
    parser.add_argument("--real_tile", type=int, default=64, help="tiled_mlp tile in the real rows")
    parser.add_argument(
        "--max_host_memory", default="96MiB", help="offload budget of the proxy rows (1.5 layer inputs at 8k fp16)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=("narrow", "real", "fake"), help="sections to skip")
    parser.add_argument(
        "--explain", default=None, help="print the tensors alive at one fp16 row's peak: 8192:+tiled_mlp"
    )
    args = parser.parse_args(argv)

    import logging
    import warnings

    import bitsandbytes
    import transformers

    from hfplug.long_context import TECHNIQUES

    # Known and beside the point here: fp16 on CPU, deprecated checkpointing names, paged optimizers on CPU.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(Paged optimizers|float16 on CPU).*")
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("hfplug").setLevel(logging.ERROR)
    from hfplug.sizes import parse_memory

    budget = parse_memory(args.max_host_memory)
    lengths = [int(x) for x in args.lengths.split(",")]
    real_lengths = [int(x) for x in args.real_lengths.split(",")]
    explain = None
    if args.explain:
        at, name = args.explain.split(":")
        explain = (int(at), name)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(
        f"memory_proxy: Llama-3.1-8B shape (hidden 4096, MLP 14336, 32/8 heads, vocab 128,256) at reduced depth, "
        f"NF4 4-bit + LoRA r=16 on all linears (dropout 0), batch 1\n"
        f"  CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(f"  {tracker_check()}")
    print(
        "  measured = static tensors (parameters, quantization constants, optimizer states) + the step's peak of\n"
        "  tensor storage (PeakMemory); planned = hfplug.memory.estimate_memory(...).peak_tensors for the same\n"
        "  reduced config; ratio = measured / planned; peak = where the step peaked (fwd/bwd) / the planner's phase"
    )
    rows: list[Row] = []

    if "narrow" not in args.skip:
        narrow = config_dict(
            2,
            hidden_size=256,
            intermediate_size=896,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=2000,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        print(
            "\n[1] fp16 real vs fake steps on a narrow Llama (hidden 256, MLP 896, 8/2 heads, vocab 2000, 2 layers), "
            "256 tokens, chunk 64, tile 64: fp16 matmuls run ~0.5 GFLOP/s on this CPU, so full width is fake-only"
        )
        print(HEADER)
        rows += section_rows(
            narrow,
            [256],
            dtype="float16",
            real={0, len(TECHNIQUES)},
            host_budget=budget,
            chunk=64,
            tile=64,
            section="narrow fp16",
        )
    if "real" not in args.skip:
        print(
            f"\n[2] fp32 real steps (forward, backward, optimizer), full width, {args.real_layers} decoder layer(s), "
            f"chunk {args.real_chunk}, tile {args.real_tile}: memory real vs fake vs planned, and speed\n"
            "    (fp32 compute: frozen_16bit changes nothing, so its row is only run fake)"
        )
        print(HEADER)
        rows += section_rows(
            config_dict(args.real_layers),
            real_lengths,
            dtype="float32",
            real={n for n in range(len(TECHNIQUES) + 1) if n != 1},
            host_budget=budget,
            chunk=args.real_chunk,
            tile=args.real_tile,
            section="real fp32",
            one_model=True,
        )
    if "fake" not in args.skip:
        print(
            f"\n[3] fp16 (the T4's compute dtype) fake steps, full width, {args.layers} decoder layers, chunk 1024, "
            f"tile 4096, offload budget {budget / MiB:.0f} MiB"
        )
        print(HEADER)
        rows += section_rows(
            config_dict(args.layers),
            lengths,
            dtype="float16",
            real=set(),
            host_budget=budget,
            chunk=1024,
            tile=4096,
            section="fake fp16",
            explain=explain,
        )
    print_extrapolation(lengths + [32768])
    print_summary(rows)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0


def print_extrapolation(lengths) -> None:
    """The planner for the full 32-layer config on a T4 (15 GiB) with a free Colab's host budget."""
    from hfplug.host_memory import COLAB_HOST_BUDGET
    from hfplug.long_context import TECHNIQUES

    print(
        f"\n[4] 32-layer extrapolation (the planner, full Llama-3.1-8B config, fp16, lora_dropout 0): GPU total GiB "
        f"(with CUDA context) / host peak GiB, offload budget {COLAB_HOST_BUDGET / GiB:.2f} GiB"
    )
    print(f"  {'tokens':>6}" + "".join(f"{label(TECHNIQUES[:n]):>24}" for n in range(len(TECHNIQUES) + 1)))
    full = config_dict(32)
    for length in lengths:
        cells = []
        for n in range(len(TECHNIQUES) + 1):
            est = planned(
                full, length, TECHNIQUES[:n], dtype="float16", host_budget=COLAB_HOST_BUDGET, chunk=1024, tile=4096
            )
            mark = "" if est.total <= 15 * GiB else "*"
            cells.append(f"{est.total / GiB:.2f}{mark} / {est.host_peak / GiB:.2f}")
        print(f"  {length:>6}" + "".join(f"{c:>24}" for c in cells))
    print("  (* = over a T4's 15 GiB)")


def print_summary(rows: list[Row]) -> None:
    if not rows:
        return
    target = [r for r in rows if r.section != "narrow fp16"]
    if target:
        worst = max(target, key=lambda r: abs(r.ratio - 1))
        off = [r for r in target if abs(r.ratio - 1) > 0.10]
        print(
            f"\nsummary: {len(target)} Llama-3.1-8B-shaped rows ({sum(r.kind == 'real' for r in target)} real, "
            f"{sum(r.kind == 'fake' for r in target)} fake): measured/planned from "
            f"{min(r.ratio for r in target):.3f} to {max(r.ratio for r in target):.3f}; worst {worst.section} "
            f"{worst.length} {label(worst.techniques)}; "
            + ("all within +-10 %" if not off else f"{len(off)} OUTSIDE +-10 %")
        )
    narrow = [r for r in rows if r.section == "narrow fp16"]
    if narrow:
        print(
            f"  narrow fp16 rows (the fake-vs-real check; not in the target: their ~10 MiB are dominated by per-step "
            f"constants the planner counts in full, e.g. every LoRA gradient): measured/planned "
            f"{min(r.ratio for r in narrow):.3f} to {max(r.ratio for r in narrow):.3f}"
        )
    checks = [r for r in rows if r.kind == "real"]
    if checks:
        print(
            "  fake/real peaks (same settings): "
            + ", ".join(f"{r.section} {label(r.techniques)} {r.fake / r.measured:.4f}" for r in checks)
        )
    speed = [r for r in rows if r.section == "real fp32" and r.kind == "real"]
    if speed:
        plain = {r.length: r for r in speed if not r.techniques}
        print(
            "  speed (fp32 CPU, real steps: forward, backward, optimizer; tokens per second of wall time and of this "
            "process's CPU time;\n  slowdown = CPU seconds / plain's at the same length, the steadier measure on a "
            "shared machine):"
        )
        for r in speed:
            base = plain.get(r.length)
            slow = r.cpu_seconds / base.cpu_seconds if base else float("nan")
            wall = r.seconds / base.seconds if base else float("nan")
            print(
                f"    {r.length:>6} {label(r.techniques):<22} {r.length / r.seconds:7.1f} tok/s wall "
                f"{r.length / r.cpu_seconds:7.1f} tok/CPU-s   slowdown x{slow:.2f} (wall x{wall:.2f})"
            )
        print(
            "    (a CPU proxy: offload's copies are CPU clones here, not PCIe transfers; bitsandbytes dequantizes on "
            "the CPU; the ratios say what extra work a technique adds, not a T4's timings)"
        )


if __name__ == "__main__":
    sys.exit(main())
