"""Turn each notebook spec into a Dagster asset (or several, for a multi-output notebook)."""

from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import dagster as dg

from dagma.defs.core.resources import MLflowResource, QdrantResource, service_retry_policy
from dagma.lib.run_folder import PickleFile, loaded
from dagma.lib.telemetry import tracing
from dagma.nb import VALUE_METADATA, RunTarget, value_preview
from dagma.notebooks.runner import (
    KernelError,
    NotebookFailed,
    PapermillEngine,
    execute,
    viewer_copy,
)
from dagma.notebooks.spec import NotebookError, NotebookSpec
from dagma.settings import get_settings

_CONFIG_TYPES: dict[Any, Any] = {int: dg.Int, float: dg.Float, str: dg.String, bool: dg.Bool}
# Declared in a parameters cell, these are filled by Dagster rather than by run config.
PARTITION_PARAMS = ("partition_key", "partition_range")
# Op tags: which notebook an op runs and on which engine. `notebook_path` is dagstermill's own
# tag, which the Dagster UI turns into a link to the source notebook.
NOTEBOOK_TAG, ENGINE_TAG, DAGSTERMILL_PATH_TAG = "dagma/notebook", "dagma/engine", "notebook_path"
# The seconds a notebook step may run; a run's dagster/max_runtime is the sum over its steps.
MAX_RUNTIME_TAG = "dagma/max_runtime"


