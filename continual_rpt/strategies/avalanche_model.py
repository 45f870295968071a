"""The Avalanche side of a stream: examples as indices into a feature store, tasks as experiences, and the model Avalanche trains.

`to_avalanche_benchmark` turns any stream into an Avalanche benchmark (one experience per task,
task label = position), and `TaskModel` scores a minibatch that may mix tasks through the frozen
backbone with each task's prompt and head. Only the prompt and heads are registered parameters.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from continual_rpt.backbones import Backbone, Features
from continual_rpt.evaluation import autocast, length_batches
from continual_rpt.prompts import ResidualPrompt
from continual_rpt.strategies import strategy_class
from continual_rpt.streams import Stream
from continual_rpt.tasks import Task, TaskData

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="no QP solver found")  # see continual_rpt.strategies.avalanche
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels
    from avalanche.benchmarks.utils import DataAttribute, TaskAwareSupervisedClassificationDataset, TaskLabels
    from avalanche.models import MultiTaskModule

PAD = -1e9  # score of an output an example does not have: finite, so softmax and KL-divergence stay finite
EVAL_BATCH = 64  # continual_rpt.evaluation.predict's batch size: the batches a run's scores came from


class FeatureStore:
    """Pre-tokenised examples; an Avalanche input x is a LongTensor of indices into the store."""

    def __init__(self) -> None:
        self.features: list[Features] = []

    def add(self, features: list[Features]) -> list[int]:
        """Append `features` and return their indices."""
        start = len(self.features)
        self.features.extend(features)
        return list(range(start, len(self.features)))

    def lookup(self, x: Tensor) -> list[Features]:
        """The examples that x indexes, in order."""
        return [self.features[i] for i in x.tolist()]


class _Indexed(Dataset):
    """One split of one task as samples (x, y): x the example's index in the store, y its label."""

    def __init__(self, indices: list[int], labels: list[int]) -> None:
        self.indices, self.labels = indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.tensor(self.indices[i]), self.labels[i]


def task_dataset(store: FeatureStore, features: list[Features], task_label: int) -> TaskAwareSupervisedClassificationDataset:
    """An Avalanche dataset of (x, y, t) samples, with `targets` and task labels, over `features` added to `store`."""
    labels = [f.label for f in features]
    return TaskAwareSupervisedClassificationDataset(
        [_Indexed(store.add(features), labels)],
        data_attributes=[DataAttribute(labels, "targets"), TaskLabels([task_label] * len(labels))],
    )


def tokens_in_context(stream: Stream, t: int) -> int:
    """Prompt tokens in front of task t's input, as the stream's strategy trains and evaluates it."""
    spec = stream.tasks[t]
    if not spec.prompt.uses_prompt:
        return 0
    context = strategy_class(stream.strategy).context_tasks(stream, t)
    return spec.prompt.n_tokens + sum(s.prompt.n_tokens for s in stream.tasks if s.name in context)


def to_avalanche_benchmark(stream: Stream, backbone: Backbone, data: dict[str, TaskData], store: FeatureStore | None = None):
    """The stream as an Avalanche benchmark: train and test streams, one experience per task, task label = position.

    x indexes `store` (pass your own to build a model that reads it). Test examples are sorted by
    length, so evaluation batches pad little and are the ones `continual_rpt.evaluation.predict` makes.
    """
    store = FeatureStore() if store is None else store
    train, test = [], []
    for t, spec in enumerate(stream.tasks):
        d = data[spec.name]
        max_tokens = spec.train.max_length - tokens_in_context(stream, t)
        train.append(task_dataset(store, backbone.featurize(d.train, max_tokens), t))
        features = backbone.featurize(d.test, max_tokens)
        by_length = [i for batch in length_batches(features, EVAL_BATCH) for i in batch]
        test.append(task_dataset(store, [features[i] for i in by_length], t))
    return with_task_labels(benchmark_from_datasets(train=train, test=test))


