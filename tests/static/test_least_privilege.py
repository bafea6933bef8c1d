"""Least privilege in compose.yaml, the MLflow image and deploy/k8s/, checked offline.

Each check runs on the real files and on a deliberately broken copy, so a check that passes
everything would fail here. compose.yaml is read as `docker compose config` resolves it; the
Kubernetes files are read with the label conventions of the Dagster chart (1.13) and its
K8sRunLauncher, since no chart is rendered and no cluster runs here.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values

from dagma.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
EXAMPLE = dotenv_values(ROOT / ".env.example")
CODE_CLIENTS = {"user-code", "webserver", "daemon"}

# --------------------------------------------------------------------------- compose


def compose(text: str | None = None, tmp: Path | None = None) -> dict[str, Any]:
    """compose.yaml (or `text` in its place) as compose resolves it, every profile on."""
    path = ROOT / "compose.yaml"
    if text is not None and tmp is not None:
        path = tmp / "compose.yaml"
        path.write_text(text)
    done = subprocess.run(
        [Path(sys.executable).with_name("docker-compose"), "--project-directory", ROOT,
         "-f", path, "--env-file", ROOT / ".env.example", "--profile", "full",
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def app_problems(config: dict[str, Any]) -> list[str]:
    """Where the app could write: an MLflow login other than the reader, a writable mount."""
    services = config["services"]
    found = []
    env = services["app"]["environment"]
    if env.get("MLFLOW_TRACKING_USERNAME") != "reader":
        found.append(f"the app logs into MLflow as {env.get('MLFLOW_TRACKING_USERNAME')!r}")
    if env.get("MLFLOW_TRACKING_PASSWORD") != EXAMPLE["MLFLOW_READER_PASSWORD"]:
        found.append("the app's MLflow password is not MLFLOW_READER_PASSWORD")
    for volume in services["app"].get("volumes", []):
        if not volume.get("read_only"):
            found.append(f"the app mounts {volume['target']} read-write")
    mlflow = services["mlflow"]
    if mlflow["command"][:4] != ["python", "-m", "dagma.services.mlflow_users", "--"]:
        found.append("MLflow starts without creating the reader (dagma.services.mlflow_users)")
    if mlflow["environment"].get("MLFLOW_READER_PASSWORD") != EXAMPLE["MLFLOW_READER_PASSWORD"]:
        found.append("MLflow does not get MLFLOW_READER_PASSWORD")
    return found


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def code_server_reachers(config: dict[str, Any]) -> tuple[set[str], list[str]]:
    """The services that can open the code server's gRPC port, and what is wrong."""
    services, networks = config["services"], config.get("networks", {})
    code = services["user-code"]
    host = flag(code["command"], "-h")
    found = []
    on = {n: (v or {}) for n, v in code.get("networks", {"default": None}).items()}
    listening = [n for n, v in on.items() if host in v.get("aliases", [])]
    if len(listening) != 1:
        found.append(f"the code server listens on {host!r}, not a name of one network of its own")
        reach = {
            s for s, v in services.items() if set(v.get("networks", {"default": None})) & set(on)
        }
        return reach, found
    [network] = listening
    if not networks.get(network, {}).get("internal"):
        found.append(f"the network {network!r} of the code server is not internal")
    if flag(code["healthcheck"]["test"], "-h") != host:
        found.append("the code server's healthcheck does not use the name it listens on")
    workspace = yaml.safe_load((ROOT / "docker" / "prod" / "workspace.yaml").read_text())
    if workspace["load_from"][0]["grpc_server"]["host"] != host:
        found.append("docker/prod/workspace.yaml does not reach the code server by that name")
    reach = {s for s, v in services.items() if network in (v.get("networks") or {})}
    return reach, found


def test_the_app_reads_mlflow_as_reader_and_mounts_only_read_only():
    assert app_problems(compose()) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda t: t.replace("      MLFLOW_TRACKING_USERNAME: reader", "      MLFLOW_TRACKING_USERNAME: admin"),
            "logs into MLflow as 'admin'",
        ),
        (lambda t: t.replace("      - dagma-data:/data:ro", "      - dagma-data:/data"), "read-write"),
        (lambda t: t.replace("      - dagma.services.mlflow_users\n      - --\n", ""), "reader"),
    ],
)  # fmt: skip
def test_the_app_check_catches_a_writer(tmp_path, change: Callable[[str], str], problem):
    text = (ROOT / "compose.yaml").read_text()
    assert change(text) != text
    found = app_problems(compose(change(text), tmp_path))
    assert any(problem in p for p in found), found


