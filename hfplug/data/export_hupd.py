"""Export HUPD splits as Parquet shards with a dataset card, and optionally push them to your own Hub dataset repo.

HUPD's full archive is ~56 GB of nested tarballs that only hfplug's loader (or the official script, which
no longer runs) can select from. Export the rows a job needs once: ``load_hupd`` reads them (for ``all``,
fetching only the needed years from the Hub), and the export writes them as plain Parquet that
``datasets.load_dataset`` reads anywhere (a Colab disk, streaming from the Hub) and the Hub's dataset viewer shows.

    python -m hfplug.data.export_hupd --hupd_config all --ipcr_label G06F --uniform_split true \\
        --train_filing_start_date 2011-01-01 --val_filing_end_date 2016-12-31 --val_set_balancer true \\
        --output_dir outputs/hupd_g06f --push_to_hub true --hub_dataset_id alice/hupd-g06f --hub_private_repo true

The selection flags are the recipe's (``hfplug.arguments.HupdArguments``: ``--hupd_config``, the four
dates, ``--uniform_split``, ``--val_set_balancer``, ``--ipcr_label``, ``--cpc_label``, ``--query``,
``--max_train_samples``, ``--max_eval_samples``, the file and cache paths); ``--config file.yaml``
sets any of them. The rows, their order and the fields are exactly what ``load_hupd`` returns.

Layout of ``--output_dir`` (what ``datasets.push_to_hub`` writes, so the viewer and ``load_dataset`` read it)::

    README.md                               dataset card: configs/data_files, license, fields, selection, citation
    data/train-00000-of-00002.parquet       consecutive pieces of each split, in the loader's row order
    data/train-00001-of-00002.parquet
    data/validation-00000-of-00001.parquet

``--max_shard_size`` bounds each shard's uncompressed (Arrow) size, as in ``datasets``' ``push_to_hub``;
the zstd-compressed file is typically a few times smaller. An earlier export in ``--output_dir`` is replaced
only once the new one is complete (it needs room for both meanwhile); a folder holding anything else
is refused.

With ``--push_to_hub true`` the token is checked, write access to ``--hub_dataset_id`` asked of the Hub and
the dataset repo created (``--hub_private_repo`` honoured) **before** any file is written or any data
read, as for model pushes: a missing, revoked or read-only token fails in seconds. The push is one
commit of ``README.md`` and ``data/``; shards the repo holds from an earlier export and this one lacks
are deleted in it, and unchanged files are skipped, so pushing the same export twice commits nothing.

Bad input (a flag, a date, a missing file, a refusal by the Hub) ends in one ``error:`` paragraph and exit
status 2 (``hfplug.cli.run``); the token is never printed.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from hfplug.arguments import HupdArguments
from hfplug.cli import run, set_download_hint
from hfplug.config import parse_args
from hfplug.data.export_card import CARD_FILE, DATA_DIR, EXPORT_COMMAND, SELECTION_FIELDS, SplitFiles, build_card
from hfplug.data.hupd import HUB_REPO_ID, load_hupd
from hfplug.hub import PushError
from hfplug.hub.auth import ResolvedToken, hub_api, resolve_token
from hfplug.hub.errors import hub_call, status_of
from hfplug.hub.preflight import preflight_push
from hfplug.hub.push import PushTarget, check_no_secrets
from hfplug.hub.push import upload_command as hub_upload_command  # the export's adds --delete
from hfplug.hub.redaction import TOKEN_SETTINGS_URL, install_token_redaction

logger = logging.getLogger("hfplug.data.export_hupd")

COMPRESSIONS = ("zstd", "snappy", "gzip", "none")
STAGING = ".hfplug-export-tmp"  # the new export is built here, inside output_dir, then moved into place
_ROW_GROUP_BYTES = 100 * 10**6  # datasets' MAX_ROW_GROUP_SIZE: what the Hub's viewer expects
PUSHED = (CARD_FILE, f"{DATA_DIR}/*.parquet")  # upload_folder patterns: all an export pushes
REPLACED_ON_HUB = (f"{DATA_DIR}/*",)  # remote files of an earlier export that this push deletes unless re-sent
# HupdArguments fields that only shape training (tokenization, the model's input): an export writes every field.
_TRAINING_ONLY = ("task", "text_fields", "chat_template", "max_length", "group_by_length", "preprocessing_num_workers")


@dataclass
class ExportArguments:
    """Where the export goes and how it is written; the rows are chosen by ``HupdArguments``."""

    output_dir: str = field(
        metadata={"help": "Folder for README.md and data/<split>-NNNNN-of-NNNNN.parquet (created if missing)."}
    )
    max_shard_size: str = field(
        default="500MB",
        metadata={
            "help": "Largest shard, uncompressed (Arrow) size as in datasets' push_to_hub: e.g. 500MB, 1GB, 100MiB."
        },
    )
    compression: str = field(
        default="zstd",
        metadata={
            "help": "Parquet compression: zstd (smallest; read by datasets and the Hub viewer), snappy, gzip, none."
        },
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Push the export to --hub_dataset_id (checked before anything is written)."}
    )
    hub_dataset_id: str | None = field(
        default=None,
        metadata={
            "help": "Dataset repo to push to: namespace/name, or name for your own (default: output_dir's name)."
        },
    )
    hub_private_repo: bool = field(
        default=False,
        metadata={"help": "Create the dataset repo private (a new repo only; without it the Hub's default applies)."},
    )

    def __post_init__(self):
        if not str(self.output_dir or "").strip():
            raise ValueError(
                "output_dir is empty: give the folder to export to, e.g. --output_dir outputs/hupd_parquet."
            )
        parse_shard_size(self.max_shard_size)  # a clear error at parse time
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}.")

    def repo_id(self) -> str:
        """``--hub_dataset_id``, else the output folder's name (as ``--hub_model_id`` defaults for a training run)."""
        return self.hub_dataset_id or Path(self.output_dir).absolute().name


