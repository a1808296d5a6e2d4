"""Generate the reference documents from the code, so they cannot go stale.

``docs/configuration.md`` is rendered from the pydantic models in :mod:`streamlstm.config`
(every setting, its type, constraints, default, environment variable and description) and
``docs/metrics.md`` from the registry in :mod:`streamlstm.metrics` (every metric, its type,
labels and the series it exposes). Regenerate both after changing either module::

    python -m streamlstm.devtools.docgen          # write docs/configuration.md, docs/metrics.md
    python -m streamlstm.devtools.docgen --check  # exit 1 when a file is stale (CI)
    streamlstm config --markdown           # the configuration reference on stdout

The configuration page is rendered by :mod:`.configuration`, the metrics page by
:mod:`.metrics`; this module writes and checks the files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamlstm.devtools.docgen.configuration import (
    SettingDoc,
    env_var,
    render_configuration,
    setting_for_env,
    settings_reference,
)
from streamlstm.devtools.docgen.markdown import DOCS_DIR, REGENERATE
from streamlstm.devtools.docgen.metrics import MetricDoc, metrics_reference, render_metrics

__all__ = [
    "DOCS_DIR",
    "GENERATED",
    "REGENERATE",
    "MetricDoc",
    "SettingDoc",
    "env_var",
    "main",
    "metrics_reference",
    "render_configuration",
    "render_metrics",
    "setting_for_env",
    "settings_reference",
    "stale_files",
    "write_all",
]

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
