"""Learn a stream of tasks into a prompt bank, with every task seen so far scored after each one (bank entries: `scored_once`).

A run folder holds:
    stream.json           the resolved stream (every default filled in; device and bf16 as asked: the entries say what auto chose)
    bank/                 the prompt bank, one collapsed entry per finished task
    state.json            the accuracy-matrix rows finished so far (what --resume continues from), each entry's
                          recorded test answers and checksums, the count of test evaluations
    accuracy_matrix.csv   R[i][j]: test score of task j after learning task i (empty where j > i)
    task_free_matrix.csv  the same with the task not given: every test example routed to an entry (bank strategies)
    routing_matrix.csv    after each task, how many test examples of each task were routed to each entry
    metrics.json          average score, forgetting, backward transfer, per-task details (final score's 95% CI)
    bootstrap.json        each task's final score on 1000 bootstrap resamples of its test set (paired comparisons)
    log.txt               what happened, with times
    tracking/             TensorBoard event files, with --report-to tensorboard

Each step is written atomically, so an interrupted run (Ctrl-C, kill) resumes with the first
unfinished task and leaves finished entries untouched.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from continual_rpt.atomic import is_temp_name, replace_file, replace_json
from continual_rpt.backbones import check_device, device_bf16
from continual_rpt.bank import PromptBank
from continual_rpt.controls import control_fields, reference_scores
from continual_rpt.intervals import LEVEL, RESAMPLES, SEED, examples_id, interval, resampled_scores
from continual_rpt.evaluation import average_score, backward_transfer, forgetting
from continual_rpt import distributed, tracking
from continual_rpt.faults import kill_point
from continual_rpt.learner import follow, log as training_log
from continual_rpt.locks import LOCK_FILE, locked
from continual_rpt.task_free import task_free_scores
from continual_rpt.scored_once import scored_record, still_valid
from continual_rpt.strategies import REGISTRY, make_strategy, method_label, strategy_class
from continual_rpt.streams import BaselineConfig, Stream, load_data
from continual_rpt.tasks import TaskData

STREAM_FILE, STATE_FILE, BANK_DIR, BOOTSTRAP_FILE = "stream.json", "state.json", "bank", "bootstrap.json"
TRACKING_DIR = "tracking"  # what --report-to tensorboard writes


class RunError(ValueError):
    """A run folder that cannot be started or resumed as asked."""


def _check_run(stream: Stream, out: Path, resume: bool) -> dict:
    """The saved state of the run in `out` to resume (empty for a new run); a folder it cannot use is refused, nothing written."""
    config = stream.resolved()
    stored_path = out / STREAM_FILE
    if stored_path.is_file():
        if not resume:
            raise RunError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        stored = json.loads(stored_path.read_text())
        stored.setdefault("baseline", dataclasses.asdict(BaselineConfig()))  # runs made before the key existed used these
        stored.setdefault("controls", True)
        stored.setdefault("eval", "once")  # runs older than the key: resumed under today's default
        config = json.loads(json.dumps(config))  # as stored: tuples become lists
        if stored != config and _decided(stored) != _decided(config):
            stored, config = _decided(stored), _decided(config)  # name only what differs as run on this machine
            differing = [k for k in config if stored.get(k) != config[k]]
            raise RunError(f"{stored_path}: the run was started with another stream configuration "
                           f"(differs in: {', '.join(differing)}); resume with the same stream and options")
        state_path = out / STATE_FILE
        return json.loads(state_path.read_text()) if state_path.is_file() else {"rows": [], "seconds": {}}
    # A run killed before writing stream.json leaves at most its lock file and its temporary name for stream.json.
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE and not is_temp_name(p.name) for p in out.iterdir())):
        raise RunError(f"{out} exists and is not a run folder; choose another --out")
    return {"rows": [], "seconds": {}}


def _decided(config: dict) -> dict:
    """A stream configuration with device `auto` and unset bf16 as this machine decides them: runs started before
    these defaults stored decided values (device cpu, bf16 true), and resume where those are what auto picks here."""
    device = check_device(config["backbone"].get("device", "cpu"))  # runs older than the key ran on the cpu
    tasks = [{**t, "train": {**t["train"], "bf16": device_bf16(device) if t["train"].get("bf16") is None else t["train"]["bf16"]}}
             for t in config["tasks"]]
    return {**config, "backbone": {**config["backbone"], "device": str(device)}, "tasks": tasks}


class _LogFile(logging.FileHandler):
    """log.txt; a line that cannot be written (a full disk) stops the run like any other failed write."""

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # logging's default prints a traceback and carries on without the line


def _logger(out: Path) -> logging.Logger:
    log = logging.getLogger(f"continual_rpt.run.{out.resolve()}")
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = _LogFile(out / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    return log


@contextmanager
def _training_lines(log: logging.Logger):
    """While the run lasts, the learner's per-evaluation lines and kept step go to the run's log.txt too."""
    level = training_log.level
    training_log.setLevel(logging.INFO)
    for handler in log.handlers:
        training_log.addHandler(handler)
    try:
        yield
    finally:
        for handler in log.handlers:
            training_log.removeHandler(handler)
        training_log.setLevel(level)


@contextmanager
def hub_bars(shown: bool):
    """transformers' own bars ("Loading weights", the hub's downloads) shown only with the run's progress bars."""
    was_shown = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown and not shown:
            hf_logging.enable_progress_bar()


