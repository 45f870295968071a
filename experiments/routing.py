"""Routing benchmark: how well a finished run's bank finds the task of each test example.

For every router (mahalanobis, prototype, confidence) on the run's test sets, as the run's stream
loads them: routing accuracy, the confusion matrix, the task-free score of every task next to the
task-aware one (the run's final scores), seconds per router, and the bytes of route state per
entry beside the prompt and head.

    python experiments/routing.py STREAM RUN_FOLDER --out experiments/results/routing/NAME [--data-dir DIR]

STREAM and --data-dir as given to `crpt run`; the seed is the run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from grid import machine_description  # noqa: E402

import continual_rpt  # noqa: E402
from continual_rpt.bank import HEAD_FILE, PROMPT_FILE, ROUTE_FILE, PromptBank  # noqa: E402
from continual_rpt.cli import entry_backbone  # noqa: E402
from continual_rpt.evaluation import predict_from_bank  # noqa: E402
from continual_rpt.routing import ROUTERS, readers_of, route  # noqa: E402
from continual_rpt.task_free import answer_as  # noqa: E402
from continual_rpt.streams import load_data, load_stream  # noqa: E402


def task_free_score(task, examples, routed, home: str, bank, backbone) -> float:
    """The task's score when its examples are answered by the entries they were routed to (as in crpt run)."""
    own = predict_from_bank(bank, home, examples, backbone)
    metas = {name: bank.get(name).meta for name in {r.task for r in routed}}
    predictions = [mine if r.task == home else answer_as(task, metas[r.task], r.index) for r, mine in zip(routed, own)]
    return task.score(examples, predictions)["score"]


def finished_run(stream_path: Path, run: Path, data_dir: str | None):
    """A finished run's metrics, stream (with the run's seed), bank, backbone and data, as `crpt run` loaded them."""
    metrics = json.loads((run / "metrics.json").read_text())
    stream = load_stream(stream_path, data_dir)
    for spec in stream.tasks:  # the run's data sample
        spec.train = dataclasses.replace(spec.train, seed=metrics["seed"])
    bank = PromptBank.open(run / "bank")
    backbone = entry_backbone(bank.get(bank.tasks()[0]), argparse.Namespace(backbone=stream.backbone.backbone, device="cpu"))
    return metrics, stream, bank, backbone, {spec.name: load_data(spec, stream.base_dir) for spec in stream.tasks}


def run_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark over a finished run: STREAM RUN --out DIR [--data-dir DIR]."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("stream", type=Path, help="the stream file the run was made from")
    parser.add_argument("run", type=Path, help="a finished run folder (its bank's entries hold route state)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data-dir", help="as given to crpt run")
    return parser


def main() -> int:
    parser = run_parser(__doc__)
    parser.add_argument("--routers", default=",".join(ROUTERS))
    args = parser.parse_args()
    metrics, stream, bank, backbone, data = finished_run(args.stream, args.run, args.data_dir)
    names = bank.tasks()
    result = {"run": str(args.run), "tasks": names, "task_aware": metrics["final_scores"], "routers": {}}
    for router in args.routers.split(","):
        start = time.perf_counter()
        routed = {name: route(bank, data[name].test, backbone, router, readers_of(bank, names, data[name].task))
                  for name in names}  # each test set among the entries that read its rows, each entry featurizing as its state says
        seconds = time.perf_counter() - start
        confusion = {name: {other: sum(r.task == other for r in routed[name]) for other in names} for name in names}
        total = sum(len(data[n].test) for n in names)
        free = {name: task_free_score(data[name].task, data[name].test, routed[name], name, bank, backbone) for name in names}
        result["routers"][router] = {
            "routing_accuracy": 100.0 * sum(confusion[n][n] for n in names) / total,
            "confusion": confusion, "task_free": free, "task_free_average": sum(free.values()) / len(free),
            "seconds": seconds, "examples": total}
        print(f"{router}: routing {result['routers'][router]['routing_accuracy']:.1f}%  task-free average "
              f"{result['routers'][router]['task_free_average']:.1f} (task-aware {metrics['average_score']:.1f})  {seconds:.0f} s")
    sizes = {name: {f: (args.run / "bank" / name / f).stat().st_size for f in (PROMPT_FILE, HEAD_FILE, ROUTE_FILE)
                    if (args.run / "bank" / name / f).is_file()} for name in names}
    result["bytes_per_entry"] = sizes
    result["environment"] = {"command": "python experiments/routing.py " + " ".join(sys.argv[1:]), "machine": machine_description(),
                             "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                             "continual_rpt": continual_rpt.__version__, "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Routing: {metrics['stream']} ({metrics['method']}, seed {metrics.get('seed')})", "",
             "| router | routing accuracy | task-free average | task-aware average | seconds | " + " | ".join(f"task-free {n}" for n in names) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(names)]
    for router, r in result["routers"].items():
        lines.append(f"| {router} | {r['routing_accuracy']:.1f} | {r['task_free_average']:.1f} | {metrics['average_score']:.1f} | "
                     f"{r['seconds']:.0f} | " + " | ".join(f"{r['task_free'][n]:.1f}" for n in names) + " |")
    for router, r in result["routers"].items():
        lines += ["", f"Confusion ({router}): rows are the true task, columns the entry routed to.", "",
                  "| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {n} | " + " | ".join(str(r["confusion"][n][o]) for o in names) + " |" for n in names]
    lines += ["", "Bytes per entry (files on disk): " + "; ".join(f"{n}: " + ", ".join(f"{f} {b:,}" for f, b in s.items())
                                                          for n, s in sizes.items())]
    (args.out / "routing.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
