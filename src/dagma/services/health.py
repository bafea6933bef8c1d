"""Health checks: each returns (healthy, detail) and never raises."""

from __future__ import annotations

import subprocess  # nosec B404 # we run argv lists we build, never a shell
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from dagma.services.procs import port_in_use

Health = tuple[bool, str]


def http_ok(url: str, timeout: float = 3.0) -> Health:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # nosec B310 # http(s) URL from our own settings
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"no answer ({exc.__class__.__name__})"


def command_ok(
    argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> Health:
    """Exit code 0 of a checking command (pg_isready, dagster's own health checks)."""
    try:
        done = subprocess.run(  # nosec B603 # argv built here, no shell
            list(argv),
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{argv[0]} failed ({exc.__class__.__name__})"
    output = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, (output[-1] if output else f"exit {done.returncode}")[:120]


def port_open(port: int) -> Health:
    return (True, "listening") if port_in_use(port) else (False, f"nothing on port {port}")


def dagster_webserver(base_url: str, timeout: float = 10.0) -> Health:
    """The webserver answers and can read runs from its storage (not only /server_info): a
    failed query also drops connections a restarted Postgres has closed."""
    import json

    ok, detail = http_ok(f"{base_url}/server_info", timeout=timeout)
    if not ok:
        return ok, detail
    request = urllib.request.Request(
        f"{base_url}/graphql",
        data=json.dumps({"query": "{ runsOrError(limit: 1) { __typename } }"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec B310 # http(s) URL from our own settings
            body = json.loads(response.read())
    except (OSError, ValueError) as exc:
        return False, f"GraphQL failed ({exc.__class__.__name__})"
    kind = (body.get("data") or {}).get("runsOrError", {}).get("__typename")
    if kind == "Runs":
        return True, "HTTP 200, run storage readable"
    message = str((body.get("errors") or [{}])[0].get("message", kind))
    return False, f"run storage: {message.splitlines()[0][:100]}"
