"""Every production notebook under `notebooks/` becomes an asset at definitions load."""

import dagster as dg

from dagma.defs.core.notebook_assets import notebook_assets
from dagma.settings import get_settings


@dg.definitions
def notebooks() -> dg.Definitions:
    return dg.Definitions(assets=notebook_assets(get_settings().notebooks_dir))
