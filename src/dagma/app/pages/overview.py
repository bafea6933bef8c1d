"""Overview: every asset with its last materialization and staleness."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dagma.app import ui
from dagma.settings import get_settings

STATUS = ("fresh", "stale", "missing")
COLORS = {"fresh": "#1a7f37", "stale": "#bc4c00", "missing": "#6e7781"}

settings = get_settings()
st.title("Overview")
st.caption(
    f"The lab's assets as Dagster sees them. Materialize from the [Dagster UI]"
    f"({settings.dagster_ui_url}) or with `uv run dagma run --stale`; runs and models are in "
    f"the [MLflow UI]({settings.mlflow_ui})."
)

with ui.guard("Reading the Dagster assets"):
    view = ui.assets(str(settings.home), str(settings.dagster_dir), settings.dagster_ui_url)
    where = (
        f"the Dagster webserver at {view.source}"
        if view.mode == "webserver"
        else f"the embedded Dagster instance in `{view.source}`"
    )
    st.caption(f"Read from {where}.")
    counts = {s: sum(a.status == s for a in view.assets) for s in STATUS}
    cols = st.columns(4)
    cols[0].metric("Assets", len(view.assets))
    cols[1].metric("Fresh", counts["fresh"])
    cols[2].metric("Stale", counts["stale"])
    cols[3].metric("Missing", counts["missing"])
    if view.assets and counts["missing"] == len(view.assets):
        st.info(
            "No asset has been materialized yet. Run `make demo`, or materialize them "
            "from the Dagster UI.",
            icon=":material/info:",
        )
    elif counts["stale"] or counts["missing"]:
        st.info(
            "Some assets are stale or missing: `uv run dagma run --stale` brings them up to date.",
            icon=":material/update:",
        )
    table = pd.DataFrame(
        [
            {
                "asset": a.key,
                "group": a.group,
                "status": a.status,
                "why": a.cause,
                "last materialized": a.last_materialized,
                "partition": a.partition,
                "run": ui.dagster_run_url(settings, a.run_id) if a.run_id else None,
                "dagster": ui.dagster_asset_url(settings, a.key),
            }
            for a in view.assets
        ]
    )
    st.dataframe(
        table.style.map(lambda s: f"color: {COLORS.get(s, '')}; font-weight: 600", subset="status"),
        hide_index=True,
        width="stretch",
        column_config={
            "last materialized": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            "run": st.column_config.LinkColumn("run", display_text=r"/runs/([0-9a-f]{8})"),
            "dagster": st.column_config.LinkColumn("asset", display_text="open"),
        },
    )
