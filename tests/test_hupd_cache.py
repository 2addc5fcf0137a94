"""load_hupd's cache at scale: only the columns asked for, a parallel build with the same bytes, the
disk-space check before writing, and a build killed half-way (no network)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

import hfplug.data.hupd_build as hupd_build
import hfplug.data.hupd_disk as hupd_disk
import hfplug.data.hupd_split_files as hupd_split_files
import hfplug.data.hupd_units as hupd_units
from hfplug.arguments import HupdArguments
from hfplug.data.hupd import FEATURES, KEPT_COLUMNS, HupdCacheError, HupdFileError, load_hupd
from hfplug.data.tasks import (
    DEFAULT_TEXT_FIELDS,
    LABEL_FIELDS,
    TASKS,
    join_text_fields,
    parse_text_fields,
    prepare_task,
    task_columns,
)
from hfplug.testing.hupd_synthetic import HardLink, make_records, write_hupd_files

SMALL = dict(description_words=(20, 60), claims_words=(20, 40), background_words=(10, 20), summary_words=(10, 20))
DATES = dict(
    train_filing_start_date="2016-01-01",
    train_filing_end_date="2016-01-20",
    val_filing_start_date="2016-01-20",
    val_filing_end_date="2016-02-01",
)
YEARS = dict(  # the multi-year fixture: train 2013-2014, validation 2015-2016
    train_filing_start_date="2013-01-01",
    train_filing_end_date="2015-01-01",
    val_filing_start_date="2015-01-01",
    val_filing_end_date="2017-01-01",
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sample")
    write_hupd_files(make_records(80, seed=51, **SMALL), root / "meta.feather", root / "sample.tar.gz")
    return {"metadata": root / "meta.feather", "archive": root / "sample.tar.gz"}


def load(files: dict, tmp_path: Path, **kwargs):
    kwargs.setdefault("hupd_cache_dir", tmp_path / "cache")
    hupd_config = "all" if files["archive"].name.endswith(".tar") else "sample"
    return load_hupd(hupd_config, hupd_metadata_path=files["metadata"], hupd_archive_path=files["archive"], **kwargs)


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def no_archive_reads(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the archive was read again")

    monkeypatch.setattr(hupd_units, "_iter_archive", fail)


# --- columns --------------------------------------------------------------------------------


def test_columns_keep_those_fields_and_the_kept_ones(sample, tmp_path):
    pruned = load(sample, tmp_path, **DATES, columns=["abstract", "title"])
    full = load(sample, tmp_path, **DATES)  # (built second: the pruned load would reuse it)
    expected = [name for name in FEATURES if name in {"title", "abstract", *KEPT_COLUMNS}]
    for split in ("train", "validation"):
        assert list(pruned[split].features) == expected  # FEATURES order, whatever order was asked
        assert pruned[split].features == datasets.Features({name: FEATURES[name] for name in expected})
        assert pruned[split].to_list() == full[split].select_columns(expected).to_list()  # same rows and values
    sizes = sorted(p.stat().st_size for p in (tmp_path / "cache").glob("*/train.arrow"))
    assert len(sizes) == 2 and sizes[0] < 0.8 * sizes[1]  # (the fixture's abstracts are long, its descriptions short)


def test_bad_columns_name_the_valid_ones(tmp_path):
    for columns in (["title", "full_description"], ["claim"], [3]):
        with pytest.raises(
            ValueError, match=r"Unknown HUPD column\(s\) .*Valid: patent_number, decision, title"
        ) as info:
            load_hupd(hupd_metadata_path=tmp_path / "x", hupd_archive_path=tmp_path / "y", columns=columns, **DATES)
        assert "application_number" in str(info.value) and "'description'" in str(info.value)
    for num_proc in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_proc must be a whole number >= 1"):
            load_hupd(hupd_metadata_path=tmp_path / "x", hupd_archive_path=tmp_path / "y", num_proc=num_proc, **DATES)


def test_the_cache_key_includes_the_columns(sample, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    some = load(sample, tmp_path, **DATES, columns=["title", "claims"])
    assert len(entries(cache)) == 1
    load(sample, tmp_path, **DATES, columns=["title"])  # fewer: the cache that holds them is reused
    load(sample, tmp_path, **DATES, columns=["claims", "title", "decision"])  # the same stored set
    assert len(entries(cache)) == 1
    load(sample, tmp_path, **DATES, columns=["title", "summary"])  # one more: a cache of its own
    assert len(entries(cache)) == 2
    everything = load(sample, tmp_path, **DATES)  # every field: a cache of its own, the name it always had
    assert len(entries(cache)) == 3 and any(not re.search(r"-[0-9a-f]{8}$", name) for name in entries(cache))
    assert load(sample, tmp_path, **DATES, columns=list(FEATURES))["train"].to_list() == everything["train"].to_list()

    no_archive_reads(monkeypatch)
    abstracts = load(sample, tmp_path, **DATES, columns=["abstract"])  # only the full cache holds it
    assert abstracts["train"]["abstract"] == everything["train"]["abstract"]
    assert list(abstracts["train"].features) == [n for n in FEATURES if n in {"abstract", *KEPT_COLUMNS}]
    titles = load(sample, tmp_path, **DATES, columns=["title"])  # the smallest cache that holds it
    assert titles["train"].cache_files[0]["filename"] == some["train"].cache_files[0]["filename"]
    assert len(entries(cache)) == 3
    with pytest.raises(AssertionError, match="read again"):  # another selection: another cache
        load(sample, tmp_path, **DATES, columns=["title"], ipcr_label="G06F")


def test_streaming_yields_only_the_columns(sample, tmp_path):
    built = load(sample, tmp_path, **DATES, columns=["claims"])
    streamed = load(sample, tmp_path, **DATES, columns=["claims"], streaming=True)
    for split in ("train", "validation"):
        assert streamed[split].features == built[split].features
        rows = sorted(streamed[split], key=lambda row: row["application_number"])
        assert rows == sorted(built[split].to_list(), key=lambda row: row["application_number"])


@pytest.mark.parametrize("task", TASKS)
def test_the_columns_of_a_task_are_all_it_reads(sample, tmp_path, task):
    text_fields = {"decision": "title,claims", "ipc": None, "abstract": "claims,summary"}[task]
    columns = task_columns(task, text_fields)
    sources = parse_text_fields(text_fields or DEFAULT_TEXT_FIELDS[task])
    assert columns == list(dict.fromkeys([*sources, LABEL_FIELDS[task]]))
    data = prepare_task(load(sample, tmp_path, uniform_split=True, columns=columns), task, text_fields=text_fields)
    full = prepare_task(load(sample, tmp_path, uniform_split=True), task, text_fields=text_fields)
    assert data.label_names == full.label_names and data.dropped == full.dropped
    for split in ("train", "validation"):
        assert data.splits[split]["application_number"] == full.splits[split]["application_number"]
        batch, whole = data.splits[split][:8], full.splits[split][:8]
        assert join_text_fields(batch, sources, " | ") == join_text_fields(whole, sources, " | ")
    assert task_columns("decision") == ["title", "abstract", "decision"]
    assert task_columns("ipc") == ["title", "abstract", "ipc_label"]
    assert task_columns("abstract") == ["claims", "abstract"]


def test_the_recipe_flag_is_num_proc():
    assert HupdArguments(preprocessing_num_workers=3).load_hupd_kwargs()["num_proc"] == 3
    assert HupdArguments().load_hupd_kwargs()["num_proc"] is None


# --- a parallel build -------------------------------------------------------------------------


def payload(record: dict, **changes) -> bytes:
    return json.dumps(dict(record, **changes)).encode()


@pytest.fixture(scope="module")
def years(tmp_path_factory) -> dict:
    """Four year tarballs (2013-2016) with what makes copies compete: a loose copy, a loose-only
    record, a path stored twice in a year, a hard link, and a 2015 path inside 2016's tarball."""
    root = tmp_path_factory.mktemp("years")
    records = make_records(120, seed=52, start_date="2013-01-01", end_date="2017-01-01", **SMALL)
    by_year: dict[str, list[dict]] = {}
    for record in records:
        by_year.setdefault(record["filing_date"][:4], []).append(record)
    twice, foreign = by_year["2013"][0], by_year["2015"][0]
    loose, alone, link, target = by_year["2014"][:4]
    chosen = dict(twice=twice, loose=loose, alone=alone, link=link, target=target, foreign=foreign)
    n = {name: record["application_number"] for name, record in chosen.items()}
    write_hupd_files(
        records,
        root / "meta.feather",
        root / "all.tar",
        layout="all",
        omit_json_for=[n["alone"], n["link"]],
        extra_members=[
            (f"2013/{n['twice']}.json", payload(twice, title="second copy")),  # after the first: it counts
            (f"data/2014/{n['loose']}.json", payload(loose, title="loose")),  # the year tarball's copy counts
            (f"data/2014/{n['alone']}.json", payload(alone, title="loose only")),  # the only copy
            (f"2014/{n['link']}.json", HardLink(f"2014/{n['target']}.json")),
            (f"2016/../2015/{n['foreign']}.json", payload(foreign, title="in 2016's tarball")),  # unpacks last
            ("README.md", b"junk"),
        ],
    )
    titles = {r["application_number"]: r["title"] for r in records}
    titles.update({n["twice"]: "second copy", n["alone"]: "loose only", n["link"]: target["title"]})
    titles[n["foreign"]] = "in 2016's tarball"
    return {"metadata": root / "meta.feather", "archive": root / "all.tar", "titles": titles, "numbers": n}


