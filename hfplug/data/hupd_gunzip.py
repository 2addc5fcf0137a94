"""Inflating a gzip stream for the HUPD archive reader: on a second thread, bounded, its trailer checked.

:class:`_Gunzip` is the file object :mod:`~hfplug.data.hupd_archive` hands to ``tarfile`` for a
``.tar.gz`` (the sample archive, and each year tarball of the all-years tar): it reads the compressed
bytes ``_READ_CHUNK`` at a time, inflates them ahead of the parser on a background thread, and raises
on a truncated stream or a bad CRC, which tarfile's own ``r|gz`` lets pass. ``_GZIP_MAGIC`` is how the
archive reader tells a gzip file (the sample layout) from the all-years tar.
"""

from __future__ import annotations

import queue
import threading
import zlib
from typing import BinaryIO

_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK = 1 << 21  # compressed bytes read per step
_MAX_INFLATE = 1 << 23  # cap on bytes inflated per step, so a zip bomb cannot balloon memory
_QUEUE_CHUNKS = 4  # inflated pieces buffered ahead of the parser (<= 32 MB); few, big pieces


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
