"""Hostile HUPD data: whatever the metadata, the records and the archive hold, ``load_hupd``
never crashes, and everything it leaves out is counted and reported in one warning.

The property tests build a metadata feather and an archive member by member (with
``hfplug.testing.hupd_synthetic.write_hupd_files``) from drawn applications: missing keys,
nulls, wrong types, huge or empty sections, non-ASCII, repeated application numbers (in the
metadata and in the archive), malformed and out-of-range dates, non-JSON and non-UTF-8
bytes. Each build is loaded with the Arrow cache and streaming, and compared with a small
simulation of the documented rules:

* a selected metadata row names the path ``sample/<filing year>/<application number>.json``
  (``data/...`` for ``all``); a row without a valid filing date has none (undated, skipped);
* the last archive member with that path is used (extraction overwrites), earlier ones are
  repeats; the whole archive is read, so every repeat is counted;
* a member that is not one JSON object is unreadable (skipped); any object makes an example;
* each split lists its rows in the selection's (upstream's) order, and a row repeating an
  application already selected for the same split is yielded again, as upstream does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hfplug.data.hupd import FEATURES, OFFICIAL_FIELDS, load_hupd, read_metadata
from hfplug.data.hupd_selection import select_splits
from hfplug.testing.hupd_synthetic import make_records, write_hupd_files

SMALL = dict(
    description_words=(5, 10),
    claims_words=(5, 10),
    background_words=(3, 6),
    summary_words=(3, 6),
    abstract_words=(5, 10),
)
BASE = make_records(1, seed=21, **SMALL)[0]  # a complete, valid record to mutate
RECORD_KEYS = sorted(BASE)
# Two valid applications, one per date window, so that every selection is non-empty.
ANCHORS = [
    dict(r, application_number=n, filing_date=d)
    for r, n, d in zip(make_records(2, seed=22, **SMALL), ("13999991", "13999992"), ("20160105", "20160125"))
]
# Few numbers, so that repeats (in the metadata and in the archive) are common.
NUMBERS = ["14000001", "14000002", "14000003", "١٤٠٠٠٠٤", "14 000 005", "Ünïcødé-6", ""]
DATE_SPLIT = dict(
    train_filing_start_date="2016-01-01",
    train_filing_end_date="2016-01-15",
    val_filing_start_date="2016-01-15",
    val_filing_end_date="2016-02-01",
)
MODES = {"uniform": dict(uniform_split=True), "dates": DATE_SPLIT}
JUNK = [
    ("README", b"not a record"),
    ("2016/notes.json.bak", b"junk"),
    ("2016/\udcff\udcfe.json", b"{}"),
    ("2016/dir.json", None),
]  # a non-UTF-8 member name; a directory named like a record
LOGGER = "hfplug.data.hupd"

# --- strategies ---------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
HUGE_TEXT = st.builds(
    lambda char, n: char * n, st.sampled_from(["x", "é", "漢", "🦆", "\x00", " \n"]), st.integers(20_000, 200_000)
)
FIELD_VALUES = st.one_of(JSON_VALUES, st.just(""), HUGE_TEXT)


@st.composite
def records(draw) -> dict:
    """A record with some keys dropped and some values replaced by anything JSON can hold."""
    record = dict(BASE)
    for key in draw(st.sets(st.sampled_from(RECORD_KEYS), max_size=6)):
        del record[key]
    record.update(draw(st.dictionaries(st.sampled_from(RECORD_KEYS), FIELD_VALUES, max_size=4)))
    return record


def _utf8(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


DIRECTORY = None  # a payload of None makes a directory member with the record's name
PAYLOADS = st.one_of(
    records().map(_utf8),
    records().map(lambda r: json.dumps(r).encode("utf-16")),  # valid: json detects UTF-16 by its BOM
    records().map(lambda r: json.dumps(r, ensure_ascii=False).encode("latin-1", "replace")),  # not UTF-8
    st.builds(lambda r, cut: _utf8(r)[: int(len(_utf8(r)) * cut)], records(), st.floats(0, 0.99)),  # truncated
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b"3",
            b'"text"',
            b"{",
            b"\xff\xfe\xfa",
            b"NaN",
            b'{"title": "lone \\ud800 surrogate", "claims": ["\\udfff", 1]}',
        ]
    ),
    st.binary(max_size=40),
    st.just(DIRECTORY),
)
JANUARY_2016 = st.dates(dt.date(2016, 1, 1), dt.date(2016, 1, 31))
METADATA_DATES = st.one_of(  # valid dates in both spellings are half of the draws
    JANUARY_2016.map(lambda d: d.isoformat()),
    JANUARY_2016.map(lambda d: d.strftime("%Y%m%d")),
    st.sampled_from(
        [
            None,
            "",
            "2016-13-45",
            "2016-02-30",
            "yesterday",
            "1600-01-01",
            "2300-06-01",
            "0001-01-01",
            "99999999",
            "2016-01-05T23:00:00+05:00",
            "2016/01/05",
        ]
    ),
    st.integers(-10, 10**9),
    JANUARY_2016,  # date objects, as a hand-made DataFrame may hold
)
LABELS = st.one_of(st.none(), st.sampled_from(["G06F17/30", "H04L29/06", "", "ééé"]), st.integers())


@st.composite
def applications(draw) -> dict:
    """One application: its metadata row (maybe none) and its archive members (0, 1 or a repeat)."""
    number = draw(st.sampled_from(NUMBERS))
    date = draw(METADATA_DATES)
    year = filing_year(date)
    # mostly where the loader looks; sometimes under another year, or another top folder
    folder = draw(st.sampled_from([year or "2016"] * 3 + ["2015", "NaT", "elsewhere/" + (year or "2016")]))
    row = {
        "application_number": number,
        "filing_date": date,
        "decision": draw(st.one_of(st.sampled_from(["ACCEPTED", "REJECTED", "PENDING"]), st.none(), st.integers())),
        "main_ipcr_label": draw(LABELS),
        "main_cpc_label": draw(LABELS),
    }
    n_members = draw(st.sampled_from([0, 1, 1, 1, 2]))  # none (missing), one, or a repeat
    return {
        "number": number,
        "row": row if draw(st.integers(0, 4)) else None,  # 1 in 5: a member with no metadata row
        "members": [(f"{folder}/{number}.json", draw(PAYLOADS)) for _ in range(n_members)],
    }


def filing_year(value) -> str | None:
    """The filing year the loader derives from a metadata value (None: no valid date)."""
    from hfplug.data.hupd_selection import to_filing_dates

    date = to_filing_dates(pd.Series([value], dtype=object)).iloc[0]
    return None if pd.isna(date) else str(date.year)


# --- building and loading -------------------------------------------------------------------


def write(root: Path, apps: list[dict], layout: str) -> tuple[Path, Path, list[tuple[str, bytes | None]]]:
    """Write the metadata and archive; return their paths and the members in archive order.

    Members are ``(path relative to the archive's top folder, payload)``. In the sample
    layout the writer sorts members by name (stably), which is the order listed here. In the
    ``all`` layout a member under ``2016/`` (the anchors' year) goes into ``data/2016.tar.gz``,
    any other loose into ``data/``: both unpack to the same place.
    """
    members = [member for app in apps for member in app["members"]] + JUNK
    metadata, archive = root / "meta.feather", root / ("sample.tar.gz" if layout == "sample" else "all.tar")
    if layout == "sample":
        extras = [("sample/" + name, data) for name, data in members]
    else:
        extras = [(name if name.startswith("2016/") else "data/" + name, data) for name, data in members]
    write_hupd_files(
        ANCHORS,
        metadata,
        archive,
        layout=layout,
        extra_members=extras,
        metadata_extra_rows=[app["row"] for app in apps if app["row"] is not None],
    )
    anchors = [(f"2016/{r['application_number']}.json", json.dumps(r, ensure_ascii=False).encode()) for r in ANCHORS]
    ordered = sorted(anchors + members, key=lambda m: "sample/" + m[0])  # the writer's order (sample layout)
    return metadata, archive, ordered


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def warnings_of_loader():
    """The loader's warnings (caplog is function-scoped, which hypothesis refuses)."""
    handler, logger = Captured(), logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def load(metadata: Path, archive: Path, mode: str, **kwargs):
    hupd_config = "sample" if archive.name.endswith(".tar.gz") else "all"
    return load_hupd(hupd_config, hupd_metadata_path=metadata, hupd_archive_path=archive, **MODES[mode], **kwargs)


# --- the rules, simulated -----------------------------------------------------------------------


def simulate(metadata: Path, mode: str, members: list[tuple[str, bytes | None]]) -> tuple[dict, dict]:
    """Expected ``{split: [application numbers, in order]}`` and skip counts, from the rules above."""
    df = read_metadata(metadata)
    order: dict[str, list[tuple[str | None, str]]] = {}  # split -> (path or None, number) per selected row
    seen: set[tuple] = set()
    duplicate_rows = 0
    for split, rows in select_splits(df, **MODES[mode]).items():
        for number, date in zip(rows["application_number"], rows["filing_date"]):
            path = None if pd.isna(date) else f"{date.year}/{number}.json"
            duplicate_rows += (split, path, number) in seen
            seen.add((split, path, number))
            order.setdefault(split, []).append((path, number))
    paths = {path for rows in order.values() for path, _ in rows if path}
    last, repeats = scan(paths, members)
    outcome = {
        path: ("missing" if path not in last else "example" if is_object(last[path]) else "malformed")
        for path in paths
    }
    rows = {
        split: [number for path, number in order.get(split, []) if path and outcome[path] == "example"]
        for split in ("train", "validation")
    }
    undated = {number for rows in order.values() for path, number in rows if path is None}
    counts = {
        "selected": len(paths) + len(undated),
        "undated": len(undated),
        "missing": sum(o == "missing" for o in outcome.values()),
        "malformed": sum(o == "malformed" for o in outcome.values()),
        "duplicate_rows": duplicate_rows,
        "duplicate_members": repeats,
        "undated_rows": int(df["filing_date"].isna().sum()) if mode == "dates" else 0,
    }
    return rows, counts


def scan(paths: set[str], members: list[tuple[str, bytes | None]]) -> tuple[dict[str, bytes], int]:
    """Last payload of each wanted path (extraction overwrites), and the number of repeats.

    Only the exact path counts (``elsewhere/2016/1.json`` is not ``2016/1.json``); directories
    are not records.
    """
    last: dict[str, bytes] = {}
    repeats = 0
    for name, data in members:
        if data is None or name not in paths:
            continue  # directories, junk and unselected applications
        repeats += name in last
        last[name] = data
    return last, repeats


def is_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return False


def info_counts(cache_dir: Path) -> dict:
    (info,) = cache_dir.glob("*/hfplug_hupd.json")
    return json.loads(info.read_text())["skipped"]


def check_rows(dataset) -> None:
    """Every example has the declared types, whatever its record held."""
    for row in dataset:
        assert set(row) == set(FEATURES)
        assert all(isinstance(row[f], str) for f in (*OFFICIAL_FIELDS, "application_number"))
        assert row["patent_number"] == row["application_number"]
        assert all(isinstance(label, str) for key in ("ipcr_labels", "cpc_labels") for label in row[key])
        assert not any("\ud800" <= ch <= "\udfff" for f in OFFICIAL_FIELDS for ch in row[f])  # valid Unicode


# --- properties ------------------------------------------------------------------------------

HOSTILE = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@HOSTILE
@given(apps=st.lists(applications(), max_size=8), mode=st.sampled_from(sorted(MODES)))
def test_load_never_crashes_and_counts_every_skip(apps, mode):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        metadata, archive, members = write(root, apps, "sample")
        expected_rows, expected_counts = simulate(metadata, mode, members)
        with warnings_of_loader() as warnings:
            built = load(metadata, archive, mode, hupd_cache_dir=root / "cache")
        for split in ("train", "validation"):
            assert built[split]["application_number"] == expected_rows[split], split
            check_rows(built[split])
        assert info_counts(root / "cache") == expected_counts
        for kind, count in expected_counts.items():  # what the run covered: pytest --hypothesis-show-statistics
            event(f"{kind} > 0" if count else f"no {kind}")
        skips = sum(v for k, v in expected_counts.items() if k != "selected")
        assert len(warnings) == (1 if skips else 0), warnings

        with warnings_of_loader() as warnings:  # the cached load repeats the report
            again = load(metadata, archive, mode, hupd_cache_dir=root / "cache")
        assert again["train"].to_list() == built["train"].to_list()
        assert len(warnings) == (1 if skips else 0)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(apps=st.lists(applications(), max_size=8), mode=st.sampled_from(sorted(MODES)))
def test_streaming_matches_the_cache_and_reports_each_pass(apps, mode):
    """The same rows (in archive order). Repeated members are dropped first: streaming takes the first copy."""
    apps = without_repeated_members(apps)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        metadata, archive, _ = write(root, apps, "sample")
        built = load(metadata, archive, mode, hupd_cache_dir=root / "cache")
        with warnings_of_loader() as warnings:
            streamed = load(metadata, archive, mode, streaming=True)
        assert len(warnings) <= 1  # what the metadata alone shows, reported when the splits are made
        for split in ("train", "validation"):
            with warnings_of_loader() as warnings:
                assert as_bag(streamed[split]) == as_bag(built[split])
            assert len(warnings) <= 1  # one report per pass over the archive


def as_bag(rows) -> Counter:
    return Counter(json.dumps(row, sort_keys=True) for row in rows)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(apps=st.lists(applications(), max_size=8), mode=st.sampled_from(sorted(MODES)))
def test_all_years_layout_agrees_with_the_sample_layout(apps, mode):
    """Same data in the ``all`` layout (a year tarball plus loose members in ``data/``): same rows,
    same order, same repeats (the last copy of a path is the same in both)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sample = load(*write(root / "s", apps, "sample")[:2], mode, hupd_cache_dir=root / "s" / "cache")
        every = load(*write(root / "a", apps, "all")[:2], mode, hupd_cache_dir=root / "a" / "cache")
        for split in ("train", "validation"):
            assert every[split].to_list() == sample[split].to_list()
        assert info_counts(root / "a" / "cache") == info_counts(root / "s" / "cache")


def without_repeated_members(apps: list[dict]) -> list[dict]:
    seen: set[str] = set()
    result = []
    for app in apps:
        members = []
        for name, data in app["members"]:
            if name not in seen:
                seen.add(name)
                members.append((name, data))
        result.append(dict(app, members=members))
    return result


# --- hostile cases worth naming ---------------------------------------------------------------


def write_simple(root: Path, records: list[dict], **kwargs) -> tuple[Path, Path]:
    metadata, archive = root / "meta.feather", root / "sample.tar.gz"
    write_hupd_files(records, metadata, archive, **kwargs)
    return metadata, archive


def test_lone_surrogates_become_replacement_characters(tmp_path):
    """JSON may escape half a UTF-16 pair; Arrow cannot store it (this used to crash the load)."""
    number = ANCHORS[0]["application_number"]
    payload = b'{"title": "a\\ud800b", "abstract": "\\udfff", "ipcr_labels": ["\\ud83d"], "claims": ["\\ud800"]}'
    metadata, archive = write_simple(
        tmp_path, ANCHORS, omit_json_for=[number], extra_members=[(f"sample/2016/{number}.json", payload)]
    )
    for streaming in (False, True):
        result = load(metadata, archive, "dates", hupd_cache_dir=tmp_path / "cache", streaming=streaming)
        (row,) = [r for r in result["train"] if r["application_number"] == number]
        assert (row["title"], row["abstract"], row["ipcr_labels"]) == ("a\ufffdb", "\ufffd", ["\ufffd"])
        assert row["claims"] == "['\\ud800']"  # a list's str() escapes the surrogate itself


def test_nesting_at_the_json_limit_is_unreadable_not_fatal(tmp_path, caplog):
    number = ANCHORS[0]["application_number"]
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    metadata, archive = write_simple(
        tmp_path,
        ANCHORS,
        omit_json_for=[number],
        extra_members=[(f"sample/2016/{number}.json", b'{"title": ' + deep + b"}")],
    )
    result = load(metadata, archive, "dates", hupd_cache_dir=tmp_path / "cache")
    assert number not in result["train"]["application_number"]
    assert f"unreadable JSON for 1 ({number})" in caplog.text


def test_metadata_columns_of_unexpected_types(tmp_path):
    """Numeric labels, a tz-aware or text filing-date column: the selection works on them."""
    records = make_records(12, seed=23, **SMALL)
    metadata, archive = write_simple(tmp_path, records)
    df = pd.read_feather(metadata)
    for column in ("main_ipcr_label", "main_cpc_label", "decision"):
        df[column] = range(len(df))  # int64: pandas' .str would refuse it
    df["filing_date"] = df["filing_date"].dt.tz_localize("US/Pacific")
    df.to_feather(metadata)
    with pytest.raises(ValueError, match="ipcr_label='G06F' matched none"):  # a clear error, not AttributeError
        load(metadata, archive, "dates", hupd_cache_dir=tmp_path / "c1", ipcr_label="G06F")
    assert len(load(metadata, archive, "dates", hupd_cache_dir=tmp_path / "c2", ipcr_label="1")["train"]) >= 1
    df["filing_date"] = df["filing_date"].dt.strftime("%Y%m%d")  # the JSON records' form, as text
    df.to_feather(metadata)
    by_text = load(metadata, archive, "dates", hupd_cache_dir=tmp_path / "c3")
    assert len(by_text["train"]) + len(by_text["validation"]) == len(records)


def test_filing_dates_of_any_form_become_naive_days_or_nat():
    from hfplug.data.hupd_selection import to_filing_dates

    values = [
        "2016-01-05",
        "20160105",
        "2016-01-05T23:00:00+05:00",
        dt.date(2016, 1, 5),
        pd.Timestamp("2016-01-05 22:00", tz="US/Pacific"),
        "2016-13-45",
        "2016/01/05",
        "201601051",
        "",
        None,
        12,
        True,
        ["2016-01-05"],
    ]
    parsed = to_filing_dates(pd.Series(values, dtype=object))
    assert list(parsed[:5]) == [pd.Timestamp("2016-01-05")] * 5  # the wall date, whatever the timezone
    assert parsed[5:].isna().all()
    assert list(to_filing_dates(pd.Series([20160105, 20161301]))) == [pd.Timestamp("2016-01-05"), pd.NaT]
    aware = pd.Series(pd.to_datetime(["2016-01-05 23:30"])).dt.tz_localize("Asia/Tokyo")
    assert to_filing_dates(aware).dt.tz is None and to_filing_dates(aware)[0] == pd.Timestamp("2016-01-05 23:30")


def test_report_names_each_kind_of_skip(tmp_path, caplog):
    first, second = ANCHORS
    extra = [
        {"application_number": "14000009", "filing_date": "not a date"},  # undated, selected by uniform
        {"application_number": second["application_number"], "filing_date": "2016-01-25"},
    ]  # repeated row
    members = [(f"sample/2016/{first['application_number']}.json", b"{}")]  # a repeated member
    metadata, archive = write_simple(tmp_path, ANCHORS, extra_members=members, metadata_extra_rows=extra)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load(metadata, archive, "uniform", hupd_cache_dir=tmp_path / "cache")
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "1 of 3 selected applications skipped: no valid filing date in the metadata" in message
    assert "(14000009)" in message
    # a repeated row lands in the same split only by chance in a uniform split; the member repeat always shows
    assert (
        f"1 repeated archive members (used the last copy of each path): 1 ({first['application_number']})" in message
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load(metadata, archive, "dates", hupd_cache_dir=tmp_path / "cache")
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        f"1 repeated metadata rows yielded again, as the official loader does: 1 ({second['application_number']})"
        in message
    )
    assert "1 metadata rows have no valid filing date, so no date range selects them" in message
