"""Resolution: 95% percentile bootstrap intervals for scores and paired differences, counting seeds and test examples.

Test-example resamples. A resample draws test units with replacement, a unit being an example or,
where examples are scored together, its group (a MultiRC question, a ReCoRD query). The draws
depend only on the test set and the bootstrap seed, so every run of a test set scores the same R
resamples, in the same order: a run keeps its score on each (`bootstrap.json`, a grid record's
`test_resampled`), and resample r of one run is paired with resample r of any other.

Two intervals of a mean over seeds (`intervals`), each from one value per test resample r:
- seeds and test examples (the one that decides "resolved"): draw k seeds with replacement from
  the k seeds (draw r of a generator with a fixed seed), and average the drawn seeds' scores on
  test resample r. The test set is shared by the seeds, so one test resample serves every drawn seed.
  It counts both what another seed would change (data sample, initial prompt, batch order) and
  what another test sample would change.
- test-sample: every seed once, averaged on test resample r; the noise of the test sample alone.
With one seed there is nothing to draw: both intervals are the same.

A task average is taken per seed and resample first; a paired difference is taken per seed and
resample (same seed: same training sample and initial prompt; same r: same test examples) and
then bootstrapped like a score, so both sides draw the same seeds and the same test resample.
The bounds are numpy.quantile's (linear interpolation) at 2.5 % and 97.5 %. A difference counts
as resolved only when its seeds-and-test interval excludes 0.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

from continual_rpt.tasks import Example, Task

RESAMPLES, SEED, LEVEL = 1000, 0, 0.95
ONE_SEED_NOTE = "with one seed there is no seed to resample, so both intervals are the test-sample interval"


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


def interval(estimate: float, resampled, level: float = LEVEL) -> Interval:
    """Percentile interval (numpy.quantile, linear interpolation) of the resampled values at `level` around `estimate`."""
    tail = (1 - level) / 2
    low, high = np.quantile(np.asarray(resampled, dtype=float), [tail, 1 - tail])
    return Interval(estimate, float(low), float(high))


def by_seed(runs: list[dict[str, list[float]]], tasks: list[str]) -> np.ndarray:
    """[seeds, R]: each run's (seed's) mean over `tasks` of its score on test resample r."""
    return np.array([[run[t] for t in tasks] for run in runs], dtype=float).mean(axis=1)


def seed_and_test_resamples(per_seed: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Per test resample r: the mean over k seeds drawn with replacement (draw r of a generator seeded `seed`) of their scores on r."""
    k, resamples = per_seed.shape
    drawn = np.random.default_rng(seed).integers(0, k, size=(resamples, k))
    return per_seed[drawn, np.arange(resamples)[:, None]].mean(axis=1)


def intervals(estimate: float, per_seed: np.ndarray, level: float = LEVEL) -> tuple[Interval, Interval]:
    """(seeds-and-test interval, test-sample interval) of the mean over seeds; `per_seed` is [seeds, R] (see `by_seed`)."""
    per_seed = np.asarray(per_seed, dtype=float)
    return interval(estimate, seed_and_test_resamples(per_seed), level), interval(estimate, per_seed.mean(axis=0), level)
