"""Command line: `crpt train` (one task)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import asdict
from pathlib import Path

from continual_rpt import __version__
from continual_rpt.bank import Entry, save_entry

# Module-level imports of torch/transformers are deferred so `crpt --help` stays fast.


@dataclasses.dataclass
class DataConfig:
    """Where a task's data comes from and how much of it trains."""

    task: str = dataclasses.field(default="", metadata={"help": "SuperGLUE task: BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC"})
    data_dir: str = dataclasses.field(default="", metadata={"help": "folder with <Task>/{train,val}.jsonl (default: $CRPT_DATA_DIR)"})
    train_dir: str = dataclasses.field(default="", metadata={"help": "take train.jsonl from this folder instead, e.g. FewGLUE"})
    source: str = dataclasses.field(default="files", metadata={"help": "files (official jsonl) or hub (Hugging Face aps/super_glue)"})
    k_per_class: int = dataclasses.field(default=0, metadata={"help": "train on k examples per class (0: all)"})
    max_train: int = dataclasses.field(default=0, metadata={"help": "train on a seeded subset of this many examples (0: all)"})


@dataclasses.dataclass
class BackboneConfig:
    """Which frozen backbone, and how an encoder pools its output."""

    backbone: str = dataclasses.field(default="embedded", metadata={"help": "hub id or local folder; embedded = all-MiniLM-L6-v2 in the wheel"})
    pooling: str = dataclasses.field(default="cls", metadata={"help": "encoder head input: cls or mean"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One --option per dataclass field, typed and documented from the field."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata.get("help"))
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f.metadata.get("help"), metavar=f.name.upper())


def dataclass_from_args(cls: type, args: argparse.Namespace):
    """Build `cls` from the parsed options that belong to it."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    """The `crpt` argument parser."""
    from continual_rpt.learner import TrainConfig
    from continual_rpt.prompts import PromptConfig

    parser = argparse.ArgumentParser(prog="crpt", description="Continual learning with residual prompt tuning.")
    parser.add_argument("--version", action="version", version=f"continual-rpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one task's residual prompt and write it, collapsed, to --out")
    train.add_argument("--out", required=True, help="output folder (created; replaced if it exists)")
    add_dataclass_args(train, DataConfig, "data")
    add_dataclass_args(train, BackboneConfig, "backbone")
    add_dataclass_args(train, PromptConfig, "prompt")
    add_dataclass_args(train, TrainConfig, "training")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    """Train one task, collapse, write the entry and print its scores."""
    from continual_rpt.backbones import load_backbone
    from continual_rpt.learner import TrainConfig, train_task
    from continual_rpt.prompts import PromptConfig
    from continual_rpt.tasks import load_task_data

    data_cfg = dataclass_from_args(DataConfig, args)
    backbone_cfg = dataclass_from_args(BackboneConfig, args)
    prompt_cfg = dataclass_from_args(PromptConfig, args)
    train_cfg = dataclass_from_args(TrainConfig, args)
    if not data_cfg.task:
        raise ValueError("--task is required")
    data = load_task_data(
        data_cfg.task,
        data_cfg.data_dir or None,
        train_dir=data_cfg.train_dir or None,
        source=data_cfg.source,
        k_per_class=data_cfg.k_per_class or None,
        max_train=data_cfg.max_train or None,
        seed=train_cfg.seed,
    )
    backbone = load_backbone(backbone_cfg.backbone, backbone_cfg.pooling, backbone_cfg.device)
    trained = train_task(backbone, data, prompt_cfg, train_cfg)
    meta = entry_metadata(data, backbone, prompt_cfg)
    config = {"data": asdict(data_cfg), "backbone": asdict(backbone_cfg), "prompt": asdict(prompt_cfg), "train": asdict(train_cfg)}
    metrics = {**trained.metrics, "history": trained.history}
    folder = save_entry(args.out, Entry(trained.prompt, trained.head, meta, config, metrics))
    m = trained.metrics
    test = ", ".join(f"{k} {v:.1f}" for k, v in m["test"].items())
    print(f"{m['task']} ({m['method']}): dev {m['dev_score']:.1f}  test {test}")
    print(f"trainable {m['trainable_parameters']:,}  stored {m['stored_parameters']:,}  "
          f"{m['train_examples_per_second']:.1f} train ex/s  {m['wall_seconds']:.0f} s  -> {folder}")
    return 0


def entry_metadata(data, backbone, prompt_cfg) -> dict:
    """What a stored prompt is and what it needs: task, labels, backbone identity, data checksums."""
    return {
        "library_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": data.task.name,
        "kind": data.task.kind,
        "label_names": list(data.task.label_names),
        "backbone": {"name": backbone.name, "family": backbone.family, "width": backbone.width, "fingerprint": backbone.fingerprint},
        "method": prompt_cfg.method,
        "prompt_tokens": prompt_cfg.n_tokens if prompt_cfg.uses_prompt else 0,
        "dtype": "float32",
        "data_files": data.files,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `crpt` console script."""
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"crpt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
