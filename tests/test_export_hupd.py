"""hfplug.data.export_hupd: Parquet shards + dataset card that today's ``datasets`` reads back exactly as
``load_hupd`` returned them; the push to the user's own dataset repo (loopback Hub), checked before any file
is written; bad input; the paper's configs select what their headers say (embedded sample, no network)."""

import hashlib
import logging
import re
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from conftest import REPO, SAMPLE_DIR, run_command
from hub_fixtures import (  # noqa: F401
    FG_REPO,
    READ,
    REVOKED,
    WRITE,
    assert_no_token,
    hub,
    no_ambient_token,
    online,
)
from hub_server import Token
from huggingface_hub import DatasetCard

from hfplug.config import ConfigError, parse_args
from hfplug.data.export_hupd import main, push_export
from hfplug.data.hupd import load_hupd
from hfplug.hub import PreflightError, PushError
from hfplug.hub.preflight import preflight_push

SAMPLE_FILES = {
    "hupd_metadata_path": str(SAMPLE_DIR / "hupd_metadata_jan16_2022-02-22.feather"),
    "hupd_archive_path": str(SAMPLE_DIR / "sample-jan-2016.tar.gz"),
}
DATES = {  # the quickstart's date split of the embedded sample: 398 train, 202 validation
    "train_filing_start_date": "2016-01-01",
    "train_filing_end_date": "2016-01-22",
    "val_filing_start_date": "2016-01-22",
    "val_filing_end_date": "2016-02-01",
}
CONFIGS = REPO / "recipes" / "configs"
ACCEPTANCE_CONFIG = CONFIGS / "hupd_paper_acceptance_g06f.yaml"
IPC_CONFIG = CONFIGS / "hupd_paper_ipc_subclass.yaml"


def flags(values: dict) -> list[str]:
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def export_argv(out: Path, cache: Path, *extra: str, selection: dict = DATES) -> list[str]:
    return [*flags(SAMPLE_FILES), *flags(selection), "--hupd_cache_dir", str(cache), "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One HUPD cache for the module: each selection is read from the sample archive once."""
    return tmp_path_factory.mktemp("hupd_cache")


@pytest.fixture(scope="module")
def expected(cache) -> datasets.DatasetDict:
    """What load_hupd returns for the quickstart's selection: the export must read back as exactly this."""
    return load_hupd(**SAMPLE_FILES, **DATES, hupd_cache_dir=cache)


def digests(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_same_rows(loaded: datasets.DatasetDict, expected: datasets.DatasetDict) -> None:
    assert list(loaded) == list(expected)
    for split in expected:
        assert loaded[split].features == expected[split].features
        assert loaded[split].to_list() == expected[split].to_list(), f"{split}: other rows, or another order"


# --------------------------------------------------------------------------- the export reads back exactly


def test_export_loads_back_with_datasets_exactly(tmp_path, cache, expected):
    out = tmp_path / "export"
    assert main(export_argv(out, cache, "--max_shard_size", "2MB")) == 0

    # the datasets.push_to_hub layout: README.md + data/<split>-NNNNN-of-NNNNN.parquet, several shards per split
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md",
        "data/train-00000-of-00003.parquet",
        "data/train-00001-of-00003.parquet",
        "data/train-00002-of-00003.parquet",
        "data/validation-00000-of-00002.parquet",
        "data/validation-00001-of-00002.parquet",
    ]
    # the folder as a dataset (its card's configs), and the shards alone: same rows, order, fields as load_hupd
    assert_same_rows(datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf")), expected)
    assert_same_rows(
        datasets.load_dataset("parquet", data_dir=str(out / "data"), cache_dir=str(tmp_path / "hf")), expected
    )
    for path in (out / "data").iterdir():  # zstd by default: smaller than datasets' snappy on text
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_card_metadata_and_body(tmp_path, cache, expected):
    out = tmp_path / "export"
    main(export_argv(out, cache))
    card = DatasetCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "cc-by-sa-4.0" and data["language"] == ["en"]
    assert {"text-classification", "summarization"} <= set(data["task_categories"])
    assert data["size_categories"] == ["n<1K"] and "hupd" in data["tags"]
    assert data["configs"] == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "train", "path": "data/train-*"},
                {"split": "validation", "path": "data/validation-*"},
            ],
        }
    ]
    info = data["dataset_info"]
    assert [(s["name"], s["num_examples"]) for s in info["splits"]] == [("train", 398), ("validation", 202)]
    assert datasets.Features._from_yaml_list(info["features"]) == expected["train"].features

    text = card.text
    for field in expected["train"].features:  # every field, with its type
        assert re.search(rf"^\| `{field}` \| (string|list of string) \|", text, re.M), field
    assert "train 2016-01-01 to 2016-01-22, validation 2016-01-22 to 2016-02-01" in text  # the split rule used
    assert "end exclusive" in text and "official loader's" in text  # order and date semantics
    assert "| train | 398 | 1 | 164 | 97 |" in text  # rows and decisions per split
    bibtex = re.search(r"```bibtex\n(.*?)```", text, re.S).group(1)
    assert "@inproceedings{suzgun2023hupd" in bibtex and "{H}arvard {USPTO} Patent Dataset: A Large-Scale" in bibtex
    assert "2207.04043" in bibtex and "NeurIPS 2023" in bibtex and "Suzgun, Mirac" in bibtex
    command = re.search(r"```bash\n(python -m hfplug.data.export_hupd .*)\n```", text).group(1)
    assert "--train_filing_end_date 2016-01-22" in command and str(SAMPLE_DIR) not in text  # no local paths
    assert str(tmp_path) not in (out / "README.md").read_text()


