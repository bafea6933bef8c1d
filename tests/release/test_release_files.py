"""Offline checks of the release flow's files: the workflows' schema, the SemVer tag trigger,
least privilege, pinned actions, and Release Drafter's configuration.

Each check runs on the real files and on a deliberately broken copy in tmp_path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yml"
DRAFTER = ROOT / ".github" / "release-drafter.yml"
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")
SEMVER_TAGS = ["v0.1.0", "v1.2.3", "v10.20.30", "v1.2.3-rc.1", "v2.0.0-beta"]
OTHER_TAGS = ["1.2.3", "v1.2", "v1", "va.b.c", "vfoo.bar.baz", "v1.2.3.4", "release-1.2.3"]
# Release Drafter's documented configuration keys (its README, "Configuration Options").
DRAFTER_KEYS = {
    "_extends", "template", "header", "footer", "category-template", "name-template",
    "tag-template", "tag-prefix", "version-template", "change-template",
    "change-title-escapes", "no-changes-template", "references", "categories",
    "exclude-labels", "include-labels", "include-paths", "exclude-contributors",
    "no-contributors-template", "replacers", "sort-by", "sort-direction", "prerelease",
    "prerelease-identifier", "include-pre-releases", "latest", "version-resolver",
    "commitish", "filter-by-commitish", "autolabeler",
}  # fmt: skip
CATEGORY_KEYS = {"title", "label", "labels", "collapse-after"}
AUTOLABEL_KEYS = {"label", "files", "branch", "title", "body"}
RESOLVER_KEYS = {"major", "minor", "patch", "default"}


def load(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    return workflow.get("on", workflow.get(True)) or {}  # YAML 1.1 reads `on` as true


def schema_check(*paths: Path) -> subprocess.CompletedProcess[str]:
    if not CHECK_JSONSCHEMA.exists():
        pytest.fail(f"{CHECK_JSONSCHEMA} is missing: run `uv sync --frozen` (dev group)")
    argv = [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", *map(str, paths)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_every_workflow_matches_the_github_workflow_schema() -> None:
    names = {p.name for p in WORKFLOWS.glob("*.yml")}
    assert {"ci.yml", "release.yml", "release-drafter.yml"} <= names
    done = schema_check(*sorted(WORKFLOWS.glob("*.yml")))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_refuses_a_release_workflow_with_a_misspelt_permission(tmp_path: Path) -> None:
    broken = tmp_path / "release.yml"
    broken.write_text(RELEASE.read_text().replace("packages: write", "packages: writ", 1))
    done = schema_check(broken)
    assert done.returncode != 0
    assert "writ" in done.stdout + done.stderr


def github_glob(pattern: str) -> re.Pattern[str]:
    """A GitHub Actions filter pattern (*, **, ?, +, [...]) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if char == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
            continue
        out += {"*": "[^/]*", "?": "?", "+": "+"}.get(char, re.escape(char))
        i += 1
    return re.compile(out)


def release_problems(path: Path) -> list[str]:
    """What is wrong with a release workflow: its trigger, its privileges, its actions' pins."""
    workflow = load(path)
    problems = []
    patterns = [github_glob(p) for p in triggers(workflow).get("push", {}).get("tags", [])]
    for tag in SEMVER_TAGS:
        if not any(p.fullmatch(tag) for p in patterns):
            problems.append(f"the SemVer tag {tag} does not start a release")
    for tag in OTHER_TAGS:
        if any(p.fullmatch(tag) for p in patterns):
            problems.append(f"the tag {tag}, not SemVer, starts a release")
    if workflow.get("permissions") != {"contents": "read"}:
        problems.append("the workflow's default permissions are more than contents: read")
    writes = {
        name: {k for k, v in (job.get("permissions") or {}).items() if v == "write"}
        for name, job in workflow["jobs"].items()
    }
    if {n for n, w in writes.items() if w} != {"image", "release"}:
        problems.append(f"jobs that may write: {writes}")
    if writes.get("image") != {"packages"} or writes.get("release") != {"contents"}:
        problems.append(f"image must write packages only, release contents only: {writes}")
    for name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            uses = step.get("uses", "")
            if uses and not re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", uses):
                problems.append(f"job {name}: {uses} is not pinned to a version")
    return problems


