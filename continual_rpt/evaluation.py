"""Prediction with a collapsed prompt (given, or stored in a bank), and the continual-learning metrics of an accuracy matrix."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from continual_rpt.backbones import Backbone, Features, RowPrompts
from continual_rpt.bank import HEAD_FILE, META_FILE, BankError, Entry, PromptBank
from continual_rpt.tasks import DataError, Example, Task, task_from_meta


class NonFiniteScores(ValueError):
    """Scores that cannot be ranked: the prompt or head has diverged."""


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
    """bf16 autocast on the backbone's device type (or a no-op), with the attention kernel fastest for it."""
    backbone.use_attention_for(bf16)
    return torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=bf16)


def per_example(backbone: Backbone, features: list[Features], batch_size: int, bf16: bool, compute,
                by_pair: bool = False) -> list[Tensor]:
    """Each featurized example's output of `compute(batch_ids, batch)`, fp32 on the CPU, in input order: one row, by_pair [pairs, ...]."""
    out: list[Tensor] = [torch.empty(0)] * len(features)
    for batch_ids in length_batches(features, batch_size):
        batch = backbone.collate([features[i] for i in batch_ids])
        with torch.no_grad(), autocast(backbone, bf16):
            outputs = compute(batch_ids, batch).float().cpu()  # one transfer per batch, not per example
        example_of_row = batch["rows"].cpu() if by_pair else None  # by_pair: compute gives a row per text pair, not per example
        for local, i in enumerate(batch_ids):
            out[i] = outputs[example_of_row == local] if by_pair else outputs[local]
    return out


def _finite(scores: Tensor) -> Tensor:
    """`scores`, refused if any is NaN (-inf marks a missing choice; NaN means the prompt has blown up)."""
    if torch.isnan(scores).any():
        raise NonFiniteScores("the model's scores are NaN: the prompt (or head) holds values it cannot compute with")
    return scores


def option_scores(
    backbone: Backbone, prompt: Tensor | None, head: nn.Module | None, features: list[Features], batch_size: int = 64, bf16: bool = True
) -> list[Tensor]:
    """Every featurized example's scores [C] (fp32, -inf for missing choices), in input order."""
    if head is not None:
        head.eval()
    return per_example(backbone, features, batch_size, bf16, lambda _, batch: _finite(backbone.scores(prompt, head, batch)))


def mixed_option_scores(
    backbone: Backbone, answerers: list[Answerer], owners: list[int], features: list[Features], batch_size: int = 64, bf16: bool = True
) -> list[Tensor]:
    """Every featurized example's scores [C] under its own answerer, `answerers[owners[i]]`, tasks mixed in each batch.

    Each row of a batch gets its own P′ (shorter ones behind masked slots) and its own head, so rows
    of different tasks share one forward pass and need not be adjacent.
    """
    for a in answerers:
        if a.head is not None:
            a.head.eval()

    def score(batch_ids: list[int], batch: dict[str, Tensor]) -> Tensor:
        mine = [answerers[owners[i]] for i in batch_ids]
        prompts = RowPrompts.stack([a.prompt for a in mine], backbone.width, backbone.device)
        heads = None if mine[0].head is None else [a.head for a in mine]
        return _finite(backbone.scores(prompts if prompts.mask.shape[1] else None, heads, batch))

    return per_example(backbone, features, batch_size, bf16, score)


def predict_features(
    backbone: Backbone, prompt: Tensor | None, head: nn.Module | None, features: list[Features], batch_size: int = 64, bf16: bool = True
) -> list[int]:
    """Predicted label or choice index for every featurized example, in input order."""
    return [int(s.argmax()) for s in option_scores(backbone, prompt, head, features, batch_size, bf16)]


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
    n_tokens = 0 if prompt is None else prompt.shape[-2]
    features = backbone.featurize(examples, max_length - n_tokens)
    return predict_features(backbone, prompt, head, features, batch_size, bf16)


class Answerer(NamedTuple):
    """What answers one task from a bank: the task, the prompt as the backbone receives it, the head, the entry."""

    task: Task
    prompt: Tensor | None
    head: nn.Module | None
    entry: Entry


