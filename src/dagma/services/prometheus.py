"""Prometheus for `dagma services up --with observability`: Debian's binary, a config generated
under $DAGMA_HOME/services/prometheus, its database beside it."""

from __future__ import annotations

import os
import re
import subprocess  # nosec B404 # we run argv lists we build, never a shell
from functools import lru_cache
from pathlib import Path

import yaml

from dagma.services.config import LOOPBACK, PROJECT_ROOT, ServicesConfig
from dagma.services.procs import ServiceError

DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")  # Prometheus' duration syntax
ALERT_RULES = PROJECT_ROOT / "deploy" / "observability" / "prometheus" / "alerts.yml"


def argv(config: ServicesConfig) -> list[str]:
    binary = str(config.dagma_prometheus_bin)
    found = [
        binary,
        f"--config.file={config.prometheus_dir / 'prometheus.yml'}",
        f"--storage.tsdb.path={config.prometheus_dir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{config.dagma_prometheus_port}",
    ]
    if "--storage.tsdb.use-lockfile" in flags(binary):
        # Debian's build takes no lock unless asked; with it a second Prometheus on the same
        # data refuses to start. A killed one's lock is a flock, which the kernel releases.
        found.append("--storage.tsdb.use-lockfile")
    return found


@lru_cache(maxsize=4)
def flags(binary: str) -> str:
    """`prometheus --help`: the flags this build has."""
    try:
        done = subprocess.run(  # nosec B603 # our argv, no shell
            [binary, "--help"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return ""
    return done.stdout + done.stderr


def check(config: ServicesConfig) -> None:
    """Refuse `--with observability` without Prometheus or with a bad interval, naming the fix."""
    binary = config.dagma_prometheus_bin
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ServiceError(
            f"prometheus: {binary} not found, and `--with observability` runs it. Fix: "
            "`apt-get install prometheus` (Debian's package), or point DAGMA_PROMETHEUS_BIN at "
            "another Prometheus binary."
        )
    interval = config.dagma_prometheus_scrape_interval
    if not DURATION.fullmatch(interval):
        raise ServiceError(
            f"prometheus: DAGMA_PROMETHEUS_SCRAPE_INTERVAL={interval!r} is not a Prometheus "
            "duration. Fix: a number and a unit, e.g. 5s, 500ms or 1m."
        )


def write_config(config: ServicesConfig) -> Path:
    """Prometheus' config for this home: the exporter (job `dagma`, every service's figures),
    the API's liveness (job `dagma-api`) and Prometheus itself; the repository's alert rules."""

    def job(name: str, port: int, **more: object) -> dict[str, object]:
        return {"job_name": name, "static_configs": [{"targets": [f"{LOOPBACK}:{port}"]}], **more}

    interval = config.dagma_prometheus_scrape_interval
    document: dict[str, object] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            job("dagma", config.dagma_metrics_port),
            # The API writes into the shared folder too, so its own /metrics repeats the
            # exporter's figures: keep only its `up`, or every sum would count them twice.
            job(
                "dagma-api",
                config.dagma_api_port,
                metric_relabel_configs=[
                    {"source_labels": ["__name__"], "regex": ".+", "action": "drop"}
                ],
            ),
            job("prometheus", config.dagma_prometheus_port),
        ],
    }
    if ALERT_RULES.is_file():
        document["rule_files"] = [str(ALERT_RULES)]
    path = config.prometheus_dir / "prometheus.yml"
    (config.prometheus_dir / "data").mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by `dagma services up --with observability` on every start; edits are lost.\n"
        + yaml.safe_dump(document, sort_keys=False)
    )
    return path
