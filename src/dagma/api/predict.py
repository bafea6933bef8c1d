"""The `champion` version of a registered model, and the API schemas its MLflow signature implies.

`Champions.get(name)` asks the registry which version the alias points at (at most every
`ttl` seconds) and loads a version only when it changed, so a newly promoted champion is served
without a restart. The server only reads MLflow: it lists aliases and downloads artifacts, and
in services mode it signs in as MLflow's read-only `reader`.
"""

from __future__ import annotations

import datetime
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    create_model,
)
from pydantic import ValidationError as PydanticValidationError

from dagma.api.errors import ApiError, invalid, unavailable
from dagma.lib import tracking
from dagma.lib.tracking import CHAMPION

RETRAIN = "Train and gate one: `dagma run wine_model` (or `make demo`)."

# MLflow's column types -> what a JSON row may hold for them (no silent string-to-number casts).
_TYPES: dict[str, Any] = {
    "double": StrictFloat,
    "float": StrictFloat,
    "integer": StrictInt,
    "long": StrictInt,
    "boolean": StrictBool,
    "string": StrictStr,
    "binary": bytes,
    "datetime": datetime.datetime,
}


class PredictRequest(BaseModel):
    """Rows to score, one object per row keyed by the model's input columns."""

    rows: list[dict[str, Any]] = Field(min_length=1)


class Prediction(BaseModel):
    """What `POST /v1/predict` returns: the model, the version that scored, one value per row."""

    model: str
    version: str
    predictions: list[Any]


@dataclass(frozen=True)
class Schemas:
    """The request and response models derived from one version's signature."""

    request: type[BaseModel]
    response: type[BaseModel]
    columns: list[str] | None  # input column order, None when the signature names none


@dataclass(frozen=True)
class Served:
    """One loaded model version with its schemas."""

    name: str
    version: str
    model: Any
    schemas: Schemas

    def predict(self, body: Any, max_rows: int) -> BaseModel:
        """Validate `body` against the signature, score its rows, name the version."""
        rows = body.get("rows") if isinstance(body, dict) else None
        if isinstance(rows, list) and len(rows) > max_rows:
            raise ApiError(
                422,
                f"rows: {len(rows)} rows, the limit is {max_rows} per request",
                "Split the rows over several requests (the limit is DAGMA_API_MAX_ROWS).",
            )
        try:
            request = self.schemas.request.model_validate(body)
        except PydanticValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            raise invalid(errors, self._fix()) from None
        dumped = request.model_dump(by_alias=True)["rows"]
        frame = pd.DataFrame(dumped, columns=self.schemas.columns)
        try:
            output = self.model.predict(frame)
        except Exception as exc:  # the model refused the rows despite the signature
            raise ApiError(
                422,
                f"model {self.name!r} version {self.version} cannot score the rows: {exc}",
                self._fix(),
            ) from exc
        return self.schemas.response.model_validate(
            {"model": self.name, "version": self.version, "predictions": _jsonable(output)}
        )

    def _fix(self) -> str:
        cols = ", ".join(self.schemas.columns or []) or "see the model's signature"
        return (
            f'Send {{"rows": [{{...}}]}} with one object per row holding exactly the columns of '
            f"{self.name!r} version {self.version}: {cols} (schema at /docs)."
        )


def _jsonable(output: Any) -> list[Any]:
    if isinstance(output, pd.DataFrame):
        return list(output.to_dict(orient="records"))
    if hasattr(output, "tolist"):
        return list(output.tolist())
    return list(output)