def parse_shard_size(value: str | int) -> int:
    """``"500MB"``, ``"1GB"``, ``"100MiB"`` (as ``datasets``' ``max_shard_size``) or bytes -> bytes, > 0."""
    from datasets.utils.py_utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(value if isinstance(value, int) else str(value).strip())
    except ValueError:
        size = 0
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"max_shard_size {value!r} is not a size; write a whole number and a unit, e.g. 500MB, 2GB or 100MiB."
        )
    return size


def check_selection_args(data_args: HupdArguments) -> None:
    """Refuse what an export cannot honour: streaming (archive order, not the loader's) and training-only settings."""
    if data_args.streaming:
        raise ValueError(
            "streaming=True yields archive order, and the export writes the official loader's order. Leave "
            "--streaming out: the export reads the archive once into hupd_cache_dir and writes from there."
        )
    defaults = HupdArguments()
    given = [name for name in _TRAINING_ONLY if getattr(data_args, name) != getattr(defaults, name)]
    if given:
        raise ValueError(
            f"{', '.join('--' + name for name in given)} only shape(s) training; the export writes every field of "
            "the selected records. Leave them out (the selection flags are hupd_config, the dates, uniform_split, "
            "val_set_balancer, ipcr_label, cpc_label, query, max_train_samples, max_eval_samples)."
        )


# --------------------------------------------------------------------------- the output folder


def _is_export_card(path: Path) -> bool:
    try:
        return EXPORT_COMMAND in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def check_output_dir(output_dir: str | Path) -> None:
    """``output_dir`` must be new, empty, or an earlier export (README.md from this module + data/*.parquet)."""
    path = Path(output_dir)
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(
            f"output_dir {str(path)!r} is a file, not a folder. Pass a folder path (it is created if missing)."
        )
    foreign = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):  # .git of a clone, .cache of `hf download`, a leftover staging folder
            continue
        if entry.name == CARD_FILE and entry.is_file() and _is_export_card(entry):
            continue
        if entry.name == DATA_DIR and entry.is_dir():
            foreign += [f"{DATA_DIR}/{p.name}" for p in sorted(entry.iterdir()) if not p.name.endswith(".parquet")]
            continue
        foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"output_dir {str(path)!r} holds files that are not part of a HUPD export ({shown}). The export replaces "
            f"{CARD_FILE} and {DATA_DIR}/ there; pass a new or empty folder."
        )


