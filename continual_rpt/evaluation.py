"""Prediction with a collapsed prompt, and a task's official score on a split."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from continual_rpt.backbones import Backbone, Features
from continual_rpt.tasks import Example, Task


def length_batches(features: list[Features], batch_size: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Index batches of similar length, so little of each padded batch is padding.

    Without a generator the order is deterministic (sorted by length). With one, the data is
    shuffled, sorted by length within windows of 50 batches, and the batches shuffled, which
    keeps most of the randomness of plain shuffling at a fraction of its padding.
    """
    if generator is None:
        order = sorted(range(len(features)), key=lambda i: features[i].length)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = torch.randperm(len(features), generator=generator).tolist()
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: features[i].length)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def autocast(backbone: Backbone, bf16: bool):
    """bf16 autocast on the backbone's device type, or a no-op."""
    return torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def predict_features(
    backbone: Backbone, prompt: Tensor | None, head: nn.Module | None, features: list[Features], batch_size: int = 64, bf16: bool = True
) -> list[int]:
    """Predicted label or choice index for every featurized example, in input order."""
    predictions = [0] * len(features)
    if head is not None:
        head.eval()
    for batch_ids in length_batches(features, batch_size):
        batch = backbone.collate([features[i] for i in batch_ids])
        with autocast(backbone, bf16):
            scores = backbone.scores(prompt, head, batch)
        for i, choice in zip(batch_ids, scores.argmax(-1).tolist()):
            predictions[i] = choice
    return predictions


def predict(
    backbone: Backbone,
    prompt: Tensor | None,
    head: nn.Module | None,
    examples: list[Example],
    max_length: int = 256,
    batch_size: int = 64,
    bf16: bool = True,
) -> list[int]:
    """Predicted index for every example with a collapsed prompt P′ (and the task's head)."""
    n_tokens = 0 if prompt is None else prompt.shape[0]
    features = backbone.featurize(examples, max_length - n_tokens)
    return predict_features(backbone, prompt, head, features, batch_size, bf16)


def evaluate(
    backbone: Backbone,
    task: Task,
    prompt: Tensor | None,
    head: nn.Module | None,
    examples: list[Example],
    max_length: int = 256,
    batch_size: int = 64,
    bf16: bool = True,
) -> dict[str, float]:
    """The task's official metrics (percent) and `score` on labelled examples."""
    return task.score(examples, predict(backbone, prompt, head, examples, max_length, batch_size, bf16))
