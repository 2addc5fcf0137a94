"""`--config file.yaml` + CLI overrides, and unknown keys as errors."""

import pytest
from transformers import TrainingArguments

from hfplug.arguments import HupdArguments, RunArguments, check_training_args
from hfplug.config import ConfigError, parse_args


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sets_defaults_and_cli_overrides(tmp_path):
    cfg = _write(tmp_path, "task: ipc\nmax_length: 128\noutput_dir: out\nlearning_rate: 0.001\ndo_train: true\n")
    data, training = parse_args((HupdArguments, TrainingArguments), ["--config", cfg, "--max_length", "64"])
    assert data.task == "ipc"
    assert data.max_length == 64  # CLI wins
    assert training.learning_rate == 0.001 and training.do_train is True
    assert training.output_dir == "out"


def test_config_equals_form(tmp_path):
    cfg = _write(tmp_path, "text_fields: claims, title\n")
    (data,) = parse_args((HupdArguments,), [f"--config={cfg}"])
    assert data.text_fields == "claims,title"


def test_unknown_yaml_key_is_named_with_suggestion(tmp_path):
    cfg = _write(tmp_path, "max_lenght: 128\n")
    with pytest.raises(ConfigError, match=r"'max_lenght' \(did you mean 'max_length'\?\)"):
        parse_args((HupdArguments, RunArguments), ["--config", cfg])


def test_unknown_cli_flag_is_an_error():
    with pytest.raises(ConfigError, match="--no_such_flag"):
        parse_args((HupdArguments,), ["--no_such_flag", "1"])


@pytest.mark.parametrize(
    "old, new",
    [
        ("--gradient_checkpointing", "--activation_checkpointing"),
        ("--gradient-checkpointing=true", "--activation_checkpointing"),
        ("--gradient_checkpointing_kwargs", "--activation_checkpointing_kwargs"),
        ("--metadata_path", "--hupd_metadata_path"),
        ("--archive_path", "--hupd_archive_path"),
    ],
)
def test_renamed_flag_is_refused_with_the_new_name(old, new):
    with pytest.raises(ConfigError) as info:
        parse_args((HupdArguments, TrainingArguments), ["--output_dir", "out", old, "x"])
    message = str(info.value)
    assert message.startswith(f"{old.split('=')[0]} is now {new}: ") and message.endswith(f"Run again with {new}.")
    assert "\n" not in message


@pytest.mark.parametrize(
    "old, new",
    [("gradient_checkpointing: true", "activation_checkpointing"), ("metadata_path: m.feather", "hupd_metadata_path")],
)
def test_renamed_yaml_key_is_refused_with_the_new_name(tmp_path, old, new):
    cfg = _write(tmp_path, f"output_dir: out\n{old}\n")
    key = old.split(":")[0]
    with pytest.raises(ConfigError, match=rf"The key '{key}' in '.*cfg.yaml' is now '{new}': .*Rename it to {new}\."):
        parse_args((HupdArguments, TrainingArguments), ["--config", cfg])


def test_a_renamed_flag_is_refused_only_where_its_new_name_is_a_field():
    with pytest.raises(ConfigError, match=r"Unknown flag\(s\): '--gradient_checkpointing'"):
        parse_args((HupdArguments,), ["--gradient_checkpointing"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args((HupdArguments,), ["--config", str(tmp_path / "nope.yaml")])


def test_yaml_must_be_a_mapping(tmp_path):
    cfg = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse_args((HupdArguments,), ["--config", cfg])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task", "novelty"], "Unknown task 'novelty'"),
        (["--text_fields", "title,drawings"], "Unknown section"),
        (["--train_filing_start_date", "01/02/2016"], "YYYY-MM-DD"),
        (["--hupd_config", "full"], "hupd_config must be"),
        (["--max_length", "0"], "max_length must be positive"),
    ],
)
def test_bad_values_are_clear_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args((HupdArguments,), flags)


