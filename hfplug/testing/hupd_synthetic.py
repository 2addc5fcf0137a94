"""Deterministic synthetic data in the exact file layout of HUPD (Harvard USPTO Patent Dataset).

The real dataset is hundreds of megabytes (sample) to 56 GB (all years), so tests,
benchmarks and the Quickstart use files made here instead. They have the same shape
as the files on the ``HUPD/hupd`` Hub repo:

* a feather metadata file (one row per application; ``filing_date`` is datetime64);
* layout ``"sample"``: a ``.tar.gz`` whose members are ``sample/<year>/<application_number>.json``;
* layout ``"all"``: an uncompressed ``.tar`` holding one ``data/<year>.tar.gz`` per year, whose
  members are ``<year>/<application_number>.json`` (so they unpack into ``data/<year>/``).

Every JSON record has the full real schema. The text carries a learnable signal so a tiny
model trained on it visibly learns: marker words from two disjoint vocabularies predict
ACCEPTED vs REJECTED in ~95% of records (the rest are label noise), and topic words predict
the IPC subclass. The records are made in :mod:`hfplug.testing.hupd_synthetic_records` from the
words in :mod:`hfplug.testing.hupd_synthetic_vocab`; this module writes them as files (their names
are re-exported here).

Everything is drawn from one ``random.Random(seed)`` and written with fixed timestamps and
owners, so the same arguments give byte-identical files on every run and machine.

Command line (writes the committed Quickstart sample, for instance)::

    python -m hfplug.testing.hupd_synthetic OUT_DIR --n-records 400 --seed 0
    python -m hfplug.testing.hupd_synthetic OUT_DIR --n-records 4000 --description-words 4000 10000  # ~55 MB
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from hfplug.data.hupd_selection import to_filing_dates
from hfplug.testing.hupd_synthetic_records import make_records
from hfplug.testing.hupd_synthetic_vocab import ACCEPT_MARKERS, DECISIONS, IPC_SUBCLASSES, REJECT_MARKERS

__all__ = [
    "ACCEPT_MARKERS",
    "DECISIONS",
    "FILE_NAMES",
    "HardLink",
    "HupdSampleFiles",
    "IPC_SUBCLASSES",
    "REJECT_MARKERS",
    "make_records",
    "metadata_frame",
    "write_hupd_files",
    "write_hupd_sample",
]

# Fixed tar member metadata so archives are byte-identical across runs: 2022-02-22, the
# date of the real HUPD files.
_MEMBER_MTIME = 1645488000


@dataclasses.dataclass(frozen=True)
class HardLink:
    """An ``extra_members`` payload that makes a hard link member pointing at ``target`` (a member name)."""

    target: str


@dataclasses.dataclass(frozen=True)
class HupdSampleFiles:
    """Paths of a generated metadata/archive pair, as returned by :func:`write_hupd_sample`."""

    metadata_path: Path
    archive_path: Path
    n_records: int
    layout: str


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


METADATA_COLUMNS = (
    "application_number",
    "filing_date",
    "decision",
    "main_ipcr_label",
    "main_cpc_label",
    "patent_number",
    "examiner_id",
    "examiner_art_unit",
    "small_entity_indicator",
    "continuation",
    "uspc_class",
    "title",
)


def metadata_frame(records: Iterable[Mapping[str, Any]], extra_rows: Iterable[Mapping[str, Any]] = ()) -> pd.DataFrame:
    """The metadata DataFrame HUPD ships for ``records`` (plus hand-made ``extra_rows``).

    ``filing_date`` becomes datetime64 (as in the real feather); columns the JSON lacks
    (art unit, entity size, continuation flag) are derived deterministically.
    """
    rows = [_metadata_row(r) for r in records]
    for extra in extra_rows:
        row = dict.fromkeys(METADATA_COLUMNS)
        row.update(extra)
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(dict.fromkeys([*METADATA_COLUMNS, *(k for r in rows for k in r)])))
    # Arrow needs one type per column; hand-made records may hold e.g. an int examiner_id.
    for column in df.columns:
        if column not in ("filing_date", "continuation") and df[column].dtype == object:
            df[column] = [None if pd.isna(v) else str(v) for v in df[column]]
    df["filing_date"] = _metadata_dates(df["filing_date"])
    return df


def _metadata_dates(column: pd.Series) -> pd.Series:
    """The records' ``YYYYMMDD`` and hand-written ``YYYY-MM-DD`` dates as datetime64.

    Nanoseconds, as in the real feather, when every date fits that unit's range (1677-2262);
    a hostile test's date outside it keeps a coarser unit instead of becoming NaT, so the
    loader sees the out-of-range date itself. Anything that is not a date becomes NaT.
    """
    dates = to_filing_dates(column.astype(object))
    try:
        return dates.astype("datetime64[ns]")
    except (OverflowError, ValueError):  # pandas' OutOfBoundsDatetime is a ValueError
        return dates


def _metadata_row(record: Mapping[str, Any]) -> dict[str, Any]:
    number = str(record.get("application_number"))
    decision = record.get("decision")
    examiner_id = record.get("examiner_id")
    digits = int(number) if number.isdigit() else 0
    return {
        "application_number": number,
        "filing_date": record.get("filing_date"),
        "decision": decision,
        "main_ipcr_label": record.get("main_ipcr_label"),
        "main_cpc_label": record.get("main_cpc_label"),
        "patent_number": record.get("patent_number"),
        "examiner_id": examiner_id,
        "examiner_art_unit": f"{2100 + digits % 900}",
        "small_entity_indicator": "SMALL" if digits % 3 == 0 else "UNDISCOUNTED",
        "continuation": int(str(decision).startswith("CONT-")),
        "uspc_class": record.get("uspc_class"),
        "title": record.get("title"),
    }


def write_hupd_files(
    records: Sequence[Mapping[str, Any]],
    metadata_path: str | os.PathLike,
    archive_path: str | os.PathLike,
    *,
    layout: str = "sample",
    year_dir: str | None = None,
    omit_json_for: Iterable[str] = (),
    extra_members: Iterable[tuple[str, bytes | HardLink | None]] = (),
    metadata_extra_rows: Iterable[Mapping[str, Any]] = (),
) -> None:
    """Write ``records`` as a HUPD metadata feather plus archive (low level; tests craft edge cases).

    Args:
        records: JSON-able dicts; each needs ``application_number`` and ``filing_date`` (``YYYYMMDD``).
        layout: ``"sample"`` (``.tar.gz`` of ``sample/<year>/<number>.json``) or ``"all"``
            (uncompressed ``.tar`` of ``data/<year>.tar.gz``, each holding ``<year>/<number>.json``).
        year_dir: folder name used for every record instead of its filing year (to place
            records where the official loader would not look).
        omit_json_for: application numbers that stay in the metadata but get no JSON member.
        extra_members: ``(name, data)`` junk to add: ``data`` bytes makes a file, ``None`` a
            directory, a :class:`HardLink` a hard link. With layout ``"all"`` a name under
            ``<year>/`` of a written year goes into that year's tarball, any other name into
            the outer tar. Members are written sorted by name; members of the same name keep
            their order (a later one is a second copy of that path).
        metadata_extra_rows: metadata rows (dicts, missing columns are null) with no record.
    """
    if layout not in ("sample", "all"):
        raise ValueError(f"layout must be 'sample' or 'all', got {layout!r}")
    metadata_path, archive_path = Path(metadata_path), Path(archive_path)
    metadata_path.parent.mkdir(parents=True, exist_ok=True)
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    metadata_frame(records, metadata_extra_rows).to_feather(metadata_path)

    omitted = {str(n) for n in omit_json_for}
    by_year: dict[str, list[tuple[str, bytes | None]]] = {}
    for record in records:
        number = str(record["application_number"])
        if number in omitted:
            continue
        year = year_dir or str(record["filing_date"])[:4]
        payload = json.dumps(record, ensure_ascii=False).encode("utf-8")
        by_year.setdefault(year, []).append((f"{year}/{number}.json", payload))
    outer_extras: list[tuple[str, bytes | HardLink | None]] = []  # layout "sample": all go into the one tarball
    for name, data in extra_members:
        year = name.split("/", 1)[0]
        if layout == "all" and "/" in name and year in by_year:
            by_year[year].append((name, data))
        else:
            outer_extras.append((name, data))

    if layout == "sample":
        members = [("sample", None)]
        for year, entries in by_year.items():
            members.append((f"sample/{year}", None))
            members += [(f"sample/{name}", data) for name, data in entries]
        members += outer_extras
        with open(archive_path, "wb") as raw:
            _write_tar_gz(raw, members)
    else:
        _write_all_years(archive_path, by_year, outer_extras)


def _write_all_years(
    archive_path: Path,
    by_year: Mapping[str, list[tuple[str, bytes | HardLink | None]]],
    outer_extras: list[tuple[str, bytes | HardLink | None]],
) -> None:
    """The ``all-years.tar`` layout (``data/<year>.tar.gz``); each year is spooled to a temp file, not RAM."""
    with open(archive_path, "wb") as raw, tarfile.open(fileobj=raw, mode="w|", format=tarfile.GNU_FORMAT) as outer:
        entries = [("data", None)] + [(f"data/{year}.tar.gz", year) for year in by_year] + list(outer_extras)
        for name, item in sorted(entries, key=lambda e: e[0]):
            if name.endswith(".tar.gz") and isinstance(item, str) and item in by_year:
                year = item
                with tempfile.TemporaryFile(dir=archive_path.parent) as spool:
                    _write_tar_gz(spool, [(year, None), *by_year[year]])
                    size = spool.tell()
                    spool.seek(0)
                    outer.addfile(_tarinfo(name, size), spool)
            else:
                _add_member(outer, name, item)


def _write_tar_gz(raw: io.RawIOBase | Any, members: Sequence[tuple[str, bytes | HardLink | None]]) -> None:
    """Write a gzipped tar of ``members`` sorted by name (gzip mtime 0, no file name: reproducible)."""
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for name, data in sorted(members, key=lambda m: m[0]):
                _add_member(tar, name, data)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes | HardLink | None) -> None:
    if data is None:
        tar.addfile(_tarinfo(name, 0, directory=True))
    elif isinstance(data, HardLink):
        info = _tarinfo(name, 0)
        info.type, info.linkname = tarfile.LNKTYPE, data.target
        tar.addfile(info)
    else:
        tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _tarinfo(name: str, size: int, directory: bool = False) -> tarfile.TarInfo:
    """A member header with fixed owner, mode and mtime (reproducible archives)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MEMBER_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


