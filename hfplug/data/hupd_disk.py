"""The room a HUPD cache build needs, and the error a failed write raises.

Before writing, a build measures its first records (:class:`_SpaceCheck`) and refuses
(:class:`~hfplug.data.hupd_cache.HupdCacheError`, nothing written) when the cache's disk lacks
the room the whole build needs; a write that still fails raises :class:`HupdCacheError`,
saying where and about how much room is needed (:func:`_cache_error`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa

from hfplug.data.hupd_cache import HupdCacheError

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name

# Examples per Arrow record batch: real records are ~50 KB, so a batch holds ~10 MB of text.
# (The scratch records files flush, the split files are written and the disk check measures in these.)
_WRITER_BATCH_SIZE = 200
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


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
