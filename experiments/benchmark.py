"""Speed, padding, memory and latency of continual-rpt's training and inference paths.

    HF_HUB_OFFLINE=1 python experiments/benchmark.py                 # everything, ~15 min on 2 cores
    HF_HUB_OFFLINE=1 python experiments/benchmark.py --quick         # tiny sizes: checks the script runs
    HF_HUB_OFFLINE=1 python experiments/benchmark.py --sections 2,4  # rerun some sections only

Sections: 1 matmul peak, 2 training throughput and FLOP/s, 3 padding share, 4 against the `peft`
package, 5 cost of Φ, 6 inference and prompt length, 7 bank query latency, 8 the same on a GPU
with a T5-Base-sized model, 9 attention kernels and a profile of a step, 10 torch.compile, 11 the
decoder-only family against peft and its candidate ranking, 12 deep prompts against shallow ones.
Each figure is the median over `--repeats`; the sides of a comparison
run alternately within each repeat (in a rotating order) so that machine drift hits all of them.
Results go to `<out>/performance.md` and the raw numbers to `<out>/performance.json`; a partial
rerun replaces only the sections it ran.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the cold-start breakdown of section 7 counts imports from here

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from continual_rpt.backbones import BackboneConfig, load_backbone, resolve_backbone
from continual_rpt.backbones.base import device_bf16
from continual_rpt.bank import PromptBank
from continual_rpt.evaluation import length_batches, predict_features, predict_from_bank
from continual_rpt.learner import TrainConfig, TrainedTask, build_prompt, make_optimizer
from continual_rpt.learner import train_step as learner_step
from continual_rpt.prompts import PromptConfig
from continual_rpt.strategies.base import entry_for
from continual_rpt.streams import DataConfig, TaskSpec
from continual_rpt.tasks import get_task, load_task_data, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CRPT_SHARED_DATA", ROOT.parent / "shared" / "data"))
SUPERGLUE, FEWGLUE = SHARED / "superglue", SHARED / "fewglue"
SEED = 0  # prompt init, head init, data order and samples
N_TOKENS = 10
TRAIN_TASKS = ["RTE", "CB", "WiC", "COPA"]
PADDING_TASKS = ["CB", "COPA", "MultiRC", "RTE", "WiC", "WSC"]  # the ones with an official train file here
FEWSHOT_TASKS = ["BoolQ", "ReCoRD"]  # only FewGLUE's 32-example train file exists for these


@dataclasses.dataclass
class Sizes:
    """How much work each section does; the full sizes fit ~15 minutes on 2 CPU cores."""

    repeats: int = 5
    batch: int = 16  # training batch size
    batches: int = 6  # training batches per side and repeat
    max_length: int = 256
    matmul: tuple = (1024, 2048)
    gpu_matmul: tuple = (4096, 8192)
    infer_examples: int = 128
    padding_cap: int = 0  # examples per task in section 3 (0: all)
    memory_sides: int = 6  # section 4 sides measured for memory, each in its own process
    warm_queries: int = 20
    long_n: int = 100  # the long prompt of section 6
    threads: int = 0  # torch threads (0: torch's default)
    t5: tuple = (768, 3072, 12, 12, 64)  # d_model, d_ff, layers, heads, d_kv: T5-Base
    decoder: tuple = (384, 6, 6)  # GPT-2 width, layers, heads of section 11 (MiniLM-sized)


QUICK = Sizes(repeats=2, batch=4, batches=1, max_length=64, matmul=(256, 512), gpu_matmul=(1024,), infer_examples=16,
              padding_cap=300, memory_sides=2, warm_queries=3, long_n=30, threads=1,
              t5=(64, 128, 2, 4, 16), decoder=(64, 2, 2))


# -----------------------------------------------------------------------------
# timing helpers


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(sides: dict, k: int, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per repeat of each side's `run(k)`, the sides interleaved in a rotating order."""
    names = list(sides)
    for name in names:  # warm-up: first-call allocations, kernel selection, lazy inits
        sides[name](1)
    seconds = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            tick = time.perf_counter()
            skipped = sides[name](k)
            sync(device)
            seconds[name].append(time.perf_counter() - tick)
            if skipped:  # train_task skips a non-finite step's backward, so this timing covers less work
                print(f"warning: {name}: {skipped} step(s) with a non-finite loss were skipped", flush=True)
    return seconds


def median(values) -> float:
    """Median of a non-empty sequence."""
    return statistics.median(list(values))


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a[r] / b[r]: a within-run ratio, robust to drift between repeats."""
    return median(x / y for x, y in zip(a, b))


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


# -----------------------------------------------------------------------------
# data: real SuperGLUE examples and the batches the library would form


_examples: dict[str, list] = {}


def train_examples(name: str) -> list:
    """The full official training split of a task (cached)."""
    if name not in _examples:
        _examples[name] = load_task_data(name, SUPERGLUE).train
    return _examples[name]


def random_batches(n: int, size: int) -> list[list[int]]:
    """Seeded shuffled batches, the plain way (each padded to its longest sequence)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


def buckets(features: list, size: int) -> list[list[int]]:
    """The library's seeded length-bucketed batch order (what `train_task` trains on)."""
    return length_batches(features, size, torch.Generator().manual_seed(SEED))


def bucketed(backbone, examples: list, sizes: Sizes) -> tuple[list, list[list[int]]]:
    """Features at n=10 and the first `sizes.batches` of the library's length-bucketed batches."""
    features = backbone.featurize(examples, sizes.max_length - N_TOKENS)
    return features, buckets(features, sizes.batch)[: sizes.batches]


def rte_sample(sizes: Sizes) -> list:
    """A fixed random sample of RTE training examples, `sizes.batches` batches' worth (section 4)."""
    examples = train_examples("RTE")
    return [examples[i] for i in sorted(random.Random(SEED).sample(range(len(examples)), sizes.batches * sizes.batch))]


# -----------------------------------------------------------------------------
# our training step: exactly what `learner.train_task` does per step


def make_learner(backbone, task, method: str = "rpt", n_tokens: int = N_TOKENS):
    """A fresh prompt (P and Φ), head and AdamW optimizer, built as `train_task` builds them."""
    cfg = TrainConfig(seed=SEED)
    prompt = build_prompt(backbone, PromptConfig(method=method, n_tokens=n_tokens), cfg.seed)
    torch.manual_seed(cfg.seed)
    head = backbone.new_head(task)
    return prompt, head, make_optimizer(prompt, [head], cfg)


def train_step(backbone, learner, batch_features: list, bf16: bool) -> bool:
    """The learner's own step (collate → loss(Φ(P), head) → backward → AdamW); False if it was dropped as non-finite."""
    prompt, head, optimizer = learner
    applied, _ = learner_step(backbone, prompt, head, batch_features, optimizer, bf16)
    return applied


def our_side(backbone, learner, features: list, batches: list[list[int]], bf16: bool):
    """A side for `alternate`: run(k) trains on the first k batches and returns the skipped steps."""
    def run(k: int) -> int:
        return sum(not train_step(backbone, learner, [features[i] for i in ids], bf16) for ids in batches[:k])
    return run


