"""Stream files: a YAML list of tasks, in order, with defaults and per-task overrides.

    name: superglue-cpu
    description: ...
    backbone: {backbone: embedded, pooling: cls}
    strategy: bank                      # or progressive, shared, multitask, naive, ewc, lwf, replay, agem
    baseline: {ewc_lambda: 1000}        # BaselineConfig: settings of the Avalanche baselines
    controls: true                      # best-constant-answer and linear-probe scores beside the method's
    eval: once                          # or every: re-score every earlier task after each one, even unchanged bank entries
    data: {k_per_class: 32}            # DataConfig defaults for every task
    prompt: {method: rpt, n_tokens: 10} # PromptConfig defaults
    train: {epochs: 10}                 # TrainConfig defaults
    tasks:
      - CB                              # a SuperGLUE task, or a CL benchmark task of tasks/catalog.py
                                        # (from the CL layout under data_dir when one is given, else the hub)
      - task: RTE                       # the same, with overrides of any section
        data: {k_per_class: 16}
        train: {max_length: 192}
      - custom: {name: sst2, hub: stanfordnlp/sst2, hub_eval_split: validation, text: sentence,
                 label_names: [negative, positive]}

Every key is checked: an unknown key or a value of the wrong type is an error naming the file
and the key's path (e.g. `tasks[2].train.epochs`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml

from continual_rpt.backbones import BackboneConfig
from continual_rpt.bank import check_name
from continual_rpt.config_fields import Count, Range, check_ranges, setting
from continual_rpt.learner import TrainConfig
from continual_rpt.prompts import PromptConfig
from continual_rpt.recipes import recipe_for
from continual_rpt.strategies import STRATEGIES
from continual_rpt.tasks import (
    CustomTaskConfig,
    Example,
    TaskData,
    custom_config_from_dict,
    get_task,
    load_custom_data,
    load_task_data,
)
from continual_rpt.tasks.catalog import CL_LAYOUT, HUB_TASKS, SPLIT_FROM, catalog_task
from continual_rpt.tasks.data import utf8_text

SECTIONS = ("data", "prompt", "train")
EVAL_MODES = ("once", "every")  # the stream's `eval`: earlier tasks verified by checksum, or re-scored
ALL_OR_N = Range(low=0, words="0 (all) or more")  # DataConfig's subset sizes: 0 takes everything
WEIGHT = Range(low=0, high=math.inf, high_open=True, words="a finite number ≥ 0")  # BaselineConfig's loss weights


@dataclass
class DataConfig:
    """Where a task's data comes from and how much of it trains."""

    data_dir: str = setting("", "folder with <Task>/{train,val}.jsonl, or the CL benchmark layout (default: $CRPT_DATA_DIR)")
    train_dir: str = setting("", "take train.jsonl from this folder instead (relative: to the data dir), e.g. FewGLUE")
    source: str = setting("files", "files (official jsonl) or hub (Hugging Face aps/super_glue)")
    k_per_class: Annotated[int, ALL_OR_N] = setting(0, "train on k examples per class (0: all)")
    max_train: Annotated[int, ALL_OR_N] = setting(0, "train on a seeded subset of this many examples (0: all)")
    max_eval: Annotated[int, ALL_OR_N] = setting(0, "evaluate on a fixed subset of this many dev and test examples each (MultiRC: questions; 0: all)")
    split_from: str = setting("", "CL benchmark layout: carve train, dev and test out of this one file (train or test)")

    def __post_init__(self) -> None:
        if self.source not in ("files", "hub"):
            raise ValueError(f"source: {self.source!r} is not one of files, hub")
        if self.split_from not in SPLIT_FROM:
            raise ValueError(f"split_from: {self.split_from!r} is not one of train, test (or empty)")
        check_ranges(self)


@dataclass
class BaselineConfig:
    """Settings of the Avalanche baselines on the shared prompt (each one reads its own)."""

    # Untuned. EWC's importances are squared gradients, and the prompt's are tiny: on the embedded MiniLM
    # (CB then RTE, 16 examples per class, 3 epochs) Σ F·Δθ² came to 1.2e-4 against a cross-entropy of 0.66,
    # so λ = 1000 makes the penalty about a fifth of the loss there, more as the prompt drifts further.
    ewc_lambda: Annotated[float, WEIGHT] = setting(1000.0, "EWC: weight λ of the importance-weighted penalty")
    lwf_alpha: Annotated[float, WEIGHT] = setting(1.0, "LwF: weight of the distillation loss (the LwF paper's and Avalanche's default)")
    lwf_temperature: Annotated[float, WEIGHT] = setting(2.0, "LwF: softmax temperature of the distillation")
    replay_mem_size: Count = setting(200, "replay: examples kept, balanced over the tasks seen (Avalanche's default)")
    agem_patterns_per_exp: Count = setting(100, "A-GEM: examples kept per task")
    agem_sample_size: Count = setting(64, "A-GEM: memory examples per reference gradient (Avalanche's default)")

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class TaskSpec:
    """One task of a stream: its bank name, what data it reads, and its prompt and training settings."""

    name: str
    task: str
    custom: CustomTaskConfig | None
    data: DataConfig
    prompt: PromptConfig
    train: TrainConfig


