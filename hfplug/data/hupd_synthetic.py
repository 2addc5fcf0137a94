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
the IPC subclass.

Everything is drawn from one ``random.Random(seed)`` and written with fixed timestamps and
owners, so the same arguments give byte-identical files on every run and machine.

Command line (writes the committed Quickstart sample, for instance)::

    python -m hfplug.data.hupd_synthetic OUT_DIR --n-records 400 --seed 0
    python -m hfplug.data.hupd_synthetic OUT_DIR --n-records 4000 --description-words 4000 10000  # ~55 MB
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from hfplug.data.hupd_splits import to_filing_dates

__all__ = [
    "DECISIONS",
    "FILE_NAMES",
    "HardLink",
    "HupdSampleFiles",
    "IPC_SUBCLASSES",
    "make_records",
    "metadata_frame",
    "write_hupd_files",
    "write_hupd_sample",
]

# Real decision counts over all years (reference.md) used as sampling weights.
DECISIONS: dict[str, int] = {
    "ACCEPTED": 1_827_571,
    "REJECTED": 1_074_665,
    "CONT-ACCEPTED": 653_519,
    "PENDING": 486_181,
    "CONT-REJECTED": 286_937,
    "CONT-PENDING": 189_381,
}

# IPC subclass -> (main groups, USPC class, topic vocabulary). The topic words are what
# makes the subclass predictable from the text.
IPC_SUBCLASSES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "G06F": (
        ("17/30", "3/0484", "9/455", "21/62", "16/245"),
        "707",
        ("processor", "memory", "database", "query", "cache", "index", "software", "compiler",
         "thread", "virtual", "storage", "file", "kernel", "instruction", "register", "buffer"),
    ),
    "H04L": (
        ("29/06", "12/28", "9/32", "5/00", "67/10"),
        "709",
        ("packet", "network", "protocol", "router", "bandwidth", "latency", "encryption", "node",
         "channel", "transmission", "header", "session", "gateway", "switch", "frame", "payload"),
    ),
    "H01L": (
        ("21/02", "27/12", "29/78", "23/48", "33/00"),
        "257",
        ("wafer", "transistor", "substrate", "dielectric", "gate", "silicon", "doping", "etching",
         "electrode", "semiconductor", "oxide", "trench", "epitaxial", "contact", "diode", "junction"),
    ),
    "A61K": (
        ("31/4439", "9/00", "39/395", "38/17", "47/10"),
        "514",
        ("compound", "dosage", "formulation", "tablet", "excipient", "antibody", "peptide", "oral",
         "pharmaceutical", "salt", "solvent", "administration", "therapeutic", "inhibitor",
         "emulsion", "capsule"),
    ),
    "A61B": (
        ("5/00", "17/34", "8/08", "1/00", "6/03"),
        "600",
        ("catheter", "patient", "imaging", "probe", "endoscope", "ultrasound", "tissue", "incision",
         "monitor", "heart", "blood", "vessel", "surgical", "needle", "biopsy", "implant"),
    ),
    "B65D": (
        ("81/32", "25/20", "43/16", "5/42", "77/04"),
        "206",
        ("container", "lid", "bottle", "closure", "carton", "package", "tray", "flap", "seal",
         "cap", "pouch", "hinge", "sleeve", "liner", "spout", "cardboard"),
    ),
    "G01N": (
        ("33/53", "21/64", "27/327", "35/00", "1/28"),
        "436",
        ("sample", "assay", "reagent", "fluorescence", "analyte", "sensor", "chamber", "spectrum",
         "detector", "concentration", "specimen", "cuvette", "antigen", "calibration", "optical",
         "chromatography"),
    ),
    "B60W": (
        ("30/09", "10/06", "50/14", "40/10", "20/00"),
        "701",
        ("vehicle", "driver", "engine", "brake", "steering", "torque", "wheel", "speed", "battery",
         "motor", "lane", "throttle", "gearbox", "axle", "acceleration", "cruise"),
    ),
}

# Disjoint marker vocabularies: the ACCEPTED/REJECTED signal. Neither list shares a word
# with the filler or the topic vocabularies.
ACCEPT_MARKERS = ("streamlined", "synergistic", "adaptive", "unexpectedly", "hybrid",
                  "optimized", "scalable", "resilient")
