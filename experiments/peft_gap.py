"""Why `ours: pt, fp32, random batches` trains faster than `peft: pt, fp32, random batches` (benchmark section 4).

    HF_HUB_OFFLINE=1 python experiments/peft_gap.py [--repeats 3] [--out experiments/results/peft_gap.json]

peft's side is switched one thing at a time towards ours (dropout off via eval mode, attention
dropout alone off, eager attention) on section 4's examples and random batches, and the fair peft
side of section 4 (bf16 where native, length-grouped) likewise, all sides
alternating within each repeat; each ratio is the median of within-repeat t(side)/t(peft).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from continual_rpt.backbones.base import BF16_CPU_FLAGS, cpu_flags

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("benchmark", HERE / "benchmark.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["benchmark"] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)


def peft_variant(backbone, examples, batches, max_tokens, *, eval_mode=False, eager=False, attention_dropout=True, fair=False):
    """section 4's peft side (plain, or `fair`: bf16 where native, length-grouped) with one switch changed."""
    model = bench.peft_model(backbone)
    base = model.get_base_model()
    if eager:
        base.set_attn_implementation("eager")
    if not attention_dropout:  # hidden dropout stays; only the attention probabilities' dropout goes
        for module in base.modules():
            if type(module).__name__.endswith("SelfAttention"):  # BERT passes self.dropout.p to the kernel
                module.dropout.p = 0.0
    if eval_mode:  # peft_side calls model.train() before each pass; keep eval mode (every dropout off)
        model.train = lambda mode=True: torch.nn.Module.train(model, False)
    return bench.peft_side(backbone, model, examples, batches, max_tokens, fair=fair)


def main() -> None:
    """Time each variant against plain peft and ours, write the numbers as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "peft_gap.json")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    sizes = bench.Sizes(repeats=args.repeats)
    backbone = bench.load_backbone("embedded")
    examples = bench.rte_sample(sizes)
    max_tokens = sizes.max_length - bench.N_TOKENS
    batches = bench.random_batches(len(examples), sizes.batch)
    sides = {
        "peft plain (train mode, SDPA)": peft_variant(backbone, examples, batches, max_tokens),
        "peft, attention dropout off (hidden dropout on)": peft_variant(backbone, examples, batches, max_tokens, attention_dropout=False),
        "peft, eval mode (all dropout off)": peft_variant(backbone, examples, batches, max_tokens, eval_mode=True),
        "peft, train mode, eager attention": peft_variant(backbone, examples, batches, max_tokens, eager=True),
        "ours: pt, fp32, random batches": bench.comparison_side("ours: pt, fp32, random batches", backbone, examples, sizes),
        "fair peft (bf16 where native, grouped, SDPA, train mode)": peft_variant(backbone, examples, batches, max_tokens, fair=True),
        "fair peft, eager attention": peft_variant(backbone, examples, batches, max_tokens, fair=True, eager=True),
        "fair peft, eager attention, eval mode": peft_variant(backbone, examples, batches, max_tokens, fair=True, eager=True, eval_mode=True),
    }
    seconds = bench.alternate(sides, sizes.batches, sizes.repeats, backbone.device)
    plain = seconds["peft plain (train mode, SDPA)"]
    result = {"threads": torch.get_num_threads(), "cpu_flags_bf16": sorted(cpu_flags() & set(BF16_CPU_FLAGS)),
              "load_average": Path("/proc/loadavg").read_text().split()[:3], "examples": len(examples),
              "batch": sizes.batch, "max_length": sizes.max_length, "cpus": os.cpu_count(), "sides": {}}
    for name, times in seconds.items():
        result["sides"][name] = {"examples_per_s": len(examples) / bench.median(times),
                                 "speed_vs_peft_plain": bench.paired_ratio(plain, times), "seconds": times}
        print(f"{name}: {len(examples) / bench.median(times):.1f} examples/s, {bench.paired_ratio(plain, times):.2f}x peft plain", flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
