"""Dev study for a better router: the stored-feature Mahalanobis score plus a naive Bayes score of input *format*.

The format of an input is a bag of hashed keys: per segment, its first two token ids by position,
the ids among its first six tokens, its last two ids by position, and its log2 length. A task's
model is the smoothed frequency of each key over (up to 2,000 of) its training inputs, so it is a
pure function of one task's inputs, as route state must be. An input's score for a task is
w · (−½ Mahalanobis distance under the shared covariance) + Σ log p(key | task) (w = None: the
Mahalanobis router alone). Routed here: the dev halves only (model selection), never the test.

    python experiments/routing_tokens_study.py STREAM RUN_FOLDER --data-dir DIR --out experiments/results/routing_tokens_study/NAME

Not a router of the library yet: the smoothing, the weight and how entries made before the key
counts existed would be routed are open (see the results' README note).
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from grid import machine_description  # noqa: E402
from routing import finished_run, run_parser  # noqa: E402

import continual_rpt  # noqa: E402
from continual_rpt.routing import answerable, input_features, mahalanobis_distances  # noqa: E402

BUCKETS, MAX_INPUTS = 4096, 2000
ALPHAS, WEIGHTS = (0.1, 1.0), (0.0, 0.3, 1.0, 3.0, None)


def format_keys(tokenizer, example) -> torch.Tensor:
    """The hashed format keys of an example's first text pair, as counts over BUCKETS."""
    counts = torch.zeros(BUCKETS, dtype=torch.float64)
    for segment, text in enumerate(example.pairs[0][:2]):
        if text is None:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keys = [(1, segment, p, t) for p, t in enumerate(ids[:2])] + [(2, segment, 0, t) for t in ids[:6]]
        keys += [(3, segment, p, t) for p, t in enumerate(ids[-2:])] + [(4, segment, 0, min(int(math.log2(1 + len(ids))), 12))]
        for kind, seg, pos, value in keys:  # a fixed hash: Python's own is salted per process for strings
            counts[(((kind * 7 + seg) * 31 + pos) * 1000003 + value) * 2654435761 % 2**32 % BUCKETS] += 1
    return counts


def main() -> int:
    args = run_parser(__doc__).parse_args()
    metrics, stream, bank, backbone, data = finished_run(args.stream, args.run, args.data_dir)
    names = bank.tasks()
    states = [bank.get(n).route for n in names]
    kinds = [bank.get(n).meta.get("kind") for n in names]
    max_length = max(spec.train.max_length for spec in stream.tasks)

    def bag(examples):
        return torch.stack([format_keys(backbone.tokenizer, ex) for ex in examples])

    def sample(train):
        return random.Random(0).sample(train, MAX_INPUTS) if len(train) > MAX_INPUTS else train

    counts = torch.stack([bag(sample(data[n].train)).sum(0) for n in names])
    dev = {}
    for n in names:
        x = input_features(backbone, backbone.featurize(data[n].dev, max_length))
        dev[n] = (-0.5 * mahalanobis_distances(x, states), bag(data[n].dev), answerable(kinds, data[n].dev))
    rows = []
    for alpha in ALPHAS:
        log_p = torch.log((counts + alpha) / (counts + alpha).sum(1, keepdim=True))
        for weight in WEIGHTS:
            per, right, total = {}, 0, 0
            for t, n in enumerate(names):
                maha, keys, allowed = dev[n]
                score = maha if weight is None else weight * maha + keys @ log_p.T
                chosen = score.masked_fill(~allowed, float("-inf")).argmax(1)
                per[n] = 100.0 * float((chosen == t).double().mean())
                right, total = right + int((chosen == t).sum()), total + len(chosen)
            rows.append({"alpha": alpha, "weight": weight, "dev_routing_accuracy": 100.0 * right / total, "per_task": per})
            print(f"alpha {alpha} weight {weight}: {rows[-1]['dev_routing_accuracy']:.1f}")
    env = {"command": "python experiments/routing_tokens_study.py " + " ".join(sys.argv[1:]), "machine": machine_description(),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "continual_rpt": continual_rpt.__version__, "date": time.strftime("%Y-%m-%d"), "run": str(args.run)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps({"rows": rows, "environment": env}, indent=2) + "\n")
    lines = [f"# Routing dev study: {metrics['stream']} (run {args.run}, seed {metrics.get('seed')}), dev halves", "",
             "| smoothing α | weight w of the Mahalanobis score | dev routing accuracy | " + " | ".join(names) + " |",
             "|---:|---:|---:|" + "---:|" * len(names)]
    for r in rows:
        w = "Mahalanobis alone" if r["weight"] is None else ("format alone" if r["weight"] == 0 else r["weight"])
        lines.append(f"| {r['alpha']} | {w} | {r['dev_routing_accuracy']:.1f} | " + " | ".join(f"{r['per_task'][n]:.1f}" for n in names) + " |")
    (args.out / "study.md").write_text("\n".join(lines + ["", "```", json.dumps(env, indent=2), "```", ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
