"""docs/: generated references are current, links resolve, every alert has a runbook entry."""

from __future__ import annotations

import io
import os
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from conftest import live_exposition

from streamlstm.cli import main
from streamlstm.config import Settings
from streamlstm.devtools import docgen

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REGENERATE = "run `python -m streamlstm.devtools.docgen` (or `streamlstm config --markdown > {}`)"
# Hand-written pages of this project's docs (docs/ett* belong to the ETT study).
WRITTEN = [
    "README.md",
    "architecture.md",
    "deployment.md",
    "runbook.md",
    "benchmarks.md",
    "mutation.md",
]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_configuration_reference_is_current() -> None:
    path = DOCS / "configuration.md"
    assert path.exists(), f"docs/configuration.md is missing: {REGENERATE.format(path)}"
    assert path.read_text() == docgen.render_configuration(), (
        f"docs/configuration.md is stale: {REGENERATE.format('docs/configuration.md')}"
    )


def test_metrics_reference_is_current() -> None:
    path = DOCS / "metrics.md"
    assert path.exists() and path.read_text() == docgen.render_metrics(), (
        "docs/metrics.md is stale: run `python -m streamlstm.devtools.docgen`"
    )


def test_configuration_reference_lists_every_setting() -> None:
    text = docgen.render_configuration()
    for section, section_field in Settings.model_fields.items():
        assert f"## {section}\n" in text
        model = section_field.annotation
        for name, info in model.model_fields.items():
            env = f"STREAMLSTM_{section}__{name}".upper()
            row = next((line for line in text.splitlines() if f"`{env}`" in line), None)
            assert row is not None, f"{section}.{name} is not documented"
            assert row.startswith(f"| `{name}` |")
            assert (info.description or "") in row.replace("\\|", "|")


def test_configuration_reference_shows_defaults_and_bounds() -> None:
    rows = {r.env: r for r in docgen.settings_reference()}
    assert rows["STREAMLSTM_METRICS__PORT"].default == "9400"
    assert rows["STREAMLSTM_KAFKA__INPUT_TOPIC"].default == '"events"'
    assert rows["STREAMLSTM_MODEL__HIDDEN_SIZE"].constraints == ">= 1, <= 4096"
    assert rows["STREAMLSTM_KAFKA__AUTO_OFFSET_RESET"].type == '`"earliest"` \\| `"latest"`'
    assert rows["STREAMLSTM_TRAINING__CHECKPOINT_DIR"].type == "path (optional)"
    assert rows["STREAMLSTM_KAFKA__CREATE_TOPICS"].default == "true"


def test_env_names_map_back_to_settings() -> None:
    for row in docgen.settings_reference():
        assert docgen.setting_for_env(row.env) == (row.section, row.field)
        assert docgen.setting_for_env(row.env.lower()) == (row.section, row.field)
    for bogus in ("STREAMLSTM_KAFKA__NOPE", "STREAMLSTM_NOPE__PORT", "STREAMLSTM_KAFKA", "PATH"):
        assert docgen.setting_for_env(bogus) is None


def test_cli_config_markdown_prints_the_reference() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["config", "--markdown"]) == 0
    assert out.getvalue() == docgen.render_configuration()


def test_docgen_check_detects_stale_files(tmp_path: Path) -> None:
    assert docgen.main(["--check", "--docs", str(tmp_path)]) == 1
    assert docgen.main(["--docs", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--docs", str(tmp_path)]) == 0
    (tmp_path / "metrics.md").write_text("old\n")
    assert docgen.main(["--check", "--docs", str(tmp_path)]) == 1


def test_metrics_reference_lists_every_exported_series() -> None:
    body = live_exposition()
    families = re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M)
    assert len(families) > 20
    text = (DOCS / "metrics.md").read_text()
    for name, kind in families:
        assert f"| `{name}` | {'info' if name.endswith('_info') else kind} |" in text, name


def test_links_between_documents_resolve() -> None:
    pages = [DOCS / n for n in WRITTEN] + [DOCS / "configuration.md", DOCS / "metrics.md"]
    for page in pages:
        for link in links(page):
            if re.match(r"[a-z]+://", link) or link.startswith("mailto:"):
                continue
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), f"{page.name}: broken link {link}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{page.name}: no heading for {link}"


def test_docs_index_links_every_page() -> None:
    index = set(links(DOCS / "README.md"))
    for page in DOCS.glob("*.md"):
        if page.name == "README.md" or page.name.startswith("ett"):
            continue
        assert page.name in index, f"docs/README.md does not link {page.name}"


def test_runbook_covers_every_alert() -> None:
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    headings = anchors(DOCS / "runbook.md")
    text = (DOCS / "runbook.md").read_text()
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert (ROOT / path).resolve() == (DOCS / "runbook.md").resolve()
        assert anchor in headings, f"runbook has no section for {rule['alert']}"
        section = text.split(f"## {rule['alert']}\n", 1)[1].split("\n## ", 1)[0]
        assert "**Means**" in section and "**Do**" in section, rule["alert"]


def test_hand_written_docs_name_only_real_metrics_and_settings() -> None:
    exported = {s for m in docgen.metrics_reference() for s in m.series}
    exported |= {m.name for m in docgen.metrics_reference()}
    settings = {f"{r.section}.{r.field}" for r in docgen.settings_reference()}
    sections = set(Settings.model_fields)
    for name in WRITTEN:
        text = (DOCS / name).read_text()
        for metric in re.findall(r"\bstreamlstm_[a-z0-9_]*[a-z0-9]\b", text):
            assert metric in exported, f"{name}: {metric} is not a metric of the daemon"
        for dotted in re.findall(r"`([a-z]+\.[a-z_]+)(?: = [^`]*)?`", text):
            if dotted.split(".")[0] in sections:
                assert dotted in settings, f"{name}: {dotted} is not a setting"


def test_architecture_has_a_data_flow_diagram() -> None:
    text = (DOCS / "architecture.md").read_text()
    assert "```mermaid" in text
    diagram = text.split("```mermaid", 1)[1].split("```", 1)[0]
    for stage in ("source", "engine", "sink", "replay", "drift", "trainer", "metrics"):
        assert stage in diagram.lower(), f"the diagram lacks the {stage} stage"


def test_readme_links_the_docs() -> None:
    readme = ROOT / "README.md"
    if not readme.exists() and not os.environ.get("CI"):
        pytest.skip("README.md not written yet")
    assert "docs/" in readme.read_text(), "README.md should link docs/"


def test_documented_label_values_match_the_code() -> None:
    text = (DOCS / "metrics.md").read_text()
    from streamlstm import drift
    from streamlstm.learning import gate as trainer

    for value in (*trainer.RESULTS, *drift.DETECTORS):
        assert f"`{value}`" in text, f"metrics.md does not explain the label value {value!r}"
