"""docs/runbook.md names a test for each bad-input case, and every test it names exists."""

import ast
import re

from dagma.settings import PROJECT_ROOT

RUNBOOK = PROJECT_ROOT / "docs" / "runbook.md"
CASES = [
    "Malformed notebook",
    "Unknown parameter",
    "Ill-typed parameter",
    "Upstream that does not exist",
    "Cycle between notebooks",
    "Missing required env var",
    "Unreachable Postgres",
    "Unreachable MLflow",
    "Unreachable Qdrant",
    "Embedded store locked",
    "Wrong Qdrant API key",
    "Empty corpus",
    "Empty or too long question",
    "Corrupt embedded store",
    "Bad inbox file",
    "Inbox file not ingested",
    "Bad retrain schedule",
    "Unknown notebook engine",
    "Unknown dagstermill input",
    "dagstermill not reconstructable",
    "Run waits for a pool",
    "Slot held by a dead run",
    "runs/ fills the disk",
    "Inbox file from the future or with a raw name",
    "Re-saved inbox file",
    "Placeholder secret",
    "Parameter type not allowed",
    "Archive signature refused",
    "Archive holds what no backup writes",
    "MLflow reader could write",
    "Gateway without its certificate",
]


def rows() -> dict[str, str]:
    table = [ln for ln in RUNBOOK.read_text().splitlines() if ln.startswith("| ")]
    return {ln.split("|")[1].strip(): ln for ln in table}


def test_every_case_of_the_catalogue_has_a_row_with_a_test():
    found = rows()
    for case in CASES:
        assert case in found, f"docs/runbook.md has no row for {case!r}"
        assert "tests/" in found[case].split("|")[-2], f"{case!r} names no test"


def test_every_test_the_runbook_names_exists():
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", RUNBOOK.read_text())
    assert len(named) >= len(CASES)
    for path, name in named:
        file = PROJECT_ROOT / path
        assert file.is_file(), f"docs/runbook.md names {path}, which does not exist"
        functions = {
            n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)
        }
        assert name in functions, f"docs/runbook.md names {path}::{name}, which does not exist"