def stacked_prompts(bank: PromptBank, names: list[str]) -> Tensor | None:
    """The stored prompts of `names`, in order, as one [Σn, d] tensor (None for no names).

    Progressive Prompts' context: task i trains, and is answered, with [P′_i; P′_{i-1}; …; P′_1].
    """
    return torch.cat([bank.get(name).prompt for name in names]) if names else None


def load_answerer(bank: PromptBank, name: str, backbone: Backbone) -> Answerer:
    """Task, prompt (its Progressive context appended) and head of entry `name`, checked to fit `backbone`."""
    entry = bank.get(name)
    where = bank.path / name / META_FILE
    entry.check_backbone(backbone, where)
    try:
        task = task_from_meta(entry.meta, where)
    except DataError as err:
        raise BankError(str(err)) from None
    context = entry.meta.get("context") or []
    if not isinstance(context, list) or name in context or not all(c in bank.tasks() for c in context):
        raise BankError(f"{where}: field 'context' must list other entries of this bank, got {context!r}")
    prompt = entry.prompt
    if context:
        if prompt.dim() == 3:
            raise BankError(f"{where}: a deep prompt cannot take Progressive Prompts' context")
        prompt = torch.cat([prompt, stacked_prompts(bank, context)])
    prompt = prompt.to(backbone.device) if prompt is not None else None
    head = None
    if entry.head is not None:
        head = backbone.new_head(task)
        try:
            head.load_state_dict(entry.head)
        except RuntimeError as err:
            raise BankError(f"{bank.path / name / HEAD_FILE}: does not fit this backbone's head ({err})") from err
    return Answerer(task, prompt, head, entry)


def bank_option_scores(bank: PromptBank, examples: list[Example], tasks: list[str], backbone: Backbone, batch_size: int = 64,
                       bf16: bool = True) -> list[Tensor]:
    """Every example's scores with the stored prompt and head of its own task (`tasks[i]`), tasks mixed in each batch.

    Each entry's inputs are truncated, and scored in bf16 or fp32, as the entry was evaluated when it
    was trained (fp32 for the whole call if any entry was trained in fp32, or if `bf16` is False).
    """
    names = list(dict.fromkeys(tasks))
    answerers = [load_answerer(bank, name, backbone) for name in names]
    features: list[Features | None] = [None] * len(examples)
    for name, a in zip(names, answerers):
        train = a.entry.config.get("train", {})
        bf16 = bf16 and train.get("bf16", True)
        mine = [i for i, task in enumerate(tasks) if task == name]
        n_tokens = 0 if a.prompt is None else a.prompt.shape[-2]
        for i, f in zip(mine, backbone.featurize([examples[i] for i in mine], train.get("max_length", 256) - n_tokens)):
            features[i] = f
    return mixed_option_scores(backbone, answerers, [names.index(t) for t in tasks], features, batch_size, bf16)


def predict_from_bank(bank: PromptBank, name: str, examples: list[Example], backbone: Backbone, bf16: bool = True) -> list[int]:
    """Predicted label or choice index of every example with task `name`'s stored prompt and head (fp32 if not `bf16`)."""
    return [int(s.argmax()) for s in bank_option_scores(bank, examples, [name] * len(examples), backbone, bf16=bf16)]


# --- continual-learning metrics: pure functions of the accuracy matrix -----------------------
# R[i][j] is the score on task j after learning task i; None where it was not measured (j > i
# for a prompt bank, which has nothing to answer task j with before learning it).


def average_score(R: list[list[float | None]]) -> float:
    """Mean final score over all tasks: mean_j R[T-1][j]."""
    return sum(R[-1]) / len(R[-1])


def forgetting(R: list[list[float | None]]) -> float | None:
    """Chaudhry et al. (2018): mean over j < T-1 of max_{l<T-1} R[l][j] − R[T-1][j]; None if undefined."""
    T = len(R)
    if T < 2 or any(R[l][j] is None for j in range(T - 1) for l in range(j, T)):
        return None  # one task, or a method that is not evaluated along the stream (multitask)
    drops = [max(R[l][j] for l in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)]
    return sum(drops) / len(drops)


def backward_transfer(R: list[list[float | None]]) -> float | None:
    """Lopez-Paz & Ranzato (2017): mean over j < T-1 of R[T-1][j] − R[j][j]; None if undefined."""
    T = len(R)
    if T < 2 or any(R[j][j] is None for j in range(T)):
        return None
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)
