"""Run a grid of single-task trainings from a YAML file and tabulate mean ± std over seeds.

    python experiments/grid.py experiments/first_number.yaml

A grid file names tasks (with per-task `max_train`, `k_per_class`, `train` overrides), methods,
seeds, default `prompt`/`train` settings, optionally a `device` (or `--device cuda`), and
`variants`: named overrides of the `prompt`, `train` or `data` (`max_train`, `k_per_class`)
settings, e.g. `n2: {prompt: {n_tokens: 2}}`, crossed with every method, or with the variant's own
`methods` where it names them (deep prompts at their own learning rate next to shallow ones at
theirs). `controls` (e.g. `[head]`) have no prompt to vary: they run once per task and seed, and
once per variant only for variants that change the data. `pairs` lists comparisons, each two rows
of the table by their labels (`method` or `method (variant)`): their paired difference of the task
average gets a 95% bootstrap interval over seeds and test examples.

    python experiments/grid.py experiments/first_number.yaml --summarize

rewrites only `summary.{csv,md}` from the stored records (no backbone, no training; the stored
`environment.json` is kept, since it describes the machine that trained).

Each run's metrics land in `experiments/results/<name>/runs/` (finished runs are skipped when the
grid is started again), the table in `experiments/results/<name>/summary.{csv,md}`, with the
machine, versions, seeds and command next to it. Dev selects, test is reported; the best constant
answer (the highest test score of any one answer given to every test example, under the task's metric:
a ceiling of every constant, chosen on test) is added per task (records made before it hold the
majority class, `majority_test_score`, shown under that name). Each
record keeps its test set's id and its score on 1000 bootstrap resamples of the test examples (the
same draws for every run of that test set), so the summary gives every score a 95% interval and
every pair a paired one: seeds drawn with replacement and a test resample for them, and beside it
the test-sample interval, which leaves the seeds out (continual_rpt/intervals.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

from continual_rpt import __version__
from continual_rpt.atomic import replace_json
from continual_rpt.backbones import load_backbone
from continual_rpt.controls import best_constant, fit_linear_probe
from continual_rpt.intervals import LEVEL, ONE_SEED_NOTE, by_seed, examples_id, intervals, resampled_scores
from continual_rpt.learner import TrainConfig, TrainingDiverged, train_task
from continual_rpt.prompts import PromptConfig
from continual_rpt.strategies.base import measure_test
from continual_rpt.streams import load_data, parse_stream
from continual_rpt.tasks.data import sampled_rows

RESULTS = Path(__file__).resolve().parent / "results"


def grid_runs(spec: dict) -> list[tuple[str, str, str, int]]:
    """Every (task, variant, method, seed) the grid asks for; variant '' where there are none."""
    variants = spec.get("variants", {})
    data_variants = [v for v, override in variants.items() if "data" in override] or [""]
    runs = []
    for seed in spec["seeds"]:  # seed-major: a grid cut short still has every task of its first seeds
        for task in spec["tasks"]:
            runs += [(task, v, method, seed) for v in data_variants for method in spec.get("controls", [])]
            for v in list(variants) or [""]:
                runs += [(task, v, method, seed) for method in variants.get(v, {}).get("methods", spec.get("methods", []))]
    return runs


def row_label(variant: str, method: str) -> str:
    """How the summary names a (variant, method) row, and how `pairs` refer to it."""
    return f"{method} ({variant})" if variant else method


def parse_label(label: str) -> tuple[str, str]:
    """(variant, method) of a row label."""
    match = re.fullmatch(r"(\S+)(?: \((.+)\))?", label.strip())
    if not match:
        raise SystemExit(f"pairs: {label!r} is not a row label ('method' or 'method (variant)')")
    return match.group(2) or "", match.group(1)


def check_pairs(spec: dict) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The grid's `pairs` as (variant, method) keys, each checked to name a row of the grid."""
    keys = {(v, m) for _, v, m, _ in grid_runs(spec)}
    pairs = []
    for i, pair in enumerate(spec.get("pairs", [])):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise SystemExit(f"pairs[{i}]: expected two row labels, got {pair!r}")
        a, b = parse_label(pair[0]), parse_label(pair[1])
        for label, key in zip(pair, (a, b)):
            if key not in keys:
                raise SystemExit(f"pairs[{i}]: {label!r} is not a row of this grid ({', '.join(sorted(row_label(*k) for k in keys))})")
        pairs.append((a, b))
    return pairs


