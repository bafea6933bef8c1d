"""The secrets compose.yaml requires from `.env`, which values are known to everyone, and `init`.

`init` gives every required secret that is missing or a placeholder a fresh random value and
keeps real values, comments and order. Standard library only (and `dagma.errors`, which is too),
on Python 3.8+: the devcontainer's `initializeCommand` and `scripts/start_env.sh` run it on the
host, where the project's venv may not exist: `PYTHONPATH=src python3 -m dagma.env_secrets
init|check .env`. The parser reads the subset of the dotenv format compose and `dagma` share
(`KEY=value`, `export`, quotes, ` #` comments); python-dotenv is not on such a host.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dagma.errors import DagmaError

# Every `${NAME:?}` of compose.yaml and the devcontainer's overlay;
# tests/static/test_required_secrets.py keeps compose, .env.example and the devcontainer equal.
REQUIRED = (
    "POSTGRES_PASSWORD",
    "DAGSTER_PG_PASSWORD",
    "MLFLOW_PG_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_READER_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
    "QDRANT_API_KEY",
    "QDRANT_READ_ONLY_API_KEY",
    "MINIO_ROOT_PASSWORD",
    "CLICKHOUSE_PASSWORD",
    "DAGMA_API_SECRET",
    "GRAFANA_ADMIN_PASSWORD",
)
PLACEHOLDER_PREFIX = "change-me"
EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"
INIT = (
    "dagma secrets init (without the venv: PYTHONPATH=src python3 -m dagma.env_secrets init .env)"
)
ONE_BY_HAND = "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
# A value written unquoted must survive compose's and python-dotenv's parsers unchanged.
_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@+=~%^-]*")


class SecretsError(DagmaError):
    """A secret is missing or known to everyone; the message names each and how to fix it."""

    exit_code = 2


@dataclass(frozen=True)
class Placeholder:
    """One secret whose value everyone knows (or that is not set at all)."""

    name: str
    where: str
    why: str

    @property
    def fix(self) -> str:
        if self.where == "the environment":
            return f"unset {self.name}, or export a random value: {ONE_BY_HAND}"
        if self.name in REQUIRED:
            return f"{INIT}; or one by hand: {ONE_BY_HAND}"
        return (
            f"remove {self.name} from {self.where} (services mode then generates one), "
            f"or set a random value: {ONE_BY_HAND}"
        )

    def __str__(self) -> str:
        return f"{self.name} in {self.where} {self.why}"


@dataclass
class InitReport:
    """What `init` did: the names it gave random values or took from the environment."""

    path: Path
    generated: list[str] = field(default_factory=list)
    from_environment: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    mode_fixed: bool = False

    def summary(self) -> str:
        lines = []
        if self.generated:
            lines.append(f"wrote fresh random values: {', '.join(self.generated)}")
        if self.from_environment:
            lines.append(f"wrote from the environment: {', '.join(self.from_environment)}")
        if self.kept:
            lines.append(f"kept: {', '.join(self.kept)}")
        if not (self.generated or self.from_environment):
            lines.append("every required secret already has a real value; nothing written")
        if self.mode_fixed:
            lines.append("set its mode to 600 (it was readable by others)")
        return f"{self.path} (mode 600):\n  " + "\n  ".join(lines)


def _value(raw: str) -> str:
    """The value of one `KEY=raw` line: quotes removed, an unquoted ` # comment` dropped."""
    if raw[:1] in ("'", '"'):
        quote = raw[0]
        end = raw.find(quote, 1)
        while quote == '"' and end > 0 and raw[end - 1] == "\\":
            end = raw.find(quote, end + 1)
        body = raw[1:end] if end > 0 else raw[1:]
        if quote == '"':
            body = body.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        return body
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()


def parse(text: str) -> dict[str, str]:
    """Name -> value of every assignment in a .env text; a later line wins, as in compose."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            values[match.group(1)] = _value(match.group(2))
    return values


def _text(path: Path) -> str:
    """The text of `path` ("" when there is none yet)."""
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretsError(f"cannot read {path}: {exc}; make it a readable UTF-8 file") from exc


def read(path: Path) -> dict[str, str]:
    return parse(_text(path))


def placeholder_reason(value: str, example: str | None = None) -> str | None:
    """Why everyone knows `value` (empty, `change-me…`, the one in .env.example), or None."""
    if not value.strip():
        return "is empty"
    if value.strip().lower().startswith(PLACEHOLDER_PREFIX):
        return f"is a placeholder ({PLACEHOLDER_PREFIX}...)"
    if example is not None and value == example:
        return "is the value in .env.example"
    return None


