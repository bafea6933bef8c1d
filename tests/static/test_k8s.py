"""deploy/k8s/ checked offline: no cluster and no chart download here, so the values are
checked against the keys the charts document (Dagster 1.13's and Qdrant's values schema) and
against the rules the charts enforce when they render."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"

# The Dagster chart's top-level keys (helm/dagster/values.yaml of 1.13).
DAGSTER_KEYS = {
    "global", "nameOverride", "fullnameOverride", "rbacEnabled", "imagePullSecrets",
    "serviceAccount", "dagsterWebserver", "computeLogManager", "pythonLogs",
    "dagster-user-deployments", "pipelineRun", "runLauncher", "postgresql",
    "generatePostgresqlPasswordSecret", "generateCeleryConfigSecret", "rabbitmq", "redis",
    "flower", "ingress", "dagsterDaemon", "busybox", "extraManifests", "scheduleStorage",
    "runStorage", "eventLogStorage", "retention", "concurrency", "telemetry",
    "additionalInstanceConfig",
}  # fmt: skip
USER_DEPLOYMENT_KEYS = {
    "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
    "deploymentNamespace", "port", "env", "envConfigMaps", "envSecrets", "annotations",
    "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext",
    "resources", "livenessProbe", "readinessProbe", "startupProbe", "labels", "volumes",
    "volumeMounts", "service", "replicaCount", "initContainers", "sidecarContainers",
    "schedulerName",
}  # fmt: skip
RUN_LAUNCHERS = {"K8sRunLauncher", "CeleryK8sRunLauncher", "CustomRunLauncher"}
# Qdrant chart's values.schema.json, top level.
QDRANT_KEYS = {
    "replicaCount", "image", "imagePullSecrets", "nameOverride", "fullnameOverride", "args",
    "env", "service", "ingress", "livenessProbe", "readinessProbe", "startupProbe",
    "additionalLabels", "additionalAnnotations", "podAnnotations", "podLabels", "resources",
    "containerSecurityContext", "podSecurityContext", "lifecycle", "updateVolumeFsOwnership",
    "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "persistence",
    "snapshotPersistence", "snapshotRestoration", "config", "sidecarContainers", "metrics",
    "serviceAccount", "priorityClassName", "shareProcessNamespace",
    "terminationGracePeriodSeconds", "podManagementPolicy", "podDisruptionBudget", "apiKey",
    "readOnlyApiKey", "additionalVolumes", "additionalVolumeMounts", "chartTests",
}  # fmt: skip
SECRET_WORDS = ("password", "secret", "token", "apikey", "api_key", "access_key")


def load(name: str) -> Any:
    return yaml.safe_load((K8S / name).read_text())


def dig(values: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def dagster_problems(values: dict) -> list[str]:
    """What the Dagster chart would reject or what would break our deployment."""
    found = [f"unknown top-level key {k!r}" for k in sorted(set(values) - DAGSTER_KEYS)]
    deployments = dig(values, "dagster-user-deployments.deployments") or []
    if not dig(values, "dagster-user-deployments.enabled") or not deployments:
        found.append("dagster-user-deployments must be enabled with our code location")
    for d in deployments:
        found += [f"deployment key {k!r} unknown" for k in sorted(set(d) - USER_DEPLOYMENT_KEYS)]
        for key in ("name", "image", "dagsterApiGrpcArgs", "port"):
            if key not in d:
                found.append(f"deployment {d.get('name')!r} lacks {key!r}")
        image = d.get("image") or {}
        if not image.get("tag") or image.get("tag") == "latest":
            found.append(f"deployment {d.get('name')!r}: pin the image tag")
        args = d.get("dagsterApiGrpcArgs") or []
        if "-m" in args and importlib.util.find_spec(args[args.index("-m") + 1]) is None:
            found.append(
                f"deployment {d.get('name')!r}: module {args[args.index('-m') + 1]} not found"
            )
    if dig(values, "runLauncher.type") not in RUN_LAUNCHERS:
        found.append("runLauncher.type must be one of the chart's launchers")
    if dig(values, "runLauncher.type") == "K8sRunLauncher" and not dig(
        values, "runLauncher.config.k8sRunLauncher"
    ):
        found.append("runLauncher.config.k8sRunLauncher is missing")
    if dig(values, "postgresql.enabled") is False:
        for key in ("postgresqlHost", "postgresqlUsername", "postgresqlDatabase", "service"):
            if dig(values, f"postgresql.{key}") is None:
                found.append(f"an external Postgres needs postgresql.{key}")
        if not dig(values, "global.postgresqlSecretName"):
            found.append("global.postgresqlSecretName must name the password's Secret")
    if dig(values, "postgresql.postgresqlPassword"):
        found.append("postgresql.postgresqlPassword is a secret: use the Secret instead")
    qrc = "dagsterDaemon.runCoordinator.config.queuedRunCoordinator"
    # The chart's own `fail`: one run limit, set in one place.
    if (
        dig(values, "concurrency.runs.maxConcurrentRuns") is not None
        and dig(values, f"{qrc}.maxConcurrentRuns") is not None
    ):
        found.append("set maxConcurrentRuns in concurrency.runs or the run coordinator, not both")
    if dig(values, "concurrency.pools.defaultLimit") != 1:
        found.append("concurrency.pools.defaultLimit must be 1: one writer per collection")
    return found


def test_dagster_values_fit_the_chart_and_our_deployment():
    values = load("dagster-values.yaml")
    assert dagster_problems(values) == []
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "dagma.definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] >= 1


def test_the_chart_version_is_the_dagster_we_lock():
    text = (K8S / "dagster-values.yaml").read_text()
    assert f"--version {importlib.metadata.version('dagster')}" in text


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda v: v.update(runLaunchr={}), "unknown top-level key 'runLaunchr'"),
        (
            lambda v: v["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"].update(
                maxConcurrentRuns=4
            ),
            "not both",
        ),
        (
            lambda v: v["postgresql"].update(postgresqlPassword="hunter2"),
            "is a secret",
        ),  # pragma: allowlist secret
        (
            lambda v: v["dagster-user-deployments"]["deployments"][0]["image"].update(tag="latest"),
            "pin",
        ),
        (
            lambda v: v["dagster-user-deployments"]["deployments"][0].update(
                dagsterApiGrpcArgs=["-m", "dagma.nope"]
            ),
            "not found",
        ),
        (lambda v: v["concurrency"]["pools"].update(defaultLimit=4), "one writer"),
    ],
)
def test_the_check_catches_what_the_chart_or_the_deployment_would_reject(change, problem):
    values = copy.deepcopy(load("dagster-values.yaml"))
    change(values)
    assert any(problem in p for p in dagster_problems(values)), dagster_problems(values)


def test_qdrant_values_are_distributed_replicated_and_keyed():
    values = load("qdrant-values.yaml")
    assert set(values) <= QDRANT_KEYS, set(values) - QDRANT_KEYS
    assert values["replicaCount"] >= 3 and values["config"]["cluster"]["enabled"] is True
    assert values["config"]["storage"]["collection"]["replication_factor"] >= 2
    assert values["apiKey"] is True and values["readOnlyApiKey"] is True  # generated Secrets
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["qdrant"]["image"].endswith(":" + values["image"]["tag"])


def test_mlflow_runs_on_postgres_and_s3_behind_basic_auth_with_secrets_from_a_secret():
    documents = [d for d in yaml.safe_load_all((K8S / "mlflow.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in documents}
    assert set(kinds) == {"Deployment", "ConfigMap", "Service"}
    [container] = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(":" + importlib.metadata.version("mlflow"))
    args = container["args"]
    assert "--app-name=basic-auth" in args and "--artifacts-destination=s3://mlflow" in args
    env = {e["name"]: e for e in container["env"]}
    for name, entry in env.items():
        if any(word in name.lower() for word in SECRET_WORDS) or name.endswith(
            ("_URI", "PGPASSWORD")
        ):
            assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name} must come from a Secret"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    ini = kinds["ConfigMap"]["data"]["basic_auth.ini"]
    assert "mlflow_auth" in ini and ":" not in ini.split("//", 1)[1].split("@")[0]  # no password
    assert kinds["Service"]["spec"]["type"] == "ClusterIP"
