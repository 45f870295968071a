"""Data parallel training under `accelerate launch`, through Accelerate's process state and collectives.

Every process builds the same batches (same seed) and computes the mean gradient of its share of
each batch; the shares are scaled by n_local / n_batch and summed with Accelerate's `reduce`, which
is exactly the full-batch mean gradient. (DDP's averaging over processes equals it only when the
shares are equal: a batch of 9 on 2 processes is 5 + 4.) So N processes give the result of one
process up to the order of float sums. Only P, Φ and the head are reduced: they are all that trains.

`crpt train` runs the same command on every process. `crpt run` runs the stream on the main process
alone (strategy, evaluation, every write); it announces each `training` as a `Job`, which the other
processes repeat (`jobs`), so that every task trains data-parallel, and they wait otherwise.
Run alone (no WORLD_SIZE > 1), every function is a no-op or a local computation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import Tensor, nn

from continual_rpt.backbones import Backbone, Features
from continual_rpt.evaluation import predict_features

# How long a collective waits for the other processes. In `crpt run` they wait in one while the main
# process alone evaluates, fits controls or routes (hours on a large stream); when a process dies, the
# launcher ends the others, so this bounds only a true deadlock.
WAIT = timedelta(days=2)


def setup(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); starts the process group through Accelerate when launched with several processes.

    `device`, on the first call: where the processes compute (default: CUDA if there is one), so a
    CPU run uses gloo and the CPU even beside GPUs. On CUDA each process gets its own GPU, so call
    this before loading the backbone.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=WAIT)  # reads the launcher's environment; only the first call's arguments count
    return state.process_index, state.num_processes


def share(ids: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a batch: every world-th example from position rank."""
    return ids[rank::world]


def alone() -> bool:
    """Whether this process computes alone: launched alone, or the main process of a led `crpt run` outside a training."""
    return setup()[1] == 1 or bool(_leading) and not _leading[-1].training


def reduce_gradients(modules: list[nn.Module], n_local: int, n_batch: int) -> None:
    """Turn each process's mean gradient over its share into the full-batch mean gradient, everywhere."""
    if alone():
        return
    from accelerate.utils import reduce

    params = [p for module in modules for p in module.parameters()]
    # A process with no share of a short last batch contributes zeros.
    weighted = [(p.grad if p.grad is not None else torch.zeros_like(p)) * (n_local / n_batch) for p in params]
    for p, summed in zip(params, reduce(weighted, reduction="sum")):
        p.grad = summed


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every process (so every process skips the same steps)."""
    if alone():
        return flag
    from accelerate import PartialState
    from accelerate.utils import reduce

    return reduce(torch.tensor(float(not flag), device=PartialState().device), reduction="sum").item() == 0


def gather(local: dict[int, int]) -> dict[int, int]:
    """Union of every process's {example index: prediction}."""
    if alone():
        return local
    from accelerate.utils import gather_object

    return dict(gather_object(list(local.items())))  # gather_object concatenates the processes' lists


def predict_split(backbone: Backbone, prompt: Tensor | None, head: nn.Module | None, features: list[Features],
                  batch_size: int, bf16: bool) -> list[int]:
    """Predictions of every example, each process predicting its share (all of them when computing alone)."""
    rank, world = (0, 1) if alone() else setup()
    mine = share(list(range(len(features))), rank, world)
    merged = gather(dict(zip(mine, predict_features(backbone, prompt, head, [features[i] for i in mine], batch_size, bf16))))
    return [merged[i] for i in range(len(features))]


@dataclass
class Job:
    """A training the main process of a multi-process `crpt run` starts, as the other processes repeat it."""

    tasks: list[str]  # names of the run's loaded tasks (each process loads them itself)
    prompt_cfg: object  # PromptConfig
    cfg: object  # TrainConfig, decided for the backbone
    prompt: dict[str, Tensor] | None  # the state of a prompt the training continues (a shared prompt), on the cpu
    context: Tensor | None  # frozen prompts after the trained one (Progressive Prompts), on the cpu


class _Lead:
    """The main process of a led run: the run's loaded data by name, and whether the others are training with it now."""

    def __init__(self, data: dict) -> None:
        self.data, self.training = data, False


_leading: list[_Lead] = []  # set by `leading`, read by `training` and `alone`


@contextmanager
def leading(data: dict):
    """On the main process of a multi-process run: `training` reaches the others while open; closed, they are released.

    Outside a training the main process computes alone (evaluations, controls, the linear probe).
    After an error nothing is sent: the main process exits with it and the launcher ends the others.
    """
    if setup()[1] == 1:
        yield
        return
    from accelerate.utils import broadcast_object_list

    _leading.append(_Lead(data))
    try:
        yield
    finally:
        _leading.pop()
    broadcast_object_list([None])


@contextmanager
def training(datas: list, prompt_cfg: object, cfg: object, prompt: nn.Module | None, context: Tensor | None):
    """A training every process takes part in: on the main process of a led run, announced to the others first."""
    if not _leading:  # alone, a process that follows, or crpt train (every process runs the command)
        yield
        return
    from accelerate.utils import broadcast_object_list

    lead = _leading[-1]
    names = [next((name for name, known in lead.data.items() if known is data), None) for data in datas]
    if None in names:  # the others can only repeat a training on data they loaded themselves
        raise ValueError(f"{', '.join(d.task.name for d in datas)}: a multi-process run trains only the stream's own loaded tasks")
    state = None if prompt is None else {k: v.detach().cpu() for k, v in prompt.state_dict().items()}
    broadcast_object_list([Job(names, prompt_cfg, cfg, state, None if context is None else context.detach().cpu())])
    lead.training = True
    try:
        yield
    finally:
        lead.training = False


def jobs() -> Iterator[Job]:
    """On the other processes of a led run: each training the main process announces, until it releases them."""
    from accelerate.utils import broadcast_object_list

    while (job := broadcast_object_list([None])[0]) is not None:
        yield job
