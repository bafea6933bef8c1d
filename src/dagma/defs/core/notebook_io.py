"""dagstermill's `output_notebook_io_manager`, keeping executed notebooks in the lab's run folders.

Hand-written `define_dagstermill_asset`s (and dagstermill ops with an output notebook) store
their executed notebook through this key. Each one is kept per run, with a self-contained HTML
copy and an MLflow run tagged with its lineage, as the lab's own notebook assets are.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # dagstermill marks its classes beta
    from dagstermill import ConfigurableLocalOutputNotebookIOManager
    from dagstermill.io_managers import LocalOutputNotebookIOManager

from dagma.lib import tracking
from dagma.lib.atomic import write_atomic
from dagma.lib.run_folder import RunFolder


class _LabNotebooks(LocalOutputNotebookIOManager):
    def __init__(self, base_dir: str, settings: LabOutputNotebookIOManager) -> None:
        super().__init__(base_dir=base_dir, asset_key_prefix=settings.asset_key_prefix)
        self.settings = settings

    def handle_output(self, context: dg.OutputContext, obj: bytes) -> None:
        from dagma.defs.core.notebook_assets import notebook_metadata
        from dagma.notebooks.runner import render_html

        # Where downstream steps load it from (dagstermill's path); replaced whole, never torn.
        write_atomic(Path(self._get_path(context)), obj)
        name = (
            "__".join(context.get_asset_identifier()) if context.has_asset_key else context.step_key
        )
        folder = RunFolder.of(Path(self.settings.runs_dir), context.run_id, name)
        kept = folder.ipynb
        write_atomic(kept, obj)
        html = render_html(kept)
        metadata: dict[str, Any] = {
            **notebook_metadata(kept),
            "html": dg.MetadataValue.path(str(html)),
            "dagster_ui": dg.MetadataValue.url(
                f"{self.settings.dagster_ui_url}/runs/{context.run_id}"
            ),
        }
        try:
            metadata.update(self._log_to_mlflow(context, name, kept, html))
        except Exception as exc:  # the notebook is kept either way; say why MLflow has no run
            context.log.warning(f"{name}: no MLflow run for the executed notebook ({exc}).")
        partition = context.partition_key if context.has_partition_key else None
        folder.write_context(  # what the app reads of a run folder, as the bridge records it
            {
                "notebook": name,
                "target": {"run_id": context.run_id, "partition_key": partition},
                "mlflow_run_id": metadata.get("mlflow_run_id"),
            }
        )
        if context.has_asset_key:
            context.add_output_metadata(metadata)
        else:
            key = dg.AssetKey([*self.asset_key_prefix, f"{context.step_key}_output_notebook"])
            context.log_event(dg.AssetMaterialization(asset_key=key, metadata=metadata))

    def _log_to_mlflow(
        self, context: dg.OutputContext, name: str, ipynb: Path, html: Path
    ) -> dict[str, Any]:
        s = self.settings
        experiment = tracking.setup_experiment(
            s.tracking_uri, s.experiment, Path(s.artifact_root) if s.artifact_root else None
        )
        notebook = Path(str(context.op_def.tags.get("notebook_path", name))).stem
        partition = context.partition_key if context.has_partition_key else None
        run = tracking.client(s.tracking_uri).create_run(
            experiment,
            run_name=notebook,
            tags=tracking.lineage_tags(
                notebook=notebook,
                asset_key=name,
                dagster_run_id=context.run_id,
                partition=partition,
                engine="dagstermill",
            ),
        )
        tracking.end_notebook_run(s.tracking_uri, run.info.run_id, (ipynb, html))
        return {
            "mlflow_run_id": run.info.run_id,
            "mlflow_run": dg.MetadataValue.url(
                tracking.run_url(s.mlflow_ui_url, experiment, run.info.run_id)
            ),
        }


class LabOutputNotebookIOManager(ConfigurableLocalOutputNotebookIOManager):
    """Executed dagstermill notebooks, kept per run under $DAGMA_HOME/runs with HTML and MLflow."""

    runs_dir: str = Field(description="Folder of every run's executed notebooks.")
    tracking_uri: str = Field(description="MLflow store or server URI.")
    experiment: str = Field(default="dagma", description="Experiment of the notebooks' runs.")
    artifact_root: str | None = Field(default=None, description="Artifacts of a local store.")
    mlflow_ui_url: str = Field(default="http://127.0.0.1:5000", description="The MLflow UI.")
    dagster_ui_url: str = Field(default="http://127.0.0.1:3000", description="The Dagster UI.")

    @classmethod
    def _is_dagster_maintained(cls) -> bool:
        return False

    def create_io_manager(self, context: dg.InitResourceContext) -> _LabNotebooks:
        base = self.base_dir
        if base is None and context.instance is not None:
            base = context.instance.storage_directory()
        return _LabNotebooks(base_dir=str(base), settings=self)
