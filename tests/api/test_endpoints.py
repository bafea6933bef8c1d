"""Each endpoint of a real `dagma serve` against the demo lab, through `dagma.client`."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import mlflow
import pytest

from dagma.client import AnswerEvent, DagmaApiError, SourcesEvent, TokenEvent
from dagma.lib import tracking
from dagma.lib.data import load_wine
from dagma.lib.models import REGISTERED_MODEL
from dagma.lib.tracking import CHAMPION
from tests.api.conftest import LabApi

pytestmark = pytest.mark.integration

QUESTION = "How do I catch an exception and still run clean-up code?"


def wine_rows(n: int = 3) -> list[dict[str, Any]]:
    frame = load_wine().drop(columns=["target"]).head(n)
    return [{str(k): float(v) for k, v in row.items()} for row in frame.to_dict("records")]


def champion(api: LabApi) -> str:
    version = tracking.alias_version(api.settings.tracking_uri, REGISTERED_MODEL)
    assert version is not None
    return version


def test_serve_prints_its_url_and_docs(lab_api: LabApi) -> None:
    printed = lab_api.log.read_text()
    assert f"Serving the Dagma API on {lab_api.url}" in printed
    assert f"docs  {lab_api.url}/docs" in printed
    assert "warning" not in printed.split("Uvicorn running")[0].lower()  # loopback: no warning


def test_healthz_is_open_and_readyz_reports_each_backend(lab_api: LabApi) -> None:
    assert httpx.get(f"{lab_api.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{lab_api.url}/readyz").status_code == 401
    with lab_api.client(["search"]) as api:  # any scope will do
        assert api.health() == {"status": "ok"}
        ready = api.ready()
    assert ready.ready, ready
    assert set(ready.components) == {"model", "collection", "llm"}
    assert f"version {champion(lab_api)} is champion" in ready.components["model"].detail
    assert "dagma_docs version" in ready.components["collection"].detail
    assert ready.components["llm"].detail.startswith("local:")


def test_predict_scores_rows_with_the_champion_and_names_it(lab_api: LabApi) -> None:
    version = champion(lab_api)
    rows = wine_rows(5)
    with lab_api.client(["predict"]) as api:
        result = api.predict(rows)
    assert (result.model, result.version) == (REGISTERED_MODEL, version)
    mlflow.set_tracking_uri(lab_api.settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{CHAMPION}")
    import pandas as pd

    assert result.predictions == model.predict(pd.DataFrame(rows)).tolist()
    assert all(isinstance(p, int) for p in result.predictions)


def test_the_openapi_schema_of_predict_is_the_signature(lab_api: LabApi) -> None:
    schema = httpx.get(f"{lab_api.url}/openapi.json").json()
    operation = schema["paths"]["/v1/predict"]["post"]
    body_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    components = schema["components"]["schemas"]
    request = components[body_ref.rsplit("/", 1)[1]]
    row = components[request["properties"]["rows"]["items"]["$ref"].rsplit("/", 1)[1]]
    columns = [c for c in load_wine().columns if c != "target"]
    assert sorted(row["properties"]) == sorted(columns)
    assert sorted(row["required"]) == sorted(columns)
    assert row["additionalProperties"] is False
    assert {p["type"] for p in row["properties"].values()} == {"number"}
    assert request["properties"]["rows"]["maxItems"] == 1000
    out_ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    response = components[out_ref.rsplit("/", 1)[1]]
    assert response["properties"]["predictions"]["items"] == {"type": "integer"}
    assert schema["paths"]["/v1/search"]["get"]["security"]  # a token, shown in /docs
    assert httpx.get(f"{lab_api.url}/docs").status_code == 200


def _without(rows: list[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != column} for row in rows]


BAD_BODIES: dict[str, tuple[Any, str]] = {
    "a missing column": ({"rows": _without(wine_rows(1), "alcohol")}, "rows.0.alcohol"),
    "an unknown column": ({"rows": [{**wine_rows(1)[0], "vintage": 1.0}]}, "rows.0.vintage"),
    "text for a number": ({"rows": [{**wine_rows(1)[0], "hue": "pale"}]}, "rows.0.hue"),
    "a number as text": ({"rows": [{**wine_rows(1)[0], "hue": "1.04"}]}, "rows.0.hue"),
    "NaN": ({"rows": [{**wine_rows(1)[0], "proline": math.nan}]}, "rows.0.proline"),
    "rows that are not objects": ({"rows": [[1.0, 2.0]]}, "rows.0"),
    "no rows": ({"rows": []}, "rows"),
    "no rows key": ({"data": wine_rows(1)}, "rows"),
    "too many rows": ({"rows": wine_rows(1) * 1001}, "limit is 1000"),
    "a list body": (wine_rows(1), "body"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_every_bad_predict_body_gets_422_naming_the_problem(lab_api: LabApi, case: str) -> None:
    body, where = BAD_BODIES[case]
    response = httpx.post(
        f"{lab_api.url}/v1/predict",
        content=json.dumps(body).encode(),  # json.dumps writes NaN, as some clients do
        headers={
            "Authorization": f"Bearer {lab_api.token(['predict'])}",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert where in problem["error"], problem
    assert problem["fix"]


def test_an_unknown_model_is_404(lab_api: LabApi) -> None:
    with lab_api.client(["predict"]) as api, pytest.raises(DagmaApiError) as caught:
        api.predict(wine_rows(1), model="no-such-model")
    assert caught.value.status == 404
    assert "no registered model 'no-such-model'" in caught.value.error
    assert "dagma-wine" in caught.value.fix


def test_a_new_champion_is_served_without_a_restart(lab_api: LabApi) -> None:
    uri = lab_api.settings.tracking_uri
    client = tracking.client(uri)
    before = champion(lab_api)
    current = client.get_model_version(REGISTERED_MODEL, before)
    copy = client.create_model_version(REGISTERED_MODEL, current.source, run_id=current.run_id)
    try:
        with lab_api.client(["predict"]) as api:
            assert api.predict(wine_rows(1)).version == before
            tracking.promote(uri, REGISTERED_MODEL, str(copy.version))
            assert api.predict(wine_rows(1)).version == str(copy.version)
            assert (
                api.ready()
                .components["model"]
                .detail.startswith(f"{REGISTERED_MODEL} version {copy.version} ")
            )
    finally:
        tracking.promote(uri, REGISTERED_MODEL, before)
    with lab_api.client(["predict"]) as api:
        assert api.predict(wine_rows(1)).version == before


def test_search_with_k_a_source_filter_and_mmr(lab_api: LabApi) -> None:
    with lab_api.settings.open_vector_store(read_only=True) as store:
        current = store.current_version(lab_api.settings.dagma_collection)
    assert current is not None
    with lab_api.client(["search"]) as api:
        plain = api.search("catch an exception", k=3)
        only_try = api.search("catch an exception", k=5, source="pydoc:try")
        diverse = api.search("catch an exception", k=6, mmr=True)
    assert (plain.collection, plain.version) == (current.collection, current.version)
    assert [h.rank for h in plain.hits] == [1, 2, 3]
    assert plain.hits[0].score >= plain.hits[-1].score and plain.hits[0].text
    assert only_try.hits and {h.source for h in only_try.hits} == {"pydoc:try"}
    assert diverse.mmr and len({h.id for h in diverse.hits}) == len(diverse.hits) == 6


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"q": "   "}, "question is empty"),
        ({"q": "x" * 1001}, "question is too long"),
        ({"q": "x", "k": 0}, "query.k"),
        ({"q": "x", "k": 51}, "query.k"),
        ({"q": "x", "k": "four"}, "query.k"),
        ({}, "query.q"),
    ],
)
def test_every_bad_search_gets_422(lab_api: LabApi, params: dict[str, Any], where: str) -> None:
    response = httpx.get(
        f"{lab_api.url}/v1/search",
        params=params,
        headers={"Authorization": f"Bearer {lab_api.token(['search'])}"},
    )
    assert response.status_code == 422, response.text
    assert where in response.json()["error"] and response.json()["fix"]


def test_ask_answers_with_sources_then_streams_the_same_answer(lab_api: LabApi) -> None:
    with lab_api.client(["ask"]) as api:
        whole = api.ask(QUESTION)
        events = list(api.ask_stream(QUESTION))
    assert whole.question == QUESTION and whole.text.strip()
    # Sources come from the collection: pydoc topics and the repository's docs.
    assert len(whole.sources) == 4
    assert all(s.source.split(":")[0] in {"pydoc", "docs"} for s in whole.sources)
    assert isinstance(events[0], SourcesEvent) and isinstance(events[-1], AnswerEvent)
    tokens = [e.text for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) > 3  # streamed as it was generated, not in one piece
    streamed = events[-1].answer
    assert [s.id for s in events[0].sources] == [s.id for s in streamed.sources]
    assert [s.id for s in streamed.sources] == [s.id for s in whole.sources]
    assert streamed.text == whole.text  # the local model is greedy: the same answer
    assert "".join(tokens) == streamed.raw_text == whole.raw_text
    assert streamed.attributions == whole.attributions and streamed.attributions
    assert streamed.trimmed == whole.trimmed


def test_ask_streams_for_accept_or_the_query_flag_and_a_client_may_hang_up(
    lab_api: LabApi,
) -> None:
    """Each stream is left after its first token: the model is free again for the next one."""
    headers = {"Authorization": f"Bearer {lab_api.token(['ask'])}"}
    body = {"question": QUESTION, "source": "pydoc:try"}
    for extra, params in (({"Accept": "text/event-stream"}, {}), ({}, {"stream": "true"})):
        with httpx.stream(
            "POST",
            f"{lab_api.url}/v1/ask",
            json=body,
            params=params,
            headers=headers | extra,
            timeout=60,
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            kinds = []
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kinds.append(line.split(":", 1)[1].strip())
                    if kinds[-1] == "token":
                        break  # hang up mid-answer
        assert kinds[:2] == ["sources", "token"], kinds
    with lab_api.client(["ask"]) as api:
        assert api.ask(QUESTION, source="pydoc:try").text


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"question": "  "}, "question is empty"),
        ({"question": "x" * 1001}, "question is too long"),
        ({"question": 42}, "body.question"),
        ({}, "body.question"),
        ({"question": QUESTION, "k": 0}, "body.k"),
        ({"question": QUESTION, "k": 21}, "body.k"),
        ({"question": QUESTION, "mmr": "maybe"}, "body.mmr"),
    ],
)
def test_every_bad_question_gets_422(lab_api: LabApi, body: dict[str, Any], where: str) -> None:
    response = httpx.post(
        f"{lab_api.url}/v1/ask",
        json=body,
        headers={"Authorization": f"Bearer {lab_api.token(['ask'])}"},
    )
    assert response.status_code == 422, response.text
    assert where in response.json()["error"] and response.json()["fix"]
    question, k = body.get("question"), body.get("k", 4)
    if isinstance(question, str) and body.get("mmr", False) is False:
        with lab_api.client(["ask"]) as api:
            for call in (api.ask, lambda q, k: list(api.ask_stream(q, k=k))):
                with pytest.raises(DagmaApiError) as caught:
                    call(question, k=k)
                assert caught.value.status == 422 and where in caught.value.error
