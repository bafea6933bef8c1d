"""New wine samples that land as CSV files in the lab's inbox, grouped by the hour they landed.

A file belongs to the UTC hour of its modification time, so `touch` re-ingests it. Files are
only read, never moved or deleted: the inbox is the record of what arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagma.errors import DagmaError

if TYPE_CHECKING:
    import pandas as pd

HOUR_FORMAT = "%Y-%m-%d-%H:00"  # Dagster's hourly partition keys
SUFFIX = ".csv"
# Rows one inbox file may have; a larger one is named and skipped (DAGMA_INBOX_MAX_ROWS).
MAX_ROWS = 100_000


class ArrivalError(DagmaError, ValueError):
    """An inbox file cannot be ingested; the message names the file and the fix."""


@dataclass(frozen=True)
class Landed:
    """One inbox file and when it landed."""

    path: Path
    mtime_ns: int

    @property
    def hour(self) -> str:
        return hour_of(self.mtime_ns)


def hour_key(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(HOUR_FORMAT)


def feature_columns() -> list[str]:
    """The 13 measurements a wine sample must have (the columns of `data.load_wine`)."""
    from dagma.lib.data import load_wine

    return [c for c in load_wine().columns if c != "target"]


def utf8_name(path: Path) -> bool:
    """Whether a file's name is text (a name of raw bytes cannot be stored or shown)."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _files(inbox: Path) -> list[Path]:
    if not inbox.is_dir():
        return []
    return [p for p in inbox.iterdir() if p.is_file() and not p.name.startswith(".")]


def landed(inbox: Path) -> list[Landed]:
    """Every CSV file directly in `inbox`, oldest first; none when the folder is missing."""
    files = [
        Landed(p, p.stat().st_mtime_ns)
        for p in _files(inbox)
        if p.suffix.lower() == SUFFIX and utf8_name(p)
    ]
    return sorted(files, key=lambda f: (f.mtime_ns, f.path.name))


def ignored(inbox: Path) -> list[Path]:
    """Files in `inbox` that are not CSV, which the sensor reports rather than reads."""
    return sorted(p for p in _files(inbox) if p.suffix.lower() != SUFFIX and utf8_name(p))


def badly_named(inbox: Path) -> list[Path]:
    """Files whose names are not UTF-8 text: reported, never read."""
    return sorted(p for p in _files(inbox) if not utf8_name(p))


def hour_of(mtime_ns: int) -> str:
    return hour_key(datetime.fromtimestamp(mtime_ns / 1e9, tz=UTC))


def landed_in(inbox: Path, hour: str) -> list[Landed]:
    return [f for f in landed(inbox) if f.hour == hour]


def changed_since(files: Iterable[Landed], seen: Mapping[str, int]) -> dict[str, list[Landed]]:
    """Files new or modified since `seen` (name -> mtime_ns), grouped by their landing hour."""
    by_hour: dict[str, list[Landed]] = {}
    for f in files:
        if seen.get(f.path.name) != f.mtime_ns:
            by_hour.setdefault(f.hour, []).append(f)
    return by_hour


def batch_key(hour: str, files: Iterable[Landed]) -> str:
    """A stable id for one hour's set of files, so a tick repeated after a crash is not re-run."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path.name):
        digest.update(f"{f.path.name}:{f.mtime_ns}\n".encode())
    return f"{hour}:{digest.hexdigest()[:12]}"


def read_file(f: Landed, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """One file's rows, with `source_file` and `landed_at`; ArrivalError names what to fix."""
    import pandas as pd

    features = feature_columns()
    try:
        # Only a blank cell is missing; "n/a" or "NaN" in a feature is reported as text.
        frame = pd.read_csv(f.path, keep_default_na=False, na_values=[""], nrows=max_rows + 1)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ArrivalError(
            f"{f.path}: not a readable CSV ({exc}). Fix or remove the file; it is re-read "
            "when its modification time changes."
        ) from None
    except OSError as exc:
        raise ArrivalError(f"{f.path}: cannot be read ({exc}). Fix its permissions.") from None
    if len(frame) > max_rows:
        raise ArrivalError(
            f"{f.path}: has more than {max_rows:,} rows. Split it into smaller files, or raise "
            "DAGMA_INBOX_MAX_ROWS."
        )
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ArrivalError(
            f"{f.path}: missing column(s) {', '.join(missing)}. A wine sample needs all of "
            f"{', '.join(features)} (and optionally `target`). Fix the header and save again."
        )
    if frame.empty:
        raise ArrivalError(f"{f.path}: has a header but no rows. Add samples or remove it.")
    keep = features + (["target"] if "target" in frame.columns else [])
    frame = frame[keep].copy()
    for column in keep:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() if column != "target" else values.isna() & frame[column].notna()
        if bad.any():
            row = int(bad.idxmax()) + 2  # 1-based, after the header line
            value = frame[column][bad].iloc[0]
            what = "empty" if pd.isna(value) else f"{value!r}, not a number"
            raise ArrivalError(
                f"{f.path}: line {row}, column {column!r} is {what}. Fix the value and "
                "save the file again."
            )
        frame[column] = values
    frame["source_file"] = f.path.name
    frame["landed_at"] = pd.Timestamp(f.mtime_ns, unit="ns", tz="UTC")
    return frame


