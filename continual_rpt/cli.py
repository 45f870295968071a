"""Command line: `crpt train` (one task), `crpt run` (a stream into a bank), `crpt bank` (queries)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from continual_rpt import __version__
from continual_rpt.cli_args import add_config_options, config_from_args, train_configs


def build_parser() -> argparse.ArgumentParser:
    """The `crpt` argument parser."""
    from continual_rpt.backbones import BackboneConfig
    from continual_rpt.learner import TrainConfig
    from continual_rpt.prompts import PromptConfig
    from continual_rpt.strategies import METHODS as STRATEGY_METHODS
    from continual_rpt.streams import DataConfig
    from continual_rpt.tracking import REPORT_TO

    parser = argparse.ArgumentParser(prog="crpt", description="Continual learning with residual prompt tuning.")
    parser.add_argument("--version", action="version", version=f"continual-rpt {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too (before its one-line message)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one task's prompt and write it, collapsed, to --out")
    train.add_argument("--task", required=True, help="SuperGLUE task: BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC")
    train.add_argument("--out", required=True, type=Path, help="output folder (must not exist yet)")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    train.add_argument("--report-to", default="none", choices=REPORT_TO, help="log losses, learning rates and scores to this tracker (default: none)")
    train.add_argument("--logging-dir", type=Path, default=Path("runs"), help="folder for --report-to tensorboard's files (default: runs)")
    add_config_options(train, DataConfig, "data")
    add_config_options(train, BackboneConfig, "backbone", recipe=False)  # the recipe is chosen by the backbone
    add_config_options(train, PromptConfig, "prompt")
    add_config_options(train, TrainConfig, "training")

    run = commands.add_parser("run", help="learn a stream of tasks, one after another, into a prompt bank")
    run.add_argument("stream", type=Path, help="stream file (YAML), e.g. streams/superglue-cpu.yaml")
    run.add_argument("--out", required=True, type=Path, help="run folder: bank, accuracy matrix, metrics, log")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run.add_argument("--method", choices=list(STRATEGY_METHODS), help="run this method on every task (a prompt method, a strategy, or an Avalanche baseline)")
    run.add_argument("--seed", type=int, help="override every task's seed")
    run.add_argument("--data-dir", help="override every task's data folder (SuperGLUE files, or the CL benchmark layout)")
    run.add_argument("--backbone", help="override the stream's backbone (hub id or folder)")
    run.add_argument("--device", help="override the torch device, e.g. cuda")
    run.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="override every task's bf16 (default: each task's setting; "
                                                                          "unset there, bf16 where the device computes it natively)")
    run.add_argument("--report-to", default="none", choices=REPORT_TO, help="log losses, learning rates, scores and the accuracy matrix to "
                                                                          "this tracker (default: none; tensorboard writes to OUT/tracking)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")

    compare = commands.add_parser("compare", help="compare finished runs of one stream: table (mean ± std over seeds) and plots")
    compare.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.json), e.g. runs/cpu-rpt-*")
    compare.add_argument("--out", required=True, type=Path, help="folder for comparison.csv, comparison.md and the PNG plots")

    bank = commands.add_parser("bank", help="query a prompt bank")
    bank_commands = bank.add_subparsers(dest="bank_command", required=True)
    ls = bank_commands.add_parser("ls", help="list the bank's tasks")
    ls.add_argument("bank", type=Path, help="bank folder (a run's bank/)")
    show = bank_commands.add_parser("show", help="print an entry's metadata, config and metrics")
    show.add_argument("bank", type=Path)
    show.add_argument("task")
    pred = bank_commands.add_parser("predict", help="predict with a stored prompt (the task's, or the one each row is routed to); writes JSONL")
    pred.add_argument("bank", type=Path)
    pred.add_argument("task", nargs="?", help="answer every row with this task's entry (same as --task)")
    pred.add_argument("--task", dest="task_option", metavar="TASK", help="answer every row with this task's entry (default: route each row to an entry)")
    pred.add_argument("--input", required=True, type=Path,
                      help="rows in the task's own format (SuperGLUE jsonl; custom: csv/tsv/jsonl); without --task a jsonl file, "
                           "whose rows may belong to different tasks")
    pred.add_argument("--router", default="mahalanobis", choices=["mahalanobis", "prototype", "confidence"],
                      help="how rows are routed without --task (see continual_rpt.routing)")
    pred.add_argument("--output", type=Path, help="JSONL file to write (default: standard output)")
    pred.add_argument("--backbone", help="backbone to load instead of the one the entry names (must have the same weights)")
    pred.add_argument("--device", default="auto", help="torch device (default: auto, cuda where there is one, else cpu)")
    pred.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                      help="score in bf16 where each entry was evaluated so; --no-bf16: in fp32 (route features keep each "
                           "entry's recorded precision)")
    pred.add_argument("--server", metavar="URL", help="answer through a running `crpt serve` at URL (its backbone, device and router; "
                                                      "BANK gives the task definitions only), e.g. http://127.0.0.1:8000")
    export = bank_commands.add_parser("export", help="write an entry as a PEFT prompt-tuning adapter (seq2seq, and decoders without BOS)")
    export.add_argument("bank", type=Path)
    export.add_argument("task")
    export.add_argument("--format", default="peft", choices=["peft"], help="adapter format")
    export.add_argument("--out", required=True, type=Path, help="adapter folder to create")
    index = bank_commands.add_parser("index-routes", help="add route state to entries made before routing existed, from their training data")
    index.add_argument("bank", type=Path)
    index.add_argument("--data-dir", help="folder of the SuperGLUE or CL benchmark files the entries trained on (default: as they recorded)")
    index.add_argument("--base-dir", type=Path, help="folder that custom tasks' relative paths start from (default: the working directory)")
    index.add_argument("--backbone", help="backbone to load instead of the one the entries name (must have the same weights)")
    index.add_argument("--device", default="auto", help="torch device (default: auto, cuda where there is one, else cpu)")
    add = bank_commands.add_parser("add", help="add an entry folder written by `crpt train --out` to a bank as a new entry")
    add.add_argument("bank", type=Path, help="bank folder (created if missing)")
    add.add_argument("entry", type=Path, help="the folder `crpt train --out` wrote")
    add.add_argument("--name", help="entry name (default: the entry's own, its task's)")
    imp = bank_commands.add_parser("import", help="add a PEFT prompt-tuning adapter to a bank as a new entry")
    imp.add_argument("bank", type=Path, help="bank folder (created if missing)")
    imp.add_argument("adapter", type=Path, help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    imp.add_argument("--task", required=True, help="the SuperGLUE task the adapter answers")
    imp.add_argument("--name", help="entry name (default: the task's)")
    imp.add_argument("--data-dir", help="the task's data: its training inputs give the entry route state (default: none, not routed to)")
    imp.add_argument("--max-length", type=int, default=256, help="longest input, prompt included")
    imp.add_argument("--backbone", help="base model to load instead of the adapter's base_model_name_or_path (same weights)")
    imp.add_argument("--device", default="auto", help="torch device (default: auto, cuda where there is one, else cpu)")
    add_serve_parser(commands)
    return parser


def add_serve_parser(commands) -> None:
    """`crpt serve BANK`'s options (the limits' defaults live in serving.limits, which needs no web stack)."""
    from continual_rpt.serving.limits import Limits

    serve = commands.add_parser("serve", help="serve a bank over HTTP (FastAPI + uvicorn; needs pip install 'continual-rpt[serve]')")
    serve.add_argument("bank", type=Path, help="bank folder; entries added to it while serving are answered as they land")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; 0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes on the port, each loading the backbone once (default: 1)")
    serve.add_argument("--router", default="mahalanobis", choices=["mahalanobis", "prototype", "confidence"],
                       help="how rows without a task are routed (see continual_rpt.routing)")
    serve.add_argument("--backbone", help="backbone to load instead of the one the entries name (must have the same weights)")
    serve.add_argument("--device", default="auto", help="torch device (default: auto, cuda where there is one, else cpu)")
    add_config_options(serve, Limits, "limits", recipe=False)


def cmd_train(args: argparse.Namespace) -> int:
    """Train one task, collapse, write the entry folder and print its scores."""
    from continual_rpt import distributed, tracking
    from continual_rpt.backbones import check_device
    from continual_rpt.learner import train_task
    from continual_rpt.run import hub_bars
    from continual_rpt.strategies import METHODS, SINGLE_TASK_METHODS
    from continual_rpt.strategies.base import entry_for, measure_test
    from continual_rpt.streams import load_data

    if args.out.exists():  # checked again when writing, under a lock: another training may take --out meanwhile
        raise FileExistsError(f"{args.out} already exists; choose another --out (nothing was overwritten)")
    method = getattr(args, "method", None)  # unset: the recipe's or PromptConfig's
    if method in METHODS and method not in SINGLE_TASK_METHODS:  # one vocabulary with crpt run, one task here
        raise ValueError(f"--method {method!r} learns a stream of tasks: use crpt run STREAM --method {method}; "
                         f"crpt train takes {', '.join(SINGLE_TASK_METHODS)}")
    backbone_cfg, spec = train_configs(args)
    tracking.check_report_to(args.report_to)
    data = load_data(spec, Path.cwd())
    rank, _ = distributed.setup(check_device(backbone_cfg.device))  # first: under accelerate launch on GPUs, each process gets its own
    with hub_bars(args.progress):
        backbone = backbone_cfg.load()
    config = {"backbone": dataclasses.asdict(backbone_cfg), "prompt": dataclasses.asdict(spec.prompt), "train": dataclasses.asdict(spec.train)}
    with tracking.session(args.report_to, args.logging_dir, spec.name, config):
        trained = train_task(backbone, data, spec.prompt, spec.train, args.progress and rank == 0)
        measured = measure_test(backbone, data, spec.train, trained)
        tracking.log({f"{spec.name}/test/{k}": v for k, v in measured.metrics.get("test", {}).items()})
    if rank != 0:  # under `accelerate launch` every process holds the same result; one writes it
        return 0
    entry_for(spec, data, backbone, backbone_cfg, trained, measured=measured).save_pretrained(args.out, overwrite=False)
    m = trained.metrics
    test = ", ".join(f"{k} {v:.1f}" for k, v in measured.metrics.get("test", {}).items()) or "(no test split)"
    print(f"{m['task']} ({m['method']}): dev {m['dev_score']:.1f}  test {test}")
    print(f"trainable {m['trainable_parameters']:,}  stored {m['stored_parameters']:,}  "
          f"{m['train_examples_per_second']:.1f} train ex/s  {m['wall_seconds']:.0f} s  -> {args.out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Learn a stream into a bank and print the summary table."""
    from continual_rpt.run import run_stream, summary_table
    from continual_rpt.strategies import with_method
    from continual_rpt.streams import load_stream

    stream = load_stream(args.stream, args.data_dir, args.backbone)
    if args.method:
        stream = with_method(stream, args.method)
    for spec in stream.tasks:
        if args.seed is not None:
            spec.train = dataclasses.replace(spec.train, seed=args.seed)
        if args.bf16 is not None:
            spec.train = dataclasses.replace(spec.train, bf16=args.bf16)
    if args.device:
        stream.backbone = dataclasses.replace(stream.backbone, device=args.device)
    try:
        metrics = run_stream(stream, args.out, resume=args.resume, progress=args.progress, report_to=args.report_to)
    except KeyboardInterrupt:
        print(f"\ncrpt: interrupted; finished tasks are in {args.out}/bank. Continue with: crpt run {args.stream} --out {args.out} --resume",
              file=sys.stderr)
        return 130
    if metrics is None:  # a non-main process of `accelerate launch`: the main one prints
        return 0
    print(summary_table(metrics))
    print(f"run folder: {args.out}  (bank: {args.out}/bank)")
    return 0


