"""Compare finished runs of one stream: a table with one row per method (mean ± std over seeds) and plots.

`compare(runs, out)` writes into `out`:
    comparison.csv                 one row per method; numeric columns as `<name>_mean` and `<name>_std`
    comparison.md                  the same table as "mean ± std" strings, with notes
    accuracy_matrix_<method>.png   each method's accuracy matrix (mean over seeds), one shared colour scale
    score_along_stream.png         each task's score after learning each later task, one line per method
    final_scores.png               final score per task by method, error bars = std over seeds
    differences.md, .csv           95% bootstrap intervals over seeds and test examples (confidence.py) of each
                                   method's task average and final task scores, and of its paired difference
                                   from the first method given; the test-sample interval beside the average's
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize

from continual_rpt.confidence import LEVEL, ONE_SEED_NOTE, by_seed, intervals

REQUIRED = ("stream", "method", "tasks", "accuracy_matrix", "average_score", "forgetting", "backward_transfer",
            "final_scores", "per_task", "wall_seconds")
SCORES = {"average_score": "average score", "forgetting": "forgetting", "backward_transfer": "backward transfer"}
TASK_FREE = {"task_free_average": "task-free average", "routing_accuracy": "routing accuracy"}  # runs that routed every stage
COSTS = {"prompt_tokens_in_context": "prompt tokens in context", "trainable_parameters": "trainable parameters",
         "stored_parameters": "stored parameters", "wall_seconds": "wall time (s)"}
NOTES = [
    "Mean ± sample standard deviation over seeds (a single seed shows the mean only); — : undefined "
    "(forgetting and backward transfer need two tasks). Forward transfer is not reported: no strategy here "
    "answers a task before learning it, so R[j-1][j] is never measured.",
    "Scores in percent. Prompt tokens in context: the most any task puts in front of the backbone's input "
    "(a bank puts one task's n tokens, the same for every task; progressive prompts grow along the stream). "
    "Trainable and stored parameters: sums over the tasks.",
    "Task-free: the same test examples with the task not given, each routed to a bank entry by the Mahalanobis "
    "router over the entries' stored input statistics (continual_rpt.routing); routing accuracy: the share routed "
    "to their own task's entry after the last task. — : a run without route state (made before routing existed, "
    "or a strategy whose entries are written only at the end).",
    "Controls (scored by every run on the same data): the best constant answer is the highest test score of any one "
    "answer given to every test example (each class or choice position, under the task's metric; chosen on test, so "
    "a ceiling of every constant, not a method); the linear probe is a logistic regression on the frozen backbone's "
    "pooled features, C chosen on dev. A method that does not beat the probe has learned nothing the backbone's embeddings did not hold.",
]
FONT = 12


class ReportError(ValueError):
    """Run folders that cannot be compared."""


def load_runs(runs: list[Path]) -> list[dict]:
    """Each folder's metrics.json, checked to be a finished run of the same stream and tasks as the first."""
    loaded = []
    for folder in runs:
        path = folder / "metrics.json"
        if not path.is_file():
            raise ReportError(f"{folder}: no metrics.json (unfinished run, or not a run folder); finish it with crpt run ... --resume")
        metrics = json.loads(path.read_text())
        missing = [key for key in REQUIRED if key not in metrics]
        if missing:
            raise ReportError(f"{path}: missing {', '.join(missing)}")
        loaded.append(metrics)
    first, first_folder = loaded[0], runs[0]
    for folder, metrics in zip(runs, loaded):
        if metrics["stream"] != first["stream"] or metrics["tasks"] != first["tasks"]:
            raise ReportError(f"{folder}: stream {metrics['stream']!r} with tasks {metrics['tasks']} differs from "
                              f"{first_folder} (stream {first['stream']!r}, tasks {first['tasks']}); only runs of one stream can be compared")
    return loaded


