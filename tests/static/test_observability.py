"""The compose observability profile checked offline: deploy/observability/ and compose.yaml.

No Grafana, Loki, Alloy or collector binary is available here, so their files are checked
structurally; Prometheus's are checked by Debian's promtool (`check config`, `check rules`, and
`test rules`, which evaluates the alerts on made-up series). Every metric name a dashboard or an
alert queries must be one `dagma.lib.telemetry.metrics` exports. Each check also runs on a
deliberately broken copy, so a check that passes everything would fail here.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values

from dagma.env_secrets import init as secrets_init
from dagma.lib.telemetry.metrics import exported_series
from tests.conftest import require
from tests.test_secrets import copy_for_host

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "deploy" / "observability"
PROMETHEUS = OBS / "prometheus" / "prometheus.yml"
ALERTS = OBS / "prometheus" / "alerts.yml"
DASHBOARDS = OBS / "grafana" / "dashboards"
LAB_DASHBOARD = DASHBOARDS / "dagma-lab.json"
DATASOURCES = OBS / "grafana" / "provisioning" / "datasources"
PROVIDERS = OBS / "grafana" / "provisioning" / "dashboards"
COLLECTOR = OBS / "otel-collector"
EXAMPLE = dotenv_values(ROOT / ".env.example")
OBSERVABILITY = {"prometheus", "grafana", "loki", "alloy", "otel-collector"}
# The services that run Dagma code and so send traces when asked to.
TRACED = {"api", "user-code", "daemon", "webserver", "app"}
# Prometheus's own series, for its self-scrape; nothing else outside the lab's registry.
ALLOWED_SERIES = {"up"}
ALLOWED_PREFIXES = ("prometheus_",)
PINNED = re.compile(r"[\w./-]+:v?\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?")
# The other services' images: a release, not `latest` or a bare major (MinIO tags by date).
RELEASED = re.compile(r"[\w./-]+:(v?\d+\.\d+[\w.-]*|RELEASE\.[\w-]+)(@sha256:[0-9a-f]{64})?")
PANEL_TYPES = {"timeseries", "stat", "logs"}

# --------------------------------------------------------------------------- compose


def compose(
    path: Path = ROOT / "compose.yaml",
    profiles: tuple[str, ...] = ("observability", "full"),
    **env: str,
) -> dict[str, Any]:
    """compose.yaml as `docker compose --profile observability --profile full config` resolves it."""
    done = subprocess.run(
        [Path(sys.executable).with_name("docker-compose"), "--project-directory", ROOT,
         "-f", path, "--env-file", ROOT / ".env.example",
         *(arg for profile in profiles for arg in ("--profile", profile)),
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose()


def flags_of(argv: list[str]) -> dict[str, str]:
    """`--name=value` arguments as a dict."""
    return dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))


def mounted(service: dict[str, Any], source: Path) -> str | None:
    """Where `service` mounts the host path `source` (read-only), if it does."""
    for volume in service.get("volumes", []):
        if volume.get("type") == "bind" and Path(volume["source"]) == source:
            return str(volume["target"]) if volume.get("read_only") else None
    return None


def compose_problems(config: dict[str, Any]) -> list[str]:
    """What is wrong with the observability services: images, ports, Grafana's login, mounts."""
    services = config["services"]
    found = [f"compose.yaml has no {name} service" for name in OBSERVABILITY - set(services)]
    built = {s["image"] for s in services.values() if "build" in s}
    for name, service in services.items():
        image = service.get("image", "")
        if name in OBSERVABILITY and not PINNED.fullmatch(image):
            found.append(f"{name}'s image {image!r} is not pinned to an exact x.y.z version")
        elif image not in built and not RELEASED.fullmatch(image):
            found.append(f"{name}'s image {image!r} is not pinned to a release")
        for port in service.get("ports", []):
            if port.get("host_ip") != "127.0.0.1":
                found.append(f"{name} publishes port {port.get('target')} beyond 127.0.0.1")
        sockets = [v for v in service.get("volumes", []) if "docker.sock" in str(v.get("source"))]
        if sockets and name != "alloy":
            found.append(f"{name} mounts the Docker socket")
        if any(not v.get("read_only") for v in sockets):
            found.append(f"{name} mounts the Docker socket writable")
    for name in OBSERVABILITY & set(services):
        if "observability" not in services[name].get("profiles", []):
            found.append(f"{name} is not in the observability profile")
    grafana = services.get("grafana", {}).get("environment", {})
    if grafana.get("GF_SECURITY_ADMIN_PASSWORD") != EXAMPLE.get("GRAFANA_ADMIN_PASSWORD"):
        found.append("Grafana's admin password is not GRAFANA_ADMIN_PASSWORD from .env")
    if str(grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() != "false":
        found.append("Grafana lets anonymous users in")
    if str(grafana.get("GF_AUTH_DISABLE_LOGIN_FORM", "false")).lower() != "false":
        found.append("Grafana's login form is off")
    if str(grafana.get("GF_USERS_ALLOW_SIGN_UP", "true")).lower() != "false":
        found.append("Grafana lets anyone sign up")
    prometheus = services.get("prometheus", {})
    rules = yaml.safe_load(PROMETHEUS.read_text()).get("rule_files", [])
    if mounted(prometheus, PROMETHEUS) is None or mounted(prometheus, ALERTS) not in rules:
        found.append("Prometheus does not mount prometheus.yml and alerts.yml where it reads them")
    for name in TRACED & set(services):
        if "OTEL_EXPORTER_OTLP_ENDPOINT" not in services[name].get("environment", {}):
            found.append(f"{name} has no OTEL_EXPORTER_OTLP_ENDPOINT (DAGMA_OTLP_ENDPOINT)")
    return found


def scrape_problems(prometheus: dict[str, Any], services: dict[str, Any]) -> list[str]:
    """Scrape targets that are no compose service, and an exporter job on the wrong port."""
    found = []
    for job in prometheus.get("scrape_configs", []):
        hosts = [
            target.rpartition(":")[::2]
            for static in job.get("static_configs", [])
            for target in static.get("targets", [])
        ]
        hosts += [
            (n, str(d.get("port"))) for d in job.get("dns_sd_configs", []) for n in d["names"]
        ]
        for host, port in hosts:
            if host != "localhost" and host not in services:
                found.append(f"job {job['job_name']} scrapes {host!r}, which is no compose service")
                continue
            command = services.get(host, {}).get("command") or []
            if "dagma.services.metrics_exporter" in command and port != command[-1]:
                found.append(f"job {job['job_name']} scrapes {host}:{port}, not its --port")
    return found


def test_the_observability_profile_resolves_pinned_and_loopback_only(config):
    assert compose_problems(config) == []
    alone = compose(profiles=("observability",))["services"]
    assert OBSERVABILITY | {"metrics"} <= set(alone) and "traefik" not in alone
    assert not OBSERVABILITY & set(compose(profiles=("full",))["services"])
    assert scrape_problems(yaml.safe_load(PROMETHEUS.read_text()), config["services"]) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('"metrics:58100"', '"metric:58100"', "'metric', which is no compose service"),
        ('"metrics:58100"', '"metrics:9464"', "not its --port"),
        ("names: [api]", "names: [dagma-api]", "'dagma-api'"),
    ],
)
def test_the_scrape_check_rejects_a_broken_copy(config, old, new, problem):
    text = PROMETHEUS.read_text()
    assert old in text
    found = scrape_problems(yaml.safe_load(text.replace(old, new)), config["services"])
    assert any(problem in p for p in found), found