CATALOG = sorted({*HUB_TASKS, *CL_LAYOUT})


def data_root(data: DataConfig) -> str | None:
    """The folder a task's files are read from: its data_dir, else $CRPT_DATA_DIR; None for the hub."""
    if data.source == "hub":
        return None
    return data.data_dir or os.environ.get("CRPT_DATA_DIR") or None


@dataclass
class Stream:
    """An ordered list of tasks learned one after another on one frozen backbone."""

    name: str
    description: str
    backbone: BackboneConfig
    tasks: list[TaskSpec]
    base_dir: Path  # the stream file's folder: relative custom-data paths resolve against it
    strategy: str = "bank"
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    controls: bool = True  # score the best constant answer and a linear probe on every task, beside the method
    # After each task: `once` scores each bank entry on test when it is learned and, later, verifies it by checksum
    # (an entry never changes); `every` re-scores all of them. Strategies whose model moves re-score either way.
    eval: str = "once"

    def on(self, backbone) -> Stream:
        """This stream with every task's unset bf16 decided by the backbone's device (TrainConfig.on)."""
        return dataclasses.replace(self, tasks=[dataclasses.replace(t, train=t.train.on(backbone)) for t in self.tasks])

    def resolved(self) -> dict:
        """The whole configuration with every default filled in (saved next to a run)."""
        return {
            "name": self.name,
            "description": self.description,
            "backbone": dataclasses.asdict(self.backbone),
            "strategy": self.strategy,
            "baseline": dataclasses.asdict(self.baseline),
            "controls": self.controls,
            "eval": self.eval,
            "tasks": [
                {"name": t.name, "task": t.task, "custom": dataclasses.asdict(t.custom) if t.custom else None,
                 **{s: dataclasses.asdict(getattr(t, s)) for s in SECTIONS}}
                for t in self.tasks
            ],
        }


def build(cls: type, values: object, where: str, base: object | None = None):
    """A `cls` dataclass from a mapping, on top of `base`: unknown keys and wrong types name their path."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = typing.get_type_hints(cls)
    current = dataclasses.asdict(base) if base is not None else {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{where}.{key}: unknown key; known keys are {', '.join(fields)}")
        # `bool | None`: None (unset, decided once the device is known) is allowed too
        kinds = typing.get_args(fields[key]) if isinstance(fields[key], types.UnionType) else (fields[key],)
        kind = kinds[0]
        ok = isinstance(value, kinds) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value, ok = float(value), True
            except OverflowError:
                raise ValueError(f"{where}.{key}: number too large ({str(value)[:20]}…)") from None
        if not ok:
            raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__} ({value!r})")
        current[key] = value
    try:
        return cls(**current)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from None


def load_stream(path: str | Path, data_dir: str | None = None, backbone: str | None = None) -> Stream:
    """Parse and validate a stream file; `data_dir` replaces every task's data folder, `backbone` the backbone (crpt run options)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: stream file not found")
    try:
        doc = yaml.safe_load(utf8_text(path, path.read_bytes()))
    except (yaml.YAMLError, RecursionError) as err:  # absurdly nested documents exhaust the parser's recursion
        raise ValueError(f"{path}: not valid YAML ({type(err).__name__}: {str(err)[:200]})") from None
    return parse_stream(doc, str(path), path.resolve().parent, data_dir, backbone)


