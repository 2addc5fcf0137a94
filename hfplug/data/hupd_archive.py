"""Reading a HUPD archive: the members at the paths upstream opens, in one sequential pass.

Both Hub layouts (the sample's ``.tar.gz`` of JSON, and ``all``'s uncompressed tar of
``data/<year>.tar.gz``, whose unneeded years are seeked over), told apart by content; the
``all`` tar may also be read on the Hub (a :class:`~hfplug.data.hupd_remote.RemoteArchive`:
its headers and needed years fetched by range requests, each year inflated as it arrives).
Member names are routed to the paths extraction gives them (:func:`_normalise`); hard
links are followed (:func:`_resolve_links`); gzip is inflated on a second thread and its
trailer checked (:mod:`~hfplug.data.hupd_gunzip`), so a truncated or corrupt file raises
:class:`HupdFileError` instead of looking like missing records. A local archive's gzip streams
are handed over as native files (:func:`_member_stream`), which that thread inflates without
holding the GIL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow as pa

from hfplug.data.hupd_gunzip import _GZIP_MAGIC, _Gunzip

if TYPE_CHECKING:
    from hfplug.data.hupd_remote import RemoteArchive

__all__ = ["HupdFileError"]

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name


class HupdFileError(OSError):
    """A HUPD metadata or archive file exists but cannot be read (corrupt, truncated, wrong kind)."""


def _corrupt(path: Path | RemoteArchive, what: str, reason: object) -> HupdFileError:
    """The error for an unreadable input file, saying what to do about it."""
    if not isinstance(path, Path):  # read on the Hub: nothing of it was kept
        return HupdFileError(
            f"HUPD {what} {path} on the Hub is unreadable ({reason}). Nothing of it was saved; run again, "
            "and if this repeats, download it and pass its path as hupd_archive_path= (--hupd_archive_path)."
        )
    return HupdFileError(
        f"HUPD {what} {path} is unreadable ({reason}). If it came from the Hub, delete it and "
        f"download it again (hf_hub_download(..., force_download=True)); if you passed it as a "
        "path, check that it is the complete HUPD file of that name."
    )


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


def _read(open_member: Callable[[tarfile.TarInfo], BinaryIO | None], info: tarfile.TarInfo) -> bytes:
    """A member's bytes, read with ``open_member`` (``TarFile.extractfile`` or ``RemoteArchive.open_member``)."""
    handle = open_member(info)
    if handle is None:
        return b""
    with contextlib.closing(handle):
        return handle.read()


_YEAR_TARBALL = re.compile(r"data/([^/]+)\.tar\.gz")  # what upstream unpacks for ``all``: data/<year>.tar.gz


def _iter_tar_gz(
    source: BinaryIO,
    wanted: Mapping[str, Any] | set[str],
    *,
    stream: str = "",
    prefix: str = "",
    rank: int = 0,
    done: Callable[[], bool] | None = None,
) -> Iterator[_Member]:
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
                    yield _Member(key, stream, index, rank, None, _read(tar.extractfile, info))
            if done is not None and done():
                return
        gunzip.verify_rest()


def _outer_members(path: Path | RemoteArchive, years: Mapping[str, str] | set[str], *, check_years: bool = True):
    """The member table of the ``all`` layout's uncompressed tar, checked to be whole.

    Only the headers are read (seeking over the data; on the Hub, one small range request
    each). A tar cut off inside a member or at a header raises EOFError. On the Hub, a needed
    year it does not hold raises :class:`~hfplug.data.hupd_remote.HupdYearMissingError` (with
    ``check_years``), before any year is fetched.
    """
    remote = not isinstance(path, Path)
    with path.open_tar() if remote else tarfile.open(path, mode="r:") as outer:
        infos = outer.getmembers()
        size = path.size if remote else path.stat().st_size
        # tarfile ends quietly when the file stops at a header boundary; a complete tar
        # ends with two zero blocks, so less than that left means a cut-off file
        if size - outer.offset < 2 * tarfile.BLOCKSIZE:
            raise EOFError("the tar ends without its end-of-archive marker (truncated)")
    for info in infos:
        if info.isreg() and info.offset_data + info.size > size:
            raise EOFError(f"member {info.name} runs past the end of the file (truncated)")
    if remote and check_years:
        path.check_years(infos, years if isinstance(years, Mapping) else dict.fromkeys(years, "the selection"))
    return infos