def run_stream(stream: Stream, out: str | Path, resume: bool = False, progress: bool = True, report_to: str = "none") -> dict | None:
    """Learn the stream's tasks in order into `out`/bank and return the run's metrics.

    What can refuse the run (the folder, every task's data, the backbone and its device) is checked
    before the folder is created or anything in it is written; the folder's lock is held throughout,
    so a second run on it fails at once, naming this one's pid. Under `accelerate launch` the main
    process does all of this; the others train their share of each task and return None.
    """
    rank, world = distributed.setup(check_device(stream.backbone.device))
    if world > 1 and REGISTRY.get(stream.strategy) and REGISTRY[stream.strategy].extra == "avalanche":
        # Avalanche's own loop sees torch.distributed and gives each process part of the data: another training, not this one's.
        raise RunError(f"strategy {stream.strategy}: trains in Avalanche's loop, which is not data-parallel here; "
                       "run it as one process (without accelerate launch)")
    if rank != 0:
        _follow(stream)
        return None
    out = Path(out)
    existed = out.is_dir()
    with ExitStack() as held:
        held.enter_context(hub_bars(progress))
        if existed:  # perhaps a folder a live run is writing: fail before any work
            held.enter_context(locked(out, remove=True))
        _check_run(stream, out, resume)
        tracking.check_report_to(report_to)
        # Every task's data, all splits, and the backbone: a bad file or device fails now, with nothing written.
        data: dict[str, TaskData] = {spec.name: load_data(spec, stream.base_dir) for spec in stream.tasks}
        backbone = stream.backbone.load()
        strategy_class(stream.strategy)  # imported now: a strategy whose extra is not installed is refused here
        if not existed:  # a new folder: made now, then locked and checked again (another run may have made it)
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(locked(out, remove=True))
        state = _check_run(stream, out, resume)
        if not (out / STREAM_FILE).is_file():
            replace_json(out / STREAM_FILE, stream.resolved())
        held.enter_context(_training_lines(_logger(out)))
        held.enter_context(tracking.session(report_to, out / TRACKING_DIR, stream.name, stream.resolved(), state.get("tracked_steps", 0)))
        held.enter_context(distributed.leading(data))  # with several processes: each training is announced to the others
        # stream.json keeps what was asked (bf16 unset: auto), so a resume compares like with like; entries store what ran.
        return _learn(stream.on(backbone), out, state, data, backbone, progress)


def _follow(stream: Stream) -> None:
    """A non-main process of `accelerate launch`: the same data and backbone as the main one, its share of every training; no writes."""
    with hub_bars(False):
        data = {spec.name: load_data(spec, stream.base_dir) for spec in stream.tasks}
        follow(stream.backbone.load(), data)


