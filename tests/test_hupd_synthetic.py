"""The synthetic HUPD generator: reproducible bytes, the real schema and layouts, a learnable signal."""

from __future__ import annotations

import collections
import gzip
import io
import json
import re
import tarfile

import pandas as pd
import pytest

from hfplug.testing.hupd_synthetic import (
    ACCEPT_MARKERS,
    DECISIONS,
    IPC_SUBCLASSES,
    REJECT_MARKERS,
    HardLink,
    make_records,
    write_hupd_files,
    write_hupd_sample,
)

RECORD_KEYS = [
    "application_number",
    "publication_number",
    "title",
    "decision",
    "date_produced",
    "date_published",
    "main_cpc_label",
    "cpc_labels",
    "main_ipcr_label",
    "ipcr_labels",
    "patent_number",
    "filing_date",
    "patent_issue_date",
    "abandon_date",
    "uspc_class",
    "uspc_subclass",
    "examiner_id",
    "examiner_name_last",
    "examiner_name_first",
    "examiner_name_middle",
    "inventor_list",
    "abstract",
    "claims",
    "background",
    "summary",
    "full_description",
]
INVENTOR_KEYS = {"inventor_name_last", "inventor_name_first", "inventor_city", "inventor_state", "inventor_country"}
SMALL = dict(description_words=(20, 60), claims_words=(20, 40), background_words=(10, 20), summary_words=(10, 20))


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return make_records(300, seed=3, **SMALL)


@pytest.mark.parametrize("layout", ["sample", "all"])
def test_same_seed_same_bytes(tmp_path, layout):
    kwargs = dict(n_records=30, seed=7, layout=layout, start_date="2015-12-01", end_date="2016-02-01", **SMALL)
    first = write_hupd_sample(tmp_path / "a", **kwargs)
    second = write_hupd_sample(tmp_path / "b", **kwargs)
    assert first.archive_path.read_bytes() == second.archive_path.read_bytes()
    assert first.metadata_path.read_bytes() == second.metadata_path.read_bytes()
    other = write_hupd_sample(tmp_path / "c", **{**kwargs, "seed": 8})
    assert other.archive_path.read_bytes() != first.archive_path.read_bytes()


def test_hub_file_names(tmp_path):
    sample = write_hupd_sample(tmp_path / "s", n_records=6, **SMALL)
    assert (sample.metadata_path.name, sample.archive_path.name) == (
        "hupd_metadata_jan16_2022-02-22.feather",
        "sample-jan-2016.tar.gz",
    )
    every = write_hupd_sample(tmp_path / "a", n_records=6, layout="all", **SMALL)
    assert (every.metadata_path.name, every.archive_path.name) == ("hupd_metadata_2022-02-22.feather", "all-years.tar")
    assert sample.n_records == every.n_records == 6


def test_full_record_schema(records):
    for record in records:
        assert list(record) == RECORD_KEYS
        assert re.fullmatch(r"\d{8}", record["application_number"])
        assert re.fullmatch(r"201601\d\d", record["filing_date"])
        assert all(set(inventor) == INVENTOR_KEYS for inventor in record["inventor_list"])
        for label in record["ipcr_labels"]:
            assert re.fullmatch(r"[A-H]\d\d[A-Z]\d+/\d+", label) and label[:4] in IPC_SUBCLASSES
        assert record["main_ipcr_label"] == record["ipcr_labels"][0]
        assert record["main_cpc_label"][:4] == record["main_ipcr_label"][:4]
        json.dumps(record)  # JSON-able
    assert len({r["application_number"] for r in records}) == len(records)


def test_all_six_decisions_and_patent_numbers(records):
    assert {r["decision"] for r in make_records(6, **SMALL)} == set(DECISIONS)
    assert {r["decision"] for r in records} == set(DECISIONS)
    for record in records:
        accepted = record["decision"] in ("ACCEPTED", "CONT-ACCEPTED")
        assert (record["patent_number"] is not None) == accepted
        assert (record["patent_issue_date"] is not None) == accepted


def test_abstract_lengths(records):
    lengths = [len(r["abstract"].split()) for r in records]
    assert min(lengths) >= 50 and max(lengths) <= 250
    assert max(lengths) - min(lengths) > 100  # spread, not one size


def test_section_sizes_are_configurable():
    small, big = make_records(5, seed=1, **SMALL), make_records(5, seed=1, description_words=(2000, 2000))
    assert max(len(r["full_description"].split()) for r in small) < 200
    assert min(len(r["full_description"].split()) for r in big) >= 2000


def test_filing_dates_within_range():
    dates = {r["filing_date"] for r in make_records(80, start_date="2015-12-30", end_date="2016-01-02", **SMALL)}
    assert dates <= {"20151230", "20151231", "20160101"} and len(dates) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="end_date"):
        make_records(3, start_date="2016-02-01", end_date="2016-01-01")
    with pytest.raises(ValueError, match="start_date must be a date in YYYY-MM-DD"):
        make_records(3, start_date="01/01/2016")
    with pytest.raises(ValueError, match="layout"):
        write_hupd_sample("/nonexistent", layout="zip")