def parse_stream(doc: object, where: str, base_dir: Path, data_dir: str | None = None, backbone_name: str | None = None) -> Stream:
    """A Stream from an already-loaded YAML document; `where` prefixes every error."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: a stream file must be a mapping with 'name' and 'tasks'")
    known = {"name", "description", "backbone", "strategy", "baseline", "controls", "eval", *SECTIONS, "tasks"}
    for key in doc:
        if key not in known:
            raise ValueError(f"{where}: {key}: unknown key; known keys are {', '.join(sorted(known))}")
    name, description = doc.get("name"), doc.get("description", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: name: expected a non-empty string")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description: expected a string")
    controls = doc.get("controls", True)
    if not isinstance(controls, bool):
        raise ValueError(f"{where}: controls: expected true or false, got {controls!r}")
    evaluate = doc.get("eval", "once")
    if evaluate not in EVAL_MODES:
        raise ValueError(f"{where}: eval: expected one of {', '.join(EVAL_MODES)}, got {evaluate!r}")
    strategy = doc.get("strategy", "bank")
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    backbone = build(BackboneConfig, doc.get("backbone"), f"{where}: backbone")
    if backbone_name:
        backbone = dataclasses.replace(backbone, backbone=backbone_name)
    recipe = recipe_for(backbone.backbone)  # the backbone's own defaults, under the stream's
    defaults = {s: build(cls, doc.get(s), f"{where}: {s}", build(cls, recipe.get(s), f"recipes.RECIPES[{backbone.backbone!r}].{s}"))
                for s, cls in zip(SECTIONS, (DataConfig, PromptConfig, TrainConfig))}
    baseline = build(BaselineConfig, doc.get("baseline"), f"{where}: baseline")
    items = doc.get("tasks")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: tasks: expected a non-empty list")
    tasks = [_task_spec(item, f"{where}: tasks[{i}]", defaults, data_dir) for i, item in enumerate(items)]
    seen = set()
    for i, spec in enumerate(tasks):
        if spec.name in seen:
            raise ValueError(f"{where}: tasks[{i}]: task name {spec.name!r} appears twice; give one a 'name'")
        seen.add(spec.name)
    return Stream(name, description, backbone, tasks, base_dir, strategy, baseline, controls, evaluate)


def _task_spec(item: object, where: str, defaults: dict, data_dir: str | None) -> TaskSpec:
    if isinstance(item, str):
        item = {"task": item}
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a task name or a mapping")
    for key in item:
        if key not in ("name", "task", "custom", *SECTIONS):
            raise ValueError(f"{where}.{key}: unknown key; known keys are name, task, custom, {', '.join(SECTIONS)}")
    if ("task" in item) == ("custom" in item):
        raise ValueError(f"{where}: give exactly one of 'task' (a SuperGLUE task) or 'custom'")
    sections = {s: build(type(defaults[s]), item.get(s), f"{where}.{s}", defaults[s]) for s in SECTIONS}
    if data_dir:
        sections["data"] = dataclasses.replace(sections["data"], data_dir=data_dir)
    custom, task, catalog = None, "", False
    if "custom" in item:
        custom = custom_config_from_dict(item["custom"], f"{where}.custom")
        name = item.get("name", custom.name)
    elif str(item["task"]).lower() in CATALOG:
        catalog = True
        try:
            custom = catalog_task(str(item["task"]).lower(), data_root(sections["data"]), sections["data"].split_from)
        except ValueError as err:
            raise ValueError(f"{where}.task: {err}") from None
        name = item.get("name", custom.name)
    else:
        try:
            task = get_task(str(item["task"])).name
        except ValueError as err:
            raise ValueError(f"{where}.task: {err}; or one of the CL benchmark tasks {', '.join(CATALOG)}") from None
        name = item.get("name", task)
    if sections["data"].split_from and not catalog:
        raise ValueError(f"{where}.data.split_from: applies to CL benchmark tasks ({', '.join(CATALOG)}); "
                         "a custom task says split_from in its own declaration")
    try:
        check_name(name)
    except ValueError as err:
        raise ValueError(f"{where}.name: {err}") from None
    return TaskSpec(name=name, task=task, custom=custom, **sections)


def spec_from_entry(meta: dict, config: dict, where: str, data_dir: str | None = None) -> TaskSpec:
    """The spec that trained a bank entry, from its entry.json and config.json; `data_dir` replaces where its files are."""
    classes = dict(zip(SECTIONS, (DataConfig, PromptConfig, TrainConfig)))
    sections = {s: build(cls, config.get(s) or {}, f"{where}: config.{s}") for s, cls in classes.items()}
    if data_dir:
        sections["data"] = dataclasses.replace(sections["data"], data_dir=data_dir)
    task, custom = str(meta.get("task", "")), meta.get("custom")
    if custom and task.lower() in CATALOG and data_dir:  # a CL benchmark task: its files are under the new folder
        return TaskSpec(meta["name"], "", catalog_task(task.lower(), data_root(sections["data"]), sections["data"].split_from), **sections)
    if custom:
        return TaskSpec(meta["name"], "", custom_config_from_dict(custom, f"{where}: custom"), **sections)
    return TaskSpec(meta["name"], get_task(task).name, None, **sections)


def load_data(spec: TaskSpec, base_dir: Path) -> TaskData:
    """Load a task's splits as its spec says (SuperGLUE files or hub, or a custom dataset)."""
    d = spec.data
    k, limit, seed = d.k_per_class or None, d.max_train or None, spec.train.seed
    if spec.custom is not None:
        data = load_custom_data(spec.custom, base_dir, k_per_class=k, max_train=limit, seed=seed)
    else:
        data_dir = d.data_dir or os.environ.get("CRPT_DATA_DIR") or None
        train_dir = None
        if d.train_dir:
            train_dir = Path(d.train_dir)
            if not train_dir.is_absolute() and data_dir:
                train_dir = Path(data_dir) / train_dir
        data = load_task_data(spec.task, data_dir, train_dir=train_dir, source=d.source, k_per_class=k, max_train=limit, seed=seed)
    if d.max_eval:
        data = dataclasses.replace(data, dev=_subsample(data.dev, d.max_eval), test=_subsample(data.test, d.max_eval))
    return data


def _subsample(examples: list[Example], limit: int) -> list[Example]:
    """A fixed (seed-independent) subset of at most `limit` units: questions for MultiRC, queries for ReCoRD."""
    units = list(dict.fromkeys(ex.group or ex.uid for ex in examples))
    if len(units) <= limit:
        return examples
    keep = set(random.Random(0).sample(units, limit))
    return [ex for ex in examples if (ex.group or ex.uid) in keep]
