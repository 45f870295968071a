"""Avalanche's strategies on the shared prompt: naive, ewc, lwf, replay, agem.

Avalanche (avalanche-lib) trains an `nn.Module` on minibatches `(x, y, t)`: input, label, task
label. Here that module holds only what trains, the shared P and Φ and one head per task; the
frozen backbone is referenced, never registered, so Avalanche's optimizer, EWC's importances,
A-GEM's gradient vectors and LwF's teacher copy are all prompt-sized. An input x is a LongTensor
of indices into a `FeatureStore` of pre-tokenised examples; the module looks them up, collates
them and scores them through the backbone. Every plugin that indexes `batch[0]`, stores patterns,
concatenates datasets or runs the model on `mb_x` therefore sees plain tensors, and no custom
collate is needed (Avalanche silently drops one on loaders without task labels).

Each task is one experience whose task label is its position in the stream; the label picks the
task's head. Each task trains with its own settings (the learner's AdamW groups, epochs, batch
size, bf16 autocast, seed) and, like the bank methods, is early-stopped on its dev half: after
each epoch the learner's dev evaluation scores the shared prompt and the task's head, and the best
state (prompt and every head) is put back at the end. The baselines' own settings are the stream's
`baseline:` section (`streams.BaselineConfig`). Training losses come from Avalanche's
`loss_metrics`. After each task the run keeps `states/after-<task>` (P′, every head, EWC's
importances), from which --resume rebuilds the strategy's memory.

Importing avalanche takes seconds (it pulls torchvision, wandb, tensorboard), so the strategy
registry imports this module only when a run uses one of these strategies.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from continual_rpt.atomic import replace_safetensors
from continual_rpt.backbones import Backbone
from continual_rpt.bank import PromptBank
from continual_rpt.learner import BestState, dev_scores, make_optimizer
from continual_rpt.strategies.avalanche_model import FeatureStore, SharedPromptModel, task_dataset, tokens_in_context
from continual_rpt.strategies.shared import OnePromptStrategy
from continual_rpt.streams import BaselineConfig, Stream, TaskSpec
from continual_rpt.tasks import TaskData

with warnings.catch_warnings():
    # qpsolvers warns at import that it has no solver; only GEM needs one, and nothing here uses GEM.
    warnings.filterwarnings("ignore", message="no QP solver found")
    from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels
    from avalanche.benchmarks.utils import TaskAwareSupervisedClassificationDataset
    from avalanche.evaluation.metrics import loss_metrics
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import AGEMPlugin, EvaluationPlugin, EWCPlugin, LwFPlugin, ReplayPlugin, SupervisedPlugin
    from avalanche.training.supervised import AGEM, EWC, LwF, Naive, Replay
    from avalanche.training.utils import ParamData


def strategy_options(name: str, baseline: BaselineConfig) -> tuple[type, dict]:
    """Avalanche's class for strategy `name` and its options from the stream's baseline settings."""
    return {
        "naive": (Naive, {}),
        "ewc": (EWC, {"ewc_lambda": baseline.ewc_lambda}),
        "lwf": (LwF, {"alpha": baseline.lwf_alpha, "temperature": baseline.lwf_temperature}),
        "replay": (Replay, {"mem_size": baseline.replay_mem_size}),
        "agem": (AGEM, {"patterns_per_exp": baseline.agem_patterns_per_exp, "sample_size": baseline.agem_sample_size}),
    }[name]


STATES_DIR = "states"
_NO_LOGGERS = "No loggers specified"  # Avalanche warns when nothing logs; the run has its own log


class _SeedMemory(SupervisedPlugin):
    """Reseeds right before the strategy updates its memory, so that --resume rebuilds the same memory."""

    def __init__(self, seeds: list[int]) -> None:
        super().__init__()
        self.seeds = seeds

    def after_training_exp(self, strategy, **kwargs) -> None:
        """Runs before the strategy's own plugin (it comes first in the plugin list)."""
        RNGManager.set_random_seeds(self.seeds[strategy.experience.current_experience])


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _param_data(tensors: dict[str, Tensor]) -> dict[str, ParamData]:
    return {k: ParamData(k, init_tensor=v, device=v.device) for k, v in tensors.items()}


class _DevEarlyStopping(SupervisedPlugin):
    """The bank methods' early stopping: the learner's dev evaluation after each epoch, the best state put back at the end.

    It comes first in the plugin list, so the best state is back before the strategy's own plugin
    builds its memory of the task (EWC's importances, LwF's teacher) at the end of the experience.
    """

    def __init__(self, owner: AvalancheStrategy) -> None:
        super().__init__()
        self.owner = owner
        self.best: BestState | None = None
        self.dev_history: list[float | None] = []

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.best, self.dev_history = BestState(self.owner.spec.train.patience), []

    def after_training_epoch(self, strategy, **kwargs) -> None:
        o = self.owner
        heads = list(o.model.heads.values())
        collapsed = o.prompt.collapse()
        scores = dev_scores(o.backbone, [o.data], [o.model.head_of(o.task_label)], collapsed, [o.dev], o.spec.train)
        score = self.best.offer(scores, strategy.clock.train_exp_iterations, collapsed, o.prompt, heads)
        self.dev_history.append(score if math.isfinite(score) else None)
        if self.best.stop:
            strategy.stop_training()

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.best.step:
            self.best.restore(self.owner.prompt, list(self.owner.model.heads.values()))


