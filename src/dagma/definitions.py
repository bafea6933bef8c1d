from pathlib import Path

import dagster as dg

from dagma.notebooks.assets import check_upstreams


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    check_upstreams(loaded)
    return loaded