class _Frozen:
    """What every copy of a model shares: the frozen backbone and the feature store."""

    def __init__(self, backbone: Backbone, store: FeatureStore) -> None:
        self.backbone, self.store = backbone, store

    def __deepcopy__(self, memo: dict) -> _Frozen:
        return self  # LwF deep-copies the model as its teacher; the backbone must not be copied with it


class TaskModel(MultiTaskModule):
    """Scores task t's examples through the frozen backbone with task t's prompt and head.

    Only the prompt and the heads are registered submodules, so `parameters()`, which Avalanche's
    optimizer, EWC and A-GEM use, holds nothing of the backbone.
    """

    def __init__(self, backbone: Backbone, store: FeatureStore, bf16: bool) -> None:
        super().__init__()
        self.frozen = _Frozen(backbone, store)
        self.heads = nn.ModuleDict()  # by str(task label); none on a seq2seq backbone
        self.min_widths: dict[int, int] = {}
        self.bf16 = bf16

    def add_task(self, task_label: int, task: Task, min_width: int = 0) -> None:
        """A fresh head for the task; its scores are padded to `min_width` outputs.

        LwF runs every earlier head on the new task's examples and indexes the outputs by that head's
        own labels, so a head must give that many outputs even on another task's examples.
        """
        head = self.frozen.backbone.new_head(task)
        if head is not None:
            self.heads[str(task_label)] = head
        self.min_widths[task_label] = min_width

    def prompt_for(self, task_label: int) -> Tensor | None:
        """The prompt [n, d] in front of the task's inputs."""
        raise NotImplementedError

    def head_of(self, task_label: int) -> nn.Module | None:
        """The task's head (None on a seq2seq backbone)."""
        key = str(task_label)
        return self.heads[key] if key in self.heads else None

    def adaptation(self, experience) -> None:
        """Remember which task labels were trained (LwF distils through their heads); heads are added by `add_task`."""
        if self.training:
            self.known_train_tasks_labels.update(experience.task_labels)

    def forward(self, x: Tensor, task_labels: Tensor | None) -> Tensor | dict[int, Tensor]:
        """Scores [B, C] of a batch that may mix tasks, PAD where an example has fewer outputs.

        Without task labels (LwF), every trained head's scores of the whole batch, by task label.
        """
        if task_labels is None:
            return self.forward_all_tasks(x)
        task_labels = task_labels.to(x.device)  # A-GEM hands its memory's task labels over on the CPU
        masks = {t: task_labels == t for t in task_labels.unique().tolist()}
        parts = [(mask, self.forward_single_task(x[mask], t)) for t, mask in masks.items()]
        out = torch.full((len(x), max(s.shape[1] for _, s in parts)), PAD, device=x.device)
        for mask, scores in parts:
            out[mask, : scores.shape[1]] = scores
        return out

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        """Scores of the examples x with the task's prompt and head."""
        backbone = self.frozen.backbone
        batch = backbone.collate(self.frozen.store.lookup(x))
        prompt = self.prompt_for(task_label)  # Φ runs in fp32 outside autocast, as in the project's own loop
        with autocast(backbone, self.bf16):
            scores = backbone.scores(prompt, self.head_of(task_label), batch)
        scores = scores.float().clamp(min=PAD)  # a missing choice scores -inf
        missing = self.min_widths.get(task_label, 0) - scores.shape[1]
        return F.pad(scores, (0, missing), value=PAD) if missing > 0 else scores


class SharedPromptModel(TaskModel):
    """What Avalanche trains: one prompt (P and Φ) for every task and one head per task."""

    def __init__(self, prompt: ResidualPrompt, backbone: Backbone, store: FeatureStore, bf16: bool) -> None:
        super().__init__(backbone, store, bf16)
        self.prompt = prompt

    def prompt_for(self, task_label: int) -> Tensor:
        """Φ(P), the same for every task."""
        return self.prompt()
