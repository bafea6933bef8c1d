"""Fixes to Dagster behaviour the lab relies on, applied once in each process that loads it."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def sleep_while_waiting_for_a_pool() -> None:
    """A step blocked by its pool's limit sleeps until its next claim check, as intended.

    Dagster 1.13's `interval_to_next_pending_claim_check` takes `min(0, ...)`, so the
    executor's `sleep_til_ready` never sleeps and a waiting run spins at 100% CPU.
    """
    from dagster._core.execution.plan.instance_concurrency_context import (
        InstanceConcurrencyContext,
    )

    if getattr(InstanceConcurrencyContext.interval_to_next_pending_claim_check, "_dagma", False):
        return

    def interval_to_next_pending_claim_check(self: Any) -> float:
        if not self._pending_claims:
            return 0.0
        now = time.time()
        return max(0.0, min((at - now for at in self._pending_timeouts.values()), default=0.0))

    interval_to_next_pending_claim_check._dagma = True  # type: ignore[attr-defined]
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = (  # type: ignore[method-assign]
        interval_to_next_pending_claim_check
    )


def dagstermill_scratch_in_the_lab() -> None:
    """dagstermill keeps each run's inputs for the kernel under `<system temp>/dagstermill/`:
    one folder for every user of the machine, owned by whoever ran first (others then fail
    with PermissionError), and never emptied. Keep it in the lab's home instead."""
    import dagstermill.factory

    from dagma.settings import get_settings

    def scratch() -> str:  # read when a step runs: DAGMA_HOME may change within a process
        return str(get_settings().scratch_dir)

    dagstermill.factory.get_system_temp_directory = scratch


def remove_dagstermill_scratch(folder: Path, run_ids: Iterable[str]) -> None:
    """Remove what dagstermill kept for these runs, which have ended."""
    for run_id in run_ids:
        shutil.rmtree(folder / "dagstermill" / run_id, ignore_errors=True)
