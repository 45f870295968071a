"""A fresh prompt per task, collapsed into the bank (rpt, pt, pt-mlp, head), and Progressive Prompts."""

from __future__ import annotations

from pathlib import Path

from continual_rpt.backbones import Backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import predict_from_bank, stacked_prompts
from continual_rpt.learner import train_task
from continual_rpt.strategies.base import entry_for, measure_test
from continual_rpt.streams import Stream, TaskSpec
from continual_rpt.tasks import Example, Task, TaskData


class BankStrategy:
    """A fresh prompt per task, collapsed into the bank; every task is answered by its own entry."""

    answers_fixed = True  # an entry is immutable; Progressive's context is earlier entries, immutable too

    def __init__(self, stream: Stream, backbone: Backbone, bank: PromptBank, out: Path) -> None:
        self.stream, self.backbone, self.bank, self.out = stream, backbone, bank, out
        # Test answers measured on a state just before it was stored, by task: (the examples, the answers), kept until the
        # run's first predict of the task takes them, so that a new entry's test split is scored once.
        self.measured: dict[str, tuple[list[Example], list[int]]] = {}

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Train task i unless an interrupted run stored it already, measure it on test and store it; always evaluable."""
        if spec.name not in self.bank:
            mine = data[spec.name]
            context = self.context_tasks(self.stream, i)
            frozen = stacked_prompts(self.bank, context)
            trained = train_task(self.backbone, mine, spec.prompt, spec.train, progress, context=frozen)
            measured = measure_test(self.backbone, mine, spec.train, trained, frozen)
            entry = entry_for(spec, mine, self.backbone, self.stream.backbone, trained, frozen, measured)
            entry.meta["context"] = context
            self.bank.add(spec.name, entry)
            self.measured[spec.name] = (mine.test, measured.predictions)
        return True

    @staticmethod
    def context_tasks(stream: Stream, i: int) -> list[str]:
        """Tasks whose collapsed prompts follow task i's own in the input (none for a plain bank)."""
        return []

    def predict(self, name: str, task: Task, examples: list[Example]) -> list[int]:
        """Predictions of task `name` from its bank entry: the answers measured as it was stored, the first time they are asked for."""
        measured_on, answers = self.measured.pop(name, (None, None))
        if examples is measured_on:  # the very list measured; a later call (eval: every) scores the stored entry
            return answers
        return predict_from_bank(self.bank, name, examples, self.backbone)

    def finish(self, data: dict[str, TaskData]) -> None:
        """Nothing left to do: the bank is complete."""


class ProgressiveStrategy(BankStrategy):
    """Progressive Prompts: task i trains its prompt in front of the frozen prompts of tasks i-1, …, 0."""

    @staticmethod
    def context_tasks(stream: Stream, i: int) -> list[str]:
        """All earlier tasks, newest first."""
        return [t.name for t in reversed(stream.tasks[:i])]
