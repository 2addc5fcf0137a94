"""The HUPD Arrow cache: build the splits once (archive order, then upstream's order), reopen them after.

The cache key covers the arguments and the input files' identity. A build writes into a
scratch folder named after its process and renames it into place, so a cache is complete
or absent; scratch left by a killed build is removed next time. A failed write raises
:class:`HupdCacheError`, saying where and, for a full disk, about how much room is needed.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

from hfplug.data.hupd_archive import HupdFileError, _iter_archive, _Link, _resolve_links
from hfplug.data.hupd_plan import _Plan, _SkipReport
from hfplug.data.hupd_records import FEATURES, _example, dataset_info
from hfplug.data.hupd_remote import RemoteArchive

__all__ = ["CACHE_VERSION", "HupdCacheError"]

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name

_SPLITS = ("train", "validation")
# Bump when the cached Arrow content changes for the same inputs. 2: upstream row order,
# repeated metadata rows kept, exact paths, last copy of a repeated member, hard links.
CACHE_VERSION = 2
_INFO_FILE = "hfplug_hupd.json"
_RECORDS_FILE = "records.arrow"  # scratch: every record found, in archive order
# Examples per Arrow record batch: real records are ~50 KB, so a batch holds ~10 MB of text.
_WRITER_BATCH_SIZE = 200
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class HupdCacheError(OSError):
    """The HUPD Arrow cache could not be written (full disk, no permission, ...).

    The message names the cache folder and, for a full disk, about how much room the build
    needs there. The scratch folder is removed and any earlier cache is left as it was.
    """


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


def _write_splits(
    out_dir: Path, archive: Path, plan: _Plan, report: _SkipReport, progress: _Progress
) -> dict[str, int]:
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


def _file_identity(path: Path | RemoteArchive) -> list[Any]:
    """What makes an input file "the same": path, size and modification time; on the Hub, its URL at a commit."""
    if not isinstance(path, Path):
        return [str(path)]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_key(
    hupd_config: str, selection: Mapping[str, Any], metadata_file: Path, archive_file: Path | RemoteArchive
) -> str:
    payload = {
        "version": CACHE_VERSION,
        "name": hupd_config,  # the key's old name: caches built before the rename stay valid
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


def _build_cache(target: Path, archive: Path | RemoteArchive, plan: _Plan) -> None:
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
        scratch = Path(
            tempfile.mkdtemp(
                prefix=f".{target.name}.{_host_id()}-{os.getpid()}.", suffix=".incomplete", dir=target.parent
            )
        )
        report = _SkipReport.for_plan(archive, plan)
        counts = _write_splits(scratch, archive, plan, report, progress)
        report.log()
        info = {
            "num_examples": counts,
            "archive": str(archive),
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
            _cache_error(exc, target, progress)
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


def _cache_error(exc: OSError, target: Path, progress: _Progress) -> HupdCacheError:
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
    if progress.written and progress.total:
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


def _open_cache(target: Path) -> datasets.DatasetDict:
    result = datasets.DatasetDict()
    for split in _SPLITS:
        result[split] = datasets.Dataset.from_file(
            str(target / f"{split}.arrow"), info=dataset_info(), split=datasets.NamedSplit(split)
        )
        logger.info("HUPD %s split: %d examples", split, result[split].num_rows)
    return result
