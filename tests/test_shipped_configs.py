"""Every YAML in recipes/configs and accelerate_configs parses with the real parser; README and CI agree."""

import re
from pathlib import Path

import pytest
from transformers import TrainingArguments

from hfplug.arguments import HupdArguments, RunArguments
from hfplug.config import parse_args
from hfplug.hub import HubArguments
from hfplug.model_args import ModelArguments

REPO = Path(__file__).resolve().parents[1]
FINETUNE_ARGS = (ModelArguments, HupdArguments, RunArguments, HubArguments, TrainingArguments)
RECIPE_CONFIGS = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").rglob("*.yaml"))


def _recipe_of(config: Path) -> str:
    """The recipe a config runs, from the launch line in its header."""
    match = re.search(r"recipes/(\w+)\.py", config.read_text())
    assert match, f"{config.name} does not open with the command that runs it"
    return match.group(1)


@pytest.mark.parametrize(
    "config", [c for c in RECIPE_CONFIGS if _recipe_of(c) == "finetune_hupd"], ids=lambda p: p.name
)
def test_finetune_configs_parse(config):
    model, data, run, hub, training = parse_args(FINETUNE_ARGS, ["--config", str(config)])
    assert training.do_train or training.do_eval
    assert data.max_length > 0 and model.model_name_or_path


def test_every_recipe_config_is_checked():
    assert RECIPE_CONFIGS, "no recipe configs found"
    checked = {"finetune_hupd"}  # a new recipe's configs need a parse test above
    unknown = [c.name for c in RECIPE_CONFIGS if _recipe_of(c) not in checked]
    assert not unknown, f"configs of recipes this test does not parse yet: {unknown}"


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse(config):
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(config))
    assert cluster.num_processes >= 1
    assert cluster.mixed_precision in ("no", "fp16", "bf16")
    assert config.read_text().startswith("#"), "each accelerate config opens with how to use it"


def test_single_gpu_config_is_fp16_for_t4():
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(REPO / "accelerate_configs" / "single_gpu.yaml")).mixed_precision == "fp16"


def _quickstart_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)?\n(.*?)\n```", section, flags=re.S)


def test_readme_quickstart_is_two_one_line_commands():
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands)
    assert "recipes/finetune_hupd.py" in commands[0] and "quickstart.yaml" in commands[0]


def test_ci_runs_both_readme_commands_in_a_fresh_venv():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for command in _quickstart_commands():
        assert command in ci, command
    venv = next(i for i, line in enumerate(ci) if "-m venv" in line)
    assert venv < ci.index(_quickstart_commands()[0]), "the commands must run inside the fresh venv"
