"""Prometheus's HTTP API (instant and range queries) and a Grafana dashboard's panels, as plain data.

    api = Prometheus("http://127.0.0.1:59090")
    window = Window.last(3600)
    for panel in dashboard_panels(DASHBOARD, window):
        for query in panel.queries:
            for series in api.query_range(query.expr, window):
                series_name(series, query.legend, query.expr), series.points

Every failure raises `PrometheusError` naming the URL (or the file) and the fix.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from dagma.errors import DagmaError

URL_ENV = "DAGMA_PROMETHEUS_URL"
START_IT = (
    f"start it with `dagma services up --with observability`, or unset {URL_ENV}"
    " to leave the Monitoring page off"
)
# Grafana's own assumption for a Prometheus data source whose scrape interval is not set.
SCRAPE_INTERVAL = 15.0
# About as many points per line as Grafana draws in a panel of ordinary width.
POINTS = 240


class PrometheusError(DagmaError):
    """Prometheus did not answer, refused a query, or a dashboard file is not a dashboard."""


@dataclass(frozen=True)
class Series:
    """One series of a result: its labels (`__name__` included when Prometheus keeps it) and
    its points as (unix seconds, value)."""

    labels: Mapping[str, str]
    points: list[tuple[float, float]]


@dataclass(frozen=True)
class Window:
    """The time range of a dashboard view: `seconds` back from `end`, a point every `step`."""

    seconds: float
    step: float
    end: float = field(default_factory=time.time)

    @classmethod
    def last(cls, seconds: float, end: float | None = None) -> Window:
        """The last `seconds`, with Grafana's step: ~POINTS points, never below a scrape."""
        if not seconds > 0:
            raise PrometheusError(f"A time range must be positive, not {seconds} s.")
        step = max(math.ceil(seconds / POINTS), SCRAPE_INTERVAL)
        return cls(seconds, step, time.time() if end is None else end)

    @property
    def start(self) -> float:
        return self.end - self.seconds


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""  # Grafana's legendFormat: "{{label}}" templates, "" or "__auto" for labels
    ref: str = ""  # Grafana's refId ("A", "B", ...)


@dataclass(frozen=True)
class Panel:
    title: str
    type: str  # "timeseries", "stat", ... as Grafana names it
    unit: str  # Grafana's unit id ("s", "reqps", "short", ...); "" when the panel sets none
    queries: tuple[Query, ...]
    description: str = ""


def _duration(seconds: float) -> str:
    return f"{max(math.ceil(seconds), 1)}s"


def grafana_variables(window: Window, scrape_interval: float = SCRAPE_INTERVAL) -> dict[str, str]:
    """Grafana's global interval and range variables for `window`, as Grafana computes them."""
    interval = max(window.step, scrape_interval)
    rate = max(interval + scrape_interval, 4 * scrape_interval)
    return {
        "__interval": _duration(interval),
        "__interval_ms": str(math.ceil(interval * 1000)),
        "__rate_interval": _duration(rate),
        "__rate_interval_ms": str(math.ceil(rate * 1000)),
        "__range": _duration(window.seconds),
        "__range_s": str(math.ceil(window.seconds)),
        "__range_ms": str(math.ceil(window.seconds * 1000)),
    }


_VARIABLE = re.compile(r"\$\{(__\w+)\}|\$(__\w+)|\[\[(__\w+)\]\]")


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """`expr` with `$__name`, `${__name}` and `[[__name]]` replaced; others are left as written."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return variables.get(name, match[0])

    return _VARIABLE.sub(value, expr)


def dashboard_panels(
    path: Path, window: Window, scrape_interval: float = SCRAPE_INTERVAL
) -> list[Panel]:
    """Every panel of the Grafana dashboard at `path` (rows unfolded), its queries' Grafana
    variables replaced for `window`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PrometheusError(
            f"Cannot read the dashboard {path}: {exc.strerror or exc}. Fix: point at a Grafana "
            "dashboard's JSON (the lab's is deploy/observability/grafana/dashboards/dagma-lab.json)."
        ) from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrometheusError(
            f"The dashboard {path} is not JSON ({exc}). Fix: export the dashboard from Grafana "
            "again (Share > Export > Save to file)."
        ) from exc
    if isinstance(document, dict) and isinstance(document.get("dashboard"), dict):
        document = document["dashboard"]  # the API's envelope, {"dashboard": {...}, "meta": ...}
    if not isinstance(document, dict) or not isinstance(document.get("panels"), list):
        raise PrometheusError(
            f"{path} is not a Grafana dashboard: it has no list of `panels`. Fix: point at a "
            "dashboard's JSON, as Grafana exports it."
        )
    variables = grafana_variables(window, scrape_interval)
    return [_panel(p, path, variables) for p in _unfold(document["panels"], path)]


