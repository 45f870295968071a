"""One prompt shared by every task, with a head per task: the common part, and its two plain uses.

`OnePromptStrategy` holds the prompt, the heads, the checkpoint, prediction and the final bank;
what differs is how the prompt learns: task after task (`SharedStrategy`, the forgetting baseline),
on all tasks at once (`MultitaskStrategy`, the upper bound), or in Avalanche's loop with a
continual-learning method (strategies.avalanche). Their entries record no test score: the prompt
kept moving after each task was learned, and the run's metrics.json holds what the final one answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from continual_rpt.atomic import replace_safetensors
from continual_rpt.backbones import Backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import predict
from continual_rpt.learner import TrainedTask, build_prompt, train_joint, train_task
from continual_rpt.strategies.base import entry_for
from continual_rpt.streams import Stream, TaskSpec
from continual_rpt.tasks import Example, Task, TaskData


class OnePromptStrategy:
    """One prompt for every task and a head per task, checkpointed after each task; subclasses say how the prompt learns."""

    CHECKPOINT = "shared.safetensors"
    answers_fixed = False  # the one prompt moves with every task

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
        with safe_open(path, "pt") as f:  # the header's metadata holds the JSON part
            meta = json.loads(f.metadata()["state"])
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
        replace_safetensors(self.out / self.CHECKPOINT, tensors, metadata={"state": state})

    @staticmethod
    def context_tasks(stream: Stream, i: int) -> list[str]:
        """None: the one shared prompt is the whole prompt."""
        return []

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


class SharedStrategy(OnePromptStrategy):
    """One prompt trained on every task in turn, with a fresh head per task (the forgetting baseline)."""

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Keep training the shared prompt on task i with a fresh head."""
        if spec.name not in self.heads:
            trained = train_task(self.backbone, data[spec.name], spec.prompt, spec.train, progress, prompt=self.prompt)
            self.heads[spec.name] = trained.head
            self.metrics[spec.name] = {**trained.metrics, "history": trained.history}
            self._checkpoint()
        return True


class MultitaskStrategy(OnePromptStrategy):
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
