"""Heads in bf16 (what the library does under autocast) against heads in fp32: how much the scores move.

Under `train.bf16` (the default) a head's weights are fp32 and trained in fp32 by AdamW, but its
linear layer runs inside autocast, so its matmul is bf16. This script trains the first tasks of
the main job (`streams/superglue-cpu.yaml`: CB, then COPA; embedded backbone, the stream's recipe and
seed) twice on the same data and seed, once as the library does and once with the head computed in
fp32 (autocast off inside the head, its input cast up), and records per task:
    trained bf16 / trained fp32     dev and test scores of each training
    rescored                        the bf16-trained prompt and head scored on test with the head in fp32:
                                    how many predictions change, and the largest logit difference

    OMP_NUM_THREADS=1 python experiments/head_precision.py --data-dir ../shared/data/superglue \
        --out experiments/results/head_precision

It takes about two minutes at one thread; the CPU's name and flags (native bf16 or not) go in the record.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from grid import machine_description  # noqa: E402

from continual_rpt.evaluation import option_scores  # noqa: E402
from continual_rpt.learner import train_task  # noqa: E402
from continual_rpt.strategies.base import measure_test  # noqa: E402
from continual_rpt.streams import load_data, load_stream  # noqa: E402

STREAM = Path(__file__).resolve().parents[1] / "streams" / "superglue-cpu.yaml"
TASKS = ("CB", "COPA")


class Fp32Linear(nn.Linear):
    """A linear head that computes in fp32 even inside bf16 autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer in fp32, whatever autocast is active."""
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def fp32_head(head: nn.Linear) -> Fp32Linear:
    """The same head (same weights), computed in fp32."""
    copy = Fp32Linear(head.in_features, head.out_features, device=head.weight.device)
    copy.load_state_dict(head.state_dict())
    return copy


def cpu_flags() -> list[str]:
    """The CPU flags that decide how bf16 runs: native bf16 (avx512_bf16, amx_bf16) or emulated."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith(("avx512f", "amx", "avx2")))


def measure(backbone, spec, data) -> dict:
    """Train `spec` with a bf16 head and with an fp32 head; rescore the bf16-trained head in fp32."""
    new_head = backbone.new_head
    trained = {"bf16": train_task(backbone, data, spec.prompt, spec.train)}
    tests = {"bf16": measure_test(backbone, data, spec.train, trained["bf16"]).metrics["test_score"]}
    backbone.new_head = lambda task: fp32_head(new_head(task))  # same seed, same initial weights, fp32 compute
    try:
        trained["fp32"] = train_task(backbone, data, spec.prompt, spec.train)
        tests["fp32"] = measure_test(backbone, data, spec.train, trained["fp32"]).metrics["test_score"]  # through its fp32 head
    finally:
        del backbone.new_head
    result = {f"trained_{k}": {"dev": t.metrics["dev_score"], "test": tests[k], "steps": t.metrics["steps"]}
              for k, t in trained.items()}
    head = new_head(data.task)
    head.load_state_dict(trained["bf16"].head)
    features = backbone.featurize(data.test, spec.train.max_length - spec.prompt.n_tokens)
    prompt = trained["bf16"].prompt
    low, high = (option_scores(backbone, prompt, h, features, spec.train.eval_batch_size, bf16=True) for h in (head, fp32_head(head)))
    finite = [(a[a.isfinite()], b[b.isfinite()]) for a, b in zip(low, high)]
    rescored = [int(s.argmax()) for s in high]
    result["rescored_fp32"] = {
        "test": data.task.score(data.test, rescored)["score"],
        "predictions_changed": sum(int(a.argmax()) != int(b.argmax()) for a, b in zip(low, high)),
        "examples": len(features),
        "max_abs_logit_difference": max(float((a - b).abs().max()) for a, b in finite),
    }
    return result


def main() -> None:
    """Measure, print, and write head_precision.json and .md under --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    stream = load_stream(STREAM, data_dir=args.data_dir)
    backbone = stream.backbone.load()
    start = time.perf_counter()
    tasks = {spec.name: measure(backbone, spec, load_data(spec, stream.base_dir)) for spec in stream.tasks if spec.name in TASKS}
    record = {"machine": machine_description(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
              "seconds": round(time.perf_counter() - start, 1), "tasks": tasks}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head_precision.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"Heads in bf16 vs fp32 ({record['machine']}; flags {' '.join(record['cpu_flags'])}; torch {record['torch']}; "
             f"{record['seconds']} s)", "",
             "| task | test, bf16 head | test, fp32 head | dev bf16 / fp32 | bf16-trained head rescored in fp32: test, changed predictions | max logit difference |",
             "|---|---:|---:|---|---|---:|"]
    for name, r in tasks.items():
        b, f, s = r["trained_bf16"], r["trained_fp32"], r["rescored_fp32"]
        lines.append(f"| {name} | {b['test']:.1f} | {f['test']:.1f} | {b['dev']:.1f} / {f['dev']:.1f} | "
                     f"{s['test']:.1f}, {s['predictions_changed']} of {s['examples']} | {s['max_abs_logit_difference']:.3g} |")
    (args.out / "head_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
