import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from dagma.dagster_fixes import dagstermill_scratch_in_the_lab, sleep_while_waiting_for_a_pool
from dagma.defs.core.notebook_assets import check_upstreams, with_lab_extras
from dagma.defs.core.telemetry import observe_runs
from dagma.notebooks.spec import NotebookError
from dagma.settings import get_settings


def _team_definitions(folder: Path) -> list[dg.Definitions]:
    """Each Python file in DAGMA_DEFS_DIR, loaded as a module of its own."""
    if not folder.is_dir():
        raise NotebookError(
            f"DAGMA_DEFS_DIR={folder} is not a folder. Create it, or unset DAGMA_DEFS_DIR."
        )
    loaded = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith(("_", ".")):
            continue
        name = f"dagma_team_defs.{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        with warnings.catch_warnings():
            # dagstermill's factories are beta, Dagster's module loader preview: said once, here.
            warnings.simplefilter("ignore", dg.BetaWarning)
            warnings.simplefilter("ignore", dg.PreviewWarning)
            spec.loader.exec_module(module)
            loaded.append(dg.load_definitions_from_module(module))
    return loaded


sleep_while_waiting_for_a_pool()  # every process that loads the lab: CLI, run workers, servers
dagstermill_scratch_in_the_lab()
observe_runs()


# Environment variables the loaded code location may depend on.
_ENV_PREFIXES = ("DAGMA_", "DAGSTER_", "MLFLOW_", "QDRANT_", "OPENAI_", "OLLAMA_")
_LOADED: dict[tuple[Any, ...], dg.Definitions] = {}


def definitions_key() -> tuple[Any, ...]:
    """What the code location depends on besides Python code: environment and notebooks."""
    settings = get_settings()
    notebooks = []
    for path in sorted(settings.notebooks_dir.rglob("*.ipynb")):
        stat = path.stat()
        notebooks.append((str(path), stat.st_mtime_ns, stat.st_size))
    team = settings.dagma_defs_dir
    # The team's definitions and the notebooks beside them (their code versions).
    team_files = [*team.rglob("*.py"), *team.rglob("*.ipynb")] if team and team.is_dir() else []
    for path in sorted(team_files):
        notebooks.append((str(path), path.stat().st_mtime_ns, path.stat().st_size))
    dotenv = Path(".env")
    env_file = dotenv.stat().st_mtime_ns if dotenv.is_file() else None
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    return (os.getcwd(), env_file, tuple(env), tuple(notebooks))


@dg.definitions
def defs() -> dg.Definitions:
    """The lab's code location, loaded once per process while nothing it reads changes: a run
    worker forked from a warm process (`dagma.lab.code_server`) finds it loaded."""
    key = definitions_key()
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load()
    return _LOADED[key]


def _load() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    team = get_settings().dagma_defs_dir
    if team is not None:
        loaded = dg.Definitions.merge(loaded, *_team_definitions(team.expanduser().resolve()))
    loaded = with_lab_extras(loaded)
    check_upstreams(loaded)
    return loaded
