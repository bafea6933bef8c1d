"""One resource per external system: MLflow, the vector store (Qdrant) and the LLM."""

import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from dagma.defs.core.notebook_io import LabOutputNotebookIOManager
from dagma.defs.core.storage import LabIOManager
from dagma.lib import tracking
from dagma.settings import get_settings


class MLflowResource(dg.ConfigurableResource):
    """The MLflow tracking store or server that every run logs to."""

    tracking_uri: str = Field(description="MLflow store or server URI.")
    experiment: str = Field(default="dagma", description="Experiment that holds the lab's runs.")
    artifact_root: str | None = Field(
        default=None, description="Artifact folder for local stores; servers keep their own."
    )
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Where the MLflow UI is.")

    _experiment_id: str | None = PrivateAttr(default=None)

    # Lazy: a step that never logs (a notebook without MLflow) never imports MLflow.
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = tracking.setup_experiment(
                self.tracking_uri,
                self.experiment,
                Path(self.artifact_root) if self.artifact_root else None,
            )
        return self._experiment_id

    def run_url(self, run_id: str) -> str:
        return tracking.run_url(self.ui_url, self.experiment_id, run_id)

    def check(self) -> None:
        """Raise TrackingError at once when a tracking server does not answer."""
        if self.tracking_uri.startswith(("http://", "https://")):
            tracking.check_server(self.tracking_uri)


def service_retry_policy() -> dg.RetryPolicy:
    """Retries for a step whose server is down; a step's own failure opts out (allow_retries)."""
    settings = get_settings()
    return dg.RetryPolicy(
        max_retries=settings.dagma_retries,
        delay=settings.dagma_retry_delay,
        backoff=dg.Backoff.EXPONENTIAL,
    )


class QdrantResource(dg.ConfigurableResource):
    """The vector store: a Qdrant server when `url` is set, else the embedded store at `path`."""

    url: str | None = Field(default=None, description="Qdrant server URL (QDRANT_URL).")
    api_key: str | None = Field(default=None, description="Qdrant API key, from QDRANT_API_KEY.")
    path: str = Field(description="Folder of the embedded store.")
    collection: str = Field(default="dagma_docs", description="Collection of document chunks.")
    keep_versions: int = Field(
        default=3, ge=1, description="Collection versions kept for rollback."
    )

    def open(self) -> Any:
        from dagma.lib.vectors import open_store

        return open_store(
            url=self.url, api_key=self.api_key, root=Path(self.path), keep=self.keep_versions
        )

    @property
    def location(self) -> str:
        return self.url or self.path


class LLMResource(dg.ConfigurableResource):
    """The chat model behind the RAG chain, chosen by DAGMA_LLM."""

    backend: str = Field(default="local", description="local, openai or ollama (DAGMA_LLM).")
    max_tokens: int = Field(default=200, ge=1, description="Longest answer, in tokens.")

    def settings(self) -> Any:
        from dagma.lib.llm import LLMSettings

        return LLMSettings.from_env(
            backend=self.backend.strip().lower(), max_tokens=self.max_tokens
        )


def _optional_secret(name: str) -> Any:
    # EnvVar fails when the variable is unset, and these secrets are optional.
    return dg.EnvVar(name) if os.environ.get(name) else None


@dg.definitions
def resources() -> dg.Definitions:
    s = get_settings()
    return dg.Definitions(
        resources={
            "mlflow": MLflowResource(
                tracking_uri=s.tracking_uri,
                experiment=s.dagma_experiment,
                artifact_root=str(s.artifact_root),
                ui_url=s.mlflow_ui,
            ),
            "qdrant": QdrantResource(
                url=s.qdrant_url,
                api_key=_optional_secret("QDRANT_API_KEY"),
                path=str(s.qdrant_path),
                collection=s.dagma_collection,
            ),
            "llm": LLMResource(backend=os.environ.get("DAGMA_LLM", "local")),
            "io_manager": LabIOManager(base_dir=str(s.storage_dir)),
            # dagstermill's default key for executed notebooks: hand-written assets need it.
            "output_notebook_io_manager": LabOutputNotebookIOManager(
                base_dir=str(s.storage_dir),
                runs_dir=str(s.runs_dir),
                tracking_uri=s.tracking_uri,
                experiment=s.dagma_experiment,
                artifact_root=str(s.artifact_root),
                mlflow_ui_url=s.mlflow_ui,
                dagster_ui_url=s.dagster_ui_url,
            ),
        }
    )
