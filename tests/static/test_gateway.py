"""The compose gateway checked offline: Traefik's pinned image and flags, its routes, TLS with
the certificate `dagma gateway cert` writes, and forward-auth to the API's token check.

No Traefik binary or schema is available here, so the checks are structural, on compose.yaml
as `docker compose config` resolves it and on deploy/traefik/dynamic.yaml. Each check runs on
the real files and on a deliberately broken copy. The certificate is checked with a real TLS
handshake (the standard library's OpenSSL) against the CA it was issued by.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values

from dagma.api.auth import SUBJECT_HEADER, UI_SCOPE, auth_router
from dagma.env_secrets import init as secrets_init
from dagma.services.gateway import CERTS_DIR, DOMAIN, CertFiles, ensure_certificates
from tests.test_secrets import copy_for_host

ROOT = Path(__file__).resolve().parents[2]
DYNAMIC = ROOT / "deploy" / "traefik" / "dynamic.yaml"
OVERLAY = ROOT / "deploy" / "traefik" / "compose.gateway.yaml"
EXAMPLE = dotenv_values(ROOT / ".env.example")
# host name -> (compose service, container port, whether forward-auth guards it)
ROUTES = {
    f"api.{DOMAIN}": ("api", 8000, False),
    f"dagster.{DOMAIN}": ("webserver", 3000, True),
    f"mlflow.{DOMAIN}": ("mlflow", 5000, True),
    f"app.{DOMAIN}": ("app", 8501, True),
}
UIS = {"webserver", "app"}  # no login of their own: only the gateway may publish them


def compose(text: str | None = None, tmp: Path | None = None, overlay: bool = False) -> Any:
    """compose.yaml (or `text` in its place) resolved with the example .env, every profile on."""
    path = ROOT / "compose.yaml"
    if text is not None and tmp is not None:
        path = tmp / "compose.yaml"
        path.write_text(text)
    files: list[str | Path] = ["-f", path]
    if overlay:
        files += ["-f", OVERLAY]
    done = subprocess.run(
        [Path(sys.executable).with_name("docker-compose"), "--project-directory", ROOT, *files,
         "--env-file", ROOT / ".env.example", "--profile", "full", "config", "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def flags(argv: list[str]) -> dict[str, str]:
    """`--name=value` arguments (Traefik's static configuration) as a dict."""
    return dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))


def listens_on(service: dict[str, Any]) -> int | None:
    """The container port a service's command binds."""
    text = " ".join(service.get("command") or [])
    found = re.search(r"(?:-p|--port|--server\.port)[ =](\d+)", text)
    return int(found.group(1)) if found else None