def test_uniform_balanced_filtered_selection_keeps_the_loader_order(tmp_path, cache):
    selection = {
        "ipcr_label": "G06F",
        "uniform_split": "true",
        "train_filing_start_date": "2016-01-01",
        "val_filing_end_date": "2016-01-31",
        "val_set_balancer": "true",
    }
    out = tmp_path / "export"
    main(export_argv(out, cache, "--max_train_samples", "40", selection=selection))
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    full = load_hupd(
        **SAMPLE_FILES,
        ipcr_label="G06F",
        uniform_split=True,
        train_filing_start_date="2016-01-01",
        val_filing_end_date="2016-01-31",
        val_set_balancer=True,
        hupd_cache_dir=cache,
    )
    assert loaded["train"].to_list() == full["train"].select(range(40)).to_list()  # the first 40, in order
    assert loaded["validation"].to_list() == full["validation"].to_list()
    decisions = loaded["validation"]["decision"]
    half = len(decisions) // 2
    assert decisions[:half] == ["REJECTED"] * half and decisions[half:] == ["ACCEPTED"] * half
    assert all(label.startswith("G06F") for label in loaded["train"]["ipc_label"])
    text = (out / "README.md").read_text()
    for rule in ("starts with `G06F`", "random_state=1729", "int(0.85 * n)", "rejected rows first", "first 40 rows"):
        assert rule in text, rule


def test_export_again_is_identical_and_resharding_replaces_the_shards(tmp_path, cache):
    out = tmp_path / "export"
    main(export_argv(out, cache, "--max_shard_size", "2MB"))
    first = digests(out)
    main(export_argv(out, cache, "--max_shard_size", "2MB"))
    assert digests(out) == first  # deterministic bytes: a second push commits nothing
    main(export_argv(out, cache))  # one shard per split now: the three old train shards are gone
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".hfplug")]  # no staging left behind


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--streaming", "true"], ["streaming", "archive order"]),
        (["--task", "ipc"], ["--task", "only shape"]),
        (["--max_length", "128"], ["--max_length", "only shape"]),
        (["--max_shard_size", "lots"], ["max_shard_size 'lots'", "500MB"]),
        (["--compression", "lz4"], ["compression", "zstd"]),
        (["--train_filing_end_date", "2016-02-30"], ["train_filing_end_date"]),
        (["--hub_dataset_id", "https://huggingface.co/datasets/alice/x", "--push_to_hub", "true"], ["URL"]),
    ],
    ids=["streaming", "task", "max_length", "shard_size", "compression", "date", "repo_url"],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, extra, needles):
    out, cache = tmp_path / "export", tmp_path / "cache"
    with pytest.raises((ValueError, PreflightError)) as info:
        main(export_argv(out, cache, *extra))
    for needle in needles:
        assert needle in str(info.value)
    assert not out.exists() and not cache.exists()


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path):
    out, cache = tmp_path / "export", tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt.*new or empty folder"):
        main(export_argv(out, cache))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not cache.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        main(export_argv(tmp_path / "file", cache))


