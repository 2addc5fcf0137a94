"""Load HUPD (Harvard USPTO Patent Dataset) on today's ``datasets``, faithfully and fast.

The official ``HUPD/hupd`` loading script no longer runs (``datasets >= 4`` refuses
loading scripts). :func:`load_hupd` reads the same Hub files and applies the same selection
rules (see :mod:`hfplug.data.hupd_splits`), so it returns the rows, in the order, and the 14
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
* Each record found is written once, in archive order, to a scratch Arrow file (one row per
  record batch). Each split is then copied out of it in upstream's row order (date split:
  metadata order; ``uniform_split``: the seed-1729 shuffle; ``val_set_balancer``: rejected,
  then accepted) by reading rows back with ``pread``, into a plain Arrow file with no
  indices mapping. Memory stays flat however large the archive is; the price is one more
  write and read of the selected records (less than ``select(...).flatten_indices()``,
  which also maps the whole file into memory). The splits are cached under ``cache_dir``:
  a second call with the same arguments and the same input files opens them without
  reading the archive (or the metadata) again.
* Decompression runs on a background thread (zlib releases the GIL) while the main thread
  parses JSON and writes Arrow. ``benchmarks/hupd_loader.py`` compares the whole load with
  ``gzip -dc > /dev/null`` and with extracting the archive and opening each file, and checks
  that peak memory stays flat as the archive grows.
* ``streaming=True`` cannot reorder without holding the records back, so it yields archive
  order (and the first copy of a repeated path); the row multiset is the same otherwise.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import posixpath
import queue
import re
import shutil
import socket
import tarfile
import tempfile
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import datasets
import pandas as pd
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

from hfplug.data.hupd_splits import (
    HupdSelection,
    parse_filing_date,
    select_splits,
    to_filing_dates,
    validate_split_dates,
)

__all__ = [
    "FEATURES",
    "HUB_FILES",
    "HUB_REPO_ID",
    "HupdCacheError",
    "HupdFileError",
    "load_hupd",
    "read_metadata",
    "record_to_example",
]

logger = logging.getLogger(__name__)

HUB_REPO_ID = "HUPD/hupd"
# config name -> (metadata file, archive file) in the HUPD/hupd dataset repo
HUB_FILES: dict[str, tuple[str, str]] = {
    "sample": ("hupd_metadata_jan16_2022-02-22.feather", "data/sample-jan-2016.tar.gz"),
    "all": ("hupd_metadata_2022-02-22.feather", "data/all-years.tar"),
}
# config name -> the folder (inside the unpacked archive) that upstream opens records under
JSON_DIRS = {"sample": "sample", "all": "data"}

# The official loader's 14 string fields, in its order.
OFFICIAL_FIELDS = (
    "patent_number", "decision", "title", "abstract", "claims", "background", "summary",
    "description", "cpc_label", "ipc_label", "filing_date", "patent_issue_date",
    "date_published", "examiner_id",
)
FEATURES = datasets.Features(
    {
        **{name: datasets.Value("string") for name in OFFICIAL_FIELDS},
        "application_number": datasets.Value("string"),
        "ipcr_labels": datasets.List(datasets.Value("string")),
        "cpc_labels": datasets.List(datasets.Value("string")),
    }
)
# output field -> key in the JSON record (patent_number is filled from the metadata instead)
_JSON_KEYS = {
    "decision": "decision", "title": "title", "abstract": "abstract", "claims": "claims",
    "background": "background", "summary": "summary", "description": "full_description",
    "cpc_label": "main_cpc_label", "ipc_label": "main_ipcr_label", "filing_date": "filing_date",
    "patent_issue_date": "patent_issue_date", "date_published": "date_published",
    "examiner_id": "examiner_id",
}
_METADATA_COLUMNS = ("application_number", "filing_date", "decision", "main_ipcr_label", "main_cpc_label")
_SPLITS = ("train", "validation")

# Bump when the cached Arrow content changes for the same inputs. 2: upstream row order,
# repeated metadata rows kept, exact paths, last copy of a repeated member, hard links.
CACHE_VERSION = 2
_INFO_FILE = "hfplug_hupd.json"
_RECORDS_FILE = "records.arrow"  # scratch: every record found, in archive order
# Examples per Arrow record batch: real records are ~50 KB, so a batch holds ~10 MB of text.
_WRITER_BATCH_SIZE = 200
_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1 << 21  # compressed bytes read per step
_MAX_INFLATE = 1 << 23  # cap on bytes inflated per step, so a zip bomb cannot balloon memory
_QUEUE_CHUNKS = 4  # inflated pieces buffered ahead of the parser (<= 32 MB); few, big pieces
# keep GIL hand-offs between the inflating thread and the parser rare
_LISTED_MISSING = 10  # application numbers named in the skipped-records warning
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}

_DESCRIPTION = (
    "The Harvard USPTO Patent Dataset (HUPD): English-language US patent applications filed "
    "2004-2018, with their final decisions (Suzgun et al., arXiv 2207.04043)."
)


class HupdFileError(OSError):
    """A HUPD metadata or archive file exists but cannot be read (corrupt, truncated, wrong kind)."""


class HupdCacheError(OSError):
    """The HUPD Arrow cache could not be written (full disk, no permission, ...).

    The message names the cache folder and, for a full disk, about how much room the build
    needs there. The scratch folder is removed and any earlier cache is left as it was.
    """


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


def load_hupd(
    name: str = "sample",
    *,
    metadata_path: str | os.PathLike | None = None,
    archive_path: str | os.PathLike | None = None,
    train_filing_start_date: str | None = None,
    train_filing_end_date: str | None = None,
    val_filing_start_date: str | None = None,
    val_filing_end_date: str | None = None,
    uniform_split: bool = False,
    val_set_balancer: bool = False,
    ipcr_label: str | None = None,
    cpc_label: str | None = None,
    query: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    streaming: bool = False,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load HUPD's ``train`` and ``validation`` splits with the official loader's selection and order.

    Args:
        name: ``"sample"`` (January 2016, ~27k applications) or ``"all"`` (2004-2018).
        metadata_path, archive_path: local copies of the Hub files (same layout). A path left
            unset is downloaded from the ``HUPD/hupd`` dataset repo with ``hf_hub_download``
            (so it is cached and resolved offline with ``HF_HUB_OFFLINE=1``).
        train_filing_start_date ... val_filing_end_date: ``YYYY-MM-DD`` or ``YYYYMMDD``. Date
            split (default): all four required, end dates exclusive. With
            ``uniform_split=True`` only ``train_filing_start_date`` and ``val_filing_end_date``
            are used, inclusive.
        uniform_split: the official random 85/15 split (seed 1729; it drops the last
            shuffled row, as upstream).
        val_set_balancer: validation keeps equal numbers of ACCEPTED and REJECTED.
        ipcr_label, cpc_label: prefix filters on the main IPC / CPC label (IPC wins if both).
        query: a :meth:`pandas.DataFrame.query` string on the metadata (upstream's ``query_string``).
        cache_dir: where built splits are cached (default
            ``datasets.config.HF_DATASETS_CACHE / "hfplug_hupd"``).
        token: Hub token for the downloads (never logged or stored).
        streaming: return an ``IterableDatasetDict`` that reads the archive lazily on each
            iteration, with no Arrow cache. It yields archive order, not upstream's (see below).

    Returns:
        A ``DatasetDict`` (or ``IterableDatasetDict``) with ``train`` and ``validation`` and
        :data:`FEATURES`: the 14 official string fields, where ``patent_number`` holds the
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
        ValueError: bad dates or name, a filter or date window that selects nothing.
        FileNotFoundError: a given metadata/archive path does not exist.
        HupdFileError: a metadata or archive file is corrupt or truncated.
        HupdCacheError: the cache could not be written (e.g. the disk is full); the message
            says where and about how much room is needed.

    Nothing in the records stops the load. A selected application whose JSON record is
    missing or not one JSON object, or whose metadata has no valid filing date, is skipped
    (upstream crashes on these). The record is looked for only at the path upstream opens;
    of a path stored twice in the archive the last copy is used (extraction overwrites), and
    a hard link member reads as the member it links to. All of these, and repeated metadata
    rows, are counted and reported in one warning per pass over the archive, which a load
    from the cache repeats; any JSON value is accepted for a field (nulls become ``""``,
    other values their ``str()``).
    """
    if name not in HUB_FILES:
        raise ValueError(f"name must be one of {sorted(HUB_FILES)}, got {name!r}")
    selection = _selection_args(
        train_filing_start_date=train_filing_start_date, train_filing_end_date=train_filing_end_date,
        val_filing_start_date=val_filing_start_date, val_filing_end_date=val_filing_end_date,
        uniform_split=uniform_split, val_set_balancer=val_set_balancer, ipcr_label=ipcr_label,
        cpc_label=cpc_label, query=query,
    )
    metadata_file, archive_file = _resolve_files(name, metadata_path, archive_path, token)
    if streaming:
        return _load_streaming(name, metadata_file, archive_file, selection)

    root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "hfplug_hupd"
    target = root / f"{name}-{_cache_key(name, selection, metadata_file, archive_file)}"
    if not _is_complete_cache(target):
        splits, undated = _select(metadata_file, selection)
        _build_cache(target, archive_file, _plan(splits.items(), JSON_DIRS[name], undated_rows=undated))
    else:
        logger.info("Using cached HUPD splits from %s", target)
        _log_cached_skips(target)
    return _open_cache(target)


