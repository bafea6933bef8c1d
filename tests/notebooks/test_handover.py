"""A value crosses from the kernel that makes it to the kernel that reads it in one hop."""

from pathlib import Path

import pytest

from dagma.lab import materialize
from dagma.settings import get_settings
from tests.conftest import QUIET
from tests.notebooks.test_spec import write_nb

pytestmark = pytest.mark.integration

# Importable by the kernels (their working folder is the notebooks folder) and by this process.
COUNTED = """
import os


def _note(event):
    with open(os.environ["DAGMA_TEST_PICKLE_LOG"], "a") as fh:
        fh.write(f"{event} {os.getpid()}\\n")


def _restore(payload):
    _note("load")
    return Counted(payload)


class Counted:
    def __init__(self, payload):
        self.payload = payload

    def __reduce__(self):
        _note("dump")
        return _restore, (self.payload,)
"""


def test_each_value_is_pickled_once_and_unpickled_once_per_edge(
    lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    log = tmp_path / "pickles.log"
    monkeypatch.setenv("DAGMA_TEST_PICKLE_LOG", str(log))
    monkeypatch.syspath_prepend(str(lab))  # so a copy made in this process would be counted too
    (lab / "counted.py").write_text(COUNTED)
    write_nb(
        lab / "maker.ipynb",
        params="upstream = []",
        body="from counted import Counted\nfrom dagma import nb\nnb.context().output(Counted([1, 2, 3]))",
    )
    write_nb(
        lab / "taker.ipynb",
        params='upstream = ["maker"]',
        body=(
            "from dagma import nb\nctx = nb.context()\nvalue = ctx.upstream('maker')\n"
            "ctx.output({'n': len(value.payload), 'type': type(value).__name__})"
        ),
    )
    run = materialize(get_settings(), selection=["maker", "taker"], console=QUIET)
    assert run.success, run.error
    assert run.values["taker"] == {"n": 3, "type": "Counted"}

    events = [line.split() for line in log.read_text().splitlines()]
    dumps = [pid for event, pid in events if event == "dump"]
    loads = [pid for event, pid in events if event == "load"]
    assert len(dumps) == 1, events  # by the kernel that made it
    assert len(loads) == 1, events  # by the kernel that read it
    import os

    assert dumps[0] != loads[0] and str(os.getpid()) not in dumps + loads