def test_old_flag_name_says_the_new_one(tmp_path):
    with pytest.raises(ConfigError, match="--hub_private_repo"):
        main(export_argv(tmp_path / "export", tmp_path / "cache", "--private"))


# --------------------------------------------------------------------------- the push


def test_push_to_own_dataset_repo(hub, tmp_path, cache, expected, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE)
    out = tmp_path / "hupd-sample"
    push = ["--push_to_hub", "true", "--hub_private_repo", "true", "--max_shard_size", "2MB"]
    assert main(export_argv(out, cache, *push)) == 0  # bare name: output_dir's, in the token's namespace

    repo = hub.datasets["alice/hupd-sample"]
    assert repo.private and "alice/hupd-sample" not in hub.repos
    assert len(hub.commits) == 1
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {path: data for path, data in repo.files.items() if path != ".gitattributes"} == local
    assert 'load_dataset("alice/hupd-sample")' in local["README.md"].decode()
    for data in repo.files.values():
        assert_no_token(data)

    # what the Hub holds loads as load_hupd returned it
    mirror = tmp_path / "mirror"
    for path, data in repo.files.items():
        (mirror / path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / path).write_bytes(data)
    assert_same_rows(datasets.load_dataset(str(mirror), cache_dir=str(tmp_path / "hf")), expected)

    assert main(export_argv(out, cache, *push)) == 0
    assert len(hub.commits) == 1  # the same export again: nothing to commit

    assert main(export_argv(out, cache, "--push_to_hub", "true")) == 0  # one shard per split now
    assert len(hub.commits) == 2
    assert sorted(p for p in repo.files if p.startswith("data/")) == [
        "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet",
    ]  # the earlier shards were deleted in the same commit
    assert set(hub.commits[1].deleted) >= {
        "data/train-00001-of-00003.parquet",
        "data/validation-00001-of-00002.parquet",
    }


@pytest.mark.parametrize(
    "token, repo_id, reason, needles",
    [
        (READ, "alice/hupd", "read_only", ["read-only", "write token"]),
        (REVOKED, "alice/hupd", "invalid_token", ["401", "revoked"]),
        (WRITE, "readers/hupd", "no_rights", ["read role", "readers"]),
        (WRITE, "bob/hupd", "no_rights", ["not a member", "bob"]),
        (FG_REPO, "alice/hupd", "fine_grained_scope", ["fine-grained", "alice/hupd"]),
        (None, "alice/hupd", "no_token", ["HF_TOKEN", "hf auth login"]),
    ],
    ids=["read_only", "revoked", "org_read_role", "other_namespace", "fine_grained_other_repo", "no_token"],
)
def test_a_repo_the_token_cannot_write_fails_before_any_file_is_written(
    hub, tmp_path, monkeypatch, token, repo_id, reason, needles
):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    out, cache = tmp_path / "export", tmp_path / "cache"
    with pytest.raises(PreflightError) as info:
        main(export_argv(out, cache, "--push_to_hub", "true", "--hub_dataset_id", repo_id))
    assert info.value.reason == reason
    for needle in needles:
        assert needle in str(info.value)
    assert not out.exists() and not cache.exists()  # no export, and HUPD not even read
    assert not hub.commits and not hub.datasets
    assert_no_token(str(info.value))


@pytest.mark.slow  # runs hfplug in a subprocess: left out of the fast local subset
def test_cli_refusal_is_one_error_paragraph_without_the_token(hub, tmp_path):
    out, cache = tmp_path / "export", tmp_path / "cache"
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": READ, "HF_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "hfplug.data.export_hupd", *export_argv(out, cache, "--push_to_hub", "true")]
    result = run_command([*command, "--hub_dataset_id", "alice/hupd"], env=env, timeout=300)
    assert result.returncode == 2, result.stdout
    assert result.stdout.count("error: ") == 1 and "read-only" in result.stdout
    assert "Traceback" not in result.stdout
    assert not out.exists() and not cache.exists() and not hub.datasets
    assert_no_token(result.stdout)