def _ident(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_") or "model"


def schemas_for(name: str, version: str, signature: Any, max_rows: int) -> Schemas:
    """Pydantic request/response models from an MLflow signature (generic rows without one)."""
    title = "".join(part.capitalize() for part in _ident(name).split("_"))
    row_model: Any = dict[str, Any]
    columns: list[str] | None = None
    inputs = getattr(signature, "inputs", None)
    if inputs is not None and not inputs.is_tensor_spec() and inputs.has_input_names():
        columns = list(inputs.input_names())
        fields: dict[str, Any] = {}
        for i, spec in enumerate(inputs.inputs):
            kind = _TYPES.get(str(getattr(spec.type, "name", spec.type)), Any)
            required = getattr(spec, "required", True)
            options: dict[str, Any] = {"alias": spec.name, "title": spec.name}
            if kind is StrictFloat:
                options["allow_inf_nan"] = False
            annotation = kind if required else kind | None
            fields[f"c{i}"] = (annotation, Field(... if required else None, **options))
        row_model = create_model(
            f"{title}Row",
            __config__=ConfigDict(extra="forbid"),
            __doc__=f"One row of {name!r} version {version}'s input columns.",
            **fields,
        )
    request = create_model(
        f"{title}PredictRequest",
        __doc__=f"Rows for {name!r} (from version {version}'s MLflow signature).",
        rows=(list[row_model], Field(min_length=1, max_length=max_rows)),
    )
    response = create_model(
        f"{title}Prediction",
        __base__=Prediction,
        __doc__=f"{name!r}'s predictions (from version {version}'s MLflow signature).",
        predictions=(list[_output_type(signature)], ...),  # type: ignore[misc,arg-type]
    )
    return Schemas(request=request, response=response, columns=columns)


def _output_type(signature: Any) -> Any:
    outputs = getattr(signature, "outputs", None)
    if outputs is None:
        return Any
    if outputs.is_tensor_spec():
        spec = outputs.inputs[0]
        kind = getattr(spec.type, "kind", "")
        base = {"i": int, "u": int, "f": float, "b": bool, "U": str, "O": Any}.get(kind, Any)
        return base if len(spec.shape or (-1,)) <= 1 else list[Any]
    if len(outputs.inputs) == 1:
        return _TYPES.get(str(getattr(outputs.inputs[0].type, "name", "")), Any)
    return dict[str, Any]


@dataclass
class _Entry:
    version: str
    checked: float
    served: Served | None = None


class Champions:
    """The `champion` of each registered model, checked every `ttl` seconds, loaded on change."""

    def __init__(self, tracking_uri: str, *, ttl: float, max_rows: int) -> None:
        self.tracking_uri = tracking_uri
        self.ttl = ttl
        self.max_rows = max_rows
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._client: Any = None

    def get(self, name: str) -> Served:
        """The loaded champion of `name`; 404 without one, 503 when MLflow cannot be reached."""
        # One lock (not one per name a caller invents): held for a registry look-up at most
        # every `ttl` seconds, and for a load when the version changed; scoring runs outside.
        with self._lock:
            entry = self._entries.get(name)
            now = time.monotonic()
            if entry is None or now - entry.checked >= self.ttl:
                version = self.version(name)
                if entry is None or entry.version != version:
                    entry = _Entry(version, now)
                entry.checked = now
                self._entries[name] = entry
            if entry.served is None:
                entry.served = self._load(name, entry.version)
            return entry.served

    def cached(self, name: str) -> Served | None:
        """The champion last loaded for `name`, without asking MLflow (for the OpenAPI page)."""
        entry = self._entries.get(name)
        return entry.served if entry else None

    def version(self, name: str) -> str:
        """The version the alias names now."""
        from mlflow.exceptions import MlflowException

        client = self._mlflow()
        try:
            return str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise self._down(exc) from exc
        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ApiError(
                    404,
                    f"no registered model {name!r} in MLflow at {self.tracking_uri}",
                    f"Name a registered model with ?model= (the demo's is 'dagma-wine'). {RETRAIN}",
                ) from None
            raise self._down(exc) from exc
        raise ApiError(
            404,
            f"registered model {name!r} has no {CHAMPION!r} version: none passed the quality gate",
            f"{RETRAIN} Only a version that passes the gate becomes {CHAMPION!r}.",
        )

    def _mlflow(self) -> Any:
        local = tracking.local_store(self.tracking_uri)
        if local is not None:
            if not local.exists() or (local.is_file() and local.stat().st_size == 0):
                # A client would create (and migrate) a missing store: this server never writes.
                raise ApiError(404, f"no MLflow store at {local} yet, so no model", RETRAIN)
        else:  # the client of a server that does not answer retries for minutes
            try:
                tracking.check_server(self.tracking_uri, timeout=3.0)
            except tracking.TrackingError as exc:
                raise self._down(exc) from exc
        if self._client is None:
            self._client = tracking.client(self.tracking_uri)
        return self._client

    def _down(self, exc: BaseException) -> ApiError:
        return unavailable(
            "MLflow",
            exc,
            f"Start MLflow or fix MLFLOW_TRACKING_URI (now {self.tracking_uri}), then retry.",
        )

    def _load(self, name: str, version: str) -> Served:
        import mlflow
        from mlflow.models import Model

        client = self._mlflow()
        try:
            uri = client.get_model_version_download_uri(name, version)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, tracking_uri=self.tracking_uri
            )
            signature = Model.load(local).signature
            model = mlflow.pyfunc.load_model(local)
        except (OSError, mlflow.exceptions.MlflowException) as exc:
            raise unavailable(
                f"model {name!r} version {version}",
                exc,
                "Check that MLflow's artifact store is reachable from this server.",
            ) from exc
        return Served(name, version, model, schemas_for(name, version, signature, self.max_rows))
