"""Read-only access to the lab's state for the app: Dagster, MLflow, the vectors, notebooks.

Longer than 450 lines because it is the app's whole data layer: one section per store it reads.

Nothing here writes. MLflow's and Dagster's SQLite clients create and migrate a missing
database, so every store is checked first; one that does not exist yet raises `NotReady`,
whose message says what to run. No UI code lives here.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from dagma.errors import DagmaError
from dagma.lib import tracking
from dagma.lib.models import REGISTERED_MODEL
from dagma.lib.tracking import CHAMPION
from dagma.settings import Settings

Status = Literal["fresh", "stale", "missing"]

RUN_DEMO = "Run `make demo`"
SNIPPET_CHARS = 240


class NotReady(DagmaError, LookupError):
    """The data does not exist yet; the message says what to run."""


class Unavailable(DagmaError, RuntimeError):
    """A configured service does not answer; the message says how to start or skip it."""


def _time(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds).astimezone() if seconds else None


def _get_json(url: str, payload: dict[str, Any] | None = None, timeout: float = 2.0) -> Any:
    body = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec B310
        return json.load(response)


# --------------------------------------------------------------------------- Dagster


@dataclass(frozen=True)
class AssetState:
    key: str
    group: str | None
    status: Status
    cause: str = ""
    last_materialized: datetime | None = None
    partition: str | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class AssetsView:
    mode: Literal["webserver", "embedded"]
    source: str
    assets: list[AssetState]


def dagster_webserver_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Dagster webserver (`dagster dev` or services mode) answers at `url`."""
    try:
        info = _get_json(f"{url.rstrip('/')}/server_info", timeout=timeout)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "dagster_webserver_version" in info


_ASSETS_QUERY = """
query DagmaAssets {
  assetNodes {
    assetKey { path }
    groupName
    isPartitioned
    partitionKeysByDimension { partitionKeys }
    staleStatus
    staleCauses { reason }
    assetMaterializations(limit: 1) { timestamp runId partition }
  }
}
"""


def _graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        reply = _get_json(
            f"{url.rstrip('/')}/graphql", {"query": query, "variables": variables or {}}, 30.0
        )
    except (OSError, ValueError) as exc:
        raise Unavailable(
            f"The Dagster webserver at {url} did not answer the query ({exc}). "
            "Restart it (`make dagster`), or unset DAGSTER_UI_URL to read the embedded instance."
        ) from exc
    if reply.get("errors"):
        raise Unavailable(f"The Dagster webserver at {url} answered: {reply['errors'][0]}")
    return dict(reply["data"])


def _state(materialized: bool, stale_status: str, partition: str | None) -> tuple[Status, str]:
    """The status and why, from Dagster's stale status name."""
    if not materialized:
        return "missing", "never materialized"
    status: Status = (
        "fresh" if stale_status == "FRESH" else "stale" if stale_status == "STALE" else "missing"
    )
    if status == "missing" and partition:
        return status, f"latest partition {partition} not materialized"
    return status, ""


