"""What do hfplug's default callbacks cost a training run?  A Trainer with them vs a bare Trainer, one run.

    python benchmarks/callback_overhead.py                 # CPU, the quickstart's tiny BERT, ~2 minutes
    python benchmarks/callback_overhead.py --repeats 9 --json callback_overhead.json

Both Trainers get the same model (assets/tiny-bert, re-loaded with the same seed for every
run), the same synthetic data and the same ``TrainingArguments``, shaped like the offline
quickstart: logging every 5 steps with token counting, evaluation and a checkpoint each epoch,
the best model reloaded at the end. The only difference is ``callbacks=``: none, or
``hfplug.training.callbacks.default_callbacks(training_args, run_args)`` with early stopping on (a
patience that cannot trigger within the run, so both runs do the same steps); that is
throughput logging, the training-curves PNG written at the end, and early stopping.

Runs alternate between the two Trainers (bare first, then hfplug first, ...) after one
untimed warm-up round of each (imports, e.g. matplotlib, are paid there), and the medians
of ``trainer.train()`` wall time are compared. Two figures:

* end to end: median(hfplug) / median(bare) - 1, and the median of the per-round ratios;
  on a shared machine these carry the noise of whole runs (compare the spread of the bare
  runs), so they can come out negative, or high when another job runs meanwhile;
* callback time: the time spent inside the callbacks' own event methods (timed by wrapping
  them), as a share of the median bare run: the cost itself, without the noise.

Target: callback time <= 3 % of the run (the verdict printed); the end-to-end figures are
the cross-check, meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # run from a checkout
TINY_BERT = os.path.join(REPO, "assets", "tiny-bert")
TARGET_OVERHEAD = 3.0  # percent
PATIENCE = 1000  # early stopping on, but it never stops these short runs


# --------------------------------------------------------------------------- data, model, arguments


def synthetic_split(n: int, seq_len: int, vocab_size: int, seed: int):
    """``n`` fixed-length examples of random token ids with a learnable label (the first token's parity)."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (n, seq_len), generator=generator)  # ids < 5 are BERT's special tokens
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n, "labels": (ids[:, 0] % 2).tolist()}
    )


def fresh_model(seed: int):
    """The quickstart's tiny BERT with a 2-label head, identical for every run (same seed)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(TINY_BERT, num_labels=2)


def training_arguments(output_dir: str, args: argparse.Namespace):
    """Quickstart-like settings; identical for both Trainers except the output directory."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        logging_steps=5,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        include_num_input_tokens_seen="non_padding",
        seed=args.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=True,
    )


# --------------------------------------------------------------------------- timing


