"""New samples from `$DAGMA_HOME/inbox/`: an hourly-partitioned asset and the sensor that feeds it."""

import json

import dagster as dg

from dagma.defs.core.sensors import automation_status
from dagma.lib import arrivals
from dagma.settings import get_settings

ARRIVAL_HOURS = dg.HourlyPartitionsDefinition(start_date="2026-09-01-00:00", end_offset=1)


@dg.asset(
    group_name="data",
    kinds={"pandas", "csv"},
    code_version="1",
    partitions_def=ARRIVAL_HOURS,
)
def wine_arrivals(context: dg.AssetExecutionContext) -> dg.Output:
    """The wine samples that landed in the inbox during one UTC hour (by file modification time)."""
    if not context.has_partition_key:
        raise dg.Failure(
            description="wine_arrivals is partitioned by hour: materialize one hour (e.g. "
            f"{ARRIVAL_HOURS.get_last_partition_key()}), as the inbox sensor does, or backfill a "
            "range of hours.",
            allow_retries=False,
        )
    inbox = get_settings().inbox_dir
    files = arrivals.landed_in(inbox, context.partition_key)
    try:
        frame = arrivals.read(files)
    except arrivals.ArrivalError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    return dg.Output(
        frame,
        metadata={
            "rows": len(frame),
            "files": dg.MetadataValue.json([f.path.name for f in files]),
            "inbox": dg.MetadataValue.path(str(inbox)),
            "labelled_rows": int(frame["target"].notna().sum()) if len(frame) else 0,
            "preview": dg.MetadataValue.md(frame.head(5).to_markdown(index=False)),
        },
    )


@dg.sensor(
    name="inbox_arrivals",
    target=[wine_arrivals],
    description="Ingests the hour a CSV file landed in $DAGMA_HOME/inbox/ (new or modified).",
    minimum_interval_seconds=15,
    default_status=automation_status(),
)
def inbox_arrivals(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    inbox = get_settings().inbox_dir
    if not inbox.is_dir():
        return dg.SkipReason(f"{inbox} does not exist: create it and drop wine sample CSVs there.")
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    files = arrivals.landed(inbox)
    first = ARRIVAL_HOURS.get_first_partition_key()
    requests, skipped = [], []
    for hour, batch in sorted(arrivals.changed_since(files, seen).items()):
        if first is None or hour < first:
            skipped += [f"{f.path.name} (landed {hour}, before {first}: `touch` it)" for f in batch]
            continue
        requests.append(
            dg.RunRequest(
                partition_key=hour,
                run_key=arrivals.batch_key(hour, batch),
                tags={"dagma/inbox_files": ",".join(f.path.name for f in batch)[:1000]},
            )
        )
    others = {p.name: p.stat().st_mtime_ns for p in arrivals.ignored(inbox)}
    skipped += [f"{name} (not a {arrivals.SUFFIX} file)" for name in others if name not in seen]
    for note in skipped:
        context.log.warning(f"inbox: ignored {note}")
    cursor = json.dumps({**others, **{f.path.name: f.mtime_ns for f in files}}, sort_keys=True)
    if not requests:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"No new or changed CSV files in {inbox}."), cursor=cursor
        )
    return dg.SensorResult(run_requests=requests, cursor=cursor)
