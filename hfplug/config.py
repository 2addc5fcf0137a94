"""Command-line + YAML configuration for the recipes.

Every recipe is configured by dataclasses parsed with ``HfArgumentParser``.
``--config file.yaml`` supplies defaults; flags given on the command line
override them. A YAML key or a flag that no dataclass field knows is an error that
names it (and the closest known one), never silently ignored; a flag or key that was
renamed (``RENAMED``) is an error that gives the new name; a YAML value of the wrong
type is an error that names the key and the file. A token given as a flag is refused
before anything else (``hfplug.hub.redaction.refuse_token_flags``).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from hfplug.hub.redaction import mask_tokens, refuse_token_flags


class ConfigError(ValueError):
    """A configuration file or flag that hfplug cannot use as given."""


# Old flag / YAML key -> (its name now, why). Every recipe that has the new name refuses the old one
# with it, instead of taking it silently (transformers' own deprecated names included).
_FINETUNE_NAME = "the name finetune_hupd.py uses for the same setting"
_HUPD_PREFIX = "named like the other HUPD flags, hupd_config and hupd_cache_dir"
RENAMED = {
    "gradient_checkpointing": (
        "activation_checkpointing",
        "gradient_checkpointing is transformers' deprecated name for it; hfplug's flags, configs and docs all say "
        "activation_checkpointing",
    ),
    "gradient_checkpointing_kwargs": (
        "activation_checkpointing_kwargs",
        "transformers' deprecated name for it, beside activation_checkpointing",
    ),
    "metadata_path": ("hupd_metadata_path", _HUPD_PREFIX),
    "archive_path": ("hupd_archive_path", _HUPD_PREFIX),
    # push_adapter.py's names
    "private": ("hub_private_repo", _FINETUNE_NAME),
    "base_model": ("merge_base_model", _FINETUNE_NAME),
    "license": ("hub_license", _FINETUNE_NAME),
}


def _known_keys(parser: HfArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


class _StringDatesLoader(yaml.SafeLoader):
    """Safe YAML without implicit timestamps: an unquoted ``2016-02-30`` stays a string, so the
    argument's own date check names the key, instead of PyYAML's bare "day is out of range"."""


_StringDatesLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _renamed_error(old: str, known: set[str], *, path: str | Path | None = None) -> ConfigError | None:
    """The error for an old flag (``--old``, ``--old=value``) or, with ``path``, an old YAML key; None if not renamed."""
    name = old.split("=", 1)[0].lstrip("-").replace("-", "_")
    new, why = RENAMED.get(name, (None, None))
    if new is None or new not in known:
        return None
    if path is None:
        return ConfigError(f"{old.split('=', 1)[0]} is now --{new}: {why}. Run again with --{new}.")
    return ConfigError(f"The key {name!r} in {str(path)!r} is now {new!r}: {why}. Rename it to {new}.")


def refuse_renamed(argv: Sequence[str], known: set[str]) -> None:
    """A flag of ``argv`` renamed (``RENAMED``) to one of the ``known`` fields is a ``ConfigError`` with the new name."""
    for arg in argv:
        if arg.startswith("--") and (err := _renamed_error(arg, known)) is not None:
            raise err


def _did_you_mean(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _expected(action) -> str:
    if action.type is int:
        return "a whole number"
    if action.type is float:
        return "a number"
    if action.type is string_to_bool:
        return "true or false"
    if action.choices:
        return "one of " + ", ".join(str(c) for c in action.choices)
    return "a string"


def _typed_values(values: dict[str, Any], parser: HfArgumentParser, path: Path) -> dict[str, Any]:
    """YAML scalars converted by each flag's own type, as if typed on the command line.

    argparse converts only string defaults; without this a YAML ``max_length: 12.5`` or
    ``max_length: true`` would reach the dataclass as a float or bool and fail late, or not at all.
    """
    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for key, value in values.items():
        action = actions[key]
        convert = action.type
        if value is None or convert is None or isinstance(value, dict):
            typed[key] = (
                value  # None = unset; dicts (e.g. activation_checkpointing_kwargs) are parsed by the dataclass
            )
            continue
        if isinstance(value, bool) and convert in (int, float):
            raise ConfigError(f"{key}: {value} in {str(path)!r} must be {_expected(action)}, not true/false.")
        try:
            if isinstance(value, list):
                typed[key] = [convert(str(item)) for item in value]
            else:
                typed[key] = convert(str(value).lower() if isinstance(value, bool) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"{key}: {value!r} in {str(path)!r} must be {_expected(action)}.") from None
    return typed


def read_yaml_config(path: str | Path, known_keys: set[str] | None = None) -> dict[str, Any]:
    """Read a flat YAML mapping of dataclass fields; check its keys when ``known_keys`` is given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Config file {str(path)!r} does not exist. Pass --config with a path to a YAML file, "
            "e.g. --config recipes/configs/quickstart.yaml."
        )
    try:
        values = yaml.load(path.read_text(), Loader=_StringDatesLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(
            f"Config file {str(path)!r} must be a mapping of `key: value` lines, got {type(values).__name__}."
        )
    if known_keys is not None:
        for key in values:
            if (err := _renamed_error(str(key), known_keys, path=path)) is not None:
                raise err
        unknown = sorted(set(values) - known_keys)
        if unknown:
            hints = [_did_you_mean(key, known_keys) for key in unknown]
            raise ConfigError(
                f"Unknown key(s) in {str(path)!r}: {', '.join(hints)}. "
                "Every key must be a field of the recipe's arguments; run the recipe with --help to list them."
            )
    return values


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--config PATH`` / ``--config=PATH`` out of argv."""
    config_path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML file.")
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return config_path, rest


def _unknown_flags_error(remaining: list[str], known: set[str]) -> ConfigError:
    flags = [arg.split("=", 1)[0] for arg in remaining if arg.startswith("-")]
    hints = [_did_you_mean(flag, {f"--{k}" for k in known}) for flag in flags]
    stray = len(remaining) - len(flags)
    what = f"Unknown flag(s): {', '.join(hints)}." if hints else ""
    if stray and not hints:
        what = f"{stray} value(s) with no flag before them."
    return ConfigError(mask_tokens(f"{what} Run with --help to list the accepted flags."))


def _config_error(err: ValueError, values: dict[str, Any], path: str | None) -> ConfigError:
    """A dataclass check failed on a value: a ``ConfigError`` that says when the value came from the YAML file."""
    message = mask_tokens(str(err))
    keys = [key for key in values if re.search(rf"\b{re.escape(key)}\b", message)]
    if keys:
        message = f"{message.rstrip()} ({', '.join(keys)} set in {path!r}.)"
    return ConfigError(message)


def parse_args(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, *, default_config: str | Path | None = None
) -> tuple:
    """Parse ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    ``--config file.yaml`` sets defaults (``default_config`` when no ``--config`` is given);
    command-line flags override them. Unknown YAML keys and unknown flags are errors that
    name them, renamed ones (``RENAMED``) errors that give the new name; a token given as a
    flag is refused without echoing it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_token_flags(argv)  # before anything can print or store the command line
    parser = HfArgumentParser(dataclass_types)
    config_path, argv = _split_config_flag(argv)
    refuse_renamed(argv, _known_keys(parser))
    if config_path is None and default_config is not None:
        config_path = str(default_config)
        print(f"No --config given: using the default job, {config_path}.", file=sys.stderr)
    values = {}
    if config_path is not None:
        values = _typed_values(read_yaml_config(config_path, _known_keys(parser)), parser, Path(config_path))
        # Defaults from YAML, overridden by any flag given on the command line.
        parser.set_defaults(**values)
        # A YAML value for a field that is `required` on the CLI makes it optional.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:
        raise _config_error(err, values, config_path) from None
    if remaining:
        raise _unknown_flags_error(remaining, _known_keys(parser))
    return tuple(parsed)
