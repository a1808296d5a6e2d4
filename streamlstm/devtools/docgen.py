"""Generate the reference documents from the code, so they cannot go stale.

``docs/configuration.md`` is rendered from the pydantic models in :mod:`streamlstm.config`
(every setting, its type, constraints, default, environment variable and description) and
``docs/metrics.md`` from the registry in :mod:`streamlstm.metrics` (every metric, its type,
labels and the series it exposes). Regenerate both after changing either module::

    python -m streamlstm.devtools.docgen          # write docs/configuration.md, docs/metrics.md
    python -m streamlstm.devtools.docgen --check  # exit 1 when a file is stale (CI)
    streamlstm config --markdown           # the configuration reference on stdout

>>> "STREAMLSTM_MODEL__HIDDEN_SIZE" in render_configuration()
True
"""

from __future__ import annotations

import argparse
import enum
import sys
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

ENV_PREFIX = "STREAMLSTM_"
ENV_DELIMITER = "__"
DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"
REGENERATE = "python -m streamlstm.devtools.docgen"


# -- configuration -------------------------------------------------------------------------


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


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


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
<!-- Generated by `{REGENERATE}` from streamlstm/config.py: do not edit by hand. -->
# Configuration reference

Every setting of streamlstm, generated from the pydantic models in
[`streamlstm/config.py`](../streamlstm/config.py). Settings are read from, highest
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

Cross-field rules: `training.burn_in` must be smaller than `training.window`, and
`engine.max_batch` must not exceed `state.max_keys`.

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
                f"| `{r.field}` | {r.type} | `{_cell(r.default)}` | {_cell(r.constraints)} "
                f"| `{r.env}` | {_cell(r.description)} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# -- metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricDoc:
    """One metric of :class:`streamlstm.metrics.Metrics`."""

    attribute: str
    name: str
    type: str
    labels: tuple[str, ...]
    help: str
    series: tuple[str, ...]
    buckets: tuple[float, ...]


def metrics_reference() -> list[MetricDoc]:
    """Every metric the daemon registers, in declaration order."""
    from prometheus_client.metrics import MetricWrapperBase

    from streamlstm.metrics import Metrics

    out = []
    for attribute, metric in vars(Metrics()).items():
        if not isinstance(metric, MetricWrapperBase):
            continue
        kind = metric._type
        name = metric._name
        if kind == "counter":
            series: tuple[str, ...] = (f"{name}_total",)
        elif kind == "histogram":
            series = (f"{name}_bucket", f"{name}_sum", f"{name}_count")
        elif kind == "info":
            series = (f"{name}_info",)
        elif kind == "summary":
            series = (f"{name}_sum", f"{name}_count")
        else:
            series = (name,)
        bounds = getattr(metric, "_upper_bounds", ())
        labels = tuple(metric._labelnames)
        if kind == "info":  # an info metric's labels are the keys of its value
            labels += tuple(getattr(metric, "_value", {}))
        out.append(
            MetricDoc(
                attribute=attribute,
                name=name,
                type=kind,
                labels=labels,
                help=metric._documentation,
                series=series,
                buckets=tuple(b for b in bounds if b != float("inf")),
            )
        )
    return out


_LABEL_VALUES = {
    "topic": "the input topic (`kafka.input_topic`)",
    "partition": "partition number of the input topic",
    "reason": "why an event was refused: {reasons}",
    "cause": "why a key left the state store: `ttl` (idle past `state.ttl_seconds`), "
    "`capacity` (LRU beyond `state.max_keys`)",
    "operation": "the broker call that failed (e.g. poll, produce, commit)",
    "result": "outcome of a fine-tuning run: `adopted` (weights swapped in), `rejected` "
    "(validation gate kept the old weights), `failed` (the run raised)",
    "detector": "which detector fired: `adwin` (global, over every key's errors) or "
    "`page_hinkley` (per key; counts the keys that drifted)",
    "version": "the streamlstm release (`streamlstm --version`)",
}

