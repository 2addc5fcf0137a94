"""Command-line + YAML configuration for the recipes.

Every recipe is configured by dataclasses parsed with ``HfArgumentParser``.
``--config file.yaml`` supplies defaults; flags given on the command line
override them. A YAML key that no dataclass field knows is an error that names
the key (and the closest known one), never silently ignored.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A configuration file or flag that hfplug cannot use as given."""


def _known_keys(parser: HfArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


def read_yaml_config(path: str | Path, known_keys: set[str] | None = None) -> dict[str, Any]:
    """Read a flat YAML mapping of dataclass fields; check its keys when ``known_keys`` is given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist. Pass --config with a path to a YAML file, "
                          "e.g. --config recipes/configs/quickstart.yaml.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {str(path)!r} must be a mapping of `key: value` lines, got {type(values).__name__}.")
    if known_keys is not None:
        unknown = sorted(set(values) - known_keys)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known_keys, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"Unknown key(s) in {str(path)!r}: {', '.join(hints)}. "
                              "Every key must be a field of the recipe's arguments; run the recipe with --help to list them.")
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


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Parse ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    ``--config file.yaml`` sets defaults; command-line flags override them.
    Unknown YAML keys and unknown flags are errors that name them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    config_path, argv = _split_config_flag(argv)
    if config_path is not None:
        values = read_yaml_config(config_path, _known_keys(parser))
        # Defaults from YAML, overridden by any flag given on the command line.
        # argparse type-converts string defaults; other YAML scalars/lists keep their type.
        parser.set_defaults(**values)
        # A YAML value for a field that is `required` on the CLI makes it optional.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        # HfArgumentParser reports unknown flags as "Some specified arguments are not used ...".
        raise ConfigError(f"{str(err).rstrip('.')}. Run with --help to list the accepted flags.") from err