def test_the_release_workflow_starts_on_semver_tags_only_with_least_privilege() -> None:
    assert release_problems(RELEASE) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('      - "v[0-9]+.[0-9]+.[0-9]+"\n', '      - "v*"\n', "not SemVer, starts a release"),
        ("permissions:\n  contents: read", "permissions:\n  contents: write", "default"),
        (
            "contents: write # create",
            "contents: write\n      packages: write #",
            "release contents only",
        ),
        ("docker/login-action@v3", "docker/login-action@master", "not pinned"),
    ],
)
def test_a_broken_release_workflow_is_refused(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    text = RELEASE.read_text()
    assert old in text
    broken = tmp_path / "release.yml"
    broken.write_text(text.replace(old, new, 1))
    assert any(problem in p for p in release_problems(broken)), release_problems(broken)


def semver_step(path: Path) -> str:
    steps = load(path)["jobs"]["version"]["steps"]
    return next(s["run"] for s in steps if s.get("id") == "semver")


@pytest.mark.parametrize("tag", SEMVER_TAGS + OTHER_TAGS)
def test_the_version_job_accepts_exactly_the_semver_tags(tmp_path: Path, tag: str) -> None:
    output = tmp_path / "output"
    env = {**os.environ, "TAG": tag, "GITHUB_OUTPUT": str(output), "GITHUB_SHA": "a" * 40}
    script = semver_step(RELEASE)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    if tag in OTHER_TAGS:
        assert done.returncode == 1 and "is not SemVer" in done.stdout, done.stdout
        return
    assert done.returncode == 0, done.stdout + done.stderr
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert outputs == {
        "version": tag[1:],
        "commit": "aaaaaaa",
        "prerelease": str("-" in tag).lower(),
    }


def test_the_image_gets_the_build_args_its_dockerfile_declares() -> None:
    workflow = load(RELEASE)
    build = next(s for s in workflow["jobs"]["image"]["steps"] if "build-push" in s.get("uses", ""))
    args = {line.split("=", 1)[0] for line in build["with"]["build-args"].splitlines()}
    dockerfile = (ROOT / build["with"]["file"]).read_text()
    declared = set(re.findall(r"^ARG (\w+)", dockerfile, flags=re.M))
    assert args == {"DAGMA_VERSION", "DAGMA_COMMIT"} and args <= declared
    assert workflow["jobs"]["ci"]["uses"] == "./.github/workflows/ci.yml"
    assert "workflow_call" in triggers(load(WORKFLOWS / "ci.yml"))


def title_regex(rule: str) -> re.Pattern[str]:
    """A Release Drafter title rule, '/regex/flags', as Python reads it."""
    match = re.fullmatch(r"/(.*)/([a-z]*)", rule)
    assert match, rule
    return re.compile(match[1], re.I if "i" in match[2] else 0)


def drafter_problems(path: Path, types: list[str]) -> list[str]:
    """Unknown keys, and category or version labels that nothing applies."""
    config = load(path)
    problems = [f"unknown key {k!r}" for k in sorted(set(config) - DRAFTER_KEYS)]
    rules = config.get("autolabeler", [])
    problems += [f"unknown autolabeler key in {r}" for r in rules if set(r) - AUTOLABEL_KEYS]
    made = {r["label"] for r in rules}
    for category in config.get("categories", []):
        if set(category) - CATEGORY_KEYS:
            problems.append(f"unknown category key in {category}")
        labels = category.get("labels", []) + ([category["label"]] if "label" in category else [])
        problems += [f"category {category['title']!r}: nothing applies {label!r}" for label in labels if label not in made]  # fmt: skip
    resolver = config.get("version-resolver", {})
    problems += [f"unknown version-resolver key {k!r}" for k in set(resolver) - RESOLVER_KEYS]
    for level in ("major", "minor", "patch"):
        for label in resolver.get(level, {}).get("labels", []):
            if label not in made:
                problems.append(f"version-resolver {level}: nothing applies {label!r}")
    # Every type the commit-msg hook allows labels a pull request titled with it.
    for kind in types:
        title = f"{kind}(scope): a change"
        labels = {r["label"] for r in rules if any(title_regex(t).search(title) for t in r.get("title", []))}  # fmt: skip
        if not labels:
            problems.append(f"a pull request titled {title!r} gets no label")
    breaking = {r["label"] for r in rules if any(title_regex(t).search("feat!: x") for t in r.get("title", []))}  # fmt: skip
    if not breaking & set(resolver.get("major", {}).get("labels", [])):
        problems.append("a breaking change (feat!:) does not resolve to a major version")
    return problems


@pytest.fixture(scope="module")
def types() -> list[str]:
    repos = load(ROOT / ".pre-commit-config.yaml")["repos"]
    hook = next(h for r in repos for h in r["hooks"] if h["id"] == "conventional-pre-commit")
    return [a for a in hook["args"] if not a.startswith("-")]


def test_release_drafter_config_uses_documented_keys_and_labels_it_applies(
    types: list[str],
) -> None:
    assert drafter_problems(DRAFTER, types) == []
    rule = title_regex(next(r for r in load(DRAFTER)["autolabeler"] if r["label"] == "feature")["title"][0])  # fmt: skip
    assert rule.search("feat(api): x") and not rule.search("fix: feat")


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("categories:", "categorys:", "unknown key 'categorys'"),
        ("labels: [feature]", "labels: [enhancement]", "nothing applies 'enhancement'"),
        ("  - label: performance\n    title: ['/^perf(\\(.+\\))?!?:/']\n", "", "'perf(scope)"),
        ("  major:\n    labels: [breaking]", "  major:\n    labels: []", "major version"),
    ],
)
def test_a_broken_release_drafter_config_is_refused(
    tmp_path: Path, types: list[str], old: str, new: str, problem: str
) -> None:
    text = DRAFTER.read_text()
    assert old in text
    broken = tmp_path / "release-drafter.yml"
    broken.write_text(text.replace(old, new, 1))
    found = drafter_problems(broken, types)
    assert any(problem in p for p in found), found


