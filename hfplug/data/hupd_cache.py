"""The HUPD Arrow cache: where one lives, its key, and finding, reusing and opening a complete one.

A cache is a folder under ``hupd_cache_dir`` named ``<hupd_config>-<key>`` (every field) or
``<hupd_config>-<key>-<columns hash>``, holding ``train.arrow``, ``validation.arrow`` and an
info file. The cache key covers the arguments, the input files' identity and the stored
columns; a load of fewer columns reuses a complete cache of the same selection that holds
them all. A cache is complete or absent: building one is :mod:`~hfplug.data.hupd_build`'s job.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from hfplug.data.hupd_records import FEATURES, dataset_info
from hfplug.data.hupd_remote import RemoteArchive

__all__ = ["CACHE_VERSION", "HupdCacheError"]

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name

_SPLITS = ("train", "validation")
# Bump when the cached Arrow content changes for the same inputs. 2: upstream row order,
# repeated metadata rows kept, exact paths, last copy of a repeated member, hard links.
CACHE_VERSION = 2
_INFO_FILE = "hfplug_hupd.json"


class HupdCacheError(OSError):
    """The HUPD Arrow cache could not be written (full disk, no permission, ...).

    The message names the cache folder and, for a full disk, about how much room the build
    needs there. The scratch folder is removed and any earlier cache is left as it was.
    """

    def __reduce__(self):  # errno survives the trip back from a worker process
        return type(self), self.args, {"errno": self.errno}


def _file_identity(path: Path | RemoteArchive) -> list[Any]:
    """What makes an input file "the same": path, size and modification time; on the Hub, its URL at a commit."""
    if not isinstance(path, Path):
        return [str(path)]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_key(
    hupd_config: str, selection: Mapping[str, Any], metadata_file: Path, archive_file: Path | RemoteArchive
) -> str:
    """The key of a selection: the arguments that choose the rows, and the input files' identity."""
    payload = {
        "version": CACHE_VERSION,
        "name": hupd_config,  # the key's old name: caches built before the rename stay valid
        "selection": dict(selection),
        "metadata": _file_identity(metadata_file),
        "archive": _file_identity(archive_file),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _cache_name(base: str, columns: tuple[str, ...] | None) -> str:
    """The cache folder of a selection (``base``: ``<hupd_config>-<key>``) with ``columns`` stored.

    Every field: ``base`` itself (the name caches had before ``columns``). Fewer: ``base-<hash of
    the columns>``.
    """
    if columns is None:
        return base
    return f"{base}-{hashlib.sha256(json.dumps(list(columns)).encode()).hexdigest()[:8]}"


def _stored(target: Path) -> tuple[str, ...] | None:
    """The columns a complete cache holds (None: every field; caches before ``columns`` hold all)."""
    try:
        columns = json.loads((target / _INFO_FILE).read_text()).get("columns")
    except (OSError, ValueError, AttributeError):
        return None
    return None if columns is None or set(columns) == set(FEATURES) else tuple(columns)


def _find_cache(root: Path, base: str, columns: tuple[str, ...] | None) -> Path | None:
    """A complete cache of the selection ``base`` that holds ``columns``: the exact one, else the smallest
    that holds them all (the rows and their values do not depend on which columns a cache holds)."""
    exact = root / _cache_name(base, columns)
    if _is_complete_cache(exact):
        return exact
    if columns is None:
        return None
    candidates = [root / base, *sorted(root.glob(f"{glob.escape(base)}-*"))]
    holding = []
    for candidate in candidates:
        if _is_complete_cache(candidate):
            stored = _stored(candidate)
            if stored is None or set(columns) <= set(stored):
                holding.append((len(stored or FEATURES), candidate))
    return min(holding, key=lambda pair: pair[0])[1] if holding else None


def _is_complete_cache(target: Path) -> bool:
    """A cache dir is complete when its info file lists split files that all exist."""
    try:
        info = json.loads((target / _INFO_FILE).read_text())
        return all((target / f"{split}.arrow").is_file() for split in info["num_examples"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _log_cached_skips(target: Path) -> None:
    """Repeat the skip warning stored when the cache was built (the archive is not read again)."""
    try:
        message = json.loads((target / _INFO_FILE).read_text()).get("skip_message")
    except (OSError, ValueError, AttributeError):
        return
    if message:
        logger.warning("HUPD (cached in %s): %s", target, message)


def _open_cache(target: Path, columns: tuple[str, ...] | None = None) -> datasets.DatasetDict:
    """The splits of a complete cache, with only ``columns`` if it holds more (no copy: a view of its files)."""
    stored = _stored(target)
    result = datasets.DatasetDict()
    for split in _SPLITS:
        dataset = datasets.Dataset.from_file(
            str(target / f"{split}.arrow"), info=dataset_info(stored), split=datasets.NamedSplit(split)
        )
        result[split] = dataset if columns == stored else dataset.select_columns(list(columns or FEATURES))
        logger.info("HUPD %s split: %d examples", split, result[split].num_rows)
    return result
