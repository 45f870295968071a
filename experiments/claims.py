"""Tabulate and plot the paper's claims from the runs of the claims grids.

    python experiments/claims.py

Reads `experiments/results/claims_{methods,lr,init,design,fewshot}/runs/*.json` (written by
`experiments/grid.py experiments/claims/<grid>.yaml`) and writes `experiments/results/claims/`:
`claims.md` (every table, with the paired differences that the claims are about), one CSV per
table, PNG plots, `init_scale.csv` (the starting scale of Φ(P) as published and scale-matched,
measured on the backbone without training) and `environment.json`.

Scores are test-half scores (dev half for early stopping only), mean ± sample std over seeds. An
"average" is the mean over the grid's tasks, taken per seed first, so its std is over seeds too.
A difference "a − b" pairs runs of the same seed (same data sample and same initial P); where the
runs kept their scores on bootstrap resamples of their test sets, it also gets a 95% interval that
resamples seeds and test examples, and the test-sample one, which leaves seeds out (intervals.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
import transformers

from continual_rpt import __version__
from grid import constant_control, machine_description, paired_interval, resampled_by_seed, show_pair

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = ("methods", "lr", "init", "design", "fewshot")
# What the lr, init and design grids vary. A grid that leaves out its reference setting (lr 0.3;
# vocab init; m = 400, shared φ with LayerNorm) borrows the methods grid's n = 10 runs for it, and the
# controls, which the cl-cpu grids run once: the same runs, so repeating them would only cost time.
VARIED = {"lr": ("train_config", {"lr"}), "init": ("prompt_config", {"init"}),
          "design": ("prompt_config", {"bottleneck", "per_token", "layer_norm", "match_embedding_scale"})}
METHOD_COLORS = {"rpt": "tab:blue", "pt": "tab:orange", "pt-mlp": "tab:green", "head": "grey"}


def load_grid(results: Path, grid: str) -> list[dict]:
    """Every run record of one claims grid (an empty list if the grid has not run)."""
    records = []
    for path in sorted((results / f"claims_{grid}" / "runs").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not a run record ({err}); delete it and re-run the grid to redo that run") from err
    return records


def differences(record: dict, other: dict, ignored: dict[str, set[str]]) -> list[str]:
    """The settings in which two runs differ, leaving out the method and the `ignored` keys of each config."""
    found = [f"{name}.{key}" for name in ("prompt_config", "train_config")
             for key in sorted(set(record.get(name, {})) | set(other.get(name, {})))
             if key != "method" and key not in ignored.get(name, set()) and record[name].get(key) != other[name].get(key)]
    return found + [key for key in ("train_examples", "test_set") if record.get(key) != other.get(key)]


def reference_label(grid: str, run: dict) -> str:
    """The variant name a methods-grid n = 10 run stands for in the lr, init or design grid."""
    if grid == "lr":
        return f"lr{run['train_config']['lr']:g}"
    return run["prompt_config"]["init"] if grid == "init" else f"m{run['prompt_config']['bottleneck']}"


def with_references(grid: str, runs: list[dict], methods_runs: list[dict]) -> list[dict]:
    """`runs` of the lr, init or design grid, plus the methods grid's runs it left out: the controls and
    the n = 10 runs at the reference setting, labelled as its variant (lr0.3, vocab, m400). Each borrowed run must
    match the grid's runs of its task and seed in everything but the setting the grid varies."""
    if not runs or grid not in VARIED:
        return runs
    section, keys = VARIED[grid]
    studied = {r["method"] for r in runs}
    borrowed = []
    for ref in finished(methods_runs):
        control = ref["method"] in ("head", "linear-probe")
        if control:
            label, ignored = "", {"prompt_config": set(ref["prompt_config"]), section: keys}
        elif ref.get("variant") == "n10" and ref["method"] in studied:
            label, ignored = reference_label(grid, ref), {section: keys}
        else:
            continue
        if ref["method"] in studied and (control or select(runs, ref["method"], label)):
            continue  # the grid ran this control or its reference setting itself
        for partner in (r for r in runs if r["task"] == ref["task"] and r["seed"] == ref["seed"] and (control or r["method"] == ref["method"])):
            if mismatch := differences(ref, partner, ignored):
                raise SystemExit(f"claims_methods' {ref['task']} {ref['method']} {ref['variant'] or ''} seed {ref['seed']} cannot stand in "
                                 f"for claims_{grid}'s {label or ref['method']}: it differs from {partner['task']} {partner['method']} "
                                 f"{partner['variant']} seed {partner['seed']} in {', '.join(mismatch)}; give the {grid} grid that setting itself")
        borrowed.append({**ref, "variant": label, "borrowed_from": "claims_methods"})
    return runs + borrowed