def _learn(stream: Stream, out: Path, state: dict, data: dict[str, TaskData], backbone, progress: bool) -> dict:
    """The run proper, in a checked and locked folder: each unfinished task learned, evaluated and recorded."""
    bank = PromptBank.open(out / BANK_DIR, create=True)
    for name in bank.tasks():  # a resumed run must see the data its finished entries were trained on
        if name in data and bank.get(name).meta.get("data_files") != data[name].files:
            raise RunError(f"{out / BANK_DIR / name}: trained on other data files than the stream reads now "
                           f"({', '.join(data[name].files)}); restore them, or start a new run")
    log = _logger(out)
    log.info("%s stream %s (%d tasks), %d finished", "resume" if state["rows"] else "start", stream.name, len(stream.tasks), len(state["rows"]))
    precisions = sorted({"bf16" if t.train.bf16 else "fp32" for t in stream.tasks})
    log.info("device %s (asked: %s), precision %s", backbone.device, stream.backbone.device, "/".join(precisions))
    for name, d in data.items():
        for origin, count in d.skipped.items():
            log.info("%s: skipped %d rows of %s whose label names no class", name, count, origin)
    strategy = make_strategy(stream, backbone, bank, out)
    once = stream.eval == "once" and strategy.answers_fixed  # earlier tasks verified by checksum instead of re-scored
    state["earlier_tasks"] = "verified by checksum" if once else "re-scored"
    state.setdefault("scored", {})
    state.setdefault("test_evaluations", sum(map(len, state["rows"])))  # runs older than the count scored every cell
    state.setdefault("verified_by_checksum", 0)
    log.info("earlier tasks after each one: %s", "verified by checksum (eval: once; each entry scored on test when learned)"
             if once else f"re-scored on test (eval: {stream.eval}, strategy {stream.strategy})")
    input_cache: dict = {}  # test inputs' prompt-free features per featurization, row and reading, for routing
    bar = tqdm(stream.tasks, desc=stream.name, unit="task", disable=not progress)
    for i, spec in enumerate(bar):
        bar.set_postfix(task=spec.name)
        if i < len(state["rows"]):
            continue
        start = time.perf_counter()
        tokens = f", {spec.prompt.n_tokens} prompt tokens" if spec.prompt.uses_prompt else ""
        log.info("learn %s (%s, %s%s)", spec.name, stream.strategy, spec.prompt.method, tokens)
        row, aware, evaluated, verified = {}, {}, [], []
        if strategy.learn(i, spec, data, progress):
            for seen in stream.tasks[: i + 1]:
                d, record = data[seen.name], state["scored"].get(seen.name)
                if once and still_valid(bank, seen.name, record, backbone):  # its entry as scored: its answers as recorded
                    row[seen.name], predictions = record["score"], record["predictions"]
                    verified.append(seen.name)
                else:
                    predictions = strategy.predict(seen.name, d.task, d.test)
                    row[seen.name] = d.task.score(d.test, predictions)
                    evaluated.append(seen.name)
                    if once:
                        state["scored"][seen.name] = scored_record(bank, seen.name, row[seen.name], predictions, backbone)
                aware[seen.name] = predictions
                if i == len(stream.tasks) - 1:  # the final scores' resamples, for confidence intervals and paired comparisons
                    state.setdefault("bootstrap", {})[seen.name] = resampled_scores(d.task, d.test, predictions)
                    state.setdefault("test_sets", {})[seen.name] = examples_id(d.test)
        state["seconds"][spec.name] = state["seconds"].get(spec.name, 0.0) + time.perf_counter() - start
        state["test_evaluations"] += len(evaluated)
        state["verified_by_checksum"] += len(verified)
        if aware:  # the same tests with the task not given: each example routed to an entry (not in the task's time)
            seen = [t.name for t in stream.tasks[: i + 1]]
            free = task_free_scores(bank, seen, data, backbone, aware, input_cache)  # each entry's own featurization
            if free is not None:
                state.setdefault("task_free", {})[str(i)] = {"scores": {n: v["score"] for n, v in free[0].items()}, "routing": free[1]}
        if stream.controls:  # not in the task's time: the controls are the reader's, not the method's
            d, cfg = data[spec.name], spec.train
            state.setdefault("controls", {})[spec.name] = reference_scores(backbone, d, cfg.max_length, cfg.seed, cfg.eval_batch_size, cfg.bf16)
        state["rows"].append(row)
        if tracking.steps() is not None:  # where a resumed run's tracker continues
            state["tracked_steps"] = tracking.steps()
        replace_json(out / STATE_FILE, state)
        tracking.log({f"accuracy_matrix/{name}": scores["score"] for name, scores in row.items()})  # row i at the steps so far
        kill_point("run.task-done")
        how = "; ".join(f"{what}: {', '.join(names)}" for what, names in (("evaluated on test", evaluated), ("verified by checksum", verified)) if names)
        log.info("after %s: %s%s", spec.name, ", ".join(f"{k} {v['score']:.2f}" for k, v in row.items()) or "not evaluated",
                 f" ({how})" if how else "")
    bar.close()
    strategy.finish(data)
    metrics = summarize(stream, bank, state)
    write_results(out, state, metrics)
    tracking.log({"average_score": metrics["average_score"], **{f"final_score/{k}": v for k, v in metrics["final_scores"].items()},
                 **{k: metrics[k] for k in ("forgetting", "backward_transfer") if metrics[k] is not None},
                 "accuracy_matrix": accuracy_markdown(metrics)})
    log.info("done: average %.2f, forgetting %s", metrics["average_score"], metrics["forgetting"])
    return metrics


