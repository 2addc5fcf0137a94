"""Build a HUPD Arrow cache: read the archive's units, merge them in archive order, publish it atomically.

A build writes into a scratch folder named after its process and renames it into place, so
a cache is complete or absent; scratch left by a killed build is removed next time. The
units are read by :mod:`~hfplug.data.hupd_units`, each into a records file of its own, by
``num_proc`` processes at once; which copy of a path counts is then decided here from where
each copy sat in the archive, and the same processes write the splits, in parts joined in
order (:mod:`~hfplug.data.hupd_split_files`), so the splits are the same bytes whatever
``num_proc`` is.

Before writing, a build measures its first records and refuses (:class:`HupdCacheError`,
nothing written) when the cache's disk lacks the room the whole build needs
(:mod:`~hfplug.data.hupd_disk`); a write that still fails raises :class:`HupdCacheError`,
saying where and about how much room is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from hfplug.data.hupd_archive import HupdFileError, _archive_units
from hfplug.data.hupd_cache import _INFO_FILE, _SPLITS, HupdCacheError, _is_complete_cache
from hfplug.data.hupd_disk import _cache_error, _Progress, _SpaceCheck
from hfplug.data.hupd_plan import _Plan, _SkipReport
from hfplug.data.hupd_records import features_for
from hfplug.data.hupd_remote import RemoteArchive
from hfplug.data.hupd_split_files import _join, _parts, _write_part
from hfplug.data.hupd_units import _GONE, _jobs, _processes, _read_unit, _run, _start, _unit_name, _UnitResult

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name


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


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


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
    workers = min(num_proc, len(jobs))
    with _processes(workers) as pool:  # the same processes read the archive, then write the splits
        if pool is not None:
            logger.info("HUPD: reading %s in %d processes", ", ".join(_unit_name(job.unit) for job in jobs), workers)
        results = _run(pool, _read_unit, jobs, progress)
        for i, (job, result) in enumerate(zip(jobs, results)):
            if job.prefix is not None and any(key in plan.numbers for key in result.foreign):
                logger.info(
                    "HUPD: %s holds selected records outside %s; reading it again", job.unit.stream, job.prefix
                )
                results[i] = _read_unit(
                    dataclasses.replace(job, numbers=plan.numbers, prefix=None, check=None), progress
                )
        elsewhere = [result for result in results if result.pid != os.getpid()]  # read by the other processes
        progress.written += sum(result.written for result in elsewhere)
        progress.nbytes += sum(result.nbytes for result in elsewhere)
        if isinstance(archive, RemoteArchive):
            fetched = archive.fetched + sum(result.fetched for result in elsewhere)
            logger.info("HUPD: fetched %.1f MB of the %.1f MB archive %s", fetched / 1e6, archive.size / 1e6, archive)
        sources = [job.records for job in jobs]
        split_rows = _split_rows(plan, results, report)
        parts = {split: _parts(out_dir, split, sources, split_rows[split], workers, columns) for split in _SPLITS}
        written = {split: _start(pool, _write_part, parts[split], progress) for split in _SPLITS}
        for split in _SPLITS:  # a split is joined while the processes still write the next
            written[split]()
            _join(parts[split])
    for source in sources:
        source.unlink(missing_ok=True)
    return {split: len(split_rows[split]) for split in _SPLITS}


def _split_rows(plan: _Plan, results: list[_UnitResult], report: _SkipReport) -> dict[str, list[tuple[int, int]]]:
    """Each split's rows as ``(records file, row)``, in upstream's order: the copy of each path that counts.

    That copy is the last in the archive (year tarballs, rank 1, unpack after loose members). Every
    other copy is counted in ``report.duplicate_members``; paths never found, or found unreadable, in
    ``report.missing`` and ``report.malformed``.
    """
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
    split_rows = {}
    for split in _SPLITS:
        split_rows[split] = []
        for key in plan.rows.get(split, ()):
            winner = winners.get(key) if key is not None else None
            if winner is not None and winner[2] is not None and winner[2] != _GONE:
                split_rows[split].append((winner[1], winner[2]))
    return split_rows


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