COMPOSE_BREAKS = [
    (lambda t: t.replace("image: grafana/grafana:13.2.0", "image: grafana/grafana:13"), "not pinned"),
    (lambda t: t.replace("image: prom/prometheus:v3.13.2", "image: prom/prometheus:latest"), "not pinned"),
    (lambda t: t.replace("image: postgres:16.10-bookworm", "image: postgres:16"), "not pinned to a release"),
    (lambda t: t.replace('"127.0.0.1:${DAGMA_GRAFANA_PORT:-53100}:3000"', '"${DAGMA_GRAFANA_PORT:-53100}:3000"'), "beyond 127.0.0.1"),
    (lambda t: t.replace('GF_AUTH_ANONYMOUS_ENABLED: "false"', 'GF_AUTH_ANONYMOUS_ENABLED: "true"'), "anonymous"),
    (lambda t: t.replace("${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD in .env}", "admin"), "admin password"),
    (lambda t: t.replace("target: /var/run/docker.sock, read_only: true", "target: /var/run/docker.sock, read_only: false"), "writable"),
    (lambda t: t.replace("target: /etc/prometheus/alerts.yml", "target: /etc/prometheus/rules.yml"), "alerts.yml"),
    (lambda t: t.replace("      OTEL_EXPORTER_OTLP_ENDPOINT: ${DAGMA_OTLP_ENDPOINT:-}\n      OTEL_SERVICE_NAME: dagma-api\n", ""), "api has no OTEL"),
    (lambda t: t.replace("    profiles: [observability]\n    restart: unless-stopped\n    command: [\"-config", "    restart: unless-stopped\n    command: [\"-config"), "loki is not in the observability profile"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "problem"), COMPOSE_BREAKS)
