"""What a pass over a HUPD archive looks for, and the one warning about what it left out.

:class:`_Plan` turns the selected metadata rows (each split in upstream's order) into the
archive paths upstream opens; :class:`_SkipReport` counts what a pass could not find,
could not read, or saw twice, and says so in one warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from hfplug.data.hupd_archive import _normalise

logger = logging.getLogger("hfplug.data.hupd")  # one logger for the whole loader: its messages keep their name

_LISTED_MISSING = 10  # application numbers named in the skipped-records warning


@dataclasses.dataclass
class _Plan:
    """What a pass over the archive must find, and in which order each split lists it.

    ``rows``: split -> the archive path (key) of each selected metadata row, in upstream's
    order; a key repeats when a metadata row does (upstream yields such a row twice), and
    None stands for a row without a valid filing date (no path: skipped). ``numbers``: key ->
    application number. ``undated``: application numbers of the rows without a path.
    ``duplicate_rows``: application numbers of rows repeating one already selected for the
    same split. ``years``: filing year of the keys -> which selected dates need it, in words
    (for the error about a year the archive lacks). ``undated_rows``: see :func:`hfplug.data.hupd._select`.
    """

    rows: dict[str, list[str | None]] = dataclasses.field(default_factory=dict)
    numbers: dict[str, str] = dataclasses.field(default_factory=dict)
    undated: dict[str, None] = dataclasses.field(default_factory=dict)
    duplicate_rows: list[str] = dataclasses.field(default_factory=list)
    years: dict[str, str] = dataclasses.field(default_factory=dict)
    undated_rows: int = 0

    @property
    def n_selected(self) -> int:
        """Distinct selected applications (a path, or an undated application number)."""
        return len(self.numbers) + len(self.undated)


def _plan(parts: Iterable[tuple[str, pd.DataFrame]], json_dir: str, *, undated_rows: int = 0) -> _Plan:
    """The :class:`_Plan` for ``(split, metadata rows in upstream's order)`` pairs.

    A row's key is the file upstream opens: ``<json_dir>/<filing year>/<application number>.json``.
    """
    plan = _Plan(undated_rows=undated_rows)
    spans: dict[str, list] = {}  # filing year -> [first date, last date, distinct applications]
    for split, df in parts:
        keys = plan.rows.setdefault(split, [])
        seen: set[Any] = set()
        dates = df["filing_date"].dropna()
        for year, (first, last) in dates.groupby(dates.dt.year).agg(["min", "max"]).iterrows():
            span = spans.setdefault(str(int(year)), [first, last, 0])
            span[0], span[1] = min(span[0], first), max(span[1], last)
        for year, number in zip(df["filing_date"].dt.year, df["application_number"]):
            if pd.isna(year):
                key = None
                plan.undated.setdefault(number)
            else:
                path = f"{json_dir}/{int(year)}/{number}.json"
                key = _normalise(path) or path  # a number that climbs out (``..``) matches no member
                if key not in plan.numbers:
                    plan.numbers[key] = number
                    spans[str(int(year))][2] += 1
            ident = key if key is not None else ("undated", number)
            if ident in seen:
                plan.duplicate_rows.append(number)
            seen.add(ident)
            keys.append(key)
    plan.years = {
        year: f"{n} selected application{'s' if n != 1 else ''} filed {first:%Y-%m-%d} to {last:%Y-%m-%d}"
        for year, (first, last, n) in sorted(spans.items())
    }
    return plan


@dataclasses.dataclass
class _SkipReport:
    """Everything a load left out or repeated, reported in one warning at the end (and kept in the cache).

    Per selected application (a path): ``missing`` (no JSON member), ``undated`` (no valid
    filing date in the metadata, so no path to look for), ``malformed`` (the member is not a
    JSON object). Besides: ``duplicate_rows`` (repeated metadata rows, yielded again as
    upstream does), ``duplicate_members`` (repeated archive paths; the ``copy`` one is used)
    and ``undated_rows`` (metadata rows a date-bounded selection could not place).
    """

    archive: Path
    n_selected: int
    copy: str = "last"
    missing: list[str] = dataclasses.field(default_factory=list)
    undated: list[str] = dataclasses.field(default_factory=list)
    malformed: list[str] = dataclasses.field(default_factory=list)
    duplicate_rows: list[str] = dataclasses.field(default_factory=list)
    duplicate_members: list[str] = dataclasses.field(default_factory=list)
    undated_rows: int = 0

    @classmethod
    def for_plan(cls, archive: Path, plan: _Plan, copy: str = "last") -> _SkipReport:
        return cls(
            archive,
            plan.n_selected,
            copy,
            undated=list(plan.undated),
            duplicate_rows=list(plan.duplicate_rows),
            undated_rows=plan.undated_rows,
        )

    def counts(self) -> dict[str, int]:
        return {
            "selected": self.n_selected,
            "missing": len(self.missing),
            "undated": len(self.undated),
            "malformed": len(self.malformed),
            "duplicate_rows": len(self.duplicate_rows),
            "duplicate_members": len(self.duplicate_members),
            "undated_rows": self.undated_rows,
        }

    def message(self) -> str | None:
        """The warning text, or None when nothing was left out or repeated."""
        parts = []
        skipped = len(self.missing) + len(self.undated) + len(self.malformed)
        if skipped:
            reasons = [
                f"{what} {_listing(numbers)}"
                for what, numbers in (
                    (f"no JSON record in {self.archive} for", self.missing),
                    ("no valid filing date in the metadata (so no JSON path) for", self.undated),
                    ("unreadable JSON for", self.malformed),
                )
                if numbers
            ]
            parts.append(f"{skipped} of {self.n_selected} selected applications skipped: {'; '.join(reasons)}")
        if self.duplicate_rows:
            parts.append(
                f"{len(self.duplicate_rows)} repeated metadata rows yielded again, as the official loader "
                f"does: {_listing(self.duplicate_rows)}"
            )
        if self.duplicate_members:
            parts.append(
                f"{len(self.duplicate_members)} repeated archive members (used the {self.copy} copy of "
                f"each path): {_listing(self.duplicate_members)}"
            )
        if self.undated_rows:
            parts.append(f"{self.undated_rows} metadata rows have no valid filing date, so no date range selects them")
        return ". ".join(parts) or None

    def log(self) -> None:
        message = self.message()
        if message:
            logger.warning("HUPD: %s", message)


def _listing(numbers: list[str]) -> str:
    """``"2 (14999901, 14999902)"``: a count and the first few application numbers."""
    numbers = sorted(numbers)
    more = ", ..." if len(numbers) > _LISTED_MISSING else ""
    return f"{len(numbers)} ({', '.join(numbers[:_LISTED_MISSING])}{more})"