def assets_from_webserver(url: str) -> AssetsView:
    """Assets, last materializations and staleness through the webserver's GraphQL API.

    A partitioned asset is judged by its latest partition, as `dagma status` does.
    """
    nodes = _graphql(url, _ASSETS_QUERY)["assetNodes"]
    latest: dict[int, str] = {}
    for i, node in enumerate(nodes):
        keys = [k for d in node.get("partitionKeysByDimension") or [] for k in d["partitionKeys"]]
        if node["isPartitioned"] and keys:
            latest[i] = keys[-1]
    if latest:
        params = ", ".join(f"$k{i}: AssetKeyInput!, $p{i}: String" for i in latest)
        fields = " ".join(
            f"a{i}: assetNodeOrError(assetKey: $k{i}) {{ ... on AssetNode {{ "
            f"staleStatus(partition: $p{i}) staleCauses(partition: $p{i}) {{ reason }} }} }}"
            for i in latest
        )
        variables: dict[str, Any] = {}
        for i, partition in latest.items():
            variables[f"k{i}"] = {"path": nodes[i]["assetKey"]["path"]}
            variables[f"p{i}"] = partition
        answer = _graphql(url, f"query DagmaPartitions({params}) {{ {fields} }}", variables)
        for i in latest:
            nodes[i] = {**nodes[i], **answer[f"a{i}"]}
    assets = []
    for i, node in enumerate(nodes):
        events = node.get("assetMaterializations") or []
        event = events[0] if events else {}
        causes = node.get("staleCauses") or []
        status, why = _state(bool(event), str(node.get("staleStatus")), latest.get(i))
        assets.append(
            AssetState(
                key="/".join(node["assetKey"]["path"]),
                group=node.get("groupName"),
                status=status,
                cause=causes[0]["reason"] if causes else why,
                last_materialized=_time(int(event["timestamp"]) / 1000 if event else None),
                partition=event.get("partition"),
                run_id=event.get("runId"),
            )
        )
    return AssetsView("webserver", url, sorted(assets, key=lambda a: a.key))


def require_instance(dagster_dir: Path) -> None:
    """Raise `NotReady` unless the embedded Dagster instance exists (opening would create it)."""
    import yaml

    config = dagster_dir / "dagster.yaml"
    if config.is_file():
        custom = "storage" in (yaml.safe_load(config.read_text()) or {})
        if custom or (dagster_dir / "history" / "runs.db").is_file():
            return
    raise NotReady(
        f"No Dagster runs in {dagster_dir} yet. {RUN_DEMO} to materialize the graph, "
        "or start `make dagster` and materialize it from the Dagster UI."
    )


def open_instance(dagster_dir: Path) -> Any:
    """The embedded Dagster instance, opened only when it exists."""
    from dagster import DagsterInstance

    require_instance(dagster_dir)
    return DagsterInstance.from_config(str(dagster_dir))


def load_definitions() -> Any:
    """The project's Definitions, loaded without `dagma.lab`'s set-up (which writes)."""
    from dagma.definitions import defs

    return defs()


def assets_from_instance(instance: Any, definitions: Any, dagster_dir: Path) -> AssetsView:
    """Assets, last materializations and staleness read from the embedded instance."""
    from dagma import dagster_state

    require_instance(dagster_dir)
    graph = definitions.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    latest = dagster_state.latest_partitions(graph, keys)
    stale = dagster_state.staleness(instance, graph, keys, latest, causes=True)
    events = dagster_state.last_materializations(instance, keys)
    assets = []
    for key in keys:
        event, partition = events[key], latest.get(key)
        status, why = _state(event is not None, stale[key].status, partition)
        causes = stale[key].causes if status == "stale" else ()
        dagster_event = event.dagster_event if event else None
        assets.append(
            AssetState(
                key=key.to_user_string(),
                group=graph.get(key).group_name,
                status=status,
                cause=causes[0] if causes else why,
                last_materialized=_time(event.timestamp if event else None),
                partition=dagster_event.partition if dagster_event else None,
                run_id=event.run_id if event else None,
            )
        )
    return AssetsView("embedded", str(dagster_dir), assets)


# --------------------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str
    status: str
    start: datetime | None
    end: datetime | None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        when = f"{self.start:%Y-%m-%d %H:%M:%S}" if self.start else "not started"
        return f"{self.name} · {when} · {self.run_id[:8]}"


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    alias: str | None
    run_id: str | None
    created: datetime | None