def _selection_args(**args: Any) -> dict[str, Any]:
    """Validate the selection arguments (before any file is touched) and normalise them."""
    validate_split_dates(args["train_filing_start_date"], args["train_filing_end_date"],
                         args["val_filing_start_date"], args["val_filing_end_date"],
                         uniform_split=args["uniform_split"])
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
# Input files
# ---------------------------------------------------------------------------------------


def _resolve_files(name: str, metadata_path: str | os.PathLike | None, archive_path: str | os.PathLike | None,
                   token: str | bool | None) -> tuple[Path, Path]:
    """Local paths of the metadata and the archive: given ones are checked, others downloaded."""
    hub_metadata, hub_archive = HUB_FILES[name]
    resolved = []
    for given, hub_name, what, argument in ((metadata_path, hub_metadata, "metadata", "metadata_path"),
                                            (archive_path, hub_archive, "archive", "archive_path")):
        if given is None:
            resolved.append(_download(hub_name, token))
            continue
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"HUPD {what} file not found: {path}. Pass {argument}= the local copy of "
                f"{hub_name!r} from the {HUB_REPO_ID} dataset repo, or leave {argument} unset "
                "to download it from the Hub."
            )
        resolved.append(path)
    return resolved[0], resolved[1]


def _download(filename: str, token: str | bool | None) -> Path:
    """Fetch one file of HUPD/hupd into the Hub cache (a no-op when it is already there)."""
    from huggingface_hub import hf_hub_download

    logger.info("Fetching %s from the %s dataset repo (Hub cache)", filename, HUB_REPO_ID)
    try:
        return Path(hf_hub_download(repo_id=HUB_REPO_ID, repo_type="dataset", filename=filename, token=token))
    except Exception as exc:
        exc.add_note(
            f"hfplug could not fetch {filename!r} from the {HUB_REPO_ID} dataset repo. Check the network "
            "(or, offline, that it is in the Hub cache), or download it yourself and pass "
            "metadata_path=/archive_path= to load_hupd."
        )
        raise


