"""The contract every strategy implements, and the bank entry a trained task becomes.

`run.run_stream` drives a strategy through a stream:

    strategy = Cls(stream, backbone, bank, out)        # on --resume, restores what `out` holds
    for i, spec in enumerate(stream.tasks):
        if strategy.learn(i, spec, data, progress):    # False: nothing to evaluate after this task
            for every task j seen so far: score strategy.predict(j's name, task, test examples)
    strategy.finish(data)                              # leave a bank that answers every task

`learn` must be idempotent for a task already learned (an interrupted run calls it again);
`predict` uses the strategy's current state, so a strategy that changes old tasks' answers shows
forgetting in the accuracy matrix.

Measurement happens once per task. The learner never reads the test split; a strategy that
stores a trained state as a bank entry measures that state here (`measure_test`: its test answers
and what the prompt adds), records the scores in the entry, and answers the run's first `predict`
of the task with those answers instead of scoring the stored entry a second time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import Tensor

from continual_rpt import __version__, distributed
from continual_rpt.backbones import Backbone, BackboneConfig
from continual_rpt.bank import META_FILE, BankError, Entry, PromptBank
from continual_rpt.evaluation import load_answerer
from continual_rpt.learner import TrainConfig, TrainedTask, with_context
from continual_rpt.routing import routable, route_state
from continual_rpt.streams import SECTIONS, Stream, TaskSpec, load_data, spec_from_entry
from continual_rpt.tasks import DataError, Example, Task, TaskData
from continual_rpt.tasks.data import sampled_rows


class Strategy(Protocol):
    """What the run loop calls; see the module docstring for the order."""

    # True when a task's answers come from its bank entry alone, stored once learned and never changed: the run then
    # scores each task once and later verifies its entry by checksum (the stream's `eval: every` re-scores anyway).
    answers_fixed: bool

    def __init__(self, stream: Stream, backbone: Backbone, bank: PromptBank, out: Path) -> None: ...

    @staticmethod
    def context_tasks(stream: Stream, i: int) -> list[str]:
        """Tasks whose collapsed prompts follow task i's own prompt in its input (Progressive Prompts), newest first."""

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Learn task i (`data`: every task's loaded splits, by name); True when its row can be evaluated."""

    def predict(self, name: str, task: Task, examples: list[Example]) -> list[int]:
        """Predicted label or choice index of each example of task `name`, with the current state."""

    def finish(self, data: dict[str, TaskData]) -> None:
        """Store whatever the bank still lacks, so that it answers every task of the stream."""


@dataclass
class Measured:
    """A trained state's test answers (in test order) and the scores an entry records of them."""

    predictions: list[int]
    metrics: dict  # test (every metric), test_score, and what the prompt adds: test_without_prompt, test_without_phi


def measure_test(backbone: Backbone, data: TaskData, cfg: TrainConfig, trained: TrainedTask, context: Tensor | None = None) -> Measured:
    """Test answers of the collapsed prompt and head as a bank stores them, and what the prompt adds (the head alone; P without Φ).

    `context`: the frozen prompts that follow P′ (Progressive Prompts). Every process of a launch
    takes part (each predicts its share); an empty test split measures nothing.
    """
    if not data.test:
        return Measured([], {})
    cfg = cfg.on(backbone)
    head = None
    if trained.head is not None:
        head = backbone.new_head(data.task)
        head.load_state_dict(trained.head)
    features = backbone.featurize(data.test, cfg.max_length - trained.metrics["prompt_tokens_in_context"])

    def answers(prompt: Tensor | None) -> list[int]:  # None: the head alone, context or not
        given = with_context(None if prompt is None else prompt.to(backbone.device), context)
        return distributed.predict_split(backbone, given, head, features, cfg.eval_batch_size, cfg.bf16)

    predictions = answers(trained.prompt)
    test = data.task.score(data.test, predictions)
    metrics = {"test": test, "test_score": test["score"]}
    if trained.prompt is not None and head is not None:
        metrics["test_without_prompt"] = data.task.score(data.test, answers(None))["score"]
    if trained.uncollapsed is not None:
        metrics["test_without_phi"] = data.task.score(data.test, answers(trained.uncollapsed))["score"]
    return Measured(predictions, metrics)


def entry_for(spec: TaskSpec, data: TaskData, backbone: Backbone, backbone_cfg: BackboneConfig, trained: TrainedTask,
              context: Tensor | None = None, measured: Measured | None = None) -> Entry:
    """The bank entry of a trained task: P′ and head, plus everything needed to trust and reuse them.

    `context`: the frozen prompts that follow P′ when it answers (Progressive Prompts), so that the
    router's temperature is fitted on the answers the entry gives. `measured`: its test scores
    (`measure_test`), recorded with the training metrics; an entry stored without them (a prompt
    shared by every task, which moved on after the task was learned) records none.
    """
    spec = dataclasses.replace(spec, train=spec.train.on(backbone))  # an unset bf16 is stored as the device decides it
    meta = {
        "library_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "name": spec.name,
        "task": data.task.name,
        "custom": dataclasses.asdict(spec.custom) if spec.custom else None,
        "kind": data.task.kind,
        "label_names": list(data.task.label_names),
        "backbone": {"name": backbone.name, "family": backbone.family, "width": backbone.width, "fingerprint": backbone.fingerprint,
                     "pooling": getattr(backbone, "pooling", None),  # resolved: `auto` is recorded as what it chose
                     "bos": getattr(backbone, "bos", None)},  # a decoder's prompt follows BOS where its tokenizer adds one
        "method": spec.prompt.method,
        "prompt_tokens": trained.metrics["prompt_tokens"],
        "prompt_shape": None if trained.prompt is None else list(trained.prompt.shape),  # [n, d], or [L, n, d] deep
        "dtype": "float32",
        "device": str(backbone.device),  # what device `auto` chose, and the precision it trained and scores in
        "precision": "bf16" if spec.train.bf16 else "fp32",
        "data_files": data.files,
        "skipped_rows": data.skipped,  # rows dropped because their label names no class, per file
        "train_rows": sampled_rows(data.train),  # which rows of data_files the (few-shot) sample took, by id
    }
    config = {"backbone": dataclasses.asdict(backbone_cfg), **{s: dataclasses.asdict(getattr(spec, s)) for s in SECTIONS}}
    head = None
    if trained.head is not None:
        head = backbone.new_head(data.task)
        head.load_state_dict(trained.head)
    prompt = None if trained.prompt is None else with_context(trained.prompt, context).to(backbone.device)
    route = task_route_state(backbone, spec, data, prompt, head)
    metrics = {**trained.metrics, **(measured.metrics if measured else {}), "history": trained.history}
    return Entry(trained.prompt, trained.head, meta, config, metrics, route)


def shown_meta(meta: dict, folder: Path, first: int = 3) -> dict:
    """An entry's metadata for a terminal: its training rows as their count, first ids and the file in `folder` that holds them."""
    rows = meta.get("train_rows")
    if not rows:  # entries made before the rows were recorded
        return meta
    ids = rows["ids"]
    more = f", … {len(ids) - first} more" if len(ids) > first else ""
    where = f"every id and sha256: train_rows in {folder / META_FILE}"
    return {**meta, "train_rows": f"{rows['count']} rows: {', '.join(ids[:first])}{more} ({where})"}


def task_route_state(backbone: Backbone, spec: TaskSpec, data: TaskData, prompt: Tensor | None, head) -> dict[str, Tensor]:
    """Route state of a task as its spec trains it: its training inputs' summary and the temperature of its answers."""
    cfg = spec.train
    return route_state(backbone, data.train, data.dev, prompt, head, cfg.max_length, cfg.seed, cfg.eval_batch_size, cfg.bf16)


def index_routes(bank: PromptBank, backbone: Backbone, data_dir: str | None = None, base_dir: Path | None = None) -> list[str]:
    """Add route state to every entry of `bank` made before routing existed, from the data it was trained on; the names done.

    Each entry's data is read as its stored configuration says (`data_dir` replaces the folder of
    SuperGLUE and CL benchmark files; relative custom paths resolve against `base_dir`, default the
    working directory) and must hold the bytes the entry recorded; nothing else of the entry changes.
    """
    done = []
    for name in routable(bank)[1]:
        answerer = load_answerer(bank, name, backbone)  # the prompt as it answers, Progressive context included
        entry, where = answerer.entry, bank.path / name / META_FILE
        spec = spec_from_entry(entry.meta, entry.config, str(where), data_dir)
        try:
            data = load_data(spec, base_dir or Path.cwd())
        except (DataError, OSError) as err:
            raise BankError(f"{where}: cannot read the data entry {name!r} was trained on ({err}); "
                            "give the folder that holds it (--data-dir, or --base-dir for a custom task's relative paths)") from None
        stored = entry.meta.get("data_files") or {}
        if stored and sorted(stored.values()) != sorted(data.files.values()):
            changed = [path for path, digest in sorted(data.files.items()) if digest not in stored.values()]
            raise BankError(f"{where}: the data read now differs from what entry {name!r} was trained on "
                            f"({', '.join(changed) or 'other files'}); route state must summarise its own training inputs")
        bank.add_route(name, task_route_state(backbone, spec, data, answerer.prompt, answerer.head))
        done.append(name)
    return done
