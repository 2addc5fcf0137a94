"""HUPD's ``all-years.tar`` read on the Hub by HTTP range requests: only the year tarballs a load needs.

The archive is an uncompressed tar (~56 GB) of ``data/<year>.tar.gz`` (2.5-5 GB each). Tar
member headers sit at offsets the headers themselves give, so the member table costs one
small range request per member (:meth:`RemoteArchive.open_tar`), and each needed year is then
streamed with one range request (:meth:`RemoteArchive.open_member`), to be inflated as it
arrives by :mod:`~hfplug.data.hupd_archive`. Nothing is written to disk.

Every request goes through ``huggingface_hub``: the file's URL from ``hf_hub_url`` (so
``HF_ENDPOINT`` is honoured), its size and commit from ``get_hf_file_metadata``, the user's
token in ``build_hf_headers``, and the library's shared HTTP session (its proxies, SSL and
offline settings; it follows the Hub's redirect to its CDN and drops the token there).
Every request after the first names the commit the first one found, so the bytes cannot
change under a load.

A dropped or stalled connection resumes at the byte where it stopped: the inflater keeps its
state in memory, so nothing is fetched twice and no record is read twice. A server that
ignores ``Range`` raises :class:`RangesUnsupported`, and the caller downloads the whole file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import posixpath
import re
import tarfile
import time
from collections.abc import Mapping

import httpx2
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

from hfplug.data.hupd_archive import HupdFileError

__all__ = ["HupdRemoteError", "HupdYearMissingError", "RangesUnsupported", "RemoteArchive"]

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name

_HEADER_WINDOW = 2048  # bytes fetched per header read: a header block, and the byte before it that tarfile checks
_CHUNK = 1 << 20  # bytes handed on per read of a streamed member
_MAX_RETRIES = 5  # reconnects in a row without a new byte before giving up
_RETRY_WAIT = 1.0  # seconds before the first reconnect; doubles up to _MAX_WAIT
_MAX_WAIT = 8.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_YEAR_TARBALL = re.compile(r"data/(\d{4})\.tar\.gz")


class RangesUnsupported(Exception):
    """The server does not answer HTTP range requests for the file (the message says how it answered)."""


class HupdRemoteError(HupdFileError):
    """Reading the archive on the Hub failed: the connection kept dropping, or the server stopped answering ranges."""


class HupdYearMissingError(ValueError):
    """The archive has no ``data/<year>.tar.gz`` for a year the selected filing dates need (choose other dates)."""


@dataclasses.dataclass
class RemoteArchive:
    """A tar file in a Hub repo, read by range requests. Picklable (it holds no connection).

    Made without a request (``url`` names ``revision``, ``main`` by default); :meth:`connect`
    then finds the file and pins ``url`` to its commit. ``size`` is None until then;
    ``fetched`` counts the body bytes received by this object (probe, headers, members, resumes).
    """

    repo_id: str
    filename: str
    revision: str | None = None
    token: str | bool | None = dataclasses.field(default=None, repr=False)
    repo_type: str = "dataset"
    url: str = ""
    size: int | None = None
    etag: str | None = None
    fetched: int = 0

    def __post_init__(self) -> None:
        self.url = self.url or hf_hub_url(
            self.repo_id, self.filename, repo_type=self.repo_type, revision=self.revision
        )

    @classmethod
    def open(cls, repo_id: str, filename: str, **kwargs) -> RemoteArchive:
        """``RemoteArchive(repo_id, filename, **kwargs).connect()``."""
        return cls(repo_id, filename, **kwargs).connect()

    def connect(self) -> RemoteArchive:
        """Find the file (one HEAD request) and check with one small range request that ranges work.

        Raises :class:`RangesUnsupported` when the server answers that request with anything
        but the bytes asked for; ``huggingface_hub``'s errors when the file cannot be reached.
        """
        metadata = get_hf_file_metadata(self.url, token=self.token, retry_on_errors=True)
        if metadata.commit_hash:  # later requests read this very commit, whatever the branch does meanwhile
            self.revision = metadata.commit_hash
            self.url = hf_hub_url(self.repo_id, self.filename, repo_type=self.repo_type, revision=self.revision)
        self.etag = metadata.etag
        self.size = metadata.size or 0
        probe = min(_HEADER_WINDOW, self.size) or _HEADER_WINDOW  # unknown size: the probe tells it
        with self._request(0, probe, probing=True) as (response, total):
            if metadata.size and total != metadata.size:
                raise RangesUnsupported(f"{self} has {metadata.size} bytes, but a range answer says {total}")
            self.size = total
            try:  # the first headers, kept for the member table; lost bytes are fetched again there
                data = b"".join(response.iter_raw())
                self.fetched += len(data)
                self._window = (0, data if len(data) == min(probe, total) else b"")
            except httpx2.TransportError:
                pass
        return self

    def members(self) -> list[tarfile.TarInfo]:
        """The member table: each member's ``name``, ``offset_data``, ``size``, ... (one request per header)."""
        with self.open_tar() as tar:
            return tar.getmembers()

    def __str__(self) -> str:
        return self.url

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_window", None)  # a cache, not state
        return state

    def open_tar(self) -> tarfile.TarFile:
        """The archive as a random-access ``tarfile.TarFile``: reading its headers fetches only them."""
        if self.size is None:
            self.connect()
        return tarfile.open(fileobj=_WindowReader(self), mode="r:")

    def open_member(self, info: tarfile.TarInfo) -> _RangeStream:
        """A member's bytes, streamed over one request (resumed where it stopped if the connection drops)."""
        return _RangeStream(self, info.offset_data, info.offset_data + info.size, info.name)

    def check_years(self, members: list[tarfile.TarInfo], needed: Mapping[str, str]) -> None:
        """Raise :class:`HupdYearMissingError` unless ``members`` hold ``data/<year>.tar.gz`` for every needed year.

        ``needed``: year -> the selected filing dates in that year, in words (they go into the message).
        """
        names = (posixpath.normpath(info.name.lstrip("/")) for info in members if info.isreg())
        present = {m.group(1) for name in names if (m := _YEAR_TARBALL.fullmatch(name))}
        missing = {year: dates for year, dates in needed.items() if year not in present}
        if missing:
            listing = "; ".join(f"data/{year}.tar.gz for {dates}" for year, dates in sorted(missing.items()))
            raise HupdYearMissingError(
                f"The HUPD archive {self} lacks {listing}: the selected filing dates need "
                f"{'it' if len(missing) == 1 else 'them'}. It holds the years {', '.join(sorted(present)) or 'none'}; "
                "choose dates within them."
            )

    @contextlib.contextmanager
    def _request(self, start: int, end: int, *, probing: bool = False):
        """One GET of bytes ``[start, end)``: ``(response, total file size)``, checked to be exactly those bytes."""
        headers = build_hf_headers(token=self.token)
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"  # a compressed answer would not be the byte range (some CDNs)
        with http_stream_backoff(
            "GET",
            self.url,
            headers=headers,
            timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            max_retries=_MAX_RETRIES,
            base_wait_time=_RETRY_WAIT,
            max_wait_time=_MAX_WAIT,
        ) as response:
            hf_raise_for_status(response)
            problem = _range_problem(response, start, end, None if probing else self.size)
            if problem is not None:
                if probing:
                    raise RangesUnsupported(f"{self} {problem}")
                raise HupdRemoteError(f"Reading {self}: the server {problem}, though it answered ranges before.")
            yield response, int(_CONTENT_RANGE.fullmatch(response.headers["Content-Range"]).group(3))


