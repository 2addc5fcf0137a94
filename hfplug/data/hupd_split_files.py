"""Write a HUPD cache's split files out of the scratch records files: in parts, by several processes at once.

A split file is an Arrow IPC stream, what ``datasets``' ``ArrowWriter`` writes: the schema, then
record batches of ``_WRITER_BATCH_SIZE`` rows, then the end-of-stream marker. Its batches are
cut in contiguous :class:`_Part` s (as many per split as there are processes); each part is
written on its own, by whichever process is free (:func:`_write_part`), and the parts are then
joined in order (:func:`_join`). A batch's bytes do not depend on which process wrote it, so
the files are the same bytes whatever ``num_proc`` is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

import pyarrow as pa

from hfplug.data.hupd_disk import _WRITER_BATCH_SIZE, _Progress
from hfplug.data.hupd_records import features_for

_PART_FILE = "{split}.arrow.part-{index}"  # scratch: a part after the first (which is the split file)
# The Arrow IPC stream's end: a continuation token and a zero length (what a stream writer's close adds)
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


@dataclasses.dataclass
class _Part:
    """Rows ``rows`` (``(records file, row)`` each, whole batches of them) of a split, to write to ``path``;
    the first part of a split is the split file itself and starts with the schema (picklable: it may go to
    another process)."""

    sources: list[Path]
    rows: list[tuple[int, int]]
    path: Path
    first: bool
    columns: tuple[str, ...] | None = None


def _parts(
    out_dir: Path,
    split: str,
    sources: list[Path],
    rows: list[tuple[int, int]],
    pieces: int,
    columns: tuple[str, ...] | None = None,
) -> list[_Part]:
    """Split ``split``'s ``rows`` into at most ``pieces`` parts of whole batches, in order (one part if empty)."""
    batches = max(1, -(-len(rows) // _WRITER_BATCH_SIZE))
    pieces = min(pieces, batches)
    parts = []
    for index in range(pieces):
        start = index * batches // pieces * _WRITER_BATCH_SIZE
        end = (index + 1) * batches // pieces * _WRITER_BATCH_SIZE
        path = out_dir / (f"{split}.arrow" if index == 0 else _PART_FILE.format(split=split, index=index))
        parts.append(_Part(sources, rows[start:end], path, index == 0, columns))
    return parts


def _write_part(part: _Part, progress: _Progress | None = None) -> None:
    """Write ``part``'s batches (after the schema, for a first part) to ``part.path``.

    Each batch's rows are read through memory maps of the records files, opened for that batch
    only: the one copy made is the batch's own (half the time of first reading each row into a
    buffer), and the maps close once it is made, so memory stays at about a batch however large
    the records files are. A failed write raises the ``OSError`` (the caller names the cache).
    """
    progress = progress if progress is not None else _Progress()
    schema = features_for(part.columns).arrow_schema  # with datasets' features in its metadata
    # a native file: Python's own writes are slower
    with pa.OSFile(str(part.path), "wb") as sink:
        if part.first:
            sink.write(schema.serialize())
        for start in range(0, len(part.rows), _WRITER_BATCH_SIZE):
            chunk = part.rows[start : start + _WRITER_BATCH_SIZE]
            with contextlib.ExitStack() as maps:
                readers = {
                    i: pa.ipc.open_file(maps.enter_context(pa.memory_map(str(part.sources[i]))))
                    for i in dict.fromkeys(i for i, _ in chunk)
                }
                batches = [readers[i].get_batch(row) for i, row in chunk]
                # the copy (a one-row batch stays a view: its buffers keep their map alive)
                table = pa.Table.from_batches(batches, schema=schema).combine_chunks()
                del batches, readers
            for batch in table.to_batches():  # one: the columns were combined
                sink.write(batch.serialize())
            progress.written += len(chunk)
            progress.nbytes += table.nbytes


def _join(parts: list[_Part]) -> None:
    """Append a split's later parts to its first, in order, and end the stream; the later parts are deleted."""
    with open(parts[0].path, "ab") as sink:
        for part in parts[1:]:
            with open(part.path, "rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)
            part.path.unlink()
        sink.write(_END_OF_STREAM)
