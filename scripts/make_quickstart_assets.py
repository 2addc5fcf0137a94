"""Regenerate the offline Quickstart's assets: the HUPD-format sample and the tiny model.

    python scripts/make_quickstart_assets.py

Writes (the sample byte for byte the same on every run; the WordPiece trainer breaks ties in its
vocabulary order differently from run to run, so the committed tiny-bert tokenizer is the reference):
  assets/hupd_sample/  hupd_metadata_jan16_2022-02-22.feather + sample-jan-2016.tar.gz
                       (600 synthetic applications filed in January 2016, real HUPD layout and schema)
  assets/tiny-bert/    a 2-layer, 64-wide BERT and a WordPiece tokenizer trained on the sample's text
  assets/tiny-llama/   a 2-layer Llama with Llama 3's special tokens (no pad token, no chat template, like
                       base Llama-3.1) and a byte-level BPE tokenizer trained on the same text
"""

import argparse
import json
import tarfile
from pathlib import Path

from hfplug.testing.hupd_synthetic import write_hupd_sample
from hfplug.testing.tiny import build_bert_tokenizer, build_llama3_tokenizer, build_tiny_bert, build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RECORDS = 600
SAMPLE_SEED = 0


def sample_texts(archive_path: Path):
    """Titles, abstracts and claims of every record in the archive: the tokenizer's training text."""
    with tarfile.open(archive_path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                record = json.load(tar.extractfile(member))
                for key in ("title", "abstract", "claims"):
                    if record.get(key):
                        yield record[key]


def main(out: Path = ROOT / "assets") -> None:
    files = write_hupd_sample(out / "hupd_sample", n_records=SAMPLE_RECORDS, seed=SAMPLE_SEED)
    tokenizer = build_bert_tokenizer(sample_texts(files.archive_path), vocab_size=2000, model_max_length=512)
    model = build_tiny_bert(tokenizer, seed=SAMPLE_SEED)
    tokenizer.save_pretrained(out / "tiny-bert")
    model.save_pretrained(out / "tiny-bert")
    llama_tokenizer = build_llama3_tokenizer(sample_texts(files.archive_path), vocab_size=2000, model_max_length=1024)
    llama = build_tiny_llama(llama_tokenizer, seed=SAMPLE_SEED, max_position_embeddings=1024)
    llama_tokenizer.save_pretrained(out / "tiny-llama")
    llama.save_pretrained(out / "tiny-llama")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(ROOT)}  {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "assets")
    main(parser.parse_args().out)