def config_type(annotation: Any, name: str) -> Any:
    """The Dagster config type closest to a declared parameter type.

    Dagster's config keeps int, float, str, bool, string Literals (an Enum), lists, string-keyed
    dicts and Optional. What it cannot say (a range, a Literal of numbers) becomes its base type
    or `Any`; the notebook's pydantic model checks that once, before a kernel starts.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return config_type(args[0], name)
    if annotation in _CONFIG_TYPES:
        return _CONFIG_TYPES[annotation]
    if origin is Literal and args and all(isinstance(a, str) for a in args):
        return dg.Enum(name, [dg.EnumValue(a) for a in args])
    if annotation is list or origin is list:
        return dg.Array(config_type(args[0], name) if args else dg.Any)
    if annotation is dict or (origin is dict and (not args or args[0] is not str)):
        return dg.Permissive()
    if origin is dict:
        return dg.Map(str, config_type(args[1], name))
    if origin in (Union, UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return dg.Noneable(config_type(rest[0], name) if len(rest) == 1 else dg.Any)
    return dg.Any


def config_schema(spec: NotebookSpec) -> dict[str, dg.Field]:
    """The notebook's parameters as run config, typed as declared, so the launchpad shows them
    with their types and defaults."""
    return {
        name: dg.Field(
            config_type(p.annotation, f"{spec.name}__{name}"),
            default_value=p.default,
            is_required=False,
            description=f"{p.type_name} parameter of {spec.path.name}",
        )
        for name, p in spec.params.items()
        if name not in PARTITION_PARAMS
    }


def partitions_def(spec: NotebookSpec) -> dg.PartitionsDefinition | None:
    if spec.partitions is None:
        return None
    kind, arg, end_offset = spec.partitions
    if kind == "static":
        return dg.StaticPartitionsDefinition(list(arg))
    cls = {
        "daily": dg.DailyPartitionsDefinition,
        "hourly": dg.HourlyPartitionsDefinition,
        "weekly": dg.WeeklyPartitionsDefinition,
        "monthly": dg.MonthlyPartitionsDefinition,
    }[kind]
    if kind == "hourly" and len(arg) == len("2026-01-01"):
        arg += "-00:00"  # Dagster's hourly format is %Y-%m-%d-%H:%M
    return cls(start_date=arg, end_offset=end_offset)


def stale_notebook() -> dg.AutomationCondition:
    """The daemon re-runs a notebook whose upstream updated or whose code version changed.

    Like Dagster's `eager()`, plus code changes. A time-partitioned notebook runs for its latest
    partition only, and needs every upstream to have something to read (a day with a few hours
    of data runs; one with none waits), not every upstream partition.
    """
    cond = dg.AutomationCondition
    changed: dg.AutomationCondition = cond.code_version_changed()  # typed for AssetKey only
    return (
        cond.in_latest_time_window()
        & (cond.newly_missing() | cond.any_deps_updated() | changed).since_last_handled()
        & cond.all_deps_match(~cond.missing() | cond.will_be_requested())
        & ~cond.any_deps_in_progress()
        & ~cond.in_progress()
    ).with_label("notebook is stale")


def _ins(spec: NotebookSpec, partitions: dg.PartitionsDefinition | None) -> dict[str, dg.AssetIn]:
    """Upstream inputs; a time-partitioned notebook reads whichever upstream partitions exist."""
    timed = isinstance(partitions, dg.TimeWindowPartitionsDefinition)
    return {
        variable: dg.AssetIn(
            dg.AssetKey(name),
            # e.g. a day reads the hours that had data, and today reads today's hours so far
            metadata={"allow_missing_partitions": True},
            partition_mapping=(
                dg.TimeWindowPartitionMapping(allow_nonexistent_upstream_partitions=True)
                if timed
                else None
            ),
        )
        for variable, name in spec.ins.items()
    }


def _file_metadata(path: Path | None) -> dg.MetadataValue | None:
    return dg.MetadataValue.path(str(path)) if path is not None else None


def notebook_metadata(ipynb: Path | None) -> dict[str, dg.MetadataValue]:
    """The executed notebook's path, and its inert copy for the UI's notebook viewer (which
    renders whatever it opens with scripts, on Dagster's own origin)."""
    if ipynb is None:
        return {}
    found: dict[str, dg.MetadataValue] = {"executed_notebook": dg.MetadataValue.path(str(ipynb))}
    if viewer_copy(ipynb).is_file():
        found["notebook"] = dg.MetadataValue.notebook(str(viewer_copy(ipynb)))
    return found


def notebook_asset(spec: NotebookSpec) -> dg.AssetsDefinition:
    """A multi-asset that runs `spec` in a fresh kernel and yields each declared output."""
    outs = {
        name: dg.AssetOut(
            key=dg.AssetKey(name),
            group_name=spec.group,
            description=spec.description if name == spec.name else f"Output of {spec.path.name}.",
            code_version=spec.code_version,
            kinds=set(spec.kinds),
            owners=list(spec.owners) or None,
            tags=spec.tags or None,
            automation_condition=stale_notebook(),
        )
        for name in spec.asset_names
    }
    partitions = partitions_def(spec)

    @dg.multi_asset(
        name=spec.name,
        outs=outs,
        ins=_ins(spec, partitions),
        config_schema=config_schema(spec),
        partitions_def=partitions,
        op_tags={
            NOTEBOOK_TAG: str(spec.path),
            ENGINE_TAG: spec.engine,
            DAGSTERMILL_PATH_TAG: str(spec.path),
            **_max_runtime_tag(spec),
        },
        retry_policy=service_retry_policy(),
        pool=spec.pool,
    )
    def _notebook(
        context: dg.AssetExecutionContext,
        mlflow: MLflowResource,
        qdrant: QdrantResource,
        **inputs: Any,
    ) -> Iterator[dg.Output]:
        settings = get_settings()
        partition = context.partition_key if context.has_partition_key else None
        window = None
        if context.has_partition_key_range:
            key_range = context.partition_key_range
            window = [key_range.start, key_range.end]
        params = dict(context.op_config)
        if "partition_key" in spec.params:
            params["partition_key"] = partition or ""
        if "partition_range" in spec.params:
            params["partition_range"] = window or ([partition, partition] if partition else [])
        target = RunTarget(
            tracking_uri=mlflow.tracking_uri,
            experiment=mlflow.experiment,
            artifact_root=mlflow.artifact_root,
            qdrant_url=qdrant.url,
            qdrant_path=qdrant.path,
            collection=qdrant.collection,
            run_id=context.run_id,
            partition_key=partition,
            partition_range=window,
        )
        mlflow.check()  # a server that is down fails here, and the retry policy waits for it
        from dagma.notebooks.papermill_engine import Limits

        limits = Limits(
            cell_timeout=spec.timeout or settings.dagma_cell_timeout,
            max_runtime=spec.max_runtime or settings.dagma_notebook_timeout,
            max_output=spec.max_output or settings.dagma_max_cell_output,
            run_id=context.run_id,  # so a dead run's kernel can be found and stopped
        )
        engine: Any
        if spec.engine == "dagstermill":
            from dagma.defs.core.dagstermill_engine import DagstermillEngine

            engine = DagstermillEngine(
                context.get_step_execution_context(),
                {k: loaded(v) for k, v in inputs.items()},
                spec.name,
                keep_defaults=spec.keeps_defaults,
                limits=limits,
            )
        else:
            engine = PapermillEngine(limits, pool=settings.kernels_dir)
        try:
            step = context.get_step_execution_context().step.key
            with tracing.under_step(context.run_id, step):
                run = execute(
                    spec,
                    runs_dir=settings.runs_dir,
                    target=target,
                    params=params,
                    inputs=inputs,
                    engine=engine,
                )
        except NotebookFailed as exc:
            failed = exc.execution
            raise dg.Failure(
                description=str(exc),
                allow_retries=False,  # the notebook's own error: running it again changes nothing
                metadata={
                    **notebook_metadata(failed.ipynb),
                    "html": _file_metadata(failed.html),
                    "error": failed.error or "",
                },
            ) from exc
        except (NotebookError, KernelError) as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from exc
        except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError) as exc:
            # Dagster retries an interrupted step that has a retry policy; a cancelled run's
            # notebook must stop, not start again.
            raise dg.Failure(
                description=f"Notebook {spec.path.name} was interrupted: its run was cancelled "
                "or its process stopped. Its kernel was stopped; nothing it wrote became current.",
                allow_retries=False,
            ) from exc
        common: dict[str, Any] = {
            **notebook_metadata(run.ipynb),
            "html": _file_metadata(run.html),
            "parameters": dg.MetadataValue.json(run.params),
            "seconds": round(run.seconds, 2),
            # "spare": started ahead of time by the kernel pool; "new": started for this step
            "kernel": "spare" if getattr(engine, "pooled", False) else "new",
            "dagster_ui": dg.MetadataValue.url(f"{settings.dagster_ui_url}/runs/{context.run_id}"),
        }
        if run.mlflow_run_id:
            common["mlflow_run_id"] = run.mlflow_run_id
            common["mlflow_run"] = dg.MetadataValue.url(mlflow.run_url(run.mlflow_run_id))
        events = getattr(engine, "events", [])
        for event in events:
            if isinstance(event, dg.Failure | dg.RetryRequested):
                raise event  # yielded with dagstermill.yield_event, as dagstermill does
        for name in spec.asset_names:
            meta = {**common, **run.output_metadata.get(name, {})}
            value = run.outputs[name]  # the kernel's file, or the executed copy's paths
            preview = meta.get(VALUE_METADATA) if isinstance(value, PickleFile) else None
            preview = preview or value_preview(value)
            if isinstance(preview, dict):  # a small dict's JSON copy, for summaries
                meta[VALUE_METADATA] = dg.MetadataValue.json(preview)
            yield dg.Output(run.outputs[name], output_name=name, metadata=meta)
        yield from events

    return _notebook


