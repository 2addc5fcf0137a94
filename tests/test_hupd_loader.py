"""load_hupd end to end on generated archives of both layouts (no network)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest

import hfplug.data.hupd as hupd
import hfplug.data.hupd_build as hupd_build
import hfplug.data.hupd_cache as hupd_cache
import hfplug.data.hupd_units as hupd_units
from hfplug.data.hupd import FEATURES, HupdCacheError, HupdFileError, load_hupd
from hfplug.data.hupd_selection import select_splits
from hfplug.testing.hupd_synthetic import HardLink, make_records, write_hupd_files

SMALL = dict(description_words=(20, 60), claims_words=(20, 40), background_words=(10, 20), summary_words=(10, 20))
DATES = dict(
    train_filing_start_date="2016-01-01",
    train_filing_end_date="2016-01-20",
    val_filing_start_date="2016-01-20",
    val_filing_end_date="2016-02-01",
)
MISSING = "14999901"  # in the metadata, no JSON anywhere
EXTRA_ROW = "14999902"  # only in the metadata (metadata_extra_rows)
MALFORMED = "14999903"  # its JSON member is not JSON
NULLS = "14999904"  # null sections, a number where a string belongs
JUNK = [
    ("sample/README.txt", b"not a record"),
    ("sample/2016/docs", None),
    ("sample/2016/99999999.json", b'{"title": "not in the metadata"}'),
    ("sample/2016/14999903.json", b"{this is not json"),
    ("sample/2016/notes.json.bak", b"junk"),
]


def crafted_records() -> list[dict]:
    records = make_records(60, seed=11, **SMALL)
    nulls = dict(
        records[0],
        application_number=NULLS,
        background=None,
        summary=None,
        claims=12345,
        examiner_id=81234,
        patent_issue_date=None,
        cpc_labels=None,
    )
    missing = dict(records[1], application_number=MISSING)
    malformed = dict(records[2], application_number=MALFORMED)
    return [*records, nulls, missing, malformed]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    """Sample layout with every kind of bad data: missing/malformed JSON, nulls, junk members."""
    root = tmp_path_factory.mktemp("sample")
    records = crafted_records()
    write_hupd_files(
        records,
        root / "meta.feather",
        root / "sample.tar.gz",
        omit_json_for=[MISSING, MALFORMED],
        extra_members=JUNK,
        metadata_extra_rows=[{"application_number": EXTRA_ROW, "filing_date": "2016-01-03", "decision": "ACCEPTED"}],
    )
    return {
        "records": {r["application_number"]: r for r in records},
        "metadata": root / "meta.feather",
        "archive": root / "sample.tar.gz",
    }


def load(files: dict, tmp_path: Path, **kwargs) -> datasets.DatasetDict:
    kwargs.setdefault("hupd_cache_dir", tmp_path / "cache")
    return load_hupd(hupd_metadata_path=files["metadata"], hupd_archive_path=files["archive"], **kwargs)


def rows_by_number(dataset) -> dict[str, dict]:
    return {row["application_number"]: row for row in dataset}


def test_fields_and_values(sample, tmp_path):
    result = load(sample, tmp_path, **DATES)
    assert set(result) == {"train", "validation"}
    for split in result.values():
        assert split.features == FEATURES
        for number, row in rows_by_number(split).items():
            record = sample["records"][number]
            assert row["patent_number"] == number  # the application number, as upstream
            assert row["decision"] == record["decision"]
            for field in ("title", "abstract", "filing_date", "date_published"):
                assert row[field] == record[field]
            assert row["description"] == record["full_description"]
            assert row["ipc_label"] == record["main_ipcr_label"] and row["cpc_label"] == record["main_cpc_label"]
            assert row["ipcr_labels"] == record["ipcr_labels"]
            assert isinstance(row["examiner_id"], str)


def test_rows_match_the_selection(sample, tmp_path):
    result = load(sample, tmp_path, **DATES)
    selection = select_splits(hupd.read_metadata(sample["metadata"]), **DATES)
    skipped = {MISSING, EXTRA_ROW, MALFORMED}
    for split, df in selection.items():
        expected = [n for n in df["application_number"] if n not in skipped]
        assert set(result[split]["application_number"]) == set(expected)
        assert len(result[split]) == len(expected)  # junk members added nothing
        # upstream's order (the metadata's), not the archive's (members sorted by name)
        assert list(result[split]["application_number"]) == expected != sorted(expected)


def test_null_sections_and_non_strings(sample, tmp_path):
    result = load(sample, tmp_path, uniform_split=True)
    rows = {**rows_by_number(result["train"]), **rows_by_number(result["validation"])}
    row = rows[NULLS]
    assert row["background"] == row["summary"] == row["patent_issue_date"] == ""
    assert row["claims"] == "12345" and row["examiner_id"] == "81234"
    assert row["cpc_labels"] == []


def test_all_decisions_pass_through(sample, tmp_path):
    result = load(sample, tmp_path, uniform_split=True)
    decisions = set(result["train"]["decision"]) | set(result["validation"]["decision"])
    assert decisions == {"ACCEPTED", "REJECTED", "CONT-ACCEPTED", "PENDING", "CONT-REJECTED", "CONT-PENDING"}


def test_skipped_records_in_one_warning(sample, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hfplug.data.hupd"):
        load(sample, tmp_path, **DATES)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    n_selected = sum(len(df) for _, df in select_splits(hupd.read_metadata(sample["metadata"]), **DATES).items())
    assert f"3 of {n_selected} selected applications skipped" in message
    assert f"no JSON record in {sample['archive']} for 2 ({MISSING}, {EXTRA_ROW})" in message
    assert f"unreadable JSON for 1 ({MALFORMED})" in message
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("HUPD train split:") for m in infos)
    assert any(m.startswith("HUPD validation split:") for m in infos)
    assert any("records filed 2016-01-01 to 2016-01-31" in m for m in infos)


def test_second_call_hits_the_cache(sample, tmp_path, monkeypatch):
    first = load(sample, tmp_path, **DATES)

    def fail(*args, **kwargs):
        raise AssertionError("the archive/metadata was read again")

    monkeypatch.setattr(hupd_units, "_iter_archive", fail)
    monkeypatch.setattr(hupd, "read_metadata", fail)
    second = load(sample, tmp_path, **DATES)
    for split in first:
        assert second[split].to_list() == first[split].to_list()
    with pytest.raises(AssertionError, match="read again"):  # other arguments: another cache entry
        load(sample, tmp_path, **DATES, ipcr_label="G06F")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no leftovers


def test_cache_is_keyed_on_the_input_files(tmp_path):
    files = {"metadata": tmp_path / "m.feather", "archive": tmp_path / "a.tar.gz"}
    records = make_records(20, seed=5, **SMALL)
    write_hupd_files(records, files["metadata"], files["archive"])
    before = load(files, tmp_path, uniform_split=True)
    write_hupd_files(records[:10], files["metadata"], files["archive"])  # same paths, new content
    after = load(files, tmp_path, uniform_split=True)
    assert len(after["train"]) < len(before["train"])
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_streaming_equals_non_streaming_but_in_archive_order(sample, tmp_path):
    built = load(sample, tmp_path, **DATES, val_set_balancer=True)
    streamed = load(
        sample, tmp_path, **DATES, val_set_balancer=True, streaming=True, hupd_cache_dir=tmp_path / "stream_cache"
    )
    assert isinstance(streamed, datasets.IterableDatasetDict)
    for split in built:
        assert streamed[split].features == FEATURES
        rows = list(streamed[split])
        by_number = sorted(built[split].to_list(), key=lambda row: row["application_number"])
        assert rows == by_number  # the same rows, in archive order (members sorted by name)
    assert not (tmp_path / "stream_cache").exists()  # streaming writes no cache


@pytest.fixture(scope="module")
def all_years(tmp_path_factory) -> dict:
    """The ``all`` layout for 2015-2016, plus a corrupt ``2017.tar.gz`` that must never be opened."""
    root = tmp_path_factory.mktemp("all")
    records = make_records(40, seed=12, start_date="2015-12-01", end_date="2017-01-01", **SMALL)
    write_hupd_files(
        records,
        root / "meta.feather",
        root / "all.tar",
        layout="all",
        extra_members=[
            ("data/2017.tar.gz", b"\x1f\x8b not really gzip"),
            ("README.md", b"x"),
            ("2016/notes.txt", b"junk"),
        ],
        metadata_extra_rows=[{"application_number": "15999999", "filing_date": "2017-03-01", "decision": "ACCEPTED"}],
    )
    twin = root / "twin"  # the same records in the sample layout
    write_hupd_files(records, twin / "meta.feather", twin / "sample.tar.gz")
    return {
        "metadata": root / "meta.feather",
        "archive": root / "all.tar",
        "twin": {"metadata": twin / "meta.feather", "archive": twin / "sample.tar.gz"},
    }


def test_all_layout_reads_only_needed_years(all_years, tmp_path, caplog):
    dates = dict(
        train_filing_start_date="2016-01-01",
        train_filing_end_date="2016-06-01",
        val_filing_start_date="2016-06-01",
        val_filing_end_date="2017-01-01",
    )
    with caplog.at_level(logging.DEBUG, logger="hfplug.data.hupd"):
        result = load(all_years, tmp_path, hupd_config="all", **dates)
    read = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Reading ")]
    assert read == ["Reading data/2016.tar.gz"]
    assert any("Skipping data/2015.tar.gz" in r.getMessage() for r in caplog.records)
    twin = load(all_years["twin"], tmp_path, **dates)
    for split in result:
        assert result[split].to_list() == twin[split].to_list()
    assert len(result["train"]) and len(result["validation"])


def test_all_layout_corrupt_year_is_reported_when_needed(all_years, tmp_path):
    # 2017.tar.gz is junk: a selection that needs 2017 must fail loudly, naming the member
    with pytest.raises(HupdFileError, match="2017.tar.gz"):
        load(
            all_years,
            tmp_path,
            hupd_config="all",
            train_filing_start_date="2016-01-01",
            train_filing_end_date="2016-06-01",
            val_filing_start_date="2016-06-01",
            val_filing_end_date="2018-01-01",
        )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", r"EOFError: .*\(truncated\)"),
        ("bad_crc", "ReadError: zlib error: corrupt gzip data: .*incorrect data check"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_all_layout_corrupt_gzip_inside_a_needed_year(all_years, tmp_path, kind, message, streaming):
    """A year tarball whose gzip stream is cut short or fails its CRC, inside an intact all-years tar
    (read in place through a memory map): an error naming the member and what is wrong with it."""
    import io
    import tarfile

    bad = tmp_path / "all.tar"
    with tarfile.open(all_years["archive"]) as good, tarfile.open(bad, "w") as out:
        for info in good.getmembers():
            data = good.extractfile(info).read() if info.isreg() else None
            if info.name == "data/2016.tar.gz":
                data = {
                    "truncated": data[: len(data) // 2],
                    "bad_crc": data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:],
                }[kind]
                info.size = len(data)
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    dates = dict(
        train_filing_start_date="2016-01-01",
        train_filing_end_date="2016-06-01",
        val_filing_start_date="2016-06-01",
        val_filing_end_date="2017-01-01",
    )
    files = dict(hupd_metadata_path=all_years["metadata"], hupd_archive_path=bad)
    with pytest.raises(HupdFileError, match=rf"all.tar.*member data/2016.tar.gz: {message}"):
        result = load_hupd("all", **files, hupd_cache_dir=tmp_path / "c", streaming=streaming, **dates)
        for split in result.values():
            list(split)  # a stream is read only when iterated
    assert not any((tmp_path / "c").rglob("*.arrow"))


# --- bad input files ---------------------------------------------------------------------


def test_missing_files(sample, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HUPD metadata file not found: .*nope.feather.*hupd_metadata_path"):
        load_hupd(hupd_metadata_path=tmp_path / "nope.feather", hupd_archive_path=sample["archive"], **DATES)
    with pytest.raises(FileNotFoundError, match=r"HUPD archive file not found: .*nope.tar.gz.*sample-jan-2016"):
        load_hupd(hupd_metadata_path=sample["metadata"], hupd_archive_path=tmp_path / "nope.tar.gz", **DATES)


def test_bad_arguments_fail_before_any_file_is_read(tmp_path):
    with pytest.raises(ValueError, match="hupd_config must be one of"):
        load_hupd("full", hupd_metadata_path=tmp_path / "x", hupd_archive_path=tmp_path / "y")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        load_hupd(
            hupd_metadata_path=tmp_path / "x",
            hupd_archive_path=tmp_path / "y",
            **{**DATES, "val_filing_end_date": "2016-2-1"},
        )


def test_old_keywords_still_load_with_a_deprecation_warning(sample, tmp_path):
    """load_hupd's keywords took the recipe's flag names; the old ones warn and give the same splits."""
    old = dict(name="sample", metadata_path=sample["metadata"], archive_path=sample["archive"])
    with pytest.warns(DeprecationWarning, match=r"load_hupd\(cache_dir=\.\.\.\) is now load_hupd\(hupd_cache_dir="):
        result = load_hupd(**old, cache_dir=tmp_path / "cache", **DATES)
    assert result["train"].to_list() == load(sample, tmp_path, **DATES)["train"].to_list()
    with pytest.raises(TypeError, match="pass hupd_cache_dir= only"):
        load_hupd(cache_dir=tmp_path / "a", hupd_cache_dir=tmp_path / "b", **DATES)


def corrupt_variants(archive: Path) -> dict[str, bytes]:
    data = archive.read_bytes()
    return {
        "truncated": data[: len(data) // 2],
        "truncated_trailer": data[:-4],  # only the gzip size/CRC trailer is cut
        "bad_crc": data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:],
        "not_a_tar": b"hello, this is not an archive at all" * 50,
        "gzip_of_non_tar": __import__("gzip").compress(b"plain text, not a tar" * 100),
        "empty": b"",
    }


@pytest.mark.parametrize(
    "kind", ["truncated", "truncated_trailer", "bad_crc", "not_a_tar", "gzip_of_non_tar", "empty"]
)
def test_corrupt_archive(sample, tmp_path, kind):
    good = load(sample, tmp_path, **DATES)  # an earlier cache that must survive the failure
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(corrupt_variants(sample["archive"])[kind])
    with pytest.raises(HupdFileError) as info:
        load_hupd(
            hupd_metadata_path=sample["metadata"], hupd_archive_path=bad, hupd_cache_dir=tmp_path / "cache", **DATES
        )
    assert str(bad) in str(info.value) and "download it again" in str(info.value)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # only the good cache, nothing half-built
    assert load(sample, tmp_path, **DATES)["train"].to_list() == good["train"].to_list()


@pytest.mark.parametrize("where", ["inside_a_member", "at_a_member_boundary"])
def test_truncated_all_years_tar(all_years, tmp_path, where):
    import tarfile

    bad = tmp_path / "all.tar"
    data = all_years["archive"].read_bytes()
    with tarfile.open(all_years["archive"]) as tar:
        boundary = tar.getmembers()[1].offset  # the second member's header starts here
    bad.write_bytes(data[:boundary] if where == "at_a_member_boundary" else data[: len(data) * 2 // 3])
    with pytest.raises(HupdFileError, match="all.tar"):
        load_hupd(
            "all",
            hupd_metadata_path=all_years["metadata"],
            hupd_archive_path=bad,
            hupd_cache_dir=tmp_path / "c",
            uniform_split=True,
        )


@pytest.mark.parametrize("content", [b"", b"not a feather file" * 10])
def test_corrupt_metadata(sample, tmp_path, content):
    bad = tmp_path / "meta.feather"
    bad.write_bytes(content)
    with pytest.raises(HupdFileError, match=r"HUPD metadata file .*meta.feather is unreadable.*download it again"):
        load_hupd(
            hupd_metadata_path=bad, hupd_archive_path=sample["archive"], hupd_cache_dir=tmp_path / "cache", **DATES
        )
    assert not list((tmp_path / "cache").glob("*"))


def test_metadata_without_needed_columns(sample, tmp_path):
    bad = tmp_path / "meta.feather"
    pd.DataFrame({"application_number": ["1"], "filing_date": pd.to_datetime(["2016-01-01"])}).to_feather(bad)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['decision', 'main_ipcr_label'"):
        load_hupd(
            hupd_metadata_path=bad, hupd_archive_path=sample["archive"], hupd_cache_dir=tmp_path / "cache", **DATES
        )


# --- the Hub path ------------------------------------------------------------------------


def test_hub_download_from_an_offline_cache(sample, tmp_path, monkeypatch, caplog):
    """Files laid out exactly as huggingface_hub caches them, resolved by the real hf_hub_download."""
    hub_cache = tmp_path / "hub"
    repo = hub_cache / "datasets--HUPD--hupd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (snapshot / "data").mkdir(parents=True)
    os.link(sample["metadata"], snapshot / "hupd_metadata_jan16_2022-02-22.feather")
    os.link(sample["archive"], snapshot / "data" / "sample-jan-2016.tar.gz")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    # huggingface_hub reads these variables once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))

    secret = "hf_NEVERLOGGEDtoken123"
    with caplog.at_level(logging.DEBUG):
        result = load_hupd("sample", hupd_cache_dir=tmp_path / "cache", token=secret, **DATES)
    assert result["train"].to_list() == load(sample, tmp_path, **DATES)["train"].to_list()
    assert secret not in caplog.text
    assert not any(secret in p.read_text(errors="ignore") for p in (tmp_path / "cache").rglob("*.json"))

    with pytest.raises(Exception, match="could not fetch 'hupd_metadata_2022-02-22.feather'") as info:
        load_hupd("all", hupd_cache_dir=tmp_path / "cache", uniform_split=True)  # not in the offline cache
    assert "hupd_metadata_path" in "".join(getattr(info.value, "__notes__", []))


# --- more fidelity edges -----------------------------------------------------------------


def test_json_under_another_year_is_not_found(tmp_path, caplog):
    """Upstream opens <filing year>/<number>.json; a record filed elsewhere is missing there too."""
    records = make_records(8, seed=6, **SMALL)
    files = {"metadata": tmp_path / "m.feather", "archive": tmp_path / "a.tar.gz"}
    write_hupd_files(records, files["metadata"], files["archive"], year_dir="2015")
    result = load(files, tmp_path, uniform_split=True)
    assert len(result["train"]) == len(result["validation"]) == 0
    assert "skipped: no JSON record" in caplog.text


def test_multi_member_gzip_archive(sample, tmp_path):
    """A .tar.gz written as several gzip members (pigz, bgzip) reads like a single-member one."""
    import gzip

    tar_bytes = gzip.decompress(sample["archive"].read_bytes())
    cut = len(tar_bytes) // 3
    files = {"metadata": sample["metadata"], "archive": tmp_path / "multi.tar.gz"}
    files["archive"].write_bytes(gzip.compress(tar_bytes[:cut]) + gzip.compress(tar_bytes[cut:]))
    assert load(files, tmp_path, **DATES)["train"].to_list() == load(sample, tmp_path, **DATES)["train"].to_list()


def test_empty_selection_leaves_no_cache(sample, tmp_path):
    with pytest.raises(ValueError, match="selects no records; the HUPD metadata has"):
        load(
            sample,
            tmp_path,
            train_filing_start_date="2010-01-01",
            train_filing_end_date="2010-02-01",
            val_filing_start_date="2016-01-01",
            val_filing_end_date="2016-02-01",
        )
    assert not list((tmp_path / "cache").glob("*"))


def test_query_on_any_metadata_column(sample, tmp_path):
    result = load(sample, tmp_path, uniform_split=True, query="small_entity_indicator == 'SMALL'")
    metadata = hupd.read_metadata(sample["metadata"]).set_index("application_number")
    kept = list(result["train"]["application_number"]) + list(result["validation"]["application_number"])
    assert kept and set(metadata.loc[kept, "small_entity_indicator"]) == {"SMALL"}


# --- upstream's row order, paths, repeats and links ----------------------------------------


def official_order(
    metadata: Path,
    *,
    ipcr_label=None,
    cpc_label=None,
    query_string=None,
    train_filing_start_date=None,
    train_filing_end_date=None,
    val_filing_start_date=None,
    val_filing_end_date=None,
    uniform_split=False,
    val_set_balancer=False,
) -> dict[str, list[str]]:
    """The official hupd.py's ``_split_generators``, transcribed: each split's application numbers,
    in the order its ``_generate_examples`` yields them (``df.itertuples()``). Plain pandas on the
    raw feather, independent of hfplug's code."""
    df = pd.read_feather(metadata)
    if ipcr_label:
        df = df[df["main_ipcr_label"].str.startswith(ipcr_label)]
    elif cpc_label:
        df = df[df["main_cpc_label"].str.startswith(cpc_label)]
    if query_string:
        df = df.query(query_string)
    if uniform_split:
        if train_filing_start_date:
            df = df[df["filing_date"] >= train_filing_start_date]
        if val_filing_end_date:
            df = df[df["filing_date"] <= val_filing_end_date]
        df = df.sample(frac=1.0, random_state=1729)
        num_train_samples = int(len(df) * 0.85)
        train_df, val_df = df.iloc[0:num_train_samples], df.iloc[num_train_samples:-1]
    else:
        train_df = df[(df["filing_date"] >= train_filing_start_date) & (df["filing_date"] < train_filing_end_date)]
        val_df = df[(df["filing_date"] >= val_filing_start_date) & (df["filing_date"] < val_filing_end_date)]
    if val_set_balancer:
        rejected_df = val_df[val_df.decision == "REJECTED"]
        accepted_df = val_df[val_df.decision == "ACCEPTED"]
        if len(rejected_df) < len(accepted_df):
            accepted_df = accepted_df.sample(frac=1.0, random_state=1729)[: len(rejected_df)]
        else:
            rejected_df = rejected_df.sample(frac=1.0, random_state=1729)[: len(accepted_df)]
        val_df = pd.concat([rejected_df, accepted_df])
    return {
        "train": [x.application_number for x in train_df.itertuples()],
        "validation": [x.application_number for x in val_df.itertuples()],
    }


