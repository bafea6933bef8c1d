"""`dagma doctor`: check this environment against what the repository pins.

Each check returns a :class:`Check`; :func:`run` prints one line per check (or JSON) and
returns a non-zero exit code only when a blocking check fails. Nothing here imports MLflow or
LangChain, and Dagster only to read the pool slots of a lab that has an instance, so the
doctor stays fast and works in a half-broken venv. Longer than 450 lines because every check
sits here, in the order it prints.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from packaging.markers import Marker
from packaging.version import InvalidVersion, Version

from dagma import version
from dagma.settings import PROJECT_ROOT, Settings

Severity = Literal["blocking", "warning"]
SYNC_FIX = "make install (or: UV_COMPILE_BYTECODE=1 uv sync --frozen)"
# Packages whose files show whether `uv sync` compiled bytecode (UV_COMPILE_BYTECODE=1).
BYTECODE_SAMPLES = ("dagster", "mlflow", "sklearn", "qdrant_client")
SERVICES_FIX = "start the services: `uv run dagma services up` (or `nix run .#services`)"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}  # nosec B104 # a host doctor recognises as local, not a bind


@dataclass(frozen=True)
class Check:
    """The result of one check; `fix` says what to run or change when `ok` is false."""

    name: str
    ok: bool
    severity: Severity
    detail: str
    fix: str = ""

    @property
    def blocks(self) -> bool:
        return not self.ok and self.severity == "blocking"


@dataclass(frozen=True)
class Context:
    """What the checks look at; tests point it at copies (a modified uv.lock, a tmp .env)."""

    root: Path = PROJECT_ROOT
    lock_path: Path | None = None
    env_file: Path | None = None
    timeout: float = 2.0

    @property
    def lock(self) -> Path:
        return self.lock_path or self.root / "uv.lock"

    @property
    def dotenv(self) -> Path:
        return self.env_file or self.root / ".env"

    def get(self, name: str) -> str | None:
        value = os.environ.get(name, "").strip()
        return value or None


def check_version(ctx: Context, package_dir: Path = version.PACKAGE_DIR) -> Check:
    """Which Dagma runs: the version from its git tag and the commit of its checkout."""
    line = version.describe()
    at = version.tag(package_dir)
    try:
        stale = at is not None and Version(at) != Version(version.version())
    except InvalidVersion:
        stale = False
    if stale:
        return Check(
            "version",
            False,
            "warning",
            f"{line}, but the checkout is at the release tag {at}",
            "uv sync --frozen (it rebuilds the installed version when the tags change)",
        )
    return Check("version", True, "warning", line)


def check_python(ctx: Context) -> Check:
    pinned_file = ctx.root / ".python-version"
    running = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    if not pinned_file.is_file():
        return Check("python", False, "warning", f"{pinned_file} is missing", "restore it from git")
    pinned = pinned_file.read_text().strip()
    ok = running == pinned or running.startswith(pinned + ".")
    return Check(
        "python",
        ok,
        "blocking",
        f"running {running} at {sys.executable}; .python-version pins {pinned}",
        "" if ok else f"use Python {pinned}: UV_PYTHON=python{pinned} {SYNC_FIX}",
    )


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_ok(marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate({"extra": ""})


def _default_groups(lock_path: Path) -> list[str]:
    """The dependency groups `uv sync` installs: `[tool.uv] default-groups`, else dev."""
    pyproject = lock_path.with_name("pyproject.toml")
    if not pyproject.is_file():
        return ["dev"]
    uv_config = tomllib.loads(pyproject.read_text()).get("tool", {}).get("uv", {})
    return list(uv_config.get("default-groups", ["dev"]))


def locked_requirements(lock_path: Path) -> dict[str, str]:
    """Name -> version of every package `uv sync` installs here (project, default groups)."""
    lock = tomllib.loads(lock_path.read_text())
    groups = _default_groups(lock_path)
    by_name: dict[str, list[dict]] = {}
    for pkg in lock["package"]:
        by_name.setdefault(_norm(pkg["name"]), []).append(pkg)
    roots = [p for p in lock["package"] if "editable" in p.get("source", {})]
    wanted: dict[str, str] = {}
    todo: list[tuple[dict, list[str]]] = [(root, []) for root in roots]
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    while todo:
        pkg, extras = todo.pop()
        # The project itself has no locked version: it comes from git (dagma.version).
        key = (_norm(pkg["name"]), pkg.get("version", ""), tuple(sorted(extras)))
        if key in seen:
            continue
        seen.add(key)
        if "version" in pkg:
            wanted[key[0]] = pkg["version"]
        deps = list(pkg.get("dependencies", []))
        for extra in extras:
            deps += pkg.get("optional-dependencies", {}).get(extra, [])
        if pkg in roots:
            for group, group_deps in pkg.get("dev-dependencies", {}).items():
                if group in groups:
                    deps += group_deps
        for dep in deps:
            if not _marker_ok(dep.get("marker")):
                continue
            candidates = by_name.get(_norm(dep["name"]), [])
            if "version" in dep:
                candidates = [c for c in candidates if c.get("version") == dep["version"]]
            if candidates:
                todo.append((candidates[0], list(dep.get("extra", []))))
    return wanted


def installed_distributions() -> dict[str, str]:
    return {
        _norm(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    }


def check_venv(ctx: Context) -> Check:
    if not ctx.lock.is_file():
        return Check(
            "venv", False, "blocking", f"{ctx.lock} is missing", "restore uv.lock from git"
        )
    try:
        wanted = locked_requirements(ctx.lock)
    except (tomllib.TOMLDecodeError, KeyError) as exc:
        return Check(
            "venv", False, "blocking", f"cannot read {ctx.lock}: {exc}", "git checkout uv.lock"
        )
    have = installed_distributions()
    missing = sorted(name for name in wanted if name not in have)
    wrong = sorted(
        f"{name} {have[name]} (locked {version})"
        for name, version in wanted.items()
        if name in have and have[name] != version
    )
    where = f"{len(wanted)} locked packages in {sys.prefix}"
    if not missing and not wrong:
        return Check("venv", True, "blocking", f"{where} match {ctx.lock.name}")
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} at another version: {', '.join(wrong[:5])}")
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing[:5])}")
    return Check(
        "venv", False, "blocking", f"out of sync with {ctx.lock}: {'; '.join(problems)}", SYNC_FIX
    )


def check_bytecode(ctx: Context) -> Check:
    compiled = total = 0
    for module in BYTECODE_SAMPLES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            for path in sorted(Path(folder).rglob("*.py"))[:300]:
                total += 1
                compiled += Path(importlib.util.cache_from_source(str(path))).is_file()
    if total == 0:
        return Check(
            "bytecode", False, "warning", "none of the sampled packages is installed", SYNC_FIX
        )
    share = compiled / total
    ok = share >= 0.95
    return Check(
        "bytecode",
        ok,
        "warning",
        f"{compiled}/{total} sampled modules have compiled bytecode",
        ""
        if ok
        else "UV_COMPILE_BYTECODE=1 uv sync --frozen --reinstall (cold starts are ~2x slower)",
    )


def check_kernel(ctx: Context) -> Check:
    fix = f"{SYNC_FIX}; then `jupyter kernelspec list` must show python3 from {sys.prefix}"
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return Check("kernel", False, "blocking", "jupyter_client is not installed", fix)
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        return Check("kernel", False, "blocking", "no 'python3' Jupyter kernel", fix)
    exe = spec.argv[0] if spec.argv else ""
    if exe in {"python", "python3"}:
        exe = sys.executable
    resolved = shutil.which(exe) or exe
    ours = Path(os.path.abspath(resolved)).is_relative_to(os.path.abspath(sys.prefix))
    detail = f"python3 kernel runs {resolved} ({spec.resource_dir})"
    if ours:
        return Check("kernel", True, "blocking", detail)
    return Check(
        "kernel",
        False,
        "blocking",
        detail + f", not this environment ({sys.prefix}): notebooks would miss dagma",
        f"remove the overriding kernelspec: jupyter kernelspec remove python3 ({spec.resource_dir})",
    )


def _http_ok(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> str | None:
    """None when `url` answers 2xx, else why not."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec B310 # http(s) URL from our own settings
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason)


