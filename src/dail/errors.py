"""The errors every module raises at the user, and the YAML reader they share.

A leaf: it imports nothing from dail, so any module can use it without an import circle
(config checks prompt files, and prompts reads them with `load_yaml`). `dail.config` and
`dail.data` re-export these names, the same objects.
"""

from __future__ import annotations

from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type; the message names the field."""


class DataError(ValueError):
    """Bad input data. The message names the file, the line or row, and the field."""


def load_yaml(path: str | Path, what: str = "config file", mapping: str = "at the top level") -> dict:
    """The mapping in YAML file `path` ({} for an empty file). Errors name the file and say
    what it should have been: `what` (a config file, a prompt file) and `mapping` (what kind)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping {mapping}, got {type(data).__name__}")
    return data