_METRICS_INTRO = f"""\
<!-- Generated by `{REGENERATE}` from streamlstm/metrics.py: do not edit by hand. -->
# Metrics reference

The daemon serves these on `http://HOST:9400/metrics` (`metrics.host`, `metrics.port`),
next to `/healthz` (the process is alive) and `/readyz` (partitions assigned and the
broker reachable; 503 otherwise). Names follow Prometheus conventions: base units in the
name, `_total` on counters; histograms expose `_bucket`, `_sum` and `_count` series.
A stream key is never a label (keys are unbounded); every label below is bounded.

The alert rules in [`deploy/prometheus/rules.yml`](../deploy/prometheus/rules.yml) and the
Grafana dashboard in [`deploy/grafana/`](../deploy/grafana/) query only these series; the
test suite checks that against a live scrape. What to do when an alert fires is in the
[runbook](runbook.md).
"""


_USEFUL_QUERIES = """\
```promql
# events per second, all instances
sum(rate(streamlstm_events_total[5m]))
# p99 latency from the event's ts to its prediction being acknowledged
histogram_quantile(0.99,
  sum by (le) (rate(streamlstm_event_latency_seconds_bucket[5m])))
# consumer lag per partition
max by (partition) (streamlstm_consumer_lag)
# share of input records dead-lettered
sum(rate(streamlstm_dead_letters_total[5m]))
  / (sum(rate(streamlstm_events_total[5m]))
     + sum(rate(streamlstm_dead_letters_total[5m])))
# seconds since the serving weights last changed
time() - streamlstm_last_model_update_timestamp_seconds
```"""


def render_metrics() -> str:
    """The Markdown reference of every metric (docs/metrics.md)."""
    from streamlstm.events import REASONS

    docs = metrics_reference()
    lines = [_METRICS_INTRO]
    lines.append("| metric | type | labels | meaning |")
    lines.append("|---|---|---|---|")
    for m in docs:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        shown = m.name if m.type == "histogram" else m.series[0]
        lines.append(f"| `{shown}` | {m.type} | {labels} | {_cell(m.help)} |")
    lines.append("")
    lines.append("## Labels\n")
    used = sorted({label for m in docs for label in m.labels})
    reasons = ", ".join(f"`{r}`" for r in REASONS)
    for label in used:
        meaning = _LABEL_VALUES.get(label, "").format(reasons=reasons)
        lines.append(f"- `{label}`: {meaning or 'see the metric description'}")
    lines.append("")
    lines.append("## Series and buckets\n")
    lines.append("| metric | series | buckets (upper bounds) | attribute |")
    lines.append("|---|---|---|---|")
    for m in docs:
        series = ", ".join(f"`{s}`" for s in m.series)
        buckets = ", ".join(f"{b:g}" for b in m.buckets) or "-"
        lines.append(f"| `{m.name}` | {series} | {buckets} | `Metrics.{m.attribute}` |")
    lines.append("")
    lines.append("## Useful queries\n")
    lines.append(_USEFUL_QUERIES)
    return "\n".join(lines).rstrip() + "\n"


# -- files ---------------------------------------------------------------------------------

GENERATED = {"configuration.md": render_configuration, "metrics.md": render_metrics}


def stale_files(docs_dir: Path = DOCS_DIR) -> list[Path]:
    """Generated documents whose content differs from what the code renders now."""
    stale = []
    for name, render in GENERATED.items():
        path = docs_dir / name
        if not path.exists() or path.read_text() != render():
            stale.append(path)
    return stale


def write_all(docs_dir: Path = DOCS_DIR) -> list[Path]:
    """(Re)write every generated document; return the paths that changed."""
    changed = []
    docs_dir.mkdir(parents=True, exist_ok=True)
    for name, render in GENERATED.items():
        path = docs_dir / name
        text = render()
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    """``python -m streamlstm.devtools.docgen [--check] [--docs DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m streamlstm.devtools.docgen", description=__doc__
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a document is stale")
    parser.add_argument("--docs", type=Path, default=DOCS_DIR, help="docs directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.docs)
        for path in stale:
            print(f"stale: {path} (regenerate with `{REGENERATE}`)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_all(args.docs):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