def require_tracking_store(tracking_uri: str) -> None:
    """Raise unless MLflow's store exists and answers; a client would create a missing one."""
    local = tracking.local_store(tracking_uri)
    if local is not None:
        if not local.exists() or (local.is_file() and local.stat().st_size == 0):
            raise NotReady(
                f"No MLflow store at {local} yet. {RUN_DEMO} to train the model and log the runs."
            )
        return
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(  # nosec B310
                f"{tracking_uri.rstrip('/')}/health", timeout=3
            ):
                return
        except OSError as exc:
            raise Unavailable(
                f"The MLflow server at MLFLOW_TRACKING_URI={tracking_uri} does not answer "
                f"({exc}). Start it (`dagma services up`), or unset MLFLOW_TRACKING_URI to "
                "use the embedded store."
            ) from exc


def mlflow_client(tracking_uri: str) -> Any:
    """An MlflowClient on an existing store."""
    from mlflow import MlflowClient

    require_tracking_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_runs(
    client: Any, tracking_uri: str, experiment: str, limit: int = 500
) -> tuple[str, list[RunInfo]]:
    """The experiment's id and its runs, newest first."""
    require_tracking_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise NotReady(
            f"MLflow has no experiment {experiment!r} yet. {RUN_DEMO} to log the first runs."
        )
    runs = client.search_runs(
        [found.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"]
    )
    return str(found.experiment_id), [
        RunInfo(
            run_id=r.info.run_id,
            name=r.info.run_name or r.info.run_id[:8],
            status=r.info.status,
            start=_time(r.info.start_time / 1000 if r.info.start_time else None),
            end=_time(r.info.end_time / 1000 if r.info.end_time else None),
            metrics=dict(r.data.metrics),
            params=dict(r.data.params),
        )
        for r in runs
    ]


def runs_table(runs: Sequence[RunInfo]) -> pd.DataFrame:
    """One row per run: name, status, times and every metric."""
    rows = []
    for run in runs:
        seconds = (run.end - run.start).total_seconds() if run.start and run.end else None
        rows.append(
            {
                "run": run.name,
                "status": run.status,
                "started": run.start,
                "seconds": seconds,
                **run.metrics,
                "run_id": run.run_id,
            }
        )
    return pd.DataFrame(rows)


def metric_series(runs: Sequence[RunInfo], metric: str) -> pd.DataFrame:
    """`metric` of every run that logged it, oldest first."""
    rows = [
        {"run": r.label, "name": r.name, "started": r.start, metric: r.metrics[metric]}
        for r in runs
        if metric in r.metrics
    ]
    return pd.DataFrame(rows).sort_values("started", kind="stable") if rows else pd.DataFrame()


def param_diff(a: RunInfo, b: RunInfo) -> pd.DataFrame:
    """The parameters whose values differ between `a` and `b` (absent counts as different)."""
    names = sorted(set(a.params) | set(b.params))
    rows = [
        {"parameter": n, "A": a.params.get(n, "—"), "B": b.params.get(n, "—")}
        for n in names
        if a.params.get(n) != b.params.get(n)
    ]
    return pd.DataFrame(rows, columns=["parameter", "A", "B"])


def default_pair(runs: Sequence[RunInfo]) -> tuple[int, int]:
    """Indices of two runs worth comparing: the newest two of one name, else the newest two."""
    for i, run in enumerate(runs):
        for j in range(i + 1, len(runs)):
            if runs[j].name == run.name:
                return i, j
    return 0, min(1, len(runs) - 1)


def current_model(client: Any, tracking_uri: str, name: str = REGISTERED_MODEL) -> ModelRef:
    """The version aliased `champion`: the newest one that passed the quality gate."""
    from mlflow.exceptions import MlflowException

    require_tracking_store(tracking_uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotReady(
                f"No version of the registered model {name!r} yet. {RUN_DEMO} "
                "(or `uv run dagma run wine_model`) to train and register it."
            ) from None
        raise
    if CHAMPION not in (registered.aliases or {}):
        raise NotReady(
            f"No version of {name!r} has passed the quality gate (the wine_model_quality check), "
            "so none is `champion`. Look at the check's metadata in the Dagster UI, then retrain "
            "with `uv run dagma run wine_model`."
        )
    version = client.get_model_version(name, registered.aliases[CHAMPION])
    return ModelRef(
        name=name,
        version=str(version.version),
        alias=CHAMPION,
        run_id=version.run_id,
        created=_time(version.creation_timestamp / 1000 if version.creation_timestamp else None),
    )


@dataclass
class LoadedModel:
    model: Any
    features: list[str]
    defaults: dict[str, float]
    flavor: str


def load_model(client: Any, tracking_uri: str, name: str, version: str) -> LoadedModel:
    """Download (local stores: just locate) and load one model version."""
    import mlflow
    from mlflow.models import Model

    require_tracking_store(tracking_uri)
    uri = client.get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
    meta = Model.load(local)
    example = None
    try:
        loaded = meta.load_input_example(local)
        example = loaded if isinstance(loaded, pd.DataFrame) else None
    except Exception:  # nosec B110 - an example only sets the form's fallback defaults
        example = None
    features = meta.signature.inputs.input_names() if meta.signature else []
    if not features and example is not None:
        features = [str(c) for c in example.columns]
    defaults = feature_defaults(features, example)
    if "sklearn" in meta.flavors:
        return LoadedModel(mlflow.sklearn.load_model(local), features, defaults, "sklearn")
    return LoadedModel(mlflow.pyfunc.load_model(local), features, defaults, "pyfunc")


def feature_defaults(features: Sequence[str], example: pd.DataFrame | None) -> dict[str, float]:
    """Form defaults: the wine data's medians, else the model's input example, else 0."""
    medians: dict[str, float] = {}
    try:
        from dagma.lib.data import load_wine

        medians = {str(k): float(v) for k, v in load_wine().median(numeric_only=True).items()}
    except Exception:  # nosec B110 - fall back to the input example below
        medians = {}
    first = example.iloc[0].to_dict() if example is not None and len(example) else {}
    return {f: float(medians.get(f, first.get(f, 0.0))) for f in features}


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float] | None


def predict(loaded: LoadedModel, values: dict[str, float]) -> Prediction:
    """The class of one row of features, with class probabilities when the model has them."""
    row = pd.DataFrame([{f: float(values[f]) for f in loaded.features}])
    label = loaded.model.predict(row)[0]
    probabilities = None
    if hasattr(loaded.model, "predict_proba"):
        classes = getattr(loaded.model, "classes_", None)
        proba = loaded.model.predict_proba(row)[0]
        names = classes if classes is not None else range(len(proba))
        probabilities = {str(c): float(p) for c, p in zip(names, proba, strict=True)}
    return Prediction(str(label), probabilities)


# --------------------------------------------------------------------------- vectors and RAG


@dataclass(frozen=True)
class SearchHit:
    rank: int
    score: float
    source: str
    title: str
    text: str
    payload: dict[str, Any]


def open_vectors(settings: Settings) -> Any:
    """The vector store, with the server's read-only key when one is set (the app only reads);
    the embedded one is only read, never created."""
    try:
        return settings.open_vector_store(read_only=True)
    except Exception as exc:
        if settings.qdrant_url:
            raise _qdrant_down(settings.qdrant_url, exc) from exc
        raise


def _qdrant_down(url: str, exc: Exception) -> Unavailable:
    return Unavailable(
        f"The Qdrant server at QDRANT_URL={url} does not answer. Start it "
        f"(`dagma services up`), or unset QDRANT_URL to use the embedded store. Details: {exc}"
    )


def collection_version(store: Any, collection: str) -> Any:
    """The current version of `collection`, or `NotReady` when it was never published."""
    try:
        current = store.current_version(collection)
    except Exception as exc:
        if getattr(store, "kind", "") == "server":
            raise _qdrant_down(store.location, exc) from exc
        raise
    if current is None:
        raise NotReady(
            f"The collection {collection!r} has not been published in {store.location} yet. "
            f"{RUN_DEMO} (or `uv run dagma run doc_vectors`) to embed the documents."
        )
    return current


def search(
    store: Any, embedder: Any, collection: str, query: str, k: int, source: str | None = None
) -> list[SearchHit]:
    """The `k` nearest chunks to `query`, only from `source` when given."""
    vector = embedder.embed([query])[0]
    hits = store.search(collection, vector, k=k, filter={"source": source} if source else None)
    return [
        SearchHit(
            rank=i,
            score=float(h.score),
            source=str(h.payload.get("source", "")),
            title=str(h.payload.get("title", "")),
            text=str(h.payload.get("text", "")),
            payload={"id": str(h.id), **{key: v for key, v in h.payload.items() if key != "text"}},
        )
        for i, h in enumerate(hits, start=1)
    ]


def collection_sources(store: Any, collection: str, dim: int, points: int) -> list[str]:
    """Every distinct `source` in the collection (read by one search over all its points)."""
    import numpy as np

    probe = np.full(dim, 1.0 / np.sqrt(dim))
    hits = store.search(collection, probe, k=max(1, min(points, 20_000)))
    return sorted({str(h.payload.get("source")) for h in hits if h.payload.get("source")})


@dataclass
class Chat:
    """The RAG pipeline and the lock that serialises its (not thread-safe) model."""

    pipeline: Any
    lock: threading.Lock


def rag_chat(store: Any, collection: str, embedder: Any) -> Chat:
    """`make_pipeline` over the collection and the chat model chosen by DAGMA_LLM."""
    from dagma.lib.llm import LLMSettings, chat_model
    from dagma.lib.retrieval import make_pipeline, make_search

    model = chat_model(LLMSettings.from_env())
    return Chat(make_pipeline(make_search(store, collection, embedder), model), threading.Lock())


def source_rows(docs: Sequence[Any]) -> list[dict[str, Any]]:
    """Rank, source, score and a snippet of each retrieved document."""
    rows = []
    for rank, doc in enumerate(docs, start=1):
        text = " ".join(str(doc.page_content).split())
        snippet = text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS].rsplit(" ", 1)[0]
        rows.append(
            {
                "rank": rank,
                "source": str(doc.metadata.get("source", "")),
                "score": float(doc.metadata.get("score", 0.0)),
                "snippet": snippet + ("…" if len(snippet) < len(text) else ""),
            }
        )
    return rows


