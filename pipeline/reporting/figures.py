"""Figures written as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_matrix_png(confusion: np.ndarray, path: Path, title: str) -> Path:
    """Save a labelled confusion-matrix heat map (rows: true class, columns: predicted class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = confusion.shape[0]
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=6,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title, xticks=range(n), yticks=range(n))
    ax.tick_params(labelsize=6)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