def _shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each shard: consecutive, sizes differing by at most one row (as ``Dataset.shard``)."""
    size, extra = divmod(num_rows, num_shards)
    bounds, start = [], 0
    for index in range(num_shards):
        stop = start + size + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _write_split(dataset, split: str, folder: Path, *, max_shard_bytes: int, compression: str) -> SplitFiles:
    """``dataset`` as consecutive Parquet shards ``<split>-NNNNN-of-NNNNN.parquet`` in ``folder``.

    Written with pyarrow as ``datasets`` writes Parquet (its schema metadata, so ``load_dataset`` gets
    the same features back; content-defined chunking, so a re-export uploads only changed pages with
    Xet; a page index; row groups of at most ~100 MB of Arrow data, which the dataset viewer reads),
    but with the compression asked for: ``Dataset.to_parquet`` always compresses text with snappy.
    """
    import datasets
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = dataset.with_format("arrow")  # slices are pyarrow Tables, zero-copy from the memory-mapped cache
    num_rows, num_bytes = len(dataset), dataset.data.nbytes  # the Arrow bytes of these rows (slice-aware)
    num_shards = max(1, min(num_rows, math.ceil(num_bytes / max_shard_bytes)))
    row_group = max(1, num_rows * _ROW_GROUP_BYTES // max(num_bytes, 1))
    schema = dataset.features.arrow_schema
    files, file_bytes = [], 0
    for index, (start, stop) in enumerate(_shard_bounds(num_rows, num_shards)):
        name = f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
        with pq.ParquetWriter(
            folder / name,
            schema,
            compression=compression,
            use_content_defined_chunking=datasets.config.DEFAULT_CDC_OPTIONS,
            write_page_index=True,
        ) as writer:
            for offset in range(start, stop, row_group):
                writer.write_table(rows[offset : min(offset + row_group, stop)])
        files.append(f"{DATA_DIR}/{name}")
        file_bytes += (folder / name).stat().st_size
    counts = pc.value_counts(rows[:]["decision"]).to_pylist() if num_rows else []
    decisions = {c["values"]: c["counts"] for c in counts}
    logger.info("Wrote %s: %d rows in %d shard(s), %.1f MB of Parquet", split, num_rows, num_shards, file_bytes / 1e6)
    return SplitFiles(split, num_rows, num_bytes, files, file_bytes, decisions)


def write_export(
    splits,
    output_dir: str | Path,
    *,
    selection: dict,
    local_files: bool = False,
    max_shard_size: str | int = "500MB",
    compression: str = "zstd",
    repo_id: str | None = None,
) -> list[SplitFiles]:
    """Write ``splits`` (a ``DatasetDict``) and the card to ``output_dir``; an earlier export there is replaced.

    The new export is built in ``output_dir/.hfplug-export-tmp`` and moved into place when complete, so
    a failure leaves the earlier export as it was.
    """
    out = Path(output_dir)
    check_output_dir(out)
    max_shard_bytes = parse_shard_size(max_shard_size)
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    (staging / DATA_DIR).mkdir(parents=True)
    try:
        written = [
            _write_split(
                splits[name], name, staging / DATA_DIR, max_shard_bytes=max_shard_bytes, compression=compression
            )
            for name in splits
        ]
        features = next(iter(splits.values())).features
        card = build_card(written, features, selection, local_files=local_files, repo_id=repo_id)
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
        old = out / f"{STAGING}-old"
        shutil.rmtree(old, ignore_errors=True)
        if (out / DATA_DIR).exists():
            (out / DATA_DIR).rename(old)
        (staging / DATA_DIR).rename(out / DATA_DIR)
        (staging / CARD_FILE).replace(out / CARD_FILE)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Export written to %s: %s", out, ", ".join(f"{s.name} {s.num_rows} rows" for s in written))
    return written


def _limit(splits, data_args: HupdArguments):
    """The first ``max_train_samples`` / ``max_eval_samples`` rows (a contiguous slice: no indices mapping)."""
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and name in splits and len(splits[name]) > limit:
            splits[name] = splits[name].select(range(limit))
    return splits


def selection_of(data_args: HupdArguments) -> dict:
    """The selection fields of ``data_args`` (what the card records)."""
    return {name: getattr(data_args, name) for name in SELECTION_FIELDS}


# --------------------------------------------------------------------------- the Hub


def upload_command(output_dir, repo_id: str) -> str:
    """The command that uploads a finished export (safe to repeat), ready to paste into a shell."""
    return hub_upload_command(output_dir, repo_id, repo_type="dataset", delete=REPLACED_ON_HUB[0])


def _upload_failure(kind: str, err: BaseException, *, repo_id: str, found: ResolvedToken, folder: Path):
    causes = {
        "not_found": (f"the dataset repo {repo_id} does not exist (deleted?) or the token cannot see it", "not_found"),
        "gated": (f"the dataset repo {repo_id} cannot be seen with the token from {found.source}", "not_found"),
        "invalid_token": (
            f"the token from {found.source} was rejected (401): invalid, expired or revoked. Create a new one at "
            f"{TOKEN_SETTINGS_URL}",
            "invalid_token",
        ),
        "forbidden": (f"the token from {found.source} may not write to {repo_id} (403)", "no_rights"),
        "http": (f"the Hub answered {status_of(err)}: {err}", "hub_error"),
        "offline": ("HF_HUB_OFFLINE=1 is set; unset it to push", "offline"),
    }
    cause, reason = causes.get(kind, (f"the Hub could not be reached ({type(err).__name__}: {err})", "network"))
    return reason, (
        f"Pushing the export in {folder} to the dataset repo {repo_id} failed: {cause}. The export is complete "
        f"and intact. Retry the upload (safe to repeat: files already on the Hub are skipped) with: "
        f"{upload_command(folder, repo_id)}"
    )


def push_export(output_dir: str | Path, target: PushTarget, *, commit_message: str | None = None):
    """Upload ``README.md`` and ``data/*.parquet`` of ``output_dir`` to ``target`` in one commit.

    Remote ``data/*`` files this export lacks (shards of an earlier, differently sharded export)
    are deleted in the same commit; unchanged files are skipped, so a repeated push commits nothing.
    Raises ``PushError`` with the command that retries it; the local export stays as it is.
    """
    folder = Path(output_dir)
    check_no_secrets(folder, [CARD_FILE], secrets=[target.token])
    found = ResolvedToken(target.token, target.token_source)
    api = hub_api(target.endpoint)
    explain = partial(_upload_failure, repo_id=target.repo_id, found=found, folder=folder)
    with hub_call(PushError, explain):
        info = api.upload_folder(
            repo_id=target.repo_id,
            repo_type="dataset",
            folder_path=folder,
            allow_patterns=list(PUSHED),
            delete_patterns=list(REPLACED_ON_HUB),
            commit_message=commit_message or "Upload HUPD export (hfplug)",
            token=target.token,
        )
    logger.info("Pushed to %s/datasets/%s", api.endpoint, target.repo_id)
    return info


# --------------------------------------------------------------------------- the command


def main(argv=None) -> int:
    # --- Arguments ------------------------------------------------------------
    export_args, data_args = parse_args((ExportArguments, HupdArguments), argv)
    check_selection_args(data_args)
    check_output_dir(export_args.output_dir)
    # Said only if a HUPD file cannot be fetched (offline, nothing cached): what to download.
    set_download_hint(dataset=(HUB_REPO_ID, data_args.hub_files_needed()))

    # --- Logging --------------------------------------------------------------
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO,
    )
    install_token_redaction()

    # --- Hub: token, write access, the repo; before any file is written -------
    target = None
    if export_args.push_to_hub:
        repo_id = export_args.repo_id()
        target = preflight_push(
            repo_id,
            repo_type="dataset",
            private=True if export_args.hub_private_repo else None,  # no flag: the account's default visibility
            retry=upload_command(export_args.output_dir, repo_id.strip()),  # also deletes an earlier export's shards
        )

    # --- Data: the recipe's selection, in the official loader's order ----------
    token = target.token if target is not None else resolve_token()  # None is fine: HUPD/hupd is public
    splits = _limit(load_hupd(**data_args.load_hupd_kwargs(), token=token), data_args)

    # --- Write: Parquet shards and the dataset card ---------------------------
    write_export(
        splits,
        export_args.output_dir,
        selection=selection_of(data_args),
        local_files=not data_args.hub_files_needed(),
        max_shard_size=export_args.max_shard_size,
        compression=export_args.compression,
        repo_id=target.repo_id if target is not None else None,
    )

    # --- Push -----------------------------------------------------------------
    if target is not None:
        push_export(export_args.output_dir, target)
    return 0


if __name__ == "__main__":
    run(main)  # bad input or a Hub refusal: one `error:` paragraph (tokens masked) and exit status 2
