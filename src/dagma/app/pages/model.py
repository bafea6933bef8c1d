"""Model: predict with the registry's current wine classifier from a form of its features."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dagma.app import data, ui
from dagma.lib import tracking
from dagma.lib.models import REGISTERED_MODEL
from dagma.settings import get_settings

settings = get_settings()
st.title("Model")
st.caption(
    f"The registered model `{REGISTERED_MODEL}` at its alias `champion`: the newest version "
    "that passed the quality gate. It classifies a wine into one of three cultivars."
)

with ui.guard("Loading the model"):
    ref = ui.model_ref(settings.tracking_uri, REGISTERED_MODEL)
    chosen = "alias `champion`"
    run = f" · trained by run `{ref.run_id[:8]}`" if ref.run_id else ""
    run += f" · registered {ref.created:%Y-%m-%d %H:%M}" if ref.created else ""
    st.markdown(
        f"Using **{ref.name} v{ref.version}** ({chosen}){run} · "
        f"[open in MLflow]({tracking.model_url(settings.mlflow_ui, ref.name, ref.version)})"
    )
    loaded = ui.model(settings.tracking_uri, ref.name, ref.version)
    with st.form("features"):
        st.caption("Defaults are the medians of the wine data.")
        cols = st.columns(3)
        values = {
            feature: cols[i % 3].number_input(
                feature.replace("_", " "),
                value=loaded.defaults[feature],
                format="%.3f",
                key=f"feature-{feature}",
            )
            for i, feature in enumerate(loaded.features)
        }
        st.form_submit_button("Predict", type="primary", icon=":material/play_arrow:")
    prediction = data.predict(loaded, values)
    result, chart = st.columns([1, 2])
    result.metric("Predicted class", prediction.label)
    result.caption(f"by {ref.name} v{ref.version} ({loaded.flavor})")
    if prediction.probabilities:
        probabilities = pd.DataFrame(
            {
                "class": list(prediction.probabilities),
                "probability": list(prediction.probabilities.values()),
            }
        )
        chart.bar_chart(probabilities, x="class", y="probability", horizontal=True, height=200)
    else:
        chart.caption("This model gives no class probabilities.")