@pytest.fixture(scope="module")
def ordered(tmp_path_factory) -> dict:
    """120 applications whose metadata order is not the archive's (sorted by name), plus a repeated row."""
    root = tmp_path_factory.mktemp("ordered")
    records = make_records(120, seed=31, **SMALL)
    repeated = records[7]
    write_hupd_files(
        records,
        root / "meta.feather",
        root / "sample.tar.gz",
        metadata_extra_rows=[
            {
                k: repeated[k]
                for k in ("application_number", "filing_date", "decision", "main_ipcr_label", "main_cpc_label")
            }
        ],
    )
    return {"metadata": root / "meta.feather", "archive": root / "sample.tar.gz", "repeated": repeated}


def numbers_of(result, split: str) -> list[str]:
    return list(result[split]["application_number"])


@pytest.mark.parametrize(
    "kwargs",
    [
        DATES,
        dict(DATES, ipcr_label="G06F"),
        dict(DATES, cpc_label="H04L", query="decision != 'PENDING'"),
        dict(DATES, train_filing_start_date="20160101", val_filing_end_date="20160201"),  # dates as YYYYMMDD
    ],
    ids=["plain", "ipc", "cpc+query", "yyyymmdd"],
)
def test_date_split_in_metadata_order(ordered, tmp_path, kwargs):
    result = load(ordered, tmp_path, **kwargs)
    expected = official_order(
        ordered["metadata"], **{("query_string" if k == "query" else k): v for k, v in kwargs.items()}
    )
    for split in ("train", "validation"):
        assert numbers_of(result, split) == expected[split]
    assert expected["train"] != sorted(expected["train"])  # the archive's order would fail this test


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(train_filing_start_date="2016-01-05", val_filing_end_date="20160125"),
        dict(query="decision == 'ACCEPTED' or decision == 'REJECTED'"),
    ],
    ids=["all", "window", "query"],
)
def test_uniform_split_in_shuffled_order(ordered, tmp_path, kwargs):
    result = load(ordered, tmp_path, uniform_split=True, **kwargs)
    expected = official_order(
        ordered["metadata"],
        uniform_split=True,
        **{("query_string" if k == "query" else k): v for k, v in kwargs.items()},
    )
    for split in ("train", "validation"):
        assert numbers_of(result, split) == expected[split]


