"""HUPD's input files: which Hub files each config reads, and where they come from.

A path given to :func:`~hfplug.data.hupd.load_hupd` is checked; a file left unset is
downloaded from the ``HUPD/hupd`` dataset repo into the Hub cache, except ``all``'s 56 GB
archive, which stays on the Hub and is read by range requests
(:class:`~hfplug.data.hupd_remote.RemoteArchive`) unless the Hub cache already holds it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from hfplug.data.hupd_remote import RangesUnsupported, RemoteArchive

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name

HUB_REPO_ID = "HUPD/hupd"
# config name -> (metadata file, archive file) in the HUPD/hupd dataset repo
HUB_FILES: dict[str, tuple[str, str]] = {
    "sample": ("hupd_metadata_jan16_2022-02-22.feather", "data/sample-jan-2016.tar.gz"),
    "all": ("hupd_metadata_2022-02-22.feather", "data/all-years.tar"),
}


def _resolve_files(
    hupd_config: str,
    hupd_metadata_path: str | os.PathLike | None,
    hupd_archive_path: str | os.PathLike | None,
    token: str | bool | None,
) -> tuple[Path, Path | RemoteArchive]:
    """The metadata and the archive: given paths are checked, other files downloaded.

    ``all``'s archive, unless given, stays on the Hub (see :func:`_hub_archive`).
    """
    hub_metadata, hub_archive = HUB_FILES[hupd_config]
    resolved = []
    for given, hub_name, what, argument in (
        (hupd_metadata_path, hub_metadata, "metadata", "hupd_metadata_path"),
        (hupd_archive_path, hub_archive, "archive", "hupd_archive_path"),
    ):
        if given is None:
            if what == "archive" and hupd_config == "all":  # left on the Hub: only the needed years are fetched
                resolved.append(_hub_archive(hub_name, resolved[0], token))
            else:
                resolved.append(_download(hub_name, token))
            continue
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"HUPD {what} file not found: {path}. Pass {argument}= the local copy of "
                f"{hub_name!r} from the {HUB_REPO_ID} dataset repo, or leave {argument} unset "
                "to download it from the Hub."
            )
        resolved.append(path)
    return resolved[0], resolved[1]


def _download(filename: str, token: str | bool | None, revision: str | None = None) -> Path:
    """Fetch one file of HUPD/hupd into the Hub cache (a no-op when it is already there)."""
    from huggingface_hub import hf_hub_download

    logger.info("Fetching %s from the %s dataset repo (Hub cache)", filename, HUB_REPO_ID)
    try:
        return Path(
            hf_hub_download(
                repo_id=HUB_REPO_ID, repo_type="dataset", filename=filename, revision=revision, token=token
            )
        )
    except Exception as exc:
        exc.add_note(
            f"hfplug could not fetch {filename!r} from the {HUB_REPO_ID} dataset repo. Check the network "
            "(or, offline, that it is in the Hub cache), or download it yourself and pass "
            "hupd_metadata_path=/hupd_archive_path= to load_hupd (--hupd_metadata_path/--hupd_archive_path)."
        )
        raise


def _hub_archive(filename: str, metadata_file: Path, token: str | bool | None) -> Path | RemoteArchive:
    """``all``'s archive when no path is given: the Hub cache's copy if it holds one, else the file on the Hub.

    The file on the Hub is read by range requests when a build needs it (:func:`_connect`). It
    is named at the commit the metadata came from, so that a load from the split cache needs
    no network; with metadata given as a path the commit is unknown, and the Hub is asked now.
    """
    from huggingface_hub import try_to_load_from_cache

    parent = metadata_file.parent  # the Hub cache keeps files at snapshots/<commit>/<path>
    commit = parent.name if parent.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parent.name) else None
    cached = try_to_load_from_cache(HUB_REPO_ID, filename, revision=commit, repo_type="dataset")
    if isinstance(cached, str):
        return Path(cached)
    archive = RemoteArchive(HUB_REPO_ID, filename, revision=commit, token=token)
    return archive if commit is not None else _connect(archive, token)


def _connect(archive: Path | RemoteArchive, token: str | bool | None) -> Path | RemoteArchive:
    """Make an archive on the Hub ready to read: found, and checked to answer range requests.

    A server that does not answer them (some proxies and mirrors do not) gets the whole file
    downloaded into the Hub cache instead, with a warning that says why; offline, the Hub
    cache is all there is. A local path is returned as it is.
    """
    from huggingface_hub import constants

    if not isinstance(archive, RemoteArchive) or archive.size is not None:
        return archive
    if constants.is_offline_mode():
        return _download(archive.filename, token, archive.revision)  # the Hub cache's copy, or the error saying so
    try:
        return archive.connect()
    except RangesUnsupported as exc:
        logger.warning(
            "HUPD: %s, so the selected years cannot be fetched on their own; downloading the whole %s "
            "(56 GB for the real HUPD) into the Hub cache instead.",
            exc,
            archive.filename,
        )
        return _download(archive.filename, token, archive.revision)
    except Exception as exc:
        exc.add_note(
            f"hfplug could not reach {archive.filename!r} in the {HUB_REPO_ID} dataset repo. Check the network, "
            "or download it yourself and pass hupd_archive_path= to load_hupd (--hupd_archive_path)."
        )
        raise