def cache_bytes(cache: Path) -> dict[str, bytes]:
    (built,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return {p.name: p.read_bytes() for p in sorted(built.iterdir())}


@pytest.mark.parametrize("columns", [None, ["title"]], ids=["all-fields", "title"])
def test_a_parallel_build_writes_the_same_bytes(years, tmp_path, columns, caplog):
    one = load(years, tmp_path, **YEARS, columns=columns, num_proc=1, hupd_cache_dir=tmp_path / "one")
    with caplog.at_level("INFO", logger="hfplug.data.hupd"):
        two = load(years, tmp_path, **YEARS, columns=columns, num_proc=2, hupd_cache_dir=tmp_path / "two")
    assert "in 2 processes" in caplog.text
    assert "holds selected records outside data/2016/; reading it again" in caplog.text  # the foreign copy
    assert "the cache needs about" in caplog.text  # a worker's log, handled here
    assert cache_bytes(tmp_path / "one") == cache_bytes(tmp_path / "two")  # splits and info, byte for byte
    for split in ("train", "validation"):
        assert one[split].to_list() == two[split].to_list()
    rows = {row["application_number"]: row for split in two.values() for row in split}
    assert {number: row["title"] for number, row in rows.items()} == years["titles"]
    assert rows[years["numbers"]["link"]].get("patent_number", years["numbers"]["link"]) == years["numbers"]["link"]
    assert len(one["train"]) and len(one["validation"])
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]  # scratch removed