@pytest.mark.parametrize("kwargs", [DATES, dict(uniform_split=True)], ids=["dates", "uniform"])
def test_balanced_validation_is_rejected_then_accepted(ordered, tmp_path, kwargs):
    result = load(ordered, tmp_path, val_set_balancer=True, **kwargs)
    expected = official_order(ordered["metadata"], val_set_balancer=True, **kwargs)
    assert numbers_of(result, "validation") == expected["validation"]
    assert numbers_of(result, "train") == expected["train"]
    decisions = result["validation"]["decision"]
    half = len(decisions) // 2
    assert half and decisions == ["REJECTED"] * half + ["ACCEPTED"] * half


def test_repeated_metadata_row_is_yielded_twice(ordered, tmp_path, caplog):
    number = ordered["repeated"]["application_number"]
    result = load(
        ordered,
        tmp_path,
        train_filing_start_date="2016-01-01",
        train_filing_end_date="2016-02-01",
        val_filing_start_date="2016-01-01",
        val_filing_end_date="2016-02-01",
    )
    expected = official_order(
        ordered["metadata"],
        train_filing_start_date="2016-01-01",
        train_filing_end_date="2016-02-01",
        val_filing_start_date="2016-01-01",
        val_filing_end_date="2016-02-01",
    )
    for split in ("train", "validation"):
        assert numbers_of(result, split) == expected[split]
        assert numbers_of(result, split).count(number) == 2
        rows = [row for row in result[split] if row["application_number"] == number]
        assert rows[0] == rows[1]
    assert (
        f"2 repeated metadata rows yielded again, as the official loader does: 2 ({number}, {number})" in caplog.text
    )
    streamed = load(
        ordered,
        tmp_path,
        streaming=True,
        train_filing_start_date="2016-01-01",
        train_filing_end_date="2016-02-01",
        val_filing_start_date="2016-01-01",
        val_filing_end_date="2016-02-01",
    )
    assert [row["application_number"] for row in streamed["train"]].count(number) == 2


