"""The Grafana dashboard (deploy/grafana/paramserver.json) queries only metrics the service exposes
(paramserver.metric_names.EXPOSED), with labels those metrics have, and shows every family of
the catalogue."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paramserver.metric_names import CATALOG, EXPOSED, MetricSpec

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "paramserver.json"
METRIC = re.compile(r"\bparamserver_[A-Za-z0-9_]+")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\b(paramserver_[A-Za-z0-9_]+)\{([^}]*)\}")
#: Labels PromQL adds or that every series has: histogram buckets' `le`.
IMPLICIT_LABELS = {"le"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    out = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)}


def exposed_names(spec: MetricSpec) -> set[str]:
    if spec.kind == "counter":
        return {f"{spec.name}_total"}
    if spec.kind == "histogram":
        return {f"{spec.name}_{s}" for s in ("bucket", "sum", "count")}
    return {spec.name}


def spec_of(name: str) -> MetricSpec:
    (found,) = [m for m in CATALOG if name in exposed_names(m)]
    return found


def label_problems(expr: str) -> list[str]:
    """Labels `expr` selects or groups by that none of its metrics has."""
    metrics = set(METRIC.findall(expr))
    known = IMPLICIT_LABELS | {label for m in metrics if m in EXPOSED for label in spec_of(m).labels}
    problems = []
    for group in BY.findall(expr):
        problems += [f"by {label}" for label in (x.strip() for x in group.split(",")) if label and label not in known]
    for metric, matchers in SELECTOR.findall(expr):
        labels = spec_of(metric).labels if metric in EXPOSED else ()
        problems += [f"{metric}{{{key}}}" for key in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers) if key not in labels]
    return problems


def test_queries_use_only_exposed_metric_names(dashboard: dict[str, Any]) -> None:
    used = metric_names(queries(dashboard))
    assert used, "no paramserver metric found in the dashboard"
    assert used <= EXPOSED, sorted(used - EXPOSED)


def test_every_metric_family_is_on_a_panel(dashboard: dict[str, Any]) -> None:
    used = metric_names([t["expr"] for p in panels(dashboard) for t in p.get("targets", [])])
    missing = [m.name for m in CATALOG if not exposed_names(m) & used]
    assert not missing, missing


def test_histograms_show_quantiles_over_buckets(dashboard: dict[str, Any]) -> None:
    exprs = queries(dashboard)
    for spec in CATALOG:
        if spec.kind == "histogram":
            assert any("histogram_quantile(" in e and f"{spec.name}_bucket" in e for e in exprs), spec.name
    phases = [e for e in exprs if "paramserver_step_phase_seconds_bucket" in e]
    assert all(re.search(r"by \(le, phase\)", e) for e in phases)


def test_clip_rate_is_clipped_over_steps(dashboard: dict[str, Any]) -> None:
    (clip,) = [e for e in queries(dashboard) if "paramserver_job_clipped_steps_total" in e]
    numerator, _, denominator = clip.partition(" / ")
    assert "rate(paramserver_job_clipped_steps_total" in numerator
    assert "rate(paramserver_job_steps_total" in denominator


def test_queries_use_labels_their_metrics_have(dashboard: dict[str, Any]) -> None:
    problems = {e: p for e in queries(dashboard) if (p := label_problems(e))}
    assert not problems, problems


def test_the_checks_catch_a_wrong_query() -> None:
    """The extraction sees names and labels the catalogue does not have."""
    bad = {
        "panels": [
            {"type": "row", "panels": [{"targets": [{"expr": 'rate(paramserver_job_step_total{job=~"$job"}[5m])'}]}]},
            {"targets": [{"expr": "sum by (tenant) (paramserver_job_version)"}]},
        ]
    }
    assert metric_names(queries(bad)) - EXPOSED == {"paramserver_job_step_total"}
    assert label_problems("sum by (tenant) (paramserver_job_version)") == ["by tenant"]
    assert label_problems('paramserver_rpc_total{job="x"}') == ["paramserver_rpc_total{job}"]


def test_dashboard_model(dashboard: dict[str, Any]) -> None:
    """A Grafana dashboard JSON model with a Prometheus data source variable used by every query."""
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    cells: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
