"""Early stopping on dev: the best evaluation so far (its scores, prompt and heads), and when to stop looking."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _snapshot(module: nn.Module | None) -> dict[str, Tensor] | None:
    return {k: v.detach().clone() for k, v in module.state_dict().items()} if module is not None else None


class BestState:
    """The best dev evaluation so far (finite scores and prompt only), and when to stop for lack of improvement."""

    def __init__(self, patience: int) -> None:
        self.patience, self.stale = patience, 0
        self.score, self.scores, self.step = -math.inf, [], 0
        self.collapsed: Tensor | None = None
        self.prompt: dict[str, Tensor] | None = None
        self.heads: list[dict[str, Tensor] | None] = []

    def offer(self, scores: list[float], step: int, collapsed: Tensor | None, prompt: nn.Module | None, heads: list) -> float:
        """Keep this evaluation if its mean score beats the best; returns the mean score."""
        score = sum(scores) / len(scores)
        if score > self.score and math.isfinite(score) and (collapsed is None or torch.isfinite(collapsed).all()):
            self.score, self.scores, self.step, self.collapsed = score, scores, step, collapsed
            self.prompt, self.heads = _snapshot(prompt), [_snapshot(h) for h in heads]
            self.stale = 0
        else:
            self.stale += 1
        return score

    @property
    def stop(self) -> bool:
        """Whether `patience` evaluations in a row brought no improvement."""
        return self.patience > 0 and self.stale >= self.patience

    def restore(self, prompt: nn.Module | None, heads: list[nn.Module | None]) -> None:
        """Put the prompt and heads back into their best state."""
        for module, state in ((prompt, self.prompt), *zip(heads, self.heads)):
            if module is not None:
                module.load_state_dict(state)