# --------------------------------------------------------------------------- notebooks


@dataclass(frozen=True)
class ExecutedNotebook:
    asset: str
    run_id: str
    html: Path
    ipynb: Path | None
    modified: datetime
    partition: str | None = None
    mlflow_run_id: str | None = None

    @property
    def label(self) -> str:
        part = f" [{self.partition}]" if self.partition else ""
        return f"{self.asset}{part} · {self.modified:%Y-%m-%d %H:%M:%S} · run {self.run_id[:8]}"


def executed_notebooks(runs_dir: Path) -> list[ExecutedNotebook]:
    """The executed notebooks' HTML under `runs_dir/<run>/<asset>/`, newest first."""
    from dagma.lib.run_folder import RunFolder

    found = []
    for folder in RunFolder.every(runs_dir):
        if not folder.html.is_file():
            continue
        context = folder.read_context()
        target = context.get("target") or {}
        found.append(
            ExecutedNotebook(
                asset=folder.notebook,
                run_id=folder.run_id,
                html=folder.html,
                ipynb=folder.ipynb if folder.ipynb.is_file() else None,
                modified=datetime.fromtimestamp(folder.html.stat().st_mtime).astimezone(),
                partition=target.get("partition_key"),
                mlflow_run_id=context.get("mlflow_run_id"),
            )
        )
    if not found:
        raise NotReady(
            f"No executed notebooks in {runs_dir} yet. {RUN_DEMO}: every notebook asset "
            "saves its executed copy (.ipynb and .html) there."
        )
    return sorted(found, key=lambda n: n.modified, reverse=True)
