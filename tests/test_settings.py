from pathlib import Path

import pytest

from dagma.settings import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in (
        "DAGMA_HOME",
        "DAGSTER_HOME",
        "MLFLOW_TRACKING_URI",
        "QDRANT_URL",
        "QDRANT_API_KEY",
        "DAGMA_QDRANT_PATH",
        "MLFLOW_UI_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_everything_defaults_under_one_home(clean_env: Path):
    s = Settings()
    assert s.home == clean_env / ".dagma"
    assert s.dagster_dir == s.home / "dagster"
    assert s.tracking_uri == f"sqlite:///{s.home / 'mlflow' / 'mlflow.db'}"
    assert s.qdrant_path == s.home / "qdrant"
    assert s.qdrant_url is None and s.vector_location == str(s.qdrant_path)


def test_usual_variables_override_each_location(clean_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGMA_HOME", str(clean_env / "lab"))
    monkeypatch.setenv("DAGSTER_HOME", str(clean_env / "dg"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("QDRANT_URL", "http://127.0.0.1:6333")
    monkeypatch.setenv("QDRANT_API_KEY", "qdrant-key-value")  # pragma: allowlist secret
    s = Settings()
    assert s.home == clean_env / "lab"
    assert s.dagster_dir == clean_env / "dg"
    assert s.tracking_uri == s.mlflow_ui == "http://127.0.0.1:5000"
    assert s.vector_location == "http://127.0.0.1:6333"
    assert "qdrant-key-value" not in repr(s)  # the value, not just a field named *secret*


def test_blank_variables_mean_unset(clean_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QDRANT_URL", "  ")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    s = Settings()
    assert s.qdrant_url is None
    assert s.tracking_uri.startswith("sqlite:///")


def test_ill_typed_variable_is_a_clear_error(clean_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGMA_SEED", "forty-two")
    with pytest.raises(ValueError, match="dagma_seed"):
        Settings()


def test_the_embedded_instance_limits_pools_also_in_an_older_home(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DAGMA_HOME", str(clean_env / "lab"))
    instance_yaml = clean_env / "lab" / "dagster" / "dagster.yaml"
    instance_yaml.parent.mkdir(parents=True)
    instance_yaml.write_text("telemetry:\n  enabled: false\n")  # as homes before pools were
    Settings().ensure_dirs()
    Settings().ensure_dirs()
    text = instance_yaml.read_text()
    assert text.startswith("telemetry:\n  enabled: false\n")
    assert text.count("concurrency:") == 1 and "default_limit: 1" in text