def step_flops(backbone, task, batch_features: list) -> tuple[float, float]:
    """Forward and backward FLOPs of one training step on this batch, counted by FlopCounterMode.

    The counter sees every matmul (the frozen linear layers' backward computes only input
    gradients, no weight gradients), but not CPU SDPA attention: where no SDPA op was counted
    on an encoder, the attention matmuls are added analytically (QKᵀ and PV: 4·S·T²·d per
    layer forward, twice that backward, since both operands of each need a gradient).
    """
    prompt, head, _ = make_learner(backbone, task)
    batch = backbone.collate(batch_features)
    with FlopCounterMode(display=False) as forward:
        loss = backbone.loss(prompt(), head, batch)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    fwd, bwd = forward.get_total_flops(), backward.get_total_flops()
    counted = " ".join(str(op) for op in forward.get_flop_counts().get("Global", {}))
    if backbone.family == "encoder" and "scaled_dot_product" not in counted:
        cfg = backbone.model.config
        s, t = batch["input_ids"].shape
        attention = cfg.num_hidden_layers * 4 * s * (t + N_TOKENS) ** 2 * cfg.hidden_size
        fwd, bwd = fwd + attention, bwd + 2 * attention
    return float(fwd), float(bwd)


# -----------------------------------------------------------------------------
# 1. matmul peak


def matmuls(a: torch.Tensor, b: torch.Tensor, calls: int):
    """A side for `alternate`: `calls` back-to-back products a @ b."""
    def run(k: int) -> int:
        for _ in range(calls):
            torch.matmul(a, b)
        return 0
    return run


def matmul_peak(device: torch.device, sizes: tuple, repeats: int) -> tuple[dict, list[str]]:
    """GFLOP/s of torch.matmul on square fp32 and bf16 matrices; the peak is the best size."""
    sides, flops = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            tick = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            calls = max(1, int(0.2 / max(time.perf_counter() - tick, 1e-6)))  # ~0.2 s per timing
            name = f"{str(dtype).split('.')[-1]} {n}"
            sides[name] = matmuls(a, b, calls)
            flops[name] = 2 * n**3 * calls
    seconds = alternate(sides, 1, repeats, device)
    gflops = {name: flops[name] / median(seconds[name]) / 1e9 for name in sides}
    peak = {dt: max(v for k, v in gflops.items() if k.startswith(dt)) for dt in ("float32", "bfloat16")}
    md = table(["dtype, size", "GFLOP/s (median)"], [[k, f"{v:.1f}"] for k, v in gflops.items()])
    md += ["", f"Peak: **fp32 {peak['float32']:.1f} GFLOP/s, bf16 {peak['bfloat16']:.1f} GFLOP/s** "
           f"(best size; each timing is ~0.2 s of back-to-back matmuls on {device})."]
    return {"gflops": gflops, "peak_gflops": peak, "seconds": seconds}, md


# -----------------------------------------------------------------------------
# 2. training throughput and FLOP/s


def training_throughput(backbone, sizes: Sizes, peak: dict | None) -> tuple[dict, list[str]]:
    """Examples/s and FLOP/s of the library's training step on real batches, fp32 and bf16."""
    sides, work = {}, {}
    for name in TRAIN_TASKS:
        task = get_task(name)
        features, batches = bucketed(backbone, train_examples(name), sizes)
        flops = [step_flops(backbone, task, [features[i] for i in ids]) for ids in batches]
        shapes = [tuple(backbone.collate([features[i] for i in ids])["input_ids"].shape) for ids in batches]
        work[name] = {"examples": sum(map(len, batches)), "flops": sum(f + b for f, b in flops),
                      "backward_over_forward": sum(b for _, b in flops) / sum(f for f, _ in flops),
                      "input_shapes": shapes}
        for bf16 in (False, True):
            side = our_side(backbone, make_learner(backbone, task), features, batches, bf16)
            sides[f"{name} {'bf16' if bf16 else 'fp32'}"] = side
    seconds = alternate(sides, sizes.batches, sizes.repeats, backbone.device)
    results, rows = {}, []
    for name in TRAIN_TASKS:
        w = work[name]
        for dt in ("fp32", "bf16"):
            t = median(seconds[f"{name} {dt}"])
            gflops = w["flops"] / t / 1e9
            share = gflops / peak["float32" if dt == "fp32" else "bfloat16"] if peak else None
            results[f"{name} {dt}"] = {"examples_per_s": w["examples"] / t, "gflops": gflops, "peak_share": share,
                                       "seconds": seconds[f"{name} {dt}"]}
            rows.append([name, dt, f"{w['examples'] / t:.1f}", f"{gflops:.1f}", f"{share:.0%}" if share else "n/a",
                         f"{w['flops'] / w['examples'] / 1e9:.2f}"])
        speedup = paired_ratio(seconds[f"{name} fp32"], seconds[f"{name} bf16"])
        results[f"{name} bf16 speedup"] = speedup
        rows[-1].append(f"{speedup:.2f}×")
        rows[-2].append("")
    md = table(["task", "dtype", "examples/s", "GFLOP/s", "share of peak", "GFLOP/example", "bf16 speedup"], rows)
    ratio = median(w["backward_over_forward"] for w in work.values())
    md += ["", f"{sizes.batches} batches of {sizes.batch} per side and repeat: the first batches of the library's seeded "
           f"length-bucketed order over each task's full training split (max_length {sizes.max_length}, rpt n={N_TOKENS}). "
           "A step is `collate` → `loss(Φ(P), head)` under autocast → backward → AdamW, as in `train_task`. "
           "FLOPs per step: FlopCounterMode on one step of each real padded batch; it does not see CPU SDPA, so on "
           "an encoder the attention matmuls are added analytically (QKᵀ and PV, 4·S·T²·d per layer forward, twice "
           f"that backward). Measured backward/forward = {ratio:.2f}: the backbone is frozen, so its backward computes "
           "activation gradients only, no weight gradients (≈ 1× forward, not 2×). GFLOP/s counts padding as "
           "computed. Share of peak: against section 1's fp32 or bf16 matmul peak."]
    return {"tasks": results, "work": work}, md


# -----------------------------------------------------------------------------
# 3. padding share


def padding_share(features: list, batches: list[list[int]]) -> float:
    """Padded tokens / computed tokens (prompt included) when each batch pads to its longest sequence."""
    computed = real = 0
    for ids in batches:
        lengths = [len(seq) + N_TOKENS for i in ids for seq in features[i].ids]
        computed += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1 - real / computed