def test_fine_grained_token_scoped_to_the_dataset_repo(hub, tmp_path, cache):
    scoped = "hf_" + "FineGrainedAliceOneDataset01234567"
    entry = {"entity": {"_id": "id-ds", "type": "dataset", "name": "alice/hupd"}, "permissions": ["repo.write"]}
    hub.tokens[scoped] = Token("alice", "fineGrained", [entry])
    with pytest.raises(PreflightError) as info:  # it may write the repo, not create it
        preflight_push("alice/hupd", repo_type="dataset", token=scoped, endpoint=hub.url)
    assert info.value.reason == "fine_grained_scope" and "new-dataset" in str(info.value)
    hub.add_dataset("alice/hupd", files={})
    target = preflight_push("alice/hupd", repo_type="dataset", token=scoped, endpoint=hub.url)
    out = tmp_path / "export"
    main(export_argv(out, cache))
    push_export(out, target)
    assert "README.md" in hub.datasets["alice/hupd"].files


def test_failed_upload_keeps_the_export_and_says_how_to_retry(hub, tmp_path, cache, caplog):
    caplog.set_level(logging.INFO)
    target = preflight_push("alice/hupd", repo_type="dataset", token=WRITE, endpoint=hub.url)
    out = tmp_path / "my export"
    main(export_argv(out, cache))
    before = digests(out)
    hub.tokens[WRITE].revoked = True
    with pytest.raises(PushError) as info:
        push_export(out, target)
    message = str(info.value)
    assert info.value.reason == "invalid_token" and "intact" in message
    assert f"hf upload alice/hupd '{out}' --repo-type dataset --delete 'data/*'" in message
    assert digests(out) == before and not hub.commits
    assert_no_token(message, caplog.text)


# --------------------------------------------------------------------------- the paper's configs


def test_paper_configs_select_what_their_headers_say(tmp_path, cache):
    from test_shipped_configs import FINETUNE_ARGS

    local = [*flags(SAMPLE_FILES), "--hupd_config", "sample", "--hupd_cache_dir", str(cache)]
    _, acceptance, *_ = parse_args(FINETUNE_ARGS, ["--config", str(ACCEPTANCE_CONFIG)])
    assert (acceptance.hupd_config, acceptance.task, acceptance.ipcr_label) == ("all", "decision", "G06F")
    assert acceptance.uniform_split and acceptance.val_set_balancer
    assert (acceptance.train_filing_start_date, acceptance.val_filing_end_date) == ("2011-01-01", "2016-12-31")
    _, ipc, *_ = parse_args(FINETUNE_ARGS, ["--config", str(IPC_CONFIG)])
    assert (ipc.hupd_config, ipc.task, ipc.ipcr_label, ipc.cpc_label) == ("all", "ipc", None, None)
    assert ipc.uniform_split and (ipc.train_filing_start_date, ipc.val_filing_end_date) == ("2011-01-01", "2016-12-31")
    # each header names the paper's table it reproduces (arXiv:2207.04043: Table 4 / 7 acceptance, Table 5 IPC)
    assert "Table 4" in ACCEPTANCE_CONFIG.read_text().split("\n\n")[0]
    assert "Table 5" in IPC_CONFIG.read_text().split("\n\n")[0]

    # their selections, run on the embedded sample (January 2016 lies inside 2011-2016)
    _, data, *_ = parse_args(FINETUNE_ARGS, ["--config", str(ACCEPTANCE_CONFIG), *local])
    splits = load_hupd(**data.load_hupd_kwargs())
    assert len(splits["train"]) > 0 and {r[:4] for r in splits["train"]["ipc_label"]} == {"G06F"}
    decisions = splits["validation"]["decision"]
    assert decisions.count("ACCEPTED") == decisions.count("REJECTED") > 0
    _, data, *_ = parse_args(FINETUNE_ARGS, ["--config", str(IPC_CONFIG), *local])
    splits = load_hupd(**data.load_hupd_kwargs())
    assert len({r[:4] for r in splits["train"]["ipc_label"]}) > 2
    # the paper and the official code classify ACCEPTED applications only; the sample holds the other decisions too
    assert {d for split in splits.values() for d in split["decision"]} == {"ACCEPTED"}
    everything = load_hupd(**{**data.load_hupd_kwargs(), "query": None})
    assert len(everything["train"]) > len(splits["train"]) and "REJECTED" in everything["train"]["decision"]