def test_the_compose_check_rejects_a_broken_copy(tmp_path, change: Callable[[str], str], problem):
    text = (ROOT / "compose.yaml").read_text()
    assert change(text) != text
    (tmp_path / "compose.yaml").write_text(change(text))
    found = compose_problems(compose(tmp_path / "compose.yaml"))
    assert any(problem in p for p in found), found


def test_tracing_is_off_by_default_and_reaches_the_collector_when_asked(config):
    """Empty OTEL_EXPORTER_OTLP_ENDPOINT is off in Dagma; the documented value is the collector's."""
    assert {
        config["services"][s]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] for s in TRACED
    } == {""}
    documented = re.search(
        r"^# DAGMA_OTLP_ENDPOINT=(\S+)$", (ROOT / ".env.example").read_text(), re.M
    )
    assert documented, ".env.example does not document DAGMA_OTLP_ENDPOINT"
    on = compose(DAGMA_OTLP_ENDPOINT=documented.group(1))["services"]
    url = urlsplit(documented.group(1))
    collector = collector_config("debug")
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert url.hostname in on and url.port == int(http.rsplit(":", 1)[1])
    assert url.hostname == "otel-collector"
    for name in TRACED:
        assert on[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == documented.group(1)


def test_the_code_server_shares_its_figures_with_the_exporter_when_asked(config):
    """Off by default (an empty folder records nothing); the documented folder is the exporter's,
    on the volume both mount."""
    assert config["services"]["user-code"]["environment"]["PROMETHEUS_MULTIPROC_DIR"] == ""
    example = (ROOT / ".env.example").read_text()
    documented = re.search(r"^# DAGMA_COMPOSE_METRICS_DIR=(\S+)$", example, re.M)
    assert documented, ".env.example does not document DAGMA_COMPOSE_METRICS_DIR"
    services = compose(DAGMA_COMPOSE_METRICS_DIR=documented.group(1))["services"]
    code, exporter = services["user-code"], services["metrics"]
    folder = exporter["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert code["environment"]["PROMETHEUS_MULTIPROC_DIR"] == folder == documented.group(1)

    def volume(service: dict[str, Any]) -> str:
        [found] = [v["source"] for v in service["volumes"] if folder.startswith(v["target"] + "/")]
        return str(found)

    assert volume(code) == volume(exporter) == "dagma-data"


def test_the_app_reads_the_profiles_prometheus_when_asked(config):
    assert config["services"]["app"]["environment"]["DAGMA_PROMETHEUS_URL"] == ""
    example = (ROOT / ".env.example").read_text()
    documented = re.search(r"^# DAGMA_COMPOSE_PROMETHEUS_URL=(\S+)$", example, re.M)
    assert documented, ".env.example does not document DAGMA_COMPOSE_PROMETHEUS_URL"
    services = compose(DAGMA_COMPOSE_PROMETHEUS_URL=documented.group(1))["services"]
    url = urlsplit(services["app"]["environment"]["DAGMA_PROMETHEUS_URL"])
    listen = flags_of(services["prometheus"]["command"])["web.listen-address"]
    assert url.hostname == "prometheus" and f":{url.port}" == listen


FAKE_DOCKER = """#!/bin/sh
[ "$1 $2" = "compose version" ] && exit 0
echo "$@" >> "$(dirname "$0")/calls"
"""


@pytest.mark.parametrize("group", ["minimal", "vector"])
@pytest.mark.parametrize("on", [True, False])
def test_start_env_adds_the_profile_to_any_group_when_asked(tmp_path, group, on):
    bin_dir = copy_for_host(tmp_path, "scripts/start_env.sh", ".env.example")
    secrets_init(tmp_path / ".env", environ={})
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(bin_dir)}
    done = subprocess.run(
        ["/bin/bash", tmp_path / "scripts" / "start_env.sh", group],
        capture_output=True, text=True, timeout=60,
        env=env | ({"DAGMA_OBSERVABILITY": "1"} if on else {}),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [call] = (bin_dir / "calls").read_text().splitlines()
    assert ("--profile observability" in call) is on, call
    assert (f"--profile {group}" in call) is (group != "minimal"), call


# --------------------------------------------------------------------------- Grafana


def load_yaml_dir(folder: Path) -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.y*ml"))]


def datasource_problems(docs: list[dict[str, Any]], services: dict[str, Any]) -> list[str]:
    """Grafana's datasource provisioning: apiVersion, the fields it requires, reachable URLs."""
    found, uids, default = [], set(), 0
    for doc in docs:
        if doc.get("apiVersion") != 1:
            found.append(f"a datasource file has apiVersion {doc.get('apiVersion')!r}, not 1")
        for ds in doc.get("datasources") or []:
            name = ds.get("name")
            missing = [k for k in ("name", "type", "uid", "url", "access") if not ds.get(k)]
            if missing:
                found.append(f"datasource {name!r} lacks {missing}")
            if ds.get("access") not in ("proxy", "direct"):
                found.append(f"datasource {name!r} has access {ds.get('access')!r}")
            if ds.get("uid") in uids:
                found.append(f"datasource uid {ds.get('uid')!r} is used twice")
            uids.add(ds.get("uid"))
            default += bool(ds.get("isDefault"))
            url = urlsplit(str(ds.get("url", "")))
            if url.hostname not in services:
                found.append(f"datasource {name!r} points at {url.hostname!r}, no compose service")
    if default != 1:
        found.append(f"{default} datasources are the default, not one")
    return found


def datasources() -> dict[str, str]:
    """uid -> type of every provisioned datasource."""
    return {
        ds["uid"]: ds["type"]
        for doc in load_yaml_dir(DATASOURCES)
        for ds in doc.get("datasources") or []
    }


def provider_problems(docs: list[dict[str, Any]], grafana: dict[str, Any]) -> list[str]:
    """Grafana's dashboard providers: file providers whose path is the mounted dashboards."""
    found = []
    where = mounted(grafana, DASHBOARDS)
    providers = [p for doc in docs for p in doc.get("providers") or []]
    if not providers:
        found.append("no dashboard provider")
    for doc in docs:
        if doc.get("apiVersion") != 1:
            found.append(f"a dashboard provider file has apiVersion {doc.get('apiVersion')!r}")
    for provider in providers:
        if not provider.get("name") or provider.get("type") != "file":
            found.append(f"provider {provider.get('name')!r} is not a named file provider")
        path = (provider.get("options") or {}).get("path")
        if path is None or path != where:
            found.append(
                f"provider path {path!r} is not where compose mounts the dashboards ({where})"
            )
    home = grafana.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    if where is None or home != f"{where}/{LAB_DASHBOARD.name}":
        found.append(f"Grafana's home dashboard {home!r} is not {LAB_DASHBOARD.name}")
    return found


def test_grafana_provisioning_is_well_formed(config):
    services = config["services"]
    assert datasource_problems(load_yaml_dir(DATASOURCES), services) == []
    assert provider_problems(load_yaml_dir(PROVIDERS), services["grafana"]) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d[0]["datasources"][1].update(uid="prometheus"), "used twice"),
        (lambda d: d[0]["datasources"][0].pop("url"), "lacks ['url']"),
        (lambda d: d[0]["datasources"][1].update(url="http://loky:3100"), "'loky'"),
        (lambda d: d[0]["datasources"][1].update(isDefault=True), "2 datasources"),
        (lambda d: d[0].update(apiVersion=2), "apiVersion 2"),
    ],
)
def test_the_datasource_check_rejects_a_broken_copy(config, change, problem):
    docs = copy.deepcopy(load_yaml_dir(DATASOURCES))
    change(docs)
    found = datasource_problems(docs, config["services"])
    assert any(problem in p for p in found), found


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d[0]["providers"][0]["options"].update(path="/var/lib/grafana/dashboards"), "provider path"),
        (lambda d: d[0]["providers"][0].update(type="folder"), "not a named file provider"),
        (lambda d: d[0].update(providers=[]), "no dashboard provider"),
    ],
)  # fmt: skip
def test_the_provider_check_rejects_a_broken_copy(config, change, problem):
    docs = copy.deepcopy(load_yaml_dir(PROVIDERS))
    change(docs)
    found = provider_problems(docs, config["services"]["grafana"])
    assert any(problem in p for p in found), found


def overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def dashboard_problems(dashboard: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """A Grafana dashboard model: uid, schemaVersion, panels with unique ids, a place on the grid,
    a unit, and datasource references that exist."""
    found = []
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        found.append(f"schemaVersion {dashboard.get('schemaVersion')!r} is not a current one")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", str(dashboard.get("uid", ""))):
        found.append(f"uid {dashboard.get('uid')!r} is not 1-40 letters, digits, - or _")
    if not dashboard.get("title"):
        found.append("the dashboard has no title")
    panels = dashboard.get("panels") or []
    if not panels:
        found.append("the dashboard has no panels")
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        found.append(f"panel ids are not unique integers: {ids}")
    placed = []
    for panel in panels:
        title = panel.get("title")
        if not title:
            found.append(f"panel {panel.get('id')} has no title")
        if panel.get("type") not in PANEL_TYPES:
            found.append(f"panel {title!r} has type {panel.get('type')!r}")
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in "xywh") or grid["x"] + grid["w"] > 24:
            found.append(f"panel {title!r} has no place on the 24-column grid: {grid}")
        else:
            found += [f"panels {title!r} and {t!r} overlap" for t, g in placed if overlap(grid, g)]
            placed.append((title, grid))
        if panel.get("type") != "logs" and "unit" not in panel.get("fieldConfig", {}).get(
            "defaults", {}
        ):
            found.append(f"panel {title!r} has no fieldConfig.defaults.unit")
        refs = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
        for ref in refs:
            if not isinstance(ref, dict) or sources.get(ref.get("uid")) != ref.get("type"):
                found.append(f"panel {title!r} uses datasource {ref!r}, which is not provisioned")
        targets = panel.get("targets") or []
        if not targets or any(not t.get("expr") for t in targets):
            found.append(f"panel {title!r} has a target without a query")
        if len({t.get("refId") for t in targets}) != len(targets):
            found.append(f"panel {title!r} repeats a refId")
    return found


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def test_the_dashboards_are_valid_grafana_json():
    dashboards = load_dashboards()
    assert LAB_DASHBOARD.name in dashboards
    for name, dashboard in dashboards.items():
        assert dashboard_problems(dashboard, datasources()) == [], name
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d["panels"][1].update(id=d["panels"][0]["id"]), "not unique"),
        (lambda d: d["panels"][0].pop("gridPos"), "no place"),
        (lambda d: d["panels"][7]["gridPos"].update(x=d["panels"][6]["gridPos"]["x"]), "overlap"),
        (lambda d: d["panels"][2]["targets"][0].update(datasource={"type": "prometheus", "uid": "prom"}), "not provisioned"),
        (lambda d: d["panels"][3].update(datasource={"type": "loki", "uid": "prometheus"}), "not provisioned"),
        (lambda d: d.pop("schemaVersion"), "schemaVersion"),
        (lambda d: d.update(uid="dagma lab!"), "uid"),
        (lambda d: d["panels"][4]["fieldConfig"]["defaults"].pop("unit"), "unit"),
        (lambda d: d["panels"][5]["targets"][0].update(expr=""), "without a query"),
    ],
)  # fmt: skip
def test_the_dashboard_check_rejects_a_broken_copy(change, problem):
    dashboard = copy.deepcopy(json.loads(LAB_DASHBOARD.read_text()))
    change(dashboard)
    found = dashboard_problems(dashboard, datasources())
    assert any(problem in p for p in found), found