def padding(backbone, sizes: Sizes) -> tuple[dict, list[str]]:
    """Padding share of random batches vs the library's length buckets, on whole training splits."""
    sources = [(name, "SuperGLUE train", None) for name in PADDING_TASKS]
    sources += [(name, "FewGLUE 32-shot train", FEWGLUE / name / "train.jsonl") for name in FEWSHOT_TASKS]
    results, rows = {}, []
    for name, origin, path in sources:
        examples = train_examples(name) if path is None else read_jsonl(get_task(name), path)
        if sizes.padding_cap:
            examples = examples[: sizes.padding_cap]
        features = backbone.featurize(examples, sizes.max_length - N_TOKENS)
        shuffled = padding_share(features, random_batches(len(features), sizes.batch))
        bucket = padding_share(features, buckets(features, sizes.batch))
        sequences = [len(seq) for f in features for seq in f.ids]
        results[name] = {"origin": origin, "examples": len(features), "sequences": len(sequences),
                         "mean_tokens": sum(sequences) / len(sequences), "random": shuffled, "bucketed": bucket}
        rows.append([name, origin, len(features), len(sequences), f"{sum(sequences) / len(sequences):.0f}",
                     f"{shuffled:.0%}", f"{bucket:.1%}"])
    md = table(["task", "split", "examples", "sequences", "mean tokens", "padding, random batches",
                "padding, length buckets"], rows)
    md += ["", f"Padded tokens / computed tokens, batch {sizes.batch}, n={N_TOKENS} prompt tokens counted as computed, "
           f"sequences truncated at {sizes.max_length - N_TOKENS}; a choice task pads all its pairs together. "
           "BoolQ has no official train file here and ReCoRD neither a train nor a val file, so `load_task_data` "
           "cannot load them: both are measured on FewGLUE's 32-example train files (read with `read_jsonl`), "
           "i.e. on two batches only."]
    return results, md


# -----------------------------------------------------------------------------
# 4. against the peft package


OURS = {  # side name: (method, bf16, length buckets)
    "ours: rpt, bf16, buckets (default)": ("rpt", True, True),
    "ours: rpt, fp32, buckets": ("rpt", False, True),
    "ours: rpt, fp32, random batches": ("rpt", False, False),
    "ours: pt, fp32, random batches": ("pt", False, False),
}
PEFT = "peft: pt, fp32, random batches"
# peft as a competent user runs it: bf16 autocast where the device computes bf16 natively (else fp32),
# batches of similar length as transformers.Trainer(group_by_length=True) forms them
PEFT_FAIR = "peft: pt, bf16 where native, grouped by length"


def peft_model(backbone):
    """`peft` prompt tuning (n=10, random init) on a separate copy of the same frozen weights."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    if backbone.family == "encoder":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(resolve_backbone(backbone.name), num_labels=2, use_safetensors=True)
        task_type = TaskType.SEQ_CLS
    else:  # the random T5 of section 8 or GPT-2 of section 11: an identical copy of its weights
        model = type(backbone.model)(backbone.model.config)
        model.load_state_dict(backbone.model.state_dict())
        task_type = TaskType.CAUSAL_LM if backbone.family == "decoder" else TaskType.SEQ_2_SEQ_LM
    torch.manual_seed(SEED)
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=N_TOKENS, prompt_tuning_init=PromptTuningInit.RANDOM)
    return get_peft_model(model, config).to(backbone.device)


def peft_side(backbone, model, examples: list, batches: list[list[int]], max_tokens: int, fair: bool = False):
    """A side for `alternate` that trains `model` the way peft's docs do: pre-tokenised data,
    a padding collator per batch, model.train() (dropout on), AdamW on the trainable parameters;
    `fair`: bf16 autocast where native and Trainer's length-grouped batches instead of `batches`."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding
    from transformers.trainer_pt_utils import LengthGroupedSampler

    tok = backbone.tokenizer
    if backbone.family == "encoder":
        rows = [{**tok(*ex.pairs[0], truncation=True, max_length=max_tokens), "labels": ex.label} for ex in examples]
        collator = DataCollatorWithPadding(tok)
    elif backbone.family == "decoder":  # the context, then the gold label word; only the label word is scored
        rows = []
        for ex in examples:
            context = tok(ex.source, truncation=True, max_length=max_tokens)["input_ids"]
            answer = tok(" " + ex.candidates[ex.label], add_special_tokens=False)["input_ids"]
            rows.append({"input_ids": context + answer, "attention_mask": [1] * (len(context) + len(answer)),
                         "labels": [-100] * len(context) + answer})
        collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    else:
        rows = [{**tok(ex.source, truncation=True, max_length=max_tokens, return_token_type_ids=False),
                 "labels": tok(ex.candidates[ex.label], truncation=True, max_length=max_tokens)["input_ids"]}
                for ex in examples]
        collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "prompt_encoder" in n], "lr": 0.3, "weight_decay": 1e-5}]
    rest = [p for n, p in named if "prompt_encoder" not in n]  # the classifier, on an encoder
    if rest:
        groups.append({"params": rest, "lr": 1e-3, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, eps=1e-8)
    bf16 = fair and device_bf16(backbone.device)
    if fair:
        size = len(batches[0])
        order = list(LengthGroupedSampler(size, lengths=[len(row["input_ids"]) for row in rows],
                                          generator=torch.Generator().manual_seed(SEED)))
        batches = [order[i : i + size] for i in range(0, len(order), size)]

    def run(k: int) -> int:
        model.train()
        for ids in batches[:k]:
            batch = collator([rows[i] for i in ids]).to(backbone.device)
            with torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return 0
    return run


def comparison_side(name: str, backbone, examples: list, sizes: Sizes):
    """Build one side of section 4 on the fixed RTE sample."""
    max_tokens = sizes.max_length - N_TOKENS
    shuffled = random_batches(len(examples), sizes.batch)
    if name in (PEFT, PEFT_FAIR):
        return peft_side(backbone, peft_model(backbone), examples, shuffled, max_tokens, fair=name == PEFT_FAIR)
    method, bf16, bucketed_batches = OURS[name]
    features = backbone.featurize(examples, max_tokens)
    batches = buckets(features, sizes.batch) if bucketed_batches else shuffled
    return our_side(backbone, make_learner(backbone, get_task("RTE"), method), features, batches, bf16)


def rss_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(side: str, sizes: Sizes) -> dict:
    """In a fresh process: set one side up, then its peak RSS growth over one pass of its batches."""
    backbone = load_backbone("embedded")
    run = comparison_side(side, backbone, rte_sample(sizes), sizes)
    if side in (PEFT, PEFT_FAIR):  # peft trains its own copy of the weights; free ours so RSS counts one model
        backbone.model = None
        gc.collect()
    baseline = rss_kib("VmRSS")
    try:  # Linux: writing 5 to clear_refs resets VmHWM, so setup's transient peak is not counted
        Path("/proc/self/clear_refs").write_text("5")
        how = "VmHWM after clear_refs"
    except OSError:
        how = "ru_maxrss (includes setup peaks)"
    run(sizes.batches)
    peak = rss_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_after_setup_mib": baseline / 1024, "peak_growth_mib": (peak - baseline) / 1024,
            "peak_rss_mib": peak / 1024, "how": how}


