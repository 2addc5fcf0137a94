"""Load HUPD (Harvard USPTO Patent Dataset) on today's ``datasets``, faithfully and fast.

The official ``HUPD/hupd`` loading script no longer runs (``datasets >= 4`` refuses
loading scripts). :func:`load_hupd` reads the same Hub files and applies the same selection
rules (see :mod:`hfplug.data.hupd_selection`), so it returns the rows, in the order, and the 14
string fields upstream returns, plus ``application_number``, ``ipcr_labels`` and ``cpc_labels``.

How it reads the data, and why:

* The JSON records are read straight out of the tar archive in one sequential pass
  (``tarfile`` stream mode, nothing extracted to disk). Upstream extracts ~27k (sample) to
  4.5M (all) small files and opens each one; one pass over the compressed stream is several
  times faster and needs no scratch space for the extracted files.
* A member is taken only at the path upstream opens, ``<json_dir>/<filing year>/<application
  number>.json`` (``json_dir``: ``sample`` for ``sample``, ``data`` for ``all``, whose
  ``data/<year>.tar.gz`` unpack into ``data/``), and the archive is read as extraction leaves
  it on disk: of a path stored twice the last copy counts, and a hard link holds its target's
  content. Members nobody selected are skipped without being parsed.
* For ``all`` (an uncompressed tar of ``data/<year>.tar.gz``), only the year tarballs the
  selected filing dates need are decompressed; the others are skipped by seeking over them.
  Left on the Hub (no ``hupd_archive_path``), the 56 GB tar is not downloaded: its headers and
  the needed year tarballs are fetched by HTTP range requests and inflated as they arrive
  (:mod:`~hfplug.data.hupd_remote`), so nothing but the metadata and the built splits is written.
* Each record found is written once, in archive order, to a scratch Arrow file (one row per
  record batch). Each split is then copied out of it in upstream's row order (date split:
  metadata order; ``uniform_split``: the seed-1729 shuffle; ``val_set_balancer``: rejected,
  then accepted) by reading rows back through memory maps held for one batch at a time, into
  a plain Arrow file with no indices mapping. Memory stays flat however large the archive
  is; the price is one more write and read of the selected records (less than
  ``select(...).flatten_indices()``, which keeps the whole file mapped). The splits are
  cached under ``hupd_cache_dir``: a second call with the same arguments and the same input
  files opens them without reading the archive (or the metadata) again.
* ``columns=`` keeps only some fields (plus :data:`KEPT_COLUMNS`, a few bytes each): the
  cache then holds, say, titles and abstracts, a few percent of the records' bytes (the
  description is most of a record). The cache key includes the stored columns; a load of
  fewer columns opens a complete cache of the same selection that holds them (a view, no
  copy); a load of more builds its own.
* Before writing, the build measures the Arrow size of its first records and compares what
  the whole build needs (the split files, plus a scratch copy of the records while building)
  with the free space of ``hupd_cache_dir``: too little is an error that gives both and writes nothing.
* ``num_proc`` processes read ``all``'s needed year tarballs at once, each into a scratch
  file of its own; which copy of a path counts is decided from where each copy sat in the
  archive. The same processes then write each split in parts of whole batches, joined in
  order, so the splits are the same bytes as a one-process build's. The sample is one gzip
  stream: one process reads it.
* Decompression runs on a background thread (Arrow's gzip stream, which inflates without
  holding the GIL) while the main thread parses JSON and writes Arrow.
  ``benchmarks/hupd_loader.py`` compares the whole load with ``gzip -dc > /dev/null`` and with
  extracting the archive and opening each file, and checks that peak memory stays flat as the
  archive grows.
* ``streaming=True`` cannot reorder without holding the records back, so it yields archive
  order (and the first copy of a repeated path); the row multiset is the same otherwise.

The work is split by job: :mod:`~hfplug.data.hupd_files` (the Hub files: given, downloaded
or left on the Hub), :mod:`~hfplug.data.hupd_selection` (which rows),
:mod:`~hfplug.data.hupd_plan` (which archive paths; the skip warning),
:mod:`~hfplug.data.hupd_archive` (reading the tar), :mod:`~hfplug.data.hupd_remote` (the tar
on the Hub, by range requests), :mod:`~hfplug.data.hupd_records` (JSON record -> row),
:mod:`~hfplug.data.hupd_cache` (where an Arrow cache lives, its key; finding, reusing and
opening one), :mod:`~hfplug.data.hupd_build` (building one: merge in archive order, atomic
publish), :mod:`~hfplug.data.hupd_units` (reading the archive's units in processes),
:mod:`~hfplug.data.hupd_split_files` (writing the split files in parts),
:mod:`~hfplug.data.hupd_disk` (the disk-space check, the write errors) and
:mod:`~hfplug.data.hupd_streaming` (``streaming=True``). This module is the public API: the
argument checks and the metadata, and the names tests and callers import.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow as pa

from hfplug.data.hupd_archive import HupdFileError, _corrupt
from hfplug.data.hupd_build import _build_cache
from hfplug.data.hupd_cache import HupdCacheError, _cache_key, _cache_name, _find_cache, _log_cached_skips, _open_cache
from hfplug.data.hupd_files import HUB_FILES, HUB_REPO_ID, _connect, _resolve_files
from hfplug.data.hupd_plan import _plan
from hfplug.data.hupd_records import FEATURES, KEPT_COLUMNS, OFFICIAL_FIELDS, record_to_example, stored_columns
from hfplug.data.hupd_remote import HupdRemoteError, HupdYearMissingError
from hfplug.data.hupd_selection import (
    HupdSelection,
    parse_filing_date,
    select_splits,
    to_filing_dates,
    validate_split_dates,
)
from hfplug.data.hupd_streaming import streaming_splits

__all__ = [
    "FEATURES",
    "HUB_FILES",
    "HUB_REPO_ID",
    "KEPT_COLUMNS",
    "OFFICIAL_FIELDS",
    "HupdCacheError",
    "HupdFileError",
    "HupdRemoteError",
    "HupdYearMissingError",
    "load_hupd",
    "read_metadata",
    "record_to_example",
]

logger = logging.getLogger(__name__)

# config name -> the folder (inside the unpacked archive) that upstream opens records under
JSON_DIRS = {"sample": "sample", "all": "data"}

_METADATA_COLUMNS = ("application_number", "filing_date", "decision", "main_ipcr_label", "main_cpc_label")
# load_hupd's keywords before they took the names of the recipe's flags (hfplug.arguments.HupdArguments).
_RENAMED_KEYWORDS = {
    "name": "hupd_config",
    "metadata_path": "hupd_metadata_path",
    "archive_path": "hupd_archive_path",
    "cache_dir": "hupd_cache_dir",
}


def _accept_renamed_keywords(load: Callable) -> Callable:
    """``load_hupd(name=..., cache_dir=...)`` still works, with a ``DeprecationWarning`` that gives the new name."""

    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        for old, new in _RENAMED_KEYWORDS.items():
            if old not in kwargs:
                continue
            if new in kwargs:
                raise TypeError(f"load_hupd() got {old}= and {new}=, the same argument; pass {new}= only.")
            warnings.warn(f"load_hupd({old}=...) is now load_hupd({new}=...).", DeprecationWarning, stacklevel=2)
            kwargs[new] = kwargs.pop(old)
        return load(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


@_accept_renamed_keywords
def load_hupd(
    hupd_config: str = "sample",
    *,
    hupd_metadata_path: str | os.PathLike | None = None,
    hupd_archive_path: str | os.PathLike | None = None,
    train_filing_start_date: str | None = None,
    train_filing_end_date: str | None = None,
    val_filing_start_date: str | None = None,
    val_filing_end_date: str | None = None,
    uniform_split: bool = False,
    val_set_balancer: bool = False,
    ipcr_label: str | None = None,
    cpc_label: str | None = None,
    query: str | None = None,
    hupd_cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    streaming: bool = False,
    columns: Sequence[str] | None = None,
    num_proc: int | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load HUPD's ``train`` and ``validation`` splits with the official loader's selection and order.

    The keywords are the recipe's flags (``--hupd_config``, ``--hupd_cache_dir``, ...); the old
    ``name``, ``metadata_path``, ``archive_path`` and ``cache_dir`` still work, with a ``DeprecationWarning``.

    Args:
        hupd_config: ``"sample"`` (January 2016, ~27k applications) or ``"all"`` (2004-2018).
        hupd_metadata_path, hupd_archive_path: local copies of the Hub files (same layout). A path left
            unset is downloaded from the ``HUPD/hupd`` dataset repo with ``hf_hub_download``
            (so it is cached and resolved offline with ``HF_HUB_OFFLINE=1``), except ``all``'s
            56 GB archive: of it only the tar headers and the year tarballs the selected filing
            dates need are fetched, by range requests, and read as they arrive (a copy already
            in the Hub cache is read instead). A server that does not answer range requests gets
            the whole file downloaded into the Hub cache, with a warning saying why.
        train_filing_start_date ... val_filing_end_date: ``YYYY-MM-DD`` or ``YYYYMMDD``. Date
            split (default): all four required, end dates exclusive. With
            ``uniform_split=True`` only ``train_filing_start_date`` and ``val_filing_end_date``
            are used, inclusive.
        uniform_split: the official random 85/15 split (seed 1729; it drops the last
            shuffled row, as upstream).
        val_set_balancer: validation keeps equal numbers of ACCEPTED and REJECTED.
        ipcr_label, cpc_label: prefix filters on the main IPC / CPC label (IPC wins if both).
        query: a :meth:`pandas.DataFrame.query` string on the metadata (upstream's ``query_string``).
        hupd_cache_dir: where built splits are cached (default
            ``datasets.config.HF_DATASETS_CACHE / "hfplug_hupd"``).
        token: Hub token for the downloads (never logged or stored).
        streaming: return an ``IterableDatasetDict`` that reads the archive lazily on each
            iteration, with no Arrow cache. It yields archive order, not upstream's (see below).
        columns: the fields to keep, e.g. ``["title", "abstract"]`` (names of :data:`FEATURES`);
            :data:`KEPT_COLUMNS` (``application_number``, ``decision``, ``filing_date``,
            ``ipc_label``, ``cpc_label``: the row's key and what the selection rules act on, a
            few bytes each) are always kept. The cache (and the streamed rows) then hold only
            these: for records of real length about 1.2 MB per 1,000 applications for title,
            abstract and decision, against about 59 MB for every field (the description is
            most of a record). The rows are the same whatever the columns, so a cache of the
            same selection that holds every asked-for column is opened instead of building
            one. None (default): every field. ``hfplug.data.tasks.task_columns(task,
            text_fields)`` gives what a task reads.
        num_proc: processes that read the archive, then write the splits, while building the
            cache (the recipe's ``--preprocessing_num_workers``). For ``all`` each needed year
            tarball (``data/<year>.tar.gz``, local or on the Hub) is read by a process of its
            own, and the splits are the same bytes as with one process. ``sample`` is one gzip stream,
            which cannot be read in parts, so it is read by one process whatever ``num_proc``
            is. Each process inflates on a second thread and keeps about 1.2-1.5 cores busy, so
            use at most about half the CPUs (``num_proc=2`` on a 2-core machine such as Colab's
            gains ~1.2x; on 16 CPUs 1.4-1.7x, more for larger builds).
            Processes start the platform's default way, as for ``datasets``' ``num_proc`` (fork
            on Linux; on macOS and Windows a script needs the ``if __name__ == "__main__":``
            guard). No effect with ``streaming`` or a cache hit. Default: one process.

    Returns:
        A ``DatasetDict`` (or ``IterableDatasetDict``) with ``train`` and ``validation`` and
        :data:`FEATURES` (or only those of ``columns``, in :data:`FEATURES` order): the 14 official string fields, where ``patent_number`` holds the
        *application* number (as in the official loader; the granted patent's number is not
        included), ``decision`` comes from the JSON record and ``description`` is its
        ``full_description``; plus ``application_number`` and the ``ipcr_labels`` /
        ``cpc_labels`` lists. Null sections become ``""`` (upstream yields ``None``; the one
        deliberate difference in values).

        Rows come in upstream's order: date split, metadata order after the label filter and
        the query; ``uniform_split``, the order of ``df.sample(frac=1.0, random_state=1729)``;
        ``val_set_balancer``, the rejected rows then the accepted ones, each in its shuffled
        order. A metadata row that appears twice is yielded twice, as upstream. With
        ``streaming=True`` rows come in archive order instead (reordering would mean holding
        the records back), and a path stored twice in the archive gives its first copy.

    Raises:
        ValueError: bad dates, hupd_config, columns (the message lists the valid names) or
            num_proc; a filter or date window that selects nothing.
        FileNotFoundError: a given metadata/archive path does not exist.
        HupdFileError: a metadata or archive file is corrupt or truncated.
        HupdCacheError: the cache's disk has too little room: measured on the first records
            read, before any is written, against the selected rows and columns (the message
            gives the bytes needed and free, and the folder); or a write failed (no permission,
            a disk that filled up meanwhile). The message says where and about how much room is
            needed; nothing of the build is left, and earlier caches are untouched.
        HupdRemoteError: (a ``HupdFileError``) the archive on the Hub could not be read: the
            connection kept dropping (each drop resumes at the byte it stopped at, a few times).
        HupdYearMissingError: the archive on the Hub has no ``data/<year>.tar.gz`` for a year the
            selected filing dates need (the message names the year and those dates).

    Nothing in the records stops the load. A selected application whose JSON record is
    missing or not one JSON object, or whose metadata has no valid filing date, is skipped
    (upstream crashes on these). The record is looked for only at the path upstream opens;
    of a path stored twice in the archive the last copy is used (extraction overwrites), and
    a hard link member reads as the member it links to. All of these, and repeated metadata
    rows, are counted and reported in one warning per pass over the archive, which a load
    from the cache repeats; any JSON value is accepted for a field (nulls become ``""``,
    other values their ``str()``).
    """
    if hupd_config not in HUB_FILES:
        raise ValueError(f"hupd_config must be one of {sorted(HUB_FILES)}, got {hupd_config!r}")
    stored = stored_columns(columns)
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"num_proc must be a whole number >= 1 (processes that read the archive), got {num_proc!r}")
    selection = _selection_args(
        train_filing_start_date=train_filing_start_date,
        train_filing_end_date=train_filing_end_date,
        val_filing_start_date=val_filing_start_date,
        val_filing_end_date=val_filing_end_date,
        uniform_split=uniform_split,
        val_set_balancer=val_set_balancer,
        ipcr_label=ipcr_label,
        cpc_label=cpc_label,
        query=query,
    )
    metadata_file, archive_file = _resolve_files(hupd_config, hupd_metadata_path, hupd_archive_path, token)
    if streaming:
        archive_file = _connect(archive_file, token)
        splits, undated = _select(metadata_file, selection)
        return streaming_splits(splits, undated, archive_file, JSON_DIRS[hupd_config], columns=stored)

    root = (
        Path(hupd_cache_dir) if hupd_cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "hfplug_hupd"
    )
    base = f"{hupd_config}-{_cache_key(hupd_config, selection, metadata_file, archive_file)}"
    target = _find_cache(root, base, stored)
    if target is None:  # an archive on the Hub is reached only now: a cached load needs no network
        target = root / _cache_name(base, stored)
        archive_file = _connect(archive_file, token)
        splits, undated = _select(metadata_file, selection)
        plan = _plan(splits.items(), JSON_DIRS[hupd_config], undated_rows=undated)
        _build_cache(target, archive_file, plan, columns=stored, num_proc=num_proc or 1)
    else:
        logger.info("Using cached HUPD splits from %s", target)
        _log_cached_skips(target)
    return _open_cache(target, stored)


