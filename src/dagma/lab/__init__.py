"""Run the graph and read the lab's state, for the CLI.

- `planning`: pure planning functions (what is stale, partitions, batches and their order);
- `execution`: `materialize`, in this process or forked from the warm fork server
  (`forkserver`), with `definitions` loaded once and the process-wide `patches`;
- `output`: progress while it runs and the summary after;
- `status`: the status report.
"""

from dagma.lab.definitions import load_definitions, shared_definitions, step_definitions
from dagma.lab.execution import (
    DEFAULT_PROCESSES,
    LAUNCH_TAG,
    PROCESSES_ENV,
    LabRun,
    materialize,
    resolve_processes,
)
from dagma.lab.output import print_summary, summary
from dagma.lab.planning import LabError
from dagma.lab.status import print_status, status

__all__ = [
    "DEFAULT_PROCESSES",
    "LAUNCH_TAG",
    "PROCESSES_ENV",
    "LabError",
    "LabRun",
    "load_definitions",
    "materialize",
    "print_status",
    "print_summary",
    "resolve_processes",
    "shared_definitions",
    "status",
    "step_definitions",
    "summary",
]