def small_files(tmp_path: Path, n: int = 6, **kwargs) -> tuple[dict, list[dict]]:
    records = make_records(n, seed=41, **SMALL)
    files = {
        "metadata": tmp_path / "m.feather",
        "archive": tmp_path / ("all.tar" if kwargs.get("layout") == "all" else "a.tar.gz"),
    }
    write_hupd_files(records, files["metadata"], files["archive"], **kwargs)
    return files, records


def rows_of(files: dict, tmp_path: Path, **kwargs) -> dict[str, dict]:
    """Every loaded row by application number (train and validation of a window holding all of January)."""
    result = load(
        files,
        tmp_path,
        hupd_config="all" if files["archive"].name.endswith(".tar") else "sample",
        **WHOLE_MONTH,
        **kwargs,
    )
    return {row["application_number"]: row for row in result["train"]}


WHOLE_MONTH = dict(
    train_filing_start_date="2016-01-01",
    train_filing_end_date="2016-02-01",
    val_filing_start_date="2016-01-01",
    val_filing_end_date="2016-02-01",
)


def payload(record: dict, **changes) -> bytes:
    return json.dumps(dict(record, **changes)).encode()


def test_only_the_path_upstream_opens_is_read(tmp_path, caplog):
    """``sample/<year>/<number>.json`` only: a stray ``2016/<n>.json`` ahead of it is not taken."""
    records = make_records(4, seed=42, **SMALL)
    a, b, c = (r["application_number"] for r in records[:3])
    files = {"metadata": tmp_path / "m.feather", "archive": tmp_path / "a.tar.gz"}
    write_hupd_files(
        records,
        files["metadata"],
        files["archive"],
        omit_json_for=[b, c],
        extra_members=[
            (f"2016/{a}.json", payload(records[0], title="stray")),  # sorts ahead of sample/2016/<a>.json
            (f"2016/{b}.json", payload(records[1], title="stray")),  # the only copy of b, at the wrong path
            (f"sample/2015/{c}.json", payload(records[2])),  # wrong year
            (f"./sample/2016/{c}.json", payload(records[2], title="dot")),  # extracts to sample/2016/<c>.json
        ],
    )
    rows = rows_of(files, tmp_path)
    assert rows[a]["title"] == records[0]["title"] and rows[c]["title"] == "dot"
    assert b not in rows and f"no JSON record in {files['archive']} for 1 ({b})" in caplog.text


