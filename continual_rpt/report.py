"""Compare finished runs of one stream: a table with one row per method (mean ± std over seeds) and plots.

`compare(runs, out)` writes into `out`:
    comparison.csv                 one row per method; numeric columns as `<name>_mean` and `<name>_std`
    comparison.md                  the same table as "mean ± std" strings, with notes
    accuracy_matrix_<method>.png   each method's accuracy matrix (mean over seeds), one shared colour scale
    score_along_stream.png         each task's score after learning each later task, one line per method whose
                                   scores change (a bank's never do: comparison.md names those left out)
    final_scores.png               final score per task by method and control (one equal to a method shown once),
                                   error bars = std over seeds
    differences.md, .csv           95% bootstrap intervals over seeds and test examples (intervals.py) of each
                                   method's task average and final task scores, and of its paired difference
                                   from the first method given; the test-sample interval beside the average's
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from continual_rpt.intervals import LEVEL, ONE_SEED_NOTE, by_seed, intervals
from continual_rpt.plots import plot_along_stream, plot_final_scores, plot_matrices, unchanging

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


def _scores(rows: list[dict]) -> list[tuple]:
    # Rounded: a run's average and a control's are the same mean summed in another order.
    return sorted(tuple(round(v, 6) for k, v in sorted(row.items()) if k == "average_score" or k.startswith("final_")) for row in rows)


def scored_controls(groups: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Each control the runs scored (its rows per seed), less those whose scores a method's runs have exactly (control -> method)."""
    methods = {label: _scores([run_values(m) for m in runs]) for label, runs in groups.items()}
    shown, same = {}, {}
    for key, name in CONTROLS.items():
        if found := control_values(groups, key):
            twin = next((label for label, scores in methods.items() if scores == _scores(found)), None)
            shown.update({} if twin else {name: found})
            same.update({name: twin} if twin else {})
    return shown, same


def summary_frame(groups: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per method, then one per control the runs scored that no method equals: `seeds` and `<stem>_mean`, `<stem>_std`
    (std NaN for one seed)."""
    rows = {label: [run_values(m) for m in runs] for label, runs in groups.items()}
    rows.update(scored_controls(groups)[0])
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


def markdown(table: pd.DataFrame, loaded: list[dict], notes: list[str] = ()) -> str:
    """comparison.md: a heading, the table as "mean ± std" strings, what the columns mean, and `notes` on this comparison."""
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
    lines += ["", *NOTES, *notes]
    return "\n".join(lines) + "\n"


def comparison_notes(groups: dict[str, list[dict]], matrices: dict[str, tuple[np.ndarray, np.ndarray]], along_drawn: bool) -> list[str]:
    """What this comparison shows once or not at all: controls equal to a method, methods whose scores never change along the stream."""
    notes = [f"The {control} has exactly the scores of method {method}; it is shown once, as {method}."
             for control, method in scored_controls(groups)[1].items()]
    flat = [label for label, (mean, _) in matrices.items() if unchanging(mean)]
    if flat and along_drawn:
        notes.append(f"score_along_stream.png leaves out {', '.join(flat)}: no task's score changes after it is learned "
                     "(a bank's entries are frozen), so their lines would be flat.")
    elif flat:
        notes.append("score_along_stream.png is not drawn: no method's task scores change after the task is learned "
                     "(a bank's entries are frozen), so every line would be flat; the accuracy matrices show the scores.")
    return notes


def mean_matrices(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of the accuracy matrix, NaN where no seed measured a cell."""
    frames = pd.concat([pd.DataFrame(m["accuracy_matrix"], dtype=float) for m in runs])
    by_cell = frames.groupby(level=0)  # rows of the same position across seeds
    return by_cell.mean().to_numpy(), by_cell.std().to_numpy()


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
    matrices = {label: mean_matrices(group) for label, group in groups.items()}
    plot_matrices(matrices, {label: len(group) for label, group in groups.items()}, tasks, out)
    along = plot_along_stream(matrices, tasks, out)
    plot_final_scores(table, tasks, out)
    (out / "comparison.md").write_text(markdown(table, loaded, comparison_notes(groups, matrices, along is not None)))
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
          "accuracy_matrix_*.png, score_along_stream.png (unless every method's scores stay as learned), final_scores.png")
    return 0