def control_rows(runs: list[dict]) -> list[tuple[str, str, str]]:
    """The table rows of the head-only control and, where it ran, the linear probe."""
    return [("head-only control", "head", "")] + [("linear probe control", "linear-probe", "")] * bool(select(runs, "linear-probe"))


def select(runs: list[dict], method: str, variant: str = "") -> list[dict]:
    """The runs of one method and variant."""
    return [r for r in runs if r["method"] == method and r.get("variant", "") == variant]


def finished(runs: list[dict]) -> list[dict]:
    """The runs that trained (a diverged run has no scores)."""
    return [r for r in runs if r["test_score"] is not None]


def grid_files(results: Path, runs: dict[str, list[dict]]) -> list[str]:
    """The grid files that made the runs under `results` (their environment.json names each command)."""
    files = []
    for grid in (g for g in GRIDS if runs[g]):
        env = results / f"claims_{grid}" / "environment.json"
        command = json.loads(env.read_text()).get("command", "") if env.is_file() else ""
        files.append(next((part for part in command.split() if part.endswith(".yaml")), f"experiments/claims/{grid}.yaml"))
    return files


def lengths_of(runs: list[dict]) -> tuple[str, ...]:
    """The prompt-length variants (n2, n10, n100) the methods grid ran."""
    return tuple(v for v in ("n2", "n10", "n100") if any(r.get("variant") == v for r in runs))


def methods_of(runs: list[dict], methods: tuple[str, ...]) -> tuple[str, ...]:
    """Those of `methods` the grid ran."""
    return tuple(m for m in methods if any(r["method"] == m for r in runs))


def tasks_of(runs: list[dict]) -> list[str]:
    """Task names in first-seen order."""
    return list(dict.fromkeys(r["task"] for r in runs))


def per_seed_average(runs: list[dict], tasks: list[str]) -> dict[int, float]:
    """seed -> mean test score over `tasks`, for the seeds that have every task."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in finished(runs):
        by_seed.setdefault(r["seed"], {})[r["task"]] = r["test_score"]
    return {s: statistics.mean(v[t] for t in tasks) for s, v in sorted(by_seed.items()) if all(t in v for t in tasks)}


def average(runs: list[dict], method: str, variant: str, tasks: list[str]) -> tuple[float, float]:
    """Mean and std over seeds of one method and variant's task-averaged test score."""
    return mean_std(list(per_seed_average(select(runs, method, variant), tasks).values()))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value); NaNs for none."""
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def show(mean: float, std: float, signed: bool = False) -> str:
    """'mean ± std' with one decimal, '—' when there is nothing."""
    if mean != mean:
        return "—"
    mean = round(mean, 1) + 0.0  # no "-0.0"
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


def score_rows(runs: list[dict], rows: list[tuple[str, str, str]], tasks: list[str]) -> list[dict]:
    """One row per (label, method, variant): per-task and average test mean/std over seeds, seed count."""
    out = []
    for label, method, variant in rows:
        mine = select(runs, method, variant)
        row = {"row": label, "method": method, "variant": variant, "seeds": len(per_seed_average(mine, tasks)),
               "diverged": len(mine) - len(finished(mine))}
        for task in tasks:
            row[task] = mean_std([r["test_score"] for r in finished(mine) if r["task"] == task])
        row["average"] = average(runs, method, variant, tasks)
        out.append(row)
    return out


def majority_row(runs: list[dict], tasks: list[str]) -> dict:
    """The constant-answer control per task: the best constant answer, or the majority class of older records."""
    label, key = constant_control(runs)
    row = {"row": label, "method": "", "variant": "", "seeds": 0, "diverged": 0}
    for task in tasks:
        row[task] = mean_std([r[key] for r in runs if r["task"] == task and r["method"] == "head" and key in r])
    row["average"] = mean_std([])
    return row


def paired_difference(runs: list[dict], a: tuple[str, str], b: tuple[str, str], tasks: list[str]) -> tuple[float, float, int]:
    """Mean ± std over seeds of average(a) − average(b), seeds paired; and the number of pairs."""
    first, second = per_seed_average(select(runs, *a), tasks), per_seed_average(select(runs, *b), tasks)
    diffs = [first[s] - second[s] for s in first if s in second]
    return (*mean_std(diffs), len(diffs))


def markdown(rows: list[dict], tasks: list[str]) -> list[str]:
    """A score table as Markdown lines."""
    lines = ["| | " + " | ".join(tasks) + " | average | seeds |", "|---" * (len(tasks) + 3) + "|"]
    for row in rows:
        seeds = f"{row['seeds'] or '—'}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        lines.append(f"| {row['row']} | " + " | ".join(show(*row[t]) for t in tasks) + f" | {show(*row['average'])} | {seeds} |")
    return lines


def write_csv(path: Path, rows: list[dict], tasks: list[str]) -> None:
    """A score table as CSV: mean and std columns per task and for the average."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["row", "method", "variant", "seeds", "diverged_runs"] + [f"{c}_{s}" for c in (*tasks, "average") for s in ("mean", "std")])
        for row in rows:
            values = [f"{v:.2f}" if v == v else "" for c in (*tasks, "average") for v in row[c]]
            writer.writerow([row["row"], row["method"], row["variant"], row["seeds"], row["diverged"], *values])


