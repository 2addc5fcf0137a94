"""load_hupd end to end on generated archives of both layouts (no network)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest

import hfplug.data.hupd as hupd
from hfplug.data.hupd import FEATURES, HupdFileError, load_hupd
from hfplug.data.hupd_splits import select_splits
from hfplug.data.hupd_synthetic import make_records, write_hupd_files

SMALL = dict(description_words=(20, 60), claims_words=(20, 40), background_words=(10, 20), summary_words=(10, 20))
DATES = dict(train_filing_start_date="2016-01-01", train_filing_end_date="2016-01-20",
             val_filing_start_date="2016-01-20", val_filing_end_date="2016-02-01")
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
    nulls = dict(records[0], application_number=NULLS, background=None, summary=None, claims=12345,
                 examiner_id=81234, patent_issue_date=None, cpc_labels=None)
    missing = dict(records[1], application_number=MISSING)
    malformed = dict(records[2], application_number=MALFORMED)
    return [*records, nulls, missing, malformed]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    """Sample layout with every kind of bad data: missing/malformed JSON, nulls, junk members."""
    root = tmp_path_factory.mktemp("sample")
    records = crafted_records()
    write_hupd_files(records, root / "meta.feather", root / "sample.tar.gz", omit_json_for=[MISSING, MALFORMED],
                     extra_members=JUNK,
                     metadata_extra_rows=[{"application_number": EXTRA_ROW, "filing_date": "2016-01-03",
                                           "decision": "ACCEPTED"}])
    return {"records": {r["application_number"]: r for r in records}, "metadata": root / "meta.feather",
            "archive": root / "sample.tar.gz"}


def load(files: dict, tmp_path: Path, **kwargs) -> datasets.DatasetDict:
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return load_hupd(kwargs.pop("name", "sample"), metadata_path=files["metadata"], archive_path=files["archive"],
                     **kwargs)


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
        expected = set(df["application_number"]) - skipped
        assert set(result[split]["application_number"]) == expected
        assert len(result[split]) == len(expected)  # junk members added nothing
        # archive order: members are sorted by name in the generated archive
        assert list(result[split]["application_number"]) == sorted(expected)


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

    monkeypatch.setattr(hupd, "_iter_archive", fail)
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


def test_streaming_equals_non_streaming(sample, tmp_path):
    built = load(sample, tmp_path, **DATES, val_set_balancer=True)
    streamed = load(sample, tmp_path, **DATES, val_set_balancer=True, streaming=True,
                    cache_dir=tmp_path / "stream_cache")
    assert isinstance(streamed, datasets.IterableDatasetDict)
    for split in built:
        assert streamed[split].features == FEATURES
        assert list(streamed[split]) == built[split].to_list()
    assert not (tmp_path / "stream_cache").exists()  # streaming writes no cache


@pytest.fixture(scope="module")
def all_years(tmp_path_factory) -> dict:
    """The ``all`` layout for 2015-2016, plus a corrupt ``2017.tar.gz`` that must never be opened."""
    root = tmp_path_factory.mktemp("all")
    records = make_records(40, seed=12, start_date="2015-12-01", end_date="2017-01-01", **SMALL)
    write_hupd_files(records, root / "meta.feather", root / "all.tar", layout="all",
                     extra_members=[("2017.tar.gz", b"\x1f\x8b not really gzip"), ("README.md", b"x"),
                                    ("2016/notes.txt", b"junk")],
                     metadata_extra_rows=[{"application_number": "15999999", "filing_date": "2017-03-01",
                                           "decision": "ACCEPTED"}])
    twin = root / "twin"  # the same records in the sample layout
    write_hupd_files(records, twin / "meta.feather", twin / "sample.tar.gz")
    return {"metadata": root / "meta.feather", "archive": root / "all.tar",
            "twin": {"metadata": twin / "meta.feather", "archive": twin / "sample.tar.gz"}}


def test_all_layout_reads_only_needed_years(all_years, tmp_path, caplog):
    dates = dict(train_filing_start_date="2016-01-01", train_filing_end_date="2016-06-01",
                 val_filing_start_date="2016-06-01", val_filing_end_date="2017-01-01")
    with caplog.at_level(logging.DEBUG, logger="hfplug.data.hupd"):
        result = load(all_years, tmp_path, name="all", **dates)
    read = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Reading ")]
    assert read == ["Reading 2016.tar.gz"]
    assert any("Skipping 2015.tar.gz" in r.getMessage() for r in caplog.records)
    twin = load(all_years["twin"], tmp_path, **dates)
    for split in result:
        assert result[split].to_list() == twin[split].to_list()
    assert len(result["train"]) and len(result["validation"])


def test_all_layout_corrupt_year_is_reported_when_needed(all_years, tmp_path):
    # 2017.tar.gz is junk: a selection that needs 2017 must fail loudly, naming the member
    with pytest.raises(HupdFileError, match="2017.tar.gz"):
        load(all_years, tmp_path, name="all", train_filing_start_date="2016-01-01", train_filing_end_date="2016-06-01",
             val_filing_start_date="2016-06-01", val_filing_end_date="2018-01-01")


# --- bad input files ---------------------------------------------------------------------


def test_missing_files(sample, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HUPD metadata file not found: .*nope.feather.*metadata_path"):
        load_hupd(metadata_path=tmp_path / "nope.feather", archive_path=sample["archive"], **DATES)
    with pytest.raises(FileNotFoundError, match=r"HUPD archive file not found: .*nope.tar.gz.*sample-jan-2016"):
        load_hupd(metadata_path=sample["metadata"], archive_path=tmp_path / "nope.tar.gz", **DATES)


def test_bad_arguments_fail_before_any_file_is_read(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        load_hupd("full", metadata_path=tmp_path / "x", archive_path=tmp_path / "y")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        load_hupd(metadata_path=tmp_path / "x", archive_path=tmp_path / "y", **{**DATES, "val_filing_end_date": "2016-2-1"})


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


@pytest.mark.parametrize("kind", ["truncated", "truncated_trailer", "bad_crc", "not_a_tar", "gzip_of_non_tar", "empty"])
def test_corrupt_archive(sample, tmp_path, kind):
    good = load(sample, tmp_path, **DATES)  # an earlier cache that must survive the failure
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(corrupt_variants(sample["archive"])[kind])
    with pytest.raises(HupdFileError) as info:
        load_hupd(metadata_path=sample["metadata"], archive_path=bad, cache_dir=tmp_path / "cache", **DATES)
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
        load_hupd("all", metadata_path=all_years["metadata"], archive_path=bad, cache_dir=tmp_path / "c",
                  uniform_split=True)


@pytest.mark.parametrize("content", [b"", b"not a feather file" * 10])
def test_corrupt_metadata(sample, tmp_path, content):
    bad = tmp_path / "meta.feather"
    bad.write_bytes(content)
    with pytest.raises(HupdFileError, match=r"HUPD metadata file .*meta.feather is unreadable.*download it again"):
        load_hupd(metadata_path=bad, archive_path=sample["archive"], cache_dir=tmp_path / "cache", **DATES)
    assert not list((tmp_path / "cache").glob("*"))


def test_metadata_without_needed_columns(sample, tmp_path):
    bad = tmp_path / "meta.feather"
    pd.DataFrame({"application_number": ["1"], "filing_date": pd.to_datetime(["2016-01-01"])}).to_feather(bad)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['decision', 'main_ipcr_label'"):
        load_hupd(metadata_path=bad, archive_path=sample["archive"], cache_dir=tmp_path / "cache", **DATES)


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
        result = load_hupd("sample", cache_dir=tmp_path / "cache", token=secret, **DATES)
    assert result["train"].to_list() == load(sample, tmp_path, **DATES)["train"].to_list()
    assert secret not in caplog.text
    assert not any(secret in p.read_text(errors="ignore") for p in (tmp_path / "cache").rglob("*.json"))

    with pytest.raises(Exception, match="could not fetch 'hupd_metadata_2022-02-22.feather'") as info:
        load_hupd("all", cache_dir=tmp_path / "cache", uniform_split=True)  # not in the offline cache
    assert "metadata_path" in "".join(getattr(info.value, "__notes__", []))


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
        load(sample, tmp_path, train_filing_start_date="2010-01-01", train_filing_end_date="2010-02-01",
             val_filing_start_date="2016-01-01", val_filing_end_date="2016-02-01")
    assert not list((tmp_path / "cache").glob("*"))


def test_query_on_any_metadata_column(sample, tmp_path):
    result = load(sample, tmp_path, uniform_split=True, query="small_entity_indicator == 'SMALL'")
    metadata = hupd.read_metadata(sample["metadata"]).set_index("application_number")
    kept = list(result["train"]["application_number"]) + list(result["validation"]["application_number"])
    assert kept and set(metadata.loc[kept, "small_entity_indicator"]) == {"SMALL"}
