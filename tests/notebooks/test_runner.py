"""The bridge against real kernels: values in, outputs and executed copies out."""

import time
from pathlib import Path

import mlflow
import nbformat
import pytest

from dagma.nb import RunTarget
from dagma.notebooks.papermill_engine import Limits
from dagma.notebooks.runner import KernelError, NotebookFailed, PapermillEngine, execute
from dagma.notebooks.spec import NotebookError, parse_notebook
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration


def target(tmp_path: Path) -> RunTarget:
    return RunTarget(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="test",
        artifact_root=str(tmp_path / "artifacts"),
        qdrant_url=None,
        qdrant_path=str(tmp_path / "qdrant"),
        collection="test",
        run_id="run-1",
        partition_key="2026-11-29",
    )


def test_upstream_values_and_coerced_params_reach_the_kernel(tmp_path: Path):
    path = write_nb(
        tmp_path / "doubled.ipynb",
        params='upstream = ["numbers"]\nfactor: int = 2',
        body=(
            "from dagma import nb\nctx = nb.context()\n"
            "ctx.output([x * factor for x in ctx.upstream('numbers')],"
            " metadata={'partition': ctx.partition_key})"
        ),
    )
    run = execute(
        parse_notebook(path),
        runs_dir=tmp_path / "runs",
        target=target(tmp_path),
        params={"factor": "3"},
        inputs={"numbers": [1, 2, 3]},
    )
    assert run.outputs["doubled"].load() == [3, 6, 9]
    assert run.output_metadata["doubled"] == {"partition": "2026-11-29"}
    assert run.params == {"factor": 3}
    assert run.ipynb.is_file() and run.html is not None
    assert "factor = 3" in run.ipynb.read_text()  # papermill's injected cell keeps the value