def _tcp_ok(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc)


def check_services(ctx: Context, settings: Settings) -> list[Check]:
    checks = []
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        error = _http_ok(uri.rstrip("/") + "/health", ctx.timeout)
        checks.append(
            Check(
                "mlflow",
                error is None,
                "blocking",
                f"MLflow server {uri}" + (" answers /health" if error is None else f": {error}"),
                "" if error is None else f"{SERVICES_FIX}, or unset MLFLOW_TRACKING_URI",
            )
        )
    else:
        checks.append(Check("mlflow", True, "blocking", f"embedded tracking store {uri}"))
    if settings.qdrant_url:
        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        url = settings.qdrant_url.rstrip("/")
        error = _http_ok(url + "/readyz", ctx.timeout, {"api-key": key} if key else None)
        checks.append(
            Check(
                "qdrant",
                error is None,
                "blocking",
                f"Qdrant server {url}" + (" is ready" if error is None else f": {error}"),
                "" if error is None else f"{SERVICES_FIX}, or unset QDRANT_URL",
            )
        )
    if pg := postgres_target(ctx):
        host, port = pg
        error = _tcp_ok(host, port, ctx.timeout)
        checks.append(
            Check(
                "postgres",
                error is None,
                "blocking",
                f"Postgres {host}:{port}"
                + (" accepts connections" if error is None else f": {error}"),
                "" if error is None else SERVICES_FIX,
            )
        )
    return checks