def cmd_bank(args: argparse.Namespace) -> int:
    """`crpt bank ls|show|predict|index-routes|export|import|add`."""
    from continual_rpt.bank import PromptBank

    if args.bank_command == "import":
        return import_adapter(args)
    if args.bank_command == "add":
        return add_entry(args)
    bank = PromptBank.open(args.bank)
    if args.bank_command == "export":
        from continual_rpt.peft_format import export_peft

        export_peft(bank.get(args.task), str(args.bank / args.task), args.out)
        print(f"wrote {args.out} (PEFT prompt tuning: PeftModel.from_pretrained(base, {str(args.out)!r}))")
        return 0
    if args.bank_command == "index-routes":
        from continual_rpt.routing import routable
        from continual_rpt.strategies.base import index_routes

        missing = routable(bank)[1]
        if not missing:
            print(f"{args.bank}: every entry holds route state already; nothing to do")
            return 0
        done = index_routes(bank, entry_backbone(bank.get(missing[0]), args), args.data_dir, args.base_dir)
        print(f"added route state to {len(done)} entries of {args.bank}: {', '.join(done)}")
        return 0
    if args.bank_command == "ls":
        entries = [(name, bank.get(name)) for name in bank.tasks()]
        # Columns as wide as their longest value plus two, so linear-probe, deep-rpt and long task names stay aligned.
        task_width = max([4, *(len(name) for name, _ in entries)]) + 2
        method_width = max([6, *(len(entry.meta["method"]) for _, entry in entries)]) + 2
        print(f"{'task':<{task_width}}{'method':<{method_width}}{'tokens':>7}{'test':>8}  backbone")
        for name, entry in entries:
            m = entry.meta
            test = entry.metrics.get("test_score")  # none where the entry was stored unmeasured (a shared prompt's final state)
            print(f"{name:<{task_width}}{m['method']:<{method_width}}{m['prompt_tokens']:>7}"
                  f"{'—' if test is None else f'{test:.1f}':>8}  {m['backbone']['name']}")
        return 0
    if args.bank_command == "show":
        from continual_rpt.strategies.base import shown_meta

        entry = bank.get(args.task)
        meta = shown_meta(entry.meta, bank.path / args.task)
        print(json.dumps({"entry": meta, "config": entry.config, "metrics": {k: v for k, v in entry.metrics.items() if k != "history"}},
                         indent=2, sort_keys=True))
        return 0
    return predict_file(bank, args)


