"""python -m hfplug.fit: the memory planner's command line (the arithmetic is tested in test_memory.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from hfplug import fit
from hfplug.testing.llama31 import LLAMA31_8B

GiB = 1024**3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama31_8b")
    (path / "config.json").write_text(json.dumps(LLAMA31_8B))
    return path


def test_cli_on_a_local_path(llama8b_dir, capsys):
    code = fit.main(
        [
            "--model_name_or_path",
            str(llama8b_dir),
            "--quant",
            "4bit",
            "--lora_r",
            "16",
            "--task",
            "decision",
            "--max_length",
            "512",
            "--per_device_train_batch_size",
            "8",
            "--gpu",
            "t4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for text in (
        "quantized linear weights",
        "optimizer states",
        "without gradient checkpointing",
        "CUDA context",
        "fits",
        "largest batch size at 512 tokens",
        "largest sequence length at batch size 8",
        "41,943,040",
    ):
        assert text in out, text


def test_cli_gpu_mem_and_a_run_that_does_not_fit(llama8b_dir, capsys):
    code = fit.main(
        [
            "--model_name_or_path",
            str(llama8b_dir),
            "--task",
            "causal_lm",
            "--max_length",
            "4096",
            "--per_device_train_batch_size",
            "4",
            "--gpu_mem",
            "15GiB",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "DOES NOT FIT" in out and "suggested settings" in out and "chunked" in out


def test_cli_missing_local_path(tmp_path, capsys):
    assert fit.main(["--model_name_or_path", str(tmp_path / "missing")]) == 2
    assert "No such local path" in capsys.readouterr().err


@pytest.mark.parametrize(
    "old, new",
    [
        (["--model", "x"], "--model_name_or_path"),
        (["--model_name_or_path", "x", "--batch_size=4"], "--per_device_train_batch_size"),
        (["--model_name_or_path", "x", "--gradient_checkpointing"], "--activation_checkpointing"),
        (["--model_name_or_path", "x", "--no-gradient_checkpointing"], "--activation_checkpointing false"),
    ],
)
def test_renamed_flags_fail_with_the_new_name(old, new, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit.main(old)
    assert exit_info.value.code == 2
    assert f"is now {new} " in capsys.readouterr().err


def test_activation_checkpointing_takes_the_recipes_true_false(llama8b_dir, capsys):
    base = ["--model_name_or_path", str(llama8b_dir), "--gpu", "t4"]
    assert fit.main([*base, "--activation_checkpointing", "false"]) == 0
    assert "activation checkpointing off" in capsys.readouterr().out
    assert fit.main([*base, "--activation_checkpointing"]) == 0
    assert "activation checkpointing on" in capsys.readouterr().out


def test_parse_memory():
    assert fit.parse_memory("15GiB") == 15 * GiB and fit.parse_memory("16GB") == 16 * 10**9


def test_every_documented_planner_command_parses():
    """The `python -m hfplug.fit ...` lines in the README and the recipe configs' headers use today's flags."""
    lines = [
        line.lstrip("# ").strip()
        for path in [REPO / "README.md", *sorted((REPO / "recipes" / "configs").rglob("*.yaml"))]
        for line in path.read_text().splitlines()
        if line.lstrip("# ").startswith("python -m hfplug.fit --")
    ]
    assert len(lines) >= 3
    parser = fit.build_parser()
    for line in lines:
        argv = shlex.split(line)[3:]
        fit.refuse_renamed_flags(parser, argv)
        assert parser.parse_args(argv).model_name_or_path, line