def test_splits_written_in_parts_are_the_bytes_one_process_writes(years, tmp_path, monkeypatch):
    """With 7-row batches, two processes write each split in parts (batches from several years each),
    joined afterwards: the same bytes as one process, the same rows as one big batch. The records files
    are read through memory maps held for a batch: none outlives the build, holding a deleted file's space."""
    whole = load(years, tmp_path, **YEARS, num_proc=2, hupd_cache_dir=tmp_path / "whole")
    monkeypatch.setattr(hupd_split_files, "_WRITER_BATCH_SIZE", 7)
    load(years, tmp_path, **YEARS, num_proc=1, hupd_cache_dir=tmp_path / "one")
    two = load(years, tmp_path, **YEARS, num_proc=2, hupd_cache_dir=tmp_path / "two")
    assert cache_bytes(tmp_path / "one") == cache_bytes(tmp_path / "two")
    for split in ("train", "validation"):
        assert two[split].to_list() == whole[split].to_list()
        (built,) = (tmp_path / "two").iterdir()
        batches = pa.ipc.open_stream((built / f"{split}.arrow").read_bytes())
        assert datasets.Features.from_arrow_schema(batches.schema) == FEATURES
        sizes = [batch.num_rows for batch in batches]
        assert len(sizes) > 2 and set(sizes[:-1]) == {7} and sum(sizes) == len(two[split])
    assert sorted(p.name for p in built.iterdir()) == [
        "hfplug_hupd.json",
        "train.arrow",
        "validation.arrow",
    ]  # no part left
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert not re.search(r"records-\d+\.arrow", maps.read_text())  # hupd_units._RECORDS_FILE