def difference_lines(runs: list[dict], pairs: list[tuple[str, tuple[str, str], tuple[str, str]]], tasks: list[str]) -> list[str]:
    """Markdown bullet lines of paired differences of the task-averaged score, with 95% bootstrap intervals
    (over seeds and test examples; over the test sample) where the runs kept their resampled test scores."""
    lines = []
    for label, (method_a, variant_a), (method_b, variant_b) in pairs:
        mean, std, n = paired_difference(runs, (method_a, variant_a), (method_b, variant_b), tasks)
        text = f"- {label}: {show(mean, std, signed=True)} points ({n} paired seeds)"
        first, second = resampled_by_seed(runs, variant_a, method_a, tasks), resampled_by_seed(runs, variant_b, method_b, tasks)
        if n and len(set(first) & set(second)) == n:  # every pair of seeds has resamples
            text += f"; 95% interval over seeds and test examples {show_pair(paired_interval(first, second, tasks, label))}"
        lines.append(text)
    return lines


def line_plot(path: Path, title: str, xlabel: str, xs: list, series: dict[str, list[tuple[float, float]]],
              floor: tuple[float, float] | None, log_x: bool = False) -> None:
    """Average test score against a setting, one line per method (error bars: std over seeds)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, points in series.items():
        ax.errorbar(range(len(xs)) if not log_x else xs, [m for m, _ in points], yerr=[s for _, s in points],
                    marker="o", capsize=3, label=method, color=METHOD_COLORS.get(method))
    if floor is not None and floor[0] == floor[0]:
        ax.axhline(floor[0], color="grey", linestyle="--", label="head-only control")
        ax.axhspan(floor[0] - floor[1], floor[0] + floor[1], color="grey", alpha=0.15)
    if log_x:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs if log_x else range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test score, task average (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(out: Path, name: str, title: str, runs: list[dict], rows: list[tuple[str, str, str]], notes: list[str],
            majority: bool = True) -> list[str]:
    """Write one claim's CSV and return its Markdown: the table, the majority row (if asked), then notes."""
    tasks = tasks_of(runs)
    table = score_rows(runs, rows, tasks) + ([majority_row(runs, tasks)] if majority else [])
    write_csv(out / f"{name}.csv", table, tasks)
    return [f"## {title}", "", *markdown(table, tasks), "", *notes, ""]