def run_name(task: str, variant: str, method: str, seed: int) -> str:
    """File stem of one run's record."""
    return "-".join(str(part) for part in (task, variant, method, seed) if part != "")


def write_record(path: Path, record: dict) -> None:
    """Write a run record atomically: a grid killed mid-write leaves no half file that a resume would skip."""
    replace_json(path, record)


DATA_KEYS = ("max_train", "k_per_class", "max_eval", "split_from")  # a task's data settings in a grid file


def grid_data(task: str, data_dir: Path, opts: dict, override: dict, seed: int, spec_path: Path):
    """One task's splits as a one-task stream would read them: SuperGLUE files, or a CL benchmark task from its layout."""
    data = {"data_dir": str(data_dir), **opts, **override}
    stream = parse_stream({"name": "grid", "data": data, "train": {"seed": seed}, "tasks": [task]}, str(spec_path), spec_path.parent)
    return load_data(stream.tasks[0], spec_path.parent)


def run_grid(spec: dict, spec_path: Path, results: Path = RESULTS) -> Path:
    """Train every run of `spec` that has no result in `results`/<name> yet, then write the summary."""
    out = results / spec["name"]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    check_pairs(spec)  # a misspelt pair fails now, not after the grid has trained
    backbone = load_backbone(spec.get("backbone", "embedded"), device=spec.get("device", "cpu"))
    data_dir = Path(spec["data_dir"]).expanduser()
    if not data_dir.is_absolute():
        data_dir = (spec_path.parent / data_dir).resolve()
    for task, variant, method, seed in grid_runs(spec):
        path = out / "runs" / f"{run_name(task, variant, method, seed)}.json"
        if path.exists():
            continue
        opts = spec["tasks"][task] or {}
        override = spec.get("variants", {}).get(variant, {})
        data = grid_data(task, data_dir, {k: v for k, v in opts.items() if k in DATA_KEYS}, override.get("data", {}), seed, spec_path)
        prompt_cfg = PromptConfig(**{**spec.get("prompt", {}), **override.get("prompt", {}), "method": "head" if method == "linear-probe" else method})
        train_cfg = TrainConfig(**{**spec.get("train", {}), **opts.get("train", {}), **override.get("train", {}), "seed": seed}).on(backbone)
        common = {"seed": seed, "variant": variant, "torch_threads": torch.get_num_threads(),
                  **constant_fields(data), "train_examples": len(data.train), "pooling": getattr(backbone, "pooling", None),
                  "train_rows": sampled_rows(data.train)["ids"],  # which rows the sample took (uids), to rebuild it
                  "prompt_config": dataclasses.asdict(prompt_cfg), "train_config": dataclasses.asdict(train_cfg)}
        if method == "linear-probe":  # a control with no prompt and no gradient steps
            start = time.perf_counter()
            _, fitted = fit_linear_probe(backbone, data, train_cfg.max_length, seed, train_cfg.eval_batch_size, train_cfg.bf16)
            wall = time.perf_counter() - start
            predictions = fitted.pop("test_predictions")
            record = {**fitted, **common, **resampled(data, predictions), "task": task, "method": method, "wall_seconds": wall,
                      "train_examples_per_second": len(data.train) / wall, "history": []}
            write_record(path, record)
            print(f"{run_name(task, variant, method, seed):28s} dev {record['dev_score']:.1f} test {record['test_score']:.1f} "
                  f"(C {record['C']}, {wall:.0f} s)", flush=True)
            continue
        try:
            result = train_task(backbone, data, prompt_cfg, train_cfg)
        except TrainingDiverged as err:  # a result of the grid (e.g. a learning rate too high), not a crash
            record = {**common, "task": task, "method": method, "diverged": str(err), "dev_score": None,
                      "test_score": None, "history": []}
            write_record(path, record)
            print(f"{run_name(task, variant, method, seed):28s} diverged: {err}", flush=True)
            continue
        measured = measure_test(backbone, data, train_cfg, result)
        record = {**result.metrics, **measured.metrics, **common, **resampled(data, measured.predictions), "history": result.history}
        write_record(path, record)
        print(f"{run_name(task, variant, method, seed):28s} dev {record['dev_score']:.1f} test {record['test_score']:.1f} "
              f"({record['wall_seconds']:.0f} s, {record['train_examples_per_second']:.1f} ex/s)", flush=True)
    write_summary(out, spec, write_environment(out, spec, spec_path))
    return out