def gateway_problems(config: dict[str, Any], dynamic: dict[str, Any]) -> list[str]:
    """What is wrong with the gateway: Traefik's image and flags, routes, TLS, forward-auth."""
    services = config["services"]
    traefik = services.get("traefik")
    if traefik is None:
        return ["compose.yaml has no traefik service"]
    found = []
    if not re.fullmatch(r"traefik:v3\.\d+\.\d+", traefik.get("image", "")):
        found.append(f"Traefik's image {traefik.get('image')!r} is not pinned to a v3.x.y tag")
    static = flags(traefik.get("command") or [])
    if static.get("api.insecure", "false") != "false" or static.get("api.dashboard") != "false":
        found.append("Traefik's dashboard or insecure API is on")
    if any(k.startswith("providers.") and not k.startswith("providers.file") for k in static):
        found.append("Traefik reads routes from a provider other than the file")
    if any("docker.sock" in str(v.get("source")) for v in traefik.get("volumes", [])):
        found.append("Traefik mounts the Docker socket")
    if static.get("entryPoints.web.http.redirections.entryPoint.scheme") != "https":
        found.append("plain HTTP is not redirected to HTTPS")
    https = [p for p in traefik.get("ports", []) if p["target"] == 443]
    redirect = static.get("entryPoints.web.http.redirections.entryPoint.to", "")
    if not https or redirect not in ("websecure", f":{https[0]['published']}"):
        found.append(f"HTTP redirects to {redirect!r}, not the published HTTPS port")
    if static.get("entryPoints.websecure.address") != ":443":
        found.append("the websecure entry point does not listen on 443")
    mounts = {v["target"]: v for v in traefik.get("volumes", [])}
    dynamic_file = mounts.get(static.get("providers.file.filename", ""))
    if dynamic_file is None or Path(dynamic_file["source"]) != DYNAMIC:
        found.append("Traefik does not load deploy/traefik/dynamic.yaml")
    if not all(v.get("read_only") for v in mounts.values()):
        found.append("Traefik mounts a file writable")
    http = dynamic.get("http", {})
    routers, middlewares = http.get("routers", {}), http.get("middlewares", {})
    backends = http.get("services", {})
    hosts = {}
    for name, router in routers.items():
        rule = re.fullmatch(r"Host\(`([^`]+)`\)", router.get("rule", ""))
        if rule is None:
            found.append(f"router {name} does not match one host name: {router.get('rule')!r}")
            continue
        hosts[rule.group(1)] = (name, router)
        if "tls" not in router or router.get("entryPoints") != ["websecure"]:
            found.append(f"router {name} is not TLS-only on websecure")
    if set(hosts) != set(ROUTES):
        found.append(f"the host names are {sorted(hosts)}, not {sorted(ROUTES)}")
    api = services.get("api", {})
    for host, (target, port, guarded) in ROUTES.items():
        if host not in hosts:
            continue
        name, router = hosts[host]
        servers = backends.get(router.get("service"), {}).get("loadBalancer", {}).get("servers")
        url = urlsplit((servers or [{}])[0].get("url", ""))
        if (url.hostname, url.port) != (target, port) or listens_on(services[target]) != port:
            found.append(f"{host} does not reach {target}:{port}, where {target} listens")
        auth = [m for m in router.get("middlewares", []) if "forwardAuth" in middlewares.get(m, {})]
        if guarded and not auth:
            found.append(f"router {name} ({host}) has no forward-auth")
        for middleware in auth:
            found += forward_auth_problems(middlewares[middleware]["forwardAuth"], api)
    certs = dynamic.get("tls", {}).get("certificates", [])
    files = CertFiles(CERTS_DIR)
    for cert in certs:
        for key, wanted in (("certFile", files.cert), ("keyFile", files.key)):
            mount = mounts.get(cert.get(key))
            if mount is None or Path(mount["source"]) != wanted:
                found.append(
                    f"TLS {key} {cert.get(key)} is not {wanted.name} from deploy/traefik/certs"
                )
    if not certs:
        found.append("no TLS certificate is loaded")
    if any(Path(m["source"]) == files.ca_key for m in mounts.values()):
        found.append("Traefik mounts the CA's private key")
    return found


def forward_auth_problems(forward: dict[str, Any], api: dict[str, Any]) -> list[str]:
    """The forward-auth must ask the API's token check, on the port the API listens on."""
    found = []
    url = urlsplit(forward.get("address", ""))
    paths = {getattr(route, "path", None) for route in auth_router.routes}
    if (url.scheme, url.hostname, url.port) != ("http", "api", listens_on(api)):
        found.append(f"forward-auth asks {forward.get('address')!r}, not the api service")
    if url.path not in paths or url.query != f"scope={UI_SCOPE}":
        found.append(f"forward-auth asks {url.path}?{url.query}, not the API's check for ui")
    if forward.get("trustForwardHeader") is not False:
        found.append("forward-auth trusts the client's X-Forwarded headers")
    if forward.get("authResponseHeaders") != [SUBJECT_HEADER]:
        found.append(f"forward-auth does not pass on {SUBJECT_HEADER} alone")
    return found


def load_dynamic() -> dict[str, Any]:
    return dict(yaml.safe_load(DYNAMIC.read_text()))


def test_the_gateway_is_pinned_tls_only_and_guards_every_ui():
    assert gateway_problems(compose(), load_dynamic()) == []


COMPOSE_BREAKS = [
    (lambda t: t.replace("image: traefik:v3.7.13", "image: traefik:v3"), "not pinned"),
    (lambda t: t.replace("--api.dashboard=false", "--api.insecure=true"), "dashboard"),
    (lambda t: t.replace("redirections.entryPoint.scheme=https", "redirections.entryPoint.scheme=http"), "redirected"),
    (lambda t: t.replace("--providers.file.watch=true", "--providers.docker=true"), "other than the file"),
    (lambda t: t.replace('["dagma", "serve", "--host", "0.0.0.0", "--port", "8000"]', '["dagma", "serve", "--host", "0.0.0.0", "--port", "8001"]'), "not the api service"),
    (lambda t: t.replace("source: ./deploy/traefik/certs/dagma.key", "source: ./deploy/traefik/certs/ca.key"), "CA's private key"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "problem"), COMPOSE_BREAKS)
