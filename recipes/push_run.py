"""Push a finished hfplug run to the Hugging Face Hub: the LoRA adapter (or a full fine-tune's
weights, or with --merge_adapter the base with the adapter merged in), tokenizer, results JSON,
training curves and a model card. Access is checked first.

    python recipes/push_run.py outputs/quickstart --hub_model_id alice/hupd-bert --hub_private_repo

    python recipes/push_run.py outputs/llama-lora --hub_model_id alice/hupd-llama --merge_adapter

The flags have the names finetune_hupd.py uses for the same settings (--hub_private_repo,
--merge_adapter, --merge_base_model, --hub_license); push_adapter.py's old names (--private,
--base_model, --license) are refused with the new name (``hfplug.config.RENAMED``).

The token comes from HF_TOKEN, the Colab secret HF_TOKEN, or `hf auth login` (a hidden prompt
appears on a terminal when none is found); it is never a flag: `--hub_token hf_…` (or any
argument shaped like a token) is refused before anything runs. Rerunning is safe: files already
on the Hub unchanged are skipped, so an interrupted push is finished by running it again.

Errors the user can fix (a refused token, bad flags, a missing folder, the Hub saying no) print
`error: …` (tokens masked) and exit with status 2, without a traceback (``hfplug.cli.run``);
anything else is a bug and keeps its traceback.
"""

import gc

if __name__ == "__main__":  # run as a script: no full collections over the imports (3 s); run() resumes them
    gc.disable()

import logging
import sys
from dataclasses import dataclass, field

from hfplug.cli import run
from hfplug.config import parse_args
from hfplug.hub import HubArguments
from hfplug.hub.preflight import preflight_push
from hfplug.hub.push import push_run, run_kind
from hfplug.hub.redaction import install_token_redaction
from hfplug.loading import adapter_base_model

logger = logging.getLogger("hfplug.recipes.push_run")


@dataclass
class PushArguments:
    """What to push where. The first positional argument is ``output_dir``; the merge and license flags are ``HubArguments``."""

    output_dir: str = field(
        metadata={"help": "The run's output_dir (holds adapter_config.json or model.safetensors)."}
    )
    hub_model_id: str = field(metadata={"help": "Target repo, namespace/name (or name, for your own namespace)."})
    hub_private_repo: bool = field(
        default=False,
        metadata={
            "help": "Create the repo private (applies to a new repo only; without it the Hub's default applies)."
        },
    )
    task: str | None = field(default=None, metadata={"help": "decision or ipc (default: inferred from the metrics)."})
    hupd_config: str | None = field(
        default=None, metadata={"help": "HUPD config trained on (sample or all), for the card."}
    )


def _with_output_dir_flag(argv):
    """``OUTPUT_DIR --hub_model_id ...`` -> ``--output_dir OUTPUT_DIR --hub_model_id ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--output_dir", argv[0], *argv[1:]]
    return argv


def main(argv=None):
    # --- Arguments ------------------------------------------------------------
    argv = _with_output_dir_flag(argv)
    # A token as a flag is refused first (no message may echo it), then push_adapter.py's old flag names.
    args, hub_args = parse_args((PushArguments, HubArguments), argv)

    # --- Logging --------------------------------------------------------------
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO,
    )
    install_token_redaction()

    # --- Check the run, the token, the repo (before any model is loaded) ------
    kind = run_kind(args.output_dir)
    base = hub_args.merge_base_model or (adapter_base_model(args.output_dir) if kind == "adapter" else None)
    private = True if args.hub_private_repo else None  # no flag: the account's default visibility
    target = preflight_push(
        args.hub_model_id,
        private=private,
        merge_adapter=hub_args.merge_adapter,
        base_model=base,
        output_dir=args.output_dir,
    )

    # --- Push -----------------------------------------------------------------
    result = push_run(
        args.output_dir,
        target.repo_id,
        token=target.token,
        private=private,
        merge_adapter=hub_args.merge_adapter,
        base_model=hub_args.merge_base_model,
        license=hub_args.hub_license,
        task=args.task,
        hupd_config=args.hupd_config,
        endpoint=target.endpoint,
    )
    if result.commit_url:
        logger.info("Done: %s (%s)", target.url, result.commit_url)
    return 0


if __name__ == "__main__":
    run(main)  # bad input or a Hub refusal: one `error:` paragraph (tokens masked) and exit status 2
