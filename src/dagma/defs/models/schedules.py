"""Retrain the model notebook every night, so the quality gate judges a fresh version daily."""

import dagster as dg

from dagma.settings import get_settings

_settings = get_settings()


def _checked_cron(cron: str) -> str:
    from dagster._utils.schedules import is_valid_cron_string

    if not is_valid_cron_string(cron):
        raise ValueError(
            f"DAGMA_RETRAIN_CRON={cron!r} is not a cron schedule. Set it to five fields, e.g. "
            "'0 2 * * *' for 02:00 UTC every day."
        )
    return cron


wine_model_nightly = dg.ScheduleDefinition(
    name="wine_model_nightly",
    target=dg.AssetSelection.assets("wine_model"),
    cron_schedule=_checked_cron(_settings.dagma_retrain_cron),
    execution_timezone="UTC",
    description="Retrains wine_model (and runs its quality gate) at DAGMA_RETRAIN_CRON, UTC.",
    default_status=(
        dg.DefaultScheduleStatus.RUNNING
        if _settings.dagma_automation
        else dg.DefaultScheduleStatus.STOPPED
    ),
    tags={"dagma/trigger": "nightly"},
)
