"""Inflating a gzip stream for the HUPD archive reader: on a second thread, bounded, its trailer checked.

:class:`_Gunzip` is the file object :mod:`~hfplug.data.hupd_archive` hands to ``tarfile`` for a
``.tar.gz`` (the sample archive, and each year tarball of the all-years tar): it inflates the stream
ahead of the parser on a background thread, ``_PIECE`` bytes at a time, and raises on a truncated
stream or a bad CRC, which tarfile's own ``r|gz`` lets pass. ``_GZIP_MAGIC`` is how the archive
reader tells a gzip file (the sample layout) from the all-years tar.
"""

from __future__ import annotations

import queue
import threading
import zlib
from typing import BinaryIO

import pyarrow as pa

_GZIP_MAGIC = b"\x1f\x8b"
_PIECE = 1 << 20  # bytes inflated per step: the parser starts on a year's first MB, not after all of it
_QUEUE_CHUNKS = 8  # inflated pieces buffered ahead of the parser (<= 8 MB)
_SOURCE_BLOCK = 1 << 22  # compressed bytes read at once from a Python file (a stream from the Hub)


class _Gunzip:
    """Decompressed bytes of a gzip stream, inflated ahead on a second core, fully checked.

    ``source``: the compressed bytes, a ``pyarrow`` native file (a local file, or a member of
    the all-years tar: :func:`~hfplug.data.hupd_archive._member_stream`) or any binary file
    object (a year streamed from the Hub), which is read ``_SOURCE_BLOCK`` bytes at a time.

    tarfile's own ``r|gz`` never checks the gzip trailer, so a truncated download would just
    end the archive early and look like missing records. Here a stream that ends before its
    end-of-stream marker raises EOFError and a bad CRC raises ``zlib.error``.

    A background thread inflates while the caller parses JSON. It inflates with Arrow's gzip
    stream, which holds the GIL for none of a piece's work (but a read of a Python source, made
    ``_SOURCE_BLOCK`` bytes at a time): the ``zlib`` module takes the GIL back for every block
    of output it grows, and each time waits for the parsing thread to yield it (up to
    ``sys.getswitchinterval()``, 5 ms), so a zlib thread barely overlapped the parser. The queue
    holds at most ``_QUEUE_CHUNKS`` pieces of at most ``_PIECE`` bytes each, so memory stays
    bounded (a zip bomb included). Use as a context manager so the thread is stopped on early
    exit.
    """

    def __init__(self, source: BinaryIO | pa.NativeFile, *, threaded: bool = True):
        native = isinstance(source, pa.NativeFile)
        self._source = source if native else _Watched(source)
        if not native:  # read in big blocks: Arrow takes the GIL for each read of a Python file
            source = pa.BufferedInputStream(pa.PythonFile(self._source, mode="r"), _SOURCE_BLOCK)
        self._stream = pa.CompressedInputStream(source, "gzip")
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
        """Stop the inflating thread (it may be blocked on a full queue), then close the stream."""
        if self._queue is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._queue = None
        self._stream.close()  # the source is the caller's to close

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
        try:
            return self._stream.read(_PIECE)
        except OSError as exc:
            if isinstance(self._source, _Watched) and self._source.error is exc:
                raise  # the source's own error (a dropped connection, say), not the data's
            if getattr(exc, "errno", None) is not None:
                raise  # the file could not be read (EIO, ...)
            if "truncated" in str(exc).lower():  # Arrow: "Truncated compressed stream"
                raise EOFError("the compressed data ends before the gzip end-of-stream marker (truncated)") from exc
            raise zlib.error(f"corrupt gzip data: {exc}") from exc


class _Watched:
    """A binary file object that remembers the error its ``read`` raised, for Arrow to read through:
    Arrow raises it again as it was, so :meth:`_Gunzip._inflate` tells it from corrupt data."""

    def __init__(self, source: BinaryIO):
        self._source = source
        self.error: BaseException | None = None
        self.closed = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:  # Arrow's, when the gzip stream closes: the source stays the caller's
        self.closed = True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._source.read(size)
        except BaseException as exc:
            self.error = exc
            raise