def _example_values(example: Path | None) -> dict[str, str]:
    return read(example if example is not None else EXAMPLE)


def placeholders(
    env_file: Path,
    environ: Mapping[str, str] | None = None,
    names: Iterable[str] = REQUIRED,
    *,
    missing: bool = False,
    empty_is_unset: bool = False,
    example: Path | None = None,
) -> list[Placeholder]:
    """Each of `names` whose value compose (or `dagma`) would use is known to everyone.

    The environment wins over `env_file`, as it does for compose. `missing` also reports names
    set nowhere; `empty_is_unset` skips empty values (services mode then generates one).
    """
    environ = os.environ if environ is None else environ
    in_file = read(env_file)
    known = _example_values(example)
    found = []
    for name in names:
        if name in environ:
            value, where = environ[name], "the environment"
        elif name in in_file:
            value, where = in_file[name], str(env_file)
        else:
            if missing:
                found.append(Placeholder(name, str(env_file), "is not set"))
            continue
        if empty_is_unset and not value.strip():
            continue
        why = placeholder_reason(value, known.get(name))
        if why:
            found.append(Placeholder(name, where, why))
    return found


def refuse(found: Sequence[Placeholder], doing: str) -> None:
    """Raise `SecretsError` naming each placeholder and its fix, when there is any."""
    if found:
        fixes = "\n".join(f"fix: {fix}" for fix in dict.fromkeys(p.fix for p in found))
        lines = "\n".join(f"  {p}" for p in found)
        raise SecretsError(
            f"refusing to {doing}; secrets missing or known to all:\n{lines}\n{fixes}"
        )


def _line(name: str, value: str) -> str:
    if _PLAIN.fullmatch(value):
        return f"{name}={value}"
    if "'" in value or "\n" in value:
        raise SecretsError(
            f"{name} from the environment holds a quote or a newline that .env cannot carry "
            f"unchanged: write it into .env yourself, quoted, then run {INIT}"
        )
    return f"{name}='{value}'"


def _write(path: Path, text: str) -> None:
    """Replace `path` whole (mode 600): a crash leaves the old file or the new, never half."""
    target = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=".env.", dir=target.parent)
    try:
        os.chmod(tmp, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def init(
    path: Path, environ: Mapping[str, str] | None = None, example: Path | None = None
) -> InitReport:
    """Give every required secret that is missing or a placeholder a value; keep the rest.

    A real value in the environment (a Codespaces secret) is used; otherwise a fresh random one.
    Real values in `path`, comments and order are kept. The file ends with mode 600.
    """
    environ = os.environ if environ is None else environ
    known = _example_values(example)
    text = _text(path)
    lines = text.splitlines()
    last_line: dict[str, int] = {}
    for index, line in enumerate(lines):
        match = _ASSIGNMENT.match(line)
        if match:
            last_line[match.group(1)] = index
    current = parse(text)
    loose = path.is_file() and bool(stat.S_IMODE(path.stat().st_mode) & 0o077)
    report = InitReport(path, mode_fixed=loose)
    added = []
    for name in REQUIRED:
        if name in current and not placeholder_reason(current[name], known.get(name)):
            report.kept.append(name)
            continue
        outside = environ.get(name, "")
        if outside and not placeholder_reason(outside, known.get(name)):
            value = outside
            report.from_environment.append(name)
        else:
            value = secrets.token_urlsafe(24)
            report.generated.append(name)
        if name in last_line:
            lines[last_line[name]] = _line(name, value)
        else:
            added.append(_line(name, value))
    if added:
        lines += [""] if lines else []
        lines += ["# Secrets compose.yaml requires, written by `dagma secrets init`.", *added]
    if report.generated or report.from_environment:
        try:
            _write(path, "\n".join(lines) + "\n")
        except OSError as exc:
            raise SecretsError(f"cannot write {path}: {exc}; pick a writable folder") from exc
    elif loose:
        os.chmod(path.resolve(), 0o600)
    return report


USAGE = "usage: python3 -m dagma.env_secrets init|check [PATH, default .env]"


def main(argv: Sequence[str] | None = None) -> int:
    """`init PATH` fills in the secrets; `check PATH` exits 2 naming each one that is known."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("init", "check") or len(args) > 2:
        print(USAGE, file=sys.stderr)
        return 2
    path = Path(args[1] if len(args) > 1 else ".env")
    try:
        if args[0] == "init":
            print(init(path).summary())
        else:
            refuse(placeholders(path, missing=True), "start compose")
    except DagmaError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
