"""Train P and Φ (and an encoder's per-task heads) on a frozen backbone, early-stopped on dev.

`train_task` trains one task; its result is what a bank stores: the collapsed prompt P′ = Φ(P) of
the best dev evaluation, the head at that point, and the training metrics. Φ itself is thrown away.
The learner never reads the test split: whoever stores the result measures it (strategies.base.measure_test).
`train_joint` trains one prompt on several tasks at once (the multitask upper bound). Both run
the same loop: length-bucketed batches (one task per batch), bf16 autocast, AdamW, a dev
evaluation per epoch (or every `eval_every` steps), non-finite steps dropped, best state kept.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Annotated

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from continual_rpt import distributed, tracking
from continual_rpt.backbones import Backbone, Features
from continual_rpt.config_fields import Count, Range, check_ranges, setting
from continual_rpt.early_stopping import BestState
from continual_rpt.evaluation import NonFiniteScores, autocast, length_batches
from continual_rpt.faults import kill_point
from continual_rpt.prompts import PromptConfig, ResidualPrompt, initial_prompt
from continual_rpt.tasks import TaskData


DECAYS = ("none", "linear")
ZERO_OR_MORE = Range(low=0, words="0 or more")
# Past ~1e30 AdamW's own fp32 arithmetic overflows before any loss can be checked.
LEARNING_RATE = Range(low=0, low_open=True, high=1e30, words="a finite number in (0, 1e30]")
RATE_OR_0 = Range(low=0, high=1e30, words="a finite number in [0, 1e30]")
log = logging.getLogger(__name__)  # a run folder's log.txt listens here (run._learn)


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings for one task."""

    epochs: Count = setting(10, "passes over the training split at most")
    batch_size: Count = setting(16, "training examples per step")
    lr: Annotated[float, LEARNING_RATE] = setting(0.3, "learning rate of P (and of Φ unless phi_lr is set; the paper's 0.3 for both)")
    phi_lr: Annotated[float, RATE_OR_0] = setting(0.0, "learning rate of Φ's weights (0: lr)")
    head_lr: Annotated[float, LEARNING_RATE] = setting(1e-3, "learning rate of the task head (encoder backbones)")
    warmup: Annotated[float, Range(low=0, high=1, high_open=True, words="a fraction in [0, 1)")] = setting(0.0, "fraction of the steps over which the learning rates rise linearly from 0")
    decay: str = setting("none", "after warm-up: none (constant) or linear (to 0 at the last step)")
    weight_decay: Annotated[float, RATE_OR_0] = setting(1e-5, "AdamW weight decay of P and Φ")
    max_length: Count = setting(256, "tokens per sequence, prompt included")
    eval_every: Annotated[int, ZERO_OR_MORE] = setting(0, "evaluate dev every this many steps (0: once per epoch)")
    patience: Annotated[int, ZERO_OR_MORE] = setting(3, "stop after this many dev evaluations without improvement (0: never)")
    eval_batch_size: Count = setting(64, "examples per evaluation batch")
    bf16: bool | None = setting(None, "bf16 autocast for the backbone and the head's matmul (P, Φ and the head's weights stay fp32); "
                                      "unset: bf16 where the device computes it natively (a GPU that does, a CPU with avx512_bf16 or "
                                      "amx_bf16), else fp32")
    seed: int = setting(0, "seed of the prompt initialisation, head and data order")

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.decay not in DECAYS:
            raise ValueError(f"decay: {self.decay!r} is not one of {', '.join(DECAYS)}")

    def on(self, backbone: Backbone) -> TrainConfig:
        """This config with an unset `bf16` decided by the backbone's hardware (Backbone.native_bf16): what trains and is stored."""
        return self if self.bf16 is not None else replace(self, bf16=backbone.native_bf16)


class TrainingDiverged(RuntimeError):
    """Training produced no finite prompt to keep."""


@dataclass
class TrainedTask:
    """A trained task: collapsed prompt P′ (None for the head-only control), head weights, training metrics."""

    prompt: Tensor | None
    head: dict[str, Tensor] | None
    metrics: dict
    history: list[dict]
    uncollapsed: Tensor | None = None  # P as trained, before Φ (reparameterized methods): to measure what Φ adds


