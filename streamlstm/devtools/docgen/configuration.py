"""``docs/configuration.md``: every setting of :mod:`streamlstm.config`, from the models.

Each setting's type, constraints, default, environment variable and description are read
from the pydantic models, so the page cannot drift from the code.

>>> "STREAMLSTM_MODEL__HIDDEN_SIZE" in render_configuration()
True
>>> setting_for_env("STREAMLSTM_KAFKA__GROUP_ID")
('kafka', 'group_id')
"""

from __future__ import annotations

import enum
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from streamlstm.config import Settings
from streamlstm.devtools.docgen.markdown import REGENERATE, cell

ENV_PREFIX = "STREAMLSTM_"
ENV_DELIMITER = "__"


def env_var(section: str, field: str) -> str:
    """Environment variable of ``section.field``, e.g. ``STREAMLSTM_KAFKA__GROUP_ID``."""
    return f"{ENV_PREFIX}{section}{ENV_DELIMITER}{field}".upper()


def setting_for_env(name: str) -> tuple[str, str] | None:
    """``(section, field)`` that an environment variable sets, or None if it names none."""
    upper = name.upper()
    if not upper.startswith(ENV_PREFIX):
        return None
    section, sep, field = upper[len(ENV_PREFIX) :].partition(ENV_DELIMITER)
    section, field = section.lower(), field.lower()
    if not sep or section not in Settings.model_fields:
        return None
    model = _section_model(section)
    return (section, field) if field in model.model_fields else None


def _section_model(section: str) -> type[BaseModel]:
    annotation = Settings.model_fields[section].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation


def _type_name(annotation: Any) -> str:
    """A short, TOML-minded name of a field's type."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{_toml(v)}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = " \\| ".join(_type_name(a) for a in args)
        return f"{inner} (optional)" if len(args) < len(typing.get_args(annotation)) else inner
    names = {bool: "bool", int: "int", float: "float", str: "string", Path: "path"}
    if annotation in names:
        return names[annotation]
    if annotation is SecretStr:
        return "secret string"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{_toml(m.value)}`" for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _constraints(info: FieldInfo) -> str:
    """Bounds of a field, e.g. ``>= 1, <= 4096``."""
    signs = [
        (annotated_types.Ge, "ge", ">="),
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Le, "le", "<="),
        (annotated_types.Lt, "lt", "<"),
    ]
    parts = []
    for meta in info.metadata:
        for kind, attr, sign in signs:
            if isinstance(meta, kind):
                parts.append(f"{sign} {_toml(getattr(meta, attr))}")
        if isinstance(meta, annotated_types.MinLen) and meta.min_length:
            parts.append("not empty" if meta.min_length == 1 else f"length >= {meta.min_length}")
    return ", ".join(parts)


def _toml(value: Any) -> str:
    """A value as it would be written in the TOML file."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, enum.Enum):
        return _toml(value.value)
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return f"{value:.1f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:_}"
    return str(value)


def _default(info: FieldInfo) -> Any:
    if info.default is not PydanticUndefined:
        return info.default
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return PydanticUndefined


@dataclass(frozen=True)
class SettingDoc:
    """One documented setting."""

    section: str
    field: str
    type: str
    constraints: str
    default: str
    env: str
    description: str


def settings_reference() -> list[SettingDoc]:
    """Every setting in declaration order."""
    out = []
    for section in Settings.model_fields:
        for field, info in _section_model(section).model_fields.items():
            default = _default(info)
            out.append(
                SettingDoc(
                    section=section,
                    field=field,
                    type=_type_name(info.annotation),
                    constraints=_constraints(info),
                    default="required" if default is PydanticUndefined else _toml(default),
                    env=env_var(section, field),
                    description=info.description or "",
                )
            )
    return out


_CONFIG_INTRO = f"""\
<!-- Generated by `{REGENERATE}` from streamlstm/config/sections.py: do not edit by hand. -->
# Configuration reference

Every setting of streamlstm, generated from the pydantic models in
[`streamlstm/config/sections.py`](../streamlstm/config/sections.py). Settings are read from, highest
precedence first:

1. `--set SECTION.FIELD=VALUE` on the command line (repeatable);
2. environment variables `STREAMLSTM_<SECTION>__<FIELD>` (upper case, two underscores
   between section and field), e.g. `STREAMLSTM_KAFKA__BOOTSTRAP_SERVERS=kafka:9092`;
3. the file given with `--config FILE` (TOML, or YAML for `.yaml`/`.yml`), one table
   per section;
4. the defaults below.

Every value is validated at start-up: an unknown name or a bad value stops the command
with exit code 2 and one line naming the setting. `streamlstm config` prints the values in
effect (with the same `--config`/`--set` flags and environment), and
`streamlstm config --markdown` prints this page.

Cross-field rules (each refused at start-up, naming the setting): `training.burn_in` must
be smaller than `training.window`; `engine.max_batch` must not exceed `state.max_keys`;
`kafka.bootstrap_servers` must be a `host:port` list; `kafka.fetch_max_wait_ms` must be
below kafka-python's 30 s request timeout;
`kafka.heartbeat_interval_ms` must be below `kafka.session_timeout_ms`; the input, output
and dead-letter topics must all differ; a `SASL_*` protocol needs `kafka.sasl_mechanism`
plus `sasl_username` and `sasl_password` (OAUTHBEARER is refused: it needs a token provider
object); SASL settings with a non-SASL protocol, and `ssl_*` files with a plaintext one,
are refused rather than ignored; `ssl_*` files must exist; `kafka.producer_acks = "0"`
needs `kafka.allow_unsafe_acks = true`; a compression codec needs its Python package
(kafka-python); `kafka.client = "confluent"` needs the confluent-kafka package
(`pip install 'streamlstm[confluent]'`). How each Kafka setting maps onto librdkafka:
[kafka-clients.md](kafka-clients.md).
`training.device = "cuda"` without a CUDA device is refused when the trainer starts.

```toml
# my.toml: only what differs from the defaults
[kafka]
bootstrap_servers = "kafka-1:9092,kafka-2:9092"
group_id = "streamlstm-prod"

[model]
input_size = 8
hidden_size = 128

[training]
checkpoint_dir = "/var/lib/streamlstm/checkpoints"
```
"""


def render_configuration() -> str:
    """The Markdown reference of every setting (docs/configuration.md)."""
    lines = [_CONFIG_INTRO]
    lines.append("## Sections\n")
    for section in Settings.model_fields:
        doc = (_section_model(section).__doc__ or "").strip().splitlines()[0]
        lines.append(f"- [`[{section}]`](#{section}): {doc}")
    lines.append("")
    rows = settings_reference()
    for section in Settings.model_fields:
        doc = (_section_model(section).__doc__ or "").strip()
        lines.append(f"## {section}\n")
        lines.append(f"{doc}\n")
        lines.append("| setting | type | default | allowed | environment variable | description |")
        lines.append("|---|---|---|---|---|---|")
        for r in rows:
            if r.section != section:
                continue
            lines.append(
                f"| `{r.field}` | {r.type} | `{cell(r.default)}` | {cell(r.constraints)} "
                f"| `{r.env}` | {cell(r.description)} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
