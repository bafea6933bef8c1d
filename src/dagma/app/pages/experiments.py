"""Experiments: the MLflow runs, one metric across them and the parameters two runs differ in."""

from __future__ import annotations

import altair as alt
import streamlit as st

from dagma.app import data, ui
from dagma.lib import tracking
from dagma.settings import get_settings

settings = get_settings()
st.title("Experiments")
st.caption(
    f"Runs of the MLflow experiment `{settings.dagma_experiment}` at `{settings.tracking_uri}`; "
    f"open them in the [MLflow UI]({settings.mlflow_ui})."
)

with ui.guard("Reading the MLflow runs"):
    experiment_id, runs = ui.runs(settings.tracking_uri, settings.dagma_experiment)
    if not runs:
        raise data.NotReady(
            f"The experiment {settings.dagma_experiment!r} has no runs yet. Run `make demo`."
        )
    table = data.runs_table(runs)
    table["mlflow"] = [tracking.run_url(settings.mlflow_ui, experiment_id, r.run_id) for r in runs]
    st.subheader(f"{len(runs)} runs")
    st.dataframe(
        table.drop(columns=["run_id"]),
        hide_index=True,
        width="stretch",
        column_config={
            "started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            "seconds": st.column_config.NumberColumn(format="%.1f"),
            "mlflow": st.column_config.LinkColumn("MLflow", display_text="open"),
        },
    )

    st.subheader("A metric across runs")
    metrics = sorted({m for r in runs for m in r.metrics})
    if not metrics:
        st.info("No run has logged a metric yet.")
    else:
        metric = st.selectbox(
            "Metric",
            metrics,
            index=metrics.index("accuracy") if "accuracy" in metrics else 0,
        )
        series = data.metric_series(runs, metric)
        chart = (
            alt.Chart(series)
            .mark_line(point=alt.OverlayMarkDef(size=80))
            .encode(
                x=alt.X(
                    "started:T",
                    title="run started",
                    axis=alt.Axis(format="%m-%d %H:%M:%S", labelAngle=-30, tickCount=6),
                ),
                y=alt.Y(f"{metric}:Q", title=metric, scale=alt.Scale(zero=False)),
                color=alt.Color("name:N", title="run"),
                tooltip=["run", alt.Tooltip(f"{metric}:Q", format=".4f")],
            )
        )
        st.altair_chart(chart, width="stretch")
        st.caption(f"{len(series)} of {len(runs)} runs logged `{metric}`.")

    st.subheader("Parameters that differ")
    if len(runs) < 2:
        st.info(
            "Only one run so far. Run another to compare, e.g. "
            "`uv run dagma run wine_model -p wine_model.C=0.5`."
        )
    else:
        first, second = data.default_pair(runs)
        by_id = {r.run_id: r for r in runs}
        ids = list(by_id)
        left, right = st.columns(2)
        a = by_id[left.selectbox("Run A", ids, index=first, format_func=lambda i: by_id[i].label)]
        b = by_id[right.selectbox("Run B", ids, index=second, format_func=lambda i: by_id[i].label)]
        diff = data.param_diff(a, b)
        if a == b:
            st.info("Pick two different runs.")
        elif diff.empty:
            st.success("The two runs have the same parameters.", icon=":material/check:")
        else:
            st.caption(
                f"{len(diff)} of {len(set(a.params) | set(b.params))} parameters differ; "
                "`—` means the run did not log it."
            )
            # A dataframe shows values as text; st.table would render markdown (images) in them.
            st.dataframe(diff, hide_index=True)
