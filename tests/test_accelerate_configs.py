"""accelerate_configs/: every file loads with accelerate's own loader, runs the command in its header,
and the scale-out configs hold the settings PEFT documents for sharded QLoRA.

What ``accelerate launch`` would export for a config is computed with accelerate's launcher
code, so the tests also check that hfplug reads that environment as intended (4-bit weights
stored in the compute dtype under FSDP and ZeRO-3). No process is launched and no GPU is needed.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from transformers import TrainingArguments

from hfplug import quantization as mo
from hfplug.config import parse_args
from hfplug.model_args import ModelArguments

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
ENV_NAMES = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE")


def launch_line(config: Path) -> list[str]:
    """The ``accelerate launch ...`` command in the config's opening comment, as argv after ``launch``."""
    header = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    commands = [line for line in header if line.startswith("accelerate launch ")]
    assert commands, f"{config.name} does not open with the command that uses it"
    return shlex.split(commands[0])[2:]


def launcher_args(config: Path):
    """accelerate's parsed launch arguments for the header command, the config file merged in.

    ``_validate_launch_command`` is what ``accelerate launch`` itself runs before choosing a
    launcher; it is private, so an accelerate upgrade that changes it fails here loudly.
    """
    from accelerate.commands.launch import _validate_launch_command

    args = launch_command_parser().parse_args(
        [str(REPO / a) if a == f"accelerate_configs/{config.name}" else a for a in launch_line(config)]
    )
    return _validate_launch_command(args)


def launch_environment(config: Path) -> dict[str, str]:
    """The environment variables ``accelerate launch`` would give the training processes."""
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mixed_precision_from_config = launcher_args(config)
    if args.use_deepspeed:
        # as accelerate's launch_command does before calling the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- every config ---------------------------------------------------------------------------


