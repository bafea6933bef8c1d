"""Fixes to Dagster behaviour the lab relies on, applied once in each process that loads it."""

from __future__ import annotations

import time
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