SPAWNED_BUILD = textwrap.dedent(
    """
    import logging, multiprocessing, sys
    from hfplug.data.hupd import load_hupd

    if __name__ == "__main__":  # the processes start fresh and import this script
        logging.basicConfig(level=logging.INFO)
        multiprocessing.set_start_method("spawn")  # macOS's and Windows' default (forkserver: Linux from 3.14)
        metadata, archive, cache = sys.argv[1:]
        load_hupd("all", hupd_metadata_path=metadata, hupd_archive_path=archive, hupd_cache_dir=cache,
                  uniform_split=True, num_proc=2)
    """
)


def test_a_build_in_spawned_processes_writes_the_same_bytes(years, tmp_path):
    """Where processes do not fork, what they are sent (jobs, parts) crosses by pickling: same bytes."""
    load(years, tmp_path, uniform_split=True, num_proc=1, hupd_cache_dir=tmp_path / "one")
    script = tmp_path / "build.py"
    script.write_text(SPAWNED_BUILD)
    args = [str(years["metadata"]), str(years["archive"]), str(tmp_path / "spawned")]
    spawned = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert spawned.returncode == 0, spawned.stderr[-2000:]
    assert "in 2 processes" in spawned.stderr
    assert cache_bytes(tmp_path / "one") == cache_bytes(tmp_path / "spawned")


def test_a_parallel_build_leaves_the_collector_as_it_found_it(years, tmp_path):
    """The build freezes this process's objects while it forks. A library caller gets them back to the collector;
    a recipe, whose imports hfplug.cli.run froze, keeps them frozen (unfreezing would undo that)."""
    import gc

    assert gc.get_freeze_count() == 0
    load(years, tmp_path, **YEARS, num_proc=2, hupd_cache_dir=tmp_path / "library")
    assert gc.get_freeze_count() == 0, "objects left out of the collector's sight: their cycles would never be freed"
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        load(years, tmp_path, **YEARS, num_proc=2, hupd_cache_dir=tmp_path / "recipe")
        assert gc.get_freeze_count() >= frozen, "the recipe's frozen imports were handed back to the collector"
    finally:
        gc.unfreeze()


def test_a_parallel_build_agrees_with_the_sample_layout(tmp_path):
    """Without competing copies, the all-years layout read by 3 processes gives the sample layout's rows."""
    records = make_records(90, seed=53, start_date="2014-01-01", end_date="2017-01-01", **SMALL)
    every = {"metadata": tmp_path / "a" / "m.feather", "archive": tmp_path / "a" / "all.tar"}
    twin = {"metadata": tmp_path / "s" / "m.feather", "archive": tmp_path / "s" / "s.tar.gz"}
    write_hupd_files(records, every["metadata"], every["archive"], layout="all")
    write_hupd_files(records, twin["metadata"], twin["archive"])
    for kwargs in (dict(uniform_split=True), dict(uniform_split=True, val_set_balancer=True)):
        parallel = load(every, tmp_path, num_proc=3, **kwargs)
        serial = load(twin, tmp_path, num_proc=3, **kwargs)  # one gzip stream: one process, whatever num_proc
        for split in ("train", "validation"):
            assert parallel[split].to_list() == serial[split].to_list()


