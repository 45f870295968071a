"""Cross-check for tests: a finished run's accuracy matrix, average, forgetting and BWT recomputed by Avalanche.

Avalanche's loop runs over the stream as in training, except that "training" on experience i
restores the run's stored state after task i (bank entries for bank and progressive runs; the
states folder for Avalanche strategies); Avalanche then evaluates every test experience seen so
far, and every figure returned is one of Avalanche's metrics (or Avalanche's `Mean` of them), never
one of the project's own functions, so the test comparing them with a run's `metrics.json` checks
the project's arithmetic against an independent implementation.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from avalanche.evaluation.metrics import Mean, accuracy_matrix_metrics, accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.supervised import Naive
from safetensors.torch import load_file
from torch import Tensor, nn

from continual_rpt.backbones import Backbone
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import load_answerer
from continual_rpt.run import BANK_DIR, STREAM_FILE
from continual_rpt.strategies import REGISTRY
from continual_rpt.strategies.avalanche import STATES_DIR
from continual_rpt.strategies.avalanche_model import EVAL_BATCH, FeatureStore, TaskModel, to_avalanche_benchmark
from continual_rpt.streams import Stream, load_data, parse_stream
from continual_rpt.tasks import Task

AVALANCHE_STRATEGIES = [name for name, r in REGISTRY.items() if r.extra == "avalanche"]
_NO_LOGGERS = "No loggers specified"


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


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
            _, prompt, head, _ = load_answerer(bank, name, backbone)
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
    """A finished run's CL metrics as Avalanche's metrics compute them, in percent like the run's.

    R[i][j] is the test score of task j after learning task i, counted from 0, and T is the last task's
    index; how each figure maps to the run's `metrics.json`:
    - `accuracy_matrix`: Avalanche's Top1_Acc_Exp of experience j in the evaluation after experience i;
      the run's R where a task's score is accuracy (not CB, MultiRC, ReCoRD): both score the same predictions.
    - `avalanche_matrix`: Avalanche's AccuracyMatrixPluginMetric after the last experience, the same
      matrix counted a second way by Avalanche (0 above the diagonal, where nothing was evaluated).
    - `average_accuracy`: Avalanche's `Mean` of the final Top1_Acc_Exp values: the run's `average_score`.
    - `pooled_accuracy`: Top1_Acc_Stream of the final evaluation, all test examples pooled, so tasks
      weigh by their test size (Avalanche names it after the last experience's task label); no run figure.
    - `backward_transfer`: StreamBWT, mean over j < T of R[T][j] − R[j][j]: the run's `backward_transfer`.
    - `forgetting`: StreamForgetting, mean over j < T of R[j][j] − R[T][j] (the score right after learning
      j minus the final one), which is −BWT. The run's `forgetting` is Chaudhry et al.'s: the best score
      R[l][j] (j ≤ l < T) minus the final one; the two agree where no task's score rose after it was
      learned, and otherwise the run's is larger by the mean of those rises.
    - `experience_forgetting`: ExperienceForgetting of each j < T, R[j][j] − R[T][j].
    - `avalanche`: Avalanche's final metric values under its own names (fractions).
    `base_dir`: the folder that the stream's relative custom-data paths resolve against.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise ValueError(f"{run_dir}: not a finished run (no metrics.json)")
    stream = load_run_stream(run_dir, base_dir)
    backbone = stream.backbone.load()
    stream = stream.on(backbone)  # stream.json says bf16 as asked; unset, the device decided it as the run did
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
                                     bwt_metrics(experience=True, stream=True), accuracy_matrix_metrics())
    # Avalanche's template needs an optimizer; with no training epochs it never steps.
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
                     train_epochs=0, eval_mb_size=EVAL_BATCH, device=backbone.device, evaluator=evaluator, plugins=[_RunState(states)])
    n_tasks = len(stream.tasks)
    R = []
    for i, experience in enumerate(benchmark.train_stream):
        strategy.train(experience, eval_streams=[])
        evaluator.reset_last_metrics()  # so that `last` holds this evaluation's values only
        last = strategy.eval(benchmark.test_stream[: i + 1])
        R.append([100 * last[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"] for j in range(i + 1)] + [None] * (n_tasks - 1 - i))
    average = Mean()
    for accuracy in R[-1]:
        average.update(accuracy, weight=1)
    stream_metric = {name: 100 * last[f"{name}/eval_phase/test_stream"] if n_tasks > 1 else None for name in ("StreamBWT", "StreamForgetting")}
    return {
        "accuracy_matrix": R,
        "avalanche_matrix": (100 * last["EvalStream/Acc_Matrix"]).tolist(),
        "average_accuracy": average.result(),
        "pooled_accuracy": 100 * next(v for k, v in last.items() if k.startswith("Top1_Acc_Stream/")),
        "backward_transfer": stream_metric["StreamBWT"],
        "forgetting": stream_metric["StreamForgetting"],
        "experience_forgetting": [100 * last[f"ExperienceForgetting/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"] for j in range(n_tasks - 1)],
        "avalanche": dict(last),
    }
