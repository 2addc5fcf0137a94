"""The dataset card (``README.md``) of a HUPD export: Hub metadata, the fields, how the rows were selected, citation.

The YAML front matter is what the Hub's dataset viewer and ``datasets.load_dataset`` read:
``configs`` maps each split to its Parquet shards (``data/<split>-*``), ``dataset_info`` gives
the features and row counts, and ``license``, ``language``, ``task_categories``, ``tags`` and
``size_categories`` fill the Hub's filters. The body says what each field holds and exactly
which rules picked the rows, with the command that exports them again.

Deterministic (no dates, no local paths), so exporting and pushing the same selection twice
changes nothing on the Hub.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hfplug.data.hupd import HUB_FILES, HUB_REPO_ID

CARD_FILE = "README.md"
DATA_DIR = "data"
EXPORT_COMMAND = "python -m hfplug.data.export_hupd"
LICENSE = "cc-by-sa-4.0"  # HUPD's own license (its Hub card and GitHub README); an export is shared alike
PAPER_URL = "https://arxiv.org/abs/2207.04043"
DECISIONS = ("ACCEPTED", "REJECTED", "PENDING", "CONT-ACCEPTED", "CONT-REJECTED", "CONT-PENDING")
# HupdArguments fields that choose the rows, in the order the card lists them (also the export command's flags).
SELECTION_FIELDS = (
    "hupd_config",
    "ipcr_label",
    "cpc_label",
    "query",
    "uniform_split",
    "train_filing_start_date",
    "train_filing_end_date",
    "val_filing_start_date",
    "val_filing_end_date",
    "val_set_balancer",
    "max_train_samples",
    "max_eval_samples",
)
CITATION = """\
@inproceedings{suzgun2023hupd,
  title         = {The {H}arvard {USPTO} Patent Dataset: A Large-Scale, Well-Structured, and Multi-Purpose Corpus of Patent Applications},
  author        = {Suzgun, Mirac and Melas-Kyriazi, Luke and Sarkar, Suproteem K. and Kominers, Scott Duke and Shieber, Stuart},
  booktitle     = {Advances in Neural Information Processing Systems 36 (NeurIPS 2023), Datasets and Benchmarks Track},
  year          = {2023},
  eprint        = {2207.04043},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2207.04043}
}"""
# (field, type, what it holds), in the order of hfplug.data.hupd_records.FEATURES
FIELD_DOCS = (
    ("patent_number", "string", "the **application** number (named `patent_number` as in the official loader)"),
    ("decision", "string", "the application's status in HUPD: " + ", ".join(DECISIONS)),
    ("title", "string", "title"),
    ("abstract", "string", "abstract"),
    ("claims", "string", "claims"),
    ("background", "string", "background section"),
    ("summary", "string", "summary section"),
    ("description", "string", "full description (the record's `full_description`)"),
    ("cpc_label", "string", "main CPC label"),
    ("ipc_label", "string", "main IPC label; its first 4 characters are the IPC subclass (e.g. `G06F`)"),
    ("filing_date", "string", "filing date, `YYYYMMDD`"),
    ("patent_issue_date", "string", "issue date of the granted patent, `YYYYMMDD`"),
    ("date_published", "string", "publication date of the application, `YYYYMMDD`"),
    ("examiner_id", "string", "USPTO examiner id"),
    ("application_number", "string", "the application number (the same value as `patent_number`)"),
    ("ipcr_labels", "list of string", "every IPC label of the application"),
    ("cpc_labels", "list of string", "every CPC label of the application"),
)


@dataclass
class SplitFiles:
    """One split as written: its rows, its Arrow size, and its Parquet shards (paths relative to the export)."""

    name: str
    num_rows: int
    num_bytes: int
    files: list[str]
    file_bytes: int
    decisions: dict[str, int] = field(default_factory=dict)


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` rows."""
    for limit, label in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M" if n < 10**7 else "10M<n<100M"


def export_command(selection: Mapping, *, extra: Sequence[str] = ()) -> str:
    """The export command for this selection (unset flags left out; no local paths)."""
    parts = [EXPORT_COMMAND]
    for name in SELECTION_FIELDS:
        value = selection.get(name)
        if value is None or value is False or value == "":
            continue
        parts += [f"--{name}", "true" if value is True else shlex.quote(str(value))]
    return " ".join([*parts, *extra])