class AvalancheStrategy(OnePromptStrategy):
    """The shared prompt trained task after task by one of Avalanche's strategies, a head per task."""

    CHECKPOINT = "avalanche.safetensors"
    answers_fixed = False  # EWC, LwF, replay, A-GEM: every task moves the shared prompt, so earlier answers change

    def __init__(self, stream: Stream, backbone: Backbone, bank: PromptBank, out: Path) -> None:
        super().__init__(stream, backbone, bank, out)  # P and Φ; on --resume, the heads and metrics learned so far
        cls, self.options = strategy_options(stream.strategy, stream.baseline)
        self.store = FeatureStore()
        self.datasets: list[TaskAwareSupervisedClassificationDataset] = []  # training data of each task added so far
        self.model = SharedPromptModel(self.prompt, backbone, self.store, stream.tasks[0].train.bf16)
        self.early_stopping = _DevEarlyStopping(self)
        first = stream.tasks[0].train
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_LOGGERS)
            self.evaluator = EvaluationPlugin(loss_metrics(epoch=True))
            self.avalanche = cls(
                model=self.model, optimizer=make_optimizer(self.prompt, [], first), criterion=nn.CrossEntropyLoss(),
                train_mb_size=first.batch_size, train_epochs=first.epochs, eval_mb_size=first.eval_batch_size,
                device=backbone.device, plugins=[self.early_stopping, _SeedMemory([t.train.seed for t in stream.tasks])],
                evaluator=self.evaluator, **self.options,
            )

    def _add_task(self, t: int, spec: TaskSpec, data: TaskData):
        """Task t's training experience, its features in the store and its fresh head in the model."""
        if not data.train or not data.dev:
            raise ValueError(f"{data.task.name}: train and dev splits must both be non-empty")
        self.model.add_task(t, data.task, max(len(ex.candidates) for ex in data.train))
        features = self.backbone.featurize(data.train, spec.train.max_length - tokens_in_context(self.stream, t))
        self.datasets.append(task_dataset(self.store, features, t))
        return with_task_labels(benchmark_from_datasets(train=self.datasets)).train_stream[t]

    def learn(self, i: int, spec: TaskSpec, data: dict[str, TaskData], progress: bool) -> bool:
        """Train the shared prompt and the heads on task i with the Avalanche strategy, early-stopped on task i's dev half."""
        for t in range(len(self.datasets), i):  # tasks learned before a --resume
            self._restore_task(t, data[self.stream.tasks[t].name])
        if spec.name in self.heads:
            return True
        mine = data[spec.name]
        RNGManager.set_random_seeds(spec.train.seed)  # the head starts as train_task's would; then the data order
        experience = self._add_task(i, spec, mine)
        # What the early-stopping plugin evaluates: this task's dev half, featurized once.
        self.spec, self.data, self.task_label = spec, mine, i
        self.dev = self.backbone.featurize(mine.dev, spec.train.max_length - tokens_in_context(self.stream, i))
        self.avalanche.optimizer = make_optimizer(self.prompt, list(self.model.heads.values()), spec.train)
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
        """What a bank entry reports: the best dev evaluation and the epochs' losses (the run scores the test split)."""
        head = self._head(spec.name, data.task)
        n_head = sum(p.numel() for p in head.parameters()) if head is not None else 0
        _, losses = self.evaluator.get_all_metrics().get(f"Loss_Epoch/train_phase/train_stream/Task{i:03d}", ([], []))
        best, epochs = self.early_stopping.best, len(self.early_stopping.dev_history)
        return {
            "task": data.task.name,
            "method": spec.prompt.method,
            "strategy": self.stream.strategy,
            "strategy_options": self.options,
            "early_stopping": True,
            "dev_score": best.scores[0] if best.step else math.nan,
            "epochs": epochs,
            "best_step": best.step,
            "steps": self.avalanche.clock.train_exp_iterations,
            "prompt_tokens": spec.prompt.n_tokens,
            "prompt_tokens_in_context": spec.prompt.n_tokens,
            # Avalanche's optimizer holds the prompt and every head so far; the entry stores P′ and this head.
            "trainable_parameters": sum(p.numel() for p in self.model.parameters()),
            "stored_parameters": self.prompt.stored_parameters() + n_head,
            "train_examples": len(data.train),
            "wall_seconds": wall,
            # The task's own examples per second of the strategy's training, its memory and penalties included.
            "train_examples_per_second": epochs * len(data.train) / wall,
            "history": [{"epoch": e + 1, "train_loss": loss, "dev_score": dev}
                        for e, (loss, dev) in enumerate(zip(losses[-epochs:] if epochs else [], self.early_stopping.dev_history))],
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
        replace_safetensors(self._state_path(self.stream.tasks[i].name), tensors)

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
