"""`dagma run` through the lab's running services: the warm path.

The run is submitted with Dagster's GraphQL API to the services' webserver, queued, launched by
the daemon into a run worker forked from the warm code server (`dagma.lab.code_server`), and
followed to its end. It is an ordinary Dagster run: same events, same UI, same run monitoring.
Only HTTP is used here, so the CLI imports neither Dagster nor the code location.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from dagma.errors import DagmaError
from dagma.services.config import LOOPBACK, ServicesConfig
from dagma.services.procs import StateFile, record_alive

LOCATION, REPOSITORY, JOB = "dagma", "__repository__", "__ASSET_JOB"
VALUE_METADATA = "value"  # dagma.nb.VALUE_METADATA, without importing the notebook API
_DONE = {"SUCCESS", "FAILURE", "CANCELED"}

_NODES = """
query Nodes($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) { assetKey { path } isPartitioned }
}"""
_LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on UnauthorizedError { message }
  }
}"""
_FOLLOW = """
query Follow($runId: ID!, $cursor: String) {
  runOrError(runId: $runId) { __typename ... on Run { status startTime endTime } }
  logsForRun(runId: $runId, afterCursor: $cursor) {
    __typename
    ... on EventConnection {
      cursor
      events {
        __typename
        ... on MaterializationEvent {
          assetKey { path }
          metadataEntries {
            label
            ... on JsonMetadataEntry { jsonString }
            ... on UrlMetadataEntry { url }
          }
        }
        ... on ExecutionStepFailureEvent { stepKey error { message } }
        ... on RunFailureEvent { message }
      }
    }
  }
}"""


class RemoteRunError(DagmaError, RuntimeError):
    """The lab's webserver refused or lost the run; the message says what it said."""


@dataclass
class RemoteRun:
    """What a run in the services did, as `dagma.lab.LabRun` reports a local one."""

    run_id: str
    success: bool = False
    status: str = ""
    materialized: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def webserver(config: ServicesConfig) -> str | None:
    """The webserver's URL when this home's services are up and it answers, else None."""
    records = StateFile(config.state_dir / "state.json").load()
    needed = ("webserver", "daemon", "code-server")
    if not all(name in records and record_alive(records[name]) for name in needed):
        return None
    url = f"http://{LOOPBACK}:{config.dagma_dagster_port}"
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2.0) as reply:  # nosec B310
            return url if reply.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


def _graphql(url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:  # nosec B310 # loopback
            answer = json.loads(reply.read())
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise RemoteRunError(
            f"The lab's Dagster webserver at {url} did not answer ({exc}). Check it with "
            "`dagma services status`, or run in this process with `dagma run --local`."
        ) from exc
    if answer.get("errors"):
        raise RemoteRunError(f"Dagster's GraphQL API said: {answer['errors'][0]['message']}")
    return dict(answer["data"])


def runnable_here(url: str, selection: list[str]) -> bool:
    """Whether the selection is one unpartitioned run the warm path can take: every key is an
    asset of the lab and none is partitioned (those run per partition, planned locally)."""
    keys = [{"path": key.split("/")} for key in selection]
    nodes = _graphql(url, _NODES, {"keys": keys})["assetNodes"]
    found = {"/".join(n["assetKey"]["path"]): n["isPartitioned"] for n in nodes}
    return set(found) == set(selection) and not any(found.values())


def submit(url: str, selection: list[str], run_config: dict[str, Any], tags: dict[str, str]) -> str:
    """Launch a run of `selection` on the lab's code location; its run id."""
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "jobName": JOB,
            "assetSelection": [{"path": key.split("/")} for key in selection],
        },
        "runConfigData": run_config,
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    launched = _graphql(url, _LAUNCH, {"params": params})["launchRun"]
    if launched["__typename"] == "LaunchRunSuccess":
        return str(launched["run"]["runId"])
    detail = launched.get("message") or "; ".join(e["message"] for e in launched.get("errors", []))
    raise RemoteRunError(f"The lab refused the run ({launched['__typename']}): {detail}")


def follow(
    url: str, run_id: str, on_materialized: Callable[[str], None], poll: float = 0.1
) -> RemoteRun:
    """Wait for the run to end, calling `on_materialized` with each asset as it lands."""
    run = RemoteRun(run_id=run_id)
    cursor: str | None = None
    failures: list[str] = []
    while True:
        data = _graphql(url, _FOLLOW, {"runId": run_id, "cursor": cursor})
        logs = data["logsForRun"]
        if logs["__typename"] == "EventConnection":
            cursor = logs["cursor"]
            for event in logs["events"]:
                kind = event["__typename"]
                if kind == "MaterializationEvent":
                    key = "/".join(event["assetKey"]["path"])
                    run.materialized.append(key)
                    _read_metadata(run, key, event["metadataEntries"])
                    on_materialized(key)
                elif kind == "ExecutionStepFailureEvent" and event.get("error"):
                    failures.append(f"{event['stepKey']}: {event['error']['message'].strip()}")
                elif kind == "RunFailureEvent" and not failures:
                    failures.append(event["message"])
        state = data["runOrError"]
        run.status = state.get("status", "")
        if run.status in _DONE:
            run.success = run.status == "SUCCESS"
            if state.get("startTime") and state.get("endTime"):
                run.seconds = state["endTime"] - state["startTime"]
            if not run.success:
                run.error = "; ".join(failures) or f"the run ended {run.status}"
            return run
        time.sleep(poll)


def _read_metadata(run: RemoteRun, key: str, entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        if entry["label"] == VALUE_METADATA and "jsonString" in entry:
            value = json.loads(entry["jsonString"])
            if isinstance(value, dict):
                run.values[key] = value
        elif entry["label"] == "mlflow_run" and entry.get("url"):
            run.links[key] = entry["url"]


def run_in_the_lab(
    home: Path, selection: list[str], params: dict[str, dict[str, Any]], console: Console
) -> RemoteRun | None:
    """`dagma run SELECTION` through this home's running services, shown as it goes; None when
    they are not up, or the selection needs local planning (partitions): it then runs locally."""
    url = webserver(ServicesConfig(dagma_home=home))
    if url is None or not runnable_here(url, selection):
        return None
    config = {"ops": {name: {"config": values} for name, values in params.items()}}
    run_id = submit(url, selection, config if params else {}, {"dagma/via": "dagma run"})
    console.print(f"Run {run_id[:8]} in the lab's services: {url}/runs/{run_id}")
    with console.status("queued, then running on the warm code server"):
        result = follow(url, run_id, lambda key: console.print(f"  [green]✓[/green] {key}"))
    status = "[green]succeeded[/green]" if result.success else "[red]failed[/red]"
    console.print(f"\nRun {run_id} {status} in {result.seconds:.1f} s.")
    console.print(
        f"Assets materialized ({len(result.materialized)}): {', '.join(result.materialized)}"
    )
    for key, link in sorted(result.links.items()):
        console.print(f"MLflow run of {key}: {link}")
    console.print(f"Dagster UI: {url}/runs/{run_id}")
    if not result.success:
        console.print(f"[red]{result.error}[/red]")
    return result