def test_yaml_dates_parsed_as_dates_become_strings(tmp_path):
    # YAML reads an unquoted 2016-01-01 as datetime.date; the loader wants the string.
    cfg = _write(tmp_path, "train_filing_start_date: 2016-01-01\n")
    (data,) = parse_args((HupdArguments,), ["--config", cfg])
    assert data.train_filing_start_date == "2016-01-01"


def _recipe_args(argv):
    parsed = parse_args((HupdArguments, RunArguments, TrainingArguments), argv)
    check_training_args(parsed[-1])
    return parsed


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        # unquoted: PyYAML alone would say "day is out of range for month", naming nothing
        (
            "train_filing_start_date: 2016-02-30\n",
            r"train_filing_start_date='2016-02-30' is not a valid calendar date.*"
            r"\(train_filing_start_date set in '.*cfg.yaml'",
        ),
        ("max_length: 12.5\n", r"max_length: 12.5 in '.*cfg.yaml' must be a whole number"),
        ("max_length: true\n", r"max_length: True in '.*cfg.yaml' must be a whole number, not true/false"),
        ("learning_rate: fast\n", r"learning_rate: 'fast' in '.*cfg.yaml' must be a number"),
        ("do_train: maybe\n", r"do_train: 'maybe' in '.*cfg.yaml' must be true or false"),
        ("text_fields: ''\n", r"text_fields is empty.*\(text_fields set in"),
        ("per_device_train_batch_size: 0\n", r"per_device_train_batch_size must be positive"),
        ("gradient_accumulation_steps: -2\n", r"gradient_accumulation_steps must be positive"),
    ],
)
def test_bad_yaml_values_name_the_key_and_file(tmp_path, yaml_text, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text + "output_dir: " + str(tmp_path / "out") + "\n")
    with pytest.raises(ValueError, match=message):
        _recipe_args(["--config", str(cfg)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be positive"),
        (["--max_steps", "0"], "max_steps must be positive, or -1"),
        (["--max_train_samples", "0"], "max_train_samples must be positive when set"),
        (["--text_fields", ""], "text_fields is empty"),
        (["--learnin_rate", "0.1"], r"'--learnin_rate' \(did you mean '--learning_rate'\?\)"),
    ],
)
def test_bad_recipe_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        _recipe_args(["--output_dir", str(tmp_path / "out"), *flags])


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        _recipe_args(["--output_dir", str(tmp_path / "out")])


def test_max_length_must_be_an_int_for_library_users():
    for value in (12.5, True):
        with pytest.raises(ValueError, match="max_length must be positive, a whole number"):
            HupdArguments(max_length=value)


def test_default_config_applies_only_without_config(tmp_path):
    default = _write(tmp_path, "max_length: 99\n")
    (data,) = parse_args((HupdArguments,), [], default_config=default)
    assert data.max_length == 99
    other = tmp_path / "other.yaml"
    other.write_text("task: ipc\n")
    (data,) = parse_args((HupdArguments,), ["--config", str(other)], default_config=default)
    assert data.max_length == 512 and data.task == "ipc"


def test_token_flag_is_refused_before_parsing():
    with pytest.raises(ValueError, match="refuses it") as info:
        parse_args((HupdArguments,), ["--hub_token", "hf_CanaryTok3n"])
    assert "Canary" not in str(info.value)


def test_group_by_length_is_applied_by_prepare_training_args_not_by_the_check(tmp_path):
    from hfplug.model_args import ModelArguments
    from hfplug.training.model_setup import prepare_training_args

    model, data, training = parse_args(
        (ModelArguments, HupdArguments, TrainingArguments),
        ["--output_dir", str(tmp_path), "--group_by_length", "true", "--use_cpu", "true"],
    )
    before = training.train_sampling_strategy
    check_training_args(training, data)
    assert training.train_sampling_strategy == before != "group_by_length"  # a check changes nothing
    prepare_training_args(training, model, data)
    assert training.train_sampling_strategy == "group_by_length"