def test_every_materialization_gets_one_finished_mlflow_run_with_its_notebook(tmp_path: Path):
    path = write_nb(
        tmp_path / "quiet.ipynb",
        params="n: int = 1",
        body="from dagma import nb\nnb.context().output(n)",
    )
    run = execute(parse_notebook(path), runs_dir=tmp_path / "runs", target=target(tmp_path))
    client = mlflow.MlflowClient(target(tmp_path).tracking_uri)
    logged = client.get_run(run.mlflow_run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["dagma.notebook"] == "quiet"
    assert logged.data.tags["dagma.partition"] == "2026-11-29"
    files = {a.path for a in client.list_artifacts(run.mlflow_run_id, "notebook")}
    assert files == {"notebook/quiet.ipynb", "notebook/quiet.html"}


def test_a_failing_cell_keeps_ipynb_and_html_and_names_the_error(tmp_path: Path):
    path = write_nb(tmp_path / "broken.ipynb", params="n: int = 1", body="raise ValueError('boom')")
    with pytest.raises(NotebookFailed) as info:
        execute(parse_notebook(path), runs_dir=tmp_path / "runs", target=target(tmp_path))
    message = str(info.value)
    assert "broken.ipynb failed: ValueError: boom" in message
    assert "raise ValueError('boom')" in message
    failed = info.value.execution
    assert str(failed.ipynb) in message and failed.ipynb.is_file()
    assert failed.html is not None and "boom" in failed.html.read_text()


def test_a_declared_output_never_handed_over_is_an_error(tmp_path: Path):
    params = 'asset = {"outputs": ["silent"]}\nn: int = 1'
    path = write_nb(tmp_path / "silent.ipynb", params=params, body="n + 1")
    with pytest.raises(NotebookFailed, match=r"never handed over its declared output 'silent'"):
        execute(parse_notebook(path), runs_dir=tmp_path / "runs", target=target(tmp_path))


def test_a_notebook_that_hands_no_value_is_its_executed_copy(tmp_path: Path):
    path = write_nb(
        tmp_path / "report.ipynb", params="upstream = []\nn: int = 1", body="print('rows', n + 1)"
    )
    run = execute(parse_notebook(path), runs_dir=tmp_path / "runs", target=target(tmp_path))
    value = run.outputs["report"]
    assert value["executed_notebook"] == str(run.ipynb)
    assert "rows 2" in Path(value["executed_notebook"]).read_text()
    assert Path(value["html"]).read_text().startswith("<!DOCTYPE html>")


def test_bad_parameters_fail_before_any_kernel_starts(tmp_path: Path):
    path = write_nb(tmp_path / "typed.ipynb", params="n: int = 1", body="n")
    with pytest.raises(NotebookError, match=r"typed\.ipynb: parameter 'n' = 'many'"):
        execute(
            parse_notebook(path),
            runs_dir=tmp_path / "runs",
            target=target(tmp_path),
            params={"n": "many"},
        )
    assert not (tmp_path / "run").exists()


def test_one_notebook_can_output_several_assets(tmp_path: Path):
    path = write_nb(
        tmp_path / "pair.ipynb",
        params='asset = {"outputs": ["model", "metrics"]}',
        body=(
            "from dagma import nb\nctx = nb.context()\n"
            "ctx.output('m', name='model')\nctx.output({'acc': 1.0}, name='metrics')"
        ),
    )
    run = execute(parse_notebook(path), runs_dir=tmp_path / "runs", target=target(tmp_path))
    assert {k: v.load() for k, v in run.outputs.items()} == {"model": "m", "metrics": {"acc": 1.0}}


def test_a_mismatched_kernel_is_a_clear_error_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        '{"argv": ["/usr/bin/false", "-f", "{connection_file}"], "display_name": "other",'
        ' "language": "python"}'
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    path = write_nb(tmp_path / "k.ipynb", params="n: int = 1", body="n")
    with pytest.raises(KernelError, match=r"runs '/usr/bin/false'.*jupyter kernelspec remove"):
        execute(parse_notebook(path), runs_dir=tmp_path / "runs", target=target(tmp_path))


def test_a_non_python_notebook_is_refused_at_load(tmp_path: Path):
    path = write_nb(tmp_path / "r.ipynb", params="n = 1", body="n")
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "ir", "language": "R", "display_name": "R"}
    nbformat.write(nb, path)
    with pytest.raises(
        NotebookError, match=r"kernel language is 'R'.*Switch the notebook's kernel"
    ):
        parse_notebook(path)


def test_a_hung_cell_times_out_keeps_its_copies_and_fails_its_mlflow_run(tmp_path: Path):
    path = write_nb(
        tmp_path / "hung.ipynb",
        params='asset = {"timeout": 1.5}\nn: int = 1',
        body="import time\nprint('started')\ntime.sleep(60)",
    )
    spec = parse_notebook(path)
    started = time.monotonic()
    with pytest.raises(NotebookFailed) as info:
        execute(
            spec,
            runs_dir=tmp_path / "runs",
            target=target(tmp_path),
            engine=PapermillEngine(Limits(cell_timeout=spec.timeout)),
        )
    assert time.monotonic() - started < 40  # not the cell's 60 s
    message = str(info.value)
    assert "CellTimeoutError" in message and "asset['timeout']" in message
    failed = info.value.execution
    assert "started" in failed.ipynb.read_text() and failed.html is not None
    client = mlflow.MlflowClient(target(tmp_path).tracking_uri)
    assert client.get_run(failed.mlflow_run_id).info.status == "FAILED"