def resampled(data, predictions: list[int]) -> dict:
    """The test set's id and the run's score on each bootstrap resample of it (3 decimals: a record stays small)."""
    return {"test_set": examples_id(data.test),
            "test_resampled": [round(v, 3) for v in resampled_scores(data.task, data.test, predictions)]}


def mean_std(values: list[float]) -> str:
    """'mean ± std' (sample std) of a list of scores."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def resampled_by_seed(runs: list[dict], variant: str, method: str, tasks: list[str]) -> dict[int, dict[str, dict]]:
    """Per seed that finished every task with resamples: each task's run record."""
    found: dict[int, dict[str, dict]] = {}
    for r in runs:
        if (r["method"] == method and r.get("variant", "") == variant and r["task"] in tasks
                and r["test_score"] is not None and r.get("test_resampled")):
            found.setdefault(r["seed"], {})[r["task"]] = r
    return {seed: mine for seed, mine in sorted(found.items()) if len(mine) == len(tasks)}


def span(ci) -> str:
    """'estimate [low, high]' of an interval."""
    return f"{ci.estimate:.1f} [{ci.low:.1f}, {ci.high:.1f}]"


def scored(seeds: dict[int, dict[str, dict]], tasks: list[str]):
    """Seeds' mean of the task-averaged test score, and each seed's task average on each test resample ([seeds, R])."""
    estimate = statistics.mean(statistics.mean(mine[t]["test_score"] for t in tasks) for mine in seeds.values())
    return estimate, by_seed([{t: mine[t]["test_resampled"] for t in tasks} for mine in seeds.values()], tasks)


def interval_lines(runs: list[dict], spec: dict, tasks: list[str]) -> list[str]:
    """Markdown: every row's per-task and average scores with 95% intervals, then the grid's paired differences."""
    keys = list(dict.fromkeys((r[1], r[2]) for r in grid_runs(spec)))
    rows = {key: resampled_by_seed(runs, *key, tasks) for key in keys}
    lines = [f"## {LEVEL:.0%} intervals (percentile bootstrap over seeds and test examples)", "",
             "Each draw takes the row's seeds with replacement and one stored test resample for them (the test set is "
             "shared by the seeds) and averages the drawn seeds; the test-sample interval averages every seed once on each "
             f"test resample, so it leaves out what another seed would change ({ONE_SEED_NOTE}).", "",
             "| row | seeds | " + " | ".join(tasks) + " | average | average, test-sample 95% interval |", "|---" * (len(tasks) + 4) + "|"]
    for key, seeds in rows.items():
        if seeds:
            cells = [span(intervals(*scored(seeds, [t]))[0]) for t in tasks]
            both, test_only = intervals(*scored(seeds, tasks))
            lines.append(f"| {row_label(*key)} | {len(seeds)} | " + " | ".join(cells) + f" | {span(both)} | {span(test_only)} |")
    pairs = check_pairs(spec)
    if pairs:
        lines += ["", "Paired differences (same seeds: same training sample, same initial prompt; same test resamples; "
                  "the seed draws are the same for both rows); resolved: the interval over seeds and test examples excludes 0.", ""]
    for a, b in pairs:
        label = f"{row_label(*a)} − {row_label(*b)}"
        average = paired_interval(rows[a], rows[b], tasks, label)
        if average is None:
            lines.append(f"- {label}: no seed finished both")
            continue
        per_task = "; ".join(f"{t} {show_difference(paired_interval(rows[a], rows[b], [t], label)[0])}" for t in tasks)
        lines.append(f"- {label}: average {show_pair(average)} ({len(set(rows[a]) & set(rows[b]))} paired seeds); {per_task}")
    return lines


