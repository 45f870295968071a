"""A fresh prompt per task, collapsed into the bank (rpt, pt, pt-mlp, head), and Progressive Prompts."""

from __future__ import annotations

from pathlib import Path

from continual_rpt.backbones import Backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import predict_from_bank, stacked_prompts
from continual_rpt.learner import train_task
from continual_rpt.strategies.base import entry_for
from continual_rpt.streams import Stream, TaskSpec
from continual_rpt.tasks import Example, Task, TaskData


class BankStrategy:
    """A fresh prompt per task, collapsed into the bank; every task is answered by its own entry."""

    answers_fixed = True  # an entry is immutable; Progressive's context is earlier entries, immutable too

    def __init__(self, stream: Stream, backbone: Backbone, bank: PromptBank, out: Path) -> None:
        self.stream, self.backbone, self.bank, self.out = stream, backbone, bank, out

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Train task i unless an interrupted run stored it already; always evaluable."""
        if spec.name not in self.bank:
            mine = data[spec.name]
            context = self.context_tasks(self.stream, i)
            frozen = stacked_prompts(self.bank, context)
            trained = train_task(self.backbone, mine, spec.prompt, spec.train, progress, context=frozen)
            entry = entry_for(spec, mine, self.backbone, self.stream.backbone, trained, frozen)
            entry.meta["context"] = context
            self.bank.add(spec.name, entry)
        return True

    @staticmethod
    def context_tasks(stream: Stream, i: int) -> list[str]:
        """Tasks whose collapsed prompts follow task i's own in the input (none for a plain bank)."""
        return []

    def predict(self, name: str, task: Task, examples: list[Example]) -> list[int]:
        """Predictions of task `name` from its bank entry."""
        return predict_from_bank(self.bank, name, examples, self.backbone)

    def finish(self, data: dict[str, TaskData]) -> None:
        """Nothing left to do: the bank is complete."""


class ProgressiveStrategy(BankStrategy):
    """Progressive Prompts: task i trains its prompt in front of the frozen prompts of tasks i-1, …, 0."""

    @staticmethod
    def context_tasks(stream: Stream, i: int) -> list[str]:
        """All earlier tasks, newest first."""
        return [t.name for t in reversed(stream.tasks[:i])]
