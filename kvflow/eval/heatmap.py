"""Accuracy grids as annotated PNG heat maps (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path


def save_heatmap(path: str | Path, accuracy: Sequence[Sequence[float | None]], row_labels: Sequence[str],
                 col_labels: Sequence[str], title: str, xlabel: str, ylabel: str) -> Path:
    """Rows x columns of accuracies in [0, 1] (None = not run, drawn grey), each cell annotated."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if v is None else float(v) for v in row] for row in accuracy], dtype=float)
    rows, cols = grid.shape if grid.size else (len(row_labels), len(col_labels))
    width = max(1.1 * max(cols, 2) + 2.2, 6.0)
    title = "\n".join(textwrap.fill(line, int(width * 11)) for line in title.splitlines())
    fig, ax = plt.subplots(figsize=(width, 0.6 * max(rows, 2) + 1.4 + 0.2 * title.count("\n")))
    try:
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")
        image = ax.imshow(np.ma.masked_invalid(grid.reshape(rows, cols)), cmap=cmap, vmin=0.0, vmax=1.0,
                          aspect="auto")
        for i in range(rows):
            for j in range(cols):
                value = grid[i, j]
                ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                        fontsize=9, color="black")
        ax.set_xticks(range(cols), [str(c) for c in col_labels])
        ax.set_yticks(range(rows), [str(r) for r in row_labels])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, label="accuracy")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out