def test_all_years_paths(tmp_path):
    """``all``: ``data/<year>.tar.gz`` unpacks into ``data/``; loose ``data/<year>/<n>.json`` counts too,
    a copy inside the year tarball wins over a loose one (year tarballs unpack last), other folders do not."""
    records = make_records(4, seed=43, **SMALL)
    a, b, c, d = (r["application_number"] for r in records)
    files, _ = {"metadata": tmp_path / "m.feather", "archive": tmp_path / "all.tar"}, None
    write_hupd_files(
        records,
        files["metadata"],
        files["archive"],
        layout="all",
        omit_json_for=[b, c],
        extra_members=[
            (f"data/2016/{a}.json", payload(records[0], title="loose")),  # after data/2016.tar.gz, loses to it
            (f"data/2016/{b}.json", payload(records[1], title="loose")),  # the only copy: taken
            (f"sample/2016/{c}.json", payload(records[2])),  # not where upstream looks for `all`
            (f"2016/{d}.json", payload(records[3], title="inner")),  # inside 2016.tar.gz, a second copy: last wins
        ],
    )
    rows = rows_of(files, tmp_path)
    assert rows[a]["title"] == records[0]["title"] and rows[b]["title"] == "loose"
    assert c not in rows and rows[d]["title"] == "inner"


