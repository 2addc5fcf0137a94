"""hfplug.hub.arguments: the token and --push_to_hub taken out of TrainingArguments."""

import io

import pytest
from hub_fixtures import WRITE, assert_no_token, no_ambient_token  # noqa: F401

from hfplug.hub import PreflightError, hub_settings, take_hub_token


def test_token_and_push_taken_out_of_training_args(tmp_path):
    import torch
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        push_to_hub=True,
        hub_token=WRITE,
        hub_model_id="alice/hupd",
        hub_private_repo=True,
        report_to="none",
    )
    assert take_hub_token(args) == WRITE and args.hub_token is None
    settings = hub_settings(args)
    assert (settings.repo_id, settings.private, settings.strategy) == ("alice/hupd", True, "every_save")
    assert args.push_to_hub is False  # the Trainer will not push training_args.bin
    buffer = io.BytesIO()
    torch.save(args, buffer)
    assert_no_token(buffer.getvalue(), args.to_json_string())
    assert hub_settings(TrainingArguments(output_dir=str(tmp_path), report_to="none")) is None
    for strategy in ("checkpoint", "all_checkpoints"):
        bad = TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_strategy=strategy, report_to="none")
        with pytest.raises(PreflightError, match="optimizer states"):
            hub_settings(bad)
