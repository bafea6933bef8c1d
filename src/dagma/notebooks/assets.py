"""Moved to dagma.defs.core.notebook_assets (temporary alias while lab.py moves; issue 17)."""

from dagma.defs.core.notebook_assets import *  # noqa: F403
from dagma.defs.core.notebook_assets import engine_of, needs_reconstructable_job, run_max_runtime

__all__ = ["engine_of", "needs_reconstructable_job", "run_max_runtime"]