REJECT_MARKERS = ("conventional", "generic", "routine", "ordinary", "typical", "customary",
                  "rudimentary", "commonplace")
SIGNAL_RATE = 0.95  # share of records whose markers agree with their decision (the rest: label noise)

_FILLER = (
    "a", "the", "method", "system", "apparatus", "device", "comprising", "including",
    "configured", "to", "wherein", "at", "least", "one", "first", "second", "plurality", "of",
    "based", "on", "each", "in", "response", "determining", "receiving", "providing",
    "generating", "unit", "module", "portion", "member", "surface", "said", "such", "that",
    "and", "or", "for", "with", "by", "may", "is", "are", "an", "embodiment", "disclosed",
    "herein", "further", "corresponding", "associated", "control", "signal", "data", "value",
    "predetermined", "position", "structure", "element", "process", "operation", "respective",
    "coupled", "connected", "between", "within", "via", "output", "input", "set", "mode",
)
_TITLE_NOUNS = ("system", "method", "apparatus", "device", "assembly", "arrangement")
_LAST_NAMES = ("Smith", "Johnson", "Lee", "Garcia", "Chen", "Mueller", "Tanaka", "Patel",
               "Kim", "Nguyen", "Brown", "Rossi", "Novak", "Silva", "Cohen", "Okafor")
_FIRST_NAMES = ("James", "Maria", "Wei", "Anna", "David", "Yuki", "Priya", "Carlos", "Olga",
                "John", "Fatima", "Lars", "Min", "Sara", "Tom", "Elena")
_CITIES = (("San Jose", "CA", "US"), ("Austin", "TX", "US"), ("Boston", "MA", "US"),
           ("Seattle", "WA", "US"), ("Munich", None, "DE"), ("Tokyo", None, "JP"),
           ("Seoul", None, "KR"), ("Raleigh", "NC", "US"))

# Fixed tar member metadata so archives are byte-identical across runs: 2022-02-22, the
# date of the real HUPD files.
_MEMBER_MTIME = 1645488000
_TOPIC_COPIES = 2  # 70 filler words + 2 x 16 topic words: ~30% of prose is topic words


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
# Records
# ---------------------------------------------------------------------------------------


def make_records(
    n_records: int,
    *,
    seed: int = 0,
    start_date: str = "2016-01-01",
    end_date: str = "2016-02-01",
    description_words: tuple[int, int] = (300, 900),
    claims_words: tuple[int, int] = (120, 400),
    background_words: tuple[int, int] = (60, 200),
    summary_words: tuple[int, int] = (60, 200),
    abstract_words: tuple[int, int] = (50, 250),
    null_section_rate: float = 0.03,
) -> list[dict[str, Any]]:
    """Make ``n_records`` HUPD JSON records (dicts with the full real schema).

    Filing dates are uniform over ``[start_date, end_date)`` (``YYYY-MM-DD``, end exclusive).
    Each ``*_words`` pair is the inclusive (min, max) word count of that section; raise
    ``description_words`` to make big archives (the detailed description is most of a real
    record). With ``n_records >= 6`` all six decisions occur. ``null_section_rate`` is the
    chance that background or summary is null, as happens in the real data.
    """
    if n_records < 0:
        raise ValueError(f"n_records must be >= 0, got {n_records}")
    start, end = _parse_day(start_date, "start_date"), _parse_day(end_date, "end_date")
    if end <= start:
        raise ValueError(f"end_date ({end_date}) must be after start_date ({start_date})")
    for name, (low, high) in [("description_words", description_words), ("claims_words", claims_words),
                              ("background_words", background_words), ("summary_words", summary_words),
                              ("abstract_words", abstract_words)]:
        if not 1 <= low <= high:
            raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(low, high)}")

    rng = random.Random(seed)
    numbers = rng.sample(range(14_000_000, 16_000_000), n_records)
    decisions = rng.choices(list(DECISIONS), weights=list(DECISIONS.values()), k=n_records)
    # Guarantee every decision appears; archive order is by application number, so these
    # forced records end up spread through the archive anyway.
    for i, decision in enumerate(list(DECISIONS)[: min(n_records, len(DECISIONS))]):
        decisions[i] = decision
    span = (end - start).days
    sizes = {"description": description_words, "claims": claims_words, "background": background_words,
             "summary": summary_words, "abstract": abstract_words}
    return [
        _make_record(rng, str(number), decision, start + dt.timedelta(days=rng.randrange(span)),
                     sizes, null_section_rate)
        for number, decision in zip(numbers, decisions)
    ]


