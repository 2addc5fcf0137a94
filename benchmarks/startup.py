"""The whole quickstart process: hfplug's recipe vs transformers' own run_classification.py, same records.

    python benchmarks/startup.py --peer /tmp/run_classification.py              # 10 runs each, ~10 min on CPU
    python benchmarks/startup.py --peer /tmp/run_classification.py --also_launcher   # + accelerate launch, ~15 min
    python benchmarks/startup.py --peer /tmp/run_classification.py --runs 3 --threads 1 --compare_group_by_length

The peer is transformers' examples/pytorch/text-classification/run_classification.py (not shipped
here: download it). It imports ``evaluate``, which hfplug no longer depends on: ``pip install evaluate``. Both processes train assets/tiny-bert on the quickstart's records: the train and
validation splits that hfplug's own loader selects (decision task, ACCEPTED -> 1, REJECTED -> 0),
exported to JSON with title and abstract joined as hfplug joins them (" [SEP] "). Settings are the
quickstart's (recipes/configs/quickstart.yaml: max_length 128, epochs, batch sizes, learning rate,
weight decay, warm-up, seed, logging/eval/save per epoch); the peer gets its best configuration,
dynamic padding (--pad_to_max_length false), and the accuracy metric from a local script (the same
sklearn call as the Hub's "accuracy", which evaluate.load cannot fetch offline).

hfplug runs as its README's Quickstart says (python recipes/finetune_hupd.py --config
recipes/configs/quickstart.yaml), the peer as its README says (python run_classification.py ...).
Each gets a fresh output_dir per run and a warm data cache (one untimed warm-up run each); runs alternate. Printed: the median wall time of
each whole process (start to exit), the ratio, and the median train_runtime and eval accuracy from
the runs' own train_results.json / eval_results.json. --compare_group_by_length repeats all of it
with length grouping on for both (hfplug: --group_by_length true; peer: --train_sampling_strategy
group_by_length). --also_launcher adds a third process to every round: the same recipe run through
``accelerate launch --config_file accelerate_configs/cpu.yaml``, as multi-process runs start, and
last the start-up of ``accelerate launch`` itself (an empty script), which that command pays before
the recipe starts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout
QUICKSTART = os.path.join(REPO, "recipes", "configs", "quickstart.yaml")
TINY_BERT = os.path.join(REPO, "assets", "tiny-bert")
LAUNCHER = ["accelerate", "launch", "--config_file", os.path.join(REPO, "accelerate_configs", "cpu.yaml")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

ACCURACY_METRIC = """import datasets
import evaluate
from sklearn.metrics import accuracy_score

class Accuracy(evaluate.Metric):  # the Hub's "accuracy" metric, minus its docs
    def _info(self):
        return evaluate.MetricInfo(description="accuracy", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Value("int32"),
                                                               "references": datasets.Value("int32")}))

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": float(accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight))}
"""


def quickstart_settings(hupd_cache_dir: str):
    """The quickstart's arguments, parsed by hfplug itself."""
    from transformers import TrainingArguments

    from hfplug.arguments import HupdArguments, RunArguments
    from hfplug.config import parse_args
    from hfplug.hub import HubArguments
    from hfplug.model_args import ModelArguments

    _, data, _, _, training = parse_args(
        (ModelArguments, HupdArguments, RunArguments, HubArguments, TrainingArguments),
        ["--config", QUICKSTART, "--hupd_cache_dir", hupd_cache_dir],
    )
    return data, training


def export_records(data, folder: str) -> dict[str, str]:
    """The quickstart's splits, labelled and joined by hfplug's own code, as JSON lines {"sentence", "label"}."""
    from transformers import AutoTokenizer

    from hfplug.data import load_hupd
    from hfplug.data.tasks import join_text_fields, parse_text_fields, prepare_task

    fields = parse_text_fields(data.text_fields or "title,abstract")
    separator = f" {AutoTokenizer.from_pretrained(TINY_BERT).sep_token} "  # as tokenize_splits joins them
    task = prepare_task(load_hupd(**data.load_hupd_kwargs()), data.task, text_fields=fields)
    paths = {}
    for name, split in task.splits.items():
        paths[name] = os.path.join(folder, f"{name}.json")
        split.map(lambda b: {"sentence": join_text_fields(b, fields, separator)}, batched=True).select_columns(
            ["sentence", "label"]
        ).to_json(paths[name])
    return paths