def _corrupt(path: Path, what: str, reason: object) -> HupdFileError:
    """The error for an unreadable input file, saying what to do about it."""
    return HupdFileError(
        f"HUPD {what} {path} is unreadable ({reason}). If it came from the Hub, delete it and "
        f"download it again (hf_hub_download(..., force_download=True)); if you passed it as a "
        "path, check that it is the complete HUPD file of that name."
    )


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
    logger.info("HUPD metadata %s: %d records filed %s to %s", metadata_file, len(df),
                dates.min().date() if len(dates) else "?", dates.max().date() if len(dates) else "?")
    date_bounded = not selection["uniform_split"] or any(
        selection[name] for name in ("train_filing_start_date", "val_filing_end_date"))
    undated = int(df["filing_date"].isna().sum()) if date_bounded else 0
    return select_splits(df, **selection), undated


# ---------------------------------------------------------------------------------------
# What to look for: each split's rows in upstream's order, as archive paths
# ---------------------------------------------------------------------------------------


def _normalise(name: str) -> str | None:
    """A member name as the path it extracts to, relative to where the archive is unpacked.

    ``./sample//2016/1.json`` and ``/sample/2016/1.json`` both land at ``sample/2016/1.json``
    (tar drops a leading ``/``); a name that climbs out with ``..`` lands nowhere: None.
    """
    path = posixpath.normpath(name.lstrip("/"))
    if path in (".", "..") or path.startswith("../"):
        return None
    return path


@dataclasses.dataclass
class _Plan:
    """What a pass over the archive must find, and in which order each split lists it.

    ``rows``: split -> the archive path (key) of each selected metadata row, in upstream's
    order; a key repeats when a metadata row does (upstream yields such a row twice), and
    None stands for a row without a valid filing date (no path: skipped). ``numbers``: key ->
    application number. ``undated``: application numbers of the rows without a path.
    ``duplicate_rows``: application numbers of rows repeating one already selected for the
    same split. ``years``: filing years of the keys. ``undated_rows``: see :func:`_select`.
    """

    rows: dict[str, list[str | None]] = dataclasses.field(default_factory=dict)
    numbers: dict[str, str] = dataclasses.field(default_factory=dict)
    undated: dict[str, None] = dataclasses.field(default_factory=dict)
    duplicate_rows: list[str] = dataclasses.field(default_factory=list)
    years: set[str] = dataclasses.field(default_factory=set)
    undated_rows: int = 0

    @property
    def n_selected(self) -> int:
        """Distinct selected applications (a path, or an undated application number)."""
        return len(self.numbers) + len(self.undated)


def _plan(parts: Iterable[tuple[str, pd.DataFrame]], json_dir: str, *, undated_rows: int = 0) -> _Plan:
    """The :class:`_Plan` for ``(split, metadata rows in upstream's order)`` pairs.

    A row's key is the file upstream opens: ``<json_dir>/<filing year>/<application number>.json``.
    """
    plan = _Plan(undated_rows=undated_rows)
    for split, df in parts:
        keys = plan.rows.setdefault(split, [])
        seen: set[Any] = set()
        for year, number in zip(df["filing_date"].dt.year, df["application_number"]):
            if pd.isna(year):
                key = None
                plan.undated.setdefault(number)
            else:
                path = f"{json_dir}/{int(year)}/{number}.json"
                key = _normalise(path) or path  # a number that climbs out (``..``) matches no member
                plan.numbers.setdefault(key, number)
                plan.years.add(str(int(year)))
            ident = key if key is not None else ("undated", number)
            if ident in seen:
                plan.duplicate_rows.append(number)
            seen.add(ident)
            keys.append(key)
    return plan


# ---------------------------------------------------------------------------------------
# Reading the archive
# ---------------------------------------------------------------------------------------


