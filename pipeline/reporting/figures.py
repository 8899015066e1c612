"""Figures written as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


ANNOTATED_CLASSES = 20   # above this many classes (VGGSound: 141) cells are colour only, ticks every 10th


def confusion_matrix_png(confusion: np.ndarray, path: Path, title: str) -> Path:
    """Save a confusion-matrix heat map (rows: true class, columns: predicted class), each cell labelled with
    its count up to ANNOTATED_CLASSES classes (141² labels take matplotlib ~25 s per figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = confusion.shape[0]
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=100)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.91)  # fixed margins: tight_layout costs 0.3 s
    ax.imshow(confusion, cmap="Blues")
    if n <= ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=6,
                        color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    ticks = range(n) if n <= ANNOTATED_CLASSES else range(0, n, 10)
    ax.set(xlabel="predicted", ylabel="true", title=title, xticks=ticks, yticks=ticks)
    ax.tick_params(labelsize=6)
    ax.title.set_fontsize(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def routing_curves_png(fractions: np.ndarray, labels: list[str], path: Path, title: str,
                       spread: np.ndarray | None = None) -> Path:
    """Per-epoch share of top-k picks going to each specialised teacher (paper Fig. 4): `fractions` is
    (epochs, N); `spread` (same shape, optional) is drawn as a ±band (e.g. the std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, fractions.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=100)
    for j, label in enumerate(labels):
        line, = ax.plot(epochs, fractions[:, j], marker="o", markersize=2.5, linewidth=1.2, label=label)
        if spread is not None:
            ax.fill_between(epochs, fractions[:, j] - spread[:, j], fractions[:, j] + spread[:, j],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(1.0 / len(labels), color="grey", linestyle=":", linewidth=0.8, label="uniform")
    ax.set(xlabel="epoch", ylabel="routing probability", title=title, ylim=(0, 1))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def topk_sweep_png(ks: list[int], means: dict[str, list[float]], stds: dict[str, list[float]], path: Path,
                   title: str) -> Path:
    """Test accuracy against the number of routed teachers k (paper Fig. 6), one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.4, 3.2), dpi=100)
    for label, values in means.items():
        ax.errorbar(ks, values, yerr=stds[label], marker="o", capsize=3, label=label)
    ax.set(xlabel="k (teachers per sample)", ylabel="test accuracy (%)", title=title, xticks=ks)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def box_plots_png(panels: dict[str, dict[str, list[float]]], path: Path, title: str,
                  reference: dict[str, float] | None = None, reference_label: str = "") -> Path:
    """One panel per key of `panels` (e.g. a target modality), one box per group holding its values over
    seeds (test accuracy, %), the seeds drawn as points; `reference` draws a dashed line per panel (e.g.
    the w/o KD mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.6, 1.2 + 3.2 * len(panels)), 3.4), dpi=100,
                             squeeze=False)
    for ax, (panel, groups) in zip(axes[0], panels.items()):
        labels = list(groups)
        ax.boxplot([groups[g] for g in labels], widths=0.5, showfliers=False)  # every seed is drawn as a point
        ax.set_xticks(range(1, len(labels) + 1), labels)
        for i, label in enumerate(labels, start=1):
            ax.scatter(np.full(len(groups[label]), i) + np.linspace(-0.08, 0.08, len(groups[label])),
                       groups[label], s=10, color="tab:blue", zorder=3)
        if reference and panel in reference:
            ax.axhline(reference[panel], color="tab:red", linestyle="--", linewidth=1, label=reference_label)
            ax.legend(fontsize=7, loc="lower right")
        ax.set(title=panel, ylabel="test accuracy (%)")
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