def import_adapter(args: argparse.Namespace) -> int:
    """`crpt bank import BANK ADAPTER --task T`: a PEFT prompt-tuning adapter as a new bank entry."""
    from continual_rpt.backbones import load_backbone
    from continual_rpt.bank import PromptBank
    from continual_rpt.peft_format import import_peft, read_peft
    from continual_rpt.tasks import get_task, load_task_data

    PromptBank.check_creatable(args.bank)  # a folder that is not a bank is refused before anything is loaded
    config, _ = read_peft(args.adapter)  # refuse a LoRA or prefix adapter before loading any weights
    base = args.backbone or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{args.adapter / 'adapter_config.json'}: no base_model_name_or_path; give --backbone")
    task = get_task(args.task)
    data = load_task_data(task.name, args.data_dir, max_train=2000, seed=0) if args.data_dir else None
    name = args.name or task.name
    warn_named_backbone(base, args.backbone, "the adapter's base_model_name_or_path")
    entry = import_peft(args.adapter, task, name, load_backbone(base, "auto", args.device), data, args.max_length)
    PromptBank.open(args.bank, create=True).add(name, entry)
    print(f"added {name} to {args.bank} ({entry.prompt.shape[0]} virtual tokens, "
          f"{'with' if entry.route is not None else 'without'} route state)")
    return 0