def group_runs(runs: list[Path], loaded: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by method (and backbone, where the runs use several), in the order first given."""
    backbones = {m.get("backbone") for m in loaded}
    groups: dict[str, list[dict]] = {}
    seen: dict[tuple, Path] = {}
    for folder, metrics in zip(runs, loaded):
        # runs written before `method` became one string hold the list of methods
        method = metrics["method"] if isinstance(metrics["method"], str) else "+".join(metrics["method"])
        label = method if len(backbones) == 1 else f"{method} [{metrics.get('backbone')}]"
        seed = metrics.get("seed")
        if seed is not None and (label, seed) in seen:  # the same run twice would weigh double in the mean
            raise ReportError(f"{folder}: same method, backbone and seed ({label}, seed {seed}) as {seen[label, seed]}")
        seen[label, seed] = folder
        groups.setdefault(label, []).append(metrics)
    return groups


def run_values(metrics: dict) -> dict[str, float | None]:
    """One run's numbers for the table, keyed by CSV column stem."""
    per_task = metrics["per_task"].values()
    return {
        **{key: metrics[key] for key in SCORES},
        **{key: metrics.get(key) for key in TASK_FREE},
        **{f"final_{task}": metrics["final_scores"][task] for task in metrics["tasks"]},
        "prompt_tokens_in_context": max(t["prompt_tokens_in_context"] for t in per_task),
        "trainable_parameters": sum(t["trainable_parameters"] for t in per_task),
        "stored_parameters": sum(t["stored_parameters"] for t in per_task),
        "wall_seconds": metrics["wall_seconds"],
    }


# Runs made before the best constant answer recorded the majority class; they are shown under that old name.
CONTROLS = {"best_constant": "best constant answer (control)", "majority": "majority class (control)",
            "linear_probe": "linear probe (control)"}


def control_values(groups: dict[str, list[dict]], key: str) -> list[dict[str, float]]:
    """One row per seed of a control's scores (`per_task.<key>_score`), from the first run of that seed that has them."""
    by_seed: dict = {}
    for runs in groups.values():
        for m in runs:
            scores = {t: m["per_task"][t].get(f"{key}_score") for t in m["tasks"]}
            if all(v is not None for v in scores.values()):
                by_seed.setdefault(m.get("seed"), scores)
    return [{"average_score": float(np.mean(list(scores.values()))), **{f"final_{t}": v for t, v in scores.items()}}
            for scores in by_seed.values()]


def summary_frame(groups: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per method, then one per control the runs scored: `seeds` and `<stem>_mean`, `<stem>_std` (std NaN for one seed)."""
    rows = {label: [run_values(m) for m in runs] for label, runs in groups.items()}
    rows.update({name: found for key, name in CONTROLS.items() if (found := control_values(groups, key))})
    values = pd.DataFrame([v for found in rows.values() for v in found], dtype=float)  # None -> NaN
    values.insert(0, "method", [label for label, found in rows.items() for _ in found])
    stats = values.groupby("method", sort=False).agg(["mean", "std"])
    stats.columns = [f"{stem}_{stat}" for stem, stat in stats.columns]
    stats.insert(0, "seeds", [len(found) for found in rows.values()])
    return stats.reset_index()


def cell(mean: float, std: float, digits: int, exact: bool = False) -> str:
    """A table cell: mean ± std with `digits` decimals, "—" when undefined; `exact` counts drop a zero std."""
    if math.isnan(mean):
        return "—"
    text = f"{mean:,.{digits}f}"
    if math.isnan(std) or (exact and std == 0):
        return text
    return f"{text} ± {std:,.{digits}f}"


def markdown(table: pd.DataFrame, loaded: list[dict]) -> str:
    """comparison.md: a heading, the table as "mean ± std" strings, and what the columns mean."""
    tasks = loaded[0]["tasks"]
    columns = [(stem, name, 1, False) for stem, name in {**SCORES, **TASK_FREE}.items()]
    columns += [(f"final_{task}", f"final {task}", 1, False) for task in tasks]
    columns += [(stem, name, 0, stem != "wall_seconds") for stem, name in COSTS.items()]
    header = ["method", "seeds", *(name for _, name, _, _ in columns)]
    rows = [[row.method, str(row.seeds), *(cell(row[f"{stem}_mean"], row[f"{stem}_std"], digits, exact)
                                           for stem, _, digits, exact in columns)]
            for _, row in table.iterrows()]
    backbones = sorted({str(m.get("backbone")) for m in loaded})
    lines = [f"# Comparison: stream {loaded[0]['stream']}", "",
             f"Tasks in order: {', '.join(tasks)}. Backbone: {', '.join(backbones)}. Runs: {len(loaded)}.", "",
             "| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


def mean_matrices(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of the accuracy matrix, NaN where no seed measured a cell."""
    frames = pd.concat([pd.DataFrame(m["accuracy_matrix"], dtype=float) for m in runs])
    by_cell = frames.groupby(level=0)  # rows of the same position across seeds
    return by_cell.mean().to_numpy(), by_cell.std().to_numpy()


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


def plot_along_stream(matrices: dict[str, tuple[np.ndarray, np.ndarray]], tasks: list[str], out: Path) -> None:
    """score_along_stream.png: per task, its score after learning it and every later task, one line per method."""
    T = len(tasks)
    ncols = min(T, 3)
    nrows = math.ceil(T / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.5, 4.3 * ncols), 3.3 * nrows + 0.9), sharey=True, squeeze=False, layout="constrained")
    colours = method_colours(list(matrices))
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
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 8), fontsize=FONT, frameon=False)
    fig.suptitle("Score of each task along the stream (band: ± std over seeds)", fontsize=FONT + 2)
    fig.savefig(out / "score_along_stream.png", dpi=120)
    plt.close(fig)