@pytest.mark.parametrize("layout", ["sample", "all"])
def test_hard_links_read_as_their_target(tmp_path, layout, caplog):
    records = make_records(6, seed=44, **SMALL)
    records.sort(key=lambda r: r["application_number"])
    first, a, b, dangling, outside = (r["application_number"] for r in records[:5])
    top = "sample/2016" if layout == "sample" else "2016"
    files = {"metadata": tmp_path / "m.feather", "archive": tmp_path / ("all.tar" if layout == "all" else "a.tar.gz")}
    write_hupd_files(
        records,
        files["metadata"],
        files["archive"],
        layout=layout,
        omit_json_for=[a, b, dangling, outside],
        extra_members=[
            (f"{top}/10000000.json", payload(records[1], title="unselected target")),
            (f"{top}/{a}.json", HardLink(f"{top}/10000000.json")),
            (f"{top}/{b}.json", HardLink(f"{top}/{first}.json")),  # a selected record's file
            (f"{top}/{dangling}.json", HardLink(f"{top}/99999999.json")),  # nothing there
            (f"{top}/{outside}.json", HardLink("../../etc/hostname")),  # outside the archive
        ],
    )
    for streaming in (False, True):
        rows = (
            rows_of(files, tmp_path, streaming=streaming)
            if not streaming
            else {row["application_number"]: row for row in rows_of_stream(files)}
        )
        assert rows[a]["title"] == "unselected target" and rows[a]["patent_number"] == a
        assert rows[b]["title"] == records[0]["title"] and rows[b]["patent_number"] == b
        assert dangling not in rows and outside not in rows and len(rows) == len(records) - 2
    assert f"no JSON record in {files['archive']} for 2 ({dangling}, {outside})" in caplog.text