def test_a_corrupt_year_stops_a_parallel_build_cleanly(years, tmp_path):
    good = load(years, tmp_path, **YEARS, num_proc=2)
    data = bytearray(years["archive"].read_bytes())
    import tarfile

    with tarfile.open(years["archive"]) as tar:
        info = tar.getmember("data/2014.tar.gz")
    data[info.offset_data + info.size // 2 : info.offset_data + info.size // 2 + 64] = b"\0" * 64
    bad = {"metadata": years["metadata"], "archive": tmp_path / "all.tar"}
    bad["archive"].write_bytes(bytes(data))
    with pytest.raises(HupdFileError, match=r"all\.tar is unreadable.*2014\.tar\.gz"):
        load(bad, tmp_path, **YEARS, num_proc=2)
    assert len(entries(tmp_path / "cache")) == 1  # the good cache only: nothing half-built
    assert load(years, tmp_path, **YEARS, num_proc=2)["train"].to_list() == good["train"].to_list()


# --- disk space -------------------------------------------------------------------------------


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the processes inherit the patch by forking")
def test_a_disk_that_fills_while_the_processes_write_the_splits(tmp_path, monkeypatch):
    """The processes that read the archive also write the splits; a full disk there is the same error as
    in one process, with the room needed estimated from what they read, and nothing half-built is left."""
    records = make_records(60, seed=54, start_date="2014-01-01", end_date="2017-01-01", **SMALL)
    clean = {"metadata": tmp_path / "m.feather", "archive": tmp_path / "all.tar"}  # read by the processes only
    write_hupd_files(records, clean["metadata"], clean["archive"], layout="all")
    good = load(clean, tmp_path, uniform_split=True, num_proc=2)

    def full_disk(columns):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hupd_split_files, "features_for", full_disk)  # as _write_part starts a split's part
    with pytest.raises(HupdCacheError) as info:
        load(clean, tmp_path, uniform_split=True, val_set_balancer=True, num_proc=2)  # another selection: a build
    assert re.search(r"^The disk is full: .* needs about [1-9]\d* [KMG]?B \(", str(info.value)), str(info.value)
    assert len(entries(tmp_path / "cache")) == 1  # the good cache only: no scratch, no parts
    assert load(clean, tmp_path, uniform_split=True, num_proc=2)["train"].to_list() == good["train"].to_list()


def test_a_disk_that_fills_while_a_split_is_joined(tmp_path, monkeypatch):
    """A full disk while the parts of a split are joined into one file is the usual error, and leaves no
    process, no scratch and no part behind."""
    records = make_records(60, seed=55, start_date="2014-01-01", end_date="2017-01-01", **SMALL)
    clean = {"metadata": tmp_path / "m.feather", "archive": tmp_path / "all.tar"}
    write_hupd_files(records, clean["metadata"], clean["archive"], layout="all")
    good = load(clean, tmp_path, uniform_split=True, num_proc=2)
    joined = []

    def join_on_a_full_disk(parts):
        joined.append(parts[0].path.name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hupd_build, "_join", join_on_a_full_disk)
    with pytest.raises(HupdCacheError, match=r"^The disk is full: "):
        load(clean, tmp_path, uniform_split=True, val_set_balancer=True, num_proc=2)
    assert joined == ["train.arrow"]
    assert not multiprocessing.active_children()
    assert len(entries(tmp_path / "cache")) == 1  # the good cache only
    assert load(clean, tmp_path, uniform_split=True, num_proc=2)["train"].to_list() == good["train"].to_list()


