"""Monitoring: the lab's Grafana dashboard, drawn from Prometheus's API."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd
import streamlit as st

from dagma.lib.inert_html import inert_markdown
from dagma.lib.prometheus_api import (
    URL_ENV,
    Panel,
    Prometheus,
    PrometheusError,
    Series,
    Window,
    dashboard_panels,
    series_name,
)
from dagma.settings import PROJECT_ROOT

DASHBOARD_ENV = "DAGMA_GRAFANA_DASHBOARD"
DASHBOARD = PROJECT_ROOT / "deploy" / "observability" / "grafana" / "dashboards" / "dagma-lab.json"
RANGES = {"15 min": 900, "1 h": 3600, "6 h": 6 * 3600, "24 h": 24 * 3600}
CHARTS = ("timeseries", "graph")
STATS = ("stat", "gauge", "bargauge")
# Grafana's unit ids, as a value's suffix (and a chart's axis title).
UNITS = {
    "s": "s",
    "ms": "ms",
    "percent": "%",
    "percentunit": "%",
    "reqps": "req/s",
    "ops": "ops/s",
    "bytes": "B",
    "short": "",
    "none": "",
    "": "",
}
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$=])")


def plain(text: str) -> str:
    """`text` shown as written where Streamlit reads markdown: labels come from any scraped
    target, so no link, image, HTML or colour directive of theirs is rendered."""
    return _MARKDOWN.sub(r"\\\1", text)


def value_text(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        value *= 100
    suffix = UNITS.get(unit, unit)
    return f"{value:.4g} {suffix}".rstrip()


@st.cache_data(ttl=10, show_spinner=False)
def fetch(url: str, expr: str, seconds: int, instant: bool) -> list[Series]:
    api = Prometheus(url)
    return api.query(expr) if instant else api.query_range(expr, Window.last(seconds))


def links(api: Prometheus, panel: Panel, window: Window) -> str:
    shown = [
        f"[{plain(q.ref or str(n))}]({api.graph_url(q.expr, window)})"
        for n, q in enumerate(panel.queries, 1)
    ]
    unit = UNITS.get(panel.unit, panel.unit)
    return f"{f'Unit: {plain(unit)} · ' if unit else ''}In Prometheus: {' · '.join(shown)}"


def stat(api: Prometheus, panel: Panel, seconds: int) -> None:
    values = [
        (series_name(s, q.legend, q.expr), s.points[-1][1])
        for q in panel.queries
        for s in fetch(api.url, q.expr, seconds, True)
        if s.points
    ]
    if not values:
        st.metric(plain(panel.title), "No data", help=plain(panel.description) or None)
    for name, value in values:
        label = panel.title if len(values) == 1 else f"{panel.title} · {name}"
        st.metric(
            plain(label), value_text(value, panel.unit), help=plain(panel.description) or None
        )


def chart(api: Prometheus, panel: Panel, seconds: int) -> None:
    rows: list[tuple[pd.Timestamp, float, str]] = []
    names: set[str] = set()
    for query in panel.queries:
        for series in fetch(api.url, query.expr, seconds, False):
            name = base = series_name(series, query.legend, query.expr)
            copies = 1
            while name in names:  # two series under one legend still get a line each
                copies += 1
                name = f"{base} ({copies})"
            names.add(name)
            rows += [(pd.Timestamp(t, unit="s", tz="UTC"), v, name) for t, v in series.points]
    if not rows:
        st.caption("No data in this range.")
        return
    # Long form with an explicit series column: the legend shows even for a single line.
    frame = pd.DataFrame(rows, columns=["time", "value", "series"])
    frame["value"] = frame["value"].replace([math.inf, -math.inf], math.nan)
    unit = UNITS.get(panel.unit, panel.unit)
    st.line_chart(
        frame,
        x="time",
        y="value",
        color="series",
        x_label="time (UTC)",
        y_label=unit or " ",
        height=260,
    )


def show(api: Prometheus, panel: Panel, window: Window, seconds: int) -> None:
    """One panel, or what went wrong with it: never a traceback."""
    with st.container(border=True):
        try:
            if panel.type in STATS:
                stat(api, panel, seconds)
            else:
                st.markdown(f"**{plain(panel.title)}**", help=plain(panel.description) or None)
                if panel.type in CHARTS:
                    chart(api, panel, seconds)
                else:
                    st.caption(f"A {plain(panel.type)} panel: open the dashboard in Grafana.")
        except PrometheusError as exc:  # its words quote Prometheus's: kept inert
            st.error(inert_markdown(str(exc)), icon=":material/error:")
        except Exception as exc:
            st.error(
                inert_markdown(
                    f"{panel.title}: {type(exc).__name__}: {exc}. Fix: try the panel's query on "
                    "Prometheus's graph page."
                ),
                icon=":material/error:",
            )
        if panel.queries:
            st.caption(links(api, panel, window))


st.title("Monitoring")
url = os.environ.get(URL_ENV, "").strip()
if not url:
    st.info(
        f"Set `{URL_ENV}` to Prometheus's address to see the lab's dashboard here, e.g. "
        f"`{URL_ENV}=http://127.0.0.1:59090` with `dagma services up --with observability`.",
        icon=":material/info:",
    )
    st.stop()

path = Path(os.environ.get(DASHBOARD_ENV) or DASHBOARD)
choice = st.radio("Range", list(RANGES), index=1, horizontal=True)
seconds = RANGES[choice or "1 h"]
window = Window.last(seconds)
try:
    api = Prometheus(url)
    panels = dashboard_panels(path, window)
    api.query("vector(1)")  # one clear error when Prometheus is away, not one per panel
except PrometheusError as exc:
    st.error(inert_markdown(str(exc)), icon=":material/cloud_off:")
    st.stop()
st.caption(
    f"The panels of {plain(path.name)}, as Grafana shows them, from Prometheus at "
    f"[{plain(api.url)}]({api.url}). Values are cached for 10 s: **Refresh data** reads them now."
)

stats = [p for p in panels if p.type in STATS]
others = [p for p in panels if p.type not in STATS]
for start in range(0, len(stats), 3):  # three a row: Grafana's stat titles are a few words
    for column, panel in zip(st.columns(3), stats[start : start + 3], strict=False):
        with column:
            show(api, panel, window, seconds)
for start in range(0, len(others), 2):
    for column, panel in zip(st.columns(2), others[start : start + 2], strict=False):
        with column:
            show(api, panel, window, seconds)
