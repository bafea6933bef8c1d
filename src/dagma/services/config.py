"""Ports, credentials and limits of services mode, read from the environment (and `.env`)."""

from __future__ import annotations

import json
import os
import secrets
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from dagma.env_secrets import Placeholder, placeholder_reason, refuse

PROJECT_ROOT = Path(__file__).resolve().parents[3]
LOOPBACK = "127.0.0.1"
API_SECRET = "api_secret"  # nosec B105 # a key name in services/secrets.json, not a secret


class ServicesConfig(BaseSettings):
    """Everything `dagma services` needs beyond `dagma.settings.Settings`."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    dagma_home: Path = Field(default=Path(".dagma"), description="Folder that holds all state.")
    dagma_pg_port: int = Field(default=55432, description="Postgres port on 127.0.0.1.")
    dagma_mlflow_port: int = Field(default=55000, description="MLflow server port.")
    dagma_dagster_port: int = Field(default=53000, description="Dagster webserver port.")
    dagma_grpc_port: int = Field(default=54000, description="Dagster gRPC code server port.")
    dagma_api_port: int = Field(default=58000, description="The API's port (`dagma serve`).")
    dagma_metrics_port: int = Field(
        default=58100, description="The metrics exporter's port (every service's figures)."
    )
    dagma_prometheus_port: int = Field(
        default=59090, description="Prometheus' port (`up --with observability`)."
    )
    dagma_prometheus_bin: Path = Field(
        default=Path("/usr/bin/prometheus"), description="Prometheus (Debian's `prometheus`)."
    )
    dagma_prometheus_scrape_interval: str = Field(
        default="5s", description="How often Prometheus scrapes, a Prometheus duration (5s, 1m)."
    )
    dagster_max_concurrent_runs: int = Field(
        default=4, ge=1, description="Runs the daemon launches at once; the rest stay QUEUED."
    )
    dagma_pg_bin: Path | None = Field(
        default=None, description="Postgres server binaries; default the newest Debian major."
    )
    dagma_pg_os_user: str = Field(
        default="postgres", description="Unprivileged user that runs Postgres when we are root."
    )
    dagma_pg_superuser_password: SecretStr | None = Field(default=None)
    dagma_pg_dagster_password: SecretStr | None = Field(default=None)
    dagma_pg_mlflow_password: SecretStr | None = Field(default=None)
    dagma_mlflow_admin_password: SecretStr | None = Field(
        default=None, description="MLflow's admin password (basic auth), set on its first start."
    )
    dagma_mlflow_flask_secret: SecretStr | None = Field(
        default=None, description="MLflow's Flask secret key (CSRF); the same on every server."
    )
    dagma_api_secret: SecretStr | None = Field(
        default=None,
        description="Signs and checks the API's local tokens; unset: generated into "
        "services/secrets.json, where `dagma token issue` finds it.",
    )
    dagma_oidc_issuer: str | None = Field(
        default=None, description="An OpenID Connect issuer whose tokens the API accepts."
    )
    dagma_services_timeout: float = Field(
        default=180.0, description="Seconds `up` waits for each health check."
    )

    @cached_property
    def home(self) -> Path:
        return self.dagma_home.expanduser().resolve()

    @property
    def pg_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def dagster_home(self) -> Path:
        """The services-mode Dagster instance; the embedded one stays in $DAGMA_HOME/dagster."""
        return self.home / "dagster-services"

    @property
    def state_dir(self) -> Path:
        return self.home / "services"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "mlflow" / "artifacts"

    @property
    def metrics_dir(self) -> Path:
        """The services' shared multiprocess folder of Prometheus figures."""
        return self.state_dir / "metrics"

    @property
    def prometheus_dir(self) -> Path:
        """Prometheus' generated config and, under `data`, its database."""
        return self.state_dir / "prometheus"

    @property
    def secrets_file(self) -> Path:
        return self.state_dir / "secrets.json"

    @property
    def mlflow_auth_file(self) -> Path:
        """MLflow's basic-auth config: its user store's URL holds a password, so mode 0600."""
        return self.state_dir / "mlflow-auth.ini"

    def url(self, port: int) -> str:
        return f"http://{LOOPBACK}:{port}"

    @property
    def mlflow_url(self) -> str:
        return self.url(self.dagma_mlflow_port)

    @property
    def dagster_url(self) -> str:
        return self.url(self.dagma_dagster_port)

    @property
    def api_url(self) -> str:
        return self.url(self.dagma_api_port)

    @property
    def metrics_url(self) -> str:
        return self.url(self.dagma_metrics_port)

    @property
    def prometheus_url(self) -> str:
        return self.url(self.dagma_prometheus_port)

    def refuse_placeholders(self) -> None:
        """Raise `SecretsError` naming each password override set to a value everyone knows."""
        found = []
        for name in SECRET_OVERRIDES:
            value = getattr(self, name.lower())
            why = value and placeholder_reason(value.get_secret_value())
            if why:
                found.append(Placeholder(name, "the environment or .env", why))
        refuse(found, "start services mode")

    def passwords(self) -> dict[str, str]:
        """Role passwords: from the environment when set, else generated once into a 0600 file."""
        self.refuse_placeholders()
        stored: dict[str, str] = {}
        if self.secrets_file.is_file():
            stored = json.loads(self.secrets_file.read_text())
        wanted = {
            "postgres": self.dagma_pg_superuser_password,
            "dagster": self.dagma_pg_dagster_password,
            "mlflow": self.dagma_pg_mlflow_password,
            "mlflow_admin": self.dagma_mlflow_admin_password,
            "mlflow_flask_secret": self.dagma_mlflow_flask_secret,
            API_SECRET: self.dagma_api_secret,
        }
        result = {
            # HS256 wants a key of 32 bytes or more: the API's gets 43 characters.
            role: env.get_secret_value()
            if env
            else stored.get(role) or secrets.token_urlsafe(32 if role == API_SECRET else 24)
            for role, env in wanted.items()
        }
        if result != stored:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(result, handle)
            os.chmod(self.secrets_file, 0o600)
        return result


# The password overrides (DAGMA_PG_*_PASSWORD, ...): unset or empty, services mode generates one.
SECRET_OVERRIDES = tuple(
    name.upper()
    for name, info in ServicesConfig.model_fields.items()
    if info.annotation == SecretStr | None
)


def get_config() -> ServicesConfig:
    return ServicesConfig()


def stored_api_secret(home: Path) -> str | None:
    """The API secret services mode generated for the lab at `home`, if it did."""
    path = home.expanduser().resolve() / "services" / "secrets.json"
    try:
        value = json.loads(path.read_text()).get(API_SECRET)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None