@pytest.mark.parametrize("num_proc", [1, 2])
def test_not_enough_disk_is_refused_before_writing(years, tmp_path, monkeypatch, num_proc):
    good = load(years, tmp_path, **YEARS, columns=["title"])  # an earlier cache that must survive
    opened = []
    monkeypatch.setattr(hupd_units._Records, "_open", lambda self: opened.append(self) or pytest.fail("opened"))
    monkeypatch.setattr(hupd_build, "_free_bytes", lambda path: 123_456)
    with pytest.raises(HupdCacheError) as info:
        load(years, tmp_path, **YEARS, num_proc=num_proc)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and not opened
    need = int(re.search(r"needs about \d+ [KMG]?B \((\d+) bytes\)", message).group(1))
    assert need > 123_456 and "but 123 KB (123456 bytes) is free. Nothing was written." in message
    assert f"in {tmp_path / 'cache'} (" in message and "hupd_cache_dir=" in message and "columns=" in message
    assert len(entries(tmp_path / "cache")) == 1  # no scratch left
    monkeypatch.undo()
    no_archive_reads(monkeypatch)
    assert load(years, tmp_path, **YEARS, columns=["title"])["train"].to_list() == good["train"].to_list()


@pytest.mark.parametrize("columns", [None, ["abstract"]], ids=["all-fields", "abstract"])
def test_the_planned_size_is_what_the_build_writes(years, tmp_path, monkeypatch, columns):
    checks = []
    measure = hupd_disk._SpaceCheck.__call__
    monkeypatch.setattr(
        hupd_disk._SpaceCheck, "__call__", lambda self, table: checks.append(self) or measure(self, table)
    )
    for module in (hupd_disk, hupd_units, hupd_split_files):  # each module that writes or measures in batches
        monkeypatch.setattr(module, "_WRITER_BATCH_SIZE", 20)  # measured on 20 records, as on 200 of the real ones
    load(years, tmp_path, **YEARS, columns=columns)
    (built,) = (tmp_path / "cache").iterdir()
    splits = sum(p.stat().st_size for p in built.glob("*.arrow"))
    assert checks and 0.8 * splits < checks[0].final < 1.25 * splits, (checks[0].final, splits)


# --- an interrupted build -----------------------------------------------------------------------

KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    import hfplug.data.hupd_build as hupd_build
    from hfplug.data.hupd import load_hupd

    write_part = hupd_build._write_part

    def write_then_die(*args, **kwargs):  # the first split is written, the second never is
        write_part(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    hupd_build._write_part = write_then_die
    metadata, archive, cache = sys.argv[1:]
    load_hupd("all", hupd_metadata_path=metadata, hupd_archive_path=archive, hupd_cache_dir=cache, uniform_split=True)
    """
)


def test_a_killed_build_leaves_nothing_that_looks_complete(years, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    older = load(years, tmp_path, **YEARS)
    (older_dir,) = entries(cache)
    args = [str(years["metadata"]), str(years["archive"]), str(cache)]
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = [p for p in cache.iterdir() if p.name != older_dir]
    assert len(left) == 1 and left[0].name.endswith(".incomplete") and left[0].name.startswith(".all-")
    assert (left[0] / "train.arrow").is_file() and not (left[0] / "hfplug_hupd.json").exists()  # half-built

    with monkeypatch.context() as patch:  # the older cache opens as it was, without reading the archive
        no_archive_reads(patch)
        again = load(years, tmp_path, **YEARS)
        assert again["train"].to_list() == older["train"].to_list()
    rebuilt = load(years, tmp_path, uniform_split=True)  # the killed load, again: built, the dead scratch removed
    assert len(rebuilt["train"]) and len(entries(cache)) == 2 and not any(n.startswith(".") for n in entries(cache))