def selection_rules(selection: Mapping, *, local_files: bool) -> list[str]:
    """Markdown bullets: which HUPD files, which filters, how the split was made, in which order."""
    config = selection["hupd_config"]
    metadata, archive = HUB_FILES[config]
    span = "applications filed in January 2016" if config == "sample" else "applications filed 2004-2018"
    source = "local copies of the files" if local_files else "the files"
    rules = [
        f"HUPD config `{config}` ({span}): {source} `{metadata}` and `{archive}` of the `{HUB_REPO_ID}` dataset repo."
    ]
    if selection.get("ipcr_label"):
        rules.append(f"Main IPC label starts with `{selection['ipcr_label']}`.")
    elif selection.get("cpc_label"):
        rules.append(f"Main CPC label starts with `{selection['cpc_label']}`.")
    if selection.get("query"):
        rules.append(
            f"Metadata rows matching the pandas query `{selection['query']}` (applied after the label filter)."
        )
    start, end = selection.get("train_filing_start_date"), selection.get("val_filing_end_date")
    if selection.get("uniform_split"):
        window = f"filed {start or 'any time'} to {end or 'any time'}, both inclusive"
        rules.append(
            f"Uniform split of the applications {window}: shuffled with `DataFrame.sample(frac=1.0, "
            "random_state=1729)`; train is the first `int(0.85 * n)` rows, validation the rest except the last "
            "shuffled row (the official loader leaves it out)."
        )
    else:
        rules.append(
            f"Date split on the filing date (start inclusive, end exclusive, as the official loader): train "
            f"{start} to {selection.get('train_filing_end_date')}, validation {selection.get('val_filing_start_date')} "
            f"to {end}."
        )
    if selection.get("val_set_balancer"):
        rules.append(
            "Balanced validation: only ACCEPTED and REJECTED applications, the larger class shuffled "
            "(`random_state=1729`) and cut to the size of the smaller; rejected rows first, then accepted."
        )
    for name, split in (("max_train_samples", "train"), ("max_eval_samples", "validation")):
        if selection.get(name):
            rules.append(f"Only the first {selection[name]} rows of {split} kept.")
    rules.append(
        "Row order is the official loader's: metadata order for a date split, the shuffled order for a uniform "
        "split, rejected then accepted for a balanced validation set. Each split's shards are consecutive pieces "
        "of it: read in file-name order they give that order."
    )
    rules.append(
        "An application whose JSON record is missing or unreadable, or whose filing date is missing, is left out "
        "(the official script crashes on it); the export's log counts them."
    )
    return rules


def card_metadata(splits: Sequence[SplitFiles], features):
    """The YAML front matter: Hub metadata, ``configs`` (split -> shards) and ``dataset_info`` (features, sizes)."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    data = DatasetCardData(
        license=LICENSE,
        language=["en"],
        pretty_name="HUPD (Harvard USPTO Patent Dataset), selected splits in Parquet",
        task_categories=["text-classification", "summarization"],
        task_ids=["multi-class-classification", "topic-classification"],
        tags=["patents", "uspto", "hupd", "hfplug"],
        size_categories=[size_category(sum(s.num_rows for s in splits))],
    )
    MetadataConfigs(
        {"default": {"data_files": [{"split": s.name, "path": f"{DATA_DIR}/{s.name}-*"} for s in splits]}}
    ).to_dataset_card_data(data)
    split_dict = SplitDict()
    for s in splits:
        split_dict.add(SplitInfo(name=s.name, num_bytes=s.num_bytes, num_examples=s.num_rows))
    info = DatasetInfo(
        features=features,
        splits=split_dict,
        download_size=sum(s.file_bytes for s in splits),
        dataset_size=sum(s.num_bytes for s in splits),
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    return data


def _splits_table(splits: Sequence[SplitFiles]) -> str:
    seen = [d for d in DECISIONS if any(s.decisions.get(d) for s in splits)]
    seen += sorted({d for s in splits for d in s.decisions} - set(DECISIONS))
    header = "| split | rows | Parquet files | " + " | ".join(seen) + " |"
    rule = "|---|---:|---:|" + "---:|" * len(seen)
    rows = [
        f"| {s.name} | {s.num_rows:,} | {len(s.files)} | "
        + " | ".join(f"{s.decisions.get(d, 0):,}" for d in seen)
        + " |"
        for s in splits
    ]
    return "\n".join([header, rule, *rows])


def build_card(
    splits: Sequence[SplitFiles], features, selection: Mapping, *, local_files: bool, repo_id: str | None = None
) -> str:
    """The whole ``README.md``: front matter and body."""
    data = card_metadata(splits, features)
    where = f'"{repo_id}"' if repo_id else '"path/to/this/folder"'
    rules = "\n".join(f"- {rule}" for rule in selection_rules(selection, local_files=local_files))
    fields = "\n".join(f"| `{name}` | {kind} | {doc} |" for name, kind, doc in FIELD_DOCS)
    command = export_command(selection, extra=("--output_dir", "OUTPUT_DIR"))
    body = f"""
# HUPD, selected splits in Parquet

Patent applications from the [Harvard USPTO Patent Dataset (HUPD)]({PAPER_URL}) (Suzgun et al., NeurIPS 2023
Datasets and Benchmarks), selected and split with the rules of HUPD's official loading script and written as
Parquet by hfplug (`{EXPORT_COMMAND}`). The official `{HUB_REPO_ID}` script no longer runs on `datasets` >= 4;
this copy loads with any recent `datasets`, and the Hub's dataset viewer reads it.

## Load it

```python
from datasets import load_dataset

splits = load_dataset({where})  # DatasetDict with {", ".join(repr(s.name) for s in splits)}
stream = load_dataset({where}, split="{splits[0].name}", streaming=True)  # read as you go, nothing stored first
```

## Splits

{_splits_table(splits)}

The paper's acceptance task keeps ACCEPTED (1) and REJECTED (0) only; the other decisions are here as HUPD
has them.

## How the rows were selected

{rules}

Export the same rows again (add `--hupd_metadata_path` / `--hupd_archive_path` for local copies of the
files, `--push_to_hub true --hub_dataset_id NAME` to push):

```bash
{command}
```

## Fields

| field | type | content |
|---|---|---|
{fields}

Sections missing in a record are empty strings (the official loader gives `None`). Dates are the records'
own `YYYYMMDD` strings.

## License

CC BY-SA 4.0, HUPD's license: credit the HUPD authors (below), and share adapted versions of this data
under the same license.

## Citation

```bibtex
{CITATION}
```
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"