def plot_final_scores(table: pd.DataFrame, tasks: list[str], out: Path) -> None:
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
    fig.legend(loc="outside lower center", ncol=min(len(labels), 8), fontsize=FONT, frameon=False)
    fig.savefig(out / "final_scores.png", dpi=120)
    plt.close(fig)


def load_bootstraps(runs: list[Path], groups: dict[str, list[dict]], loaded: list[dict]) -> dict[str, dict[int, dict]] | None:
    """Each method's runs' resampled final scores by seed, or None if a run has none (made before bootstrap.json)."""
    by_metrics = {id(m): folder for folder, m in zip(runs, loaded)}
    found: dict[str, dict[int, dict]] = {}
    test_sets = None
    for label, group in groups.items():
        for m in group:
            path = by_metrics[id(m)] / "bootstrap.json"
            if not path.is_file():
                return None
            doc = json.loads(path.read_text())
            if test_sets is not None and doc["test_sets"] != test_sets:
                raise ReportError(f"{path}: the runs were scored on different test examples; their intervals cannot be paired")
            test_sets = doc["test_sets"]
            found.setdefault(label, {})[m.get("seed")] = doc["scores"]
    return found


def differences(boots: dict[str, dict[int, dict]], groups: dict[str, list[dict]], tasks: list[str]) -> pd.DataFrame:
    """Per method: the task average and each final task score with their intervals (seeds and test examples; the
    average's and the difference's also test-sample only), and the paired difference from the first method."""
    reference = next(iter(boots))
    rows = []
    for label, seeds in boots.items():
        runs = {m.get("seed"): m for m in groups[label]}
        average, test_only = intervals(float(np.mean([runs[s]["average_score"] for s in seeds])), by_seed(list(seeds.values()), tasks))
        row = {"method": label, "seeds": len(seeds), "average": average.estimate, "average_low": average.low, "average_high": average.high,
               "average_test_low": test_only.low, "average_test_high": test_only.high}
        for t in tasks:
            ci = intervals(float(np.mean([runs[s]["final_scores"][t] for s in seeds])), by_seed(list(seeds.values()), [t]))[0]
            row.update({f"final_{t}": ci.estimate, f"final_{t}_low": ci.low, f"final_{t}_high": ci.high})
        paired = sorted(set(seeds) & set(boots[reference]), key=str)  # the same seeds: same data samples and initial prompts
        if label != reference and paired:
            mine, theirs = by_seed([seeds[s] for s in paired], tasks), by_seed([boots[reference][s] for s in paired], tasks)
            ref_runs = {m.get("seed"): m for m in groups[reference]}
            estimate = float(np.mean([runs[s]["average_score"] - ref_runs[s]["average_score"] for s in paired]))
            diff, diff_test = intervals(estimate, mine - theirs)
            row.update({"vs": reference, "paired_seeds": len(paired), "difference": diff.estimate, "difference_low": diff.low,
                        "difference_high": diff.high, "difference_test_low": diff_test.low, "difference_test_high": diff_test.high,
                        "resolved": diff.excludes_zero})
        rows.append(row)
    return pd.DataFrame(rows)