def rows_of_stream(files: dict) -> list[dict]:
    hupd_config = "all" if files["archive"].name.endswith(".tar") else "sample"
    return list(
        load_hupd(
            hupd_config,
            hupd_metadata_path=files["metadata"],
            hupd_archive_path=files["archive"],
            streaming=True,
            **WHOLE_MONTH,
        )["train"]
    )


def test_repeated_member_path_last_copy_wins(tmp_path, caplog):
    """Extraction overwrites, so of a path stored twice the last copy is the one upstream reads."""
    records = make_records(4, seed=45, **SMALL)
    a, b, c = (r["application_number"] for r in records[:3])
    files = {"metadata": tmp_path / "m.feather", "archive": tmp_path / "a.tar.gz"}
    write_hupd_files(
        records,
        files["metadata"],
        files["archive"],
        omit_json_for=[b, c],
        extra_members=[
            (f"sample/2016/{a}.json", payload(records[0], title="second copy")),  # after the generated member
            (f"sample/2016/{b}.json", b"{not json"),
            (f"sample/2016/{b}.json", payload(records[1], title="good last")),
            (f"sample/2016/{c}.json", payload(records[2], title="good first")),
            (f"sample/2016/{c}.json", b"{not json"),
        ],
    )
    rows = rows_of(files, tmp_path)
    assert rows[a]["title"] == "second copy" and rows[b]["title"] == "good last" and c not in rows
    assert "3 repeated archive members (used the last copy of each path)" in caplog.text
    assert f"unreadable JSON for 1 ({c})" in caplog.text
    streamed = {row["application_number"]: row for row in rows_of_stream(files)}  # no look-ahead: first copy
    assert streamed[a]["title"] == records[0]["title"] and b not in streamed and streamed[c]["title"] == "good first"


