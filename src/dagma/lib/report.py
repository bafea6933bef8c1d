"""A one-page picture of the lab's latest results."""

from __future__ import annotations

from pathlib import Path


def metrics_chart(metrics: dict[str, float], path: Path, title: str = "Dagma lab") -> Path:
    """A horizontal bar chart of scores in [0, 1], saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1))
    bars = ax.barh(names, [metrics[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, fmt="%.3f", padding=3)
    ax.set_xlim(0, 1.12)
    ax.invert_yaxis()
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
