"""crpt compare's plots: accuracy matrices, each task's score along the stream, final scores by method.

Each function writes its PNG into `out` and returns the figure (closed to pyplot, still inspectable).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize

FONT = 12


def file_label(label: str) -> str:
    """A method label made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")


def plot_matrices(matrices: dict[str, tuple[np.ndarray, np.ndarray]], seeds: dict[str, int], tasks: list[str], out: Path) -> None:
    """accuracy_matrix_<method>.png: heat maps of the mean with the scores written in, one colour scale for all methods."""
    everything = np.concatenate([mean.ravel() for mean, _ in matrices.values()])
    # one range for all methods, rounded out to tens (at least one ten wide, so a single value still has a scale)
    low = math.floor(np.nanmin(everything) / 10) * 10
    norm = Normalize(low, min(100, max(low + 10, math.ceil(np.nanmax(everything) / 10) * 10)))
    cmap = plt.get_cmap("viridis")
    T = len(tasks)
    for label, (matrix, _) in matrices.items():
        fig, ax = plt.subplots(figsize=(3.8 + 1.1 * T, 1.9 + 0.9 * T), layout="constrained")
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm)
        for (i, j), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                r, g, b, _ = cmap(norm(value))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # legible on light and dark cells
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color=ink, fontsize=FONT)
        ax.set_xticks(range(T), tasks, fontsize=FONT, rotation=30 if T > 4 else 0, ha="right" if T > 4 else "center")
        ax.set_yticks(range(T), [f"after {t}" for t in tasks], fontsize=FONT)
        ax.set_xlabel("score on task j", fontsize=FONT)
        ax.set_ylabel("after learning task i", fontsize=FONT)
        ax.set_title(f"{label}: accuracy matrix (mean of {seeds[label]} seed{'s' * (seeds[label] > 1)})", fontsize=FONT + 1)
        colorbar = fig.colorbar(image, ax=ax, shrink=0.85)
        colorbar.set_label("score (%)", fontsize=FONT)
        colorbar.ax.tick_params(labelsize=FONT - 1)
        fig.savefig(out / f"accuracy_matrix_{file_label(label)}.png", dpi=120)
        plt.close(fig)


def method_colours(labels: list[str]) -> dict[str, tuple]:
    """One colour per method, the same in every plot."""
    return {label: plt.get_cmap("tab10")(k % 10) for k, label in enumerate(labels)}


def fitted_legend(fig: plt.Figure, handles: list, labels: list[str]) -> None:
    """The legend below the plots, in as many columns as the figure's width holds (one row when every label fits)."""
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(len(labels), 8), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=FONT, frameon=False)
        if ncol == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            return
        legend.remove()


def unchanging(matrix: np.ndarray) -> bool:
    """Whether every task's score stays what it was when the task was learned (a bank's entries are frozen)."""
    return all(np.all(matrix[j:, j] == matrix[j, j]) for j in range(len(matrix)))


def plot_along_stream(matrices: dict[str, tuple[np.ndarray, np.ndarray]], tasks: list[str], out: Path) -> plt.Figure | None:
    """score_along_stream.png: per task, its score after learning it and every later task, one line per method that
    changes any (`unchanging` methods are flat lines; none is drawn, and no file written, when every method is)."""
    colours = method_colours(list(matrices))  # of every method, so that each keeps its colour of the other plots
    matrices = {label: (mean, std) for label, (mean, std) in matrices.items() if not unchanging(mean)}
    (out / "score_along_stream.png").unlink(missing_ok=True)  # a file of an earlier comparison in `out` would mislead
    if not matrices:
        return None
    T = len(tasks)
    ncols = min(T, 3)
    nrows = math.ceil(T / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.5, 4.3 * ncols), 3.3 * nrows + 0.9), sharey=True, squeeze=False, layout="constrained")
    for j, ax in enumerate(axes.flat):
        if j >= T:
            ax.set_visible(False)
            continue
        after = np.arange(j, T)
        for label, (mean, std) in matrices.items():
            ax.plot(after, mean[j:, j], marker="o", color=colours[label], label=label)
            ax.fill_between(after, mean[j:, j] - std[j:, j], mean[j:, j] + std[j:, j], color=colours[label], alpha=0.15, linewidth=0)
        ax.set_title(f"{tasks[j]} (task {j + 1})", fontsize=FONT + 1)
        ax.set_xlim(-0.4, T - 0.6)
        ax.set_xticks(range(T), tasks, fontsize=FONT - 1, rotation=30 if T > 4 else 0)
        ax.tick_params(axis="y", labelsize=FONT - 1)
        ax.grid(alpha=0.3)
        if j % ncols == 0:
            ax.set_ylabel("score (%)", fontsize=FONT)
        if j + ncols >= T:  # the lowest subplot of its column
            ax.set_xlabel("after learning", fontsize=FONT)
    fitted_legend(fig, *axes.flat[0].get_legend_handles_labels())
    fig.suptitle("Score of each task along the stream (band: ± std over seeds)", fontsize=FONT + 2)
    fig.savefig(out / "score_along_stream.png", dpi=120)
    plt.close(fig)
    return fig


def plot_final_scores(table: pd.DataFrame, tasks: list[str], out: Path) -> plt.Figure:
    """final_scores.png: grouped bars of each task's final score by method, error bars = std over seeds."""
    labels = list(table["method"])
    colours = method_colours(labels)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(min(16, max(6.5, 2 + len(tasks) * (0.6 + 0.22 * len(labels)))), 4.8), layout="constrained")
    x = np.arange(len(tasks))
    for k, row in table.iterrows():
        means = [row[f"final_{t}_mean"] for t in tasks]
        stds = [row[f"final_{t}_std"] for t in tasks]  # NaN for one seed: no error bar is drawn
        ax.bar(x + (k - (len(labels) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               color=colours[row["method"]], label=f"{row['method']} (n={row['seeds']})")
    ax.set_xticks(x, tasks, fontsize=FONT)
    ax.tick_params(axis="y", labelsize=FONT - 1)
    ax.set_ylabel("final score (%)", fontsize=FONT)
    ax.set_title("Final score per task (error bars: std over seeds)", fontsize=FONT + 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fitted_legend(fig, *ax.get_legend_handles_labels())
    fig.savefig(out / "final_scores.png", dpi=120)
    plt.close(fig)
    return fig