class _Gunzip:
    """Decompressed bytes of a gzip stream, inflated ahead on a second core, fully checked.

    tarfile's own ``r|gz`` never checks the gzip trailer, so a truncated download would just
    end the archive early and look like missing records. Here a stream that ends before its
    end-of-stream marker raises EOFError and a bad CRC raises ``zlib.error``.

    A background thread reads and inflates while the caller parses JSON: zlib releases the
    GIL, so decompression (the largest cost) overlaps with parsing and Arrow writing. The
    queue holds at most ``_QUEUE_CHUNKS`` pieces of at most ``_MAX_INFLATE`` bytes each, so
    memory stays bounded. Use as a context manager so the thread is stopped on early exit.
    """

    def __init__(self, source: BinaryIO, *, threaded: bool = True):
        self._source = source
        self._inflater = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        self._chunk = b""
        self._pos = 0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if threaded:
            self._queue = queue.Queue(maxsize=_QUEUE_CHUNKS)
            self._thread = threading.Thread(target=self._produce, name="hupd-gunzip", daemon=True)
            self._thread.start()

    def __enter__(self) -> _Gunzip:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self, size: int = -1) -> bytes:
        if self._pos >= len(self._chunk):
            self._chunk, self._pos = self._next_piece(), 0
        end = len(self._chunk) if size < 0 else self._pos + size
        data = self._chunk[self._pos : end]
        self._pos += len(data)
        return data

    def verify_rest(self) -> None:
        """Read to the end, so truncation or a bad CRC after the last tar member is caught."""
        while self._next_piece():
            pass

    def close(self) -> None:
        """Stop the inflating thread (it may be blocked on a full queue)."""
        if self._queue is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._queue = None

    def _next_piece(self) -> bytes:
        if self._queue is None:
            return self._inflate()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _produce(self) -> None:
        """Thread body: inflate pieces into the queue until the end, an error, or close()."""
        try:
            while not self._stop.is_set():
                piece = self._inflate()
                self._put(piece)
                if not piece:
                    return
        except BaseException as exc:  # handed to the reading thread, which raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _inflate(self) -> bytes:
        """The next piece of output; b"" only at a clean end of the last gzip member."""
        while True:
            inflater = self._inflater
            if inflater.unconsumed_tail:
                data = inflater.unconsumed_tail
            elif inflater.eof:
                data = inflater.unused_data or self._source.read(_READ_CHUNK)
                if not data:
                    return b""
                # a gzip file may hold several members back to back; each is checked
                self._inflater = inflater = zlib.decompressobj(wbits=31)
            else:
                data = self._source.read(_READ_CHUNK)
                if not data:
                    raise EOFError("the compressed data ends before the gzip end-of-stream marker (truncated)")
            out = inflater.decompress(data, _MAX_INFLATE)
            if out:
                return out


@dataclasses.dataclass
class _Member:
    """A regular file or a hard link in the archive, named by the path it extracts to.

    ``stream``: ``""`` for the top-level tar, else the year tarball holding it; ``index``:
    its position there. ``rank``: year tarballs are unpacked after the outer tar, so their
    copy of a path wins over a loose one. ``link``: a hard link's target path, else None and
    ``data`` holds the file's bytes (read inside the archive iterator, so that a read error
    is reported as an unreadable archive).
    """

    key: str
    stream: str
    index: int
    rank: int
    link: str | None
    data: bytes = b""


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    return handle.read() if handle is not None else b""


_YEAR_TARBALL = re.compile(r"data/([^/]+)\.tar\.gz")  # what upstream unpacks for ``all``: data/<year>.tar.gz


def _iter_tar_gz(source: BinaryIO, wanted: Mapping[str, Any] | set[str], *, stream: str = "", prefix: str = "",
                 rank: int = 0, done: Callable[[], bool] | None = None) -> Iterator[_Member]:
    """The members of a ``.tar.gz`` stream whose path is ``wanted``, and every hard link.

    ``prefix`` is the folder the tarball unpacks into. Other members (directories, junk,
    unselected applications) are skipped unparsed. Stops early once ``done()``.
    """
    with _Gunzip(source) as gunzip, tarfile.open(fileobj=gunzip, mode="r|") as tar:
        for index, info in enumerate(tar):
            if info.isreg() or info.islnk():
                key = _normalise(prefix + info.name)
                if key is None:
                    pass
                elif info.islnk():  # "": a target outside the archive, which never exists
                    yield _Member(key, stream, index, rank, _normalise(prefix + info.linkname) or "")
                elif key in wanted:
                    yield _Member(key, stream, index, rank, None, _read(tar, info))
            if done is not None and done():
                return
        gunzip.verify_rest()


def _iter_outer_tar(path: Path, wanted: Mapping[str, Any] | set[str], years: set[str], *, stream: str | None = None,
                    done: Callable[[], bool] | None = None) -> Iterator[_Member]:
    """The ``all`` layout: an uncompressed tar of ``data/<year>.tar.gz`` (and maybe loose JSON).

    Opened in random-access mode, so the headers are read first (seeking over the data) and
    year tarballs no selected filing year needs are skipped, not read. ``stream`` limits the
    pass to one year tarball, or to the loose members (``""``).
    """
    size = path.stat().st_size
    with tarfile.open(path, mode="r:") as outer:
        infos = outer.getmembers()
        # tarfile ends quietly when the file stops at a header boundary; a complete tar
        # ends with two zero blocks, so less than that left means a cut-off file
        if size - outer.offset < 2 * tarfile.BLOCKSIZE:
            raise EOFError("the tar ends without its end-of-archive marker (truncated)")
        # a year tarball stored twice: extraction leaves the last copy, so only that one is read
        last = {_normalise(i.name): i for i in infos if i.isreg()}
        for index, info in enumerate(infos):
            if info.isreg() and info.offset_data + info.size > size:
                raise EOFError(f"member {info.name} runs past the end of the file (truncated)")
            name = _normalise(info.name)
            if name is None or not (info.isreg() or info.islnk()):
                continue
            year = _YEAR_TARBALL.fullmatch(name) if info.isreg() else None
            if year is not None:
                if stream not in (None, name):
                    continue
                if last[name] is not info or year.group(1) not in years:
                    logger.debug("Skipping %s: %s", name, "a later copy follows" if last[name] is not info
                                 else f"no selected application was filed in {year.group(1)}")
                    continue
                logger.debug("Reading %s", name)
                try:
                    yield from _iter_tar_gz(outer.extractfile(info), wanted, stream=name, prefix="data/", rank=1,
                                            done=done)
                except (tarfile.TarError, EOFError, zlib.error) as exc:
                    raise tarfile.ReadError(f"member {name}: {type(exc).__name__}: {exc}") from exc
            elif stream in (None, "") and info.islnk():
                yield _Member(name, "", index, 0, _normalise(info.linkname) or "")
            elif stream in (None, "") and name in wanted:
                yield _Member(name, "", index, 0, None, _read(outer, info))
            if done is not None and done():
                return