def methods_and_length(out: Path, runs: list[dict]) -> list[str]:
    """Claims 1 and 2: rpt vs pt vs pt-mlp at n = 2, 10, 100."""
    if not runs:
        return ["## Claims 1–2: methods and prompt length", "", "Not run yet.", ""]
    tasks, lengths, methods = tasks_of(runs), lengths_of(runs), methods_of(runs, ("rpt", "pt", "pt-mlp"))
    rows = control_rows(runs) + [(f"{m}, n={v[1:]}", m, v) for v in lengths for m in methods if select(runs, m, v)]
    pairs = [(f"rpt − pt at n={v[1:]}", ("rpt", v), ("pt", v)) for v in lengths]
    pairs += [(f"rpt at n={v[1:]} − linear probe", ("rpt", v), ("linear-probe", "")) for v in lengths if select(runs, "linear-probe")]
    pairs += [(f"rpt − pt-mlp at n={v[1:]}", ("rpt", v), ("pt-mlp", v)) for v in lengths if select(runs, "pt-mlp", v)]
    pairs += [("rpt at n=10 − pt at n=100 (10× shorter prompt)", ("rpt", "n10"), ("pt", "n100"))] * ("n100" in lengths)
    pairs += [("rpt at n=10 − head-only", ("rpt", "n10"), ("head", "")),
              ("pt at n=10 − head-only", ("pt", "n10"), ("head", ""))]
    series = {m: [average(runs, m, v, tasks) for v in lengths] for m in methods}
    head = average(runs, "head", "", tasks)
    line_plot(out / "prompt_length.png", "Prompt length (claims 1–2)", "prompt tokens n", [int(v[1:]) for v in lengths], series, head)
    n_values = ", ".join(v[1:] for v in lengths)
    return section(out, "methods_length", f"Claims 1–2: {' vs '.join(methods)}, prompt length n ∈ {{{n_values}}}",
                   runs, rows, ["Paired differences of the task average:", *difference_lines(runs, pairs, tasks)])


def learning_rate(out: Path, runs: list[dict]) -> list[str]:
    """Claim 3: the spread of scores over learning rates."""
    if not runs:
        return ["## Claim 3: learning-rate robustness", "", "Not run yet.", ""]
    tasks = tasks_of(runs)
    lrs = sorted({r["variant"] for r in runs if r["variant"]}, key=lambda v: float(v[2:]))
    rows = control_rows(runs) + [(f"{m}, lr {v[2:]}", m, v) for m in ("rpt", "pt") for v in lrs]
    notes = ["Spread (max − min over learning rates of the seed-mean task average):"]
    series = {}
    for method in ("rpt", "pt"):
        means = {v: average(runs, method, v, tasks) for v in lrs}
        series[method] = [means[v] for v in lrs]
        paper = {float(v[2:]): means[v][0] for v in lrs if 0.01 <= float(v[2:]) <= 10 and means[v][0] == means[v][0]}
        every = [m for m, _ in means.values() if m == m]
        tried = {v: select(runs, method, v) for v in lrs}
        failed = [f"lr {v[2:]} in {len(mine) - len(finished(mine))} of {len(mine)} runs" for v, mine in tried.items()
                  if len(finished(mine)) < len(mine)]
        if failed:
            notes.append(f"- {method} diverged (no finite dev evaluation) at: " + ", ".join(failed))
        if paper:
            notes.append(f"- {method}: {max(paper.values()) - min(paper.values()):.1f} points over lr {min(paper):g}–{max(paper):g} "
                         f"(inside the paper's 0.01–10 range for its < 2 points claim), {max(every) - min(every):.1f} over "
                         f"all {len(every)}; best lr {max(means, key=lambda v: means[v][0])[2:]}")
    pairs = [(f"{m}: lr {v[2:]} − lr {w[2:]}", (m, v), (m, w)) for m in ("rpt", "pt") for v, w in zip(lrs, lrs[1:])]
    notes += ["", "Paired differences of the task average between neighbouring learning rates:", *difference_lines(runs, pairs, tasks)]
    head = average(runs, "head", "", tasks)
    line_plot(out / "learning_rate.png", "Learning-rate robustness (claim 3)", "learning rate of P" + " and Φ" * (not any(
              r.get("train_config", {}).get("phi_lr") for r in runs)), [float(v[2:]) for v in lrs], series, head, log_x=True)
    return section(out, "learning_rate", f"Claim 3: learning-rate robustness, lr ∈ {{{', '.join(v[2:] for v in lrs)}}}",
                   runs, rows, notes)


