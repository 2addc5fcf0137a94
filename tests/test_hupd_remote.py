"""hfplug.data.hupd_remote: HUPD's all-years tar read by range requests, through the real huggingface_hub client.

The loopback Hub (tests/hub_server.py) serves a generated four-year archive in the Hub's
layout and counts the bytes it sends; the tests check the records and those bytes.
"""

import logging
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import huggingface_hub.constants
import pytest
from hub_fixtures import WRITE, hub, no_ambient_token, online  # noqa: F401 (fixtures)

from hfplug.data import hupd_remote
from hfplug.data.hupd import HupdCacheError, load_hupd
from hfplug.data.hupd_archive import _iter_tar_gz
from hfplug.data.hupd_remote import HupdRemoteError, HupdYearMissingError, RangesUnsupported, RemoteArchive
from hfplug.testing.hupd_synthetic import make_records, write_hupd_files, write_hupd_sample

REPO_ID = "HUPD/hupd"
ARCHIVE = "data/all-years.tar"
YEARS = ("2013", "2014", "2015", "2016")


@pytest.fixture(scope="module")
def all_years(tmp_path_factory):
    """A four-year all-years.tar (~100 KB per year) and, per year, the JSON members it holds."""
    files = write_hupd_sample(
        tmp_path_factory.mktemp("years"),
        n_records=200,
        layout="all",
        start_date="2013-01-01",
        end_date="2017-01-01",
        description_words=(200, 600),
    )
    with tarfile.open(files.archive_path) as outer:
        members = {info.name: info for info in outer.getmembers()}
        records = {}
        for year in YEARS:
            with tarfile.open(fileobj=outer.extractfile(members[f"data/{year}.tar.gz"]), mode="r:gz") as inner:
                records[year] = {
                    f"data/{i.name}": inner.extractfile(i).read() for i in inner.getmembers() if i.isreg()
                }
    return {"archive": files.archive_path, "metadata": files.metadata_path, "members": members, "records": records}


@pytest.fixture
def served(hub, all_years, monkeypatch):
    """The loopback Hub serving the archive as HUPD/hupd; no waiting between reconnects."""
    monkeypatch.setattr(hupd_remote, "_RETRY_WAIT", 0.0)
    hub.add_dataset(REPO_ID, files={ARCHIVE: all_years["archive"]})
    return hub


def read_years(archive: RemoteArchive, years, all_years) -> dict[str, bytes]:
    """The JSON records of ``years``, each year tarball streamed and inflated as hupd_archive reads it."""
    wanted = {key for year in years for key in all_years["records"][year]}
    found = {}
    for info in archive.members():
        year = info.name[len("data/") : -len(".tar.gz")]
        if info.isreg() and year in years:
            with archive.open_member(info) as stream:
                for member in _iter_tar_gz(stream, wanted, prefix="data/"):
                    assert member.key not in found, f"{member.key} read twice"
                    found[member.key] = member.data
    return found


def member_table(infos) -> list[tuple[str, int, int]]:
    return [(i.name, i.offset_data, i.size) for i in infos]


def header_allowance(all_years) -> int:
    """What reading the member table may cost: a window per header, the end marker and the probe."""
    return (len(all_years["members"]) + 2) * hupd_remote._HEADER_WINDOW


def test_member_table_by_ranges(served, all_years):
    archive = RemoteArchive.open(REPO_ID, ARCHIVE, token=WRITE)
    table = member_table(archive.members())
    assert table == member_table(all_years["members"].values())
    assert archive.size == all_years["archive"].stat().st_size
    assert archive.revision == served.datasets[REPO_ID].sha and archive.revision in archive.url  # pinned
    assert served.sent[ARCHIVE] == archive.fetched <= header_allowance(all_years)
    gets = [r for r in served.file_requests if r.method == "GET"]
    assert gets and all(r.status == 206 and r.range and r.user == "alice" for r in gets)  # the user's token
    assert member_table(pickle.loads(pickle.dumps(archive)).members()) == table  # a streaming split's gen_kwargs


@pytest.mark.parametrize("cdn", [False, True], ids=["hub", "cdn-redirect"])
def test_streams_only_the_selected_years(served, all_years, cdn):
    served.cdn = cdn
    archive = RemoteArchive.open(REPO_ID, ARCHIVE, token=WRITE)
    found = read_years(archive, {"2014", "2016"}, all_years)
    assert found == {**all_years["records"]["2014"], **all_years["records"]["2016"]}
    selected = sum(all_years["members"][f"data/{y}.tar.gz"].size for y in ("2014", "2016"))
    sent = served.sent[ARCHIVE]
    assert sent == archive.fetched
    assert selected <= sent <= 1.1 * selected + header_allowance(all_years), (sent, selected)
    if cdn:  # the bytes came from the CDN, which never saw the token (it answers 400 to one)
        assert {r.route for r in served.file_requests if r.method == "GET" and r.status == 206} == {"cdn"}
        assert all(r.status != 400 for r in served.file_requests)
        assert all(r.user == "alice" for r in served.file_requests if r.route == "resolve")