def _iter_archive(path: Path, wanted: Mapping[str, Any] | set[str], years: set[str], *, stream: str | None = None,
                  done: Callable[[], bool] | None = None) -> Iterator[_Member]:
    """The ``wanted`` members (and all hard links) of a HUPD archive of either layout, in archive order.

    The layout is told by content, not by name: a gzip file is a ``.tar.gz`` of JSON (the
    sample), anything else must be an uncompressed tar (all years). Read errors become
    :class:`HupdFileError` naming the file.
    """
    try:
        with open(path, "rb") as raw:
            if raw.read(2) == _GZIP_MAGIC:
                raw.seek(0)
                yield from _iter_tar_gz(raw, wanted, done=done)
                return
        yield from _iter_outer_tar(path, wanted, years, stream=stream, done=done)
    except HupdFileError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # OSError: the file itself (EIO, ...)
        raise _corrupt(path, "archive", f"{type(exc).__name__}: {exc}") from exc


_Link = tuple[str, int, str]  # (stream, index, target) of a hard link member


def _resolve_links(archive: Path, wanted: Iterable[_Link], links: Iterable[tuple[str, int, str, str]],
                   years: set[str]) -> dict[_Link, bytes | None]:
    """The content of each wanted hard link: its target's copy at that point of the archive.

    Extraction links to the target as already unpacked, i.e. its last copy before the link.
    The first pass skipped that copy unread (the target may be any member), so each tar
    stream holding such a link is read again, keeping only the targets' bytes; hard links
    are rare, so this pass almost never runs. ``links``: every hard link seen, as
    ``(stream, index, path, target)``, to follow a link to a link. A target never stored
    before the link in the same tar maps to None (skipped as missing). Not modelled: a link
    from a year tarball to a file unpacked from elsewhere, and a later rewrite of a path a
    link shares (extraction would change both names' common file).
    """
    by_stream: dict[str, dict[int, str]] = {}
    for stream, index, target in wanted:
        by_stream.setdefault(stream, {})[index] = target
    chains: dict[tuple[str, str], set[str]] = {}
    for stream, _, key, target in links:
        chains.setdefault((stream, key), set()).add(target)
    result: dict[_Link, bytes | None] = {}
    for stream, at in by_stream.items():
        needed, frontier = set(at.values()), list(at.values())
        while frontier:  # a target may itself be a link
            for target in chains.get((stream, frontier.pop()), ()):
                if target not in needed:
                    needed.add(target)
                    frontier.append(target)
        content: dict[str, bytes | None] = {}
        for member in _iter_archive(archive, needed, years, stream=stream):
            if member.stream != stream:
                continue
            if member.index in at:
                result[(stream, member.index, at[member.index])] = content.get(at[member.index])
            if member.key in needed:
                content[member.key] = content.get(member.link) if member.link is not None else member.data
    return result


def _parse_record(data: bytes) -> dict[str, Any] | None:
    """The JSON object in ``data``, or None if it is not valid JSON for one object."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) else None


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _text(value: Any) -> str:
    """A field as a string: null -> "", other non-strings -> str(); always valid Unicode.

    JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); Python decodes it, but it has no
    UTF-8 form, so Arrow would fail on it. Such characters become U+FFFD.
    """
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if text.isascii():  # O(1) in CPython, and the common case
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE_RE.sub("\ufffd", text)
    return text


def _labels(value: Any) -> list[str]:
    """A label list as strings (a lone label becomes a one-item list; nulls are dropped)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value if v is not None]
    return [_text(value)]