def summarize(stream: Stream, bank: PromptBank, state: dict) -> dict:
    """Continual metrics of the accuracy matrix, and per-task scores, sizes and times."""
    names = [t.name for t in stream.tasks]
    R = [[row.get(name, {}).get("score") for name in names] for row in state["rows"]]
    per_task = {}
    for i, name in enumerate(names):
        entry = bank.get(name)
        m = entry.metrics
        resampled = state.get("bootstrap", {}).get(name)  # absent in runs finished before confidence intervals existed
        ci = interval(R[-1][i], resampled) if resampled else None
        per_task[name] = {
            "score_after_learning": R[i][i],
            "final_score": R[-1][i],
            "final_test": state["rows"][-1][name],
            "dev_score": m["dev_score"],
            "prompt_tokens": m["prompt_tokens"],
            "prompt_tokens_in_context": m["prompt_tokens_in_context"],
            "trainable_parameters": m["trainable_parameters"],
            "stored_parameters": m["stored_parameters"],
            "train_seconds": m["wall_seconds"],
            "task_seconds": state["seconds"][name],
            "train_examples_per_second": m["train_examples_per_second"],
            **{k: entry.meta[k] for k in ("device", "precision") if k in entry.meta},  # what `auto` resolved to (older entries: absent)
            "skipped_rows": sum(entry.meta.get("skipped_rows", {}).values()),
            "final_test_ci": [ci.low, ci.high] if ci else None,
            **control_fields(state.get("controls", {}).get(name, {})),  # best constant answer, linear probe
            **{k: m[k] for k in ("test_without_prompt", "test_without_phi") if k in m},  # what the prompt adds
        }
    seeds = sorted({t.train.seed for t in stream.tasks})
    free = state.get("task_free", {})
    task_free = {}
    if len(free) == len(state["rows"]) == len(names):  # routed at every stage (bank strategies whose entries hold route state)
        F = [[free[str(i)]["scores"].get(name) for name in names] for i in range(len(names))]
        final = free[str(len(names) - 1)]["routing"]
        routed_home = sum(final[name][name] for name in names)
        task_free = {"task_free_accuracy_matrix": F, "task_free_average": average_score(F),
                     "routing_accuracy": 100.0 * routed_home / sum(sum(c.values()) for c in final.values()),
                     "routing_confusion": final, "router": "mahalanobis"}
    return {
        "stream": stream.name,
        "method": method_label(stream),
        "strategy": stream.strategy,
        "seed": seeds[0] if len(seeds) == 1 else None,
        "backbone": stream.backbone.backbone,
        "tasks": names,
        "accuracy_matrix": R,
        "average_score": average_score(R),
        "forgetting": forgetting(R),
        "backward_transfer": backward_transfer(R),
        "final_scores": {name: R[-1][i] for i, name in enumerate(names)},
        "per_task": per_task,
        "wall_seconds": sum(state["seconds"].values()),
        "evaluation": {"earlier_tasks": state.get("earlier_tasks", "re-scored"),  # runs older than `eval` re-scored every stage
                       "test_evaluations": state.get("test_evaluations", sum(map(len, state["rows"]))),
                       "verified_by_checksum": state.get("verified_by_checksum", 0)},
        **task_free,
        "confidence": f"per-task final_test_ci: {LEVEL:.0%} percentile bootstrap over test examples, {RESAMPLES} resamples (bootstrap.json)",
    }