def _iter_outer_tar(
    path: Path | RemoteArchive,
    wanted: Mapping[str, Any] | set[str],
    years: Mapping[str, str] | set[str],
    *,
    stream: str | None = None,
    done: Callable[[], bool] | None = None,
    members: Sequence[tarfile.TarInfo] | None = None,
) -> Iterator[_Member]:
    """The ``all`` layout: an uncompressed tar of ``data/<year>.tar.gz`` (and maybe loose JSON).

    Opened in random-access mode, so the headers are read first (seeking over the data) and
    year tarballs no selected filing year needs are skipped, not read. ``stream`` limits the
    pass to one year tarball, or to the loose members (``""``). ``years``: the needed filing
    years, or a mapping of them to the selected dates in words. ``members``: the member table
    (:func:`_outer_members`) when the caller has read it already.

    A :class:`~hfplug.data.hupd_remote.RemoteArchive` is read the same way on the Hub: its
    headers, then each needed year tarball streamed over one request. A needed year it does not
    hold raises :class:`~hfplug.data.hupd_remote.HupdYearMissingError` before any is fetched.
    """
    remote = not isinstance(path, Path)
    infos = members if members is not None else _outer_members(path, years, check_years=stream is None)
    with contextlib.ExitStack() as stack:
        if remote:
            open_member = open_year = path.open_member
        else:  # extractfile reads any member of the table by its offsets
            open_member = stack.enter_context(tarfile.open(path, mode="r:")).extractfile
            open_year = functools.partial(_member_stream, path)
        # a year tarball stored twice: extraction leaves the last copy, so only that one is read
        last = {_normalise(i.name): i for i in infos if i.isreg()}
        for index, info in enumerate(infos):
            name = _normalise(info.name)
            if name is None or not (info.isreg() or info.islnk()):
                continue
            year = _YEAR_TARBALL.fullmatch(name) if info.isreg() else None
            if year is not None:
                if stream not in (None, name):
                    continue
                if last[name] is not info or year.group(1) not in years:
                    logger.debug("Skipping %s: %s", name, _skip_reason(last[name] is not info, year.group(1)))
                    continue
                logger.debug("Reading %s", name)
                try:
                    with contextlib.closing(open_year(info)) as source:
                        yield from _iter_tar_gz(source, wanted, stream=name, prefix="data/", rank=1, done=done)
                except (tarfile.TarError, EOFError, zlib.error) as exc:
                    raise tarfile.ReadError(f"member {name}: {type(exc).__name__}: {exc}") from exc
            elif stream in (None, "") and info.islnk():
                yield _Member(name, "", index, 0, _normalise(info.linkname) or "")
            elif stream in (None, "") and name in wanted:
                yield _Member(name, "", index, 0, None, _read(open_member, info))
            if done is not None and done():
                break
    if remote and members is None:
        logger.info("HUPD: fetched %.1f MB of the %.1f MB archive %s", path.fetched / 1e6, path.size / 1e6, path)


def _member_stream(path: Path, info: tarfile.TarInfo) -> pa.NativeFile:
    """A member of the tar at ``path`` as a native stream of its bytes, which is inflated without
    holding the GIL (:class:`~hfplug.data.hupd_gunzip._Gunzip`). The file stays open while the
    stream lasts."""
    return pa.OSFile(str(path)).get_stream(info.offset_data, info.size)


def _skip_reason(later_copy: bool, year: str) -> str:
    return "a later copy follows" if later_copy else f"no selected application was filed in {year}"


