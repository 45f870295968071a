"""The README's single-run tables, printed from run folders, and the main job's reproducibility record.

    python experiments/main_job.py table RUN                  the main-job table (per task: controls, score, 95% CI)
    python experiments/main_job.py rows RUN [RUN ...] [--labels L ...]   the first run's controls, then a row per run
    python experiments/main_job.py record RUN [RUN ...] --out experiments/results/main_job

`table` and `rows` read only a run's metrics.json, so they work on a live `crpt run` folder or on a
recorded copy. `record` copies each run's results (metrics, matrices, resolved stream, log; not the
bank) into a new folder, with the machine (CPU model, its bf16 flags, cores, torch threads) and
versions, and, for two runs or more, `reproducibility.md`: whether the runs' scores are
bit-identical, and if not, how far each task's final score moved.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from grid import machine_description  # noqa: E402

import continual_rpt  # noqa: E402
from continual_rpt.backbones.base import BF16_CPU_FLAGS, cpu_flags  # noqa: E402

RESULT_FILES = ("metrics.json", "accuracy_matrix.csv", "task_free_matrix.csv", "routing_matrix.csv", "stream.json", "log.txt")


def read_metrics(run: Path) -> dict:
    """A finished run's metrics.json, or a clear error naming the file."""
    path = run / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a finished run's metrics ({err})") from None


def control_score(task: dict, names: tuple[str, ...]) -> float | None:
    """The first of a task's recorded control scores that the run holds (older runs name controls differently)."""
    return next((task[name] for name in names if task.get(name) is not None), None)


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main_table(metrics: dict) -> str:
    """The README's main-job table and the summary line below it, from one run's metrics."""
    constant_names = ("best_constant_score", "majority_score")
    constant = "best constant" if any(t.get("best_constant_score") is not None for t in metrics["per_task"].values()) else "majority"
    lines = [f"| task | {constant} | linear probe | {metrics['method']} | 95% CI |", "|---|---:|---:|---:|---|"]
    for name in metrics["tasks"]:  # stream order (metrics.json stores per_task with sorted keys)
        task = metrics["per_task"][name]
        ci = "—" if task.get("final_test_ci") is None else "{:.1f}–{:.1f}".format(*task["final_test_ci"])
        lines.append(f"| {name} | {number(control_score(task, constant_names))} | "
                     f"{number(control_score(task, ('linear_probe_score',)))} | {task['final_score']:.1f} | {ci} |")
    summary = f"Average {metrics['average_score']:.1f}, forgetting {number(metrics['forgetting'])}"
    if "task_free_average" in metrics:
        summary += (f"; task-free (each test example routed to an entry, task not given) {metrics['task_free_average']:.1f}, "
                    f"routing accuracy {metrics['routing_accuracy']:.1f}%")
    return "\n".join(lines + ["", summary + "."])


def method_rows(runs: list[dict], labels: list[str] | None = None) -> str:
    """The first run's controls (best constant answer, linear probe), then one row per run: each task's final score and the average."""
    tasks = runs[0]["tasks"]
    lines = [f"| method | {' | '.join(tasks)} | average |", "|---|" + "---:|" * (len(tasks) + 1)]

    def row(label: str, scores: list[float | None], average: float | None = None) -> str:
        if average is None and None not in scores:
            average = sum(scores) / len(scores)
        return f"| {label} | " + " | ".join(number(v) for v in scores) + f" | {number(average)} |"

    for label, names in (("best constant answer", ("best_constant_score", "majority_score")), ("linear probe", ("linear_probe_score",))):
        scores = [control_score(runs[0]["per_task"][t], names) for t in tasks]
        if any(v is not None for v in scores):
            lines.append(row(label, scores))
    for i, metrics in enumerate(runs):
        if metrics["tasks"] != tasks:
            raise SystemExit(f"runs of different task lists: {tasks} vs {metrics['tasks']}")
        scores = [metrics["final_scores"][t] for t in tasks]  # the average as the run printed it
        lines.append(row(labels[i] if labels else metrics["method"], scores, metrics["average_score"]))
    return "\n".join(lines)


def reproducibility(runs: list[dict]) -> str:
    """Whether the runs' final scores, matrices and task-free scores are identical, and each task's spread if not."""
    keys = ("accuracy_matrix", "task_free_accuracy_matrix", "routing_confusion")
    identical = all(all(m.get(k) == runs[0].get(k) for k in keys) for m in runs[1:])
    lines = [f"# Main job, {len(runs)} runs of one command on one machine", "",
             "Bit-identical (accuracy matrix, task-free matrix, routing confusion): " + ("yes" if identical else "no"), "",
             "| task | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | max − min |", "|---|" + "---:|" * (len(runs) + 1)]
    for task in runs[0]["tasks"]:
        scores = [m["final_scores"][task] for m in runs]
        lines.append(f"| {task} | " + " | ".join(f"{s:.4f}" for s in scores) + f" | {max(scores) - min(scores):.4f} |")
    averages = [m["average_score"] for m in runs]
    lines.append("| average | " + " | ".join(f"{s:.4f}" for s in averages) + f" | {max(averages) - min(averages):.4f} |")
    seconds = ", ".join(f"{m['wall_seconds']:.0f}" for m in runs)
    return "\n".join(lines + ["", f"Wall seconds (training and evaluation, as metrics.json counts them): {seconds}.", ""])


def record(runs: list[Path], out: Path, command: str) -> None:
    """Copy the runs' results (no bank) into a new folder, with the machine, versions and the reproducibility table."""
    if out.exists():
        raise SystemExit(f"{out}: exists; record into a new folder (this command never rewrites files it did not create)")
    metrics = [read_metrics(run) for run in runs]
    out.mkdir(parents=True)
    for i, run in enumerate(runs):
        (out / f"run{i + 1}").mkdir()
        for name in RESULT_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, out / f"run{i + 1}" / name)
    env = {"command": command, "machine": machine_description(), "bf16_cpu_flags": [f for f in BF16_CPU_FLAGS if f in cpu_flags()], "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "continual_rpt": continual_rpt.__version__,
           "seed": metrics[0]["seed"]}
    (out / "environment.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    if len(runs) > 1:  # one run says nothing about reproducibility
        (out / "reproducibility.md").write_text(reproducibility(metrics))
    (out / "table.md").write_text(main_table(metrics[0]) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("table", help="the main-job table of one run").add_argument("run", type=Path)
    rows = commands.add_parser("rows", help="the first run's controls, then one row per run")
    rows.add_argument("runs", type=Path, nargs="+")
    rows.add_argument("--labels", nargs="+", help="a row label per run (default: each run's method)")
    rec = commands.add_parser("record", help="record runs of one command and whether they are bit-identical")
    rec.add_argument("runs", type=Path, nargs="+")
    rec.add_argument("--out", type=Path, required=True, help="a new folder")
    rec.add_argument("--command", default="crpt run streams/superglue-cpu.yaml --data-dir ../shared/data/superglue",
                     help="the command that made the runs (recorded)")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(main_table(read_metrics(args.run)))
    elif args.command == "rows":
        if args.labels and len(args.labels) != len(args.runs):
            raise SystemExit(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
        print(method_rows([read_metrics(run) for run in args.runs], args.labels))
    else:
        record(args.runs, args.out, args.command)


if __name__ == "__main__":
    main()