def _parse_day(value: str, name: str) -> dt.date:
    """Parse ``YYYY-MM-DD`` or raise a ValueError naming the argument."""
    try:
        return dt.datetime.strptime(value, "%Y-%m-%d").date()
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a date in YYYY-MM-DD format, got {value!r}") from None


def _marker_side(rng: random.Random, decision: str) -> tuple[str, ...]:
    """Marker vocabulary for one record: its decision's side with prob SIGNAL_RATE."""
    if decision.endswith("ACCEPTED"):
        own, other = ACCEPT_MARKERS, REJECT_MARKERS
    elif decision.endswith("REJECTED"):
        own, other = REJECT_MARKERS, ACCEPT_MARKERS
    else:  # pending applications have no label; give them either side at random
        return rng.choice((ACCEPT_MARKERS, REJECT_MARKERS))
    return own if rng.random() < SIGNAL_RATE else other


def _make_record(rng: random.Random, number: str, decision: str, filed: dt.date,
                 sizes: Mapping[str, tuple[int, int]], null_rate: float) -> dict[str, Any]:
    """One record with the full HUPD JSON schema, keys in the real files' order."""
    subclass = rng.choice(list(IPC_SUBCLASSES))
    groups, uspc_class, topic = IPC_SUBCLASSES[subclass]
    ipcr = [subclass + g for g in rng.sample(groups, rng.randint(1, 3))]
    cpc = [label + f"{rng.randrange(100):02d}" for label in ipcr]
    markers = _marker_side(rng, decision)
    accepted = decision.endswith("ACCEPTED")
    rejected = decision.endswith("REJECTED")

    def words(section: str) -> int:
        return rng.randint(*sizes[section])

    title_topic = rng.sample(topic, 2)
    title = f"{rng.choice(markers).capitalize()} {title_topic[0]} {title_topic[1]} {rng.choice(_TITLE_NOUNS)}"
    abstract = _prose(rng, words("abstract"), topic, [rng.choice(markers) for _ in range(3)])
    background = None if rng.random() < null_rate else _prose(rng, words("background"), topic)
    summary = None if rng.random() < null_rate else _prose(rng, words("summary"), topic)
    detail = _prose(rng, words("description"), topic, paragraph=6)
    full_description = "\n\n".join(
        part for part in ("BACKGROUND", background, "SUMMARY", summary, "DETAILED DESCRIPTION", detail)
        if part
    )
    examiner = rng.randrange(len(_LAST_NAMES))
    return {
        "application_number": number,
        "publication_number": f"US{filed.year + 1}0{rng.randrange(100000, 999999)}A1",
        "title": title,
        "decision": decision,
        "date_produced": _yyyymmdd(filed + dt.timedelta(days=rng.randint(520, 560))),
        "date_published": _yyyymmdd(filed + dt.timedelta(days=rng.randint(540, 560))),
        "main_cpc_label": cpc[0],
        "cpc_labels": cpc,
        "main_ipcr_label": ipcr[0],
        "ipcr_labels": ipcr,
        "patent_number": str(rng.randrange(9_500_000, 10_400_000)) if accepted else None,
        "filing_date": _yyyymmdd(filed),
        "patent_issue_date": _yyyymmdd(filed + dt.timedelta(days=rng.randint(500, 1400))) if accepted else None,
        "abandon_date": _yyyymmdd(filed + dt.timedelta(days=rng.randint(600, 1500))) if rejected else None,
        "uspc_class": uspc_class,
        "uspc_subclass": f"{rng.randrange(1000):03d}000",
        "examiner_id": str(rng.randrange(60000, 100000)),
        "examiner_name_last": _LAST_NAMES[examiner],
        "examiner_name_first": rng.choice(_FIRST_NAMES),
        "examiner_name_middle": rng.choice(("A", "B", "J", None)),
        "inventor_list": [_inventor(rng) for _ in range(rng.randint(1, 4))],
        "abstract": abstract,
        "claims": _claims(rng, words("claims"), topic),
        "background": background,
        "summary": summary,
        "full_description": full_description,
    }


