"""Model: predict with the registry's current wine classifier from a form of its features."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dagma.app import backend, ui
from dagma.lib.models import REGISTERED_MODEL
from dagma.settings import get_settings

settings = get_settings()
st.title("Model")
st.caption(
    f"The registered model `{REGISTERED_MODEL}` at its alias `champion`: the newest version "
    "that passed the quality gate. It classifies a wine into one of three cultivars."
)

with ui.guard("Loading the model"):
    form = backend.for_settings(settings).model_form()
    st.markdown(form.heading)
    with st.form("features"):
        st.caption("Defaults are the medians of the wine data.")
        cols = st.columns(3)
        values = {
            feature: cols[i % 3].number_input(
                feature.replace("_", " "),
                value=form.defaults[feature],
                format="%.3f",
                key=f"feature-{feature}",
            )
            for i, feature in enumerate(form.features)
        }
        st.form_submit_button("Predict", type="primary", icon=":material/play_arrow:")
    prediction = form.score(values)
    result, chart = st.columns([1, 2])
    result.metric("Predicted class", prediction.label)
    result.caption(prediction.by)
    if prediction.probabilities:
        probabilities = pd.DataFrame(
            {
                "class": list(prediction.probabilities),
                "probability": list(prediction.probabilities.values()),
            }
        )
        chart.bar_chart(probabilities, x="class", y="probability", horizontal=True, height=200)
    else:
        chart.caption("No class probabilities: the model (or the API) gives only the class.")
