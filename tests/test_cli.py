"""How the recipes end on bad input: one `error:` paragraph, no traceback (also under `accelerate launch`)."""

import sys

import pytest
from conftest import REPO, finetune_command, run_command

from hfplug.cli import error_message, set_download_hint


def _launch(*args):
    """``accelerate launch --config_file cpu.yaml recipes/finetune_hupd.py ARGS`` (no quickstart config)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu.yaml"),
        str(REPO / "recipes" / "finetune_hupd.py"),
        *args,
    ]


def _assert_one_error(proc, message):
    assert proc.returncode != 0
    assert f"error: {message}" in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "CalledProcessError" not in proc.stdout  # the launcher printed nothing of its own


@pytest.mark.slow
def test_bad_flag_under_accelerate_launch_is_one_error_with_a_suggestion(tmp_path):
    proc = run_command(finetune_command("--output_dir", str(tmp_path / "out"), "--learnin_rate", "0.1"))
    _assert_one_error(proc, "Unknown flag(s): '--learnin_rate' (did you mean '--learning_rate'?)")
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.slow
def test_card_command_without_flags_runs_the_default_job_and_explains_offline(tmp_path):
    # `accelerate launch recipes/finetune_hupd.py` as on the card: bert-for-patents on HUPD's sample.
    # Offline with an empty cache it cannot start; it says what to do instead of a traceback.
    proc = run_command(_launch(), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert "hupd_bert_for_patents.yaml" in proc.stdout
    _assert_one_error(proc, "")
    assert "recipes/configs/quickstart.yaml" in proc.stdout  # the offline quickstart
    assert "hf download anferico/bert-for-patents" in proc.stdout
    assert (
        "hf download HUPD/hupd --repo-type dataset hupd_metadata_jan16_2022-02-22.feather "
        "data/sample-jan-2016.tar.gz" in proc.stdout
    )


def test_download_hint_only_for_download_failures():
    from huggingface_hub.errors import LocalEntryNotFoundError

    set_download_hint(model="org/model", dataset=("HUPD/hupd", ["a.feather"]))
    try:
        missing = OSError("model not cached")
        missing.__cause__ = LocalEntryNotFoundError("not in cache")
        assert "hf download org/model" in error_message(missing)
        assert "hf download" not in error_message(ValueError("Unknown task 'x'"))
    finally:
        set_download_hint()


def test_local_model_needs_no_download_command(tmp_path):
    set_download_hint(model=str(tmp_path), dataset=("HUPD/hupd", []))
    try:
        from huggingface_hub.errors import OfflineModeIsEnabled

        assert "hf download" not in error_message(OfflineModeIsEnabled("offline"))
    finally:
        set_download_hint()


@pytest.mark.parametrize("text", ["hf_CanaryTok3n leaked", "token=hf_abcdefghijklmnopqrstuvwxyz0123456789"])
def test_error_message_masks_tokens(text):
    assert "hf_***" in error_message(ValueError(text)) and "Canary" not in error_message(ValueError(text))


def test_run_collects_cycles_again_after_a_recipes_imports():
    """Recipes import with the collector off (start-up); run() must turn it back on, or a long training keeps
    every reference cycle it makes."""
    import gc

    from hfplug.cli import run

    seen = {}

    def main():
        seen["enabled"], seen["frozen"] = gc.isenabled(), gc.get_freeze_count()
        return 0

    gc.disable()
    try:
        with pytest.raises(SystemExit) as exit_:
            run(main)
    finally:
        gc.unfreeze()
        gc.enable()
    assert exit_.value.code == 0
    assert seen["enabled"], "automatic collection is still off in main()"
    assert seen["frozen"] > 0, "the imports were not frozen"