def initialisation(out: Path, runs: list[dict]) -> list[str]:
    """Robustness to the prompt's initialisation: sampled vocabulary embeddings vs uniform noise."""
    if not runs:
        return ["## Robustness to initialisation", "", "Not run yet.", ""]
    tasks = tasks_of(runs)
    rows = control_rows(runs) + [(f"{m}, {v} init", m, v) for m in ("rpt", "pt") for v in ("vocab", "uniform")]
    pairs = [(f"{m}: uniform − vocab", (m, "uniform"), (m, "vocab")) for m in ("rpt", "pt")]
    pairs += [(f"rpt − pt with {v} init", ("rpt", v), ("pt", v)) for v in ("vocab", "uniform")]
    return section(out, "initialisation", "Robustness to initialisation: vocab vs uniform P (n=10, lr 0.3)", runs, rows,
                   ["Paired differences of the task average:", *difference_lines(runs, pairs, tasks)])


def design(out: Path, runs: list[dict], scale_lines: list[str]) -> list[str]:
    """Claim 4 and the scale question: bottleneck m, shared vs per-token φ, LayerNorm, scale-matched output."""
    if not runs:
        return ["## Claim 4: design of φ, and φ's output scale", "", "Not run yet.", ""]
    tasks = tasks_of(runs)
    widths = sorted({r["variant"] for r in runs if re.fullmatch(r"m\d+", r["variant"])}, key=lambda v: int(v[1:]))
    others = [(label, v, pair) for label, v, pair in (("one φ per token", "per-token", "per-token − shared"),
                                                      ("no LayerNorm", "no-layernorm", "no LayerNorm − LayerNorm"),
                                                      ("output scale matched to the embeddings", "scale-matched", "scale-matched − as published"))
              if select(runs, "rpt", v)]
    rows = control_rows(runs)
    rows += [(f"rpt, m={v[1:]}" + (" (as published: shared, LayerNorm)" if v == "m400" else ""), "rpt", v) for v in widths]
    rows += [(f"rpt, {label} (m=400)", "rpt", v) for label, v, _ in others]
    pairs = [(pair, ("rpt", v), ("rpt", "m400")) for _, v, pair in others]
    pairs += [(f"m={v[1:]} − m=400", ("rpt", v), ("rpt", "m400")) for v in widths if v != "m400"]
    series = {"rpt": [average(runs, "rpt", v, tasks) for v in widths]}
    head = average(runs, "head", "", tasks)
    line_plot(out / "bottleneck.png", "Bottleneck width (claim 4)", "bottleneck m", [int(v[1:]) for v in widths], series, head, log_x=True)
    notes = ["Paired differences of the task average (m=400 shared with LayerNorm is the reference):",
             *difference_lines(runs, pairs, tasks), "", *scale_lines]
    return section(out, "design", "Claim 4: bottleneck m, shared vs per-token φ, LayerNorm; φ's output scale", runs, rows, notes)


def few_shot(out: Path, runs: list[dict]) -> list[str]:
    """Claim 5: 5, 20 and 100 training examples per class."""
    if not runs:
        return ["## Claim 5: few-shot", "", "Not run yet.", ""]
    tasks = tasks_of(runs)
    ks = sorted({r["variant"] for r in runs}, key=lambda v: int(v[1:]))
    controls = ("head", "linear-probe") if select(runs, "linear-probe", ks[0]) else ("head",)
    rows = [(f"{m}, k={v[1:]}", m, v) for v in ks for m in (*controls, "rpt", "pt")]
    pairs = [(f"rpt − pt at k={v[1:]}", ("rpt", v), ("pt", v)) for v in ks]
    pairs += [(f"rpt − {c} at k={v[1:]}", ("rpt", v), (c, v)) for v in ks for c in controls]
    series = {m: [average(runs, m, v, tasks) for v in ks] for m in ("rpt", "pt", "head")}
    line_plot(out / "few_shot.png", "Few-shot (claim 5)", "training examples per class", [int(v[1:]) for v in ks], series, None)
    return section(out, "few_shot", f"Claim 5: few-shot, k ∈ {{{', '.join(v[1:] for v in ks)}}} examples per class", runs, rows,
                   ["Paired differences of the task average:", *difference_lines(runs, pairs, tasks), "",
                    "No majority-class row: every class has k training examples, so the majority is a tie."], majority=False)