def _inventor(rng: random.Random) -> dict[str, Any]:
    city, state, country = rng.choice(_CITIES)
    return {
        "inventor_name_last": rng.choice(_LAST_NAMES),
        "inventor_name_first": rng.choice(_FIRST_NAMES),
        "inventor_city": city,
        "inventor_state": state,
        "inventor_country": country,
    }


def _yyyymmdd(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _word_list(rng: random.Random, n_words: int, topic: Sequence[str]) -> list[str]:
    """``n_words`` words, about a third of them topic words.

    The topic words are listed twice in the population instead of weighting them:
    unweighted ``choices`` is twice as fast, which matters for the benchmark's big archives.
    """
    return rng.choices(_FILLER + tuple(topic) * _TOPIC_COPIES, k=n_words)


def _prose(rng: random.Random, n_words: int, topic: Sequence[str], markers: Sequence[str] = (),
           paragraph: int = 0) -> str:
    """Sentences of exactly ``n_words`` words; ``markers`` replace words at random positions.

    ``paragraph`` > 0 starts a new paragraph every that many sentences.
    """
    words = _word_list(rng, n_words, topic)
    for marker in markers:
        words[rng.randrange(n_words)] = marker
    sentences, i = [], 0
    while i < n_words:
        chunk = words[i : i + rng.randint(10, 25)]
        i += len(chunk)
        sentences.append(chunk[0].capitalize() + (" " + " ".join(chunk[1:]) if len(chunk) > 1 else "") + ".")
    if paragraph <= 0:
        return " ".join(sentences)
    return "\n\n".join(" ".join(sentences[j : j + paragraph]) for j in range(0, len(sentences), paragraph))


def _claims(rng: random.Random, n_words: int, topic: Sequence[str]) -> str:
    """Numbered claims, an independent one first, then dependent ones, ~``n_words`` words."""
    noun = rng.choice(_TITLE_NOUNS)
    claims, used, number = [], 0, 1
    while used < n_words:
        body_words = min(rng.randint(15, 45), max(n_words - used, 5))
        body = " ".join(_word_list(rng, body_words, topic))
        if number == 1:
            claims.append(f"1. A {rng.choice(topic)} {noun} comprising: {body}.")
        else:
            claims.append(f"{number}. The {noun} of claim {rng.randint(1, number - 1)}, wherein {body}.")
        used += body_words
        number += 1
    return " ".join(claims)


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


METADATA_COLUMNS = (
    "application_number", "filing_date", "decision", "main_ipcr_label", "main_cpc_label",
    "patent_number", "examiner_id", "examiner_art_unit", "small_entity_indicator",
    "continuation", "uspc_class", "title",
)


def metadata_frame(records: Iterable[Mapping[str, Any]],
                   extra_rows: Iterable[Mapping[str, Any]] = ()) -> pd.DataFrame:
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


def _write_all_years(archive_path: Path, by_year: Mapping[str, list[tuple[str, bytes | HardLink | None]]],
                     outer_extras: list[tuple[str, bytes | HardLink | None]]) -> None:
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
    records = make_records(n_records, seed=seed, start_date=start_date, end_date=end_date,
                           description_words=description_words, **record_options)
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
    parser.add_argument("--description-words", type=int, nargs=2, default=(300, 900), metavar=("MIN", "MAX"),
                        help="words in each detailed description (real ones run to thousands)")
    args = parser.parse_args(argv)
    files = write_hupd_sample(args.out_dir, n_records=args.n_records, seed=args.seed, layout=args.layout,
                              start_date=args.start_date, end_date=args.end_date,
                              description_words=tuple(args.description_words))
    for path in (files.metadata_path, files.archive_path):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    _main()
