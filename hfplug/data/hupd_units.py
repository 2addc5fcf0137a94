"""Read the HUPD archive for a cache build: unit by unit, each into a scratch records file, in processes.

The archive is read in units (:func:`~hfplug.data.hupd_archive._archive_units`: each needed
year tarball of ``all``; the sample's one ``.tar.gz``), each into a records file of its own
(:class:`_Records`), by ``num_proc`` processes at once. Each unit reports where each copy of
a selected path sat in the archive, so that :mod:`~hfplug.data.hupd_build` can decide which
copy counts, and the splits are the same bytes whatever ``num_proc`` is. The processes
(:func:`_processes`, tasks given by :func:`_run` or :func:`_start`) then write the splits too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import logging.handlers
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from hfplug.data.hupd_archive import HupdFileError, _iter_archive, _Link, _resolve_links, _Unit
from hfplug.data.hupd_cache import HupdCacheError
from hfplug.data.hupd_disk import _WRITER_BATCH_SIZE, _cache_error, _Progress, _SpaceCheck
from hfplug.data.hupd_plan import _Plan
from hfplug.data.hupd_records import _example, features_for
from hfplug.data.hupd_remote import RemoteArchive

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name

_RECORDS_FILE = "records-{}.arrow"  # scratch: every record found in one unit of the archive, in archive order
_GONE = -1  # the row of a copy that reads as nothing: a hard link to a path never stored before it


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
    any order by reading any row back on its own (``get_batch``), through maps opened for one
    batch of a split at a time (:func:`~hfplug.data.hupd_split_files._write_part`): memory stays flat.
    The file is opened at the first write, after ``check`` (the disk-space check) has seen the
    first batch.
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
    bytes fetched from the Hub for it. ``written``: records written to the records file (and their
    ``nbytes``), for the progress of the process that asked (the full-disk estimate)."""

    copies: dict[str, tuple[tuple[int, int, int], int | None]]
    repeats: Counter
    foreign: list[str]
    fetched: int = 0
    pid: int = 0  # the process that read it
    written: int = 0
    nbytes: int = 0


class _Wanted:
    """``in``: a selected path of the job, or (with a prefix) any path outside it, to be listed as foreign."""

    def __init__(self, numbers: Mapping[str, str], prefix: str | None):
        self.numbers, self.prefix = numbers, prefix

    def __contains__(self, key: str) -> bool:
        return key in self.numbers or (self.prefix is not None and not key.startswith(self.prefix))


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


def _read_unit(job: _Job, progress: _Progress | None = None) -> _UnitResult:
    """Read one unit of the archive: each selected path's copy that counts there, written to ``job.records``.

    Of a path stored twice in the unit the last copy counts, as extraction leaves it; hard links
    are read after the pass (:func:`_resolve_links`). A failed write raises :class:`HupdCacheError`.
    """
    progress = progress if progress is not None else _Progress()
    archive, unit, numbers = job.archive, job.unit, job.numbers
    fetched = archive.fetched if isinstance(archive, RemoteArchive) else 0
    records, complete = _Records(job.records, progress, job.columns, job.check), False
    written, nbytes = progress.written, progress.nbytes
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
    written, nbytes = progress.written - written, progress.nbytes - nbytes
    return _UnitResult(copies, repeats, foreign, fetched, os.getpid(), written, nbytes)


@contextlib.contextmanager
def _processes(num_proc: int) -> Iterator[concurrent.futures.ProcessPoolExecutor | None]:
    """``num_proc`` fresh processes for a build's tasks (:func:`_run`), or None for one: they then run here.

    Processes start by the platform's default method, as ``datasets``' ``num_proc`` does: fork on
    Linux (nothing to import again: they start at once); spawn on macOS and Windows (and
    forkserver from Python 3.14), where a script that builds with ``num_proc > 1`` needs the
    usual ``if __name__ == "__main__":`` guard. Their log records are handled here, by this
    process's logging. On an error or an interrupt the other processes are stopped.
    """
    if num_proc <= 1:
        yield None
        return
    context = multiprocessing.get_context()
    records = context.Queue()
    listener = logging.handlers.QueueListener(records, _Relay())
    listener.start()
    pool = concurrent.futures.ProcessPoolExecutor(
        num_proc, mp_context=context, initializer=_start_worker, initargs=(records, logger.getEffectiveLevel())
    )
    try:
        yield pool
    except concurrent.futures.process.BrokenProcessPool as exc:
        exc.add_note(
            "A process building the HUPD cache died. If the script that called load_hupd has no "
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


def _run(pool: concurrent.futures.ProcessPoolExecutor | None, task, items: list, progress: _Progress) -> list:
    """``task(item)`` for each item, in ``pool``'s processes at once, or here one after the other (with
    ``progress``, which a process of the pool keeps to itself); the results in the items' order."""
    return _start(pool, task, items, progress)()


def _start(
    pool: concurrent.futures.ProcessPoolExecutor | None, task, items: list, progress: _Progress
) -> Callable[[], list]:
    """Start :func:`_run`'s tasks (here: run them); the returned function waits for their results, so
    that this process can do other work meanwhile."""
    if pool is None:
        results = [task(item, progress) for item in items]
        return lambda: results
    frozen_before = gc.get_freeze_count() > 0  # a recipe's imports (hfplug.cli.run): they stay frozen
    gc.freeze()  # forked processes share this one's memory until written to: keep the collector off it
    try:
        futures = [pool.submit(task, item) for item in items]  # (the processes start at the first)
    finally:
        if not frozen_before:
            gc.unfreeze()
    return lambda: [future.result() for future in futures]


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