def test_yyyymmdd_dates_are_the_same_cache_entry(sample, tmp_path):
    iso = load(sample, tmp_path, **DATES)
    compact = load(sample, tmp_path, **{k: v.replace("-", "") for k, v in DATES.items()})
    assert compact["train"].to_list() == iso["train"].to_list()
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_cache_of_an_older_version_is_not_reused(sample, tmp_path, monkeypatch):
    monkeypatch.setattr(hupd_cache, "CACHE_VERSION", hupd_cache.CACHE_VERSION - 1)
    load(sample, tmp_path, **DATES)  # e.g. one built in archive order
    monkeypatch.undo()
    load(sample, tmp_path, **DATES)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# --- cache failures ---------------------------------------------------------------------


def fail_after(monkeypatch, target: str, calls: int, error: OSError) -> None:
    """Make ``target`` raise ``error`` from its ``calls``-th call on: a function of ``hupd_build``, or
    ``Class.method`` of a class of ``hupd_units``."""
    owner_name, _, attr = target.rpartition(".")
    owner = getattr(hupd_units, owner_name) if owner_name else hupd_build
    original = getattr(owner, attr)
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] >= calls:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)


@pytest.mark.parametrize(
    "where,error",
    [
        ("_Records.add", OSError(errno.ENOSPC, "No space left on device")),
        (
            "_Records.add",
            OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),
        ),  # pyarrow's
        ("_write_part", OSError(errno.EDQUOT, "Disk quota exceeded")),
    ],
    ids=["while-reading", "pyarrow-message", "while-ordering"],
)
def test_full_disk_names_the_cache_and_the_room_needed(sample, tmp_path, monkeypatch, where, error):
    good = load(sample, tmp_path, **DATES)  # an earlier cache that must survive
    fail_after(monkeypatch, where, 20 if where == "_Records.add" else 2, error)
    with pytest.raises(HupdCacheError) as info:
        load(sample, tmp_path, uniform_split=True)
    message = str(info.value)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert message.startswith("The disk is full") and str(tmp_path / "cache") in message
    assert re.search(
        r"needs about [1-9]\d* [KMG]?B \(\d+ [KMGT]?B free now\) in " + re.escape(str(tmp_path / "cache")), message
    ), message
    assert "hupd_cache_dir=" in message
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # scratch removed, the good cache kept
    monkeypatch.undo()
    monkeypatch.setattr(hupd_units, "_iter_archive", lambda *a, **k: pytest.fail("the good cache was rebuilt"))
    assert load(sample, tmp_path, **DATES)["train"].to_list() == good["train"].to_list()


def test_other_write_errors_name_the_cache(sample, tmp_path, monkeypatch):
    fail_after(monkeypatch, "_write_part", 1, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(
        HupdCacheError, match=r"Could not write the HUPD cache .*PermissionError.*hupd_cache_dir="
    ) as info:
        load(sample, tmp_path, **DATES)
    assert str(tmp_path / "cache") in str(info.value)
    assert not list((tmp_path / "cache").iterdir())


def test_scratch_of_a_killed_build_is_removed_next_time(sample, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    host = hupd_build._host_id()
    dead = cache / f".sample-0123456789abcdef01234567.{host}-999999.k3j_x9ab.incomplete"
    alive = cache / f".sample-0123456789abcdef01234567.{host}-{os.getpid()}.a1b2c3d4.incomplete"
    elsewhere = cache / ".sample-0123456789abcdef01234567.0badc0de-999999.zz99zz99.incomplete"
    old_format = cache / ".sample-0123456789abcdef01234567.q1w2e3r4.incomplete"  # no pid: cannot tell
    for scratch in (dead, alive, elsewhere, old_format):
        (scratch / "partial").mkdir(parents=True)
        (scratch / "partial" / "train.arrow").write_bytes(b"half")
    monkeypatch.setattr(hupd_build, "_pid_alive", lambda pid: pid != 999999)
    load(sample, tmp_path, **DATES)
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists() and old_format.exists()
