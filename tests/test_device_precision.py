"""Device and precision by default: `device: auto` and bf16 where the hardware computes it natively, both recorded.

(`--device cuda` on a machine without one, a one-line error and exit 2 with nothing written, is
tests/test_cli_errors.py's `device` case.)
"""

import json

import torch
import yaml
from crash import killed

from continual_rpt.backbones import BF16_CPU_FLAGS, check_device, device_bf16, load_backbone, native_bf16
from continual_rpt.bank import PromptBank
from continual_rpt.cli import main
from continual_rpt.learner import TrainConfig, train_task
from continual_rpt.streams import load_data, load_stream


def auto_stream(tmp_path, tiny_bert_dir, superglue_dir, tasks, **train):
    """A tiny stream that names no device and no precision: both are `auto`."""
    doc = {"name": "tiny", "backbone": {"backbone": str(tiny_bert_dir)}, "data": {"data_dir": str(superglue_dir), "max_train": 16},
           "prompt": {"n_tokens": 3, "bottleneck": 8}, "train": {"epochs": 1, "batch_size": 8, "max_length": 96, **train}, "tasks": tasks}
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_precision_is_bf16_only_where_the_hardware_computes_it():
    # Checked to fail with the old default (bf16 everywhere): a CPU without the flags, a GPU that only emulates bf16.
    assert not native_bf16("cpu", frozenset({"avx2", "avx512f", "avx512_vnni"}), cuda_bf16=False)
    for flag in BF16_CPU_FLAGS:
        assert native_bf16("cpu", frozenset({"avx512f", flag}), cuda_bf16=False)
    assert native_bf16("cuda", frozenset(), cuda_bf16=True)
    assert not native_bf16("cuda", frozenset({"avx512_bf16"}), cuda_bf16=False)  # the GPU computes, not the CPU
    assert not native_bf16("mps", frozenset({"amx_bf16"}), cuda_bf16=True)


def test_auto_device_and_precision_are_recorded_and_a_killed_run_resumes(tmp_path, tiny_bert_dir, superglue_dir, capsys):
    stream, run = auto_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB", "COPA"]), tmp_path / "run"
    killed(["run", stream, "--out", run, "--no-progress"], "run.task-done")  # a real SIGKILL after the first task's row
    asked = json.loads((run / "stream.json").read_text())
    assert asked["backbone"]["device"] == "auto" and {t["train"]["bf16"] for t in asked["tasks"]} == {None}  # what was asked
    assert main(["run", str(stream), "--out", str(run), "--resume", "--no-progress"]) == 0

    device = check_device("auto")
    assert device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device_bf16(device)  # this machine: avx512_bf16, so bf16 (fails if auto were recorded unresolved)
    bank = PromptBank.open(run / "bank")
    for name in ("CB", "COPA"):
        entry = bank.get(name)
        assert (entry.meta["device"], entry.meta["precision"]) == (str(device), "bf16" if bf16 else "fp32")
        assert entry.config["train"]["bf16"] is bf16 and entry.config["backbone"]["device"] == "auto"
    per_task = json.loads((run / "metrics.json").read_text())["per_task"]
    assert {(t["device"], t["precision"]) for t in per_task.values()} == {(str(device), "bf16" if bf16 else "fp32")}
    assert f"device {device} (asked: auto)" in (run / "log.txt").read_text()

    # A run folder from before these defaults stored them decided (device cpu, bf16 true): it resumes where auto picks
    # the same (without run._decided it is refused: cpu and true differ from auto and unset as written).
    decided = [{**t, "train": {**t["train"], "bf16": bf16}} for t in asked["tasks"]]
    (run / "stream.json").write_text(json.dumps({**asked, "backbone": {**asked["backbone"], "device": str(device)}, "tasks": decided}))
    assert main(["run", str(stream), "--out", str(run), "--resume", "--no-progress"]) == 0

    # stream.json holds what was asked, so a resume asking for something else is refused, naming what differs.
    capsys.readouterr()
    assert main(["run", str(stream), "--out", str(run), "--resume", "--bf16" if not bf16 else "--no-bf16", "--no-progress"]) == 2
    assert "differs in: tasks" in capsys.readouterr().err


def test_crpt_run_no_bf16_trains_in_fp32(tmp_path, tiny_bert_dir, superglue_dir):
    stream = auto_stream(tmp_path, tiny_bert_dir, superglue_dir, ["CB"])
    assert main(["run", str(stream), "--out", str(tmp_path / "run"), "--no-bf16", "--no-progress"]) == 0
    entry = PromptBank.open(tmp_path / "run" / "bank").get("CB")
    assert entry.config["train"]["bf16"] is False and entry.meta["precision"] == "fp32"

    # Trained in fp32 indeed: the run's losses are those of the task trained in fp32, not bf16 (checked: they differ).
    spec = load_stream(stream).tasks[0]
    data, backbone = load_data(spec, stream.parent), load_backbone(str(tiny_bert_dir))
    losses = {bf16: [h["train_loss"] for h in train_task(backbone, data, spec.prompt, TrainConfig(**{**vars(spec.train), "bf16": bf16})).history]
              for bf16 in (False, True)}
    assert [h["train_loss"] for h in entry.metrics["history"]] == losses[False] != losses[True]
