"""What the generated pages share: where they live, how to regenerate them, table cells."""

from __future__ import annotations

from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parents[3] / "docs"
REGENERATE = "python -m streamlstm.devtools.docgen"


def cell(text: str) -> str:
    """``text`` safe inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
