"""The HUPD Arrow cache: build the splits once (archive order, then upstream's order), reopen them after.

The cache key covers the arguments, the input files' identity and the stored columns; a load
of fewer columns reuses a complete cache of the same selection that holds them all. A build
writes into a scratch folder named after its process and renames it into place, so a cache
is complete or absent; scratch left by a killed build is removed next time.

Before writing, a build measures its first records and refuses (:class:`HupdCacheError`,
nothing written) when the cache's disk lacks the room the whole build needs; a write that
still fails raises :class:`HupdCacheError`, saying where and about how much room is needed.

The archive is read in units (:func:`~hfplug.data.hupd_archive._archive_units`: each needed
year tarball of ``all``; the sample's one ``.tar.gz``), each into a records file of its own,
by ``num_proc`` processes at once; which copy of a path counts is then decided from where
each copy sat in the archive, so the splits are the same bytes whatever ``num_proc`` is.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import gc
import glob
import hashlib
import json
import logging
import logging.handlers
import multiprocessing
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

from hfplug.data.hupd_archive import HupdFileError, _archive_units, _iter_archive, _Link, _resolve_links, _Unit
from hfplug.data.hupd_plan import _Plan, _SkipReport
from hfplug.data.hupd_records import FEATURES, _example, dataset_info, features_for
from hfplug.data.hupd_remote import RemoteArchive

__all__ = ["CACHE_VERSION", "HupdCacheError"]

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name

_SPLITS = ("train", "validation")
# Bump when the cached Arrow content changes for the same inputs. 2: upstream row order,
# repeated metadata rows kept, exact paths, last copy of a repeated member, hard links.
CACHE_VERSION = 2
_INFO_FILE = "hfplug_hupd.json"
_RECORDS_FILE = "records-{}.arrow"  # scratch: every record found in one unit of the archive, in archive order
# Examples per Arrow record batch: real records are ~50 KB, so a batch holds ~10 MB of text.
_WRITER_BATCH_SIZE = 200
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_GONE = -1  # the row of a copy that reads as nothing: a hard link to a path never stored before it


class HupdCacheError(OSError):
    """The HUPD Arrow cache could not be written (full disk, no permission, ...).

    The message names the cache folder and, for a full disk, about how much room the build
    needs there. The scratch folder is removed and any earlier cache is left as it was.
    """

    def __reduce__(self):  # errno survives the trip back from a worker process
        return type(self), self.args, {"errno": self.errno}


@dataclasses.dataclass
class _Progress:
    """Rows (and their bytes) written so far, and rows to write in all: the full-disk estimate."""

    written: int = 0
    nbytes: int = 0
    total: int = 0


@dataclasses.dataclass
class _SpaceCheck:
    """The room a build needs, measured on its first records, against the room the cache's disk had.

    ``free``: bytes free when the build started. ``scratch_rows``: records the scratch files
    hold (each selected application once); ``split_rows``: rows of the split files. Both
    exist at the end of a build, before the scratch is deleted: that is the peak.
    """

    target: Path
    free: int
    scratch_rows: int
    split_rows: int
    need: int | None = None  # bytes, once measured
    final: int | None = None  # of which the splits, which stay

    def __call__(self, table: pa.Table) -> None:
        """Measure ``table`` (the first records, not written yet); raise if the whole build cannot fit."""
        if self.need is not None:  # measured already, in this process
            return
        rows = max(table.num_rows, 1)
        per_scratch = (_ipc_size(table, 1) - _ipc_size(table.slice(0, 0), 1)) / rows
        per_split = (_ipc_size(table, _WRITER_BATCH_SIZE) - _ipc_size(table.slice(0, 0), 1)) / rows
        self.final = int(per_split * self.split_rows)
        self.need = int(per_scratch * self.scratch_rows) + self.final
        where = self.target.parent
        logger.info(
            "HUPD: the cache needs about %s in %s (%s for the splits, the rest scratch while building); %s free",
            _size(self.need),
            where,
            _size(self.final),
            _size(self.free),
        )
        if self.need > self.free:
            error = HupdCacheError(
                f"Not enough disk for the HUPD cache {self.target}: building it needs about {_size(self.need)} "
                f"({self.need} bytes) in {where} ({_size(self.final)} for the splits, which stay, and "
                f"{_size(self.need - self.final)} for a scratch copy of the records, deleted at the end), but "
                f"{_size(self.free)} ({self.free} bytes) is free. Nothing was written. To fix: free some space "
                "there, point hupd_cache_dir= (--hupd_cache_dir) at a disk with more room, or keep fewer fields "
                "(load_hupd(columns=...); the recipe keeps only its task's --text_fields and label)."
            )
            error.errno = errno.ENOSPC
            raise error


def _ipc_size(table: pa.Table, chunk: int) -> int:
    """Bytes ``table`` takes as an Arrow IPC file in batches of ``chunk`` rows (counted, not stored)."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)
    return sink.size()


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclasses.dataclass
class _Copy:
    """The copy of a path that counts so far: a row of the records file, or unreadable (row None).

    ``position``: where it sat in the archive (a later copy wins). ``link``: a hard link whose
    content is read after the pass (:func:`_resolve_links`).
    """

    position: tuple[int, int, int]
    row: int | None = None
    link: _Link | None = None


