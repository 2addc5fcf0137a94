"""What does chat's generation path cost over a bare ``model.generate``?  Same model, same prompt, one run.

    python benchmarks/chat_overhead.py               # CPU: random Llama (hidden 256, 4 layers), nothing downloaded
    python benchmarks/chat_overhead.py --gpu         # CUDA: Llama-3.1-8B-shaped random model in 4-bit (NF4)

The chat path is ``hfplug.chat.ChatSession.reply`` as the interactive recipe runs it:
render + encode the conversation with the chat format, fit it to the context, generate
with the format's stop tokens and a Ctrl-C stopping criterion, and stream decoded text
(to a sink here). The bare path is ``model.generate`` on the already-encoded prompt.

Both are timed by wall clock, the same way: time to first token = a 1-token generation;
tokens/s = (N - 1) / (time for N tokens - time for 1). Runs alternate between the paths
and the medians are reported. Greedy decoding; the random model's stop tokens get zero
logits so that every run produces exactly N tokens.

Targets: chat overhead <= 5 % on both figures; --gpu: memory after load <= 6.5 GiB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # run from a checkout; t4_fit.py is next to this file
GiB = 1024**3
TARGET_OVERHEAD = 5.0  # percent
TARGET_GPU_GIB = 6.5


# --------------------------------------------------------------------------- model and prompt


def pseudo_text(n_words: int, seed: int) -> str:
    """Random lower-case "words" of 2-9 letters: text with a large, even vocabulary."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(n_words))


def build_tokenizer(vocab_size: int):
    """A Llama-3-style byte-level BPE tokenizer trained on pseudo-words, so it reaches ``vocab_size``."""
    from hfplug.testing.tiny import build_llama3_tokenizer

    texts = [pseudo_text(40, seed) for seed in range(2000)]
    return build_llama3_tokenizer(texts, vocab_size=vocab_size, model_max_length=131072)