def _max_runtime_tag(spec: NotebookSpec) -> dict[str, str]:
    seconds = spec.max_runtime or get_settings().dagma_notebook_timeout
    return {MAX_RUNTIME_TAG: str(int(seconds))} if seconds else {}


def run_max_runtime(assets_defs: list[dg.AssetsDefinition]) -> dict[str, str]:
    """Dagster's dagster/max_runtime run tag for a run of these assets' notebook steps, with
    ten minutes for the run itself; run monitoring (services mode) stops a run past it."""
    steps = {id(a): a for a in assets_defs if a.is_executable}.values()
    seconds = [int(a.op.tags[MAX_RUNTIME_TAG]) for a in steps if MAX_RUNTIME_TAG in a.op.tags]
    return {"dagster/max_runtime": str(sum(seconds) + 600)} if seconds else {}


def notebook_assets(folder: Path) -> list[dg.AssetsDefinition]:
    from dagma.notebooks.spec import discover

    return [notebook_asset(spec) for spec in discover(folder)]


def reads_files(op: dg.OpDefinition) -> bool:
    """Whether the op is a notebook step on the bridge, whose kernel reads upstream files."""
    return op.tags.get(ENGINE_TAG) == "papermill"


def needs_reconstructable_job(assets_def: dg.AssetsDefinition) -> bool:
    """Whether its step runs through dagstermill, which runs only reconstructable jobs."""
    return engine_of(assets_def) == "dagstermill"


