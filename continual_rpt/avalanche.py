"""Avalanche's strategies on the shared prompt (naive, ewc, lwf, replay, agem), and Avalanche's view of any run.

Avalanche (avalanche-lib) trains an `nn.Module` on minibatches `(x, y, t)`: input, label, task
label. Here that module holds only what trains, the shared P and Φ and one head per task; the
frozen backbone is referenced, never registered, so Avalanche's optimizer, EWC's importances,
A-GEM's gradient vectors and LwF's teacher copy are all prompt-sized. An input x is a LongTensor
of indices into a `FeatureStore` of pre-tokenised examples; the module looks them up, collates
them and scores them through the backbone. Every plugin that indexes `batch[0]`, stores patterns,
concatenates datasets or runs the model on `mb_x` therefore sees plain tensors, and no custom
collate is needed (Avalanche silently drops one on loaders without task labels).

Each task is one experience whose task label is its position in the stream; the label picks the
task's head. Each task trains with its own settings: AdamW over P and Φ (lr, weight decay) and
the heads (head_lr), its epochs, batch size, bf16 autocast and seed. Avalanche trains for a
fixed number of epochs, with no early stopping on dev. Prediction, the checkpoint and the bank
entries work as in the shared strategy. After each task the run also keeps `states/after-<task>`
(P′, every head, EWC's importances): `avalanche_metrics` re-evaluates those states, and --resume
rebuilds the strategy's memory from them.

Importing avalanche takes seconds (it pulls torchvision, wandb, tensorboard), so only
`strategies.make_strategy` imports this module, and only for these strategies.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from continual_rpt.backbones import Backbone, Features
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import autocast, average_score, forgetting, length_batches, predict
from continual_rpt.learner import TrainConfig
from continual_rpt.prompts import ResidualPrompt
from continual_rpt.run import BANK_DIR, STREAM_FILE
from continual_rpt.strategies import SharedStrategy
from continual_rpt.streams import Stream, TaskSpec, load_data, parse_stream
from continual_rpt.tasks import Task, TaskData

with warnings.catch_warnings():
    # qpsolvers warns at import that it has no solver; only GEM needs one, and nothing here uses GEM.
    warnings.filterwarnings("ignore", message="no QP solver found")
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels
    from avalanche.benchmarks.utils import DataAttribute, TaskAwareSupervisedClassificationDataset, TaskLabels
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.models import MultiTaskModule
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import AGEMPlugin, EvaluationPlugin, EWCPlugin, LwFPlugin, ReplayPlugin, SupervisedPlugin
    from avalanche.training.supervised import AGEM, EWC, LwF, Naive, Replay
    from avalanche.training.utils import ParamData

# Each strategy's class and options. The stream format has no keys for these yet, so they are fixed here
# and recorded in every bank entry's metrics.
AVALANCHE_STRATEGIES = {
    "naive": (Naive, {}),
    # Untuned. EWC's importances are squared gradients, and the prompt's are tiny: on the embedded MiniLM
    # (CB then RTE, 16 examples per class, 3 epochs) Σ F·Δθ² came to 1.2e-4 against a cross-entropy of 0.66,
    # so λ = 1000 makes the penalty about a fifth of the loss there, more as the prompt drifts further.
    "ewc": (EWC, {"ewc_lambda": 1000.0}),
    "lwf": (LwF, {"alpha": 1.0, "temperature": 2.0}),  # the LwF paper's and Avalanche's LwFPlugin defaults
    "replay": (Replay, {"mem_size": 200}),  # Avalanche's default, balanced over the tasks seen
    "agem": (AGEM, {"patterns_per_exp": 100, "sample_size": 64}),  # sample_size: Avalanche's default
}
PAD = -1e9  # score of an output an example does not have: finite, so softmax and KL-divergence stay finite
EVAL_BATCH = 64  # continual_rpt.evaluation.predict's batch size: the batches a run's scores came from
STATES_DIR = "states"
_NO_LOGGERS = "No loggers specified"  # Avalanche warns when nothing logs; the run has its own log


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
    if stream.strategy == "progressive":  # its own prompt, then every earlier task's
        return sum(s.prompt.n_tokens for s in stream.tasks[: t + 1])
    return spec.prompt.n_tokens


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
        key = str(task_label)
        prompt = self.prompt_for(task_label)  # Φ runs in fp32 outside autocast, as in the project's own loop
        with autocast(backbone, self.bf16):
            scores = backbone.scores(prompt, self.heads[key] if key in self.heads else None, batch)
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


class StoredModel(TaskModel):
    """A finished run's model at some point: each task's collapsed prompt and head as stored, all frozen.

    It scores in the precision the run's accuracy matrix was scored in (the tasks' `train.bf16`).
    """

    def __init__(self, backbone: Backbone, store: FeatureStore, tasks: list[Task], final: dict[int, tuple], bf16: bool) -> None:
        super().__init__(backbone, store, bf16)
        for t, task in enumerate(tasks):
            self.add_task(t, task)
        # Shapes come from the final state; a task's prompt keeps its shape along the run.
        self.prompts = nn.ParameterDict({str(t): nn.Parameter(p.clone()) for t, (p, _) in final.items() if p is not None})
        self.requires_grad_(False)

    def prompt_for(self, task_label: int) -> Tensor | None:
        """The task's collapsed prompt as stored, or None (head-only control)."""
        key = str(task_label)
        return self.prompts[key] if key in self.prompts else None

    @torch.no_grad()
    def load(self, state: dict[int, tuple]) -> None:
        """Take `state`: {task label: (collapsed prompt or None, head weights or None)}."""
        for t, (prompt, head) in state.items():
            if prompt is not None:
                self.prompts[str(t)].copy_(prompt)
            if head is not None:
                self.heads[str(t)].load_state_dict(head)