def compare_peft(backbone, sizes: Sizes, args) -> tuple[dict, list[str]]:
    """Our training step against peft's prompt tuning: same examples, n, batch size and optimizer."""
    examples = rte_sample(sizes)
    names = [*OURS, PEFT, PEFT_FAIR]
    sides = {name: comparison_side(name, backbone, examples, sizes) for name in names}
    seconds = alternate(sides, sizes.batches, sizes.repeats, backbone.device)
    n_examples = len(examples)
    memory = {}
    if backbone.device.type == "cuda":  # allocator statistics are exact per side on a GPU
        for name in names:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            sides[name](sizes.batches)
            torch.cuda.synchronize()
            memory[name] = {"peak_growth_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
                            "how": "torch.cuda.max_memory_allocated growth"}
    elif backbone.device.type == "cpu" and backbone.family == "encoder":
        for name in [names[0], PEFT, PEFT_FAIR, *list(OURS)[1:]][: sizes.memory_sides]:
            command = [sys.executable, __file__, "--child", "memory", "--side", name, *child_args(args)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=child_env())
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
    results, rows = {}, []
    for name in names:
        t = median(seconds[name])
        ratio = paired_ratio(seconds[PEFT], seconds[name])
        mem = memory.get(name, {})
        results[name] = {"examples_per_s": n_examples / t, "speedup_over_peft": ratio,
                         "speedup_over_fair_peft": paired_ratio(seconds[PEFT_FAIR], seconds[name]),
                         "seconds": seconds[name], **mem}
        rows.append([name, f"{n_examples / t:.1f}", f"{ratio:.2f}×",
                     f"{mem['peak_growth_mib']:.0f}" if mem else "n/a",
                     f"{mem['rss_after_setup_mib']:.0f}" if "rss_after_setup_mib" in mem else "n/a"])
        rows[-1][3:3] = [f"{results[name]['speedup_over_fair_peft']:.2f}×"]
    md = table(["side", "examples/s", "speed vs peft", "speed vs fair peft", "peak memory growth while training, MiB",
                "RSS after setup, MiB"], rows)
    how = next(iter(memory.values()), {}).get("how", "")
    md += ["", f"RTE, a fixed sample of {n_examples} training examples, batch {sizes.batch}, n={N_TOKENS}, sequences truncated "
           f"at {sizes.max_length - N_TOKENS} tokens on every side (so all sides see the same tokens), AdamW (lr 0.3 on "
           "the prompt, 1e-3 on the head/classifier, eps 1e-8, weight decay 1e-5 on the prompt). peft: "
           "`PromptTuningConfig(SEQ_CLS, num_virtual_tokens=10, RANDOM)` on `AutoModelForSequenceClassification` of the "
           "same weights (seq2seq LM on T5, causal LM on GPT-2), run as its docs do: fp32, `model.train()` (dropout on), pre-tokenised "
           "examples, a padding collator per batch. 'speed vs peft' is the median over repeats of "
           "t(peft)/t(side). Read the rows top-down: random → buckets is bucketing, fp32 → bf16 is autocast, "
           "peft → ours pt fp32 random is the implementation alone, pt → rpt the cost of Φ.",
           "", f"Fair peft ('{PEFT_FAIR}'): the same model, examples and batch size run as a competent user would: "
           f"{'bf16 autocast (this device computes bf16 natively)' if device_bf16(backbone.device) else 'fp32 (this device has no native bf16)'}"
           ", and the batches `transformers.Trainer(group_by_length=True)` forms (its `LengthGroupedSampler`, seed 0); "
           "'speed vs fair peft' is t(fair peft)/t(side)."]
    if how.startswith("VmHWM"):
        md += ["", "Memory: each side in a fresh process; growth = peak RSS during one pass over the batches "
               "(VmHWM, reset via /proc/self/clear_refs after setup) − RSS after setup (model loaded, data tokenised, "
               "optimizer built). It includes allocator caches and oneDNN scratch, not just tensors."]
    elif how:
        md += ["", f"Memory: {how}."]
    return results, md + dropout_note(args.out / "peft_gap.json")


def dropout_note(path: Path) -> list[str]:
    """Why ours (pt, fp32, random) outruns plain peft on identical batches, from `experiments/peft_gap.py`'s numbers."""
    if not path.is_file():
        return []
    gap = json.loads(path.read_text())
    sides = "; ".join(f"{name} {side['examples_per_s']:.1f} ({side['speed_vs_peft_plain']:.2f}×)" for name, side in gap["sides"].items())
    return ["", f"Why 'ours: pt, fp32, random batches' outruns plain peft on the same batches (`python experiments/peft_gap.py`, "
            f"{gap['examples']} examples, batch {gap['batch']}, max_length {gap['max_length']}, {gap['threads']} torch threads, "
            f"CPU bf16 flags {', '.join(gap['cpu_flags_bf16']) or 'none'}, load average {' '.join(gap['load_average'])}; "
            f"examples/s and speed vs plain peft): {sides}. peft trains with its frozen backbone in train mode, so BERT's "
            "dropout (p=0.1 on the attention probabilities and on hidden states) is computed on every step; this toolkit "
            "keeps the frozen backbone in eval mode (no dropout). That is a difference in what is computed, not an "
            "implementation speed-up: with dropout off (eval mode) peft runs as fast as ours; the attention kernel "
            "(eager vs SDPA) makes no difference in fp32, and eval-mode peft is within a few percent of ours, which leaves "
            "nothing for the pooler or the mask path to explain. "
            "Under bf16 dropout costs more still (the fair peft side in eval mode), and SDPA's bf16 backward is slower "
            "than eager attention's on a CPU (section 9), which `attention=auto` avoids and peft (SDPA by default) does not."]


# -----------------------------------------------------------------------------
# 9. attention kernel; profile of a step