@dataclasses.dataclass(frozen=True)
class _Unit:
    """A part of an archive that one process can read on its own, start to end.

    ``stream``: None for the whole archive (the sample's ``.tar.gz``: one stream, so it is one
    unit), ``data/<year>.tar.gz`` for a year of the all-years tar, ``""`` for that tar's loose
    members. ``order``: the year tarball's place in the tar (later copies of a path win).
    ``size``: compressed bytes (the largest units are read first). ``year``: the filing year a
    year tarball holds (its members normally unpack to ``data/<year>/``). ``members``: the tar's
    member table, read once for all units.
    """

    stream: str | None
    order: int = 0
    size: int = 0
    year: str | None = None
    members: tuple[tarfile.TarInfo, ...] | None = None


def _archive_units(
    path: Path | RemoteArchive, wanted: Mapping[str, Any] | set[str], years: Mapping[str, str] | set[str]
) -> list[_Unit]:
    """The parts of a HUPD archive a build reads, largest first: for ``all``, each needed year tarball
    (and the loose members, if any could matter); for ``sample``, the whole file.

    Reads the all-years tar's headers only; errors as :func:`_iter_archive`'s.
    """
    try:
        if isinstance(path, Path):
            with open(path, "rb") as raw:
                if raw.read(2) == _GZIP_MAGIC:
                    return [_Unit(None, size=path.stat().st_size)]
        infos = _outer_members(path, years)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, HupdFileError):
            raise
        raise _corrupt(path, "archive", f"{type(exc).__name__}: {exc}") from exc
    table = tuple(infos)
    last = {_normalise(i.name): i for i in infos if i.isreg()}
    units, loose = [], False
    for index, info in enumerate(infos):
        name = _normalise(info.name)
        if name is None or not (info.isreg() or info.islnk()):
            continue
        year = _YEAR_TARBALL.fullmatch(name) if info.isreg() else None
        if year is None:
            loose = loose or info.islnk() or name in wanted
        elif last[name] is not info or year.group(1) not in years:
            logger.debug("Skipping %s: %s", name, _skip_reason(last[name] is not info, year.group(1)))
        else:
            units.append(_Unit(name, index, info.size, year.group(1), table))
    units.sort(key=lambda unit: -unit.size)
    return units + ([_Unit("", members=table)] if loose else [])


def _iter_archive(
    path: Path | RemoteArchive,
    wanted: Mapping[str, Any] | set[str],
    years: Mapping[str, str] | set[str],
    *,
    stream: str | None = None,
    done: Callable[[], bool] | None = None,
    members: Sequence[tarfile.TarInfo] | None = None,
) -> Iterator[_Member]:
    """The ``wanted`` members (and all hard links) of a HUPD archive of either layout, in archive order.

    The layout is told by content, not by name: a gzip file is a ``.tar.gz`` of JSON (the
    sample), anything else must be an uncompressed tar (all years); an archive on the Hub
    (:class:`~hfplug.data.hupd_remote.RemoteArchive`) is the all-years tar. Read errors become
    :class:`HupdFileError` naming the file.
    """
    try:
        if not isinstance(path, Path):
            yield from _iter_outer_tar(path, wanted, years, stream=stream, done=done, members=members)
            return
        with pa.OSFile(str(path)) as raw:  # a native file: inflated without the GIL
            if raw.read(2) == _GZIP_MAGIC:
                raw.seek(0)
                yield from _iter_tar_gz(raw, wanted, done=done)
                return
        yield from _iter_outer_tar(path, wanted, years, stream=stream, done=done, members=members)
    except HupdFileError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # OSError: the file itself (EIO, ...)
        raise _corrupt(path, "archive", f"{type(exc).__name__}: {exc}") from exc


_Link = tuple[str, int, str]  # (stream, index, target) of a hard link member


def _resolve_links(
    archive: Path | RemoteArchive,
    wanted: Iterable[_Link],
    links: Iterable[tuple[str, int, str, str]],
    years: Mapping[str, str] | set[str],
    members: Sequence[tarfile.TarInfo] | None = None,
) -> dict[_Link, bytes | None]:
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
        for member in _iter_archive(archive, needed, years, stream=stream, members=members):
            if member.stream != stream:
                continue
            if member.index in at:
                result[(stream, member.index, at[member.index])] = content.get(at[member.index])
            if member.key in needed:
                content[member.key] = content.get(member.link) if member.link is not None else member.data
    return result
