"""Continual-learning strategies: what a stream's tasks share, and what each task is answered with.

    bank         a fresh prompt per task, collapsed into the bank; nothing is shared (rpt, pt, pt-mlp, head)
    progressive  a fresh prompt per task, trained in front of all earlier collapsed prompts (Progressive Prompts)
    shared       one prompt (P and Φ) trained task after task, a fresh head per task: the forgetting baseline
    multitask    one prompt trained on all tasks at once: the upper bound
    naive, ewc, lwf, replay, agem   Avalanche's strategies on the shared prompt (continual_rpt/avalanche.py)

Every strategy has the same three steps, called by `run.run_stream`: `learn` task i, `predict` any
task seen so far with the current state, `finish` by leaving a queryable bank behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from continual_rpt.backbones import Backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import predict
from continual_rpt.learner import build_prompt, train_joint, train_task
from continual_rpt.streams import STRATEGIES, Stream, TaskSpec
from continual_rpt.tasks import Example, Task, TaskData

# --method NAME -> (strategy, prompt method it sets; None keeps the stream's)
METHODS: dict[str, tuple[str, str | None]] = {
    "rpt": ("bank", "rpt"),
    "pt": ("bank", "pt"),
    "pt-mlp": ("bank", "pt-mlp"),
    "head": ("bank", "head"),
    "progressive": ("progressive", "rpt"),
    "progressive-pt": ("progressive", "pt"),
    "shared": ("shared", None),
    "multitask": ("multitask", None),
    "naive": ("naive", None),
    "ewc": ("ewc", None),
    "lwf": ("lwf", None),
    "replay": ("replay", None),
    "agem": ("agem", None),
}
assert set(STRATEGIES) == {s for s, _ in METHODS.values()}


def method_label(stream: Stream) -> str:
    """The run's method as a user names it: the prompt method for a bank, else the strategy."""
    prompt_methods = "+".join(sorted({t.prompt.method for t in stream.tasks}))
    if stream.strategy == "bank":
        return prompt_methods
    if stream.strategy == "progressive":
        return "progressive" if prompt_methods == "rpt" else f"progressive-{prompt_methods}"
    return stream.strategy


class BankStrategy:
    """A fresh prompt per task, collapsed into the bank; every task is answered by its own entry."""

    def __init__(self, stream: Stream, backbone: Backbone, bank: PromptBank, out: Path) -> None:
        self.stream, self.backbone, self.bank, self.out = stream, backbone, bank, out

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Train task i (unless an interrupted run stored it already); True when its row can be evaluated.

        `data` holds the loaded splits of every task of the stream, by name.
        """
        from continual_rpt.run import entry_for

        if spec.name not in self.bank:
            mine = data[spec.name]
            trained = train_task(self.backbone, mine, spec.prompt, spec.train, progress, context=self.context(i))
            entry = entry_for(spec, mine, self.backbone, self.stream.backbone, trained)
            entry.meta["context"] = self.context_tasks(i)
            self.bank.add(spec.name, entry)
        return True

    def context_tasks(self, i: int) -> list[str]:
        """Tasks whose collapsed prompts follow task i's own in the input (none for a plain bank)."""
        return []

    def context(self, i: int) -> torch.Tensor | None:
        """The frozen prompts [c, d] of `context_tasks(i)`, in order, or None."""
        names = self.context_tasks(i)
        return torch.cat([self.bank.get(name).prompt for name in names]) if names else None

    def predict(self, name: str, task: Task, examples: list[Example]) -> list[int]:
        """Predictions of task `name` from its bank entry."""
        return self.bank.predict(name, examples, self.backbone)

    def finish(self, data: dict[str, TaskData]) -> None:
        """Nothing left to do: the bank is complete."""


class ProgressiveStrategy(BankStrategy):
    """Progressive Prompts: task i trains its prompt in front of the frozen prompts of tasks i-1, …, 0."""

    def context_tasks(self, i: int) -> list[str]:
        """All earlier tasks, newest first."""
        return [t.name for t in reversed(self.stream.tasks[:i])]


