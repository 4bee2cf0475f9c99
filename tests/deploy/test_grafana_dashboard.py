"""The Grafana dashboard (``deploy/grafana/ztlab-gpu.json``) against what the exporter emits.

Every metric a panel or a template variable queries, and every label it selects or groups
by, must be in what :func:`ztlab.hub.monitor.exporter.render` writes for a representative
host: the dashboard cannot show a series the monitor never produces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hub.monitor.test_exporter import exposition

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ztlab-gpu.json"
DATASOURCE = "${DS_PROMETHEUS}"
METRIC = re.compile(r"\b(DCGM_FI_[A-Z0-9_]+|ztlab_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(DCGM_FI_[A-Z0-9_]+|ztlab_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"\s*,?")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(
    r"^label_values\((?:([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s*,\s*)?(\w+)\)$"
)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def emitted() -> dict[str, set[str]]:
    """Metric name -> the label names its samples carry, from a representative render."""
    labels: dict[str, set[str]] = {}
    for line in exposition().splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? ", line)
        assert match, line
        names = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', match.group(2) or ""))
        labels.setdefault(match.group(1), set()).update(names)
    return labels


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", ()):
            yield panel["title"], target["expr"]


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def test_structure(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] == "ztlab-gpu"
    panels = list(all_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    assert rows == ["Per GPU", "Per user", "Alerts", "Monitor health"]
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no target"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]


def test_the_datasource_and_the_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"Hostname", "gpu", "user"} <= set(variables)
    for name in ("Hostname", "gpu", "user"):
        assert variables[name]["datasource"]["uid"] == DATASOURCE
        assert variables[name]["type"] == "query"
    # every variable is used by some panel
    text = "\n".join(expr for _, expr in queries(dashboard))
    for name in ("Hostname", "gpu", "user"):
        assert f"${name}" in text, name


def test_every_metric_a_panel_queries_is_emitted(
    dashboard: dict[str, Any], emitted: dict[str, set[str]]
) -> None:
    used: set[str] = set()
    for title, expr in queries(dashboard):
        names = set(METRIC.findall(expr))
        assert names, f"{title}: {expr!r} queries no ztlab or DCGM metric"
        missing = names - set(emitted)
        assert not missing, f"{title}: {sorted(missing)} not emitted by the exporter"
        used |= names
    # and the dashboard shows every family the exporter writes
    assert set(emitted) - used == set()


def test_every_label_a_panel_selects_or_groups_by_is_on_its_metrics(
    dashboard: dict[str, Any], emitted: dict[str, set[str]]
) -> None:
    for title, expr in queries(dashboard):
        metrics = set(METRIC.findall(expr))
        for metric, matchers in SELECTOR.findall(expr):
            labels = [m.group(1) for m in MATCHER.finditer(matchers)]
            assert MATCHER.sub("", matchers).strip() == "", f"{title}: cannot read {matchers!r}"
            unknown = set(labels) - emitted[metric]
            assert not unknown, f"{title}: {metric} has no label {sorted(unknown)}"
        for grouping in GROUPING.findall(expr):
            for label in (part.strip() for part in grouping.split(",")):
                assert any(label in emitted[m] for m in metrics), f"{title}: by {label}"


def test_variable_queries_use_emitted_metrics_and_labels(
    dashboard: dict[str, Any], emitted: dict[str, set[str]]
) -> None:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable_query(variable)
        match = LABEL_VALUES.match(query)
        assert match, f"{variable['name']}: {query!r}"
        metric, selector, label = match.groups()
        assert metric in emitted, f"{variable['name']}: {metric} not emitted"
        assert label == variable["name"]
        assert label in emitted[metric], f"{variable['name']}: {metric} has no label {label}"
        for name in MATCHER.findall((selector or "{}")[1:-1]):
            assert name in emitted[metric], f"{variable['name']}: {metric} has no label {name}"


def test_the_checks_catch_a_metric_the_exporter_does_not_emit(
    dashboard: dict[str, Any], emitted: dict[str, set[str]]
) -> None:
    broken = json.loads(json.dumps(dashboard))
    panel = next(p for p in all_panels(broken) if p["type"] != "row")
    panel["targets"][0]["expr"] = 'DCGM_FI_DEV_MEMORY_TEMP{Hostname=~"$Hostname"}'
    with pytest.raises(AssertionError, match="DCGM_FI_DEV_MEMORY_TEMP"):
        test_every_metric_a_panel_queries_is_emitted(broken, emitted)
    panel["targets"][0]["expr"] = 'DCGM_FI_DEV_GPU_UTIL{pci_bus_id="0"}'
    with pytest.raises(AssertionError, match="pci_bus_id"):
        test_every_label_a_panel_selects_or_groups_by_is_on_its_metrics(broken, emitted)