def build_prompt(backbone: Backbone, cfg: PromptConfig, seed: int) -> ResidualPrompt:
    """A fresh P (and Φ) for `backbone`, initialised as `cfg` says, reproducibly from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    text_ids = backbone.text_ids(cfg.init_text) if cfg.init == "text" else []
    weights = backbone.embeddings.weight.detach().cpu()
    init = initial_prompt(cfg, weights, backbone.vocab_ids, text_ids, generator, backbone.depth if cfg.deep else 1)
    torch.manual_seed(seed)  # φ's weights
    return ResidualPrompt(cfg, init, backbone.embedding_norm).to(backbone.device)


def train_task(
    backbone: Backbone,
    data: TaskData,
    prompt_cfg: PromptConfig,
    cfg: TrainConfig,
    progress: bool = False,
    *,
    prompt: ResidualPrompt | None = None,
    context: Tensor | None = None,
) -> TrainedTask:
    """Train one task and return the collapsed best-on-dev prompt, its head and the metrics.

    `prompt`: keep training this P and Φ instead of fresh ones (a prompt shared across tasks); it
    is left in its best-on-dev state. `context`: frozen collapsed prompts [c, d] that follow the
    trainable one in the input, as Progressive Prompts puts earlier tasks' prompts.
    """
    results = _fit(backbone, [data], prompt_cfg, cfg, progress, prompt, context)
    return results[0]


def train_joint(
    backbone: Backbone, datas: list[TaskData], prompt_cfg: PromptConfig, cfg: TrainConfig, progress: bool = False
) -> tuple[ResidualPrompt | None, list[TrainedTask]]:
    """Train one prompt (and a head per task) on all tasks at once; early-stop on the mean dev score."""
    prompt = build_prompt(backbone, prompt_cfg, cfg.seed) if prompt_cfg.uses_prompt else None
    return prompt, _fit(backbone, datas, prompt_cfg, cfg, progress, prompt, None)


def follow(backbone: Backbone, data: dict[str, TaskData]) -> None:
    """A non-main process of a multi-process `crpt run`: train its share of each training the main process announces."""
    for job in distributed.jobs():
        prompt = None
        if job.prompt is not None:  # a shared prompt: continue from the main process's state
            prompt = build_prompt(backbone, job.prompt_cfg, job.cfg.seed)
            prompt.load_state_dict(job.prompt)
        try:
            _fit(backbone, [data[name] for name in job.tasks], job.prompt_cfg, job.cfg, False, prompt, job.context)
        except TrainingDiverged:
            pass  # the main process saw the same gathered dev scores, and reports it


def make_optimizer(prompt: ResidualPrompt | None, heads: list[nn.Module | None], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over P (lr), Φ (phi_lr or lr; both with weight decay) and the heads (head_lr, no weight decay); never the backbone."""
    groups = []
    if prompt is not None:
        groups.append({"name": "prompt", "params": [prompt.prompt], "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        phi = [p for p in prompt.parameters() if p is not prompt.prompt]
        if phi:
            groups.append({"name": "phi", "params": phi, "lr": cfg.phi_lr or cfg.lr, "weight_decay": cfg.weight_decay})
    head_params = [p for h in heads if h is not None for p in h.parameters()]
    if head_params:
        groups.append({"name": "head", "params": head_params, "lr": cfg.head_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, eps=1e-8)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's rate times a factor: linear warm-up over `warmup` of the steps, then constant or linear decay to 0."""
    warm = round(cfg.warmup * total_steps)

    def factor(step: int) -> float:  # `step` optimizer steps done; the factor applies to the next one
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.decay == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warm))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def with_context(prompt: Tensor | None, context: Tensor | None) -> Tensor | None:
    """The prompt the backbone receives: the task's own, then the frozen context prompts (Progressive Prompts)."""
    return prompt if context is None or prompt is None else torch.cat([prompt, context.to(prompt.device)])


def train_step(
    backbone: Backbone,
    prompt: ResidualPrompt | None,
    head: nn.Module | None,
    batch: list[Features],
    optimizer: torch.optim.Optimizer,
    bf16: bool,
    context: Tensor | None = None,
    n_batch: int | None = None,
) -> tuple[bool, float | None]:
    """One optimizer step on `batch`; returns (applied, loss). A non-finite loss drops the step.

    Under data parallelism `batch` is this process's share of a batch of `n_batch` examples (it may
    be empty); the gradients are combined so that every process applies the full-batch step.
    """
    trainable = [m for m in (prompt, head) if m is not None]
    for module in trainable:
        module.train()
    optimizer.zero_grad(set_to_none=True)
    loss = None
    if batch:
        collated = backbone.collate(batch)
        # Φ runs outside autocast: fp32 in training exactly as in collapse(), so P′ is what trained.
        prompt_in = with_context(prompt(), context) if prompt is not None else None
        with autocast(backbone, bf16):
            loss = backbone.loss(prompt_in, head, collated)
    if not distributed.all_true(loss is None or bool(torch.isfinite(loss))):
        return False, None  # a diverging step is dropped, never applied
    if loss is not None:
        loss.backward()
    distributed.reduce_gradients(trainable, len(batch), n_batch or len(batch))
    optimizer.step()
    kill_point("train.step")
    return True, None if loss is None else loss.item()


def dev_scores(
    backbone: Backbone, datas: list[TaskData], heads: list[nn.Module | None], prompt: Tensor | None,
    dev: list[list[Features]], cfg: TrainConfig,
) -> list[float]:
    """Each task's dev score with the collapsed `prompt` (context included); -inf for all if the scores overflow."""
    try:
        return [d.task.score(d.dev, distributed.predict_split(backbone, prompt, heads[t], dev[t], cfg.eval_batch_size, cfg.bf16))["score"]
                for t, d in enumerate(datas)]
    except NonFiniteScores:  # finite but huge values can still overflow inside the backbone
        return [-math.inf] * len(datas)


def log_evaluation(label: str, entry: dict, examples_per_second: float, elapsed: float) -> None:
    """One line per dev evaluation (per epoch unless eval_every says otherwise), so a run without progress bars is not silent."""
    dev = "non-finite" if entry["dev_score"] is None else f"{entry['dev_score']:.2f}"
    log.info("%s epoch %d step %d: train loss %.4f, dev %s, %.1f examples/s, %.0f s", label, entry["epoch"], entry["step"],
             entry["train_loss"], dev, examples_per_second, elapsed)


def _fit(backbone: Backbone, datas: list[TaskData], prompt_cfg: PromptConfig, cfg: TrainConfig, progress: bool,
         prompt: ResidualPrompt | None, context: Tensor | None) -> list[TrainedTask]:
    """The training loop shared by `train_task` (one task) and `train_joint` (several); every process of a launch takes part."""
    with distributed.training(datas, prompt_cfg, cfg, prompt, context):
        return _train(backbone, datas, prompt_cfg, cfg, progress, prompt, context)


def _train(
    backbone: Backbone,
    datas: list[TaskData],
    prompt_cfg: PromptConfig,
    cfg: TrainConfig,
    progress: bool,
    prompt: ResidualPrompt | None,
    context: Tensor | None,
) -> list[TrainedTask]:
    for data in datas:
        if not data.train or not data.dev:
            raise ValueError(f"{data.task.name}: train and dev splits must both be non-empty")
    cfg = cfg.on(backbone)
    if prompt is None and prompt_cfg.uses_prompt:
        prompt = build_prompt(backbone, prompt_cfg, cfg.seed)
    torch.manual_seed(cfg.seed)
    heads = [backbone.new_head(data.task) for data in datas]
    if prompt is None and heads[0] is None:
        raise ValueError(f"method 'head' needs an encoder backbone; {backbone.name} is {backbone.family}")
    n_tokens = prompt.cfg.n_tokens if prompt is not None else 0
    if context is not None and prompt is not None and prompt.cfg.deep:
        raise ValueError(f"method {prompt.cfg.method}: Progressive Prompts' context takes shallow prompts only")
    in_context = n_tokens + (context.shape[0] if context is not None else 0)
    if cfg.max_length > backbone.max_positions:
        raise ValueError(f"max_length: {cfg.max_length} exceeds the backbone's {backbone.max_positions} positions")
    if cfg.max_length - in_context < 8:
        raise ValueError(f"max_length: {cfg.max_length} leaves no room for the input after {in_context} prompt tokens")
    optimizer = make_optimizer(prompt, heads, cfg)

    max_tokens = cfg.max_length - in_context
    train = [backbone.featurize(data.train, max_tokens) for data in datas]
    dev = [backbone.featurize(data.dev, max_tokens) for data in datas]
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = sum(math.ceil(len(t) / cfg.batch_size) for t in train)
    total_steps = cfg.epochs * steps_per_epoch
    schedule = make_schedule(optimizer, cfg, total_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    rank, world = distributed.setup()

    def epoch_batches() -> list[tuple[int, list[int]]]:
        batches = [(t, ids) for t, feats in enumerate(train) for ids in length_batches(feats, cfg.batch_size, generator)]
        return batches if len(datas) == 1 else [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    names = "+".join(d.task.name for d in datas)
    best = BestState(cfg.patience)
    history: list[dict] = []
    step, seen, train_seconds, skipped = 0, 0, 0.0, 0
    running: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"{names} ({prompt_cfg.method})", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        for t, batch_ids in epoch_batches():
            tick = time.perf_counter()
            local = distributed.share(batch_ids, rank, world)  # all of it when run alone
            applied, loss = train_step(backbone, prompt, heads[t], [train[t][i] for i in local], optimizer, cfg.bf16,
                                       context, len(batch_ids))
            skipped += not applied
            rates = {f"{names}/lr/{group['name']}": group["lr"] for group in optimizer.param_groups}  # the rates this step used
            schedule.step()
            tracking.step_done(rates if loss is None else {f"{names}/train_loss": loss, **rates})
            running += [] if loss is None else [loss]
            step += 1
            seen += len(batch_ids)
            train_seconds += time.perf_counter() - tick
            bar.update(1)
            if step % eval_every == 0 or step == total_steps:
                collapsed = prompt.collapse() if prompt is not None else None
                score = best.offer(dev_scores(backbone, datas, heads, with_context(collapsed, context), dev, cfg),
                                   step, collapsed, prompt, heads)
                loss_mean = sum(running) / len(running) if running else math.nan
                history.append({"step": step, "epoch": epoch + 1, "train_loss": loss_mean,
                                "dev_score": score if math.isfinite(score) else None})
                running = []
                bar.set_postfix(loss=f"{loss_mean:.3f}", dev=f"{score:.1f}")
                if math.isfinite(score):
                    tracking.log({f"{names}/dev_score": score})
                if rank == 0:
                    log_evaluation(f"{names} ({prompt_cfg.method})", history[-1], seen / train_seconds, time.perf_counter() - start)
            if best.stop:
                break
        if best.stop:
            break
    bar.close()
    wall = time.perf_counter() - start
    if rank == 0 and best.step:
        log.info("%s: kept the state of step %d of %d (best mean dev score %.2f)", names, best.step, step, best.score)
    if best.step == 0:
        raise TrainingDiverged(f"{names}: no dev evaluation produced a finite prompt; training diverged "
                               f"({skipped} non-finite steps dropped); lower --lr")

    best.restore(prompt, heads)
    uncollapsed = prompt.prompt.detach().clone() if prompt is not None and prompt.cfg.reparameterized else None
    results = []
    for t, data in enumerate(datas):
        n_head = sum(p.numel() for p in heads[t].parameters()) if heads[t] is not None else 0
        metrics = {
            "task": data.task.name,
            "method": prompt_cfg.method,
            "dev_score": best.scores[t],
            "best_step": best.step,
            "steps": step,
            "skipped_nonfinite_steps": skipped,
            "prompt_tokens": n_tokens,
            "prompt_tokens_in_context": in_context,
            "trainable_parameters": (prompt.trainable_parameters() if prompt is not None else 0) + n_head,
            "stored_parameters": (prompt.stored_parameters() if prompt is not None else 0) + n_head,
            "train_examples": len(train[t]),
            "wall_seconds": wall,
            "train_examples_per_second": seen / train_seconds if train_seconds else math.nan,
        }
        results.append(TrainedTask(best.collapsed, best.heads[t], metrics, history, uncollapsed))
    return results
