"""Loading settings: defaults < TOML/YAML file < ``STREAMLSTM_<SECTION>__<FIELD>`` < ``--set``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from streamlstm.config.sections import ConfigError
from streamlstm.config.settings import _FILE_DATA, Settings


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    try:
        if path.suffix in {".yaml", ".yml"}:
            import yaml  # optional: only for YAML files

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:
        raise ConfigError(f"config file {path}: not valid TOML/YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a table of sections")
    return data


def _overrides_to_tree(overrides: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in overrides.items():
        section, _, field = dotted.partition(".")
        if not field:
            raise ConfigError(f"override {dotted!r}: expected SECTION.FIELD=VALUE")
        tree.setdefault(section, {})[field] = value
    return tree


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``section.field: what is wrong (got VALUE)``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"]
        if err["type"] == "value_error":
            # A cross-field rule (model validator): its message starts with the field.
            msg = msg.removeprefix("Value error, ")
            if loc != "settings" and msg.startswith(loc.partition(".")[0] + "."):
                loc = ""
            if loc in ("", "settings"):
                parts.append(msg)
                continue
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (see `streamlstm config` for the valid names)"
        got = err.get("input")
        shown = (
            "" if isinstance(got, dict) or err["type"] == "extra_forbidden" else f" (got {got!r})"
        )
        parts.append(f"{loc}: {msg}{shown}")
    return "; ".join(parts)


def load_settings(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build validated settings; raise :class:`ConfigError` naming the bad field."""
    file_data = _read_file(Path(config_file)) if config_file else {}
    token = _FILE_DATA.set(file_data)
    try:
        return Settings(**_overrides_to_tree(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        _FILE_DATA.reset(token)


def parse_override(text: str) -> tuple[str, str]:
    """Split ``section.field=value`` from the command line."""
    name, sep, value = text.partition("=")
    if not sep or "." not in name:
        raise ConfigError(
            f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. model.hidden_size=32"
        )
    return name.strip(), value.strip()