def listening(services: dict[str, Any]) -> dict[str, int]:
    """The HTTP port each datasource's and the shipper's backend listens on, from its config."""
    loki = yaml.safe_load((OBS / "loki" / "loki.yml").read_text())
    prometheus = flags_of(services["prometheus"]["command"])["web.listen-address"]
    return {"loki": loki["server"]["http_listen_port"], "prometheus": int(prometheus[1:])}


def test_the_datasources_reach_the_ports_their_backends_listen_on(config):
    ports = listening(config["services"])
    for doc in load_yaml_dir(DATASOURCES):
        for ds in doc["datasources"]:
            url = urlsplit(ds["url"])
            assert url.hostname is not None and url.port == ports[url.hostname], ds


ALLOY = OBS / "alloy" / "config.alloy"
_BLOCK = re.compile(r'^([a-z_]+(?:\.[a-z_]+)+)\s+"([\w-]+)"\s*\{', re.M)
_REF = re.compile(r"\b((?:discovery|loki|prometheus|otelcol)(?:\.[a-z_]+)+)\.([\w-]+)\.(\w+)\b")


def shipper_problems(text: str, config: dict[str, Any]) -> list[str]:
    """Alloy's config: references to components it defines, the Docker socket compose mounts,
    the compose project, and a Loki push URL on Loki's port."""
    found = []
    text = re.sub(r"^\s*//[^\n]*", "", text, flags=re.M)
    defined = set(_BLOCK.findall(text))
    for kind, label, _export in _REF.findall(text):
        if (kind, label) not in defined:
            found.append(f"{kind}.{label} is referenced but not defined")
    alloy = config["services"]["alloy"]
    sockets = {v["target"] for v in alloy.get("volumes", []) if "docker.sock" in v["source"]}
    for host in re.findall(r'host\s*=\s*"unix://([^"]+)"', text):
        if host not in sockets:
            found.append(f"Alloy reads the Docker socket at {host}, which compose does not mount")
    project = f"com.docker.compose.project={config['name']}"
    if project not in text:
        found.append(f"Alloy does not keep to the compose project ({project})")
    pushes = re.findall(r'url\s*=\s*"([^"]+)"', text)
    port = listening(config["services"])["loki"]
    if f"http://loki:{port}/loki/api/v1/push" not in pushes:
        found.append(f"Alloy does not push to Loki on loki:{port}: {pushes}")
    return found


