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
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Protocol

from continual_rpt import __version__
from continual_rpt.backbones import Backbone, BackboneConfig
from continual_rpt.bank import Entry, PromptBank
from continual_rpt.learner import TrainedTask
from continual_rpt.routing import route_state
from continual_rpt.streams import SECTIONS, Stream, TaskSpec
from continual_rpt.tasks import Example, Task, TaskData


class Strategy(Protocol):
    """What the run loop calls; see the module docstring for the order."""

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


def entry_for(spec: TaskSpec, data: TaskData, backbone: Backbone, backbone_cfg: BackboneConfig, trained: TrainedTask) -> Entry:
    """The bank entry of a trained task: P′ and head, plus everything needed to trust and reuse them."""
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
        "data_files": data.files,
        "skipped_rows": data.skipped,  # rows dropped because their label names no class, per file
    }
    config = {"backbone": dataclasses.asdict(backbone_cfg), **{s: dataclasses.asdict(getattr(spec, s)) for s in SECTIONS}}
    head = None
    if trained.head is not None:
        head = backbone.new_head(data.task)
        head.load_state_dict(trained.head)
    cfg = spec.train
    prompt = None if trained.prompt is None else trained.prompt.to(backbone.device)
    route = route_state(backbone, data.train, data.dev, prompt, head, cfg.max_length, cfg.seed, cfg.eval_batch_size, cfg.bf16)
    return Entry(trained.prompt, trained.head, meta, config, {**trained.metrics, "history": trained.history}, route)