def paired_interval(first: dict[int, dict[str, dict]], second: dict[int, dict[str, dict]], tasks: list[str], label: str):
    """(seeds-and-test, test-sample) intervals of average(first) − average(second) over `tasks`, paired by seed and
    test resample; None without common seeds."""
    common = sorted(set(first) & set(second))
    if not common:
        return None
    for s in common:
        for t in tasks:
            if first[s][t]["test_set"] != second[s][t]["test_set"]:
                raise SystemExit(f"{t}, seed {s}: {label} were scored on different test examples; they cannot be paired")
    (x, xs), (y, ys) = scored({s: first[s] for s in common}, tasks), scored({s: second[s] for s in common}, tasks)
    return intervals(x - y, xs - ys)


def show_difference(ci) -> str:
    """'+d [low, high]', and 'resolved' where the interval excludes 0."""
    return f"{ci.estimate:+.1f} [{ci.low:+.1f}, {ci.high:+.1f}]" + (" resolved" if ci.excludes_zero else "")


def show_pair(pair) -> str:
    """A paired difference's seeds-and-test interval (deciding 'resolved'), then its test-sample interval."""
    both, test_only = pair
    return f"{show_difference(both)}, test-sample 95% interval [{test_only.low:+.1f}, {test_only.high:+.1f}]"


def machine_description() -> str:
    """Architecture, CPU model, core count and torch threads of this machine."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    model = models[0] if models else platform.processor() or "unknown CPU"
    return f"{platform.machine()}, {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def resummarize(spec: dict, results: Path = RESULTS) -> Path:
    """Rewrite a finished grid's summary.{csv,md} from its records, keeping the environment.json of the machine that trained."""
    out = results / spec["name"]
    env_path = out / "environment.json"
    if not env_path.is_file():
        raise SystemExit(f"{env_path}: missing; --summarize rewrites the summary of a grid that has run")
    check_pairs(spec)
    write_summary(out, spec, json.loads(env_path.read_text()))
    return out