def _range_problem(response: httpx2.Response, start: int, end: int, size: int | None) -> str | None:
    """Why ``response`` is not bytes ``[start, end)`` of a file of ``size`` bytes (None: it is)."""
    asked = f"bytes={start}-{end - 1}"
    if response.status_code != 206:
        return f"answered a request for {asked} with HTTP {response.status_code} (the whole file), not 206"
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        return f"answered a request for {asked} compressed ({encoding}), not as the bytes themselves"
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
    if match is None:
        return f"answered a request for {asked} without a valid Content-Range"
    first, last, total = (int(g) for g in match.groups())
    if first != start or (last != end - 1 and last != total - 1) or (size is not None and total != size):
        return f"answered a request for {asked} with Content-Range {response.headers['Content-Range']!r}"
    return None


class _WindowReader(io.RawIOBase):
    """A seekable view of the archive for ``tarfile``: each read not already fetched is one range request.

    Reads of header blocks fetch ``_HEADER_WINDOW`` bytes, enough for the next header too
    (``tarfile`` reads the byte before a header, then the header); a loose member is fetched
    whole. Member data is never read through this: see :class:`_RangeStream`.
    """

    def __init__(self, archive: RemoteArchive):
        self._archive = archive
        self._pos = 0
        self._window = getattr(archive, "_window", (0, b""))  # the probe's bytes: the first headers, for free

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._archive.size}[whence]
        self._pos = base + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._archive.size if size < 0 else min(self._pos + size, self._archive.size)
        if end <= self._pos:
            return b""
        first, data = self._window
        if not (first <= self._pos and end <= first + len(data)):
            fetch_end = min(max(end, self._pos + _HEADER_WINDOW), self._archive.size)
            with _RangeStream(self._archive, self._pos, fetch_end, "the tar headers") as stream:
                self._window = first, data = self._pos, stream.read()
        out = data[self._pos - first : end - first]
        self._pos += len(out)
        return out


