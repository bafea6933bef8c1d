"""`--write-docs` records results from a committed HEAD only, checked with real git repos."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dagma.settings import PROJECT_ROOT

BENCHMARKS = PROJECT_ROOT / "benchmarks"
spec = importlib.util.spec_from_file_location("_report", BENCHMARKS / "_report.py")
assert spec and spec.loader
report = importlib.util.module_from_spec(spec)
sys.modules.setdefault("_report", report)  # its dataclass looks itself up there
spec.loader.exec_module(report)

SCRIPTS = [
    "bench_notebook.py",
    "bench_graph.py",
    "bench_vectors.py",
    "bench_backfill.py",
    "bench_api.py",
    "bench_telemetry.py",
]
START, END = "<!-- x:start -->", "<!-- x:end -->"


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed repo with a source file, the docs page and copies of the benchmarks."""
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text(f"# Benchmarks\n\n{START}\nold\n{END}\n")
    shutil.copytree(BENCHMARKS, tmp_path / "benchmarks", ignore=shutil.ignore_patterns("__py*"))
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "start")
    return tmp_path


def docs(repo: Path) -> Path:
    return repo / "docs" / "benchmarks.md"


def test_a_clean_tree_is_its_commit_even_with_untracked_files_and_new_docs(repo):
    (repo / "notes.txt").write_text("untracked\n")
    docs(repo).write_text("rewritten by an earlier benchmark\n")
    tree = report.start(True, False, repo, docs(repo))
    assert tree == report.Tree(git(repo, "rev-parse", "--short", "HEAD"))
    assert report.commit_line(tree, report.tree_state(repo, docs(repo))) == tree.commit


def test_uncommitted_changes_refuse_write_docs_naming_the_files_and_the_fix(repo, capsys):
    (repo / "code.py").write_text("x = 2\n")
    (repo / "staged.py").write_text("y = 1\n")
    git(repo, "add", "staged.py")
    with pytest.raises(SystemExit) as exit_:
        report.start(True, False, repo, docs(repo))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "code.py, staged.py" in err
    assert "Commit first" in err and "--allow-dirty" in err


def test_allow_dirty_records_with_the_changes_marked(repo):
    (repo / "code.py").write_text("x = 2\n")
    commit = git(repo, "rev-parse", "--short", "HEAD")
    tree = report.start(True, True, repo, docs(repo))
    assert tree.changed == ("code.py",)
    line = report.commit_line(tree, report.tree_state(repo, docs(repo)))
    assert line == f"{commit} **plus uncommitted changes in: code.py**"
    report.write_section(f"{START}\nnew\n{END}", START, END, tree, True, repo, docs(repo))
    assert "new" in docs(repo).read_text() and "old" not in docs(repo).read_text()


def test_a_commit_or_an_edit_during_the_run_refuses_to_record(repo, capsys):
    tree = report.start(True, False, repo, docs(repo))
    (repo / "code.py").write_text("x = 2\n")
    git(repo, "commit", "-q", "-am", "during the run")
    with pytest.raises(SystemExit) as exit_:
        report.write_section(f"{START}\nnew\n{END}", START, END, tree, False, repo, docs(repo))
    assert exit_.value.code == 2
    assert f"HEAD moved from {tree.commit}" in capsys.readouterr().err
    assert "old" in docs(repo).read_text()
    moved = report.commit_line(tree, report.tree_state(repo, docs(repo)))
    assert moved.startswith(f"{tree.commit} **(HEAD moved to ")


def test_outside_git_write_docs_refuses(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        report.start(True, False, tmp_path, tmp_path / "benchmarks.md")
    assert exit_.value.code == 2
    assert "git cannot tell which commit" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_refuses_before_measuring(repo, script):
    (repo / "code.py").write_text("x = 2\n")
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / script), "--write-docs"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "differ from HEAD" in proc.stderr and "code.py" in proc.stderr
    assert "old" in docs(repo).read_text()


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("bench_notebook.py", ["--allow-dirty"], "--allow-dirty applies only with --write-docs"),
        ("bench_notebook.py", ["--write-docs", "--only", "python"], "not one with --only"),
        ("bench_graph.py", ["--write-docs", "--quick"], "not one with --quick"),
    ],
)
def test_flags_that_cannot_record_are_errors(repo, script, args, message):
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