def test_the_gateway_check_catches_a_broken_compose(tmp_path, change, problem):
    text = (ROOT / "compose.yaml").read_text()
    assert change(text) != text
    found = gateway_problems(compose(change(text), tmp_path), load_dynamic())
    assert any(problem in p for p in found), found


DYNAMIC_BREAKS: list[tuple[Callable[[dict[str, Any]], object], str]] = [
    (lambda d: d["http"]["routers"]["dagster"].pop("middlewares"), "dagster.dagma.localhost) has no forward-auth"),
    (lambda d: d["http"]["routers"]["mlflow"].pop("tls"), "mlflow is not TLS-only"),
    (lambda d: d["http"]["routers"]["app"].update(rule="Host(`app.dagma.localhost`) || PathPrefix(`/`)"), "one host name"),
    (lambda d: d["http"]["middlewares"]["dagma-auth"]["forwardAuth"].update(address="http://api:8000/v1/auth/chek?scope=ui"), "not the API's check"),
    (lambda d: d["http"]["middlewares"]["dagma-auth"]["forwardAuth"].update(address="http://api:8000/v1/auth/check"), "not the API's check"),
    (lambda d: d["http"]["middlewares"]["dagma-auth"]["forwardAuth"].update(address="http://webserver:3000/v1/auth/check?scope=ui"), "not the api service"),
    (lambda d: d["http"]["middlewares"]["dagma-auth"]["forwardAuth"].update(trustForwardHeader=True), "X-Forwarded"),
    (lambda d: d["http"]["middlewares"]["dagma-auth"]["forwardAuth"].pop("authResponseHeaders"), SUBJECT_HEADER),
    (lambda d: d["http"]["services"]["dagster"]["loadBalancer"]["servers"][0].update(url="http://user-code:4000"), "does not reach webserver"),
    (lambda d: d["tls"]["certificates"][0].update(keyFile="/etc/traefik/certs/other.key"), "keyFile"),
    (lambda d: d["tls"].pop("certificates"), "no TLS certificate"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "problem"), DYNAMIC_BREAKS)
def test_the_gateway_check_catches_a_broken_route(change, problem):
    dynamic = load_dynamic()
    change(dynamic)
    found = gateway_problems(compose(), dynamic)
    assert any(problem in p for p in found), found


def published(config: dict[str, Any]) -> dict[str, list[int]]:
    return {
        n: [int(p["published"]) for p in s.get("ports", [])]
        for n, s in config["services"].items()
        if s.get("ports")
    }


def test_with_the_gateway_the_uis_without_a_login_publish_no_port():
    ports = published(compose(overlay=True))
    assert not (UIS | {"api"}) & set(ports), ports
    assert "traefik" in ports
    links = compose(overlay=True)["services"]["webserver"]["environment"]
    assert links["DAGSTER_UI_URL"] == f"https://dagster.{DOMAIN}:443"
    # Without the overlay (the minimal..ml groups) the UIs keep their loopback ports.
    assert set(published(compose())) >= UIS


