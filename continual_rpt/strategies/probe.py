"""The linear-probe control: per task, a logistic regression on frozen pooled features, stored as a head-only entry."""

from __future__ import annotations

import time

from continual_rpt.controls import fit_linear_probe
from continual_rpt.learner import TrainedTask
from continual_rpt.strategies.bank import BankStrategy
from continual_rpt.strategies.base import entry_for
from continual_rpt.streams import TaskSpec
from continual_rpt.tasks import TaskData


class LinearProbeStrategy(BankStrategy):
    """No prompt and no gradient steps: each task's head is the dev-best logistic regression (controls.py)."""

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Fit task i's probe unless an interrupted run stored it already."""
        if spec.name not in self.bank:
            mine, cfg = data[spec.name], spec.train
            start = time.perf_counter()
            weights, fitted = fit_linear_probe(self.backbone, mine, cfg.max_length, cfg.seed, cfg.eval_batch_size, cfg.bf16)
            wall = time.perf_counter() - start
            del fitted["test_predictions"]  # the run scores its entries itself (run.py)
            n_head = sum(w.numel() for w in weights.values())
            metrics = {
                **fitted, "task": mine.task.name, "method": "linear-probe", "prompt_tokens": 0, "prompt_tokens_in_context": 0,
                "trainable_parameters": n_head, "stored_parameters": n_head, "train_examples": len(mine.train),
                "wall_seconds": wall, "train_examples_per_second": len(mine.train) / wall,
            }
            entry = entry_for(spec, mine, self.backbone, self.stream.backbone, TrainedTask(None, weights, metrics, []))
            entry.meta.update(method="linear-probe", context=[])
            self.bank.add(spec.name, entry)
        return True
