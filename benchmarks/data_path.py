"""The seed's data path vs hfplug's, side by side in one run.

    python benchmarks/data_path.py [--epochs 1] [--batch_size 16]

seed:   a torch Dataset that tokenizes each record inside __getitem__ and pads
        every example to max_length=512 (what hfplug grew out of).
hfplug: tokenized once with datasets.map, padded per batch to a multiple of 8,
        batches grouped by length (train_sampling_strategy=group_by_length).

Same tiny model (assets/tiny-bert), same records (a generated HUPD-format sample,
2,000 applications by default, the same generator as the embedded one; decision
task, title+abstract), same batch size and seed, one epoch each through
``Trainer.train``. Prints the time of each (fastest of alternating repeats), the speed ratio
and the fraction of real (non-pad) tokens in the batches. Target: >= 2x faster, real-token fraction >= 0.9.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hfplug.data import load_hupd, padding_collator, prepare_task, tokenize_splits
from hfplug.data.tasks import join_text_fields
from hfplug.testing.hupd_synthetic import write_hupd_sample

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "tiny-bert"
TEXT_FIELDS = ["title", "abstract"]
MAX_LENGTH = 512


class SeedDataset(torch.utils.data.Dataset):
    """The seed's approach: tokenize per item, pad everything to max_length."""

    def __init__(self, records, tokenizer):
        self.records, self.tokenizer = records, tokenizer
        self.separator = f" {tokenizer.sep_token} "

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        record = self.records[i]
        text = join_text_fields({f: [record[f]] for f in TEXT_FIELDS}, TEXT_FIELDS, self.separator)[0]
        enc = self.tokenizer(text, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
        return {
            "input_ids": enc["input_ids"][0],
            "attention_mask": enc["attention_mask"][0],
            "labels": torch.tensor(record["label"]),
        }


def real_token_fraction(trainer) -> float:
    real = total = 0
    for batch in trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / total


def run(name, tokenizer, train_dataset, collator, args) -> tuple[float, float]:
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=collator, processing_class=tokenizer
    )
    fraction = real_token_fraction(trainer)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, fraction


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--records", type=int, default=2000, help="applications in the generated sample")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each path; the fastest counts")
    opts = parser.parse_args()
    hf_logging.set_verbosity_error()
    tmp = tempfile.mkdtemp(prefix="hfplug-bench-")

    sample = write_hupd_sample(
        os.path.join(tmp, "sample"), n_records=opts.records, seed=1, description_words=(50, 100)
    )
    splits = load_hupd(
        hupd_metadata_path=str(sample.metadata_path),
        hupd_archive_path=str(sample.archive_path),
        train_filing_start_date="2016-01-01",
        train_filing_end_date="2016-01-22",
        val_filing_start_date="2016-01-22",
        val_filing_end_date="2016-02-01",
        hupd_cache_dir=os.path.join(tmp, "cache"),
    )
    train = prepare_task(splits, "decision").splits["train"]
    tokenizer = AutoTokenizer.from_pretrained(MODEL)

    def args(sampling):
        return TrainingArguments(
            output_dir=os.path.join(tmp, sampling),
            num_train_epochs=opts.epochs,
            per_device_train_batch_size=opts.batch_size,
            train_sampling_strategy=sampling,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )

    seed_data = SeedDataset(train.to_list(), tokenizer)
    fast_data = tokenize_splits(
        DatasetDict(train=train), tokenizer, text_fields=TEXT_FIELDS, max_length=MAX_LENGTH, add_length=True
    )["train"]

    # Alternate the two paths and keep each one's fastest run: other load on a shared machine
    # slows single runs, never speeds them up.
    seed_times, fast_times = [], []
    for _ in range(opts.repeats):
        seconds, seed_fraction = run("seed", tokenizer, seed_data, None, args("random"))
        seed_times.append(seconds)
        seconds, fast_fraction = run(
            "hfplug", tokenizer, fast_data, padding_collator(tokenizer), args("group_by_length")
        )
        fast_times.append(seconds)
    seed_s, fast_s = min(seed_times), min(fast_times)

    print(
        f"records: {len(train)}  batch size: {opts.batch_size}  epochs: {opts.epochs}  "
        f"torch threads: {torch.get_num_threads()}  fastest of {opts.repeats} alternating runs"
    )
    print(f"{'path':<8} {'seconds':>8} {'real-token fraction':>20}")
    print(f"{'seed':<8} {seed_s:>8.2f} {seed_fraction:>20.3f}")
    print(f"{'hfplug':<8} {fast_s:>8.2f} {fast_fraction:>20.3f}")
    ratio = seed_s / fast_s
    print(
        f"speed-up: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'}); "
        f"real-token fraction {fast_fraction:.3f} (target >= 0.9: {'met' if fast_fraction >= 0.9 else 'NOT met'})"
    )
    return 0 if ratio >= 2 and fast_fraction >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