def engine_of(assets_def: dg.AssetsDefinition) -> str | None:
    """Which notebook engine materializes it: "papermill", "dagstermill", or None (Python)."""
    if not assets_def.is_executable:
        return None
    tags = assets_def.op.tags
    if ENGINE_TAG in tags:
        return str(tags[ENGINE_TAG])
    return "dagstermill" if DAGSTERMILL_PATH_TAG in tags else None


def _hand_written_notebooks(defs: dg.Definitions) -> dict[dg.AssetKey, Path]:
    """The source notebook of each asset written with `define_dagstermill_asset`."""
    found = {}
    for item in defs.assets or []:
        if not isinstance(item, dg.AssetsDefinition) or not item.is_executable:
            continue
        tags = item.op.tags
        if DAGSTERMILL_PATH_TAG in tags and ENGINE_TAG not in tags:  # not one of the lab's
            found.update(dict.fromkeys(item.keys, Path(tags[DAGSTERMILL_PATH_TAG])))
    return found


def with_lab_extras(defs: dg.Definitions) -> dg.Definitions:
    """Hand-written dagstermill assets get what the lab's notebook assets get: a code version
    from the notebook's code cells, the engine as a kind, and the `stale_notebook` automation.
    """
    import warnings

    from dagma.notebooks.spec import code_version, read_notebook

    notebooks = _hand_written_notebooks(defs)
    if not notebooks:
        return defs
    versions = {key: code_version(read_notebook(path)) for key, path in notebooks.items()}

    def extras(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.key not in notebooks:
            return spec
        spec = spec.merge_attributes(kinds={"jupyter", "dagstermill"})
        return spec.replace_attributes(
            code_version=spec.code_version or versions[spec.key],
            automation_condition=spec.automation_condition or stale_notebook(),
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # map_asset_specs is marked preview
        return defs.map_asset_specs(func=extras)


def check_upstreams(defs: dg.Definitions) -> None:
    """Fail the load with the notebook's file name when it names an upstream nobody makes."""
    produced: set[dg.AssetKey] = set()
    for item in defs.assets or []:
        if isinstance(item, dg.AssetsDefinition):
            produced |= set(item.keys)
        elif isinstance(item, dg.AssetSpec | dg.SourceAsset):
            produced.add(item.key)
    for item in defs.assets or []:
        if not isinstance(item, dg.AssetsDefinition):
            continue
        tags = item.op.tags if item.is_executable else {}
        notebook = tags.get(NOTEBOOK_TAG) or tags.get(DAGSTERMILL_PATH_TAG)
        if notebook is None:
            continue
        fix = (
            "the `upstream` list in its parameters cell"
            if NOTEBOOK_TAG in tags
            else f"the `ins` of define_dagstermill_asset(name={item.op.name!r}, ...)"
        )
        for key in sorted(set(item.keys_by_input_name.values()) - produced):
            known = ", ".join(sorted(k.to_user_string() for k in produced))
            raise NotebookError(
                f"{notebook}: upstream {key.to_user_string()!r} is not an asset. Fix "
                f"{fix}; known assets: {known}."
            )
    _check_no_cycle(defs)


def _check_no_cycle(defs: dg.Definitions) -> None:
    """Fail the load naming the files when notebooks depend on each other in a circle."""
    from graphlib import CycleError, TopologicalSorter

    graph: dict[dg.AssetKey, set[dg.AssetKey]] = {}
    where: dict[dg.AssetKey, str] = {}
    for item in defs.assets or []:
        if not isinstance(item, dg.AssetsDefinition):
            continue
        name = item.op.tags.get(NOTEBOOK_TAG) if item.is_executable else None
        parents = set(item.keys_by_input_name.values())
        for key in item.keys:
            graph.setdefault(key, set()).update(parents)
            where[key] = name or key.to_user_string()
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        loop = " -> ".join(where.get(k, k.to_user_string()) for k in exc.args[1])
        raise NotebookError(
            f"notebooks depend on each other in a cycle: {loop}. Remove one of them from the "
            "other's `upstream` list in its parameters cell."
        ) from None