def test_only_the_webserver_and_the_daemon_reach_the_code_server_on_an_internal_network():
    reach, found = code_server_reachers(compose())
    assert found == []
    assert reach == CODE_CLIENTS


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: t.replace('"-h", "code-server", "-p", "4000", "--location', '"-h", "0.0.0.0", "-p", "4000", "--location'), "listens on '0.0.0.0'"),
        (lambda t: t.replace("  dagster-code:\n    internal: true\n", "  dagster-code:\n"), "not internal"),
        (lambda t: t.replace("    volumes:\n      - dagma-data:/data:ro\n", "    networks: [default, dagster-code]\n    volumes:\n      - dagma-data:/data:ro\n"), "app"),
    ],
)  # fmt: skip
def test_the_code_server_check_catches_a_wider_reach(tmp_path, change, problem):
    text = (ROOT / "compose.yaml").read_text()
    assert change(text) != text
    reach, found = code_server_reachers(compose(change(text), tmp_path))
    assert any(problem in p for p in found) or problem in reach - CODE_CLIENTS, (reach, found)


def dagma_imports(module: Path) -> set[str]:
    """The dagma modules `module` imports."""
    tree = ast.parse(module.read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {n for n in names if n.split(".")[0] == "dagma"}


def image_problems(dockerfile: str) -> list[str]:
    """What the MLflow image lacks to run dagma.services.mlflow_users."""
    copied = {
        src for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for src in line.split()[:-1]
    }
    needed = {"src/dagma/services/mlflow_users.py"}
    for name in dagma_imports(ROOT / "src/dagma/services/mlflow_users.py") | {"dagma.services"}:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = ROOT / "src" / Path(*parts[:i])
            path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            needed.add(str(path.relative_to(ROOT)))
    missing = sorted(needed - copied)
    found = [f"the MLflow image does not copy {m}" for m in missing]
    if "ENV PYTHONPATH=/opt/dagma" not in dockerfile:
        found.append("the MLflow image does not put /opt/dagma on PYTHONPATH")
    return found


def test_the_mlflow_image_holds_what_creates_the_reader():
    dockerfile = (ROOT / "docker" / "mlflow" / "Dockerfile").read_text()
    assert image_problems(dockerfile) == []
    broken = dockerfile.replace(" src/dagma/errors.py", "")
    assert broken != dockerfile
    assert any("src/dagma/errors.py" in p for p in image_problems(broken))


# --------------------------------------------------------------------------- Kubernetes

# The pods of the release `dagma`, with the labels the Dagster chart and K8sRunLauncher give
# them (helm/dagster templates: selector labels + `component`; dagster_k8s.job: common labels +
# app.kubernetes.io/component), and other pods of the namespace.
RELEASE = {"app.kubernetes.io/instance": "dagma"}
PODS = {
    "user-code": {**RELEASE, "app.kubernetes.io/name": "dagster-user-deployments", "component": "user-deployments", "deployment": "dagma"},
    "webserver": {**RELEASE, "app.kubernetes.io/name": "dagster", "component": "dagster-webserver"},
    "daemon": {**RELEASE, "app.kubernetes.io/name": "dagster", "component": "dagster-daemon"},
    "run": {"app.kubernetes.io/instance": "dagster", "app.kubernetes.io/part-of": "dagster", "app.kubernetes.io/component": "run_worker", "dagster/run-id": "abc"},
    "mlflow": {"app.kubernetes.io/name": "mlflow", "app.kubernetes.io/part-of": "dagma"},
    "qdrant": {"app.kubernetes.io/name": "qdrant", "app.kubernetes.io/instance": "qdrant"},
    "app": {"app.kubernetes.io/name": "dagma-app", "app.kubernetes.io/part-of": "dagma"},
}  # fmt: skip
NETWORK_POLICY_SPEC = {"podSelector", "policyTypes", "ingress", "egress"}


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes' label selector: matchLabels and matchExpressions; {} selects every pod."""
    if selector is None:
        return False
    unknown = set(selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ValueError(f"unknown selector keys {unknown}")
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def reachers(policy: dict[str, Any], port: int) -> tuple[set[str], list[str]]:
    """Which PODS may open `port` on the pods the policy selects, and what is malformed."""
    found = []
    if policy.get("apiVersion") != "networking.k8s.io/v1" or policy.get("kind") != "NetworkPolicy":
        found.append("not a networking.k8s.io/v1 NetworkPolicy")
    spec = policy.get("spec") or {}
    if set(spec) - NETWORK_POLICY_SPEC:
        found.append(f"unknown spec keys {sorted(set(spec) - NETWORK_POLICY_SPEC)}")
    if not selects(spec.get("podSelector"), PODS["user-code"]):
        found.append("the policy does not select the code location's pods")
        return set(PODS), found
    if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
        found.append("the policy does not restrict ingress")
        return set(PODS), found
    allowed: set[str] = set()
    for rule in spec.get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") in (port, None) for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            found.append("an ingress rule without `from` admits every source")
            allowed |= set(PODS)
        for peer in peers or []:
            if "ipBlock" in peer or "namespaceSelector" in peer:
                found.append("an ingress rule admits other namespaces or addresses")
            allowed |= {
                name for name, labels in PODS.items() if selects(peer.get("podSelector"), labels)
            }
    return allowed, found


def load_policy() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "code-server-policy.yaml").read_text()))