def write_results(out: Path, state: dict, metrics: dict) -> None:
    """accuracy_matrix.csv, bootstrap.json (the final scores' resamples) and metrics.json of a finished run."""
    names = metrics["tasks"]

    def matrix_writer(key: str):
        def write_matrix(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["after_task", *names])
                for name, row in zip(names, metrics[key]):
                    writer.writerow([name, *("" if v is None else f"{v:.4f}" for v in row)])

        return write_matrix

    replace_file(out / "accuracy_matrix.csv", matrix_writer("accuracy_matrix"))
    if "task_free_accuracy_matrix" in metrics:
        def write_routing(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["after_task", "task", "routed_to", "examples"])
                for i, after in enumerate(names):
                    for task, counts in state["task_free"][str(i)]["routing"].items():
                        writer.writerows([after, task, other, n] for other, n in counts.items())

        replace_file(out / "task_free_matrix.csv", matrix_writer("task_free_accuracy_matrix"))
        replace_file(out / "routing_matrix.csv", write_routing)
    if "bootstrap" in state:
        replace_json(out / BOOTSTRAP_FILE, {"resamples": RESAMPLES, "seed": SEED, "test_sets": state["test_sets"], "scores": state["bootstrap"]})
    replace_json(out / "metrics.json", metrics)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def accuracy_markdown(metrics: dict) -> str:
    """The accuracy matrix as a Markdown table (what trackers show as text)."""
    names = metrics["tasks"]
    lines = ["| after | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_number(v) for v in row) + " |" for name, row in zip(names, metrics["accuracy_matrix"])]
    return "\n".join(lines)


def summary_table(metrics: dict) -> str:
    """A plain-text table: task, the controls' scores, score after learning it, final score and its 95% CI, prompt tokens, time."""
    lines = [f"{'task':<14}{'constant':>9}{'probe':>8}{'score':>8}{'final':>8}{'95% CI':>14}{'tokens':>8}{'time s':>9}"]
    for name, t in metrics["per_task"].items():
        ci = "—" if t["final_test_ci"] is None else "{:.1f}–{:.1f}".format(*t["final_test_ci"])
        lines.append(f"{name:<14}{_number(t.get('best_constant_score')):>9}{_number(t.get('linear_probe_score')):>8}"
                     f"{_number(t['score_after_learning']):>8}{t['final_score']:>8.1f}{ci:>14}{t['prompt_tokens_in_context']:>8}"
                     f"{t['task_seconds']:>9.0f}")
    fgt = metrics["forgetting"]
    lines.append(f"average {metrics['average_score']:.1f}   forgetting {'—' if fgt is None else f'{fgt:.1f}'}   "
                 f"total {metrics['wall_seconds']:.0f} s")
    if "task_free_average" in metrics:
        lines.append(f"task-free (each test example routed to an entry, task not given): average {metrics['task_free_average']:.1f}, "
                     f"routing accuracy {metrics['routing_accuracy']:.1f}%")
    lines.append("constant: the best constant answer on test under the task's metric (a ceiling, not a method); "
                 "probe: logistic regression on frozen pooled features (C on dev)")
    return "\n".join(lines)
