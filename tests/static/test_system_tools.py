"""`make test` and `.ci/run` install the suite's system tools through one script, or stop at once
naming the command; under CI a missing tool fails its tests instead of skipping them."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dagma.settings import PROJECT_ROOT
from tests.conftest import require

SCRIPT = PROJECT_ROOT / "scripts" / "install-system-tools.sh"


def as_a_user_who_cannot_install() -> list[str]:
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash"]
    can_sudo = shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"]).returncode == 0
    if can_sudo:
        pytest.skip("this user can sudo without a password: the script would install")
    return ["bash"]


def test_without_rights_it_stops_at_once_naming_the_install_command(tmp_path: Path):
    env = {**os.environ, "DAGMA_CHROMIUM": str(tmp_path / "no-chromium")}
    # A copy the other user can read: a checkout (or pytest's tmp) may sit in a 0700 folder.
    readable = Path(tempfile.mkdtemp(prefix="dagma-tools-"))
    readable.chmod(0o755)
    script = readable / SCRIPT.name
    shutil.copy(SCRIPT, script)
    script.chmod(0o644)
    done = subprocess.run(
        [*as_a_user_who_cannot_install(), str(script)],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    shutil.rmtree(readable)
    assert done.returncode == 1, done.stderr
    assert "missing: chromium chromium-driver" in done.stderr
    assert "sudo sh -c 'apt-get update -qq && " in done.stderr and "chromium" in done.stderr


def test_with_every_tool_present_it_does_nothing():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_make_test_and_ci_both_run_it_first():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "\ntest: tools lint " in makefile
    assert "bash scripts/install-system-tools.sh" in makefile
    ci = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()
    assert ci.index("bash scripts/install-system-tools.sh") < ci.index("make test")


def test_a_missing_tool_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"install-system-tools\.sh"):
        require(False, "no frobnicator")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no frobnicator"):
        require(False, "no frobnicator")
    require(True, "present")  # nothing happens
