"""Does QLoRA on Llama-3.1-8B fit a Colab T4, and does the planner predict it?  (CUDA GPU only)

    python benchmarks/t4_fit.py                      # all four cases, 15 GiB cap, fp16
    python benchmarks/t4_fit.py --cases a b --json results.json

A randomly initialised model with the exact Llama-3.1-8B config (nothing is downloaded)
is loaded through ``from_pretrained`` itself: the checkpoint is a state dict of lazy
random tensors, each made on the GPU only when transformers materialises it, so every
weight goes through the same bitsandbytes quantization step as real loading (NF4 +
double quantization, fp16 compute, embeddings/lm_head/norms left unquantized) without
16 GB of random weights in host memory or on disk. The allocator is capped at 15 GiB
(``torch.cuda.set_per_process_memory_fraction``) and everything computes in fp16, as on
a T4 (no bf16). Training goes through ``hfplug.quantization.prepare_for_training`` and
the ``paged_adamw_8bit`` optimizer, as ``finetune_hupd.py`` does.

Cases:
  (a) sequence classification (decision), max_length 512, batch 8, padded batch
  (b) causal LM, 2048 tokens, batch 1, the model's own loss (full logits)
  (c) the longest causal-LM sequence that fits, batch 1, with --long_context
      chunked_loss,offload_activations (hfplug.long_context); found by doubling from 2048
      and then bisecting (to 256 tokens), catching OOM.
  (d) causal LM at 32,768 tokens, batch 1, with the --long_context techniques turned on
      one by one, cheapest first (plain, +frozen_16bit, ..., all: the rows of
      ``python -m hfplug.fit --long_context``), each installed through the runtime's own
      switches (hfplug.long_context.apply); offload within Colab's host budget (6.83 GiB).

For each: peak allocated and reserved memory, tokens/s, the planner's prediction
(hfplug.memory.estimate_memory) and measured / predicted ratios. Targets: (a) and (b) fit;
the planner within +-10 % of the measured peak; (c) >= 8,192 tokens; (d) fits with
--long_context all, and each row's fit/OOM as the planner says.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from hfplug.host_memory import COLAB_HOST_BUDGET  # noqa: E402
from hfplug.long_context import TECHNIQUES  # noqa: E402
from hfplug.testing.llama31 import LLAMA31_8B  # noqa: E402  (meta-llama/Llama-3.1-8B's config.json)

GiB = 1024**3
CAP = 15 * GiB  # the T4's usable memory
HOST_BUDGET = COLAB_HOST_BUDGET  # --max_host_memory for offload_activations: Colab's RAM less the process reserve
LONG = 32768  # case (d): the long-context target

# --------------------------------------------------------------------------- model


class RandomWeight:
    """A lazily materialised random tensor that looks like a safetensors slice.

    transformers reads checkpoint tensors with ``slice[...]`` right before converting
    (quantizing) them, so the random values exist one tensor at a time, on ``device``.
    """

    def __init__(self, shape, *, device, std: float, ones: bool, seed: int):
        self.shape, self.device, self.std, self.ones, self.seed = tuple(shape), device, std, ones, seed

    def get_shape(self):
        return list(self.shape)

    def get_dtype(self):
        return "F16"

    def __getitem__(self, index):
        if self.ones:  # norm weights: the initialisation a real checkpoint starts from
            return torch.ones(self.shape, dtype=torch.float16, device=self.device)[index]
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        out = torch.empty(self.shape, dtype=torch.float16, device=self.device)
        return out.normal_(0.0, self.std, generator=gen)[index]


def model_class(task: str):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    return LlamaForSequenceClassification if task == "decision" else LlamaForCausalLM


def build_model(
    config_dict: dict,
    task: str,
    *,
    device,
    quantization_config,
    dtype=torch.float16,
    num_labels: int = 2,
    attn_implementation: str = "sdpa",
):
    """Random-weight model loaded (and quantized) by ``from_pretrained`` from a lazy state dict."""
    from transformers import LlamaConfig

    config = LlamaConfig(**config_dict)
    config.num_labels = num_labels
    cls = model_class(task)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in cls(config).state_dict().items()}
    std = config.initializer_range
    state_dict = {
        name: RandomWeight(shape, device=device, std=std, ones=name.endswith("norm.weight"), seed=i)
        for i, (name, shape) in enumerate(sorted(shapes.items()))
    }
    return cls.from_pretrained(
        None,
        config=config,
        state_dict=state_dict,
        quantization_config=quantization_config,
        dtype=dtype,
        device_map={"": device},
        attn_implementation=attn_implementation,
    )


def model_args(lora_r: int = 16, lora_dropout: float = 0.05):
    """The options the recipe's T4 config uses: 4-bit, LoRA on all linear layers, fp16 (long context: dropout 0)."""
    from hfplug.model_args import ModelArguments

    return ModelArguments(
        quant="4bit", dtype="float16", lora=True, lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout
    )


