"""The lab's IO manager: Dagster's pickle files, with one hop per value for notebook steps.

The files are laid out as `FilesystemIOManager` lays them out (`<storage>/<asset>` or
`<storage>/<asset>/<partition>`), so `nb.context()` by hand reads them too. Two things differ:
- a notebook step on the bridge gets its upstream values as their files (`PickleFile`), which
  its kernel reads itself, and hands back the file its kernel wrote, which is moved into place;
- every write replaces the file whole, so a killed step never leaves half a pickle behind.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster._core.storage.fs_io_manager import PickledObjectFilesystemIOManager
from pydantic import Field

from dagma.lib.run_folder import PickleFile, write_pickle


class _LabPickles(PickledObjectFilesystemIOManager):
    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: Any) -> None:
        if isinstance(obj, PickleFile):
            obj.move_to(path)
        else:
            write_pickle(path, obj)

    def load_from_path(self, context: dg.InputContext, path: Any) -> Any:
        from dagma.defs.core.notebook_assets import reads_files

        try:
            op = context.op_def
        except dg.DagsterInvariantViolationError:  # loaded outside a step (load_asset_value)
            op = None
        if op is not None and reads_files(op):
            if not path.is_file():
                raise FileNotFoundError(path)  # Dagster skips a missing partition it allows
            return PickleFile(str(path))
        return super().load_from_path(context, path)


class LabIOManager(dg.ConfigurableIOManagerFactory):
    """Pickles under `base_dir`, read by notebook kernels directly (see the module's doc)."""

    base_dir: str = Field(description="Folder of the stored values (settings.storage_dir).")

    def create_io_manager(self, context: dg.InitResourceContext) -> _LabPickles:
        return _LabPickles(base_dir=self.base_dir)