def test_a_dropped_connection_resumes_inside_the_member(served, all_years, caplog):
    info = all_years["members"]["data/2015.tar.gz"]
    cut = info.offset_data + info.size // 2
    served.drop_once(ARCHIVE, cut)
    archive = RemoteArchive.open(REPO_ID, ARCHIVE, token=WRITE)
    with caplog.at_level(logging.WARNING, logger="hfplug.data.hupd"):
        found = read_years(archive, {"2015"}, all_years)  # asserts that no record comes twice
    assert found == all_years["records"]["2015"]
    assert "connection dropped while reading data/2015.tar.gz" in caplog.text
    ranges = [r.range for r in served.file_requests if r.method == "GET"]
    end = info.offset_data + info.size - 1
    assert ranges[-2:] == [f"bytes={info.offset_data}-{end}", f"bytes={cut}-{end}"]  # resumed at the cut
    assert served.sent[ARCHIVE] <= info.size + header_allowance(all_years)  # nothing fetched twice


def test_a_connection_that_keeps_dropping_gives_up(served, all_years, monkeypatch):
    monkeypatch.setattr(hupd_remote, "_MAX_RETRIES", 0)
    info = all_years["members"]["data/2013.tar.gz"]
    served.drop_once(ARCHIVE, info.offset_data + 5000)
    archive = RemoteArchive.open(REPO_ID, ARCHIVE, token=WRITE)
    with pytest.raises(HupdRemoteError, match=r"Reading data/2013.tar.gz \(byte 5,000 of .*hupd_archive_path"):
        read_years(archive, {"2013"}, all_years)


def test_made_without_a_request_then_connected(served):
    archive = RemoteArchive(REPO_ID, ARCHIVE, token=WRITE)
    assert archive.url == f"{served.url}/datasets/{REPO_ID}/resolve/main/{ARCHIVE}" and archive.size is None
    assert WRITE not in repr(archive)
    assert not served.file_requests
    assert archive.connect() is archive and archive.size == len(served.datasets[REPO_ID].files[ARCHIVE].read_bytes())
    assert [(r.method, r.range) for r in served.file_requests] == [("HEAD", None), ("GET", "bytes=0-2047")]


def test_a_server_without_ranges_is_told_apart(served):
    served.ranges = False
    with pytest.raises(RangesUnsupported, match=r"all-years.tar answered a request for bytes=0-2047 with HTTP 200"):
        RemoteArchive.open(REPO_ID, ARCHIVE, token=WRITE)


def test_a_missing_year_names_it_and_the_dates(served):
    archive = RemoteArchive.open(REPO_ID, ARCHIVE)
    archive.check_years(archive.members(), {"2014": "x", "2016": "y"})
    with pytest.raises(HupdYearMissingError) as info:
        archive.check_years(archive.members(), {"2016": "y", "2017": "3 applications filed 2017-01-02 to 2017-02-11"})
    message = str(info.value)
    assert "lacks data/2017.tar.gz for 3 applications filed 2017-01-02 to 2017-02-11" in message
    assert "2013, 2014, 2015, 2016" in message and "2016.tar.gz" not in message.split("holds")[0]


def test_errors_of_the_hub_pass_through(served):
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    with pytest.raises(EntryNotFoundError):
        RemoteArchive.open(REPO_ID, "data/nope.tar")
    with pytest.raises(RepositoryNotFoundError):
        RemoteArchive.open("HUPD/nope", ARCHIVE)