class CallbackClock:
    """Wraps every ``on_*`` method of some callbacks to add up the time spent inside them, per class."""

    def __init__(self):
        self.by_class: dict[str, float] = {}

    @property
    def seconds(self) -> float:
        return sum(self.by_class.values())

    def wrap(self, callbacks: list) -> list:
        for callback in callbacks:
            self.by_class.setdefault(type(callback).__name__, 0.0)
            for name in dir(callback):
                if name.startswith("on_") and callable(getattr(callback, name)):
                    # an instance attribute shadows the class method the CallbackHandler would call
                    setattr(callback, name, self._timed(type(callback).__name__, getattr(callback, name)))
        return callbacks

    def _timed(self, owner: str, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.by_class[owner] += time.perf_counter() - start

        return timed


def one_run(variant: str, data: tuple, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """Train once; return (train wall seconds, seconds inside each of hfplug's callbacks)."""
    from transformers import Trainer

    from hfplug.arguments import RunArguments
    from hfplug.training.callbacks import default_callbacks

    train, validation = data
    clock = CallbackClock()
    with tempfile.TemporaryDirectory(prefix=f"callback-overhead-{variant}-") as out:
        training_args = training_arguments(out, args)
        callbacks = None
        if variant == "hfplug":
            callbacks = clock.wrap(default_callbacks(training_args, RunArguments(early_stopping_patience=PATIENCE)))
        trainer = Trainer(
            model=fresh_model(args.seed),
            args=training_args,
            train_dataset=train,
            eval_dataset=validation,
            callbacks=callbacks,
        )
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints each log: same cost, less clutter
            trainer.train()
        return time.perf_counter() - start, clock.by_class


def measure(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(TINY_BERT).vocab_size
    data = (
        synthetic_split(args.train_examples, args.seq_len, vocab_size, args.seed),
        synthetic_split(args.eval_examples, args.seq_len, vocab_size, args.seed + 1),
    )
    times = {"bare": [], "hfplug": []}
    inside = []
    for round_ in range(args.repeats + 1):  # round 0 is the warm-up
        order = ("bare", "hfplug") if round_ % 2 == 0 else ("hfplug", "bare")
        for variant in order:
            seconds, in_callbacks = one_run(variant, data, args)
            if round_ == 0:
                continue
            times[variant].append(seconds)
            if variant == "hfplug":
                inside.append(in_callbacks)
        if round_:
            print(
                f"round {round_}/{args.repeats}: bare {times['bare'][-1]:.2f} s, hfplug {times['hfplug'][-1]:.2f} s "
                f"({sum(inside[-1].values()) * 1e3:.0f} ms in callbacks)",
                flush=True,
            )
    bare, hfplug = statistics.median(times["bare"]), statistics.median(times["hfplug"])
    steps = -(-args.train_examples // args.batch_size) * args.epochs
    return {
        "repeats": args.repeats,
        "optimizer_steps": steps,
        "epochs": args.epochs,
        "bare_s": bare,
        "hfplug_s": hfplug,
        "end_to_end_overhead_pct": 100 * (hfplug / bare - 1),
        "paired_overhead_pct": 100 * statistics.median(h / b - 1 for h, b in zip(times["hfplug"], times["bare"])),
        "callback_s": statistics.median(sum(run.values()) for run in inside),
        "callback_overhead_pct": 100 * statistics.median(sum(run.values()) for run in inside) / bare,
        "callback_s_by_class": {name: statistics.median(run[name] for run in inside) for name in inside[0]},
        "bare_runs_s": times["bare"],
        "hfplug_runs_s": times["hfplug"],
    }


def report(result: dict) -> None:
    print(
        f"\n{result['optimizer_steps']} optimizer steps over {result['epochs']} epochs, "
        f"median of {result['repeats']} interleaved runs each"
    )
    print(f"bare Trainer      {result['bare_s']:8.2f} s")
    low, high = min(result["bare_runs_s"]), max(result["bare_runs_s"])
    print(
        f"hfplug callbacks  {result['hfplug_s']:8.2f} s   end to end {result['end_to_end_overhead_pct']:+.2f} %, "
        f"paired rounds {result['paired_overhead_pct']:+.2f} % (noise: bare runs spread over {low:.2f}-{high:.2f} s, "
        f"{100 * (high - low) / result['bare_s']:.1f} %)"
    )
    print(
        f"inside callbacks  {result['callback_s'] * 1e3:8.1f} ms  = "
        f"{result['callback_overhead_pct']:.2f} % of the bare run"
    )
    for name, seconds in result["callback_s_by_class"].items():
        print(f"  {name:<24}{seconds * 1e3:8.1f} ms")
    within = result["callback_overhead_pct"] <= TARGET_OVERHEAD
    print(f"callback time {'within' if within else 'ABOVE'} the {TARGET_OVERHEAD:.0f} % target")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per Trainer (after one warm-up round)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (one evaluation + checkpoint each)")
    parser.add_argument("--train_examples", type=int, default=1600, help="training examples (quickstart: ~270)")
    parser.add_argument("--eval_examples", type=int, default=320)
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per example (quickstart max_length: 128)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    print(
        f"device: cpu, {torch.get_num_threads()} CPU threads; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # load/save bars: clutter
    result = measure(args)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__} | result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
