"""``load_hupd(streaming=True)``: each split read lazily from the archive, in archive order, with no cache."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from hfplug.data.hupd_archive import _iter_archive, _Link, _resolve_links
from hfplug.data.hupd_plan import _Plan, _plan, _SkipReport
from hfplug.data.hupd_records import _example, features_for
from hfplug.data.hupd_remote import RemoteArchive

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name


def _generate_split(
    archive: str | RemoteArchive, plan: _Plan, split: str, columns: tuple[str, ...] | None = None
) -> Iterator[dict[str, Any]]:
    """Examples of one split, read lazily: one pass, one skip warning, per iteration.

    Reordering would mean holding records back, so they come in archive order, each once per
    metadata row naming it; a path stored twice gives its first copy, and the pass stops
    once every path is found. Hard links are read after the pass, so they come last.
    ``archive``: a local path, or the all-years tar on the Hub (only this split's years are fetched).
    ``columns``: the fields yielded (None: all).
    """
    path = archive if isinstance(archive, RemoteArchive) else Path(archive)
    report = _SkipReport.for_plan(path, plan, copy="first")
    times = Counter(key for key in plan.rows[split] if key is not None)
    pending = set(times)
    links: list[tuple[str, int, str, str]] = []
    deferred: list[tuple[str, _Link]] = []
    for member in _iter_archive(path, times, plan.years, done=lambda: not pending):
        if member.link is not None:
            links.append((member.stream, member.index, member.key, member.link))
        if member.key not in times:
            continue
        if member.key not in pending:
            report.duplicate_members.append(plan.numbers[member.key])
            continue
        pending.discard(member.key)
        if member.link is not None:
            deferred.append((member.key, (member.stream, member.index, member.link)))
            continue
        yield from _repeat(plan.numbers[member.key], member.data, times[member.key], report, columns)
    if deferred:
        contents = _resolve_links(path, [link for _, link in deferred], links, plan.years)
        for key, link in deferred:
            if contents.get(link) is None:
                pending.add(key)
            else:
                yield from _repeat(plan.numbers[key], contents[link], times[key], report, columns)
    report.missing = [plan.numbers[key] for key in pending]
    report.log()


def _repeat(
    number: str, data: bytes, times: int, report: _SkipReport, columns: tuple[str, ...] | None
) -> Iterator[dict[str, Any]]:
    example = _example(number, data, columns)
    if example is None:
        report.malformed.append(number)
        return
    for _ in range(times):
        yield example


def streaming_splits(
    splits: Mapping[str, pd.DataFrame],
    undated: int,
    archive_file: Path | RemoteArchive,
    json_dir: str,
    *,
    columns: tuple[str, ...] | None = None,
) -> datasets.IterableDatasetDict:
    """The selected ``splits``, each read lazily from ``archive_file`` on every iteration.

    ``columns`` (from :func:`~hfplug.data.hupd_records.stored_columns`): the fields yielded; None, all.

    What the metadata alone shows (``undated``: rows no date range can select) is reported
    now, once; what the archive shows is reported by each split at the end of each pass over it.
    """
    _SkipReport(archive_file, 0, undated_rows=undated).log()
    result = datasets.IterableDatasetDict()
    for split, df in splits.items():
        plan = _plan([(split, df)], json_dir)
        result[split] = datasets.IterableDataset.from_generator(
            _generate_split,
            features=features_for(columns),
            gen_kwargs={
                "archive": archive_file if isinstance(archive_file, RemoteArchive) else str(archive_file),
                "plan": plan,
                "split": split,
                "columns": columns,
            },
            split=datasets.NamedSplit(split),
        )
        logger.info("HUPD %s split: %d selected applications (streaming)", split, plan.n_selected)
    return result