def record_to_example(application_number: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """One output example from a HUPD JSON record, with the official field names.

    ``patent_number`` gets the application number, as the official loader does. Any JSON
    value is accepted: nulls become ``""``, other non-strings their ``str()``.
    """
    example = {"patent_number": application_number}
    for field, key in _JSON_KEYS.items():
        example[field] = _text(record.get(key))
    example["application_number"] = application_number
    example["ipcr_labels"] = _labels(record.get("ipcr_labels"))
    example["cpc_labels"] = _labels(record.get("cpc_labels"))
    return {name: example[name] for name in FEATURES}


def _example(number: str, data: bytes) -> dict[str, Any] | None:
    """The example for a member's bytes, or None when they are not one usable JSON object."""
    record = _parse_record(data)
    try:
        return None if record is None else record_to_example(number, record)
    except RecursionError:  # str() of a nesting just under json's own limit
        return None


@dataclasses.dataclass
class _SkipReport:
    """Everything a load left out or repeated, reported in one warning at the end (and kept in the cache).

    Per selected application (a path): ``missing`` (no JSON member), ``undated`` (no valid
    filing date in the metadata, so no path to look for), ``malformed`` (the member is not a
    JSON object). Besides: ``duplicate_rows`` (repeated metadata rows, yielded again as
    upstream does), ``duplicate_members`` (repeated archive paths; the ``copy`` one is used)
    and ``undated_rows`` (metadata rows a date-bounded selection could not place).
    """

    archive: Path
    n_selected: int
    copy: str = "last"
    missing: list[str] = dataclasses.field(default_factory=list)
    undated: list[str] = dataclasses.field(default_factory=list)
    malformed: list[str] = dataclasses.field(default_factory=list)
    duplicate_rows: list[str] = dataclasses.field(default_factory=list)
    duplicate_members: list[str] = dataclasses.field(default_factory=list)
    undated_rows: int = 0

    @classmethod
    def for_plan(cls, archive: Path, plan: _Plan, copy: str = "last") -> _SkipReport:
        return cls(archive, plan.n_selected, copy, undated=list(plan.undated),
                   duplicate_rows=list(plan.duplicate_rows), undated_rows=plan.undated_rows)

    def counts(self) -> dict[str, int]:
        return {"selected": self.n_selected, "missing": len(self.missing), "undated": len(self.undated),
                "malformed": len(self.malformed), "duplicate_rows": len(self.duplicate_rows),
                "duplicate_members": len(self.duplicate_members), "undated_rows": self.undated_rows}

    def message(self) -> str | None:
        """The warning text, or None when nothing was left out or repeated."""
        parts = []
        skipped = len(self.missing) + len(self.undated) + len(self.malformed)
        if skipped:
            reasons = [f"{what} {_listing(numbers)}" for what, numbers in (
                (f"no JSON record in {self.archive} for", self.missing),
                ("no valid filing date in the metadata (so no JSON path) for", self.undated),
                ("unreadable JSON for", self.malformed)) if numbers]
            parts.append(f"{skipped} of {self.n_selected} selected applications skipped: {'; '.join(reasons)}")
        if self.duplicate_rows:
            parts.append(f"{len(self.duplicate_rows)} repeated metadata rows yielded again, as the official loader "
                         f"does: {_listing(self.duplicate_rows)}")
        if self.duplicate_members:
            parts.append(f"{len(self.duplicate_members)} repeated archive members (used the {self.copy} copy of "
                         f"each path): {_listing(self.duplicate_members)}")
        if self.undated_rows:
            parts.append(f"{self.undated_rows} metadata rows have no valid filing date, so no date range selects them")
        return ". ".join(parts) or None

    def log(self) -> None:
        message = self.message()
        if message:
            logger.warning("HUPD: %s", message)


def _listing(numbers: list[str]) -> str:
    """``"2 (14999901, 14999902)"``: a count and the first few application numbers."""
    numbers = sorted(numbers)
    more = ", ..." if len(numbers) > _LISTED_MISSING else ""
    return f"{len(numbers)} ({', '.join(numbers[:_LISTED_MISSING])}{more})"


# ---------------------------------------------------------------------------------------
# Building the cache: one pass in archive order, then each split in upstream's order
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Progress:
    """Rows (and their bytes) written so far, and rows to write in all: the full-disk estimate."""

    written: int = 0
    nbytes: int = 0
    total: int = 0


@dataclasses.dataclass
class _Copy:
    """The copy of a path that counts so far: a row of the records file, or unreadable (row None).

    ``link``: a hard link whose content is read after the pass (:func:`_resolve_links`).
    """

    rank: int
    row: int | None = None
    link: _Link | None = None


class _Records:
    """The scratch Arrow file of every record found, in archive order (a copy per archive member).

    An Arrow IPC *file* with one row per record batch, so that the splits can be written in
    any order by reading rows back one at a time with ``pread`` (``get_batch``): memory stays
    flat. (A memory map would not: a shuffled read maps in more and more of the file.)
    """

    def __init__(self, path: Path, progress: _Progress):
        self._file = pa.OSFile(str(path), "wb")
        self._sink = pa.BufferedOutputStream(self._file, 1 << 20)  # a row is many small writes
        self._writer = pa.ipc.new_file(self._sink, FEATURES.arrow_schema)
        self._pending: list[dict[str, Any]] = []
        self.rows = 0
        self.progress = progress

    def add(self, number: str, data: bytes) -> int | None:
        """Append the record for ``data``; its row, or None when it is not one JSON object."""
        example = _example(number, data)
        if example is None:
            return None
        self._pending.append(example)
        if len(self._pending) >= _WRITER_BATCH_SIZE:
            self._flush()
        self.rows += 1
        self.progress.written += 1
        self.progress.nbytes += len(data)  # about its size in Arrow: the text is most of both
        return self.rows - 1

    def _flush(self) -> None:
        if not self._pending:
            return  # an empty table could still write a 0-row batch, and rows are batch numbers
        table = pa.Table.from_pylist(self._pending, schema=FEATURES.arrow_schema)  # converted in bulk: faster
        self._pending = []
        self._writer.write_table(table, max_chunksize=1)

    def close(self, *, complete: bool) -> None:
        try:
            if complete:
                self._flush()
                self._writer.close()
                self._sink.close()  # flushes the buffer: a full disk shows here
        finally:
            self._file.close()


def _collect(archive: Path, plan: _Plan, records: _Records, report: _SkipReport) -> dict[str, _Copy]:
    """Read the archive once: the copy that counts for each selected path found.

    As on disk after extraction, the last copy of a path counts (inside a year tarball over
    a loose one, since year tarballs unpack last), so the whole archive is read. Every
    later copy is counted in ``report.duplicate_members``.
    """
    found: dict[str, _Copy] = {}
    links: list[tuple[str, int, str, str]] = []
    for member in _iter_archive(archive, plan.numbers, plan.years):
        if member.link is not None:
            links.append((member.stream, member.index, member.key, member.link))
        if member.key not in plan.numbers:
            continue
        current = found.get(member.key)
        if current is not None:
            report.duplicate_members.append(plan.numbers[member.key])
            if current.rank > member.rank:
                continue
        if member.link is not None:
            found[member.key] = _Copy(member.rank, link=(member.stream, member.index, member.link))
        else:
            found[member.key] = _Copy(member.rank, row=records.add(plan.numbers[member.key], member.data))
    pending = {key: copy for key, copy in found.items() if copy.link is not None}
    if pending:
        contents = _resolve_links(archive, [copy.link for copy in pending.values()], links, plan.years)
        for key, copy in pending.items():
            data = contents.get(copy.link)
            if data is None:  # a link to a path never stored before it: nothing is extracted
                del found[key]
            else:
                copy.row, copy.link = records.add(plan.numbers[key], data), None
    report.missing = [number for key, number in plan.numbers.items() if key not in found]
    report.malformed = [plan.numbers[key] for key, copy in found.items() if copy.row is None]
    return found


def _write_splits(out_dir: Path, archive: Path, plan: _Plan, report: _SkipReport, progress: _Progress) -> dict[str, int]:
    """Write ``<split>.arrow`` for each split, rows in upstream's order; return the example counts."""
    records_path = out_dir / _RECORDS_FILE
    progress.total = plan.n_selected + sum(key is not None for keys in plan.rows.values() for key in keys)
    records, complete = _Records(records_path, progress), False
    try:
        found = _collect(archive, plan, records, report)
        complete = True
    finally:
        records.close(complete=complete)
    counts = {}
    for split in _SPLITS:
        copies = (found.get(key) for key in plan.rows.get(split, ()) if key is not None)
        rows = [copy.row for copy in copies if copy is not None and copy.row is not None]
        counts[split] = _write_rows(records_path, rows, out_dir / f"{split}.arrow", progress)
    records_path.unlink()
    return counts


def _write_rows(source: Path, rows: list[int], path: Path, progress: _Progress) -> int:
    """Copy rows ``rows`` of the records file ``source`` into a new Arrow file, in that order.

    The result is a plain Arrow file in ``_WRITER_BATCH_SIZE``-row batches, what
    ``Dataset.select(rows).flatten_indices()`` would write, without its per-row overhead.
    """
    # a native file: given a path, ArrowWriter writes through a Python file object, slower
    with pa.OSFile(str(path), "wb") as sink, pa.OSFile(str(source)) as handle:
        writer = ArrowWriter(features=FEATURES, stream=sink, writer_batch_size=_WRITER_BATCH_SIZE)
        try:
            reader = pa.ipc.open_file(handle)
            for first in range(0, len(rows), _WRITER_BATCH_SIZE):
                chunk = rows[first : first + _WRITER_BATCH_SIZE]
                table = pa.Table.from_batches([reader.get_batch(row) for row in chunk], schema=reader.schema)
                writer.write_table(table)  # one batch again
                progress.written += len(chunk)
                progress.nbytes += table.nbytes
            return writer.finalize()[0]
        finally:
            writer.close()


def _file_identity(path: Path) -> list[Any]:
    """What makes an input file "the same": resolved path, size and modification time."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_key(name: str, selection: Mapping[str, Any], metadata_file: Path, archive_file: Path) -> str:
    payload = {
        "version": CACHE_VERSION,
        "name": name,
        "selection": dict(selection),
        "metadata": _file_identity(metadata_file),
        "archive": _file_identity(archive_file),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _is_complete_cache(target: Path) -> bool:
    """A cache dir is complete when its info file lists split files that all exist."""
    try:
        info = json.loads((target / _INFO_FILE).read_text())
        return all((target / f"{split}.arrow").is_file() for split in info["num_examples"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build_cache(target: Path, archive: Path, plan: _Plan) -> None:
    """Build the splits in a scratch dir next to ``target``, then rename it into place.

    The rename is atomic, so a crash or an error leaves either no cache or a complete one,
    and never touches other caches. A failed write (full disk, no permission) removes the
    scratch and raises :class:`HupdCacheError`, saying where and how much room is needed.
    The scratch is named after this process (``.<entry>.<host>-<pid>.<random>.incomplete``)
    so that a later build can remove one left by a killed process. The skip report is
    logged and kept in the info file, so that a later load from the cache can repeat it.
    """
    progress, scratch = _Progress(), None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(target.parent)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_host_id()}-{os.getpid()}.", suffix=".incomplete",
                                        dir=target.parent))
        report = _SkipReport.for_plan(archive, plan)
        counts = _write_splits(scratch, archive, plan, report, progress)
        report.log()
        info = {"num_examples": counts, "archive": str(archive), "skipped": report.counts(),
                "skip_message": report.message()}
        (scratch / _INFO_FILE).write_text(json.dumps(info, indent=1))
        if _is_complete_cache(target):  # another process finished the same cache meanwhile: keep its
            shutil.rmtree(scratch)
            return
        if target.exists():  # a stale, incomplete cache dir (e.g. a file deleted by hand)
            shutil.rmtree(target)
        os.rename(scratch, target)
    except BaseException as exc:
        # only our writes raise a plain OSError here: archive read errors are HupdFileError
        error = (_cache_error(exc, target, progress)
                 if isinstance(exc, OSError) and not isinstance(exc, (HupdFileError, HupdCacheError)) else None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if _is_complete_cache(target):  # the rename lost a race against another process
            return
        if error is not None:
            raise error from exc
        raise


def _cache_error(exc: OSError, target: Path, progress: _Progress) -> HupdCacheError:
    """The error for a failed cache write: where, why, and for a full disk about how much room is needed."""
    where = target.parent
    text = str(exc)
    full = exc.errno in _NO_SPACE or any(os.strerror(code) in text for code in _NO_SPACE)  # pyarrow sets no errno
    advice = ("free some space there, or point cache_dir= (--hupd_cache_dir) at a disk with more room. The partial "
              "build was removed; earlier caches are untouched.")
    if not full:
        return HupdCacheError(f"Could not write the HUPD cache {target} ({type(exc).__name__}: {exc}). Check that "
                              f"{where} is writable and has room, or point cache_dir= (--hupd_cache_dir) elsewhere. "
                              "The partial build was removed; earlier caches are untouched.")
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free now"
    except OSError:
        free = "free space unknown"
    if progress.written and progress.total:
        # the records file holds each selected record once, each split file its rows again
        need = f"about {_size(progress.nbytes / progress.written * progress.total)} ({free})"
    else:
        need = f"more than is free ({free})"
    error = HupdCacheError(f"The disk is full: could not write the HUPD cache {target} ({exc}). Building it "
                           f"needs {need} in {where}: the selected records are written once in archive order, then "
                           f"again per split in the official order. To fix: {advice}")
    error.errno = errno.ENOSPC
    return error


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


_SCRATCH_RE = re.compile(r"\.(?P<entry>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.incomplete")


def _host_id() -> str:
    """A short, file-name-safe id of this machine (a cache dir may be shared over the network)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_scratch(root: Path) -> None:
    """Remove scratch dirs of builds killed on this machine: their process is gone, so no one finishes them.

    Scratch of live processes, of other machines and of older versions (no pid in the name)
    is left alone.
    """
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _SCRATCH_RE.fullmatch(entry.name)
        if match and match["host"] == _host_id() and not _pid_alive(int(match["pid"])):
            logger.info("Removing %s, left by an interrupted HUPD cache build (process %s is gone)",
                        entry, match["pid"])
            shutil.rmtree(entry, ignore_errors=True)


def _log_cached_skips(target: Path) -> None:
    """Repeat the skip warning stored when the cache was built (the archive is not read again)."""
    try:
        message = json.loads((target / _INFO_FILE).read_text()).get("skip_message")
    except (OSError, ValueError, AttributeError):
        return
    if message:
        logger.warning("HUPD (cached in %s): %s", target, message)


def _dataset_info() -> datasets.DatasetInfo:
    return datasets.DatasetInfo(description=_DESCRIPTION, features=FEATURES,
                                homepage="https://github.com/suzgunmirac/hupd")


def _open_cache(target: Path) -> datasets.DatasetDict:
    result = datasets.DatasetDict()
    for split in _SPLITS:
        result[split] = datasets.Dataset.from_file(str(target / f"{split}.arrow"), info=_dataset_info(),
                                                   split=datasets.NamedSplit(split))
        logger.info("HUPD %s split: %d examples", split, result[split].num_rows)
    return result


# ---------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------


def _generate_split(archive: str, plan: _Plan, split: str) -> Iterator[dict[str, Any]]:
    """Examples of one split, read lazily: one pass, one skip warning, per iteration.

    Reordering would mean holding records back, so they come in archive order, each once per
    metadata row naming it; a path stored twice gives its first copy, and the pass stops
    once every path is found. Hard links are read after the pass, so they come last.
    """
    path = Path(archive)
    report = _SkipReport.for_plan(path, plan, copy="first")
    times = Counter(key for key in plan.rows[split] if key is not None)
    pending = set(times)
    links: list[tuple[str, int, str, str]] = []
    deferred: list[tuple[str, _Link]] = []
    for member in _iter_archive(path, times, plan.years, done=lambda: not pending):
        if member.link is not None:
            links.append((member.stream, member.index, member.key, member.link))
        if member.key not in times:
            continue
        if member.key not in pending:
            report.duplicate_members.append(plan.numbers[member.key])
            continue
        pending.discard(member.key)
        if member.link is not None:
            deferred.append((member.key, (member.stream, member.index, member.link)))
            continue
        yield from _repeat(plan.numbers[member.key], member.data, times[member.key], report)
    if deferred:
        contents = _resolve_links(path, [link for _, link in deferred], links, plan.years)
        for key, link in deferred:
            if contents.get(link) is None:
                pending.add(key)
            else:
                yield from _repeat(plan.numbers[key], contents[link], times[key], report)
    report.missing = [plan.numbers[key] for key in pending]
    report.log()


def _repeat(number: str, data: bytes, times: int, report: _SkipReport) -> Iterator[dict[str, Any]]:
    example = _example(number, data)
    if example is None:
        report.malformed.append(number)
        return
    for _ in range(times):
        yield example


def _load_streaming(name: str, metadata_file: Path, archive_file: Path,
                    selection: Mapping[str, Any]) -> datasets.IterableDatasetDict:
    """Select eagerly (so bad arguments fail now), read the archive lazily per split.

    What the metadata alone shows (rows no date range can select) is reported now, once;
    what the archive shows is reported by each split at the end of each pass over it.
    """
    splits, undated = _select(metadata_file, selection)
    _SkipReport(archive_file, 0, undated_rows=undated).log()
    result = datasets.IterableDatasetDict()
    for split, df in splits.items():
        plan = _plan([(split, df)], JSON_DIRS[name])
        result[split] = datasets.IterableDataset.from_generator(
            _generate_split, features=FEATURES,
            gen_kwargs={"archive": str(archive_file), "plan": plan, "split": split},
            split=datasets.NamedSplit(split),
        )
        logger.info("HUPD %s split: %d selected applications (streaming)", split, plan.n_selected)
    return result