def read(files: Iterable[Landed], max_rows: int = MAX_ROWS) -> tuple[pd.DataFrame, dict[str, str]]:
    """The rows of every good file, and what is wrong with each bad one (by file name).

    A bad file never keeps the good ones out: it is named, with its fix, and skipped.
    """
    import pandas as pd

    frames, problems = [], {}
    for f in files:
        try:
            frames.append(read_file(f, max_rows))
        except ArrivalError as exc:
            problems[f.path.name] = str(exc)
    if not frames:
        columns = [*feature_columns(), "target", "source_file", "landed_at"]
        return pd.DataFrame(columns=columns), problems
    return pd.concat(frames, ignore_index=True), problems


def combine(parts: Mapping[str, pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    """One frame from the hourly partitions a daily notebook reads, in landing order."""
    import pandas as pd

    if isinstance(parts, pd.DataFrame):
        return parts
    frames = [parts[k] for k in sorted(parts) if len(parts[k])]
    if not frames:
        return read([])
    return pd.concat(frames, ignore_index=True).sort_values("landed_at", kind="stable")


def write_sample(inbox: Path, *, rows: int = 30, seed: int = 42, name: str | None = None) -> Path:
    """Drop a CSV of `rows` labelled wine samples, lightly perturbed, into `inbox`."""
    import numpy as np

    from dagma.lib.data import load_wine

    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}.")
    frame = load_wine().sample(n=min(rows, 178), random_state=seed).reset_index(drop=True)
    features = [c for c in frame.columns if c != "target"]
    noise = np.random.default_rng(seed).normal(1.0, 0.02, size=(len(frame), len(features)))
    frame[features] = (frame[features] * noise).round(3)
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / (name or f"samples-{datetime.now(UTC):%Y%m%dT%H%M%S}-{seed}{SUFFIX}")
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)  # the sensor never sees half a file
    return path


def score(model: Any, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Predicted cultivar per sample, and the day's counts (and accuracy when labelled)."""
    features = feature_columns()
    scored = frame.copy()
    if len(frame):
        scored["predicted"] = model.predict(frame[features])
    else:
        scored["predicted"] = []
    metrics: dict[str, float] = {
        "rows": float(len(scored)),
        "files": float(scored["source_file"].nunique()),
    }
    for label in (0, 1, 2):
        metrics[f"predicted_class_{label}"] = float((scored["predicted"] == label).sum())
    labelled = scored.dropna(subset=["target"]) if "target" in scored else scored.iloc[:0]
    if len(labelled):
        metrics["accuracy"] = float((labelled["predicted"] == labelled["target"]).mean())
        metrics["labelled_rows"] = float(len(labelled))
    return scored, metrics


def hourly_figure(scored: pd.DataFrame, title: str) -> Any:
    """Samples per landing hour, stacked by predicted cultivar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    if len(scored):
        hours = scored["landed_at"].dt.strftime("%H:00")
        table = scored.assign(hour=hours).pivot_table(
            index="hour", columns="predicted", values="source_file", aggfunc="count", fill_value=0
        )
        table.plot.bar(stacked=True, ax=ax, rot=0)
        ax.legend(title="predicted cultivar")
    else:
        ax.text(0.5, 0.5, "no samples landed", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("hour landed (UTC)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    return fig