class SharedStrategy:
    """One prompt trained on every task in turn, with a fresh head per task; checkpointed after each task."""

    CHECKPOINT = "shared.safetensors"

    def __init__(self, stream: Stream, backbone: Backbone, bank: PromptBank, out: Path) -> None:
        self.stream, self.backbone, self.bank, self.out = stream, backbone, bank, out
        first = stream.tasks[0]
        if not first.prompt.uses_prompt:
            raise ValueError(f"strategy {stream.strategy}: needs a prompt; method 'head' has none")
        for spec in stream.tasks[1:]:
            if spec.prompt != first.prompt:
                raise ValueError(f"strategy {stream.strategy}: every task must use the same prompt settings "
                                 f"({spec.name}'s differ from {first.name}'s)")
        self.prompt = build_prompt(backbone, first.prompt, first.train.seed)
        self.heads: dict[str, dict[str, torch.Tensor] | None] = {}
        self.metrics: dict[str, dict] = {}
        self._restore()

    def _restore(self) -> None:
        path = self.out / self.CHECKPOINT
        if not path.is_file():
            return
        tensors = load_file(path)
        with open(path, "rb") as f:  # the header's metadata holds the JSON part
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(json.loads(f.read(n))["__metadata__"]["state"])
        self.prompt.load_state_dict({k[len("prompt."):]: v for k, v in tensors.items() if k.startswith("prompt.")})
        for name in meta["learned"]:
            head = {k[len(f"head.{name}."):]: v for k, v in tensors.items() if k.startswith(f"head.{name}.")}
            self.heads[name] = head or None
        self.metrics = meta["metrics"]

    def _checkpoint(self) -> None:
        """P, Φ and every head so far, in one file replaced atomically."""
        tensors = {f"prompt.{k}": v.detach().cpu().contiguous() for k, v in self.prompt.state_dict().items()}
        for name, head in self.heads.items():
            tensors.update({f"head.{name}.{k}": v.cpu().contiguous() for k, v in (head or {}).items()})
        state = json.dumps({"learned": list(self.heads), "metrics": self.metrics})
        tmp = self.out / f".{self.CHECKPOINT}.tmp"
        save_file(tensors, tmp, metadata={"state": state})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.out / self.CHECKPOINT)

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Keep training the shared prompt on task i with a fresh head."""
        if spec.name not in self.heads:
            trained = train_task(self.backbone, data[spec.name], spec.prompt, spec.train, progress, prompt=self.prompt)
            self.heads[spec.name] = trained.head
            self.metrics[spec.name] = {**trained.metrics, "history": trained.history}
            self._checkpoint()
        return True

    def _head(self, name: str, task):
        state = self.heads[name]
        if state is None:
            return None
        head = self.backbone.new_head(task)
        head.load_state_dict(state)
        return head

    def predict(self, name: str, task: Task, examples: list[Example]) -> list[int]:
        """Predictions of task `name` with the shared prompt as it is now and the task's own head."""
        spec = next(t for t in self.stream.tasks if t.name == name)
        return predict(self.backbone, self.prompt.collapse(), self._head(name, task), examples, spec.train.max_length,
                       bf16=spec.train.bf16)

    def finish(self, data: dict[str, TaskData]) -> None:
        """Store the final shared prompt with each task's head, so the bank answers every task."""
        from continual_rpt.learner import TrainedTask
        from continual_rpt.run import entry_for

        final = self.prompt.collapse()
        for spec in self.stream.tasks:
            if spec.name in self.bank or spec.name not in self.heads:
                continue
            metrics = dict(self.metrics[spec.name])
            history = metrics.pop("history", [])
            trained = TrainedTask(final, self.heads[spec.name], metrics, history)
            entry = entry_for(spec, data[spec.name], self.backbone, self.stream.backbone, trained)
            entry.meta["shared_prompt"] = True  # the same P′ as every other entry of this bank
            self.bank.add(spec.name, entry)


class MultitaskStrategy(SharedStrategy):
    """The upper bound: one prompt and a head per task trained on all tasks together, once all are known."""

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Wait for the last task, then train on all of them jointly (only the last row is evaluated)."""
        if i < len(self.stream.tasks) - 1:
            return False
        if not self.heads:
            first = self.stream.tasks[0]
            prompt, trained = train_joint(self.backbone, list(data.values()), first.prompt, first.train, progress)
            self.prompt = prompt
            for name, result in zip(data, trained):
                self.heads[name] = result.head
                self.metrics[name] = {**result.metrics, "history": result.history}
            self._checkpoint()
        return True


def make_strategy(stream: Stream, backbone: Backbone, bank: PromptBank, out: Path):
    """The strategy object `stream.strategy` names."""
    if stream.strategy in ("naive", "ewc", "lwf", "replay", "agem"):
        try:
            from continual_rpt.avalanche import AvalancheStrategy
        except ModuleNotFoundError as err:
            raise ValueError(f"strategy {stream.strategy}: needs avalanche-lib ({err}); "
                             "install it with: pip install 'continual-rpt[avalanche]'") from err
        return AvalancheStrategy(stream, backbone, bank, out)
    classes = {"bank": BankStrategy, "progressive": ProgressiveStrategy, "shared": SharedStrategy, "multitask": MultitaskStrategy}
    return classes[stream.strategy](stream, backbone, bank, out)


def with_method(stream: Stream, method: str) -> Stream:
    """`stream` set to run `method` (a name of METHODS) on every task."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    strategy, prompt_method = METHODS[method]
    tasks = [t if prompt_method is None else dataclasses.replace(t, prompt=dataclasses.replace(t.prompt, method=prompt_method))
             for t in stream.tasks]
    return dataclasses.replace(stream, strategy=strategy, tasks=tasks)