def write_environment(out: Path, spec: dict, spec_path: Path) -> dict:
    """Write and return environment.json: the command, machine, versions, seeds and date of the run."""
    try:
        shown = spec_path.relative_to(Path.cwd())
    except ValueError:
        shown = spec_path
    env = {
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python experiments/grid.py {shown}",
        "machine": machine_description(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "continual_rpt": __version__, "seeds": spec["seeds"], "date": time.strftime("%Y-%m-%d"),
    }
    (out / "environment.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    return env


def constant_fields(data) -> dict:
    """A run record's constant-answer control: the best constant answer's test score and which answer it is."""
    score, answer = best_constant(data.task, data.test)
    return {"best_constant_test_score": score, "best_constant_answer": answer}


def constant_control(runs: list[dict]) -> tuple[str, str]:
    """The row label and record field of the constant control: records made before the best constant hold the majority class."""
    if any("best_constant_test_score" in r for r in runs):
        return "best constant answer", "best_constant_test_score"
    return "majority class", "majority_test_score"


def write_summary(out: Path, spec: dict, env: dict) -> None:
    """Per task and (variant, method): test (and dev) mean ± std over seeds, plus the constant-answer row, and `env`."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    tasks = list(spec["tasks"])
    label, key = constant_control(runs)
    constant = {t: next((r[key] for r in runs if r["task"] == t and key in r), None) for t in tasks}
    rows = [(label, {t: "—" if v is None else f"{v:.1f}" for t, v in constant.items()}, "—", "—")]
    csv_lines = ["variant,method,task,seeds,diverged,dev_mean,dev_std,test_mean,test_std,examples_per_second"]
    keys = list(dict.fromkeys((r[1], r[2]) for r in grid_runs(spec)))
    for variant, method in keys:
        cells, averages = {}, []
        for task in tasks:
            every = [r for r in runs if r["task"] == task and r["method"] == method and r.get("variant", "") == variant]
            mine = [r for r in every if r["test_score"] is not None]
            diverged = len(every) - len(mine)
            if not mine:
                cells[task] = f"diverged ({diverged})" if diverged else "—"
                continue
            tests, devs = [r["test_score"] for r in mine], [r["dev_score"] for r in mine]
            cells[task] = mean_std(tests) + (f" ({diverged} diverged)" if diverged else "")
            averages.append(statistics.mean(tests))
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            speed = statistics.median(r["train_examples_per_second"] for r in mine)
            csv_lines.append(f"{variant},{method},{task},{len(mine)},{diverged},{statistics.mean(devs):.2f},{sd(devs):.2f},"
                             f"{statistics.mean(tests):.2f},{sd(tests):.2f},{speed:.1f}")
        label = row_label(variant, method)
        dev_means = [statistics.mean(r["dev_score"] for r in runs if r["task"] == t and r["method"] == method
                                     and r.get("variant", "") == variant and r["test_score"] is not None) for t in tasks
                     if cells[t] != "—" and not cells[t].startswith("diverged")]
        complete = len(averages) == len(tasks)
        rows.append((label, cells, f"{statistics.mean(averages):.1f}" if complete else "—",
                     f"{statistics.mean(dev_means):.1f}" if complete else "—"))
    (out / "summary.csv").write_text("\n".join(csv_lines) + "\n")
    table = ["| method | " + " | ".join(tasks) + " | average | dev average |", "|---" * (len(tasks) + 3) + "|"]
    table += [f"| {name} | " + " | ".join(cells[t] for t in tasks) + f" | {avg} | {dev} |" for name, cells, avg, dev in rows]
    header = [f"# {spec['name']}", "", spec.get("description", "").strip(), "",
              "Test-half score (task metric mean, percent), mean ± std over seeds that trained; dev half used for early stopping only; "
              "(k diverged): k seeds ended with no finite dev evaluation. Dev average: the mean dev score over tasks, "
              "the one to select a setting by.", ""]
    interval_section = ["", *interval_lines(runs, spec, tasks)]
    (out / "summary.md").write_text("\n".join(header + table + interval_section + ["", "```", json.dumps(env, indent=2, sort_keys=True), "```", ""]))
    print("\n".join(table))


def main() -> None:
    """Parse the grid file path and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="YAML grid file")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder that receives <name>/ (default: experiments/results)")
    parser.add_argument("--device", help="torch device, e.g. cuda (default: the grid file's `device`, else cpu)")
    parser.add_argument("--summarize", action="store_true", help="only rewrite summary.{csv,md} from the stored records (trains nothing)")
    args = parser.parse_args()
    spec = yaml.safe_load(args.spec.read_text())
    if args.summarize:
        print(f"rewrote the summary in {resummarize(spec, args.results)}")
        return
    if args.device:
        spec["device"] = args.device
    run_grid(spec, args.spec.resolve(), args.results)


if __name__ == "__main__":
    sys.exit(main())