class _Records:
    """A scratch Arrow file of every record found in one unit of the archive, in archive order.

    An Arrow IPC *file* with one row per record batch, so that the splits can be written in
    any order by reading rows back one at a time with ``pread`` (``get_batch``): memory stays
    flat. (A memory map would not: a shuffled read maps in more and more of the file.) The file
    is opened at the first write, after ``check`` (the disk-space check) has seen the first batch.
    """

    def __init__(self, path: Path, progress: _Progress, columns=None, check: _SpaceCheck | None = None):
        self._path = path
        self._schema = features_for(columns).arrow_schema
        self._columns = columns
        self._check = check
        self._file = self._sink = self._writer = None
        self._pending: list[dict[str, Any]] = []
        self.rows = 0
        self.progress = progress

    def add(self, number: str, data: bytes) -> int | None:
        """Append the record for ``data``; its row, or None when it is not one JSON object."""
        example = _example(number, data, self._columns)
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
        table = pa.Table.from_pylist(self._pending, schema=self._schema)  # converted in bulk: faster
        self._pending = []
        if self._check is not None:
            check, self._check = self._check, None
            check(table)
        self._open()
        self._writer.write_table(table, max_chunksize=1)

    def _open(self) -> None:
        if self._writer is None:
            self._file = pa.OSFile(str(self._path), "wb")
            self._sink = pa.BufferedOutputStream(self._file, 1 << 20)  # a row is many small writes
            self._writer = pa.ipc.new_file(self._sink, self._schema)

    def close(self, *, complete: bool) -> None:
        try:
            if complete:
                self._flush()
                self._open()  # no record at all: still a valid (empty) file
                self._writer.close()
                self._sink.close()  # flushes the buffer: a full disk shows here
        finally:
            if self._file is not None:
                self._file.close()


@dataclasses.dataclass
class _Job:
    """One unit of the archive to read into ``records`` (picklable: it may go to another process).

    ``numbers``: archive path -> application number of the selected records the unit may
    hold. ``prefix``: given when ``numbers`` holds only the paths under it (a year tarball's
    ``data/<year>/``); members outside it are then *foreign*: listed, not read as records.
    """

    archive: Path | RemoteArchive
    unit: _Unit
    numbers: Mapping[str, str]
    years: Mapping[str, str]
    records: Path
    target: Path
    columns: tuple[str, ...] | None = None
    check: _SpaceCheck | None = None
    prefix: str | None = None


@dataclasses.dataclass
class _UnitResult:
    """What a unit holds. ``copies``: path -> (position, row) of the copy that counts in this unit
    (row None: unreadable; ``_GONE``: a link to nothing). ``repeats``: path -> copies before that one
    (only paths stored more than once). ``foreign``: paths outside the job's prefix. ``fetched``:
    bytes fetched from the Hub for it."""

    copies: dict[str, tuple[tuple[int, int, int], int | None]]
    repeats: Counter
    foreign: list[str]
    fetched: int = 0
    pid: int = 0  # the process that read it


class _Wanted:
    """``in``: a selected path of the job, or (with a prefix) any path outside it, to be listed as foreign."""

    def __init__(self, numbers: Mapping[str, str], prefix: str | None):
        self.numbers, self.prefix = numbers, prefix

    def __contains__(self, key: str) -> bool:
        return key in self.numbers or (self.prefix is not None and not key.startswith(self.prefix))


