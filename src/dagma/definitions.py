import importlib.util
import sys
import warnings
from pathlib import Path

import dagster as dg

from dagma.dagster_fixes import dagstermill_scratch_in_the_lab, sleep_while_waiting_for_a_pool
from dagma.defs.core.notebook_assets import check_upstreams, with_lab_extras
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


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    team = get_settings().dagma_defs_dir
    if team is not None:
        loaded = dg.Definitions.merge(loaded, *_team_definitions(team.expanduser().resolve()))
    loaded = with_lab_extras(loaded)
    check_upstreams(loaded)
    return loaded