def add_entry(args: argparse.Namespace) -> int:
    """`crpt bank add BANK FOLDER`: a `crpt train --out` folder as a new bank entry; nothing already in the bank is touched."""
    from continual_rpt.bank import Entry, PromptBank, check_name

    PromptBank.check_creatable(args.bank)  # a folder that is not a bank is refused before anything is read or written
    entry = Entry.from_pretrained(args.entry)  # safetensors and JSON only; anything else in the folder is refused
    name = check_name(args.name or entry.meta.get("name") or entry.meta.get("task"))
    PromptBank.open(args.bank, create=True).add(name, dataclasses.replace(entry, meta={**entry.meta, "name": name}))
    print(f"added {name} to {args.bank} ({entry.meta.get('method')}, {entry.meta.get('task')}, "
          f"{'with' if entry.route is not None else 'without'} route state)")
    return 0


def entry_backbone(entry, args: argparse.Namespace):
    """The backbone an entry was trained on (or --backbone), with the pooling its head reads; one the bank alone names is warned of."""
    from continual_rpt.backbones import load_backbone

    name = args.backbone or entry.meta["backbone"]["name"]
    warn_named_backbone(name, args.backbone, "the bank's entries")
    return load_backbone(name, entry.pooling, args.device)


def warn_named_backbone(name: str, given: str | None, source: str) -> None:
    """Warn (stderr, before loading) when a file from elsewhere, not the user, picks which model loads."""
    from continual_rpt.backbones import EMBEDDED

    if name not in (EMBEDDED, given):
        print(f"crpt: warning: loading backbone {name!r}, named by {source} (neither the embedded one nor --backbone); "
              "only its safetensors weights are read. Give --backbone to choose the model yourself", file=sys.stderr)


def predict_file(bank, args: argparse.Namespace) -> int:
    """`crpt bank predict`: each --input row answered by the task's entry, or the entry it is routed to (bank_predict)."""
    if args.server:
        if not args.bf16:
            raise ValueError("--no-bf16 chooses how this process scores; a server scores each entry as it was evaluated (give one)")
        from continual_rpt.serving.remote import predict_file_remote

        return predict_file_remote(bank, args)
    from continual_rpt.bank_predict import predict_file as predict

    return predict(bank, args, lambda entry: entry_backbone(entry, args))


def cmd_serve(args: argparse.Namespace) -> int:
    """`crpt serve BANK`: the bank over HTTP until interrupted (continual_rpt.serving.app)."""
    from continual_rpt.bank import PromptBank
    from continual_rpt.serving.limits import Limits

    PromptBank.open(args.bank)  # a folder that is not a bank is one line here, not a traceback in every worker
    limits = config_from_args(Limits, args)  # a bad limit is one line here too
    try:
        from continual_rpt.serving.app import serve
    except ImportError as err:
        raise ValueError(f"crpt serve needs the serve extra: pip install 'continual-rpt[serve]' ({err})") from err
    serve(args.bank, args.host, args.port, args.workers, backbone=args.backbone, device=args.device, router=args.router,
          **dataclasses.asdict(limits))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """`crpt compare RUN... --out DIR` (pandas and matplotlib load only here)."""
    from continual_rpt import report

    return report.command(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `crpt` console script."""
    from continual_rpt import errors

    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "run": cmd_run, "bank": cmd_bank, "compare": cmd_compare, "serve": cmd_serve}[args.command](args)
    except errors.EXPECTED as err:
        return errors.report(err, args.debug)


if __name__ == "__main__":
    sys.exit(main())
