"""The predict schemas a model's MLflow signature implies: each column's type, nothing more."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, DataType, Schema
from pydantic import ValidationError

from dagma.api.predict import schemas_for

FRAME = pd.DataFrame(
    {
        "od280/od315": [1.5, 2.5],  # not an identifier: kept as the column's name
        "count": np.array([1, 2], dtype="int64"),
        "grape": ["merlot", "syrah"],
        "organic": [True, False],
    }
)
with warnings.catch_warnings():  # MLflow's hint that int columns cannot hold missing values
    warnings.simplefilter("ignore", UserWarning)
    SIGNATURE = infer_signature(FRAME, np.array([0, 1]))
ROW = {"od280/od315": 1.5, "count": 3, "grape": "merlot", "organic": True}


def rows(**changes: Any) -> dict[str, Any]:
    row = {**ROW, **changes}
    return {"rows": [{k: v for k, v in row.items() if v is not ...}]}


def test_a_row_of_the_signature_validates_and_keeps_its_column_names() -> None:
    schemas = schemas_for("dagma-wine", "3", SIGNATURE, max_rows=10)
    request = schemas.request.model_validate(rows(**{"od280/od315": 2}))  # an int is a number
    assert request.model_dump(by_alias=True)["rows"] == [{**ROW, "od280/od315": 2.0}]
    assert schemas.columns == list(FRAME.columns)
    response = schemas.response.model_validate(
        {"model": "dagma-wine", "version": "3", "predictions": [1, 0]}
    )
    assert response.model_dump()["predictions"] == [1, 0]
    with pytest.raises(ValidationError):
        schemas.response.model_validate({"model": "m", "version": "3", "predictions": ["x"]})


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"od280/od315": "1.5"}, "od280/od315"),
        ({"od280/od315": math.inf}, "od280/od315"),
        ({"od280/od315": math.nan}, "od280/od315"),
        ({"count": 2.5}, "count"),
        ({"count": "2"}, "count"),
        ({"grape": 7}, "grape"),
        ({"organic": "yes"}, "organic"),
        ({"grape": ...}, "grape"),
        ({"vintage": 1999}, "vintage"),
    ],
)
def test_a_row_off_the_signature_is_refused_naming_the_column(
    changes: dict[str, Any], where: str
) -> None:
    schemas = schemas_for("m", "1", SIGNATURE, max_rows=10)
    with pytest.raises(ValidationError) as caught:
        schemas.request.model_validate(rows(**changes))
    assert [e["loc"] for e in caught.value.errors()] == [("rows", 0, where)]


def test_row_count_limits_and_optional_columns() -> None:
    optional = ModelSignature(
        inputs=Schema([ColSpec(DataType.double, "x"), ColSpec(DataType.string, "note", False)])
    )
    schemas = schemas_for("m", "1", optional, max_rows=2)
    assert schemas.request.model_validate({"rows": [{"x": 1.0}]})
    with pytest.raises(ValidationError, match="at most 2 items"):
        schemas.request.model_validate({"rows": [{"x": 1.0}] * 3})
    with pytest.raises(ValidationError, match="at least 1 item"):
        schemas.request.model_validate({"rows": []})
    schema = schemas.request.model_json_schema()
    row = schema["$defs"]["MRow"]
    assert row["required"] == ["x"] and set(row["properties"]) == {"x", "note"}


def test_a_model_without_a_signature_takes_any_rows() -> None:
    schemas = schemas_for("m", "1", None, max_rows=5)
    assert schemas.columns is None
    assert schemas.request.model_validate({"rows": [{"anything": "goes"}]})
