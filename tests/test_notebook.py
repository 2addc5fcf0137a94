"""recipes/colab_quickstart.ipynb runs to the end offline (HFPLUG_NOTEBOOK_TEST=1), so it cannot rot.

The notebook is executed cell by cell with nbclient, as Jupyter would, against the embedded
sample and tiny models: install and secrets are skipped, the fine-tune, results and chat
cells run the real recipes, and the push is skipped. Static checks cover what only Colab
runs: the parameters cell, the commands and the files they name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow  # end-to-end recipe runs: skip with -m "not slow"


REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "recipes" / "colab_quickstart.ipynb"
TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def output_text(cell) -> str:
    """Everything a cell printed (streams, results and errors)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return "".join(parts)


def cell_running(nb, snippet: str):
    (cell,) = [c for c in code_cells(nb) if snippet in c.source]
    return cell


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple:
    """The notebook after an offline run from the repository root, and its output dir."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    output_dir = tmp_path_factory.mktemp("notebook") / "quickstart"
    env_patch = pytest.MonkeyPatch()
    env_patch.setenv("HFPLUG_NOTEBOOK_TEST", "1")
    env_patch.setenv("HFPLUG_NOTEBOOK_OUTPUT_DIR", str(output_dir))
    env_patch.setenv("HF_HUB_OFFLINE", "1")
    try:
        client = nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        )
        client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    finally:
        env_patch.undo()
    return nb, output_dir


# --- static: what only Colab runs ------------------------------------------------------------


def test_first_code_cell_is_tagged_parameters_and_defaults_to_colab():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    first = code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", [])
    assert re.search(r"^OFFLINE_TEST = False\b", first.source, flags=re.M)
    for name in ("RECIPE_CONFIG", "OUTPUT_DIR", "HUB_MODEL_ID", "REPO_URL"):
        assert re.search(rf"^{name} = ", first.source, flags=re.M), name
    assert not any(cell.get("outputs") for cell in code_cells(nb)), "commit the notebook without outputs"


def test_every_step_is_explained_in_one_markdown_line():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for before, cell in zip(nb.cells, nb.cells[1:]):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", f"no explanation before:\n{cell.source[:80]}"


def test_colab_commands_name_files_that_exist():
    """The Colab run is not executed here: at least the files its commands name must exist."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(cell.source for cell in code_cells(nb))
    for command in (
        "accelerate launch --config_file",
        "recipes/finetune_hupd.py",
        "recipes/chat.py --adapter",
        "recipes/push_run.py",
        "pip install -q -e .",
        'userdata.get("HF_TOKEN")',
    ):
        assert command in source, command
    paths = set(re.findall(r"\b((?:recipes|accelerate_configs)/[\w./-]+\.(?:py|yaml))", source))
    assert "recipes/configs/hupd_llama31_8b_abstract_qlora_t4.yaml" in paths  # the Colab default
    missing = sorted(p for p in paths if not (REPO / p).is_file())
    assert not missing, missing


def test_the_token_is_never_printed_or_put_in_a_command():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = cell_running(nb, "userdata.get")
    assert 'os.environ["HF_TOKEN"] = userdata.get("HF_TOKEN")' in cell.source
    assert "print(os.environ" not in cell.source and "HF_TOKEN}" not in "".join(c.source for c in code_cells(nb))


# --- executed offline -----------------------------------------------------------------------


def test_runs_to_the_end_offline(executed):
    nb, _ = executed
    assert all(cell.get("execution_count") for cell in code_cells(nb))
    assert "offline test: True" in output_text(cell_running(nb, "IN_COLAB = "))


def test_colab_only_cells_are_skipped(executed):
    nb, _ = executed
    assert "Install skipped" in output_text(cell_running(nb, "pip install -q -e ."))
    assert "Secrets skipped" in output_text(cell_running(nb, "userdata.get"))
    assert "Push skipped: offline test" in output_text(cell_running(nb, "push_run.py"))


def test_fine_tune_wrote_results_and_the_results_cell_shows_them(executed):
    nb, output_dir = executed
    results = json.loads((output_dir / "all_results.json").read_text())
    # Offline it is the Colab path in miniature: a tiny Llama in 4-bit + LoRA writing abstracts.
    assert {"eval_loss", "eval_perplexity", "eval_rougeL", "train_loss"} <= set(results)
    assert (output_dir / "adapter_model.safetensors").is_file()
    shown = output_text(cell_running(nb, "all_results.json"))
    assert "eval_rougeL" in shown and str(results["eval_rougeL"]) in shown
    assert "recipes/finetune_hupd.py --config recipes/configs/quickstart.yaml" in output_text(
        cell_running(nb, "finetune_hupd.py")
    )


def test_chat_cell_replied_through_the_adapter(executed):
    nb, _ = executed
    text = output_text(cell_running(nb, "recipes/chat.py"))
    assert "$ python recipes/chat.py --adapter " in text
    assert "Loading the LoRA adapter" in text  # the adapter, not just the base model
    # --stats: "[stats] N tokens in ...", printed once a reply was generated
    assert re.search(r"^\[stats\] [1-9]\d* tokens in ", text, flags=re.M), text[-2000:]
    assert "Traceback" not in text


def test_no_output_holds_a_token(executed):
    nb, _ = executed
    assert not any(TOKEN_SHAPE.search(output_text(cell)) for cell in code_cells(nb))