def test_the_contributing_guide_cuts_a_release_in_four_commands() -> None:
    guide = (ROOT / "docs" / "contributing.md").read_text()
    assert "## How to cut a release" in guide
    section = guide.split("## How to cut a release", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "the section has no bash block"
    commands = [line.split("#")[0].strip() for line in block[1].splitlines()]
    commands = [c for c in commands if c]
    assert commands == [
        "uv run git-cliff --unreleased --tag vX.Y.Z",
        'git tag -a vX.Y.Z -m "vX.Y.Z"',
        "git push origin vX.Y.Z",
        "gh release view vX.Y.Z",
    ]


def pin_drift(release: Path) -> dict[str, tuple[str, str]]:
    """Pins release.yml states again that differ from ci.yml's (front doors: test_front_doors)."""
    ci, rel = load(WORKFLOWS / "ci.yml")["env"], load(release)["env"]
    return {k: (ci[k], rel[k]) for k in ("PYTHON_VERSION", "UV_VERSION") if ci[k] != rel.get(k)}


def test_the_release_jobs_use_ci_s_python_and_uv(tmp_path: Path) -> None:
    assert pin_drift(RELEASE) == {}
    broken = tmp_path / "release.yml"
    uv = load(WORKFLOWS / "ci.yml")["env"]["UV_VERSION"]
    broken.write_text(RELEASE.read_text().replace(f'UV_VERSION: "{uv}"', 'UV_VERSION: "0.1.0"'))
    assert pin_drift(broken) == {"UV_VERSION": (uv, "0.1.0")}