def commands(args, data, training, paths, folder: str, group: bool) -> dict[str, callable]:
    grouping_hf = ["--group_by_length", "true"] if group else ["--group_by_length", "false"]
    grouping_peer = ["--train_sampling_strategy", "group_by_length"] if group else []
    same = [
        "--model_name_or_path",
        TINY_BERT,
        "--do_train",
        "--do_eval",
        "--report_to",
        "none",
        "--num_train_epochs",
        str(training.num_train_epochs),
        "--learning_rate",
        str(training.learning_rate),
        "--per_device_train_batch_size",
        str(training.per_device_train_batch_size),
        "--per_device_eval_batch_size",
        str(training.per_device_eval_batch_size),
        "--weight_decay",
        str(training.weight_decay),
        "--warmup_steps",
        str(training.warmup_steps),
        "--eval_strategy",
        "epoch",
        "--save_strategy",
        "epoch",
        "--save_total_limit",
        "1",
        "--logging_steps",
        str(training.logging_steps),
        "--seed",
        str(training.seed),
        "--dataloader_pin_memory",
        "false",
    ]
    recipe = lambda out, launch: [  # noqa: E731
        *launch,
        os.path.join(REPO, "recipes", "finetune_hupd.py"),
        "--config",
        QUICKSTART,
        "--output_dir",
        out,
        "--hupd_cache_dir",
        data.hupd_cache_dir,
        *grouping_hf,
    ]
    peer = lambda out: [  # noqa: E731
        sys.executable,
        args.peer,
        *same,
        "--output_dir",
        out,
        "--train_file",
        paths["train"],
        "--validation_file",
        paths["validation"],
        "--max_seq_length",
        str(data.max_length),
        "--pad_to_max_length",
        "false",
        "--metric_name",
        os.path.join(folder, "accuracy.py"),
        "--cache_dir",
        os.path.join(folder, "peer_cache"),
        *grouping_peer,
    ]
    cmds = {"hfplug": lambda out: recipe(out, [sys.executable]), "peer": peer}  # as the Quickstart runs it
    if args.also_launcher:  # as multi-process runs start: the launcher's own start-up comes first
        cmds["hfplug_launcher"] = lambda out: recipe(out, LAUNCHER)
    return cmds


def run_once(command: list[str], out: str, log: str) -> dict:
    started = time.perf_counter()
    with open(log, "w") as f:
        status = subprocess.run(command, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if status:
        sys.exit(f"{command[:4]} failed with status {status}; see {log}")
    read = lambda name: json.load(open(os.path.join(out, name)))  # noqa: E731
    return {
        "wall": wall,
        "train": read("train_results.json")["train_runtime"],
        "accuracy": read("eval_results.json")["eval_accuracy"],
    }


def measure(cmds: dict, runs: int, folder: str, label: str) -> dict[str, list[dict]]:
    results = {name: [] for name in cmds}
    for i in range(-1, runs):  # round -1: untimed warm-up (data caches, page cache)
        order = list(cmds) if i % 2 else list(reversed(cmds))  # alternate who goes first
        for name in order:
            out = tempfile.mkdtemp(prefix=f"{name}_", dir=folder)  # fresh output_dir: no resume
            r = run_once(cmds[name](out), out, out + ".log")
            print(
                f"  [{label}] {'warm-up' if i < 0 else f'run {i + 1}'} {name}: {r['wall']:.1f} s "
                f"(train {r['train']:.1f} s, accuracy {r['accuracy']:.4f})",
                flush=True,
            )
            if i >= 0:
                results[name].append(r)
    return results


def launcher_cost(runs: int, folder: str) -> float:
    """Median wall time of ``accelerate launch`` running an empty script: the launcher's own start-up."""
    empty = os.path.join(folder, "empty.py")
    open(empty, "w").close()
    command = [*LAUNCHER, empty]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def report(results: dict[str, list[dict]], label: str) -> None:
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("wall", "train", "accuracy")}
        for name, rs in results.items()
    }
    print(f"\n{label}: median of {len(results['hfplug'])} runs each")
    width = max(map(len, med))  # hfplug_launcher is longer than the others
    for name, m in med.items():
        print(
            f"  {name:{width}s} whole process {m['wall']:6.1f} s   train_runtime {m['train']:6.1f} s   eval accuracy {m['accuracy']:.4f}"
        )
    for name in med:
        if name != "peer":
            ratio = med[name]["wall"] / med["peer"]["wall"]
            verdict = "faster" if ratio < 1 else "slower"
            print(f"  {name} / peer whole process: {ratio:.3f} ({name} {verdict}; target <= 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, help="path to transformers' run_classification.py")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each (after one warm-up each)")
    parser.add_argument("--compare_group_by_length", action="store_true", help="also run both with length grouping on")
    parser.add_argument(
        "--also_launcher",
        action="store_true",
        help="also run the recipe through `accelerate launch --config_file accelerate_configs/cpu.yaml`",
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (e.g. 1 on a shared machine)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (outputs, logs)")
    args = parser.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    folder = tempfile.mkdtemp(prefix="startup_bench_")
    data, training = quickstart_settings(os.path.join(folder, "hupd_cache"))
    paths = export_records(data, folder)
    with open(os.path.join(folder, "accuracy.py"), "w") as f:
        f.write(ACCURACY_METRIC)
    print(f"records: {', '.join(f'{k} {sum(1 for _ in open(p))}' for k, p in paths.items())}; folder {folder}")
    for group in [False, True] if args.compare_group_by_length else [data.group_by_length]:  # default: as shipped
        label = f"group_by_length {'on' if group else 'off'} (both)"
        report(measure(commands(args, data, training, paths, folder, group), args.runs, folder, label), label)
    if args.also_launcher:
        print(
            f"  `accelerate launch` alone (empty script, median of {args.runs}): "
            f"{launcher_cost(args.runs, folder):.1f} s"
        )
    if not args.keep:
        subprocess.run(["rm", "-rf", folder])


if __name__ == "__main__":
    main()