def postgres_target(ctx: Context) -> tuple[str, int] | None:
    """Where services mode expects Postgres: dagster.yaml's DAGSTER_PG_*, or DAGMA_PG_PORT."""
    if host := ctx.get("DAGSTER_PG_HOST"):
        return host, int(ctx.get("DAGSTER_PG_PORT") or 5432)
    if port := ctx.get("DAGMA_PG_PORT"):
        return "127.0.0.1", int(port)
    return None


def check_vector_store(ctx: Context, settings: Settings) -> Check:
    if settings.qdrant_url:
        return Check("vector store", True, "warning", f"Qdrant server at {settings.qdrant_url}")
    path = settings.qdrant_path
    parent = next((p for p in (path, *path.parents) if p.exists()), path)
    ok = os.access(parent, os.W_OK)
    return Check(
        "vector store",
        ok,
        "blocking",
        f"embedded qdrant-edge at {path}" + ("" if ok else f" ({parent} is not writable)"),
        "" if ok else "set DAGMA_QDRANT_PATH (or DAGMA_HOME) to a writable folder",
    )


FIX_SLOTS = "uv run dagma doctor --fix (fails the dead runs and frees their slots)"


def check_pool_slots(settings: Settings, fix: bool = False) -> Check:
    """Slots held by runs that ended or whose process is gone block their pool for good."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_dir)
    if not (home / "dagster.yaml").exists():
        return Check("pool slots", True, "blocking", f"no Dagster instance in {home} yet")
    try:
        import dagster as dg

        from dagma import reaping
    except ImportError as exc:
        return Check("pool slots", False, "warning", f"cannot import Dagster: {exc}", SYNC_FIX)
    try:
        instance = dg.DagsterInstance.from_config(str(home))
    except Exception as exc:  # e.g. services mode's dagster.yaml without its Postgres variables
        detail = f"cannot open the Dagster instance in {home}: {str(exc).splitlines()[0]}"
        return Check("pool slots", False, "warning", detail, SERVICES_FIX)
    with instance:
        stuck = reaping.stuck_slots(instance)
        if stuck and fix:
            reaping.reap_dead_runs(instance, settings)
            reaping.free_slots_of_finished_runs(instance)
            freed = stuck
            stuck = reaping.stuck_slots(instance)
            if not stuck:
                runs = ", ".join(sorted({s["run_id"][:8] for s in freed}))
                return Check("pool slots", True, "blocking", f"freed the slots of run(s) {runs}")
    if not stuck:
        return Check("pool slots", True, "blocking", "no slot is held by a dead or ended run")
    held = "; ".join(f"{s['pool']} held by run {s['run_id'][:8]}: {s['why']}" for s in stuck)
    return Check("pool slots", False, "blocking", held, FIX_SLOTS)


def check_env_vars(ctx: Context, settings: Settings) -> list[Check]:
    missing: list[tuple[str, str, Severity]] = []
    if settings.qdrant_url and not settings.qdrant_api_key:
        host = urlsplit(settings.qdrant_url).hostname or ""
        if host not in LOCAL_HOSTS:
            missing.append(("QDRANT_API_KEY", f"QDRANT_URL points to {host}", "warning"))
    backend = (ctx.get("DAGMA_LLM") or "local").lower()
    if backend in {"openai", "ollama"} and not ctx.get("DAGMA_LLM_MODEL"):
        missing.append(("DAGMA_LLM_MODEL", f"DAGMA_LLM={backend}", "blocking"))
    if backend == "openai" and not ctx.get("OPENAI_API_KEY"):
        host = urlsplit(ctx.get("OPENAI_BASE_URL") or "https://api.openai.com").hostname or ""
        if host not in LOCAL_HOSTS:
            missing.append(("OPENAI_API_KEY", f"DAGMA_LLM=openai talks to {host}", "blocking"))
    if ctx.get("DAGSTER_PG_HOST") and not ctx.get("DAGSTER_PG_PASSWORD"):
        # dagster.yaml reads it with `env:`, which has no fallback: the instance fails to load.
        missing.append(("DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST is (dagster.yaml)", "blocking"))
    if not missing:
        return [
            Check("env vars", True, "blocking", "every variable the configuration needs is set")
        ]
    return [
        Check(
            f"env {name}",
            False,
            severity,
            f"{name} is not set but {why}",
            f"set {name} in .env (see .env.example)",
        )
        for name, why, severity in missing
    ]


def check_env_file(ctx: Context) -> Check:
    path = ctx.dotenv
    if not path.exists():
        return Check(".env", True, "warning", f"no {path}: defaults and the environment apply")
    mode = stat.S_IMODE(path.stat().st_mode)
    ok = not mode & stat.S_IROTH
    return Check(
        ".env",
        ok,
        "warning",
        f"{path} has mode {mode:o}" + ("" if ok else ", readable by every user"),
        "" if ok else f"chmod 600 {path}",
    )


def check_secrets(ctx: Context) -> list[Check]:
    """Secrets everyone knows (change-me..., empty, .env.example's) in .env or the environment."""
    from dagma.env_secrets import placeholders
    from dagma.services.config import SECRET_OVERRIDES

    found = placeholders(ctx.dotenv)
    found += placeholders(ctx.dotenv, names=SECRET_OVERRIDES, empty_is_unset=True)
    if not found:
        return [Check("secrets", True, "blocking", "no secret set to a placeholder")]
    return [Check(f"secret {p.name}", False, "blocking", str(p), p.fix) for p in found]


def collect(ctx: Context | None = None, fix: bool = False) -> list[Check]:
    """Run every check, in the order they are printed; `fix` applies the fixes that are safe."""
    ctx = ctx or Context()
    settings = Settings(_env_file=ctx.dotenv if ctx.dotenv.exists() else None)  # type: ignore[call-arg]
    results = [check_version(ctx), check_python(ctx), check_venv(ctx), check_bytecode(ctx)]
    results.append(check_kernel(ctx))
    results += check_services(ctx, settings)
    results.append(check_vector_store(ctx, settings))
    results.append(check_pool_slots(settings, fix))
    results += check_env_vars(ctx, settings)
    results.append(check_env_file(ctx))
    results += check_secrets(ctx)
    return results


def render(checks: Iterable[Check]) -> str:
    lines = []
    for c in checks:
        mark = "✓" if c.ok else "✗"
        level = "" if c.ok or c.severity == "blocking" else " (warning)"
        lines.append(f"{mark} {c.name}{level}: {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"    fix: {c.fix}")
    return "\n".join(lines)


def run(as_json: bool = False, ctx: Context | None = None, fix: bool = False) -> int:
    """Print the checks; 1 if any blocking check failed, else 0."""
    checks = collect(ctx, fix)
    code = 1 if any(c.blocks for c in checks) else 0
    if as_json:
        print(json.dumps({"ok": code == 0, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(render(checks))
        print("doctor: " + ("blocking problems found" if code else "ready"))
    return code


if __name__ == "__main__":
    sys.exit(run(as_json="--json" in sys.argv[1:], fix="--fix" in sys.argv[1:]))
