"""The lab's executor: a run of one step stays in its run's process; more steps fan out."""

import os
import pickle
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest

MODULE = textwrap.dedent(
    """
    import os
    import dagster as dg
    from dagma.defs.core.executor import lab_executor

    @dg.asset
    def first() -> int:
        return os.getpid()

    @dg.asset
    def second(first: int) -> int:
        return os.getpid()

    defs = dg.Definitions(
        assets=[first, second], jobs=[dg.define_asset_job("both")], executor=lab_executor
    )

    def job():
        return defs.resolve_job_def("both")
    """
)


@pytest.fixture
def job_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "lab_executor_defs.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # where step processes import it from
    import lab_executor_defs

    yield lab_executor_defs
    sys.modules.pop("lab_executor_defs", None)


def pids(job_module, tmp_path: Path, selection: list[str], run_config=None) -> dict[str, int]:
    recon = dg.reconstructable(job_module.job)
    (tmp_path / "dagster").mkdir(exist_ok=True)
    with dg.DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        result = dg.execute_job(
            recon,
            instance=instance,
            asset_selection=[dg.AssetKey(k) for k in selection],
            run_config=run_config or {},
        )
        assert result.success
    storage = tmp_path / "dagster" / "storage"  # the default IO manager's pickles
    return {key: pickle.loads((storage / key).read_bytes()) for key in selection}


def test_one_step_runs_in_the_run_process_and_two_steps_in_their_own(job_module, tmp_path):
    assert pids(job_module, tmp_path, ["first"]) == {"first": os.getpid()}
    both = pids(job_module, tmp_path, ["first", "second"])
    assert os.getpid() not in both.values(), "Dagster's multiprocess executor, as before"
    assert len(set(both.values())) == 2


def test_in_process_config_is_still_obeyed(job_module, tmp_path):
    config = {"execution": {"config": {"in_process": {}}}}
    both = pids(job_module, tmp_path, ["first", "second"], config)
    assert set(both.values()) == {os.getpid()}