def test_the_log_shipper_config_is_consistent(config):
    assert ("loki.source.docker", "dagma") in set(_BLOCK.findall(ALLOY.read_text()))
    assert shipper_problems(ALLOY.read_text(), config) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("[loki.write.local.receiver]", "[loki.write.remote.receiver]", "loki.write.remote"),
        ("targets       = discovery.docker.dagma.targets", "targets       = discovery.docker.all.targets", "discovery.docker.all"),
        ('"unix:///var/run/docker.sock"\n  targets', '"unix:///run/docker.sock"\n  targets', "/run/docker.sock"),
        ("com.docker.compose.project=dagma", "com.docker.compose.project=other", "compose project"),
        ("http://loki:3100/loki/api/v1/push", "http://loki:3101/loki/api/v1/push", "loki:3100"),
    ],
)  # fmt: skip
def test_the_shipper_check_rejects_a_broken_copy(config, old, new, problem):
    text = ALLOY.read_text()
    assert old in text
    found = shipper_problems(text.replace(old, new), config)
    assert any(problem in p for p in found), found


# --------------------------------------------------------------------------- metric names

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip
_STRIP = [
    re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'),  # string literals
    re.compile(r"\{[^}]*\}"),  # label matchers
    re.compile(r"\[[^\]]*\]"),  # range and subquery selectors
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"),  # label lists
    re.compile(r"\boffset\s+-?(?:\d+(?:ms|[smhdwy]))+"),  # offset modifiers
    re.compile(r"(?<![\w:])[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?(?![\w:])", re.I),  # numbers
]
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: not functions, keywords or label names."""
    text = expr
    for pattern in _STRIP:
        text = pattern.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def unknown_series(exprs: Iterable[str]) -> set[str]:
    exported = exported_series()
    return {
        name
        for expr in exprs
        for name in metric_names(expr)
        if name not in exported and name not in ALLOWED_SERIES and not name.startswith(ALLOWED_PREFIXES)
    }  # fmt: skip


def promql_of_dashboards(dashboards: Iterable[dict[str, Any]]) -> list[str]:
    sources = datasources()
    return [
        target["expr"]
        for dashboard in dashboards
        for panel in dashboard.get("panels", [])
        for target in panel.get("targets", [])
        if sources.get((target.get("datasource") or panel.get("datasource") or {}).get("uid"))
        == "prometheus"
    ]


def promql_of_rules(rules: dict[str, Any]) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{status=~"5.."}[5m])))', {"a_bucket"}),
        ("sum(rate(x_total[1h])) / clamp_min(sum(rate(x_total[1h])), 1e-9) > 0.2", {"x_total"}),
        ("count(up == 0) or vector(0)", {"up"}),
        ("sum(a) by (job) / on(job) group_left b offset 5m", {"a", "b"}),
        ('rate(c[5m:1m]) and ignoring(instance) d{le="+Inf"}', {"c", "d"}),
    ],
)  # fmt: skip
def test_metric_names_are_read_out_of_promql(expr, names):
    assert metric_names(expr) == names


def test_dashboards_and_alerts_query_only_exported_series():
    exprs = promql_of_dashboards(load_dashboards().values())
    exprs += promql_of_rules(yaml.safe_load(ALERTS.read_text()))
    assert len(exprs) > 20
    assert unknown_series(exprs) == set()
    used = {name for expr in exprs for name in metric_names(expr)}
    assert {"dagma_runs_total", "dagma_api_requests_total", "up"} <= used


def test_the_metric_name_check_rejects_a_renamed_series():
    dashboard = LAB_DASHBOARD.read_text().replace("dagma_runs_total", "dagma_run_total")
    rules = ALERTS.read_text().replace(
        "dagma_rag_duration_seconds_bucket", "dagma_rag_seconds_bucket"
    )
    assert unknown_series(promql_of_dashboards([json.loads(dashboard)])) == {"dagma_run_total"}
    assert unknown_series(promql_of_rules(yaml.safe_load(rules))) == {"dagma_rag_seconds_bucket"}


# --------------------------------------------------------------------------- promtool


def promtool(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    require(tool is not None, "promtool (Debian package prometheus) is missing")
    return subprocess.run(
        [str(tool), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def prometheus_copy(tmp: Path, config_text: str, rules_text: str) -> Path:
    """prometheus.yml with its rule file where promtool finds it (the container's path is gone)."""
    (tmp / "alerts.yml").write_text(rules_text)
    config = yaml.safe_load(config_text)
    config["rule_files"] = [str(tmp / "alerts.yml")]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    return tmp / "prometheus.yml"


def test_promtool_accepts_the_config_and_the_rules(tmp_path):
    path = prometheus_copy(tmp_path, PROMETHEUS.read_text(), ALERTS.read_text())
    done = promtool("check", "config", path, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    done = promtool("check", "rules", ALERTS, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@pytest.mark.parametrize(
    ("config_change", "rules_change"),
    [
        (lambda t: t.replace("scrape_interval: 15s", "scrape_interval: often"), lambda t: t),
        (lambda t: t.replace("    dns_sd_configs:", "    dns_sd_config:", 1), lambda t: t),
        (lambda t: t, lambda t: t.replace("[1h]))\n", "[1h])\n", 1)),
        (lambda t: t, lambda t: t.replace("for: 15m", "for: fifteen minutes", 1)),
    ],
)
def test_promtool_refuses_a_broken_config_or_rule(tmp_path, config_change, rules_change):
    config, rules = PROMETHEUS.read_text(), ALERTS.read_text()
    assert (config_change(config), rules_change(rules)) != (config, rules)
    path = prometheus_copy(tmp_path, config_change(config), rules_change(rules))
    done = promtool("check", "config", path, cwd=tmp_path)
    assert done.returncode != 0, done.stdout
    if rules_change(rules) != rules:
        done = promtool("check", "rules", tmp_path / "alerts.yml", cwd=tmp_path)
        assert done.returncode != 0, done.stdout


# One alert per kind evaluated on made-up series: each fires when it should and not before.
RULE_TESTS = """
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="dagma-api", instance="api:8000"}'
        values: '1 1 0x10'
      - series: 'dagma_api_requests_total{route="/v1/search", method="GET", status="200"}'
        values: '0+60x30'
      - series: 'dagma_api_requests_total{route="/v1/search", method="GET", status="500"}'
        values: '0+10x30'
      - series: 'dagma_inbox_files{state="new"}'
        values: '25x60'
    alert_rule_test:
      - eval_time: 5m
        alertname: DagmaTargetDown
        exp_alerts: []
      - eval_time: 8m
        alertname: DagmaTargetDown
        exp_alerts:
          - exp_labels: {severity: critical, job: dagma-api, instance: "api:8000"}
            exp_annotations:
              summary: "Prometheus cannot scrape dagma-api at api:8000"
      - eval_time: 20m
        alertname: DagmaApi5xxRateHigh
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: "More than 5% of API requests answer 5xx"
      - eval_time: 20m
        alertname: DagmaInboxPilingUp
        exp_alerts: []
      - eval_time: 40m
        alertname: DagmaInboxPilingUp
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations:
              summary: "25 inbox files have waited for more than 30 minutes"
              description: "Is the daemon running and the inbox sensor on (DAGMA_AUTOMATION)?"
"""


def test_the_alerts_fire_on_made_up_series(tmp_path):
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    done = promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_alert_that_cannot_fire_fails_its_rule_test(tmp_path):
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace("> 0.05", "> 0.5"))
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    done = promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert done.returncode != 0 and "DagmaApi5xxRateHigh" in done.stdout + done.stderr


# --------------------------------------------------------------------------- OTel collector


def merged(base: Any, over: Any) -> Any:
    """The collector's merge of two --config files: maps merge, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {k: merged(base[k], over[k]) if k in base and k in over else over.get(k, base.get(k)) for k in base | over}  # fmt: skip
    return over


def collector_config(overlay: str, root: Path = COLLECTOR) -> dict[str, Any]:
    base = yaml.safe_load((root / "config.yaml").read_text())
    return dict(merged(base, yaml.safe_load((root / f"{overlay}.yaml").read_text())))


def overlays(config: dict[str, Any]) -> list[str]:
    """The overlay files DAGMA_OTEL_TRACES_TO can name: those compose can load."""
    collector = config["services"]["otel-collector"]
    target = mounted(collector, COLLECTOR)
    command = " ".join(collector["command"])
    if target is None or f"--config={target}/config.yaml" not in command:
        return []
    return sorted(p.stem for p in COLLECTOR.glob("*.yaml") if p.name != "config.yaml")


def collector_problems(config: dict[str, Any], env: dict[str, Any]) -> list[str]:
    """Pipelines that name undefined components, components no pipeline uses, the OTLP ports,
    and ${env:...} the container does not get."""
    found = []
    sections = ("receivers", "processors", "exporters", "connectors", "extensions")
    defined = {s: set(config.get(s) or {}) for s in sections}
    service = config.get("service") or {}
    pipelines = service.get("pipelines") or {}
    if not any(p.split("/")[0] == "traces" for p in pipelines):
        found.append("no traces pipeline")
    used: dict[str, set[str]] = {s: set() for s in sections}
    for name, pipeline in pipelines.items():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section) or []:
                used[section].add(component)
                if component not in defined[section] | defined["connectors"]:
                    found.append(f"pipeline {name} names {section[:-1]} {component!r}, undefined")
        if not pipeline.get("receivers") or not pipeline.get("exporters"):
            found.append(f"pipeline {name} lacks receivers or exporters")
    used["extensions"] = set(service.get("extensions") or [])
    for section in ("receivers", "processors", "exporters", "extensions"):
        found += [f"{section[:-1]} {c!r} is defined but unused" for c in defined[section] - used[section]]  # fmt: skip
    protocols = ((config.get("receivers") or {}).get("otlp") or {}).get("protocols") or {}
    for protocol, port in (("grpc", 4317), ("http", 4318)):
        endpoint = str((protocols.get(protocol) or {}).get("endpoint", ""))
        if endpoint != f"0.0.0.0:{port}":
            found.append(
                f"the OTLP {protocol} receiver listens on {endpoint!r}, not 0.0.0.0:{port}"
            )
    for var in re.findall(r"\$\{env:(\w+)\}", json.dumps(config)):
        if var not in env:
            found.append(f"the collector reads ${{env:{var}}}, which compose does not pass")
    return found


def test_the_collector_config_is_consistent_for_every_choice(config):
    collector = config["services"]["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    choices = overlays(config)
    assert {"debug", "forward"} <= set(choices)
    for choice in choices:
        assert collector_problems(collector_config(choice), collector["environment"]) == [], choice
    forward = collector_config("forward")["service"]["pipelines"]["traces"]["exporters"]
    assert "otlphttp/forward" in forward and "debug" in forward


@pytest.mark.parametrize(
    ("file", "old", "new", "problem"),
    [
        ("config.yaml", "exporters: [debug]", "exporters: [otlp/tempo]", "'otlp/tempo', undefined"),
        ("config.yaml", "endpoint: 0.0.0.0:4318", "endpoint: localhost:4318", "http receiver"),
        ("config.yaml", "processors: [memory_limiter, batch]", "processors: [batch]", "'memory_limiter' is defined but unused"),
        ("forward.yaml", "${env:DAGMA_OTLP_FORWARD_ENDPOINT}", "${env:OTLP_URL}", "OTLP_URL"),
        ("forward.yaml", "exporters: [debug, otlphttp/forward]", "exporters: [debug]", "'otlphttp/forward' is defined but unused"),
    ],
)  # fmt: skip
def test_the_collector_check_rejects_a_broken_copy(config, tmp_path, file, old, new, problem):
    shutil.copytree(COLLECTOR, tmp_path, dirs_exist_ok=True)
    text = (tmp_path / file).read_text()
    assert old in text
    (tmp_path / file).write_text(text.replace(old, new))
    env = config["services"]["otel-collector"]["environment"]
    found = [
        problem
        for overlay in ("debug", "forward")
        for problem in collector_problems(collector_config(overlay, tmp_path), env)
    ]
    assert any(problem in p for p in found), found