# layout -> (metadata, archive) file names as on the Hub, so a generated pair can stand in for the real one.
FILE_NAMES = {
    "sample": ("hupd_metadata_jan16_2022-02-22.feather", "sample-jan-2016.tar.gz"),
    "all": ("hupd_metadata_2022-02-22.feather", "all-years.tar"),
}


def write_hupd_sample(
    out_dir: str | os.PathLike,
    *,
    n_records: int = 400,
    seed: int = 0,
    layout: str = "sample",
    start_date: str = "2016-01-01",
    end_date: str = "2016-02-01",
    description_words: tuple[int, int] = (300, 900),
    **record_options: Any,
) -> HupdSampleFiles:
    """Generate ``n_records`` records and write them under ``out_dir`` with the Hub's file names.

    ``"sample"`` writes ``hupd_metadata_jan16_2022-02-22.feather`` + ``sample-jan-2016.tar.gz``;
    ``"all"`` writes ``hupd_metadata_2022-02-22.feather`` + ``all-years.tar``. Other keyword
    arguments go to :func:`make_records`. The defaults give ~1.5 MB of archive.
    """
    if layout not in FILE_NAMES:
        raise ValueError(f"layout must be 'sample' or 'all', got {layout!r}")
    out_dir = Path(out_dir)
    records = make_records(
        n_records,
        seed=seed,
        start_date=start_date,
        end_date=end_date,
        description_words=description_words,
        **record_options,
    )
    metadata_name, archive_name = FILE_NAMES[layout]
    files = HupdSampleFiles(out_dir / metadata_name, out_dir / archive_name, len(records), layout)
    write_hupd_files(records, files.metadata_path, files.archive_path, layout=layout)
    return files


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic HUPD metadata feather + archive.")
    parser.add_argument("out_dir")
    parser.add_argument("--n-records", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=sorted(FILE_NAMES), default="sample")
    parser.add_argument("--start-date", default="2016-01-01")
    parser.add_argument("--end-date", default="2016-02-01", help="exclusive")
    parser.add_argument(
        "--description-words",
        type=int,
        nargs=2,
        default=(300, 900),
        metavar=("MIN", "MAX"),
        help="words in each detailed description (real ones run to thousands)",
    )
    args = parser.parse_args(argv)
    files = write_hupd_sample(
        args.out_dir,
        n_records=args.n_records,
        seed=args.seed,
        layout=args.layout,
        start_date=args.start_date,
        end_date=args.end_date,
        description_words=tuple(args.description_words),
    )
    for path in (files.metadata_path, files.archive_path):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    _main()
