"""The services-mode topology as local processes: what to start, in which order, and how to
tell it is healthy. No Dagster import: Dagster runs only in the processes started here.

Longer than 450 lines because each service, its health check and its first start read together."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dagma.lib.telemetry import metrics
from dagma.services import health, metrics_exporter, postgres, prometheus
from dagma.services.config import API_SECRET, LOOPBACK, PROJECT_ROOT, ServicesConfig
from dagma.services.procs import (
    MARKER,
    ProcRecord,
    ServiceError,
    StateFile,
    marked_pids,
    port_in_use,
    record_alive,
    spawn,
    terminate,
    venv_bin,
)

Progress = Callable[[str], None]
MLFLOW_ADMIN = "admin"
OBSERVABILITY = "observability"  # `up --with observability`: Prometheus too
EXTRAS = (OBSERVABILITY,)
# Stopped first to last; any other recorded service before the metrics exporter.
DOWN_ORDER = ["prometheus", "api", "daemon", "webserver", "code-server", "mlflow", "postgres"]


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int | None
    check: Callable[[], health.Health]
    url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    wave: int = 0


@dataclass
class ServiceStatus:
    name: str
    pid: int | None
    alive: bool
    healthy: bool
    detail: str
    url: str | None
    log: str


class Topology:
    """Postgres and the metrics exporter, then MLflow and the gRPC code server, then the
    webserver, the daemon, the API and (with observability) Prometheus."""

    def __init__(self, config: ServicesConfig, extras: Iterable[str] = ()) -> None:
        self.config = config
        self.state = StateFile(config.state_dir / "state.json")
        unknown = sorted(set(extras) - set(EXTRAS))
        if unknown:
            raise ServiceError(
                f"unknown --with {', '.join(unknown)}: the choices are {', '.join(EXTRAS)}."
            )
        self.extras = frozenset(extras)

    def wanted_extras(self) -> frozenset[str]:
        """The extras asked for now, and those an earlier `up` started and `down` has not
        stopped: a later plain `up` restarts them like any other service."""
        return self.extras | ({OBSERVABILITY} if "prometheus" in self.state.load() else set())

    @property
    def pg_bin(self) -> Path:
        return postgres.find_bin_dir(self.config.dagma_pg_bin)

    def env(self, passwords: dict[str, str]) -> dict[str, str]:
        """The environment of every Dagster process and every run worker it starts."""
        c = self.config
        env = dict(os.environ)
        env.update(
            {
                MARKER: str(c.home),
                "DAGMA_HOME": str(c.home),
                "DAGSTER_HOME": str(c.dagster_home),
                "MLFLOW_TRACKING_URI": c.mlflow_url,
                "MLFLOW_UI_URL": c.mlflow_url,
                "DAGSTER_UI_URL": c.dagster_url,
                "DAGSTER_PG_HOST": LOOPBACK,
                "DAGSTER_PG_PORT": str(c.dagma_pg_port),
                "DAGSTER_PG_DB": "dagster",
                "DAGSTER_PG_USER": "dagster",
                "DAGSTER_PG_PASSWORD": passwords["dagster"],
                "DAGSTER_MAX_CONCURRENT_RUNS": str(c.dagster_max_concurrent_runs),
                # MLflow's client sends these as basic auth on every call.
                "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
                "MLFLOW_TRACKING_PASSWORD": passwords["mlflow_admin"],
                "DAGMA_GRPC_PORT": str(c.dagma_grpc_port),
                "PYTHONUNBUFFERED": "1",
                # Every service and run worker writes its figures here; the exporter serves them.
                metrics.MULTIPROC_ENV: str(c.metrics_dir),
            }
        )
        # The code server's run workers would otherwise inherit a test's or a shell's choice.
        for name in ("DAGMA_QDRANT_PATH",):
            env.pop(name, None)
        return env

    def services(self, passwords: dict[str, str]) -> list[Service]:
        c = self.config
        env = self.env(passwords)
        workspace = str(PROJECT_ROOT / "deploy" / "services" / "workspace.yaml")
        mlflow_env = {
            **env,
            "MLFLOW_BACKEND_STORE_URI": postgres.database_url(
                "mlflow", passwords["mlflow"], c.dagma_pg_port
            ),
            "MLFLOW_AUTH_CONFIG_PATH": str(c.mlflow_auth_file),
            "MLFLOW_AUTH_ADMIN_PASSWORD": passwords["mlflow_admin"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": passwords["mlflow_flask_secret"],
        }
        for name in ("DAGSTER_PG_PASSWORD", metrics.MULTIPROC_ENV):
            mlflow_env.pop(name, None)
        pg_env = {
            k: v
            for k, v in env.items()
            if not k.startswith(("DAGSTER_PG", "MLFLOW_")) and k != metrics.MULTIPROC_ENV
        }
        hostport = f"{LOOPBACK}:{c.dagma_mlflow_port}"
        extra = [self._prometheus()] if OBSERVABILITY in self.wanted_extras() else []
        return [
            Service(
                name="postgres",
                argv=postgres.server_argv(self.pg_bin, c.pg_dir, c.dagma_pg_port),
                port=c.dagma_pg_port,
                check=lambda: health.command_ok(
                    postgres.isready_argv(self.pg_bin, c.dagma_pg_port)
                ),
                url=f"postgresql://127.0.0.1:{c.dagma_pg_port}",
                env=pg_env,
                user=postgres.os_user(c.dagma_pg_os_user),
                wave=0,
            ),
            Service(
                name="metrics",
                argv=metrics_exporter.command(LOOPBACK, c.dagma_metrics_port),
                port=c.dagma_metrics_port,
                check=lambda: health.http_ok(f"{c.metrics_url}/metrics"),
                url=f"{c.metrics_url}/metrics",
                env={**pg_env, metrics.MULTIPROC_ENV: str(c.metrics_dir)},
                wave=0,
            ),
            Service(
                name="mlflow",
                argv=[
                    venv_bin("mlflow"),
                    "server",
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(c.dagma_mlflow_port),
                    "--app-name",
                    "basic-auth",
                    "--workers",
                    "1",
                    "--serve-artifacts",
                    "--artifacts-destination",
                    str(c.artifacts_dir),
                    "--allowed-hosts",
                    f"{hostport},localhost:{c.dagma_mlflow_port}",
                ],
                port=c.dagma_mlflow_port,
                check=lambda: health.http_ok(f"{c.mlflow_url}/health"),
                url=c.mlflow_url,
                env=mlflow_env,
                wave=1,
            ),
            Service(
                name="code-server",
                argv=[
                    venv_bin("python"),
                    "-m",
                    "dagma.lab.code_server",  # `dagster api grpc`, its run workers forked warm
                    "-m",
                    "dagma.definitions",
                    "-h",
                    LOOPBACK,
                    "-p",
                    str(c.dagma_grpc_port),
                    "--location-name",
                    "dagma",
                ],
                port=c.dagma_grpc_port,
                check=lambda: self._grpc_health(env),
                url=f"grpc://{LOOPBACK}:{c.dagma_grpc_port}",
                env=env,
                wave=1,
            ),
            Service(
                name="webserver",
                argv=[
                    venv_bin("dagster-webserver"),
                    "-w",
                    workspace,
                    "-h",
                    LOOPBACK,
                    "-p",
                    str(c.dagma_dagster_port),
                ],
                port=c.dagma_dagster_port,
                check=lambda: health.dagster_webserver(c.dagster_url),
                url=c.dagster_url,
                env=env,
                wave=2,
            ),
            Service(
                name="daemon",
                argv=[venv_bin("dagster-daemon"), "run", "-w", workspace],
                port=None,
                check=lambda: health.command_ok(
                    [venv_bin("dagster-daemon"), "liveness-check"], env=env
                ),
                env=env,
                wave=2,
            ),
            Service(
                name="api",
                argv=[
                    venv_bin("dagma"),
                    "serve",
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(c.dagma_api_port),
                ],
                port=c.dagma_api_port,
                check=lambda: health.http_ok(f"{c.api_url}/healthz"),
                url=c.api_url,
                env=self.api_env(env, passwords),
                wave=2,
            ),
            *extra,
        ]

    def _prometheus(self) -> Service:
        """Debian's Prometheus on the config `up` writes, scraping the exporter and the API."""
        c = self.config
        return Service(
            name="prometheus",
            argv=prometheus.argv(c),
            port=c.dagma_prometheus_port,
            check=lambda: health.http_ok(f"{c.prometheus_url}/-/ready"),
            url=c.prometheus_url,
            # Nothing of the lab's secrets; the marker lets `down` find it.
            env={MARKER: str(c.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            wave=2,
        )

    def api_env(self, env: dict[str, str], passwords: dict[str, str]) -> dict[str, str]:
        """The API's environment: the services' MLflow and the token settings that
        `dagma token issue` reads too; no database password, as it reads only through MLflow."""
        api_env = {k: v for k, v in env.items() if not k.startswith("DAGSTER_PG")}
        api_env["DAGMA_API_SECRET"] = passwords[API_SECRET]
        if self.config.dagma_oidc_issuer:
            api_env["DAGMA_OIDC_ISSUER"] = self.config.dagma_oidc_issuer
        return api_env

    def _grpc_health(self, env: dict[str, str]) -> health.Health:
        port = self.config.dagma_grpc_port
        if not port_in_use(port):
            return False, f"nothing on port {port}"
        argv = [venv_bin("dagster"), "api", "grpc-health-check", "-h", LOOPBACK, "-p", str(port)]
        return health.command_ok(argv, env=env)

    # --- up -------------------------------------------------------------------------------

    def up(self, progress: Progress = print, only: set[str] | None = None) -> list[ServiceStatus]:
        """Start whatever is not running, wave by wave, waiting for each health check."""
        c = self.config
        if OBSERVABILITY in self.wanted_extras():
            prometheus.check(c)  # before anything is created or started
        c.home.mkdir(parents=True, exist_ok=True)
        passwords = c.passwords()
        services = self.services(passwords)
        pg = services[0]
        if only is not None:
            services = [s for s in services if s.name in only]
        if pg.user and c.home.stat().st_uid == os.geteuid():
            # Postgres runs unprivileged and must traverse $DAGMA_HOME to reach its folder.
            c.home.chmod(c.home.stat().st_mode | 0o011)
        if any(s.name == "postgres" for s in services) and postgres.initdb(
            self.pg_bin, c.pg_dir, passwords["postgres"], pg.user
        ):
            progress(f"postgres: initialized a cluster in {c.pg_dir / 'data'}")
        # Last session's figures go only when none of its processes can still write them.
        fresh = not any(record_alive(r) for r in self.state.load().values())
        metrics.shared_dir_env(c.metrics_dir, fresh=fresh)
        if any(s.name == "prometheus" for s in services):
            prometheus.write_config(c)
        c.dagster_home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(
            PROJECT_ROOT / "deploy" / "services" / "dagster.yaml", c.dagster_home / "dagster.yaml"
        )
        c.artifacts_dir.mkdir(parents=True, exist_ok=True)
        write_mlflow_auth_config(c, passwords)
        for wave in sorted({s.wave for s in services}):
            batch = [s for s in services if s.wave == wave]
            for service in batch:
                if self._ensure_started(service, progress) and service.name == "postgres":
                    self._restart_pooled(progress)
            for service in batch:
                self._wait_healthy(service, progress)
            if wave == 0 and any(s.name == "postgres" for s in batch):
                postgres.bootstrap(c.dagma_pg_port, passwords)
            if wave == 1 and any(s.name == "mlflow" for s in batch):
                ensure_experiment(
                    c.mlflow_url,
                    os.environ.get("DAGMA_EXPERIMENT") or "dagma",
                    (MLFLOW_ADMIN, passwords["mlflow_admin"]),
                )
        return self.status()

    def _restart_pooled(self, progress: Progress) -> None:
        """The webserver keeps pooled Postgres connections without a pre-ping, so after a
        Postgres restart it would fail requests; stop it so its wave starts it afresh. The
        daemon and run workers connect per use, and MLflow pre-pings its pool."""
        record = self.state.load().get("webserver")
        if record and record_alive(record):
            terminate([record], timeout=20)
            self.state.drop("webserver")
            progress("webserver: restarting (its database connections died with Postgres)")

    def _ensure_started(self, service: Service, progress: Progress) -> bool:
        """Start `service` unless it runs; True when it was started now."""
        record = self.state.load().get(service.name)
        if record and record_alive(record):
            progress(f"{service.name}: already running (pid {record.pid})")
            return False
        if service.port is not None and port_in_use(service.port):
            raise ServiceError(
                f"{service.name}: port {service.port} on 127.0.0.1 is already in use by another "
                f"program. Fix: stop it, or pick another port ({self._port_var(service.name)})."
            )
        if service.name == "postgres":
            # A SIGKILLed postmaster leaves its pid file; Postgres removes it only if the pid
            # is gone, and its backends notice the death and exit within moments.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and marked_backends(self.config.pg_dir):
                time.sleep(0.3)
        log = self.config.logs_dir / f"{service.name}.log"
        record = spawn(
            service.name,
            service.argv,
            env=service.env,
            log=log,
            cwd=PROJECT_ROOT if service.user is None else self.config.pg_dir,
            user=service.user,
        )
        self.state.put(record)
        progress(f"{service.name}: started (pid {record.pid}), log {log}")
        return True

    def _port_var(self, name: str) -> str:
        return {
            "postgres": "DAGMA_PG_PORT",
            "mlflow": "DAGMA_MLFLOW_PORT",
            "code-server": "DAGMA_GRPC_PORT",
            "webserver": "DAGMA_DAGSTER_PORT",
            "api": "DAGMA_API_PORT",
            "metrics": "DAGMA_METRICS_PORT",
            "prometheus": "DAGMA_PROMETHEUS_PORT",
        }.get(name, "")

    def _wait_healthy(self, service: Service, progress: Progress) -> None:
        started = time.monotonic()
        deadline = started + self.config.dagma_services_timeout
        detail = ""
        while time.monotonic() < deadline:
            record = self.state.load().get(service.name)
            if record is None or not record_alive(record):
                raise ServiceError(
                    f"{service.name}: exited while starting. Last lines of its log "
                    f"({self.config.logs_dir / (service.name + '.log')}):\n"
                    + tail(self.config.logs_dir / f"{service.name}.log", 15)
                )
            ok, detail = service.check()
            if ok:
                progress(f"{service.name}: healthy after {time.monotonic() - started:.1f}s")
                return
            time.sleep(0.5)
        raise ServiceError(
            f"{service.name}: not healthy after {self.config.dagma_services_timeout:.0f}s "
            f"({detail}). See {self.config.logs_dir / (service.name + '.log')} or raise "
            "DAGMA_SERVICES_TIMEOUT."
        )

    # --- down / status ---------------------------------------------------------------------

    def down(self, progress: Progress = print, timeout: float = 20.0) -> list[int]:
        """Stop, in reverse order, exactly what `up` started (and their descendants)."""
        records = self.state.load()
        rest = [n for n in records if n not in DOWN_ORDER and n != "metrics"]
        for name in DOWN_ORDER + rest + ["metrics"]:
            record = records.get(name)
            if record is None:
                continue
            if record_alive(record):
                # SIGINT is Postgres' "fast" shutdown (what `pg_ctl stop -m fast` sends).
                sig = signal.SIGINT if name == "postgres" else signal.SIGTERM
                terminate([record], sig=sig, timeout=timeout)
                progress(f"{name}: stopped (pid {record.pid})")
            self.state.drop(name)
        leftovers = marked_pids(str(self.config.home))
        if leftovers:
            terminate(leftovers, timeout=5)
            progress(f"stopped {len(leftovers)} leftover process(es): {leftovers}")
        return leftovers

    def status(self) -> list[ServiceStatus]:
        records = self.state.load()
        try:
            services = self.services(self.config.passwords())
        except ServiceError as exc:
            return [ServiceStatus("postgres", None, False, False, str(exc), None, "")]
        result = []
        for service in services:
            record = records.get(service.name)
            alive = bool(record and record_alive(record))
            healthy, detail = service.check() if alive else (False, "not running")
            result.append(
                ServiceStatus(
                    name=service.name,
                    pid=record.pid if record else None,
                    alive=alive,
                    healthy=healthy,
                    detail=detail,
                    url=service.url,
                    log=str(self.config.logs_dir / f"{service.name}.log"),
                )
            )
        return result

    def records(self) -> dict[str, ProcRecord]:
        return self.state.load()


def marked_backends(pg_dir: Path) -> list[int]:
    """Postgres processes still serving `pg_dir` (a killed postmaster's orphaned backends)."""
    return [pid for pid in marked_pids(str(pg_dir.parent)) if _is_postgres(pid)]


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name == "postgres"
    except OSError:
        return False


def vector_store(
    qdrant_url: str | None, api_key: str | None, local_path: Path
) -> dict[str, object]:
    """Which vector store the lab uses: the Qdrant server when QDRANT_URL is set, else embedded."""
    if not qdrant_url:
        return {"kind": "embedded", "location": str(local_path), "healthy": True}
    import urllib.request

    request = urllib.request.Request(f"{qdrant_url.rstrip('/')}/readyz")
    if api_key:
        request.add_header("api-key", api_key)
    try:
        with urllib.request.urlopen(request, timeout=3) as response:  # nosec B310 # http(s) URL from our own settings
            ok = response.status == 200
    except OSError:
        ok = False
    return {"kind": "qdrant-server", "location": qdrant_url, "healthy": ok}


def write_mlflow_auth_config(config: ServicesConfig, passwords: dict[str, str]) -> None:
    """MLflow's basic-auth settings: users in their own Postgres database, READ by default."""
    url = postgres.database_url(
        "mlflow", passwords["mlflow"], config.dagma_pg_port, db="mlflow_auth"
    )
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {url.replace('%', '%%')}\n"  # configparser interpolates %
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path = config.mlflow_auth_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def ensure_experiment(mlflow_url: str, name: str, auth: tuple[str, str] | None = None) -> None:
    """Create the lab's experiment once, before any run: parallel steps that each create it
    on first use race on the server's unique constraint."""
    import base64
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(
        f"{mlflow_url}/api/2.0/mlflow/experiments/create",
        data=json.dumps({"name": name}).encode(),
        headers=headers,
        method="POST",
    )
    try:
        urllib.request.urlopen(request, timeout=30).close()  # nosec B310 # http(s) URL from our own settings
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        if exc.code == 401:
            raise ServiceError(
                f"mlflow: the server refused the admin credentials ({MLFLOW_ADMIN}). Its admin "
                "password is fixed on its first start: DAGMA_MLFLOW_ADMIN_PASSWORD (or "
                "mlflow_admin in services/secrets.json) no longer matches it. Fix: set it back, or "
                "change it on the server with MLflow's update-password API."
            ) from exc
        if "RESOURCE_ALREADY_EXISTS" not in body:
            raise ServiceError(f"mlflow: cannot create experiment {name!r}: {body[:300]}") from exc


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 200_000))
        data = handle.read().decode(errors="replace")
    return "\n".join(data.splitlines()[-lines:])


def iter_logs(config: ServicesConfig, name: str | None) -> Iterator[Path]:
    names = [name] if name else [*reversed(DOWN_ORDER[1:]), "metrics", "prometheus"]
    for n in names:
        path = config.logs_dir / f"{n}.log"
        if name or n != "prometheus" or path.is_file():
            yield path