def _read_unit(job: _Job, progress: _Progress | None = None) -> _UnitResult:
    """Read one unit of the archive: each selected path's copy that counts there, written to ``job.records``.

    Of a path stored twice in the unit the last copy counts, as extraction leaves it; hard links
    are read after the pass (:func:`_resolve_links`). A failed write raises :class:`HupdCacheError`.
    """
    progress = progress if progress is not None else _Progress()
    archive, unit, numbers = job.archive, job.unit, job.numbers
    fetched = archive.fetched if isinstance(archive, RemoteArchive) else 0
    records, complete = _Records(job.records, progress, job.columns, job.check), False
    found: dict[str, _Copy] = {}
    repeats: Counter = Counter()
    foreign: list[str] = []
    links: list[tuple[str, int, str, str]] = []
    try:
        try:
            members = _iter_archive(
                archive, _Wanted(numbers, job.prefix), job.years, stream=unit.stream, members=unit.members
            )
            for member in members:
                if member.link is not None:
                    links.append((member.stream, member.index, member.key, member.link))
                if member.key not in numbers:
                    if job.prefix is not None and not member.key.startswith(job.prefix):
                        foreign.append(member.key)
                    continue
                if member.key in found:
                    repeats[member.key] += 1
                position = (member.rank, unit.order, member.index)
                if member.link is not None:
                    found[member.key] = _Copy(position, link=(member.stream, member.index, member.link))
                else:
                    found[member.key] = _Copy(position, row=records.add(numbers[member.key], member.data))
            pending = {key: copy for key, copy in found.items() if copy.link is not None}
            if pending:
                links_read = [copy.link for copy in pending.values()]
                contents = _resolve_links(archive, links_read, links, job.years, unit.members)
                for key, copy in pending.items():
                    data = contents.get(copy.link)  # None: a link to a path never stored before it
                    copy.row, copy.link = (_GONE if data is None else records.add(numbers[key], data)), None
            complete = True
        finally:
            records.close(complete=complete)
    except OSError as exc:
        if isinstance(exc, (HupdFileError, HupdCacheError)):
            raise
        raise _cache_error(exc, job.target, progress, job.check) from exc
    if isinstance(archive, RemoteArchive):
        fetched = archive.fetched - fetched
    copies = {key: (copy.position, copy.row) for key, copy in found.items()}
    return _UnitResult(copies, repeats, foreign, fetched, os.getpid())


def _read_units(jobs: list[_Job], num_proc: int, progress: _Progress) -> list[_UnitResult]:
    """Each job's result, read here one after the other, or by ``num_proc`` fresh processes at once.

    Processes start by the platform's default method, as ``datasets``' ``num_proc`` does: fork on
    Linux (nothing to import again: they start at once); spawn on macOS and Windows (and
    forkserver from Python 3.14), where a script that builds with ``num_proc > 1`` needs the
    usual ``if __name__ == "__main__":`` guard. Their log records are handled here, by this
    process's logging. On an error or an interrupt the other processes are stopped.
    """
    workers = min(num_proc, len(jobs))
    if workers <= 1:
        return [_read_unit(job, progress) for job in jobs]
    logger.info("HUPD: reading %s in %d processes", ", ".join(_unit_name(job.unit) for job in jobs), workers)
    context = multiprocessing.get_context()
    records = context.Queue()
    listener = logging.handlers.QueueListener(records, _Relay())
    listener.start()
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(records, logger.getEffectiveLevel())
    )
    try:
        gc.freeze()  # forked processes share this one's memory until written to: keep the collector off it
        try:
            futures = [pool.submit(_read_unit, job) for job in jobs]  # (the processes start at the first)
        finally:
            gc.unfreeze()
        return [future.result() for future in futures]
    except concurrent.futures.process.BrokenProcessPool as exc:
        exc.add_note(
            "A process reading the HUPD archive died. If the script that called load_hupd has no "
            "`if __name__ == '__main__':` guard, add one (the processes start fresh and import it); if the "
            "machine ran out of memory, use fewer processes (num_proc, --preprocessing_num_workers)."
        )
        raise
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()  # no public way before Python 3.14 (terminate_workers)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        listener.stop()


def _unit_name(unit: _Unit) -> str:
    return {None: "the archive", "": "the tar's loose members"}.get(unit.stream, unit.stream)