def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and the mean over runs of one history field (runs of one setting share their steps)."""
    steps = [h["step"] for h in runs[0]["history"]]
    curves = [[h[key] if h[key] is not None else float("nan") for h in r["history"]] for r in runs]
    length = min(map(len, curves))
    return steps[:length], [statistics.mean(c[k] for c in curves) for k in range(length)]


def convergence(out: Path, runs: list[dict]) -> list[str]:
    """Claim 6: dev score and training loss against training steps (the methods grid evaluates every 10 steps)."""
    if not runs:
        return ["## Claim 6: convergence", "", "Not run yet.", ""]
    tasks, lengths, methods = tasks_of(runs), lengths_of(runs), methods_of(runs, ("head", "rpt", "pt", "pt-mlp"))

    def runs_of(task: str, method: str, variant: str) -> list[dict]:
        return [r for r in finished(select(runs, method, "" if method == "head" else variant)) if r["task"] == task]

    for key, ylabel, name in (("dev_score", "dev score (%)", "convergence.png"),
                              ("train_loss", "training loss since the last evaluation", "convergence_loss.png")):
        fig, axes = plt.subplots(len(tasks), len(lengths), figsize=(4.2 * len(lengths), 3.2 * len(tasks)), squeeze=False)
        for i, task in enumerate(tasks):
            for j, variant in enumerate(lengths):
                ax = axes[i][j]
                for method in methods:
                    if mine := runs_of(task, method, variant):
                        ax.plot(*mean_curve(mine, key), label=method, color=METHOD_COLORS[method],
                                linestyle="--" if method == "head" else "-")
                ax.set_title(f"{task}, n={variant[1:]}")
                ax.set_xlabel("training step")
                ax.set_ylabel(ylabel)
        axes[0][0].legend()
        fig.suptitle(f"{ylabel[0].upper() + ylabel[1:]} against training steps, mean over seeds (claim 6)")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)

    lines = ["| task | n | method | dev curve mean | step of best dev | final training loss | seeds |", "|---|---|---|---|---|---|---|"]
    csv_lines = ["task,n,method,dev_curve_mean,dev_curve_std,best_step_mean,best_step_std,final_loss_mean,final_loss_std,seeds"]
    for task in tasks:
        for method, variant in [("head", "")] * ("head" in methods) + [(m, v) for v in lengths for m in methods if m != "head"]:
            if not (mine := runs_of(task, method, variant)):
                continue
            auc = mean_std([statistics.mean(h["dev_score"] for h in r["history"] if h["dev_score"] is not None) for r in mine])
            best = mean_std([float(r["best_step"]) for r in mine])
            loss = mean_std([r["history"][-1]["train_loss"] for r in mine])
            lines.append(f"| {task} | {variant[1:] or '—'} | {method} | {show(*auc)} | {best[0]:.0f} ± {best[1]:.0f} | "
                         f"{loss[0]:.3f} ± {loss[1]:.3f} | {len(mine)} |")
            csv_lines.append(f"{task},{variant[1:]},{method},{auc[0]:.2f},{auc[1]:.2f},{best[0]:.1f},{best[1]:.1f},"
                             f"{loss[0]:.4f},{loss[1]:.4f},{len(mine)}")
    (out / "convergence.csv").write_text("\n".join(csv_lines) + "\n")
    patience = sorted({r.get("train_config", {}).get("patience", 0) for r in runs})
    stopping = "no early stopping" if patience == [0] else f"early stopping after {'/'.join(map(str, patience))} evaluations without improvement"
    return [f"## Claim 6: convergence (dev every 10 steps, {stopping})", "",
            "Plots: `convergence.png` (dev score), `convergence_loss.png` (training loss).", "", *lines, "",
            "Dev curve mean: the dev score averaged over all evaluations of a run (the area under the curve "
            "divided by its length): higher means it got good sooner and stayed there. Where a dev half is "
            "small (tens of examples, as for CB and COPA), the training loss is the steadier signal.", ""]


def init_scale(out: Path, seeds: list[int], name: str = "embedded") -> list[str]:
    """Starting scale of Φ(P) on backbone `name`, as published and scale-matched (no training)."""
    from continual_rpt.backbones import load_backbone
    from continual_rpt.learner import build_prompt
    from continual_rpt.prompts import PromptConfig

    backbone = load_backbone(name)
    rows = ["| φ's output | word embedding norm | ‖P_i‖ | ‖φ(P_i)‖ | ‖Φ(P_i)‖ | share of P in Φ(P) (‖P‖/‖Φ(P)‖) | mean pairwise cosine of the n Φ(P_i) |",
            "|---|---|---|---|---|---|---|"]
    csv_lines = ["config,seed,embedding_norm,p_norm,phi_norm,prompt_norm,p_share,pairwise_cosine"]
    for label, matched in (("as published", False), ("scale-matched", True)):
        stats = []
        for seed in seeds:
            prompt = build_prompt(backbone, PromptConfig(method="rpt", n_tokens=10, match_embedding_scale=matched), seed)
            with torch.no_grad():
                p, full = prompt.prompt, prompt()
                unit = torch.nn.functional.normalize(full, dim=1)
                cos = unit @ unit.T
                n = cos.shape[0]
                stat = (p.norm(dim=1).mean().item(), (full - p).norm(dim=1).mean().item(), full.norm(dim=1).mean().item(),
                        (p.norm() / full.norm()).item(), ((cos.sum() - n) / (n * (n - 1))).item())
            stats.append(stat)
            csv_lines.append(f"{label},{seed},{backbone.embedding_norm:.4f}," + ",".join(f"{v:.4f}" for v in stat))
        mean = [statistics.mean(s[k] for s in stats) for k in range(5)]
        rows.append(f"| {label} | {backbone.embedding_norm:.2f} | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} | {mean[3]:.3f} | {mean[4]:.2f} |")
    (out / "init_scale.csv").write_text("\n".join(csv_lines) + "\n")
    return [f"φ's output scale at initialisation (backbone {name}, n=10, m=400, mean over seeds "
            f"{', '.join(map(str, seeds))}; no training):", "", *rows]


def write_claims(results: Path = RESULTS, backbone: str = "embedded") -> Path:
    """Read the claims grids' runs under `results` and write `results`/claims/; `backbone` is the grids' backbone."""
    out = results / "claims"
    out.mkdir(parents=True, exist_ok=True)
    shown = os.path.relpath(results)  # commands as typed from the repository root
    runs = {grid: load_grid(results, grid) for grid in GRIDS}
    runs = {grid: with_references(grid, grid_runs, runs["methods"]) for grid, grid_runs in runs.items()}
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs}) or [0, 1, 2]
    threads = sorted({r.get("torch_threads", "unrecorded") for rs in runs.values() for r in rs}, key=str)
    text = ["# The paper's claims at CPU scale", "",
            f"Embedded all-MiniLM-L6-v2 (frozen); tasks {', '.join(sorted({r['task'] for rs in runs.values() for r in rs}))}; "
            "dev = one seeded half of each task's validation set (early stopping only), test = the other half (reported). "
            "Test-half scores in percent, mean ± sample std over seeds. Paired differences pair runs of one seed.", "",
            *methods_and_length(out, runs["methods"]), *learning_rate(out, runs["lr"]), *initialisation(out, runs["init"]),
            *design(out, runs["design"], init_scale(out, seeds, backbone)), *few_shot(out, runs["fewshot"]),
            *convergence(out, runs["methods"])]
    env = {
        "commands": [f"python experiments/grid.py {spec} --results {shown}" for spec in grid_files(results, runs)]
                    + [f"python experiments/claims.py --results {shown}"],
        "runs": {g: sum("borrowed_from" not in r for r in rs) for g, rs in runs.items()}, "seeds": seeds, "torch_threads_of_runs": threads,
        "machine": machine_description(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "continual_rpt": __version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "environment.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    text += ["```", json.dumps(env, indent=2, sort_keys=True), "```", ""]
    (out / "claims.md").write_text("\n".join(text))
    return out


def main() -> None:
    """Parse the results folder and write the claims report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder holding claims_<grid>/ (default: experiments/results)")
    parser.add_argument("--backbone", default="embedded", help="the grids' backbone, for the initial-scale measurement")
    args = parser.parse_args()
    print(f"wrote {write_claims(args.results, args.backbone)}")


if __name__ == "__main__":
    sys.exit(main())