def attention_and_profile(backbone, sizes: Sizes) -> tuple[dict, list[str]]:
    """Training step time with SDPA vs eager attention, fp32 and bf16 (alternating); top ops of a bf16 step."""
    from torch.profiler import ProfilerActivity, profile

    task = get_task("RTE")
    sdpa, eager = load_backbone("embedded", attention="sdpa"), load_backbone("embedded", attention="eager")
    features, batches = bucketed(backbone, train_examples("RTE"), sizes)
    results, rows = {}, []
    for bf16 in (False, True):
        sides = {name: our_side(b, make_learner(b, task), features, batches, bf16) for name, b in (("sdpa", sdpa), ("eager", eager))}
        seconds = alternate(sides, sizes.batches, sizes.repeats, backbone.device)
        ratio = paired_ratio(seconds["sdpa"], seconds["eager"])
        dtype = "bf16" if bf16 else "fp32"
        results[dtype] = {"seconds": seconds, "eager_speedup": ratio}
        rows.append([dtype, f"{median(seconds['sdpa']) / sizes.batches * 1e3:.0f}", f"{median(seconds['eager']) / sizes.batches * 1e3:.0f}", f"{ratio:.2f}×"])
    md = table(["autocast", "sdpa ms/step", "eager ms/step", "eager speed-up"], rows)
    learner = make_learner(backbone, task)
    train_step(backbone, learner, [features[i] for i in batches[0]], True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for ids in batches[: sizes.batches]:
            train_step(backbone, learner, [features[i] for i in ids], True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [[e.key[:60], f"{e.self_cpu_time_total / total:.1%}", e.count] for e in events[:10]]
    results["profile_top"] = [{"op": e.key, "share": e.self_cpu_time_total / total} for e in events[:10]]
    md += ["", "Where a bf16 training step's time goes (default backbone, `attention=auto`, torch.profiler, self CPU time):", ""]
    md += table(["op", "share of step", "calls"], top)
    md += ["", f"RTE, {sizes.batches} length-bucketed batches of {sizes.batch}, rpt n={N_TOKENS}; both sides load the same "
           "weights and differ only in `attn_implementation`. The default `attention=auto` uses eager under bf16 on a "
           "CPU and SDPA otherwise."]
    return results, md


# -----------------------------------------------------------------------------
# 10. torch.compile


def compile_cost(backbone, sizes: Sizes) -> tuple[dict, list[str]]:
    """Compile time of the backbone with torch.compile(dynamic=True), then its step time against eager."""
    task = get_task("RTE")
    features, batches = bucketed(backbone, train_examples("RTE"), sizes)
    compiled = load_backbone("embedded")
    compiled.model = torch.compile(compiled.model, dynamic=True)
    learner = make_learner(compiled, task)
    tick = time.perf_counter()
    for ids in batches[: sizes.batches]:  # every batch shape once: compiles and recompiles happen here
        train_step(compiled, learner, [features[i] for i in ids], True)
    compile_seconds = time.perf_counter() - tick
    sides = {"eager": our_side(backbone, make_learner(backbone, task), features, batches, True),
             "compiled": our_side(compiled, learner, features, batches, True)}
    seconds = alternate(sides, sizes.batches, sizes.repeats, backbone.device)
    speedup = paired_ratio(seconds["eager"], seconds["compiled"])
    step_ms = {k: median(v) / sizes.batches * 1e3 for k, v in seconds.items()}
    saved_per_step = (step_ms["eager"] - step_ms["compiled"]) / 1e3
    breakeven = compile_seconds / saved_per_step if saved_per_step > 0 else math.inf
    md = table(["backbone", "ms per step (median)"], [[k, f"{v:.0f}"] for k, v in step_ms.items()])
    md += ["", f"First pass over the {sizes.batches} batches (compilation included): {compile_seconds:.0f} s. "
           f"Compiled vs eager after that: **{speedup:.2f}×**; compilation pays for itself after "
           f"{'never' if breakeven == math.inf else f'{breakeven:.0f} steps'}. bf16, RTE, length-bucketed batches, "
           "dynamic shapes. The library does not compile by default: see the conclusion in the text above the tables."]
    return {"compile_seconds": compile_seconds, "speedup": speedup, "step_ms": step_ms, "breakeven_steps": breakeven}, md


# -----------------------------------------------------------------------------
# 5. cost of Φ during training


def phi_cost(backbone, sizes: Sizes) -> tuple[dict, list[str]]:
    """rpt vs pt training step on the same batches (bf16 default path), and Φ alone."""
    task = get_task("RTE")
    features, batches = bucketed(backbone, train_examples("RTE"), sizes)
    sides = {m: our_side(backbone, make_learner(backbone, task, m), features, batches, True) for m in ("rpt", "pt")}
    seconds = alternate(sides, sizes.batches, sizes.repeats, backbone.device)
    overhead = paired_ratio(seconds["rpt"], seconds["pt"]) - 1
    prompt = make_learner(backbone, task, "rpt")[0]
    calls = 200
    tick = time.perf_counter()
    for _ in range(calls):  # Φ(P) forward and backward alone, outside autocast as in collapse()
        prompt().sum().backward()
    phi_ms = (time.perf_counter() - tick) / calls * 1e3
    step_ms = {m: median(seconds[m]) / sizes.batches * 1e3 for m in seconds}
    md = table(["method", "ms per step (median)"], [[m, f"{v:.0f}"] for m, v in step_ms.items()])
    md += ["", f"Φ's overhead: **{overhead:+.1%} of a pt step** (median of within-repeat ratios); Φ(P) forward + "
           f"backward alone takes {phi_ms:.2f} ms (n={N_TOKENS}, m=400, d={backbone.width}, fp32), "
           f"{phi_ms / step_ms['pt']:.1%} of a pt step. RTE, {sizes.batches} length-bucketed batches, bf16."]
    return {"step_ms": step_ms, "overhead": overhead, "phi_ms": phi_ms, "seconds": seconds}, md


# -----------------------------------------------------------------------------
# 6. inference with collapsed prompts, and prompt length


def infer_side(backbone, prompt: torch.Tensor, head, features: list):
    """A side for `alternate`: predict every feature with a collapsed prompt (eval batch 64, bf16)."""
    def run(k: int) -> int:
        predict_features(backbone, prompt, head, features, 64, True)
        return 0
    return run


def inference_and_length(backbone, sizes: Sizes) -> tuple[dict, list[str]]:
    """Collapsed rpt vs pt at n=10 (inference), and n=10 vs n=100 (training and inference)."""
    task = get_task("RTE")
    data = load_task_data("RTE", SUPERGLUE)
    evaluate = (data.dev + data.test)[: sizes.infer_examples]
    _, batches = bucketed(backbone, train_examples("RTE"), sizes)
    train_sides, infer_sides = {}, {}
    for n in (N_TOKENS, sizes.long_n):
        max_tokens = sizes.max_length - n  # the library truncates the input to leave room for the prompt
        features = backbone.featurize(train_examples("RTE"), max_tokens)
        learner = make_learner(backbone, task, "rpt", n)
        train_sides[f"rpt n={n}"] = our_side(backbone, learner, features, batches, True)
        head = learner[1].eval()
        eval_features = backbone.featurize(evaluate, max_tokens)
        prompts = {f"rpt n={n}, collapsed": learner[0].collapse()}
        if n == N_TOKENS:
            prompts[f"pt n={n}"] = make_learner(backbone, task, "pt", n)[0].collapse()
        for name, p in prompts.items():
            infer_sides[name] = infer_side(backbone, p, head, eval_features)
    train_s = alternate(train_sides, sizes.batches, sizes.repeats, backbone.device)
    infer_s = alternate(infer_sides, 1, sizes.repeats, backbone.device)
    n_train = sum(map(len, batches))
    rows = [[name, f"{n_train / median(s):.1f}", ""] for name, s in train_s.items()]
    rows += [[name, "", f"{len(evaluate) / median(s):.1f}"] for name, s in infer_s.items()]
    md = table(["side", "training examples/s", "inference examples/s"], rows)
    infer_ratio = paired_ratio(infer_s[f"rpt n={N_TOKENS}, collapsed"], infer_s[f"pt n={N_TOKENS}"])
    long_train = paired_ratio(train_s[f"rpt n={sizes.long_n}"], train_s[f"rpt n={N_TOKENS}"])
    long_infer = paired_ratio(infer_s[f"rpt n={sizes.long_n}, collapsed"], infer_s[f"rpt n={N_TOKENS}, collapsed"])
    md += ["", f"Time ratios (within-repeat medians): collapsed rpt / pt at n={N_TOKENS} inference **{infer_ratio:.2f}** "
           f"(both are an [n, d] tensor, so 1.00 up to noise); n={sizes.long_n} / n={N_TOKENS}: training {long_train:.2f}, inference "
           f"{long_infer:.2f}. Training: RTE, {sizes.batches} length-bucketed batches of {sizes.batch}, bf16 (the same examples "
           f"for both n; with n={sizes.long_n} the library truncates the input at {sizes.max_length - sizes.long_n} instead of "
           f"{sizes.max_length - N_TOKENS} tokens). Inference: `predict_features` on {len(evaluate)} RTE validation "
           "examples, batch 64, bf16, features prepared beforehand."]
    results = {"train_seconds": train_s, "infer_seconds": infer_s, "train_examples": n_train,
               "infer_examples": len(evaluate), "collapsed_rpt_over_pt": infer_ratio,
               "long_over_short_train": long_train, "long_over_short_infer": long_infer}
    return results, md


# -----------------------------------------------------------------------------
# 7. bank query latency


def make_bank(backbone, folder: Path) -> None:
    """A bank with one RTE entry (random P′ and head), its metadata built by `strategies.base.entry_for`."""
    task = get_task("RTE")
    torch.manual_seed(SEED)
    head = backbone.new_head(task)
    trained = TrainedTask(prompt=torch.randn(N_TOKENS, backbone.width) * 0.5, head=head.state_dict(),
                          metrics={"prompt_tokens": N_TOKENS}, history=[])
    spec = TaskSpec("RTE", "RTE", None, DataConfig(), PromptConfig(), TrainConfig())
    entry = entry_for(spec, load_task_data("RTE", SUPERGLUE), backbone, BackboneConfig(), trained)
    PromptBank.open(folder, create=True).add("RTE", entry)


def bank_child(folder: str) -> dict:
    """In a fresh process: load the backbone, open the bank and predict one example, phase by phase."""
    phases = {"python start → imports done (in-process part)": time.perf_counter() - START}
    tick = time.perf_counter()
    import transformers.models.bert.modeling_bert  # noqa: F401  (imported lazily by load_backbone otherwise)
    phases["import transformers' BERT model code"] = time.perf_counter() - tick
    tick = time.perf_counter()
    backbone = load_backbone("embedded")
    phases["load_backbone (config, tokenizer, weights)"] = time.perf_counter() - tick
    tick = time.perf_counter()
    example = read_jsonl(get_task("RTE"), SUPERGLUE / "RTE" / "val.jsonl")[:1]
    phases["read the input file"] = time.perf_counter() - tick
    tick = time.perf_counter()
    bank = PromptBank.open(folder)
    phases["PromptBank.open"] = time.perf_counter() - tick
    tick = time.perf_counter()
    _ = backbone.fingerprint
    phases["backbone fingerprint (sha256 of all weights)"] = time.perf_counter() - tick
    tick = time.perf_counter()
    predict_from_bank(bank, "RTE", example, backbone)
    phases["predict_from_bank (get, checks, one example)"] = time.perf_counter() - tick
    return phases


def child_args(args) -> list[str]:
    """The options a child process needs to do the same work as its parent."""
    return (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])


def child_env() -> dict:
    """The environment for child processes: offline, and the library importable."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def bank_latency(backbone, sizes: Sizes, args) -> tuple[dict, list[str]]:
    """Cold (fresh process) and warm (same process) latency of open bank → predict one example."""
    folder = Path(tempfile.mkdtemp(prefix="crpt-bench-")) / "bank"
    try:
        make_bank(backbone, folder)
        cold_wall, cold_phases = [], []
        for _ in range(sizes.repeats):
            tick = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", "bank", "--bank", str(folder), *child_args(args)],
                                 capture_output=True, text=True, check=True, env=child_env())
            cold_wall.append(time.perf_counter() - tick)
            cold_phases.append(json.loads(out.stdout.strip().splitlines()[-1]))
        example = read_jsonl(get_task("RTE"), SUPERGLUE / "RTE" / "val.jsonl")[:1]
        _ = backbone.fingerprint  # computed once per backbone object, as in a long-lived process
        warm_open, warm_predict = [], []
        for _ in range(sizes.warm_queries):
            tick = time.perf_counter()
            bank = PromptBank.open(folder)
            middle = time.perf_counter()
            predict_from_bank(bank, "RTE", example, backbone)
            warm_open.append(middle - tick)
            warm_predict.append(time.perf_counter() - middle)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    phases = {name: median(p[name] for p in cold_phases) for name in cold_phases[0]}
    rows = [["cold: whole process (python, imports, load, query)", f"{median(cold_wall) * 1e3:.0f}"]]
    rows += [[f"cold: {name}", f"{ms * 1e3:.0f}"] for name, ms in phases.items()]
    rows += [["warm: PromptBank.open", f"{median(warm_open) * 1e3:.1f}"],
             ["warm: predict_from_bank, one example", f"{median(warm_predict) * 1e3:.1f}"]]
    md = table(["query", "ms (median)"], rows)
    md += ["", f"One RTE entry (random P′ of shape ({N_TOKENS}, {backbone.width}) and a fresh head; metadata from "
           f"`strategies.base.entry_for`). Cold: a fresh `python` per query, {sizes.repeats} times (the in-process import time "
           f"counts from the first line of this script); warm: the same process, backbone loaded and fingerprinted "
           f"once, {sizes.warm_queries} queries. `predict_from_bank` re-reads and re-checks the entry's files on every call."]
    return {"cold_wall_s": cold_wall, "cold_phases_s": phases, "warm_open_s": warm_open,
            "warm_predict_s": warm_predict}, md


# -----------------------------------------------------------------------------
# 8. GPU: sections 1, 2 and 4 with a T5-Base-sized random T5


def t5_backbone(sizes: Sizes, device: str):
    """A randomly initialised T5 of T5-Base's shape behind the library's Seq2SeqBackbone."""
    from transformers import T5Config, T5ForConditionalGeneration

    from continual_rpt.backbones import Seq2SeqBackbone

    d_model, d_ff, layers, heads, d_kv = sizes.t5
    config = T5Config(vocab_size=32128, d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=heads, d_kv=d_kv,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(SEED)
    # The embedded BERT tokenizer's ids (< 30522) all fit T5's 32128-row vocabulary; no clipping needed.
    tokenizer = load_backbone("embedded").tokenizer
    return Seq2SeqBackbone(f"random T5 {sizes.t5}", T5ForConditionalGeneration(config), tokenizer, device)


def gpu_sections(sizes: Sizes, device: str, args) -> tuple[dict, list[str]]:
    """Sections 1, 2 and 4 on `device` with the T5 model."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    mm, mm_md = matmul_peak(torch.device(device), sizes.gpu_matmul, sizes.repeats)
    backbone = t5_backbone(sizes, device)
    train, train_md = training_throughput(backbone, sizes, mm["peak_gflops"])
    peft, peft_md = compare_peft(backbone, sizes, args)
    md = [f"Device: {name}; model: random T5, d_model, d_ff, layers, heads, d_kv = {sizes.t5}, vocabulary 32128, "
          "embedded BERT tokenizer. FLOPs of T5 are all counted by FlopCounterMode (its attention is plain matmuls).",
          "", "### 8.1 matmul peak", "", *mm_md, "", "### 8.2 training throughput", "", *train_md,
          "", "### 8.4 against peft", "", *peft_md]
    return {"device": name, "matmul": mm, "training": train, "peft": peft}, md


# -----------------------------------------------------------------------------
# 11. the decoder-only family


def decoder_backbone(sizes: Sizes):
    """A randomly initialised GPT-2 (speed needs no pretrained weights) with the embedded BERT tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from continual_rpt.backbones import DecoderBackbone

    width, layers, heads = sizes.decoder
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=30522, n_positions=1024, n_embd=width, n_layer=layers, n_head=heads)
    return DecoderBackbone(f"random GPT-2 {sizes.decoder}", GPT2LMHeadModel(config), load_backbone("embedded").tokenizer, "cpu")


def decoder_section(sizes: Sizes, args) -> tuple[dict, list[str]]:
    """Training against peft's causal-LM prompt tuning, and the cost of ranking 2 choices against one context forward."""
    backbone = decoder_backbone(sizes)
    train, train_md = compare_peft(backbone, sizes, args)
    prompt = torch.randn(N_TOKENS, backbone.width) * backbone.embedding_norm / math.sqrt(backbone.width)
    rows, numbers = [], {}
    for task in ("RTE", "COPA"):  # two label words after the context; two sentence-long choices
        examples = train_examples(task)[: sizes.infer_examples]
        features = backbone.featurize(examples, sizes.max_length - N_TOKENS)
        batches = [backbone.collate([features[i] for i in ids]) for ids in buckets(features, sizes.batch)]

        def rank(k: int) -> int:  # both candidates of every example, continued from the context's cache
            with torch.no_grad():
                for batch in batches:
                    backbone.scores(prompt, None, batch)
            return 0

        def context(k: int, logits: bool) -> int:  # one forward over [P; context] alone: the model's, or its body's
            with torch.no_grad():
                for batch in batches:
                    embeds, mask = backbone._context(prompt, batch)
                    run = backbone.model if logits else backbone.model.base_model
                    run(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
            return 0

        sides = {"rank": rank, "full": lambda k: context(k, True), "body": lambda k: context(k, False)}
        seconds = alternate(sides, 1, sizes.repeats, backbone.device)
        tokens = sum(len(t) for f in features for t in f.targets) / sum(len(f.targets) for f in features)
        numbers[task] = {"seconds": seconds, "candidate_tokens_mean": tokens,
                         "over_full_forward": paired_ratio(seconds["rank"], seconds["full"]),
                         "over_body_forward": paired_ratio(seconds["rank"], seconds["body"])}
        rows.append([task, f"{tokens:.1f}", f"{median(seconds['full']):.3f}", f"{median(seconds['body']):.3f}",
                     f"{median(seconds['rank']):.3f}", f"{numbers[task]['over_full_forward']:.2f}×",
                     f"{numbers[task]['over_body_forward']:.2f}×"])
    md = [f"Model: {backbone.name} (width, layers, heads), vocabulary 30522, embedded BERT tokenizer, fp32 unless named.", "",
          "### 11.1 training against peft", "", *train_md, "",
          "### 11.2 ranking two candidates", "",
          *table(["task", "tokens per candidate", "context forward (with LM logits), s", "context forward (body only), s",
                  "rank both candidates, s", "rank / forward", "rank / body"], rows),
          "", f"{sizes.infer_examples} training examples per task, batch {sizes.batch}, fp32, no grad, a random 10-token "
          "prompt. 'Context forward' runs [P; context] once, as a model call does (logits at every position) or the "
          "transformer body alone (no LM head: the floor of any ranking); ranking runs the body once, the LM head at the "
          "context's last position, then each candidate's tokens from the context's cache. RTE's candidates are its two "
          "label words, COPA's two sentences nearly as long as the context, which no cache can skip."]
    ratio = numbers["RTE"]["over_full_forward"]
    return {"training": train, "ranking": numbers, "ranking_over_context_forward": ratio}, md


# -----------------------------------------------------------------------------
# 12. deep prompts against shallow ones


def deep_cost(backbone, sizes: Sizes) -> tuple[dict, list[str]]:
    """deep-rpt vs rpt at the same n: training step on the same batches, and inference with the collapsed prompts."""
    task = get_task("RTE")
    features, batches = bucketed(backbone, train_examples("RTE"), sizes)
    learners = {m: make_learner(backbone, task, m) for m in ("rpt", "deep-rpt")}
    train = alternate({m: our_side(backbone, learner, features, batches, True) for m, learner in learners.items()},
                      sizes.batches, sizes.repeats, backbone.device)
    evaluate = backbone.featurize(load_task_data("RTE", SUPERGLUE).test[: sizes.infer_examples], sizes.max_length - N_TOKENS)
    infer = alternate({m: infer_side(backbone, prompt.collapse(), head, evaluate) for m, (prompt, head, _) in learners.items()},
                      1, sizes.repeats, backbone.device)
    ratios = {"train": paired_ratio(train["deep-rpt"], train["rpt"]), "infer": paired_ratio(infer["deep-rpt"], infer["rpt"])}
    stored = {m: prompt.stored_parameters() for m, (prompt, _, _) in learners.items()}
    trainable = {m: prompt.trainable_parameters() for m, (prompt, _, _) in learners.items()}
    md = table(["method", "ms per training step", "inference s", "trainable (prompt + Φ)", "stored (P′)"],
               [[m, f"{median(train[m]) / sizes.batches * 1e3:.0f}", f"{median(infer[m]):.2f}", f"{trainable[m]:,}", f"{stored[m]:,}"]
                for m in learners])
    md += ["", f"deep / shallow: training step **{ratios['train']:.2f}×**, inference **{ratios['infer']:.2f}×** (medians of "
           f"within-repeat ratios). RTE, n={N_TOKENS}, {sizes.batches} length-bucketed training batches, bf16; inference on "
           f"{len(evaluate)} test examples with the collapsed prompts, eval batch 64. A deep prompt replaces the "
           "prompt positions' states before every layer, so the sequences are no longer than a shallow prompt's."]
    return {"train_seconds": train, "infer_seconds": infer, "ratios": ratios, "stored": stored, "trainable": trainable}, md


# -----------------------------------------------------------------------------
# the run: environment, sections, and the report


def environment(args) -> dict:
    """Date, machine, versions and command of this run."""
    import peft
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "command": "HF_HUB_OFFLINE=1 python " + " ".join(sys.argv),
        "seeds": f"{SEED} (prompt and head init, data order, RTE sample)",
        "quick": args.quick,
    }


TITLES = {
    "1": "Matmul peak", "2": "Training throughput and FLOP/s", "3": "Padding share",
    "4": "Against the peft package", "5": "Cost of Φ during training",
    "6": "Inference with collapsed prompts; prompt length", "7": "Bank query latency",
    "8": "GPU: T5-Base-sized model", "9": "Attention kernel and where a step's time goes",
    "10": "torch.compile", "11": "Decoder-only family (random GPT-2, CPU)", "12": "Deep prompts against shallow ones",
}


def targets(sections: dict) -> list[str]:
    """The issue's targets against this run's numbers, as a short list above the tables."""
    def number(key: str, *path: str):
        value = sections.get(key, {}).get("numbers", {})
        for part in path:
            value = value.get(part, {}) if isinstance(value, dict) else {}
        return value if isinstance(value, (int, float)) else None

    lines = ["## Summary against the targets", ""]
    ratio = number("4", "ours: rpt, bf16, buckets (default)", "speedup_over_peft")
    if ratio is not None:
        verdict = "met" if ratio >= 2.5 else "NOT met"
        fair = number("4", "ours: rpt, bf16, buckets (default)", "speedup_over_fair_peft")
        against_fair = f", {fair:.2f}× `peft` run as a competent user would (bf16 where native, length-grouped)" if fair else ""
        lines.append(f"- training vs `peft` prompt tuning on the same work: **{ratio:.2f}×** (target ≥ 2.5×: {verdict}){against_fair}; section 4")
    overhead = number("5", "overhead")
    if overhead is not None:
        lines.append(f"- Φ's cost during training: **{overhead:+.1%}** of a pt step (target ≤ 3%: {'met' if overhead <= 0.03 else 'NOT met'}); section 5")
    padding = sections.get("3", {}).get("numbers", {})
    official = {t: v for t, v in padding.items() if isinstance(v, dict) and v.get("origin") == "SuperGLUE train"}
    if official:
        computed = sum(v["sequences"] * v["mean_tokens"] / (1 - v["bucketed"]) for v in official.values())
        real = sum(v["sequences"] * v["mean_tokens"] for v in official.values())
        share = 1 - real / computed
        worst = max(official, key=lambda t: official[t]["bucketed"])
        lines.append(f"- padding with length buckets over the official SuperGLUE train sets: **{share:.1%}** of computed tokens "
                     f"(target < 5%: {'met' if share < 0.05 else 'NOT met'}); the worst task is {worst} at "
                     f"{official[worst]['bucketed']:.1%} (250 examples from 20 to 250 tokens, 16 per batch); section 3")
    tasks = sections.get("2", {}).get("numbers", {}).get("tasks", {})
    shares = [v["peak_share"] for k, v in tasks.items() if k.endswith("bf16") and isinstance(v, dict)]
    if shares:
        fp32 = [v["peak_share"] for k, v in tasks.items() if k.endswith("fp32") and isinstance(v, dict)]
        top = {e["op"]: e["share"] for e in sections.get("9", {}).get("numbers", {}).get("profile_top", [])}
        matmul = sum(top.get(op, 0.0) for op in ("aten::addmm", "aten::mm", "aten::bmm"))
        lines.append(f"- achieved share of the matmul peak in training: bf16 {min(shares):.0%}–{max(shares):.0%}, fp32 "
                     f"{min(fp32):.0%}–{max(fp32):.0%}; in a bf16 step matmuls take {matmul:.0%} of the time, dtype "
                     f"copies (autocast's casts) {top.get('aten::copy_', 0.0):.0%}, and GELU, softmax, LayerNorm and "
                     "adds most of the rest (section 9's profile); section 2")
    eager = number("9", "bf16", "eager_speedup")
    if eager is not None:
        lines.append(f"- attention: eager attention is {eager:.2f}× SDPA under bf16 on this CPU (SDPA's bf16 backward is "
                     "slow), equal in fp32, so `attention=auto` picks eager for bf16 on a CPU; section 9")
    speedup, compile_s = number("10", "speedup"), number("10", "compile_seconds")
    if speedup is not None and compile_s is not None:
        breakeven = number("10", "breakeven_steps")
        lines.append(f"- torch.compile: {speedup:.2f}× per step after {compile_s:.0f} s of compilation, paid back after "
                     f"~{breakeven:.0f} steps; off by default (`--compile` for long runs): most CPU tasks here train "
                     "fewer steps; section 10")
    gpu = sections.get("8", {}).get("numbers", {}).get("gpu")
    lines.append("- GPU: " + ("see section 8" if gpu else "no GPU was lent to this session, so section 8 has no numbers"))
    return lines + [""]


def write_report(out: Path, report: dict) -> None:
    """performance.json (raw numbers) and performance.md (the tables) from the merged report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    env = report["environment"]
    lines = ["# continual-rpt performance", ""]
    if env["quick"]:
        lines += ["**QUICK RUN: tiny sizes to check the script; the numbers mean nothing.**", ""]
    lines += [f"- date: {env['date']}", f"- machine: {env['cpu']}, {env['cores']} cores ({env['cores_usable']} usable), "
              f"torch threads {env['torch_threads']}, load average at start {' '.join(env['load_average_at_start'])}",
              f"- versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"peft {env['peft']}", f"- command: `{env['command']}`", f"- seeds: {env['seeds']}",
              "- each figure is the median over repeats; each ratio the median of within-repeat ratios", ""]
    lines += targets(report["sections"])
    for key in sorted(report["sections"], key=int):
        section = report["sections"][key]
        lines += [f"## {key}. {TITLES[key]}", ""]
        if section["environment"]["date"] != env["date"] or section["environment"]["quick"]:
            lines += [f"_measured {section['environment']['date']} by `{section['environment']['command']}`_", ""]
        lines += section["markdown"] + [""]
    (out / "performance.md").write_text("\n".join(lines))


def main() -> None:
    """Parse the options, run the chosen sections and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds per section), to check the script")
    parser.add_argument("--repeats", type=int, help="repeats per figure (default 5; 2 with --quick)")
    parser.add_argument("--sections", default="1,2,3,4,5,6,7,8,9,10,11,12", help="comma-separated section numbers")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results", help="folder for performance.{md,json}")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own; 1 with --quick, since "
                        "2 threads on 2 cores that another process also uses are ~10x slower than 1)")
    parser.add_argument("--t5-device", default="cuda", help="device of section 8 (cpu only to test its code path)")
    parser.add_argument("--child", choices=["memory", "bank"], help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--bank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    sizes = dataclasses.replace(sizes, repeats=args.repeats or sizes.repeats, threads=args.threads or sizes.threads)
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # load reports and progress bars would bury the tables
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from inside transformers
    if args.child == "memory":
        print(json.dumps(memory_child(args.side, sizes)))
        return
    if args.child == "bank":
        print(json.dumps(bank_child(args.bank)))
        return

    env = environment(args)
    path = args.out / "performance.json"
    report = json.loads(path.read_text()) if path.is_file() else {"sections": {}}
    report["environment"] = env
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(TITLES))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from 1-12")
    backbone = load_backbone("embedded")
    started = time.perf_counter()
    for key in sorted(wanted):
        tick = time.perf_counter()
        print(f"== {key}. {TITLES[key]}", flush=True)
        if key == "1":
            numbers, md = matmul_peak(torch.device("cpu"), sizes.matmul, sizes.repeats)
        elif key == "2":
            peak = report["sections"].get("1", {}).get("numbers", {}).get("peak_gflops")
            numbers, md = training_throughput(backbone, sizes, peak)
        elif key == "3":
            numbers, md = padding(backbone, sizes)
        elif key == "4":
            numbers, md = compare_peft(backbone, sizes, args)
        elif key == "5":
            numbers, md = phi_cost(backbone, sizes)
        elif key == "6":
            numbers, md = inference_and_length(backbone, sizes)
        elif key == "7":
            numbers, md = bank_latency(backbone, sizes, args)
        elif key == "9":
            numbers, md = attention_and_profile(backbone, sizes)
        elif key == "10":
            numbers, md = compile_cost(backbone, sizes)
        elif key == "11":
            numbers, md = decoder_section(sizes, args)
        elif key == "12":
            numbers, md = deep_cost(backbone, sizes)
        elif args.t5_device != "cuda" or torch.cuda.is_available():
            numbers, md = gpu_sections(sizes, args.t5_device, args)
        else:
            numbers, md = {"gpu": None}, ["No GPU was available for this run."]
        numbers["section_seconds"] = time.perf_counter() - tick
        report["sections"][key] = {"numbers": numbers, "markdown": md, "environment": env}
        print("\n".join(md), f"\n({numbers['section_seconds']:.0f} s)\n", flush=True)
        write_report(args.out, report)  # after every section, so an interrupted run keeps what it measured
    env["load_average_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    env["total_seconds"] = time.perf_counter() - started
    write_report(args.out, report)
    print(f"wrote {args.out / 'performance.md'} ({env['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
