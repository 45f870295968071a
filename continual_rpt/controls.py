"""The reference scores a method must beat: the best constant answer, and a linear probe on frozen pooled features.

The best constant answer is the highest test score any one answer given to every test example
reaches under the task's own metric (each class; for choice tasks each choice position). It is
chosen on the test split on purpose: not a method but the ceiling of every constant answer, so a
method below it has learned nothing a constant could not give. It replaces the majority class,
which on balanced few-shot training data is a tie that the first training row decided.

A prompt method that does not beat the linear probe has learned nothing a logistic regression on
the backbone's own sentence embeddings would not. The probe is the strong form of the head-only
control: scikit-learn's L-BFGS logistic regression on standardized pooled outputs (no prompt),
its inverse regularization C chosen on the dev split, then folded into an ordinary task head (a
Linear over the pooled output) so that it is stored and answers like any other bank entry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from continual_rpt.backbones import Backbone, Features
from continual_rpt.evaluation import per_example
from continual_rpt.tasks import Example, Task, TaskData

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # log-spaced; sentence embeddings of 384 dims rarely want more


def constant_answers(task: Task, examples: list[Example]) -> dict[str, list[int]]:
    """Every constant answer by name, as predictions on `examples`: each class, or each choice position (the last where fewer)."""
    if task.kind == "classification":
        return {name: [label] * len(examples) for label, name in enumerate(task.label_names)}
    positions = max(len(ex.candidates) for ex in examples)
    return {f"choice {j + 1}": [min(j, len(ex.candidates) - 1) for ex in examples] for j in range(positions)}


def best_constant(task: Task, examples: list[Example]) -> tuple[float, str]:
    """The best score of any constant answer on `examples` under the task's metric, and that answer (the first of ties)."""
    scored = [(task.score(examples, predictions)["score"], name) for name, predictions in constant_answers(task, examples).items()]
    return max(scored, key=lambda pair: pair[0])


def control_fields(stored: dict) -> dict:
    """A task's stored control scores as metrics.json fields; runs made before the best constant stored bare names ("majority")."""
    return {key if key.endswith(("_score", "_answer")) else f"{key}_score": value for key, value in stored.items()}


def pooled_features(backbone: Backbone, features: list[Features], batch_size: int, bf16: bool) -> list[Tensor]:
    """Each example's pooled outputs without a prompt: [pairs, d] per example (one pair for classification)."""
    return per_example(backbone, features, batch_size, bf16, lambda _, batch: backbone.encode(None, batch), by_pair=True)


def _design(task, examples, pooled: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Training matrix and targets: one row per example (its class), or per (example, choice) pair (gold or not)."""
    x = torch.cat(pooled)
    if task.kind == "classification":
        return x, torch.tensor([ex.label for ex in examples])
    return x, torch.tensor([int(j == ex.label) for ex, p in zip(examples, pooled) for j in range(len(p))])


def _head_weights(model, mean: Tensor, scale: Tensor, outputs: int) -> dict[str, Tensor]:
    """The fitted model (on standardized inputs) as a Linear head on raw pooled outputs."""
    weight = torch.as_tensor(model.coef_, dtype=torch.float32) / scale
    bias = torch.as_tensor(model.intercept_, dtype=torch.float32) - weight @ mean
    if weight.shape[0] == 1 and outputs == 2:  # binary: one logit difference becomes two logits ±½ of it
        weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
    elif weight.shape[0] != outputs:  # classes absent from the training sample are never predicted
        full_weight, full_bias = torch.zeros(outputs, weight.shape[1]), torch.full((outputs,), -1e4)
        classes = torch.as_tensor(model.classes_)
        full_weight[classes], full_bias[classes] = weight, bias
        weight, bias = full_weight, full_bias
    return {"weight": weight.contiguous(), "bias": bias.contiguous()}


def _predictions(task, pooled: list[Tensor], weights: dict[str, Tensor]) -> list[int]:
    """What the head answers on precomputed pooled outputs: the top class, or the top-scoring choice."""
    if task.kind == "classification":
        return (torch.cat(pooled) @ weights["weight"].T + weights["bias"]).argmax(-1).tolist()
    return [int((p @ weights["weight"].T + weights["bias"])[:, 0].argmax()) for p in pooled]


def fit_linear_probe(backbone: Backbone, data: TaskData, max_length: int, seed: int,
                     batch_size: int = 64, bf16: bool = True) -> tuple[dict[str, Tensor], dict]:
    """Head weights of the dev-best logistic regression on frozen pooled features, its dev and test scores and test predictions."""
    from sklearn.linear_model import LogisticRegression

    if backbone.family != "encoder":
        raise ValueError(f"linear-probe needs an encoder backbone (pooled outputs); {backbone.name} is {backbone.family}")
    task = data.task
    outputs = len(task.label_names) if task.kind == "classification" else 1
    splits = {name: getattr(data, name) for name in ("train", "dev", "test") if getattr(data, name)}
    pooled = {name: pooled_features(backbone, backbone.featurize(examples, max_length), batch_size, bf16)
              for name, examples in splits.items()}
    x, y = _design(task, data.train, pooled["train"])
    if len(set(y.tolist())) < 2:
        raise ValueError(f"{task.name}: the training split holds one class only; a linear probe needs two")
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    standardized = ((x - mean) / scale).numpy()
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(standardized, y.numpy())
        weights = _head_weights(model, mean, scale, outputs)
        dev = task.score(data.dev, _predictions(task, pooled["dev"], weights))["score"]
        if best is None or dev > best[0]:
            best = (dev, c, weights)
    dev, c, weights = best
    predictions = _predictions(task, pooled["test"], weights) if data.test else []
    test = task.score(data.test, predictions) if data.test else {}
    return weights, {"dev_score": dev, "C": c, "C_grid": list(C_GRID), "test": test, "test_score": test.get("score"),
                     "test_predictions": predictions}


def reference_scores(backbone: Backbone, data: TaskData, max_length: int, seed: int, batch_size: int = 64,
                     bf16: bool = True) -> dict[str, float | str | None]:
    """Test scores of the best constant answer (and which it is) and of the linear probe (None without pooled outputs)."""
    probe = None
    if backbone.family == "encoder":
        probe = fit_linear_probe(backbone, data, max_length, seed, batch_size, bf16)[1]["test_score"]
    score, answer = best_constant(data.task, data.test)
    return {"best_constant_score": score, "best_constant_answer": answer, "linear_probe_score": probe}