def _bag(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_decision_is_learnable_from_title_and_abstract(records):
    # a trivial rule on the marker words is right on ~SIGNAL_RATE (95%) of ACCEPTED/REJECTED records: learnable, not perfect
    labelled = [r for r in records if r["decision"] in ("ACCEPTED", "REJECTED")]
    correct = 0
    for r in labelled:
        words = _bag(r["title"] + " " + r["abstract"])
        guess = "ACCEPTED" if len(words & set(ACCEPT_MARKERS)) >= len(words & set(REJECT_MARKERS)) else "REJECTED"
        correct += guess == r["decision"]
    assert 0.88 <= correct / len(labelled) < 1.0


def test_ipc_subclass_is_learnable_from_topic_words(records):
    correct = 0
    for r in records:
        words = _bag(r["abstract"])
        scores = {sub: len(words & set(topic)) for sub, (_, _, topic) in IPC_SUBCLASSES.items()}
        correct += max(scores, key=scores.get) == r["main_ipcr_label"][:4]
    assert correct / len(records) > 0.95


def test_sample_layout_members(tmp_path, records):
    write_hupd_files(
        records[:5],
        tmp_path / "m.feather",
        tmp_path / "a.tar.gz",
        omit_json_for=[records[0]["application_number"]],
        extra_members=[("sample/README.txt", b"hi"), ("sample/2016/junk", None)],
        metadata_extra_rows=[{"application_number": "19999999", "filing_date": "2016-01-05"}],
    )
    with tarfile.open(tmp_path / "a.tar.gz", "r:gz") as tar:
        names = tar.getnames()
        assert tar.getmember("sample/2016/junk").isdir()
        payload = json.load(tar.extractfile(f"sample/2016/{records[1]['application_number']}.json"))
    assert payload == records[1]
    assert names == sorted(names)
    expected = {f"sample/2016/{r['application_number']}.json" for r in records[1:5]}
    assert {n for n in names if n.endswith(".json")} == expected
    assert {"sample", "sample/2016", "sample/README.txt"} <= set(names)
    df = pd.read_feather(tmp_path / "m.feather")
    assert list(df["application_number"]) == [r["application_number"] for r in records[:5]] + ["19999999"]
    assert pd.api.types.is_datetime64_any_dtype(df["filing_date"])
    assert {
        "decision",
        "main_ipcr_label",
        "main_cpc_label",
        "patent_number",
        "examiner_id",
        "examiner_art_unit",
        "small_entity_indicator",
        "continuation",
    } <= set(df.columns)


def test_all_layout_members(tmp_path):
    records = make_records(12, seed=2, start_date="2015-12-20", end_date="2016-01-10", **SMALL)
    write_hupd_files(
        records,
        tmp_path / "m.feather",
        tmp_path / "all.tar",
        layout="all",
        extra_members=[("README", b"x"), ("2016/notes.txt", b"y")],
    )
    with tarfile.open(tmp_path / "all.tar", "r:") as outer:  # uncompressed outer tar, years under data/ as on the Hub
        assert outer.getnames() == ["README", "data", "data/2015.tar.gz", "data/2016.tar.gz"]
        inner = outer.extractfile("data/2016.tar.gz").read()
    assert gzip.decompress(inner)  # each year is a gzip
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as year:
        names = year.getnames()
    assert "2016/notes.txt" in names
    counts = collections.Counter(r["filing_date"][:4] for r in records)
    assert len([n for n in names if n.endswith(".json")]) == counts["2016"]
    assert all(n == "2016" or n.startswith("2016/") for n in names)


def test_repeated_names_keep_their_order_and_hard_links(tmp_path):
    records = make_records(2, seed=4, **SMALL)
    number = records[0]["application_number"]
    write_hupd_files(
        records,
        tmp_path / "m.feather",
        tmp_path / "a.tar.gz",
        extra_members=[
            (f"sample/2016/{number}.json", b"second"),
            (f"sample/2016/{number}.json", b"third"),
            ("sample/2016/link.json", HardLink(f"sample/2016/{number}.json")),
        ],
    )
    with tarfile.open(tmp_path / "a.tar.gz", "r:gz") as tar:
        copies = [m for m in tar.getmembers() if m.name == f"sample/2016/{number}.json"]
        assert [tar.extractfile(m).read()[:6] for m in copies] == [b'{"appl', b"second", b"third"]
        link = tar.getmember("sample/2016/link.json")
        assert link.islnk() and link.linkname == f"sample/2016/{number}.json"
        assert tar.extractfile(link).read() == b"third"  # tarfile reads a link as its target's last copy before it