def _selection_args(**args: Any) -> dict[str, Any]:
    """Validate the selection arguments (before any file is touched) and normalise them."""
    validate_split_dates(
        args["train_filing_start_date"],
        args["train_filing_end_date"],
        args["val_filing_start_date"],
        args["val_filing_end_date"],
        uniform_split=args["uniform_split"],
    )
    for date in ("train_filing_start_date", "train_filing_end_date", "val_filing_start_date", "val_filing_end_date"):
        if args[date] is not None:  # YYYYMMDD and YYYY-MM-DD are the same day: one cache entry
            args[date] = str(parse_filing_date(args[date], date).date())
    for label in ("ipcr_label", "cpc_label", "query"):
        if args[label] is not None and not isinstance(args[label], str):
            raise ValueError(f"{label} must be a string, got {args[label]!r}")
        args[label] = args[label] or None  # "" means no filter, as upstream
    if args["ipcr_label"]:
        args["cpc_label"] = None  # ignored upstream when ipcr_label is set; keeps one cache entry
    args["uniform_split"], args["val_set_balancer"] = bool(args["uniform_split"]), bool(args["val_set_balancer"])
    return args


# ---------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """Read a HUPD metadata feather: all columns, or only ``columns`` plus the ones selection needs.

    Reading a subset matters for ``all``: the full file is ~1 GB. ``application_number`` is
    made a string and ``filing_date`` datetime64, as in the Hub files.
    """
    path = Path(path)
    try:
        available = _feather_columns(path)
        wanted = None
        if columns is not None and available is not None:
            wanted = [c for c in dict.fromkeys([*_METADATA_COLUMNS, *columns]) if c in available]
        df = pd.read_feather(path, columns=wanted)
    except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError
        raise _corrupt(path, "metadata file", exc) from exc
    missing = [c for c in _METADATA_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"HUPD metadata {path} lacks the column(s) {missing} that the split selection needs; "
            f"it has {list(df.columns)}. Is it the metadata feather from {HUB_REPO_ID}?"
        )
    df["application_number"] = df["application_number"].astype(str)
    # the Hub files' naive datetime64 passes through; a string, numeric or tz-aware column
    # is normalised so that the date split and the archive paths cannot trip over it
    df["filing_date"] = to_filing_dates(df["filing_date"])
    return df


def _feather_columns(path: Path) -> list[str] | None:
    """Column names from a feather v2 (Arrow IPC) footer; None for the old v1 format."""
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).schema.names
    except pa.ArrowInvalid:
        return None  # v1 or not feather at all: pd.read_feather decides


def _select(metadata_file: Path, selection: Mapping[str, Any]) -> tuple[HupdSelection, int]:
    """Read the metadata and apply the official selection rules.

    Also returns how many metadata rows have no valid filing date when the selection is
    bounded by dates (such rows can never be selected, and the user should hear of them).
    """
    # A query may name any column; without one, the selection columns are enough.
    df = read_metadata(metadata_file, columns=None if selection["query"] else ())
    dates = df["filing_date"].dropna()
    logger.info(
        "HUPD metadata %s: %d records filed %s to %s",
        metadata_file,
        len(df),
        dates.min().date() if len(dates) else "?",
        dates.max().date() if len(dates) else "?",
    )
    date_bounded = not selection["uniform_split"] or any(
        selection[name] for name in ("train_filing_start_date", "val_filing_end_date")
    )
    undated = int(df["filing_date"].isna().sum()) if date_bounded else 0
    return select_splits(df, **selection), undated