def _unfold(panels: list[Any], path: Path) -> list[dict[str, Any]]:
    found = []
    for number, panel in enumerate(panels, 1):
        if not isinstance(panel, dict):
            raise PrometheusError(
                f"Panel {number} of the dashboard {path} is not an object. Fix: export the "
                "dashboard from Grafana again."
            )
        if panel.get("type") == "row":  # a collapsed row keeps its panels inside it
            found += _unfold(panel.get("panels") or [], path)
        else:
            found.append(panel)
    return found


def _panel(panel: dict[str, Any], path: Path, variables: Mapping[str, str]) -> Panel:
    title = str(panel.get("title") or "")
    targets = panel.get("targets") or []
    defaults = (panel.get("fieldConfig") or {}).get("defaults") or {}
    if not isinstance(targets, list) or not isinstance(defaults, dict):
        raise PrometheusError(
            f"The panel {title!r} of the dashboard {path} has malformed `targets` or "
            "`fieldConfig`. Fix: export the dashboard from Grafana again."
        )
    queries = tuple(
        Query(
            substitute(str(t["expr"]), variables),
            str(t.get("legendFormat") or ""),
            str(t.get("refId") or ""),
        )
        for t in targets
        if isinstance(t, dict) and str(t.get("expr") or "").strip() and not t.get("hide")
    )
    kind, unit = str(panel.get("type") or ""), str(defaults.get("unit") or "")
    return Panel(title, kind, unit, queries, str(panel.get("description") or ""))


_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def series_name(series: Series, legend: str, expr: str) -> str:
    """The series' name as Grafana shows it: `legend` with `{{label}}` filled in, else its
    labels (`name{a="1", b="2"}`), else the expression."""
    if legend and legend != "__auto":
        return _LEGEND.sub(lambda m: series.labels.get(m[1], ""), legend)
    labels = {k: v for k, v in series.labels.items() if k != "__name__"}
    inside = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    name = series.labels.get("__name__", "")
    if not name and not inside:
        return expr
    return f"{name}{{{inside}}}" if inside else name


class Prometheus:
    """A Prometheus server's query API at `url` (e.g. http://127.0.0.1:59090)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PrometheusError(
                f"{URL_ENV}={url!r} is not an http(s) URL. Fix: set it to Prometheus's address, "
                "e.g. http://127.0.0.1:59090."
            )
        self.url = url.strip().rstrip("/")
        self.timeout = timeout

    def graph_url(self, expr: str, window: Window) -> str:
        """Prometheus's own graph page for `expr` over `window`."""
        query = {"g0.expr": expr, "g0.tab": "0", "g0.range_input": _duration(window.seconds)}
        return f"{self.url}/graph?{urlencode(query)}"

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        """`expr`'s value at `at` (now by default): one point per series."""
        params = {"query": expr, **({} if at is None else {"time": f"{at:.3f}"})}
        return _series(self._get("/api/v1/query", params, expr))

    def query_range(self, expr: str, window: Window) -> list[Series]:
        """`expr` evaluated every `window.step` seconds over `window`."""
        params = {
            "query": expr,
            "start": f"{window.start:.3f}",
            "end": f"{window.end:.3f}",
            "step": f"{window.step:g}",
        }
        return _series(self._get("/api/v1/query_range", params, expr))

    def _get(self, path: str, params: dict[str, str], expr: str) -> dict[str, Any]:
        where = f"{self.url}{path}"
        try:
            # POST takes expressions longer than a URL may be; Prometheus reads its form the same.
            response = httpx.post(where, data=params, timeout=self.timeout)
        except httpx.TimeoutException as exc:
            raise PrometheusError(
                f"Prometheus at {self.url} did not answer within {self.timeout:g} s. "
                f"Fix: check it is up and not overloaded, or {START_IT}."
            ) from exc
        except httpx.HTTPError as exc:
            raise PrometheusError(
                f"Prometheus at {self.url} is unreachable ({type(exc).__name__}: {exc}). "
                f"Fix: {START_IT}."
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("status") not in ("success", "error"):
            raise PrometheusError(
                f"{where} answered HTTP {response.status_code}, not Prometheus's API. "
                f"Fix: set {URL_ENV} to Prometheus's own address (its /-/ready answers)."
            )
        if body["status"] == "error":
            raise PrometheusError(
                f"Prometheus at {self.url} refused the query `{expr}`: "
                f"{body.get('errorType', 'error')}: {body.get('error', '')}. Fix: correct the "
                "expression (try it on Prometheus's graph page)."
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise PrometheusError(f"{where} answered without `data`. Fix: check {URL_ENV}.")
        return data


def _point(pair: Any) -> tuple[float, float]:
    return float(pair[0]), float(pair[1])  # values come as strings: "1.5", "NaN", "+Inf"


def _series(data: dict[str, Any]) -> list[Series]:
    kind, result = data.get("resultType"), data.get("result")
    if kind in ("scalar", "string"):
        return [Series({}, [_point(result)])] if kind == "scalar" else []
    return [
        Series(
            dict(item.get("metric") or {}),
            [_point(item["value"])] if "value" in item else [_point(p) for p in item["values"]],
        )
        for item in result or []
    ]