def test_the_port_check_catches_a_ui_left_published(tmp_path):
    broken = tmp_path / "compose.gateway.yaml"
    broken.write_text(OVERLAY.read_text().replace("  app:\n    ports: !reset []\n", "  app:\n"))
    assert broken.read_text() != OVERLAY.read_text()
    done = subprocess.run(
        [Path(sys.executable).with_name("docker-compose"), "--project-directory", ROOT,
         "-f", ROOT / "compose.yaml", "-f", broken, "--env-file", ROOT / ".env.example",
         "--profile", "full", "config", "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "app" in set(published(json.loads(done.stdout)))


def test_the_api_reads_only_and_takes_the_secret_from_env():
    api = compose()["services"]["api"]
    env = api["environment"]
    assert env["MLFLOW_TRACKING_USERNAME"] == "reader"
    assert env["MLFLOW_TRACKING_PASSWORD"] == EXAMPLE["MLFLOW_READER_PASSWORD"]
    assert env["QDRANT_READ_ONLY_API_KEY"] == EXAMPLE["QDRANT_READ_ONLY_API_KEY"]
    assert "QDRANT_API_KEY" not in env
    assert env["DAGMA_API_SECRET"] == EXAMPLE["DAGMA_API_SECRET"]
    assert all(v.get("read_only") for v in api["volumes"])
    assert "ports" not in api
    # The sign-in page is the API's, through the gateway; its cookie reaches every UI host.
    login = urlsplit(env["DAGMA_LOGIN_URL"])
    assert (login.scheme, login.hostname, login.path) == (
        "https",
        f"api.{DOMAIN}",
        "/v1/auth/login",
    )
    assert env["DAGMA_COOKIE_DOMAIN"] == DOMAIN
    mlflow = compose()["services"]["mlflow"]["command"]
    hosts = next(a for a in mlflow if a.startswith("--allowed-hosts="))
    assert f"mlflow.{DOMAIN}" in hosts.split("=", 1)[1].split(",")


# --------------------------------------------------------------------------- the certificate


def handshake(files: CertFiles, server_name: str) -> str:
    """A TLS handshake with a server that serves `files`, from a client that trusts only the
    CA; returns the subject the client saw, or raises ssl.SSLError."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.cert, files.key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            peer: Any = tls.getpeercert()
            return str(dict(x[0] for x in peer["subject"])["commonName"])
    finally:
        thread.join(timeout=10)
        listener.close()


def test_gateway_cert_writes_what_traefik_mounts_and_a_browser_trusting_the_ca_accepts(tmp_path):
    folder = tmp_path / "certs"
    done = subprocess.run(
        [Path(sys.executable).with_name("dagma"), "gateway", "cert", "--dir", folder],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = CertFiles(folder)
    # The names compose mounts from deploy/traefik/certs are the names the command writes.
    mounted = {Path(v["source"]).name for v in compose()["services"]["traefik"]["volumes"]}
    assert {files.cert.name, files.key.name} <= mounted
    for key in (files.key, files.ca_key):
        assert key.stat().st_mode & 0o777 == 0o600, key
    for host in ROUTES:
        assert handshake(files, host) == f"*.{DOMAIN}"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files, "api.other.localhost")


def test_gateway_cert_keeps_the_ca_so_a_trusted_ca_stays_trusted(tmp_path):
    files = CertFiles(tmp_path)
    ensure_certificates(tmp_path)
    ca, leaf = files.ca_cert.read_bytes(), files.cert.read_bytes()
    assert "nothing to do" in ensure_certificates(tmp_path)[-1]
    assert (files.ca_cert.read_bytes(), files.cert.read_bytes()) == (ca, leaf)
    ensure_certificates(tmp_path, renew=True)
    assert files.ca_cert.read_bytes() == ca and files.cert.read_bytes() != leaf
    assert handshake(files, f"app.{DOMAIN}") == f"*.{DOMAIN}"


def test_the_ca_vouches_only_for_the_gateway_domain(tmp_path):
    """A certificate for another site, signed with the CA's own key, is refused by a client
    that trusts the CA: the CA carries a name constraint, so its key is worth one domain."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    files = CertFiles(tmp_path)
    ensure_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key: Any = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    foreign = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bank.example")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    files.cert.write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="subtree"):
        handshake(files, "bank.example")


def test_the_default_certificate_folder_is_git_ignored():
    done = subprocess.run(
        ["git", "check-ignore", "-q", CERTS_DIR / "dagma.key"], cwd=ROOT, check=False
    )
    assert done.returncode == 0


def test_start_env_refuses_the_gateway_without_its_certificate(tmp_path):
    bin_dir = copy_for_host(tmp_path, "scripts/start_env.sh", ".env.example")
    secrets_init(tmp_path / ".env", environ={})
    path = f"{bin_dir}:/usr/bin:/bin"
    assert not shutil.which("docker", path=path)
    done = subprocess.run(
        ["/bin/bash", tmp_path / "scripts" / "start_env.sh", "gateway"],
        capture_output=True, text=True, timeout=60, env={"PATH": path, "HOME": str(bin_dir)},
    )  # fmt: skip
    assert done.returncode == 2
    assert "dagma gateway cert" in done.stderr, done.stderr
