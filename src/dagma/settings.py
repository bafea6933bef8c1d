"""One place for every path, URL and knob Dagma reads from the environment."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from dagma.lib.vectors import VectorStore

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POOLS_YAML = "concurrency:\n  pools:\n    default_limit: 1\n"


class Settings(BaseSettings):
    """Embedded defaults under `DAGMA_HOME`; each location can be overridden by its usual variable."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    dagma_home: Path = Field(
        default=Path(".dagma"), description="Folder that holds all embedded state."
    )
    dagster_home: Path | None = Field(
        default=None, description="Dagster instance folder; default $DAGMA_HOME/dagster."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow store or server; default sqlite under $DAGMA_HOME."
    )
    qdrant_url: str | None = Field(
        default=None, description="Qdrant server URL; unset means the embedded store."
    )
    qdrant_api_key: SecretStr | None = Field(default=None, description="Qdrant server API key.")
    qdrant_read_only_api_key: SecretStr | None = Field(
        default=None, description="Qdrant read-only key; the app uses it when set."
    )
    dagma_qdrant_path: Path | None = Field(
        default=None, description="Embedded vector store folder; default $DAGMA_HOME/qdrant."
    )
    dagma_notebooks_dir: Path | None = Field(
        default=None, description="Folder of production notebooks; default ./notebooks."
    )
    dagma_defs_dir: Path | None = Field(
        default=None,
        description="A folder of the team's own Dagster definitions (Python files, e.g. "
        "hand-written dagstermill assets), loaded beside src/dagma/defs/.",
    )
    dagma_backup_key: SecretStr | None = Field(
        default=None,
        description="Key (16+ characters) that `dagma backup` signs archives with and that "
        "restore requires a valid signature from; unset: unsigned, restored with a notice.",
    )
    dagma_api_secret: SecretStr | None = Field(
        default=None,
        description="Signs and checks the API's local HS256 tokens (`dagma token issue`); 32+ "
        "bytes, written into .env by `dagma secrets init`. Unused when DAGMA_OIDC_ISSUER is set.",
    )
    dagma_api_audience: str = Field(
        default="dagma-api", description="The `aud` every API token must carry."
    )
    dagma_oidc_issuer: str | None = Field(
        default=None,
        description="An OpenID Connect issuer's base URL; when set, the API accepts only its "
        "RS256/ES256 tokens, checked against the keys its discovery document publishes.",
    )
    dagma_login_url: str | None = Field(
        default=None,
        description="The API's sign-in page as a browser reaches it through the gateway; when "
        "set, the forward-auth check sends a browser without a token there instead of a 401.",
    )
    dagma_cookie_domain: str | None = Field(
        default=None,
        description="Domain of the sign-in cookie, so every UI host behind the gateway gets it "
        "(e.g. dagma.localhost); unset: the API's own host only.",
    )
    dagma_api_max_rows: int = Field(
        default=1000, gt=0, description="Rows one `POST /v1/predict` may score."
    )
    dagma_api_max_k: int = Field(
        default=50, gt=0, description="The largest `k` of `GET /v1/search` (ask: at most 20)."
    )
    dagma_api_ask_timeout: float = Field(
        default=120.0,
        gt=0,
        description="Seconds `POST /v1/ask` may take, waiting for the model included, before "
        "it answers 504 (a stream ends with an error event).",
    )
    dagma_api_model_ttl: float = Field(
        default=1.0,
        ge=0,
        description="Seconds the API trusts the champion version it knows before asking MLflow "
        "again (0: every request); a changed version is loaded then.",
    )
    dagma_api_url: str | None = Field(
        default=None,
        description="A Dagma API (`dagma serve`) the app's Model, Search and Chat pages use "
        "instead of reading the stores themselves.",
    )
    dagma_api_token: SecretStr | None = Field(
        default=None,
        description="The app's bearer token for DAGMA_API_URL (`dagma token issue --scope "
        "predict --scope search --scope ask`).",
    )
    dagma_collection: str = Field(default="dagma_docs", description="Vector collection name.")
    dagma_experiment: str = Field(default="dagma", description="MLflow experiment name.")
    dagma_seed: int = Field(default=42, description="Seed used by every notebook and model.")
    dagster_ui_url: str = Field(
        default="http://127.0.0.1:3000", description="Where `dagster dev` serves the UI."
    )
    mlflow_ui_url: str | None = Field(
        default=None, description="MLflow UI; default the tracking server or 127.0.0.1:5000."
    )
    dagma_retries: int = Field(
        default=3, ge=0, description="Retries of a step whose server (MLflow, Qdrant) is down."
    )
    dagma_automation: bool = Field(
        default=True,
        description="Start the inbox sensor, nightly retrain and notebook automation with the "
        "daemon (`dagster dev` or services mode); false leaves them stopped until switched on.",
    )
    dagma_retrain_cron: str = Field(
        default="0 2 * * *", description="When (UTC cron) the model notebook retrains nightly."
    )
    dagma_cell_timeout: float | None = Field(
        default=3600.0,
        gt=0,
        description="Seconds one notebook cell may run before the notebook fails (a hung cell "
        "would hold its pool slot forever); a notebook's asset['timeout'] overrides it.",
    )
    dagma_notebook_timeout: float | None = Field(
        default=6 * 3600.0,
        gt=0,
        description="Seconds a whole notebook may run, kernel start included; a notebook's "
        "asset['max_runtime'] overrides it. Runs also get Dagster's dagster/max_runtime tag.",
    )
    dagma_max_cell_output: int = Field(
        default=2_000_000,
        gt=0,
        description="Bytes of output kept per notebook cell; past it the kept copy says where "
        "it was cut. A notebook's asset['max_output'] overrides it.",
    )
    dagma_keep_runs: int = Field(
        default=5,
        ge=0,
        description="Executed notebooks kept per notebook under runs/ by `dagma gc` and the "
        "nightly gc, besides every one a current materialization links.",
    )
    dagma_inbox_max_rows: int = Field(
        default=100_000,
        gt=0,
        description="Rows one inbox CSV may have; a larger file is named and skipped.",
    )
    dagma_retry_delay: float = Field(
        default=2.0, ge=0, description="Seconds before the first retry; doubles each time."
    )

    @field_validator("qdrant_url", "mlflow_tracking_uri", "mlflow_ui_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @cached_property
    def home(self) -> Path:
        return self.dagma_home.expanduser().resolve()

    @property
    def dagster_dir(self) -> Path:
        return (self.dagster_home or self.home / "dagster").expanduser().resolve()

    @property
    def storage_dir(self) -> Path:
        """The lab's IO manager's folder: one pickle per asset (a folder of them if partitioned)."""
        return self.dagster_dir / "storage"

    @property
    def scratch_dir(self) -> Path:
        """Temporary files of runs (dagstermill's inputs), removed when their run ends."""
        return self.home / "tmp"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def qdrant_path(self) -> Path:
        return (self.dagma_qdrant_path or self.home / "qdrant").expanduser().resolve()

    @property
    def notebooks_dir(self) -> Path:
        return (self.dagma_notebooks_dir or PROJECT_ROOT / "notebooks").expanduser().resolve()

    @property
    def inbox_dir(self) -> Path:
        """Where new wine samples land as CSV files; the inbox sensor watches it."""
        return self.home / "inbox"

    @property
    def kernels_dir(self) -> Path:
        """Spare Jupyter kernels, started ahead of the notebooks that will use them."""
        return self.home / "kernels"

    @property
    def runs_dir(self) -> Path:
        """Executed notebooks (.ipynb and .html) of every run."""
        return self.home / "runs"

    @property
    def mlflow_ui(self) -> str:
        if self.mlflow_ui_url:
            return self.mlflow_ui_url.rstrip("/")
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri.rstrip("/")
        return "http://127.0.0.1:5000"

    @property
    def vector_location(self) -> str:
        return self.qdrant_url or str(self.qdrant_path)

    def qdrant_key(self, *, read_only: bool = False) -> str | None:
        """The Qdrant API key; `read_only` prefers the read-only key, for readers such as the app."""
        key = (self.qdrant_read_only_api_key if read_only else None) or self.qdrant_api_key
        return key.get_secret_value() if key else None

    def open_vector_store(self, *, read_only: bool = False, keep: int = 3) -> VectorStore:
        """The lab's vector store: the server at QDRANT_URL when set, else the embedded one.

        `read_only` uses the server's read-only key when one is set (see `qdrant_key`); `keep`
        is how many versions a publish keeps.
        """
        from dagma.lib.vectors import open_store

        return open_store(
            url=self.qdrant_url,
            api_key=self.qdrant_key(read_only=read_only),
            root=self.qdrant_path,
            keep=keep,
        )

    def ensure_dirs(self) -> None:
        for path in (
            self.home,
            self.dagster_dir,
            self.mlflow_dir,
            self.qdrant_path,
            self.runs_dir,
            self.inbox_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)
        instance_yaml = self.dagster_dir / "dagster.yaml"
        text = instance_yaml.read_text() if instance_yaml.exists() else ""
        if not text:
            # The embedded instance: SQLite storage in this folder, no telemetry from a lab.
            text = "telemetry:\n  enabled: false\n"
        if "concurrency:" not in text:
            # A notebook in a pool (e.g. the one that publishes vectors) runs one at a time
            # across runs, so two runs never write the same collection at once.
            text += POOLS_YAML
        if not instance_yaml.exists() or instance_yaml.read_text() != text:
            instance_yaml.write_text(text)

    def export_env(self) -> None:
        """Point child processes (Dagster, kernels, MLflow) at the same state."""
        os.environ["DAGMA_HOME"] = str(self.home)
        os.environ["DAGSTER_HOME"] = str(self.dagster_dir)
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        # An offline lab sends nothing home: MLflow's usage telemetry is off unless asked for.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def get_settings() -> Settings:
    """Read settings now; never cached at import, so tests and CLIs can change the env."""
    return Settings()
