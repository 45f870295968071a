"""The anchor of the serving benchmark (experiments/serving.py): what a user would write with PEFT instead of a bank.

PEFT holds several prompt-tuning adapters on one model but answers with one at a time
(`set_adapter`), so an interleaved load is answered in per-task batches, switching adapters
between them. PEFT cannot take the embedded encoder's entries (its virtual tokens go before
[CLS], and it has no place for a task head: continual_rpt/peft_format.py), so the anchor runs on
a decoder whose entries it can load exactly: tests/conftest.py's tiny random GPT-2 (2 layers,
32 wide, a byte-level BPE trained on SuperGLUE text), trained here on the same five tasks
(16 examples, 1 epoch, fp32: the answers, not their accuracy, are compared), every entry exported
with `crpt bank export --format peft`. A PEFT batch scores every (row, candidate) sequence in
one forward pass, as PEFT's docs do for causal LMs; the bank's decoder path runs each row's
context once and its candidates from the KV cache, so the two differ in work as well as in batching.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import _bpe_tokenizer  # noqa: E402  (the test suite's tiny GPT-2 tokenizer, built the same way)

from continual_rpt.backbones import load_backbone  # noqa: E402
from continual_rpt.bank import PromptBank  # noqa: E402
from continual_rpt.cli import main as crpt  # noqa: E402
from continual_rpt.evaluation import load_answerer, mixed_option_scores, option_scores  # noqa: E402
from continual_rpt.run import run_stream  # noqa: E402
from continual_rpt.streams import load_stream  # noqa: E402

N_TOKENS, MAX_LENGTH, REPEATS = 10, 96, 3


def timed(modes: dict) -> dict:
    """Median seconds of each mode over REPEATS rounds, the modes taking turns in each (a busy machine's load falls on all alike)."""
    seconds: dict = {name: [] for name in modes}
    for _ in range(REPEATS):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def decoder_bank(work: Path, data_dir: str, names: list[str]) -> Path:
    """A tiny random GPT-2 in `work`, and a bank of `names` trained on it (fp32); the bank's folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shutil.rmtree(work, ignore_errors=True)
    model_dir = work / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=512, n_embd=32, n_layer=2, n_head=2)).save_pretrained(model_dir)
    _bpe_tokenizer(Path(data_dir), bos=False).save_pretrained(model_dir)
    stream = {"name": "tiny-gpt2", "backbone": {"backbone": str(model_dir)}, "data": {"data_dir": str(data_dir), "max_train": 16},
              "prompt": {"n_tokens": N_TOKENS, "bottleneck": 8}, "tasks": names, "controls": False,
              "train": {"epochs": 1, "batch_size": 8, "max_length": MAX_LENGTH, "bf16": False}}
    (work / "stream.yaml").write_text(yaml.safe_dump(stream))
    run_stream(load_stream(work / "stream.yaml"), work / "run", progress=False)
    return work / "run" / "bank"


def peft_model(bank_path: Path, names: list[str], work: Path):
    """Every entry exported as a PEFT adapter and loaded, under its name, into one PeftModel on the base decoder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in names:
        if crpt(["bank", "export", str(bank_path), name, "--format", "peft", "--out", str(work / "adapters" / name)]) != 0:
            raise SystemExit(f"crpt bank export {name} failed")
    base = AutoModelForCausalLM.from_pretrained(work / "tiny-gpt2", use_safetensors=True)
    model = PeftModel.from_pretrained(base, work / "adapters" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(work / "adapters" / name, adapter_name=name)
    return model.eval()


def peft_batch_scores(model, tokenizer, examples: list) -> torch.Tensor:
    """Summed log-probability of every candidate of every example under the active adapter, [B, C] (-inf where fewer)."""
    contexts = tokenizer([ex.source for ex in examples], truncation=True, max_length=MAX_LENGTH - N_TOKENS)["input_ids"]
    pairs = [(b, j, ctx, tokenizer(" " + c, add_special_tokens=False)["input_ids"])
             for b, (ex, ctx) in enumerate(zip(examples, contexts)) for j, c in enumerate(ex.candidates)]
    width = max(len(ctx) + len(cand) for *_, ctx, cand in pairs)
    ids = torch.full((len(pairs), width), tokenizer.eos_token_id)
    mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for s, (*_, ctx, cand) in enumerate(pairs):
        ids[s, : len(ctx) + len(cand)] = torch.tensor(ctx + cand)
        mask[s, : len(ctx) + len(cand)] = 1
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # the virtual tokens' positions first
    out = torch.full((len(examples), max(len(ex.candidates) for ex in examples)), float("-inf"))
    for s, (b, j, ctx, cand) in enumerate(pairs):
        at = N_TOKENS + len(ctx) - 1 + torch.arange(len(cand))  # token k of the candidate is predicted at the position before it
        out[b, j] = logp[s, at, torch.tensor(cand)].sum()
    return out


def peft_vs_ours(bank_path: Path, work: Path, data: dict, names: list[str], per_task: int, batch: int) -> dict:
    """Rows/s of PEFT (per-task batches, set_adapter between them) and of the bank in process (mixed, and per task), same rows."""
    backbone = load_backbone(str(work / "tiny-gpt2"))
    bank = PromptBank.open(bank_path)
    answerers = [load_answerer(bank, name, backbone) for name in names]
    tests = [data[name].test[:per_task] for name in names]
    rows = [(t, i) for i in range(max(map(len, tests))) for t in range(len(names)) if i < len(tests[t])]  # round-robin
    features = [backbone.featurize(tests[t], MAX_LENGTH - a.prompt.shape[0]) for t, a in enumerate(answerers)]
    model = peft_model(bank_path, names, work)

    def mixed():
        return mixed_option_scores(backbone, answerers, [t for t, _ in rows], [features[t][i] for t, i in rows], batch, False)

    def grouped():
        return [option_scores(backbone, a.prompt, None, features[t], batch, False) for t, a in enumerate(answerers)]

    def with_peft():
        scores = []
        for t, name in enumerate(names):
            model.set_adapter(name)
            scores.append(torch.cat([peft_batch_scores(model, backbone.tokenizer, tests[t][k : k + batch])
                                     for k in range(0, len(tests[t]), batch)]))
        return scores

    ours, theirs = mixed(), with_peft()
    agree = sum(int(ours[k].argmax()) == int(theirs[t][i].argmax()) for k, (t, i) in enumerate(rows))
    gap = max(float((ours[k][:c] - theirs[t][i][:c]).abs().max()) for k, (t, i) in enumerate(rows)
              for c in [len(tests[t][i].candidates)])
    seconds = timed({"bank in process, mixed": mixed, "bank in process, per task": grouped,
                     "peft, per-task batches, set_adapter": with_peft})
    return {"model": "tiny random GPT-2 (2 layers, 32 wide, vocabulary 1000)", "rows": len(rows), "batch": batch,
            "prompt_tokens": N_TOKENS, "repeats": REPEATS, "max_length": MAX_LENGTH, "precision": "fp32",
            "rows_per_s": {mode: len(rows) / s for mode, s in seconds.items()},
            "peft_agrees_with_bank": agree / len(rows), "largest_score_difference": gap}