def differences_markdown(frame: pd.DataFrame, tasks: list[str]) -> str:
    """differences.md: intervals of each method's scores and of its paired difference from the first method."""
    def span(row, stem):
        return f"{row[stem]:.1f} [{row[stem + '_low']:.1f}, {row[stem + '_high']:.1f}]"
    def test_span(row, stem):
        return f"[{row[stem + '_test_low']:.1f}, {row[stem + '_test_high']:.1f}]"
    header = ["method", "seeds", "average", "average, test-sample 95% interval", *(f"final {t}" for t in tasks),
              "difference from first (paired seeds)", "difference, test-sample 95% interval", "resolved"]
    lines = [f"# Confidence intervals ({LEVEL:.0%}, percentile bootstrap over seeds and test examples)", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for _, row in frame.iterrows():
        has_diff = "difference" in row and not pd.isna(row.get("difference"))
        diff = f"{span(row, 'difference')} vs {row['vs']} ({int(row['paired_seeds'])})" if has_diff else "—"
        resolved = ("yes" if row["resolved"] else "no") if has_diff else "—"
        lines.append("| " + " | ".join([row["method"], str(row["seeds"]), span(row, "average"), test_span(row, "average"),
                                         *(span(row, f"final_{t}") for t in tasks), diff,
                                         test_span(row, "difference") if has_diff else "—", resolved]) + " |")
    lines += ["", "A test resample draws the test examples (MultiRC questions, ReCoRD queries) with replacement; every run of the "
              "stream scores the same resamples. Each bootstrap draw takes the method's seeds with replacement and one test "
              "resample for them, and averages the drawn seeds; a difference is taken per seed and resample first, so both "
              "methods draw the same seeds and test examples. The test-sample interval averages every seed once per test "
              f"resample: it leaves out what another seed would change ({ONE_SEED_NOTE}). Resolved: the interval over seeds "
              "and test examples excludes 0."]
    return "\n".join(lines) + "\n"


def compare(runs: list[Path], out: Path) -> pd.DataFrame:
    """Compare finished run folders of one stream: write the table and plots into `out` and return the table."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ReportError("no run folders to compare")
    out = Path(out)
    loaded = load_runs(runs)
    groups = group_runs(runs, loaded)
    tasks = loaded[0]["tasks"]
    table = summary_frame(groups)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(markdown(table, loaded))
    matrices = {label: mean_matrices(group) for label, group in groups.items()}
    plot_matrices(matrices, {label: len(group) for label, group in groups.items()}, tasks, out)
    plot_along_stream(matrices, tasks, out)
    plot_final_scores(table, tasks, out)
    boots = load_bootstraps(runs, groups, loaded)
    if boots is not None:
        frame = differences(boots, groups, tasks)
        frame.to_csv(out / "differences.csv", index=False)
        (out / "differences.md").write_text(differences_markdown(frame, tasks))
    return table


def command(args: argparse.Namespace) -> int:
    """Run `crpt compare` and print the Markdown table."""
    compare(args.runs, args.out)
    print((args.out / "comparison.md").read_text(), end="")
    if (args.out / "differences.md").is_file():
        print((args.out / "differences.md").read_text(), end="")
    print(f"written to {args.out}: comparison.csv, comparison.md, differences.csv, differences.md (runs with bootstrap.json), "
          "accuracy_matrix_*.png, score_along_stream.png, final_scores.png")
    return 0