def test_the_scale_out_configs_exist():
    assert {"fsdp_qlora.yaml", "multi_node.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_loads_with_accelerates_loader(config):
    cluster = load_config_from_file(str(config))  # raises on unknown top-level keys
    assert cluster.num_processes >= 1 and cluster.num_machines >= 1
    assert cluster.mixed_precision in ("no", "fp16", "bf16")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_nested_keys_are_known_to_the_launcher(config):
    """The loader accepts any key inside fsdp_config / deepspeed_config; a typo there would be ignored."""
    cluster = load_config_from_file(str(config))
    known = {action.dest for action in launch_command_parser()._actions}
    for block in (cluster.fsdp_config, cluster.deepspeed_config):
        unknown = sorted(set(block or {}) - known)
        assert not unknown, f"{config.name}: accelerate launch has no option {unknown}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_header_command_runs_this_config_and_a_recipe_that_parses(config):
    argv = launch_line(config)
    assert argv[:2] == ["--config_file", f"accelerate_configs/{config.name}"]
    args = launch_command_parser().parse_args(argv)  # the launcher accepts its flags
    script = REPO / args.training_script
    assert script.is_file(), f"{config.name}: {args.training_script} does not exist"
    if script.name == "finetune_hupd.py":
        assert recipe_arguments(config)[0].model_name_or_path


def recipe_arguments(config: Path) -> tuple:
    """The finetune_hupd.py arguments of the header command (its YAML plus its flags), parsed."""
    from hfplug.arguments import HupdArguments, RunArguments
    from hfplug.hub import HubArguments

    args = launch_command_parser().parse_args(launch_line(config))
    argv = [str(REPO / a) if a.startswith("recipes/configs/") else a for a in args.training_script_args]
    return parse_args((ModelArguments, HupdArguments, RunArguments, HubArguments, TrainingArguments), argv)


# --- FSDP + QLoRA ----------------------------------------------------------------------------

FSDP_QLORA = REPO / "accelerate_configs" / "fsdp_qlora.yaml"


def test_fsdp_qlora_has_the_settings_peft_documents():
    """https://huggingface.co/docs/peft/accelerate/fsdp, section "Use PEFT QLoRA and FSDP"."""
    cluster = load_config_from_file(str(FSDP_QLORA))
    fsdp = cluster.fsdp_config
    assert cluster.distributed_type == "FSDP"
    assert fsdp["fsdp_version"] == 1  # flat parameters; use_orig_params exists only there
    assert fsdp["fsdp_use_orig_params"] is False  # memory savings with a frozen base
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True  # rank 0 loads, the others receive
    assert fsdp["fsdp_sync_module_states"] is True  # required by the line above
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert cluster.mixed_precision == "bf16" and cluster.num_machines == 1 and not cluster.use_cpu
    assert "bnb_4bit_quant_storage" in FSDP_QLORA.read_text()  # the file says why storage matters


def test_fsdp_qlora_launch_environment_makes_hfplug_store_4bit_in_the_compute_dtype(clean_env):
    env = launch_environment(FSDP_QLORA)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_USE_ORIG_PARAMS"] == "false" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    for name in ENV_NAMES:
        if name in env:
            clean_env.setenv(name, env[name])
    assert mo.sharded_training() == "FSDP"
    model_args, *_, training_args = recipe_arguments(FSDP_QLORA)  # the header command's arguments
    assert model_args.quant == "4bit" and model_args.dtype == "bfloat16" and model_args.quant_storage == "auto"
    assert mo.resolve_quant_storage(model_args, torch.bfloat16) == torch.bfloat16
    assert mo.default_optim(model_args) is None  # no paged 8-bit AdamW under FSDP...
    assert training_args.optim == "adamw_torch"  # ...and the command overrides the T4 config's choice


# --- DeepSpeed ZeRO-3 (optional) --------------------------------------------------------------

ZERO3 = REPO / "accelerate_configs" / "deepspeed_zero3_qlora.yaml"


@pytest.mark.skipif(not ZERO3.exists(), reason="no DeepSpeed config")
def test_zero3_qlora_has_the_settings_peft_documents(clean_env):
    """https://huggingface.co/docs/peft/accelerate/deepspeed, "Use PEFT QLoRA and DeepSpeed with ZeRO3"."""
    cluster = load_config_from_file(str(ZERO3))
    assert cluster.distributed_type == "DEEPSPEED"
    assert cluster.deepspeed_config["zero_stage"] == 3 and cluster.deepspeed_config["zero3_init_flag"] is True
    assert cluster.mixed_precision == "bf16"
    env = launch_environment(ZERO3)  # needs no deepspeed install
    for name in ENV_NAMES:
        if name in env:
            clean_env.setenv(name, env[name])
    assert mo.sharded_training() == "DeepSpeed ZeRO-3"
    assert mo.resolve_quant_storage(ModelArguments(quant="4bit", lora=True), torch.bfloat16) == torch.bfloat16


# --- several machines -------------------------------------------------------------------------

MULTI_NODE = REPO / "accelerate_configs" / "multi_node.yaml"


def test_multi_node_template_says_what_to_fill_in():
    cluster = load_config_from_file(str(MULTI_NODE))
    assert cluster.num_machines > 1 and cluster.machine_rank == 0
    assert cluster.num_processes % cluster.num_machines == 0  # total over all machines
    assert cluster.main_process_ip and 1024 <= cluster.main_process_port < 65536
    assert cluster.rdzv_backend in ("static", "c10d")
    lines = MULTI_NODE.read_text().splitlines()
    for key in ("num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"):
        (line,) = [line for line in lines if line.startswith(f"{key}:")]
        assert "FILL IN" in line, f"multi_node.yaml: say how to fill in {key}"


def test_multi_node_launch_is_multi_gpu_over_the_network():
    args, _, _ = launcher_args(MULTI_NODE)
    assert args.multi_gpu and args.num_machines == 2 and args.machine_rank == 0
    assert args.main_process_ip == "10.0.0.1" and args.main_process_port == 29500
