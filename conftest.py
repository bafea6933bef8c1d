"""Session set-up shared by the unit tests, the integration tests and nbval.

nbval starts each notebook's kernel before any fixture runs, so the lab home the kernels
use is created at session start, and the collected notebooks' upstream assets are
materialized into it right after collection.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SESSION_HOME = "DAGMA_TEST_SESSION_HOME"


def pytest_sessionstart(session) -> None:  # type: ignore[no-untyped-def]
    if os.environ.get(SESSION_HOME):
        return
    home = Path(tempfile.mkdtemp(prefix="dagma-test-"))
    os.environ[SESSION_HOME] = str(home)
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "QDRANT_URL", "DAGMA_QDRANT_PATH"):
        os.environ.pop(name, None)
    os.environ["DAGMA_HOME"] = str(home)


def pytest_collection_modifyitems(session, config, items) -> None:  # type: ignore[no-untyped-def]
    """Inject CI-sized parameters (notebooks/ci_parameters.json) into nbval's parameters cells.

    Values are validated against each notebook's declared types, as a real run would be.
    """
    import json

    from dagma.notebooks.spec import parse_notebook
    from dagma.settings import PROJECT_ROOT

    overrides = json.loads((PROJECT_ROOT / "notebooks" / "ci_parameters.json").read_text())
    upstream: set[str] = set()
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None or "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        path = Path(str(item.parent.fspath))
        upstream |= set(parse_notebook(path).upstream)
        values = overrides.get(path.stem)
        if values:
            validated = parse_notebook(path).validate_params(values)
            lines = [f"{name} = {validated[name]!r}" for name in values]
            cell.source += "\n# CI-sized parameters from notebooks/ci_parameters.json\n"
            cell.source += "\n".join(lines)
    if upstream:
        from dagma.lab import materialize
        from dagma.lib import arrivals
        from dagma.settings import get_settings

        if "wine_arrivals" in upstream:
            # Samples in the inbox, so the current hour's partition has rows to score.
            arrivals.write_sample(get_settings().inbox_dir, rows=20)

        run = materialize(get_settings(), selection=sorted(upstream))
        if not run.success:
            raise RuntimeError(f"Could not materialize the notebooks' upstream: {run.error}")


def pytest_sessionfinish(session, exitstatus) -> None:  # type: ignore[no-untyped-def]
    home = os.environ.get(SESSION_HOME)
    if home and not os.environ.get("DAGMA_KEEP_TEST_HOME"):
        shutil.rmtree(home, ignore_errors=True)
