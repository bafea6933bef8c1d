"""New samples from `$DAGMA_HOME/inbox/`: an hourly-partitioned asset and the sensor that feeds it."""

import json

import dagster as dg

from dagma.defs.core.sensors import automation_status
from dagma.lib import arrivals
from dagma.lib.telemetry import metrics
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
    settings = get_settings()
    inbox = settings.inbox_dir
    files = arrivals.landed_in(inbox, context.partition_key)
    frame, problems = arrivals.read(files, settings.dagma_inbox_max_rows)
    for problem in problems.values():
        context.log.warning(f"inbox: skipped {problem}")
    return dg.Output(
        frame,
        metadata={
            "rows": len(frame),
            "files": dg.MetadataValue.json(
                [f.path.name for f in files if f.path.name not in problems]
            ),
            "skipped_files": dg.MetadataValue.json(problems),
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
    """The cursor maps each file to the modification time it was handled at; a file whose hour
    does not exist yet (a time in the future) is kept as minus that time: reported once, and
    requested once its hour comes."""
    try:
        result = _inbox_tick(context)
    except Exception:
        metrics.record("dagma_sensor_ticks", sensor="inbox_arrivals", result="error")
        raise
    asked = isinstance(result, dg.SensorResult) and bool(result.run_requests)
    outcome = "requested" if asked else "skipped"
    metrics.record("dagma_sensor_ticks", sensor="inbox_arrivals", result=outcome)
    return result


def _inbox_tick(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    inbox = get_settings().inbox_dir
    if not inbox.is_dir():
        return dg.SkipReason(f"{inbox} does not exist: create it and drop wine sample CSVs there.")
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    files = arrivals.landed(inbox)
    first, last = ARRIVAL_HOURS.get_first_partition_key(), ARRIVAL_HOURS.get_last_partition_key()
    requests, skipped, handled = [], [], {}
    changed = arrivals.changed_since(files, seen)
    metrics.record("dagma_inbox_files", sum(map(len, changed.values())), state="new")
    for hour, batch in sorted(changed.items()):
        if first is None or hour < first:
            skipped += [f"{f.path.name} (landed {hour}, before {first}: `touch` it)" for f in batch]
        elif last is None or hour > last:  # a clock ahead, or a copied time: wait for its hour
            skipped += [
                f"{f.path.name} (modified in the future, {hour}: it is ingested in that hour, "
                "or `touch` it now)"
                for f in batch
                if seen.get(f.path.name) != -f.mtime_ns
            ]
            handled.update({f.path.name: -f.mtime_ns for f in batch})
            continue
        else:
            requests.append(
                dg.RunRequest(
                    partition_key=hour,
                    run_key=arrivals.batch_key(hour, batch),
                    tags={"dagma/inbox_files": ",".join(f.path.name for f in batch)[:1000]},
                )
            )
        handled.update({f.path.name: f.mtime_ns for f in batch})
    requests += _hours_files_left(files, seen, handled, first, last)
    others = {p.name: p.stat().st_mtime_ns for p in arrivals.ignored(inbox)}
    skipped += [f"{name} (not a {arrivals.SUFFIX} file)" for name in others if name not in seen]
    named = {p.name: p.stat().st_mtime_ns for p in arrivals.badly_named(inbox)}
    skipped += [
        f"{name!r} (its name is not UTF-8 text: rename it)" for name in named if name not in seen
    ]
    metrics.record("dagma_inbox_files", len(others), state="ignored")
    metrics.record("dagma_inbox_files", len(named), state="badly_named")
    for note in skipped:
        context.log.warning(f"inbox: ignored {note}")
    current = {f.path.name: seen.get(f.path.name, f.mtime_ns) for f in files}
    cursor = json.dumps({**others, **named, **current, **handled}, sort_keys=True)
    if not requests:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"No new or changed CSV files in {inbox}."), cursor=cursor
        )
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def _hours_files_left(
    files: list[arrivals.Landed],
    seen: dict[str, int],
    handled: dict[str, int],
    first: str | None,
    last: str | None,
) -> list[dg.RunRequest]:
    """Re-ingest the hour a re-saved file was counted in, so no day counts it twice."""
    left: dict[str, list[str]] = {}
    for name, mtime in handled.items():
        before = seen.get(name, 0)
        if before > 0 and mtime > 0 and before != mtime:
            old = arrivals.hour_of(before)
            if old != arrivals.hour_of(mtime) and first and last and first <= old <= last:
                left.setdefault(old, []).append(f"{name}:{before}")
    return [
        dg.RunRequest(
            partition_key=hour,
            run_key=f"{arrivals.batch_key(hour, [f for f in files if f.hour == hour])}:left:"
            + ",".join(sorted(gone)),
            tags={"dagma/inbox_files_left": ",".join(g.split(":")[0] for g in gone)[:1000]},
        )
        for hour, gone in sorted(left.items())
    ]