def gqa_attention_ok(device) -> bool:
    """Whether SDPA runs grouped-query attention (no mask) with a memory-efficient kernel here.

    transformers asks SDPA for ``enable_gqa`` on unmasked batches; a GPU whose efficient
    kernels cannot do that would fall back to the math kernel, which materialises the
    full attention matrix.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 32, 256, 128, device=device, dtype=torch.float16, requires_grad=True)
    kv = torch.randn(1, 8, 256, 128, device=device, dtype=torch.float16, requires_grad=True)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(
                q, kv, kv, is_causal=True, enable_gqa=True
            ).sum().backward()
        return True
    except RuntimeError:
        return False


def register_repeat_kv_attention() -> str:
    """An SDPA attention that repeats k/v to all heads first, so efficient kernels apply."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv

    def sdpa_repeat_kv(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        groups = module.num_key_value_groups
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=attention_mask is None and query.shape[2] > 1,
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("sdpa_repeat_kv", sdpa_repeat_kv)
    return "sdpa_repeat_kv"


# --------------------------------------------------------------------------- steps


@dataclass
class Result:
    case: str
    batch: int
    seq_len: int
    fits: bool
    peak_allocated_gib: float = float("nan")
    peak_reserved_gib: float = float("nan")
    tokens_per_s: float = float("nan")
    planned_allocated_gib: float = float("nan")
    planned_reserved_gib: float = float("nan")
    planned_total_gib: float = float("nan")
    error: str = ""

    @property
    def ratio_allocated(self) -> float:
        return self.peak_allocated_gib / self.planned_allocated_gib

    @property
    def ratio_reserved(self) -> float:
        return self.peak_reserved_gib / self.planned_reserved_gib


def make_batch(task: str, batch: int, seq_len: int, vocab: int, device, *, padded: bool, pad_id: int = 0):
    """Random token ids; a classification batch is right-padded like a real one."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padded:
        for row in range(1, batch):  # row 0 stays full length: the batch is max_length wide
            length = int(torch.randint(seq_len * 3 // 4, seq_len, (1,), generator=gen))
            mask[row, length:] = 0
            ids[row, length:] = pad_id
    out = {"input_ids": ids.to(device)}
    if padded:  # an unpadded batch needs no mask, which lets SDPA run causal (and GQA) kernels
        out["attention_mask"] = mask.to(device)
    if task == "decision":
        out["labels"] = torch.randint(0, 2, (batch,), generator=gen).to(device)
    else:
        out["labels"] = ids.masked_fill(mask == 0, -100).to(device)
    return out


def train_steps(model, optimizer, scaler, batch: dict, *, steps: int) -> float:
    """Run fp16-autocast QLoRA steps; returns seconds per step (after the first). The model's own loss: with
    chunked_loss installed (hfplug.long_context.apply) it computes no logits."""
    model.train()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        del loss
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0]


def planned(
    config, task: str, batch: int, seq_len: int, *, long_context: tuple[str, ...], lora_r: int, lora_dropout=0.05
):
    """The planner's estimate for one case (the run's settings: 4-bit, LoRA on all linears, fp16, 8-bit pages)."""
    from hfplug.memory import estimate_memory

    return estimate_memory(
        config,
        quant="4bit",
        lora_r=lora_r,
        task="decision" if task == "decision" else "causal_lm",
        max_length=seq_len,
        batch_size=batch,
        activation_checkpointing=True,
        optim="paged_adamw_8bit",
        num_labels=2,
        dtype="float16",
        lora_dropout=lora_dropout,
        long_context=long_context,
        max_host_memory=HOST_BUDGET,
    )


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def install_techniques(model, techniques: tuple[str, ...], tokens: int) -> None:
    """chunked_loss, tiled_mlp, offload_activations on a prepared model, sized for ``tokens`` (the runtime's switch)."""
    from hfplug.long_context.apply import LongContextPlan, apply_techniques

    late = tuple(t for t in techniques if t in ("chunked_loss", "tiled_mlp", "offload_activations"))
    if late:
        apply_techniques(model, LongContextPlan(late, tokens, HOST_BUDGET))


def run_case(
    name, model, optimizer, scaler, config, task, batch, seq_len, *, long_context, steps, lora_r, lora_dropout=0.05
):
    """One measured configuration; an OOM is a result (fits=False), not a crash. ``long_context``: the
    techniques the model has (installed by the caller), for the planner."""
    est = planned(config, task, batch, seq_len, long_context=long_context, lora_r=lora_r, lora_dropout=lora_dropout)
    result = Result(
        name,
        batch,
        seq_len,
        fits=False,
        planned_allocated_gib=est.peak_allocated / GiB,
        planned_reserved_gib=est.peak_reserved / GiB,
        planned_total_gib=est.total / GiB,
    )
    data = make_batch(
        task,
        batch,
        seq_len,
        LLAMA31_8B["vocab_size"],
        "cuda",
        padded=task == "decision",
        pad_id=LLAMA31_8B["pad_token_id"],
    )
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = train_steps(model, optimizer, scaler, data, steps=steps)
    except torch.OutOfMemoryError as err:
        optimizer.zero_grad(set_to_none=True)
        result.error = str(err).splitlines()[0][:200]
    else:
        result.fits = True
        result.tokens_per_s = batch * seq_len / seconds
    result.peak_allocated_gib = torch.cuda.max_memory_allocated() / GiB
    result.peak_reserved_gib = torch.cuda.max_memory_reserved() / GiB
    del data
    free_memory()
    return result


def longest_sequence(model, optimizer, scaler, config, *, steps, lora_r, start=2048, step=256, limit=131072):
    """Double from ``start`` until OOM, then bisect to ``step`` tokens; all trials are returned."""
    trials = []
    techniques = ("chunked_loss", "offload_activations")
    attention = ("efficient_attention",)  # (O(seq) attention: see main)

    def attempt(length):
        install_techniques(model, techniques, length)  # offloading is planned for the step's tokens
        res = run_case(
            f"c@{length}",
            model,
            optimizer,
            scaler,
            config,
            "causal_lm",
            1,
            length,
            long_context=attention + techniques,
            steps=steps,
            lora_r=lora_r,
        )
        trials.append(res)
        print(
            f"  (c) {length:>6} tokens: {'fits' if res.fits else 'OOM'}"
            f"  peak reserved {res.peak_reserved_gib:.2f} GiB",
            flush=True,
        )
        return res.fits

    good, bad = 0, None
    length = start
    while length <= limit:
        if attempt(length):
            good, length = length, length * 2
        else:
            bad = length
            break
    if good == 0:
        return trials, 0
    bad = bad or limit + step
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if attempt(mid) else (good, mid)
    return trials, good


# --------------------------------------------------------------------------- main


def setup_model(task: str, attn: str, lora_r: int, *, techniques: tuple[str, ...] = (), lora_dropout: float = 0.05):
    """Load, quantize and prepare the model for one task; returns (model, optimizer, scaler).

    ``techniques``: the load- and preparation-time ones are applied here as a run applies them
    (efficient_attention: the attention implementation; frozen_16bit: preparation); the others
    with :func:`install_techniques`, once the step's length is known.
    """
    import bitsandbytes as bnb

    from hfplug.long_context.apply import load_kwargs
    from hfplug.quantization import get_quantization_config, prepare_for_training

    args = model_args(lora_r, lora_dropout)
    attn = load_kwargs(techniques).get("attn_implementation", attn)
    t0 = time.perf_counter()
    model = build_model(
        LLAMA31_8B,
        task,
        device="cuda",
        quantization_config=get_quantization_config(args, device_type="cuda"),
        attn_implementation=attn,
    )
    print(
        f"  loaded + quantized in {time.perf_counter() - t0:.0f} s; "
        f"allocated {torch.cuda.memory_allocated() / GiB:.2f} GiB, "
        f"reserved {torch.cuda.memory_reserved() / GiB:.2f} GiB",
        flush=True,
    )
    model = prepare_for_training(model, args, activation_checkpointing=True, frozen_16bit="frozen_16bit" in techniques)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    scaler = torch.amp.GradScaler("cuda")
    print(
        f"  prepared: allocated {torch.cuda.memory_allocated() / GiB:.2f} GiB, "
        f"trainable {sum(p.numel() for p in params):,}",
        flush=True,
    )
    return model, optimizer, scaler


def long_context_rows(config, *, steps: int, lora_r: int) -> list[Result]:
    """Case (d): 32,768 tokens with the techniques turned on one by one, cheapest first.

    LoRA dropout 0, as the long-context configs use. Two loads: the plain row's model, then one frozen_16bit model on which the other techniques are
    added in order (the attention implementation switched in place, as loading with it would set it).
    """
    from hfplug.long_context.apply import load_kwargs

    rows = []
    for n in range(len(TECHNIQUES) + 1):
        techniques = TECHNIQUES[:n]
        if n <= 1:  # plain, then +frozen_16bit: a model of its own each
            if n == 1:
                del model, opt, scaler  # noqa: F821  (the plain row's)
                free_memory()
            model, opt, scaler = setup_model("causal_lm", "sdpa", lora_r, techniques=techniques, lora_dropout=0.0)
        elif techniques[-1] == "efficient_attention":
            model.get_base_model().set_attn_implementation(load_kwargs(techniques)["attn_implementation"])
        else:
            install_techniques(model, techniques[-1:], LONG)
        label = "+" + techniques[-1] if techniques else "plain"
        print(f"(d) {LONG} tokens, {label}", flush=True)
        result = run_case(
            f"d {label}",
            model,
            opt,
            scaler,
            config,
            "causal_lm",
            1,
            LONG,
            long_context=techniques,
            steps=steps,
            lora_r=lora_r,
            lora_dropout=0.0,  # the long-context configs' (q/k/v and gate/up then share one saved input)
        )
        print(
            f"    {'fits' if result.fits else 'OOM'}: peak allocated {result.peak_allocated_gib:.2f} GiB, "
            f"planned {result.planned_allocated_gib:.2f} GiB (total {result.planned_total_gib:.2f})",
            flush=True,
        )
        rows.append(result)
    del model, opt, scaler
    free_memory()
    return rows


def print_table(results: list[Result]) -> None:
    print()
    print(
        f"{'case':<26}{'batch x len':>13}{'fits':>6}{'alloc':>8}{'plan':>7}{'ratio':>7}"
        f"{'reserved':>10}{'plan':>7}{'ratio':>7}{'tok/s':>9}"
    )
    for r in results:
        print(
            f"{r.case:<26}{f'{r.batch} x {r.seq_len}':>13}{'yes' if r.fits else 'OOM':>6}"
            f"{r.peak_allocated_gib:>8.2f}{r.planned_allocated_gib:>7.2f}{r.ratio_allocated:>7.2f}"
            f"{r.peak_reserved_gib:>10.2f}{r.planned_reserved_gib:>7.2f}{r.ratio_reserved:>7.2f}"
            f"{r.tokens_per_s:>9.0f}"
        )
    print(
        "(GiB; alloc/reserved = torch peak allocated/reserved, plan = hfplug.memory prediction, ratio = measured/plan)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=("a", "b", "c", "d"), default=["a", "b", "c", "d"])
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement (first is warm-up)")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--cap_gib", type=float, default=CAP / GiB, help="allocator cap (T4: 15)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "benchmarks/t4_fit.py needs a CUDA GPU (it measures GPU memory); none is visible here. "
            "The planner runs anywhere: python -m hfplug.fit --help",
            file=sys.stderr,
        )
        return 2
    from transformers import LlamaConfig

    import hfplug.memory  # noqa: F401  (fail early if hfplug is not importable)

    props = torch.cuda.get_device_properties(0)
    cap = args.cap_gib * GiB
    fraction = min(1.0, cap / props.total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    print(
        f"device: {props.name}, {props.total_memory / GiB:.1f} GiB; allocator capped at "
        f"{fraction * props.total_memory / GiB:.2f} GiB; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    attn = "sdpa"
    if not gqa_attention_ok("cuda"):
        attn = register_repeat_kv_attention()
        print("  SDPA has no efficient grouped-query kernel here: k/v are repeated to all heads", flush=True)
    # Cases (a)-(c) run O(seq) attention either way (an efficient GQA kernel, or k/v repeated for one): for
    # the planner that is efficient_attention. Case (d) runs the runtime's own switch instead.
    o_seq = ("efficient_attention",)
    config = LlamaConfig(**LLAMA31_8B)
    results: list[Result] = []
    longest = None

    if "a" in args.cases:
        print("(a) sequence classification, 8 x 512", flush=True)
        model, opt, scaler = setup_model("decision", attn, args.lora_r)
        results.append(
            run_case(
                "a",
                model,
                opt,
                scaler,
                config,
                "decision",
                8,
                512,
                long_context=o_seq,
                steps=args.steps,
                lora_r=args.lora_r,
            )
        )
        del model, opt, scaler
        free_memory()
    if "b" in args.cases or "c" in args.cases:
        print("(b/c) causal LM", flush=True)
        model, opt, scaler = setup_model("causal_lm", attn, args.lora_r)
        if "b" in args.cases:
            results.append(
                run_case(
                    "b",
                    model,
                    opt,
                    scaler,
                    config,
                    "causal_lm",
                    1,
                    2048,
                    long_context=o_seq,
                    steps=args.steps,
                    lora_r=args.lora_r,
                )
            )
        if "c" in args.cases:
            trials, longest = longest_sequence(model, opt, scaler, config, steps=2, lora_r=args.lora_r)
            best = [t for t in trials if t.fits and t.seq_len == longest]
            results.extend(best or trials[-1:])
            for t in best:
                t.case = "c"
        del model, opt, scaler
        free_memory()
    if "d" in args.cases:
        results.extend(long_context_rows(config, steps=2, lora_r=args.lora_r))

    print_table(results)
    if longest is not None:
        print(
            f"(c) longest causal-LM sequence that fits: {longest} tokens "
            f"({'meets' if longest >= 8192 else 'misses'} the 8,192 target)"
        )
    d_rows = [r for r in results if r.case.startswith("d ")]
    if d_rows:
        print(
            f"(d) {LONG} tokens with --long_context all: {'fits' if d_rows[-1].fits else 'OOM'}; "
            f"the planner's fits/OOM per row: "
            + ", ".join(
                f"{r.case[2:]} {'ok' if r.fits == (r.planned_total_gib <= CAP / GiB) else 'WRONG'}" for r in d_rows
            )
        )
    for r in results:
        if r.fits and math.isfinite(r.planned_allocated_gib) and abs(r.ratio_allocated - 1) > 0.10:
            print(f"  note: planner off by more than 10 % on ({r.case}): measured/plan = {r.ratio_allocated:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "device": props.name,
                    "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__,
                    "cap_gib": args.cap_gib,
                    "longest_c": longest,
                    "results": [
                        asdict(r) | {"ratio_allocated": r.ratio_allocated, "ratio_reserved": r.ratio_reserved}
                        for r in results
                    ],
                },
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