def cpu_model(tokenizer):
    """A random Llama big enough for CPU timings to mean something: hidden 256, 4 layers, GQA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def gpu_model():
    """Llama-3.1-8B's exact shape, random weights quantized to NF4 on load (``benchmarks/t4_fit.py``'s builder)."""
    from t4_fit import LLAMA31_8B, build_model

    from hfplug.model_args import ModelArguments
    from hfplug.quantization import get_quantization_config

    args = ModelArguments(quant="4bit", dtype="float16")
    return build_model(
        LLAMA31_8B, "causal_lm", device="cuda", quantization_config=get_quantization_config(args, device_type="cuda")
    ).eval()


def never_stop(model, stop_ids, vocab_in_tokenizer: int) -> None:
    """Zero the output rows of stop tokens (and of ids the tokenizer lacks), so that a random
    model neither stops early nor writes tokens that decode to nothing."""
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[list(stop_ids)] = 0
        weight[vocab_in_tokenizer:] = 0


# --------------------------------------------------------------------------- timing


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_bare(model, input_ids, n_tokens: int, pad_id: int) -> float:
    """Seconds for ``model.generate`` to write ``n_tokens`` tokens (greedy)."""
    sync(input_ids.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    sync(input_ids.device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - input_ids.shape[1] == n_tokens, "the bare run stopped early"
    return elapsed


def time_chat(session, text: str, n_tokens: int) -> float:
    """Seconds for ``session.reply`` to write ``n_tokens`` tokens, streamed to a sink, from a fresh history."""
    import dataclasses

    session.reset()
    session.settings = dataclasses.replace(session.settings, max_new_tokens=n_tokens)
    sink = io.StringIO()
    start = time.perf_counter()
    reply = session.reply(text, on_text=sink.write)
    sync(session.model.device)
    elapsed = time.perf_counter() - start
    assert reply.new_tokens == n_tokens, f"the chat run stopped early ({reply.stopped_by})"
    return elapsed


def measure(model, tokenizer, *, n_tokens: int, repeats: int, prompt_words: int) -> dict:
    """Medians of TTFT and tokens/s for both paths, alternating runs."""
    from hfplug.chat.arguments import GenerationSettings
    from hfplug.chat.format import ChatFormat
    from hfplug.chat.session import ChatSession

    chat_format = ChatFormat.from_tokenizer(tokenizer, template_kwargs={"date_string": "26 Jul 2024"})
    session = ChatSession(model, tokenizer, chat_format, GenerationSettings(do_sample=False), notify=lambda m: None)
    never_stop(
        model, chat_format.stopping_kwargs(model.generation_config.eos_token_id)["eos_token_id"], len(tokenizer)
    )
    text = pseudo_text(prompt_words, seed=-1)
    ids = chat_format.encode([{"role": "user", "content": text}], add_generation_prompt=True)
    input_ids = torch.tensor([ids], device=model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    runs = {key: [] for key in ("bare_1", "bare_n", "chat_1", "chat_n")}
    for i in range(repeats + 1):  # the first round warms up kernels and caches, and is dropped
        timings = {
            "bare_1": time_bare(model, input_ids, 1, pad_id),
            "chat_1": time_chat(session, text, 1),
            "chat_n": time_chat(session, text, n_tokens),
            "bare_n": time_bare(model, input_ids, n_tokens, pad_id),
        }
        if i:
            for key, value in timings.items():
                runs[key].append(value)
    med = {key: statistics.median(values) for key, values in runs.items()}
    result = {"prompt_tokens": len(ids), "new_tokens": n_tokens, "repeats": repeats}
    for path in ("bare", "chat"):
        result[f"{path}_ttft_s"] = med[f"{path}_1"]
        result[f"{path}_tokens_per_s"] = (n_tokens - 1) / (med[f"{path}_n"] - med[f"{path}_1"])
    result["ttft_overhead_pct"] = 100 * (result["chat_ttft_s"] / result["bare_ttft_s"] - 1)
    result["throughput_overhead_pct"] = 100 * (result["bare_tokens_per_s"] / result["chat_tokens_per_s"] - 1)
    return result


def report(result: dict) -> None:
    print(
        f"prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, median of {result['repeats']} runs"
    )
    print(f"{'':<22}{'bare generate':>15}{'chat path':>12}{'overhead':>10}")
    print(
        f"{'time to first token':<22}{result['bare_ttft_s'] * 1e3:>12.1f} ms{result['chat_ttft_s'] * 1e3:>9.1f} ms"
        f"{result['ttft_overhead_pct']:>+9.1f}%"
    )
    print(
        f"{'tokens/s':<22}{result['bare_tokens_per_s']:>15.1f}{result['chat_tokens_per_s']:>12.1f}"
        f"{result['throughput_overhead_pct']:>+9.1f}%"
    )
    worst = max(result["ttft_overhead_pct"], result["throughput_overhead_pct"])
    print(f"overhead {'within' if worst <= TARGET_OVERHEAD else 'ABOVE'} the {TARGET_OVERHEAD:.0f} % target")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Llama-3.1-8B-shaped 4-bit model on a CUDA GPU")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens per timed reply")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per path (after one warm-up round)")
    parser.add_argument("--prompt_words", type=int, default=200, help="length of the user message, in words")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (1: steadier timings on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.gpu and not torch.cuda.is_available():
        print(
            "--gpu needs a CUDA GPU (it loads an 8B-shaped model in 4-bit and measures GPU memory); none is visible. "
            "Run without --gpu for the CPU comparison.",
            file=sys.stderr,
        )
        return 2
    device = torch.cuda.get_device_name() if args.gpu else "cpu"
    print(
        f"device: {device}, {torch.get_num_threads()} CPU threads; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    tokenizer = build_tokenizer(4096)
    start = time.perf_counter()
    model = gpu_model() if args.gpu else cpu_model(tokenizer)
    load_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    extra = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "load_s": load_s}
    if args.gpu:
        extra["memory_after_load_gib"] = torch.cuda.memory_allocated() / GiB
        print(
            f"model: Llama-3.1-8B shape, NF4; loaded in {load_s:.0f} s; memory after load "
            f"{extra['memory_after_load_gib']:.2f} GiB allocated "
            f"({'within' if extra['memory_after_load_gib'] <= TARGET_GPU_GIB else 'ABOVE'} the {TARGET_GPU_GIB} GiB target)"
        )
        torch.cuda.reset_peak_memory_stats()
    else:
        print(f"model: random Llama, {params / 1e6:.1f} M parameters, float32")
    result = measure(model, tokenizer, n_tokens=args.new_tokens, repeats=args.repeats, prompt_words=args.prompt_words)
    if args.gpu:
        extra["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GiB
        print(f"peak memory while generating: {extra['peak_memory_gib']:.2f} GiB allocated")
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(extra | result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