def code_port() -> int:
    values = yaml.safe_load((K8S / "dagster-values.yaml").read_text())
    return int(values["dagster-user-deployments"]["deployments"][0]["port"])


def test_the_network_policy_admits_only_dagster_to_the_code_server():
    allowed, found = reachers(load_policy(), code_port())
    assert found == []
    assert allowed == {"webserver", "daemon", "run"}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda p: p["spec"]["ingress"][0].pop("from"), "admits every source"),
        (lambda p: p["spec"]["ingress"][0]["from"].append({"podSelector": {}}), "app"),
        (lambda p: p["spec"]["podSelector"]["matchLabels"].update(component="user-deployment"), "does not select"),
        (lambda p: p["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}), "other namespaces"),
        (lambda p: p["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].update(component="webserver"), "webserver"),
    ],
)  # fmt: skip
def test_the_network_policy_check_catches_a_wider_or_wrong_policy(change, problem):
    policy = copy.deepcopy(load_policy())
    change(policy)
    allowed, found = reachers(policy, code_port())
    wrong = allowed ^ {"webserver", "daemon", "run"}
    assert any(problem in p for p in found) or problem in wrong, (allowed, found)


def storage_problems(values: dict[str, Any], claims: list[dict[str, Any]]) -> list[str]:
    """Whether every pod that runs steps stores values where the next run's pod finds them."""
    found = []
    [deployment] = values["dagster-user-deployments"]["deployments"]
    dagster_home = values["global"]["dagsterHome"]  # the chart's DAGSTER_HOME, in every pod
    env = {e["name"]: e["value"] for e in deployment.get("env", []) if "value" in e}
    storage = Settings(
        dagster_home=Path(dagster_home), dagma_home=Path(env.get("DAGMA_HOME", ".dagma"))
    ).storage_dir
    rwx = {
        c["metadata"]["name"]
        for c in claims
        if c.get("kind") == "PersistentVolumeClaim"
        and c["spec"].get("accessModes") == ["ReadWriteMany"]
    }
    volumes = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in deployment.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    mounts = [m for m in deployment.get("volumeMounts", []) if Path(m["mountPath"]) == storage]
    if not mounts or volumes.get(mounts[0]["name"]) not in rwx:
        found.append(f"the code location does not mount a ReadWriteMany claim at {storage}")
    if (deployment.get("includeConfigInLaunchedRuns") or {}).get("enabled", True) is False:
        found.append(
            "run pods do not get the code location's volumes (includeConfigInLaunchedRuns)"
        )
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    pod_spec = launcher.get("runK8sConfig", {}).get("podSpecConfig", {})
    again = {v["name"] for v in launcher.get("volumes", []) + pod_spec.get("volumes", [])}
    if again & set(volumes):
        found.append(
            f"the run launcher lists {sorted(again & set(volumes))} again: duplicate volumes"
        )
    return found


def load_claims() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / "dagma-storage.yaml").read_text()) if d]


def test_runs_share_the_values_on_a_read_write_many_claim():
    values = yaml.safe_load((K8S / "dagster-values.yaml").read_text())
    assert storage_problems(values, load_claims()) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda v, c: c[0]["spec"].update(accessModes=["ReadWriteOnce"]), "ReadWriteMany"),
        (lambda v, c: v["global"].update(dagsterHome="/opt/dagster/home"), "/opt/dagster/home/storage"),
        (lambda v, c: v["dagster-user-deployments"]["deployments"][0]["volumeMounts"].pop(0), "does not mount"),
        (lambda v, c: v["dagster-user-deployments"]["deployments"][0].update(includeConfigInLaunchedRuns={"enabled": False}), "run pods"),
        (lambda v, c: v["runLauncher"]["config"]["k8sRunLauncher"].update(volumes=[{"name": "dagma-data"}]), "duplicate"),
    ],
)  # fmt: skip
def test_the_storage_check_catches_runs_that_would_not_share(change, problem):
    values = copy.deepcopy(yaml.safe_load((K8S / "dagster-values.yaml").read_text()))
    claims = copy.deepcopy(load_claims())
    change(values, claims)
    found = storage_problems(values, claims)
    assert any(problem in p for p in found), found


def test_kubernetes_mlflow_creates_the_reader_from_a_secret():
    [deployment] = [
        d
        for d in yaml.safe_load_all((K8S / "mlflow.yaml").read_text())
        if d and d["kind"] == "Deployment"
    ]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][:4] == ["python", "-m", "dagma.services.mlflow_users", "--"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_READER_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "reader-password"
