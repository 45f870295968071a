"""Train one task: P and Φ (and an encoder's head) on a frozen backbone, early-stopped on dev.

The result is what a bank stores: the collapsed prompt P′ = Φ(P) of the best dev evaluation,
the head at that point, and the run's metrics. Φ itself is thrown away.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from continual_rpt import distributed
from continual_rpt.backbones import Backbone, Features
from continual_rpt.evaluation import autocast, length_batches, predict_features
from continual_rpt.prompts import PromptConfig, ResidualPrompt, initial_prompt
from continual_rpt.tasks import TaskData


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings for one task."""

    epochs: int = field(default=10, metadata={"help": "passes over the training split at most"})
    batch_size: int = field(default=16, metadata={"help": "training examples per step"})
    lr: float = field(default=0.3, metadata={"help": "learning rate of P and Φ (the paper's 0.3)"})
    head_lr: float = field(default=1e-3, metadata={"help": "learning rate of the task head (encoder backbones)"})
    weight_decay: float = field(default=1e-5, metadata={"help": "AdamW weight decay of P and Φ"})
    max_length: int = field(default=256, metadata={"help": "tokens per sequence, prompt included"})
    eval_every: int = field(default=0, metadata={"help": "evaluate dev every this many steps (0: once per epoch)"})
    patience: int = field(default=3, metadata={"help": "stop after this many dev evaluations without improvement (0: never)"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per evaluation batch"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast for the backbone (P, Φ and head stay fp32)"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt initialisation, head and data order"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise ValueError("lr and head_lr: must be positive")


@dataclass
class TrainedTask:
    """A trained task: collapsed prompt P′ (None for the head-only control), head weights, metrics."""

    prompt: Tensor | None
    head: dict[str, Tensor] | None
    metrics: dict
    history: list[dict]


def build_prompt(backbone: Backbone, cfg: PromptConfig, seed: int) -> ResidualPrompt:
    """A fresh P (and Φ) for `backbone`, initialised as `cfg` says, reproducibly from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    text_ids = backbone.text_ids(cfg.init_text) if cfg.init == "text" else []
    weights = backbone.embeddings.weight.detach().cpu()
    init = initial_prompt(cfg, weights, backbone.vocab_ids, text_ids, generator)
    torch.manual_seed(seed)  # φ's weights
    return ResidualPrompt(cfg, init, backbone.embedding_norm).to(backbone.device)


def train_task(
    backbone: Backbone, data: TaskData, prompt_cfg: PromptConfig, cfg: TrainConfig, progress: bool = False
) -> TrainedTask:
    """Train one task and return the collapsed best-on-dev prompt, its head and the metrics."""
    task = data.task
    if not data.train or not data.dev:
        raise ValueError(f"{task.name}: train and dev splits must both be non-empty")
    prompt = build_prompt(backbone, prompt_cfg, cfg.seed) if prompt_cfg.uses_prompt else None
    torch.manual_seed(cfg.seed)
    head = backbone.new_head(task)
    if prompt is None and head is None:
        raise ValueError(f"method 'head' needs an encoder backbone; {backbone.name} is {backbone.family}")
    n_tokens = prompt_cfg.n_tokens if prompt is not None else 0
    if cfg.max_length > backbone.max_positions:
        raise ValueError(f"max_length: {cfg.max_length} exceeds the backbone's {backbone.max_positions} positions")
    if cfg.max_length - n_tokens < 8:
        raise ValueError(f"max_length: {cfg.max_length} leaves no room for the input after {n_tokens} prompt tokens")

    groups = []
    if prompt is not None:
        groups.append({"params": list(prompt.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": cfg.head_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, eps=1e-8)
    trainable = [m for m in (prompt, head) if m is not None]

    max_tokens = cfg.max_length - n_tokens
    train = backbone.featurize(data.train, max_tokens)
    dev = backbone.featurize(data.dev, max_tokens)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    eval_every = cfg.eval_every or steps_per_epoch

    rank, world = distributed.setup()

    def predict_all(collapsed: Tensor | None, features: list[Features]) -> list[int]:
        mine = distributed.share(list(range(len(features))), rank, world)
        preds = predict_features(backbone, collapsed, head, [features[i] for i in mine], cfg.eval_batch_size, cfg.bf16)
        merged = distributed.gather(dict(zip(mine, preds)))
        return [merged[i] for i in range(len(features))]

    def dev_score() -> tuple[float, Tensor | None]:
        collapsed = prompt.collapse() if prompt is not None else None
        return task.score(data.dev, predict_all(collapsed, dev))["score"], collapsed

    best = {"score": -math.inf, "prompt": None, "head": None, "step": 0}
    history: list[dict] = []
    step, seen, train_seconds, stale, skipped = 0, 0, 0.0, 0, 0
    running: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"{task.name} ({prompt_cfg.method})", disable=not progress, leave=False)
    stop = False
    for epoch in range(cfg.epochs):
        for batch_ids in length_batches(train, cfg.batch_size, generator):
            tick = time.perf_counter()
            if prompt is not None:
                prompt.train()
            if head is not None:
                head.train()
            local = distributed.share(batch_ids, rank, world)  # all of it when run alone
            optimizer.zero_grad(set_to_none=True)
            loss = None
            if local:
                batch = backbone.collate([train[i] for i in local])
                with autocast(backbone, cfg.bf16):
                    loss = backbone.loss(prompt() if prompt is not None else None, head, batch)
            if distributed.all_true(loss is None or bool(torch.isfinite(loss))):
                if loss is not None:
                    loss.backward()
                    running.append(loss.item())
                distributed.reduce_gradients(trainable, len(local), len(batch_ids))
                optimizer.step()
            else:  # a diverging step is dropped, never applied
                skipped += 1
            step += 1
            seen += len(batch_ids)
            train_seconds += time.perf_counter() - tick
            bar.update(1)
            if step % eval_every == 0 or step == cfg.epochs * steps_per_epoch:
                score, collapsed = dev_score()
                loss_mean = sum(running) / len(running) if running else math.nan
                history.append({"step": step, "epoch": epoch + 1, "train_loss": loss_mean, "dev_score": score})
                running = []
                bar.set_postfix(loss=f"{loss_mean:.3f}", dev=f"{score:.1f}")
                if score > best["score"] and (collapsed is None or torch.isfinite(collapsed).all()):
                    best_head = {k: v.detach().clone() for k, v in head.state_dict().items()} if head is not None else None
                    best = {"score": score, "prompt": collapsed, "head": best_head, "step": step}
                    stale = 0
                else:
                    stale += 1
                    stop = cfg.patience > 0 and stale >= cfg.patience
            if stop:
                break
        if stop:
            break
    bar.close()
    wall = time.perf_counter() - start
    if best["step"] == 0:
        raise RuntimeError(f"{task.name}: no dev evaluation produced a finite prompt (training diverged)")

    if head is not None:
        head.load_state_dict(best["head"])
    test_metrics = {}
    if data.test:
        test_metrics = task.score(data.test, predict_all(best["prompt"], backbone.featurize(data.test, max_tokens)))
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    metrics = {
        "task": task.name,
        "method": prompt_cfg.method,
        "dev_score": best["score"],
        "test": test_metrics,
        "test_score": test_metrics.get("score", math.nan),
        "best_step": best["step"],
        "steps": step,
        "skipped_nonfinite_steps": skipped,
        "prompt_tokens": n_tokens,
        "trainable_parameters": (prompt.trainable_parameters() if prompt is not None else 0) + head_params,
        "stored_parameters": (prompt.stored_parameters() if prompt is not None else 0) + head_params,
        "train_examples": len(train),
        "wall_seconds": wall,
        "train_examples_per_second": seen / train_seconds if train_seconds else math.nan,
    }
    return TrainedTask(prompt=best["prompt"], head=best["head"], metrics=metrics, history=history)
