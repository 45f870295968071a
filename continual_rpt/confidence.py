"""Resolution: 95% bootstrap confidence intervals over test examples, for scores and paired differences.

A resample draws test units with replacement, a unit being an example or, where examples are
scored together, its group (a MultiRC question, a ReCoRD query). The draws depend only on the
test set and the bootstrap seed, so every run of a stream scores the same R resamples: a run keeps
its R resampled scores per task (`bootstrap.json`), and any comparison is paired by resample.
Seeds are averaged inside each resample, and a task average is the mean of its tasks' resampled
scores, so an interval reflects both the test sample and the seeds. A difference counts as
resolved only when its interval excludes 0.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from statistics import mean

from continual_rpt.tasks import Example, Task

RESAMPLES, SEED, LEVEL = 1000, 0, 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate and its bootstrap confidence interval [low, high]."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0."""
        return self.low > 0 or self.high < 0


def examples_id(examples: list[Example]) -> str:
    """sha256 of the test examples' ids in order: runs are paired only over the same test set."""
    return hashlib.sha256("\n".join(ex.uid for ex in examples).encode()).hexdigest()


def resampled_scores(task: Task, examples: list[Example], predictions: list[int], resamples: int = RESAMPLES,
                     seed: int = SEED) -> list[float]:
    """The task score on each of `resamples` bootstrap resamples of the test units (the same draws for every run)."""
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.group or example.uid, []).append(i)
    units = list(groups.values())
    rng = random.Random(seed)
    scores = []
    for _ in range(resamples):
        picks = [i for unit in rng.choices(units, k=len(units)) for i in unit]
        scores.append(task.score([examples[i] for i in picks], [predictions[i] for i in picks])["score"])
    return scores


def interval(estimate: float, resampled: list[float], level: float = LEVEL) -> Interval:
    """Percentile interval of the resampled values at `level` around `estimate`."""
    values = sorted(resampled)
    tail = (1 - level) / 2
    return Interval(estimate, values[int(tail * len(values))], values[min(len(values) - 1, int((1 - tail) * len(values)))])


def pooled(runs: list[dict[str, list[float]]], tasks: list[str]) -> list[float]:
    """Per resample: the mean over tasks of the mean over runs (seeds) of each run's resampled score."""
    return [mean(mean(run[t][r] for run in runs) for t in tasks) for r in range(len(runs[0][tasks[0]]))]
