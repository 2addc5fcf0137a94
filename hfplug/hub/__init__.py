"""The Hugging Face Hub side of a run: tokens, checks before training, the push after it.

    hfplug.hub.redaction   tokens kept out of logs, messages and command lines; the exit status
    hfplug.hub.auth        where the token comes from; whoami / auth_check: what it may do
    hfplug.hub.errors      HubError and its kinds; one translator for failed Hub calls
    hfplug.hub.arguments   HubArguments; --push_to_hub / --hub_token taken over from TrainingArguments
    hfplug.hub.preflight   preflight_push (token, write access, repo) and check_model_access (gated models)
    hfplug.hub.card        the model card
    hfplug.hub.push        which files, push_run, the retry command, the every_save callback
    hfplug.hub.merge       --merge_adapter: plan (fits? 16-bit?) and merge

Importing this package imports only the light modules re-exported below (no transformers, no
HTTP client): ``hfplug.config`` and ``hfplug.cli`` use them before a recipe has parsed its flags.
Import ``preflight``, ``push`` and ``merge`` from their modules.
"""

from hfplug.hub.arguments import HubArguments, HubSettings, check_repo_id, hub_settings, take_hub_token
from hfplug.hub.errors import HubError, MergeError, ModelAccessError, PreflightError, PushError

__all__ = [
    "HubArguments",
    "HubError",
    "HubSettings",
    "MergeError",
    "ModelAccessError",
    "PreflightError",
    "PushError",
    "check_repo_id",
    "hub_settings",
    "take_hub_token",
]