def test_hf_endpoint_is_honoured(served, all_years):
    """A fresh process with HF_ENDPOINT set, as a user would run it: every request reaches that endpoint."""
    code = (
        "from hfplug.data.hupd_remote import RemoteArchive\n"
        f"archive = RemoteArchive.open({REPO_ID!r}, {ARCHIVE!r})\n"
        "print(archive.url)\n"
        "print(sorted(i.name for i in archive.members()))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": served.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(all_years["archive"].parent)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    url, names = out.stdout.splitlines()
    assert url.startswith(f"{served.url}/datasets/{REPO_ID}/resolve/{served.datasets[REPO_ID].sha}/")
    assert names == str(sorted(all_years["members"]))


# --- load_hupd("all") from the Hub ----------------------------------------------------------

METADATA = "hupd_metadata_2022-02-22.feather"
DATES = dict(  # 2014 for train, 2015 for validation: two of the four years
    train_filing_start_date="2014-01-01",
    train_filing_end_date="2015-01-01",
    val_filing_start_date="2015-01-01",
    val_filing_end_date="2016-01-01",
)


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hub cache of this test's own: what the load downloads lands here."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    return tmp_path / "hub_cache"


@pytest.fixture
def hupd_hub(served, all_years, hub_cache):
    """HUPD/hupd on the loopback Hub with the generated metadata and archive under their Hub names."""
    served.datasets[REPO_ID].files[METADATA] = all_years["metadata"]
    return served


def local(all_years, tmp_path, **kwargs):
    """The same load from the local files: what the Hub load must give."""
    return load_hupd(
        "all",
        hupd_metadata_path=all_years["metadata"],
        hupd_archive_path=all_years["archive"],
        hupd_cache_dir=tmp_path / "local_splits",
        **{**DATES, **kwargs},
    )


def selected_size(all_years, *years) -> int:
    return sum(all_years["members"][f"data/{year}.tar.gz"].size for year in years)


def cached_files(root) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("cdn", [False, True], ids=["hub", "cdn-redirect"])
def test_load_all_fetches_only_the_selected_years(hupd_hub, all_years, tmp_path, hub_cache, cdn):
    hupd_hub.cdn = cdn  # as on the real Hub: LFS files answer with a redirect to a CDN, which gets no token
    result = load_hupd("all", hupd_cache_dir=tmp_path / "splits", token=WRITE, **DATES)
    expected = local(all_years, tmp_path)
    for split in ("train", "validation"):
        assert result[split].to_list() == expected[split].to_list()
        assert len(result[split])
    selected = selected_size(all_years, "2014", "2015")
    sent = hupd_hub.sent[ARCHIVE]
    assert selected <= sent <= 1.1 * selected + header_allowance(all_years), (sent, selected)
    assert hupd_hub.sent[METADATA] == all_years["metadata"].stat().st_size
    # on disk: the metadata in the Hub cache, the splits in hupd_cache_dir, nothing else
    blobs = {path: size for path, size in cached_files(hub_cache).items() if "/blobs/" in path}
    assert list(blobs.values()) == [all_years["metadata"].stat().st_size]
    assert not any("all-years" in path for path in cached_files(hub_cache))
    assert {Path(p).name for p in cached_files(tmp_path / "splits")} == {
        "train.arrow",
        "validation.arrow",
        "hfplug_hupd.json",
    }
    assert all(r.user == "alice" for r in hupd_hub.file_requests if r.route == "resolve")  # the user's token
    assert all(r.status != 400 for r in hupd_hub.file_requests)  # and none at the CDN

    # again, and again offline: the splits come from the cache, the archive is not asked for
    before = len([r for r in hupd_hub.file_requests if r.path == ARCHIVE])
    again = load_hupd("all", hupd_cache_dir=tmp_path / "splits", token=WRITE, **DATES)
    assert again["train"].to_list() == expected["train"].to_list()
    with pytest.MonkeyPatch.context() as offline:
        offline.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        again = load_hupd("all", hupd_cache_dir=tmp_path / "splits", **DATES)
    assert again["validation"].to_list() == expected["validation"].to_list()
    assert len([r for r in hupd_hub.file_requests if r.path == ARCHIVE]) == before


def test_a_parallel_build_from_the_hub(hupd_hub, all_years, tmp_path, caplog):
    """num_proc=2: each selected year fetched once, by its own process; the member table once, here."""
    with caplog.at_level(logging.INFO, logger="hfplug.data.hupd"):
        result = load_hupd("all", hupd_cache_dir=tmp_path / "splits", token=WRITE, num_proc=2, **DATES)
    assert "reading data/2015.tar.gz, data/2014.tar.gz in 2 processes" in caplog.text or (
        "reading data/2014.tar.gz, data/2015.tar.gz in 2 processes" in caplog.text
    )
    expected = local(all_years, tmp_path)
    for split in ("train", "validation"):
        assert result[split].to_list() == expected[split].to_list()
    selected = selected_size(all_years, "2014", "2015")
    sent = hupd_hub.sent[ARCHIVE]
    assert selected <= sent <= 1.1 * selected + header_allowance(all_years), (sent, selected)
    assert f"fetched {sent / 1e6:.1f} MB of the" in caplog.text  # the workers' bytes counted too
    ranges = [r.range for r in hupd_hub.file_requests if r.method == "GET" and r.path == ARCHIVE]
    for year in ("2014", "2015"):
        info = all_years["members"][f"data/{year}.tar.gz"]
        assert ranges.count(f"bytes={info.offset_data}-{info.offset_data + info.size - 1}") == 1
    assert all(r.user == "alice" for r in hupd_hub.file_requests if r.route == "resolve")  # the token, in each process


def test_streaming_all_from_the_hub(hupd_hub, all_years, tmp_path):
    streamed = load_hupd("all", streaming=True, hupd_cache_dir=tmp_path / "splits", token=WRITE, **DATES)
    expected = local(all_years, tmp_path)
    for split in ("train", "validation"):
        rows = list(streamed[split])
        assert rows == sorted(expected[split].to_list(), key=lambda row: row["application_number"])
    assert not (tmp_path / "splits").exists()  # no Arrow cache
    selected = selected_size(all_years, "2014", "2015")  # train reads 2014, validation 2015
    sent = hupd_hub.sent[ARCHIVE]
    assert selected <= sent <= 1.1 * selected + 2 * header_allowance(all_years), (sent, selected)


def test_load_all_resumes_a_dropped_connection(hupd_hub, all_years, tmp_path, caplog):
    info = all_years["members"]["data/2015.tar.gz"]
    hupd_hub.drop_once(ARCHIVE, info.offset_data + info.size // 3)
    with caplog.at_level(logging.WARNING, logger="hfplug.data.hupd"):
        result = load_hupd("all", hupd_cache_dir=tmp_path / "splits", token=WRITE, **DATES)
    expected = local(all_years, tmp_path)
    for split in ("train", "validation"):
        assert result[split].to_list() == expected[split].to_list()  # no row twice, none lost
    assert "connection dropped while reading data/2015.tar.gz" in caplog.text
    selected = selected_size(all_years, "2014", "2015")
    assert hupd_hub.sent[ARCHIVE] <= 1.1 * selected + header_allowance(all_years)


def test_a_connection_that_stays_down_fails_the_load_cleanly(hupd_hub, all_years, tmp_path, monkeypatch):
    monkeypatch.setattr(hupd_remote, "_MAX_RETRIES", 0)
    info = all_years["members"]["data/2014.tar.gz"]
    hupd_hub.drop_once(ARCHIVE, info.offset_data + 5000)
    with pytest.raises(HupdRemoteError, match="Reading data/2014.tar.gz") as raised:
        load_hupd("all", hupd_cache_dir=tmp_path / "splits", token=WRITE, **DATES)
    assert not isinstance(raised.value, HupdCacheError)  # not mistaken for a full disk, nor a corrupt download
    assert "delete it" not in str(raised.value)
    assert not any((tmp_path / "splits").rglob("*.arrow"))  # no half-built cache


def test_a_server_without_ranges_falls_back_to_the_whole_file(hupd_hub, all_years, tmp_path, hub_cache, caplog):
    hupd_hub.ranges = False
    with caplog.at_level(logging.WARNING, logger="hfplug.data.hupd"):
        result = load_hupd("all", hupd_cache_dir=tmp_path / "splits", token=WRITE, **DATES)
    expected = local(all_years, tmp_path)
    assert result["train"].to_list() == expected["train"].to_list()
    warning = caplog.text
    assert "answered a request for bytes=0-2047 with HTTP 200" in warning
    assert f"downloading the whole {ARCHIVE}" in warning
    assert any(size == all_years["archive"].stat().st_size for size in cached_files(hub_cache).values())


def test_a_year_missing_from_the_hub_archive(hub, hub_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(hupd_remote, "_RETRY_WAIT", 0.0)
    records = make_records(40, seed=3, start_date="2015-07-01", end_date="2016-07-01")
    in_2016 = [r["application_number"] for r in records if r["filing_date"].startswith("2016")]
    files = tmp_path / "files"
    write_hupd_files(records, files / METADATA, files / "all.tar", layout="all", omit_json_for=in_2016)
    hub.add_dataset(REPO_ID, files={METADATA: files / METADATA, ARCHIVE: files / "all.tar"})
    dates = dict(
        train_filing_start_date="2015-07-01",
        train_filing_end_date="2016-01-01",
        val_filing_start_date="2016-01-01",
        val_filing_end_date="2016-07-01",
    )
    with pytest.raises(HupdYearMissingError) as raised:
        load_hupd("all", hupd_cache_dir=tmp_path / "splits", **dates)
    message = str(raised.value)
    first, last = (
        min(r["filing_date"] for r in records if r["application_number"] in in_2016),
        max(r["filing_date"] for r in records if r["application_number"] in in_2016),
    )
    assert f"lacks data/2016.tar.gz for {len(in_2016)} selected applications filed" in message
    assert f"{first[:4]}-{first[4:6]}-{first[6:]} to {last[:4]}-{last[4:6]}-{last[6:]}" in message
    assert "It holds the years 2015" in message
    assert not [r for r in hub.file_requests if r.path == ARCHIVE and r.range and r.range.endswith("-")]
    assert hub.sent[ARCHIVE] <= 4 * hupd_remote._HEADER_WINDOW  # only headers were read