def test_a_notebook_past_its_max_runtime_fails_though_each_cell_is_in_time(tmp_path: Path):
    nap = "import time\ntime.sleep(1.5)\nprint('napped')"
    path = write_nb(
        tmp_path / "slow.ipynb",
        params='asset = {"timeout": 30, "max_runtime": 4}\nn: int = 1',
        body=nap,
    )
    nb = nbformat.read(path, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(nap) for _ in range(5)]  # 9 s in all
    nbformat.write(nb, path)
    spec = parse_notebook(path)
    assert spec.max_runtime == 4.0
    started = time.monotonic()
    with pytest.raises(NotebookFailed) as info:
        execute(
            spec,
            runs_dir=tmp_path / "runs",
            target=target(tmp_path),
            engine=PapermillEngine(Limits(cell_timeout=spec.timeout, max_runtime=spec.max_runtime)),
        )
    assert time.monotonic() - started < 20  # not the 9 s of naps plus a 30 s cell timeout
    message = str(info.value)
    assert "NotebookTimeoutError" in message and "max_runtime of 4 seconds" in message
    assert "asset['max_runtime'] or DAGMA_NOTEBOOK_TIMEOUT" in message
    failed = info.value.execution
    kept = nbformat.read(failed.ipynb, as_version=4)
    printed = [c for c in kept.cells if "napped" in str(c.get("outputs", ""))]
    assert 1 <= len(printed) < 6  # stopped midway; the copy keeps what ran
    client = mlflow.MlflowClient(target(tmp_path).tracking_uri)
    assert client.get_run(failed.mlflow_run_id).info.status == "FAILED"


def test_a_timeout_that_is_not_a_positive_number_is_refused(tmp_path: Path):
    path = write_nb(tmp_path / "t.ipynb", params='asset = {"timeout": "soon"}\nn: int = 1')
    with pytest.raises(NotebookError, match=r"t\.ipynb: `asset\['timeout'\]` is the most seconds"):
        parse_notebook(path)
    path = write_nb(tmp_path / "r.ipynb", params='asset = {"max_runtime": -1}\nn: int = 1')
    with pytest.raises(NotebookError, match=r"r\.ipynb: `asset\['max_runtime'\]` is the most sec"):
        parse_notebook(path)
    path = write_nb(tmp_path / "m.ipynb", params='asset = {"max_output": 0.5}\nn: int = 1')
    with pytest.raises(NotebookError, match=r"m\.ipynb: `asset\['max_output'\]` is the most bytes"):
        parse_notebook(path)


def test_a_flooding_cell_is_cut_in_the_kept_copy_with_a_marker(tmp_path: Path):
    path = write_nb(
        tmp_path / "flood.ipynb",
        params='asset = {"max_output": 20000}\nn: int = 1',
        body="for i in range(200_000):\n    print('line', i)\nprint('after the flood')",
    )
    spec = parse_notebook(path)
    engine = PapermillEngine(Limits(max_output=spec.max_output))
    run = execute(spec, runs_dir=tmp_path / "runs", target=target(tmp_path), engine=engine)
    executed = nbformat.read(run.ipynb, as_version=4)
    flood = executed.cells[-1]
    text = "".join(str(o.get("text", "")) for o in flood.outputs)
    assert "line 0\n" in text and "line 199999" not in text
    assert "output was cut at 20,000 bytes" in text and "asset['max_output']" in text
    assert len(text) < 40_000  # the 2.5 MB it printed is not kept, nor rendered
    assert run.ipynb.stat().st_size < 100_000 and run.html is not None
    assert run.outputs["flood"]["executed_notebook"] == str(run.ipynb)  # still a success


def test_kernels_are_found_by_the_run_in_their_environment(tmp_path: Path):
    from dagma.lib.processes import tagged
    from dagma.notebooks.papermill_engine import RUN_ENV

    for pid, environ, state in [
        ("101", f"A=1\0{RUN_ENV}=run-1\0", "S"),
        ("102", f"{RUN_ENV}=run-12\0", "S"),
        ("103", f"{RUN_ENV}=run-1\0", "Z"),  # exited, not yet reaped: not a live kernel
    ]:
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "environ").write_bytes(environ.encode())
        (tmp_path / pid / "stat").write_text(f"{pid} (python) {state} 1 1 1")
    (tmp_path / "self").mkdir()
    assert tagged(RUN_ENV, "run-1", proc=tmp_path) == [101]  # not run-12: whole values only
    assert tagged(RUN_ENV, "run-2", proc=tmp_path) == []
