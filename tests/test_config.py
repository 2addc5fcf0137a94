"""`--config file.yaml` + CLI overrides, and unknown keys as errors."""

import pytest
from transformers import TrainingArguments

from hfplug.arguments import HupdArguments, RunArguments
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
    cfg = _write(tmp_path, "text_fields: claims,title\n")
    (data,) = parse_args((HupdArguments,), [f"--config={cfg}"])
    assert data.sections == ["claims", "title"]


def test_unknown_yaml_key_is_named_with_suggestion(tmp_path):
    cfg = _write(tmp_path, "max_lenght: 128\n")
    with pytest.raises(ConfigError, match=r"'max_lenght' \(did you mean 'max_length'\?\)"):
        parse_args((HupdArguments, RunArguments), ["--config", cfg])


def test_unknown_cli_flag_is_an_error():
    with pytest.raises(ConfigError, match="--no_such_flag"):
        parse_args((HupdArguments,), ["--no_such_flag", "1"])


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
