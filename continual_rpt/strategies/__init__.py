"""Continual-learning strategies: what a stream's tasks share, and what each task is answered with.

One registry, read by the stream parser (`strategy:`), `crpt train --method`, `crpt run --method`
and the report. Each strategy is a class that implements `continual_rpt.strategies.base.Strategy`
(learn task i, predict a seen task, finish); each row below registers one class with the methods
(`--method` names) it answers to and the prompt method each of them sets on every task.

To add a baseline: write its class in a module of this package and add one row to REGISTRY.
Classes are named by import path and imported only when a run uses them: Avalanche alone takes
seconds to import, and `crpt --help` or a bank query must not pay for it.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Registered:
    """A strategy class (as `module:Class`) and its methods: {method name: prompt method it sets, None keeps the stream's}."""

    path: str
    methods: dict[str, str | None]
    extra: str = ""  # the pip extra its imports need, named in the error when they are missing


REGISTRY: dict[str, Registered] = {
    "bank": Registered("continual_rpt.strategies.bank:BankStrategy",
                       {"rpt": "rpt", "pt": "pt", "pt-mlp": "pt-mlp", "head": "head", "deep-rpt": "deep-rpt", "deep-pt": "deep-pt"}),
    "progressive": Registered("continual_rpt.strategies.bank:ProgressiveStrategy", {"progressive": "rpt", "progressive-pt": "pt"}),
    "shared": Registered("continual_rpt.strategies.shared:SharedStrategy", {"shared": None}),
    "multitask": Registered("continual_rpt.strategies.shared:MultitaskStrategy", {"multitask": None}),
    "probe": Registered("continual_rpt.strategies.probe:LinearProbeStrategy", {"linear-probe": "head"}),
    "naive": Registered("continual_rpt.strategies.avalanche:AvalancheStrategy", {"naive": None}, "avalanche"),
    "ewc": Registered("continual_rpt.strategies.avalanche:AvalancheStrategy", {"ewc": None}, "avalanche"),
    "lwf": Registered("continual_rpt.strategies.avalanche:AvalancheStrategy", {"lwf": None}, "avalanche"),
    "replay": Registered("continual_rpt.strategies.avalanche:AvalancheStrategy", {"replay": None}, "avalanche"),
    "agem": Registered("continual_rpt.strategies.avalanche:AvalancheStrategy", {"agem": None}, "avalanche"),
}
STRATEGIES = tuple(REGISTRY)
# --method NAME -> (strategy, prompt method it sets on every task; None keeps the stream's)
METHODS: dict[str, tuple[str, str | None]] = {m: (s, p) for s, r in REGISTRY.items() for m, p in r.methods.items()}
SINGLE_TASK_METHODS = tuple(REGISTRY["bank"].methods)  # what `crpt train` (one task, no stream) can run


def strategy_class(name: str) -> type:
    """The class registered for strategy `name`, imported now."""
    if name not in REGISTRY:
        raise ValueError(f"strategy: {name!r} is not one of {', '.join(REGISTRY)}")
    registered = REGISTRY[name]
    module, _, cls = registered.path.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as err:
        if not registered.extra or err.name.startswith("continual_rpt"):
            raise
        raise ValueError(f"strategy {name}: needs the extra '{registered.extra}' ({err}); "
                         f"install it with: pip install 'continual-rpt[{registered.extra}]'") from err


def make_strategy(stream, backbone, bank, out):
    """The strategy object that `stream.strategy` names, for this run."""
    return strategy_class(stream.strategy)(stream, backbone, bank, out)


def method_label(stream) -> str:
    """The run's method as a user names it (a --method name where one fits, else the strategy and prompt methods)."""
    prompt_methods = sorted({t.prompt.method for t in stream.tasks})
    for method, (strategy, prompt) in METHODS.items():
        if strategy == stream.strategy and (prompt is None or prompt_methods == [prompt]):
            return method
    return "+".join(prompt_methods) if stream.strategy == "bank" else f"{stream.strategy}-{'+'.join(prompt_methods)}"


def with_method(stream, method: str):
    """`stream` set to run `method` (a name of METHODS) on every task."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    strategy, prompt_method = METHODS[method]
    tasks = [t if prompt_method is None else dataclasses.replace(t, prompt=dataclasses.replace(t.prompt, method=prompt_method))
             for t in stream.tasks]
    return dataclasses.replace(stream, strategy=strategy, tasks=tasks)