class _SeedMemory(SupervisedPlugin):
    """Reseeds right before the strategy updates its memory, so that --resume rebuilds the same memory."""

    def __init__(self, seeds: list[int]) -> None:
        super().__init__()
        self.seeds = seeds

    def after_training_exp(self, strategy, **kwargs) -> None:
        """Runs before the strategy's own plugin (it comes first in the plugin list)."""
        RNGManager.set_random_seeds(self.seeds[strategy.experience.current_experience])


class _LossHistory(SupervisedPlugin):
    """Mean training loss of each epoch of the current experience, penalties (EWC, LwF) included."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[float] = []
        self._sum, self._count = 0.0, 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.epochs = []

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self._sum, self._count = 0.0, 0

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._sum += strategy.loss.item()
        self._count += 1

    def after_training_epoch(self, strategy, **kwargs) -> None:
        self.epochs.append(self._sum / self._count)


def _replace_file(tensors: dict[str, Tensor], path: Path) -> None:
    """Write a safetensors file atomically: a reader sees the old file or the complete new one."""
    tmp = path.parent / f".{path.name}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _param_data(tensors: dict[str, Tensor]) -> dict[str, ParamData]:
    return {k: ParamData(k, init_tensor=v, device=v.device) for k, v in tensors.items()}


class AvalancheStrategy(SharedStrategy):
    """The shared prompt trained task after task by one of Avalanche's strategies, a head per task."""

    CHECKPOINT = "avalanche.safetensors"

    def __init__(self, stream: Stream, backbone: Backbone, bank: PromptBank, out: Path) -> None:
        super().__init__(stream, backbone, bank, out)  # P and Φ; on --resume, the heads and metrics learned so far
        cls, self.options = AVALANCHE_STRATEGIES[stream.strategy]
        self.store = FeatureStore()
        self.datasets: list[TaskAwareSupervisedClassificationDataset] = []  # training data of each task added so far
        self.model = SharedPromptModel(self.prompt, backbone, self.store, stream.tasks[0].train.bf16)
        self.losses = _LossHistory()
        first = stream.tasks[0].train
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_LOGGERS)
            self.avalanche = cls(
                model=self.model, optimizer=self._optimizer(first), criterion=nn.CrossEntropyLoss(),
                train_mb_size=first.batch_size, train_epochs=first.epochs, eval_mb_size=first.eval_batch_size,
                device=backbone.device, plugins=[_SeedMemory([t.train.seed for t in stream.tasks]), self.losses],
                evaluator=EvaluationPlugin(), **self.options,
            )

    def _optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        """A fresh AdamW for one task: P and Φ at lr with weight decay, every head at head_lr without."""
        groups = [{"params": list(self.prompt.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        head_params = [p for head in self.model.heads.values() for p in head.parameters()]
        if head_params:
            groups.append({"params": head_params, "lr": cfg.head_lr, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, eps=1e-8)

    def _add_task(self, t: int, spec: TaskSpec, data: TaskData):
        """Task t's training experience, its features in the store and its fresh head in the model."""
        if not data.train or not data.dev:
            raise ValueError(f"{data.task.name}: train and dev splits must both be non-empty")
        self.model.add_task(t, data.task, max(len(ex.candidates) for ex in data.train))
        features = self.backbone.featurize(data.train, spec.train.max_length - tokens_in_context(self.stream, t))
        self.datasets.append(task_dataset(self.store, features, t))
        return with_task_labels(benchmark_from_datasets(train=self.datasets)).train_stream[t]

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Train the shared prompt and the heads on task i with the Avalanche strategy, for spec.train.epochs epochs."""
        for t in range(len(self.datasets), i):  # tasks learned before a --resume
            self._restore_task(t, data[self.stream.tasks[t].name])
        if spec.name in self.heads:
            return True
        mine = data[spec.name]
        RNGManager.set_random_seeds(spec.train.seed)  # the head starts as train_task's would; then the data order
        experience = self._add_task(i, spec, mine)
        self.avalanche.optimizer = self._optimizer(spec.train)
        self.avalanche.train_mb_size, self.avalanche.train_epochs = spec.train.batch_size, spec.train.epochs
        self.model.bf16 = spec.train.bf16
        start = time.perf_counter()
        self.avalanche.train(experience, eval_streams=[])
        wall = time.perf_counter() - start
        # Every head so far, not only this task's: replay, A-GEM and LwF move the earlier ones too.
        self.heads = {s.name: self._head_state(t) for t, s in enumerate(self.stream.tasks[: i + 1])}
        self.metrics[spec.name] = self._task_metrics(i, spec, mine, wall)
        self._save_state(i)  # before the checkpoint, so that every task the checkpoint lists has its state
        self._checkpoint()
        return True

    def _head_state(self, t: int) -> dict[str, Tensor] | None:
        key = str(t)
        if key not in self.model.heads:
            return None
        return {k: v.detach().clone() for k, v in self.model.heads[key].state_dict().items()}

    def _task_metrics(self, i: int, spec: TaskSpec, data: TaskData, wall: float) -> dict:
        """What a bank entry reports, with dev and test scored once, after training (no early stopping)."""
        collapsed, head = self.prompt.collapse(), self._head(spec.name, data.task)

        def score(examples):
            cfg = spec.train
            return data.task.score(examples, predict(self.backbone, collapsed, head, examples, cfg.max_length, cfg.eval_batch_size, cfg.bf16))

        test = score(data.test) if data.test else {}
        n_head = sum(p.numel() for p in head.parameters()) if head is not None else 0
        return {
            "task": data.task.name,
            "method": spec.prompt.method,
            "strategy": self.stream.strategy,
            "strategy_options": self.options,
            "early_stopping": False,
            "dev_score": score(data.dev)["score"],
            "test": test,
            "test_score": test.get("score", math.nan),
            "epochs": spec.train.epochs,
            "steps": self.avalanche.clock.train_exp_iterations,
            "prompt_tokens": spec.prompt.n_tokens,
            "prompt_tokens_in_context": spec.prompt.n_tokens,
            # Avalanche's optimizer holds the prompt and every head so far; the entry stores P′ and this head.
            "trainable_parameters": sum(p.numel() for p in self.model.parameters()),
            "stored_parameters": self.prompt.stored_parameters() + n_head,
            "train_examples": len(data.train),
            "wall_seconds": wall,
            # The task's own examples per second of the strategy's training, its memory and penalties included.
            "train_examples_per_second": spec.train.epochs * len(data.train) / wall,
            "history": [{"epoch": e + 1, "train_loss": loss} for e, loss in enumerate(self.losses.epochs)],
        }

    def _state_path(self, name: str) -> Path:
        return self.out / STATES_DIR / f"after-{name}.safetensors"

    def _save_state(self, i: int) -> None:
        """P′ and every head after task i (what predict used for row i), and EWC's memory of task i."""
        tensors = {"prompt": self.prompt.collapse()}
        for name, head in self.heads.items():
            tensors.update({f"head.{name}.{k}": v for k, v in (head or {}).items()})
        for plugin in self.avalanche.plugins:
            if isinstance(plugin, EWCPlugin):
                tensors.update({f"ewc.params.{k}": p.data for k, p in plugin.saved_params[i].items()})
                tensors.update({f"ewc.importances.{k}": p.data for k, p in plugin.importances[i].items()})
        self._state_path(self.stream.tasks[i].name).parent.mkdir(exist_ok=True)
        _replace_file(tensors, self._state_path(self.stream.tasks[i].name))

    def _restore_task(self, t: int, data: TaskData) -> None:
        """Re-add a task learned before a --resume: its features and head, and the strategy's memory of it.

        The memory is rebuilt as it was right after the task: EWC's importances from the task's state
        file; replay's and A-GEM's samples drawn again under the same seed; LwF's teacher copied from
        the restored model (the state after the last task learned).
        """
        spec = self.stream.tasks[t]
        experience = self._add_task(t, spec, data)
        if self.heads[spec.name] is not None:
            self.model.heads[str(t)].load_state_dict(self.heads[spec.name])
        self.model.known_train_tasks_labels.add(t)
        self.avalanche.clock.train_exp_counter = t + 1  # EWC keys its memory by the experience counter
        state = load_file(self._state_path(spec.name), device=str(self.backbone.device))
        RNGManager.set_random_seeds(spec.train.seed)
        for plugin in self.avalanche.plugins:
            if isinstance(plugin, EWCPlugin):
                plugin.saved_params[t] = _param_data(_prefixed(state, "ewc.params."))
                plugin.importances[t] = _param_data(_prefixed(state, "ewc.importances."))
            elif isinstance(plugin, ReplayPlugin):
                plugin.storage_policy.post_adapt(self.avalanche, experience)
            elif isinstance(plugin, AGEMPlugin):
                plugin.update_memory(experience.dataset)
            elif isinstance(plugin, LwFPlugin):
                plugin.lwf.post_adapt(self.avalanche, experience)


class _RunState(SupervisedPlugin):
    """Stands in for training: after experience i the model holds the run's stored state after task i."""

    def __init__(self, states: list[dict[int, tuple]]) -> None:
        super().__init__()
        self.states = states

    def after_training_exp(self, strategy, **kwargs) -> None:
        strategy.model.load(self.states[strategy.experience.current_experience])


def load_run_stream(run_dir: Path, base_dir: Path | None = None) -> Stream:
    """The stream a run folder was made with (its stream.json); relative custom-data paths resolve against `base_dir`."""
    path = run_dir / STREAM_FILE
    doc = json.loads(path.read_text())
    # stream.json lists both `task` and `custom` for every task; a stream file gives one of them.
    tasks = [{k: v for k, v in t.items() if k != ("task" if t["custom"] else "custom")} for t in doc["tasks"]]
    stream = parse_stream({**doc, "tasks": tasks}, str(path), Path(base_dir) if base_dir else Path.cwd())
    if json.loads(json.dumps(stream.resolved())) != doc:  # as JSON: tuples of custom tasks come back as lists
        raise ValueError(f"{path}: does not parse back to the same stream")
    return stream


def _run_states(stream: Stream, run_dir: Path, backbone: Backbone) -> list[dict[int, tuple]]:
    """The run's model after each task i: {task label t ≤ i: (collapsed prompt, head weights)}."""
    names = [spec.name for spec in stream.tasks]
    if stream.strategy in ("bank", "progressive"):  # an entry never changes once stored
        bank = PromptBank.open(run_dir / BANK_DIR)
        answers = []
        for name in names:
            _, prompt, head, _ = bank.load_for(name, backbone)
            answers.append((prompt, head.state_dict() if head is not None else None))
        return [dict(enumerate(answers[: i + 1])) for i in range(len(names))]
    if stream.strategy in AVALANCHE_STRATEGIES:
        states = []
        for i, name in enumerate(names):
            tensors = load_file(run_dir / STATES_DIR / f"after-{name}.safetensors")
            states.append({t: (tensors["prompt"], _prefixed(tensors, f"head.{other}.") or None) for t, other in enumerate(names[: i + 1])})
        return states
    raise ValueError(f"{run_dir}: strategy {stream.strategy!r} keeps no state after each task, so its accuracy matrix "
                     f"cannot be evaluated again (bank, progressive, {', '.join(AVALANCHE_STRATEGIES)} can)")


def avalanche_metrics(run_dir: str | Path, base_dir: str | Path | None = None) -> dict:
    """A finished run's accuracy matrix, average accuracy, forgetting and BWT from Avalanche's evaluation loop.

    Avalanche's loop runs over the stream as in training, except that "training" on experience i
    restores the run's stored state after task i (bank entries for bank and progressive runs; the
    states folder for Avalanche strategies); Avalanche then evaluates every test experience seen so
    far with its accuracy, forgetting and BWT metrics. Figures are percent, like the run's.

    - `accuracy_matrix`, `average_accuracy`: Top1_Acc_Exp after each task, and the final row's mean.
      They equal the run's matrix and average_score where a task's score is accuracy (not CB,
      MultiRC, ReCoRD), since both score the same predictions.
    - `pooled_accuracy`: Avalanche's Top1_Acc_Stream of the final evaluation, all test examples pooled, so
      tasks weigh by their test size (Avalanche names it after the last experience's task label).
    - `backward_transfer`: Avalanche's StreamBWT, mean over j < T of R[T][j] − R[j][j], the run's definition.
    - `avalanche_forgetting`: Avalanche's StreamForgetting, R[j][j] − R[T][j] averaged the same way, which is
      −BWT; the run's `forgetting` (Chaudhry et al.) subtracts from the best earlier score instead, and
      `forgetting` here is that definition applied to Avalanche's accuracy matrix.
    - `avalanche`: Avalanche's final metric values under its own names (fractions).
    `base_dir`: the folder that the stream's relative custom-data paths resolve against.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise ValueError(f"{run_dir}: not a finished run (no metrics.json)")
    stream = load_run_stream(run_dir, base_dir)
    backbone = stream.backbone.load()
    data = {spec.name: load_data(spec, stream.base_dir) for spec in stream.tasks}
    states = _run_states(stream, run_dir, backbone)
    store = FeatureStore()
    benchmark = to_avalanche_benchmark(stream, backbone, data, store)
    precisions = {spec.train.bf16 for spec in stream.tasks}
    if len(precisions) > 1:
        raise ValueError(f"{run_dir}: tasks were scored in different precisions (train.bf16); one evaluation loop cannot match them")
    model = StoredModel(backbone, store, [data[spec.name].task for spec in stream.tasks], states[-1], precisions.pop())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_LOGGERS)
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True),
                                     bwt_metrics(experience=True, stream=True))
    # Avalanche's template needs an optimizer; with no training epochs it never steps.
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
                     train_epochs=0, eval_mb_size=EVAL_BATCH, device=backbone.device, evaluator=evaluator, plugins=[_RunState(states)])
    T = len(stream.tasks)
    R = []
    for i, experience in enumerate(benchmark.train_stream):
        strategy.train(experience, eval_streams=[])
        evaluator.reset_last_metrics()  # so that `last` holds this evaluation's values only
        last = strategy.eval(benchmark.test_stream[: i + 1])
        R.append([100 * last[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"] for j in range(i + 1)] + [None] * (T - 1 - i))
    return {
        "accuracy_matrix": R,
        "average_accuracy": average_score(R),
        "pooled_accuracy": 100 * next(v for k, v in last.items() if k.startswith("Top1_Acc_Stream/")),
        "forgetting": forgetting(R),
        "backward_transfer": 100 * last["StreamBWT/eval_phase/test_stream"] if T > 1 else None,
        "avalanche_forgetting": 100 * last["StreamForgetting/eval_phase/test_stream"] if T > 1 else None,
        "avalanche": dict(last),
    }