class _Relay(logging.Handler):
    """Hands a worker process's log record to this process's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _start_worker(records, level: int) -> None:
    """In a worker process: send the loader's log records to ``records`` (a queue the parent reads),
    and end when the parent does (a killed build leaves no process behind writing its scratch)."""
    logger.handlers[:] = [logging.handlers.QueueHandler(records)]
    logger.setLevel(level)
    logger.propagate = False
    threading.Thread(target=_exit_with, args=(os.getppid(),), name="hupd-parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _jobs(
    archive: Path | RemoteArchive,
    units: list[_Unit],
    plan: _Plan,
    scratch: Path,
    *,
    target: Path,
    columns: tuple[str, ...] | None,
    check: _SpaceCheck | None,
    num_proc: int,
) -> list[_Job]:
    """A job per unit. With several processes, a year tarball's job gets only the selected paths of its
    year (``data/<year>/``, where the Hub's year tarballs unpack), so that each process holds a part of
    the plan; a member elsewhere is listed, and its unit read again with the whole plan if it is selected."""
    by_folder: dict[str, dict[str, str]] = {}
    if num_proc > 1 and len(units) > 1:
        for key, number in plan.numbers.items():
            by_folder.setdefault(key.rpartition("/")[0] + "/", {})[key] = number
    jobs = []
    for i, unit in enumerate(units):
        prefix = f"data/{unit.year}/" if by_folder and unit.year is not None else None
        jobs.append(
            _Job(
                archive,
                unit,
                by_folder.get(prefix, {}) if prefix is not None else plan.numbers,
                plan.years,
                scratch / _RECORDS_FILE.format(i),
                target,
                columns,
                # one process: the check runs at the first write; several: in each that starts at once
                check if num_proc <= 1 or i < num_proc else None,
                prefix,
            )
        )
    return jobs


def _write_splits(
    out_dir: Path,
    archive: Path | RemoteArchive,
    plan: _Plan,
    report: _SkipReport,
    progress: _Progress,
    *,
    target: Path,
    columns: tuple[str, ...] | None = None,
    num_proc: int = 1,
    check: _SpaceCheck | None = None,
) -> dict[str, int]:
    """Write ``<split>.arrow`` for each split, rows in upstream's order; return the example counts.

    As on disk after extraction, the last copy of a path counts (inside a year tarball over a
    loose one, since year tarballs unpack last), so the whole archive is read. Every later copy
    is counted in ``report.duplicate_members``.
    """
    progress.total = plan.n_selected + sum(key is not None for keys in plan.rows.values() for key in keys)
    units = _archive_units(archive, plan.numbers, plan.years)
    jobs = _jobs(archive, units, plan, out_dir, target=target, columns=columns, check=check, num_proc=num_proc)
    results = _read_units(jobs, num_proc, progress)
    for i, (job, result) in enumerate(zip(jobs, results)):
        if job.prefix is not None and any(key in plan.numbers for key in result.foreign):
            logger.info("HUPD: %s holds selected records outside %s; reading it again", job.unit.stream, job.prefix)
            results[i] = _read_unit(dataclasses.replace(job, numbers=plan.numbers, prefix=None, check=None), progress)
    if isinstance(archive, RemoteArchive):  # this process's count, and the other processes'
        fetched = archive.fetched + sum(result.fetched for result in results if result.pid != os.getpid())
        logger.info("HUPD: fetched %.1f MB of the %.1f MB archive %s", fetched / 1e6, archive.size / 1e6, archive)

    # the copy that counts: the last in the archive (year tarballs, rank 1, unpack after loose members)
    winners: dict[str, tuple[tuple[int, int, int], int, int | None]] = {}
    for i, result in enumerate(results):
        for key, repeats in result.repeats.items():
            report.duplicate_members += [plan.numbers[key]] * repeats
        for key, (position, row) in result.copies.items():
            if key in winners:  # a copy in another unit too
                report.duplicate_members.append(plan.numbers[key])
            if key not in winners or position > winners[key][0]:
                winners[key] = (position, i, row)
    report.missing = [number for key, number in plan.numbers.items() if winners.get(key, (0, 0, _GONE))[2] == _GONE]
    report.malformed = [plan.numbers[key] for key, (_, _, row) in winners.items() if row is None]

    sources = [job.records for job in jobs]
    features = features_for(columns)
    counts = {}
    for split in _SPLITS:
        rows = []
        for key in plan.rows.get(split, ()):
            winner = winners.get(key) if key is not None else None
            if winner is not None and winner[2] is not None and winner[2] != _GONE:
                rows.append((winner[1], winner[2]))
        counts[split] = _write_rows(sources, rows, out_dir / f"{split}.arrow", progress, features)
    for source in sources:
        source.unlink(missing_ok=True)
    return counts


def _write_rows(
    sources: list[Path], rows: list[tuple[int, int]], path: Path, progress: _Progress, features=FEATURES
) -> int:
    """Copy rows ``rows`` (``(records file, row)``) of the records files ``sources`` into a new Arrow file, in order.

    The result is a plain Arrow file in ``_WRITER_BATCH_SIZE``-row batches, what
    ``Dataset.select(rows).flatten_indices()`` would write, without its per-row overhead.
    """
    # a native file: given a path, ArrowWriter writes through a Python file object, slower
    with pa.OSFile(str(path), "wb") as sink, contextlib.ExitStack() as stack:
        readers: dict[int, pa.ipc.RecordBatchFileReader] = {}

        def reader(i: int) -> pa.ipc.RecordBatchFileReader:
            if i not in readers:
                readers[i] = pa.ipc.open_file(stack.enter_context(pa.OSFile(str(sources[i]))))
            return readers[i]

        writer = ArrowWriter(features=features, stream=sink, writer_batch_size=_WRITER_BATCH_SIZE)
        try:
            schema = features.arrow_schema
            for first in range(0, len(rows), _WRITER_BATCH_SIZE):
                chunk = rows[first : first + _WRITER_BATCH_SIZE]
                table = pa.Table.from_batches([reader(i).get_batch(row) for i, row in chunk], schema=schema)
                writer.write_table(table)  # one batch again
                progress.written += len(chunk)
                progress.nbytes += table.nbytes
            return writer.finalize()[0]
        finally:
            writer.close()


def _file_identity(path: Path | RemoteArchive) -> list[Any]:
    """What makes an input file "the same": path, size and modification time; on the Hub, its URL at a commit."""
    if not isinstance(path, Path):
        return [str(path)]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_key(
    hupd_config: str, selection: Mapping[str, Any], metadata_file: Path, archive_file: Path | RemoteArchive
) -> str:
    """The key of a selection: the arguments that choose the rows, and the input files' identity."""
    payload = {
        "version": CACHE_VERSION,
        "name": hupd_config,  # the key's old name: caches built before the rename stay valid
        "selection": dict(selection),
        "metadata": _file_identity(metadata_file),
        "archive": _file_identity(archive_file),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _cache_name(base: str, columns: tuple[str, ...] | None) -> str:
    """The cache folder of a selection (``base``: ``<hupd_config>-<key>``) with ``columns`` stored.

    Every field: ``base`` itself (the name caches had before ``columns``). Fewer: ``base-<hash of
    the columns>``.
    """
    if columns is None:
        return base
    return f"{base}-{hashlib.sha256(json.dumps(list(columns)).encode()).hexdigest()[:8]}"


def _stored(target: Path) -> tuple[str, ...] | None:
    """The columns a complete cache holds (None: every field; caches before ``columns`` hold all)."""
    try:
        columns = json.loads((target / _INFO_FILE).read_text()).get("columns")
    except (OSError, ValueError, AttributeError):
        return None
    return None if columns is None or set(columns) == set(FEATURES) else tuple(columns)


def _find_cache(root: Path, base: str, columns: tuple[str, ...] | None) -> Path | None:
    """A complete cache of the selection ``base`` that holds ``columns``: the exact one, else the smallest
    that holds them all (the rows and their values do not depend on which columns a cache holds)."""
    exact = root / _cache_name(base, columns)
    if _is_complete_cache(exact):
        return exact
    if columns is None:
        return None
    candidates = [root / base, *sorted(root.glob(f"{glob.escape(base)}-*"))]
    holding = []
    for candidate in candidates:
        if _is_complete_cache(candidate):
            stored = _stored(candidate)
            if stored is None or set(columns) <= set(stored):
                holding.append((len(stored or FEATURES), candidate))
    return min(holding, key=lambda pair: pair[0])[1] if holding else None


def _is_complete_cache(target: Path) -> bool:
    """A cache dir is complete when its info file lists split files that all exist."""
    try:
        info = json.loads((target / _INFO_FILE).read_text())
        return all((target / f"{split}.arrow").is_file() for split in info["num_examples"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build_cache(
    target: Path,
    archive: Path | RemoteArchive,
    plan: _Plan,
    *,
    columns: tuple[str, ...] | None = None,
    num_proc: int = 1,
) -> None:
    """Build the splits in a scratch dir next to ``target``, then rename it into place.

    The rename is atomic, so a crash or an error leaves either no cache or a complete one,
    and never touches other caches. Before its first write the build checks that the disk has
    room for all of it (:class:`_SpaceCheck`). A failed write (full disk, no permission)
    removes the scratch and raises :class:`HupdCacheError`, saying where and how much room is
    needed. The scratch is named after this process (``.<entry>.<host>-<pid>.<random>.incomplete``)
    so that a later build can remove one left by a killed process. The skip report is
    logged and kept in the info file, so that a later load from the cache can repeat it.
    """
    progress, scratch, check = _Progress(), None, None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(target.parent)
        split_rows = sum(key is not None for keys in plan.rows.values() for key in keys)
        check = _SpaceCheck(target, _free_bytes(target.parent), len(plan.numbers), split_rows)
        scratch = Path(
            tempfile.mkdtemp(
                prefix=f".{target.name}.{_host_id()}-{os.getpid()}.", suffix=".incomplete", dir=target.parent
            )
        )
        report = _SkipReport.for_plan(archive, plan)
        counts = _write_splits(
            scratch, archive, plan, report, progress, target=target, columns=columns, num_proc=num_proc, check=check
        )
        report.log()
        info = {
            "num_examples": counts,
            "archive": str(archive),
            "columns": list(features_for(columns)),
            "skipped": report.counts(),
            "skip_message": report.message(),
        }
        (scratch / _INFO_FILE).write_text(json.dumps(info, indent=1))
        if _is_complete_cache(target):  # another process finished the same cache meanwhile: keep its
            shutil.rmtree(scratch)
            return
        if target.exists():  # a stale, incomplete cache dir (e.g. a file deleted by hand)
            shutil.rmtree(target)
        os.rename(scratch, target)
    except BaseException as exc:
        # only our writes raise a plain OSError here: archive read errors are HupdFileError
        error = (
            _cache_error(exc, target, progress, check)
            if isinstance(exc, OSError) and not isinstance(exc, (HupdFileError, HupdCacheError))
            else None
        )
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if _is_complete_cache(target):  # the rename lost a race against another process
            return
        if error is not None:
            raise error from exc
        raise


def _cache_error(exc: OSError, target: Path, progress: _Progress, check: _SpaceCheck | None = None) -> HupdCacheError:
    """The error for a failed cache write: where, why, and for a full disk about how much room is needed."""
    where = target.parent
    text = str(exc)
    full = exc.errno in _NO_SPACE or any(os.strerror(code) in text for code in _NO_SPACE)  # pyarrow sets no errno
    advice = (
        "free some space there, or point hupd_cache_dir= (--hupd_cache_dir) at a disk with more room. The partial "
        "build was removed; earlier caches are untouched."
    )
    if not full:
        return HupdCacheError(
            f"Could not write the HUPD cache {target} ({type(exc).__name__}: {exc}). Check that "
            f"{where} is writable and has room, or point hupd_cache_dir= (--hupd_cache_dir) elsewhere. "
            "The partial build was removed; earlier caches are untouched."
        )
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free now"
    except OSError:
        free = "free space unknown"
    if check is not None and check.need is not None:  # measured on the first records
        need = f"about {_size(check.need)} ({free})"
    elif progress.written and progress.total:
        # the records file holds each selected record once, each split file its rows again
        need = f"about {_size(progress.nbytes / progress.written * progress.total)} ({free})"
    else:
        need = f"more than is free ({free})"
    error = HupdCacheError(
        f"The disk is full: could not write the HUPD cache {target} ({exc}). Building it "
        f"needs {need} in {where}: the selected records are written once in archive order, then "
        f"again per split in the official order. To fix: {advice}"
    )
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
            logger.info(
                "Removing %s, left by an interrupted HUPD cache build (process %s is gone)", entry, match["pid"]
            )
            shutil.rmtree(entry, ignore_errors=True)


def _log_cached_skips(target: Path) -> None:
    """Repeat the skip warning stored when the cache was built (the archive is not read again)."""
    try:
        message = json.loads((target / _INFO_FILE).read_text()).get("skip_message")
    except (OSError, ValueError, AttributeError):
        return
    if message:
        logger.warning("HUPD (cached in %s): %s", target, message)


def _open_cache(target: Path, columns: tuple[str, ...] | None = None) -> datasets.DatasetDict:
    """The splits of a complete cache, with only ``columns`` if it holds more (no copy: a view of its files)."""
    stored = _stored(target)
    result = datasets.DatasetDict()
    for split in _SPLITS:
        dataset = datasets.Dataset.from_file(
            str(target / f"{split}.arrow"), info=dataset_info(stored), split=datasets.NamedSplit(split)
        )
        result[split] = dataset if columns == stored else dataset.select_columns(list(columns or FEATURES))
        logger.info("HUPD %s split: %d examples", split, result[split].num_rows)
    return result