class _RangeStream(io.RawIOBase):
    """Bytes ``[start, end)`` of the archive as a read-only stream, over one GET while the connection lasts.

    A connection that drops, stalls past ``HF_HUB_DOWNLOAD_TIMEOUT`` or ends early is opened
    again from the first byte not yet received, up to ``_MAX_RETRIES`` times in a row without
    progress (waiting 1, 2, 4, 8 s); then :class:`HupdRemoteError`. Close it (or use ``with``)
    to end an unfinished request.
    """

    def __init__(self, archive: RemoteArchive, start: int, end: int, what: str):
        self._archive, self._pos, self._end, self._what = archive, start, end, what
        self._start = start
        self._stack: contextlib.ExitStack | None = None
        self._chunks = None
        self._buffer = b""
        self._failures = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        while not self._buffer:
            if self._pos >= self._end:
                self._disconnect()
                return b""
            self._buffer = self._next_chunk()
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def close(self) -> None:
        self._disconnect()
        super().close()

    def _next_chunk(self) -> bytes:
        while True:
            try:
                if self._chunks is None:
                    self._stack = contextlib.ExitStack()
                    response, _ = self._stack.enter_context(self._archive._request(self._pos, self._end))
                    self._chunks = response.iter_raw()  # as received: a drop loses no byte already here
                chunk = next(self._chunks, b"")
                if not chunk:
                    raise httpx2.RemoteProtocolError("the answer ended early")
            except httpx2.TransportError as exc:  # dropped, reset, timed out, cut short
                self._disconnect()
                self._retry(exc)
                continue
            except HfHubHTTPError as exc:  # an error status still there after http_stream_backoff's retries
                self._disconnect()
                raise HupdRemoteError(f"Reading {self._what} from {self._archive}: {exc}") from exc
            chunk = chunk[: self._end - self._pos]
            self._pos += len(chunk)
            self._archive.fetched += len(chunk)
            self._failures = 0
            return chunk

    def _retry(self, exc: Exception) -> None:
        self._failures += 1
        where = f"{self._what} (byte {self._pos - self._start:,} of {self._end - self._start:,})"
        if self._failures > _MAX_RETRIES:
            raise HupdRemoteError(
                f"Reading {where} from {self._archive} failed {self._failures} times in a row "
                f"({type(exc).__name__}: {exc}). Check the network and run again, or download the archive "
                "and pass its path (hupd_archive_path=)."
            ) from exc
        wait = min(_RETRY_WAIT * 2 ** (self._failures - 1), _MAX_WAIT)
        logger.warning(
            "HUPD: the connection dropped while reading %s (%s: %s); resuming at that byte in %.0f s (try %d of %d)",
            where,
            type(exc).__name__,
            exc,
            wait,
            self._failures,
            _MAX_RETRIES,
        )
        time.sleep(wait)

    def _disconnect(self) -> None:
        self._chunks = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            with contextlib.suppress(httpx2.TransportError):
                stack.close()
