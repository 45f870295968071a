"""Mixed-task batch inference: examples per second when rows of different tasks share a forward pass.

On a finished run's bank, the test examples of its tasks are dealt round-robin into one file (no
two neighbours share a task) and scored three ways, with every entry's prompt and head loaded and
every example tokenised once beforehand (only the forward passes are timed):
    mixed       batches of BATCH rows of all tasks, each row its own P′ and head (`mixed_option_scores`)
    grouped     the same rows regrouped by task, batches of BATCH rows of one task sharing its prompt
                (the one-task path; the rows must be reordered, and the answers put back in file order)
    file order  the rows in file order, a new batch whenever the task changes: what answering an
                interleaved file task by task without regrouping gives (batches of one row)
Each mode runs REPEATS times after one warm-up; the median is recorded.

    python experiments/mixed_batches.py STREAM RUN_FOLDER --out experiments/results/mixed_batches/NAME [--data-dir DIR]

STREAM and --data-dir as given to `crpt run`; the seed is the run's.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from grid import machine_description  # noqa: E402

from routing import finished_run, run_parser  # noqa: E402

import continual_rpt  # noqa: E402
from continual_rpt.evaluation import length_batches, load_answerer, mixed_option_scores, option_scores  # noqa: E402

BATCH, REPEATS = 64, 3


def timed(fn) -> float:
    """Median seconds of REPEATS calls of `fn`, after one warm-up call."""
    fn()
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def padded_tokens(backbone, batches: list[list], prompt_slots: list[int]) -> int:
    """Token positions the backbone computes over these batches: padded text plus the prompt slots, every sequence."""
    total = 0
    for batch, slots in zip(batches, prompt_slots):
        ids = backbone.collate(batch)["input_ids"]
        total += ids.numel() + ids.shape[0] * slots
    return total


def main() -> None:
    parser = run_parser(__doc__)
    parser.add_argument("--per-task", type=int, default=200, help="test examples per task in the interleaved file")
    args = parser.parse_args()

    _, stream, bank, backbone, data = finished_run(args.stream, args.run, args.data_dir)
    names = bank.tasks()
    answerers = [load_answerer(bank, name, backbone) for name in names]
    tests = [data[name].test[: args.per_task] for name in names]
    rows = [(t, i) for i in range(max(map(len, tests))) for t in range(len(names)) if i < len(tests[t])]  # round-robin
    train = answerers[0].entry.config.get("train", {})
    max_length, bf16 = train.get("max_length", 256), train.get("bf16", True)
    features = {t: backbone.featurize(tests[t], max_length - a.prompt.shape[0]) for t, a in enumerate(answerers)}
    row_features = [features[t][i] for t, i in rows]
    owners = [t for t, _ in rows]
    runs: list[tuple[int, list]] = []  # file order: consecutive rows of one task form a batch
    for t, i in rows:
        if runs and runs[-1][0] == t and len(runs[-1][1]) < BATCH:
            runs[-1][1].append(features[t][i])
        else:
            runs.append((t, [features[t][i]]))

    def mixed():
        return mixed_option_scores(backbone, answerers, owners, row_features, BATCH, bf16)

    def grouped():
        return [option_scores(backbone, a.prompt, a.head, features[t], BATCH, bf16) for t, a in enumerate(answerers)]

    def file_order():
        return [option_scores(backbone, answerers[t].prompt, answerers[t].head, batch, BATCH, bf16) for t, batch in runs]

    mixed_batches = [[row_features[i] for i in b] for b in length_batches(row_features, BATCH)]
    grouped_batches = [([features[t][i] for i in b], a.prompt.shape[0]) for t, a in enumerate(answerers)
                       for b in length_batches(features[t], BATCH)]
    tokens = {"mixed": padded_tokens(backbone, mixed_batches, [max(a.prompt.shape[0] for a in answerers)] * len(mixed_batches)),
              "grouped": padded_tokens(backbone, [b for b, _ in grouped_batches], [n for _, n in grouped_batches]),
              "file order": padded_tokens(backbone, [b for _, b in runs], [answerers[t].prompt.shape[0] for t, _ in runs])}
    # The three modes answer alike (within the rounding of different batch layouts).
    answers_mixed = [int(s.argmax()) for s in mixed()]
    answers_grouped = grouped()
    agree = sum(answers_mixed[k] == int(answers_grouped[t][i].argmax()) for k, (t, i) in enumerate(rows)) / len(rows)
    seconds = {"mixed": timed(mixed), "grouped": timed(grouped), "file order": timed(file_order)}
    n = len(rows)
    result = {
        "run": str(args.run), "tasks": names, "examples": n, "batch_size": BATCH, "repeats": REPEATS, "bf16": bf16,
        "prompt_tokens": {name: a.prompt.shape[0] for name, a in zip(names, answerers)},
        "file_order_batches": len(runs), "agreement_mixed_vs_grouped": agree,
        "seconds": seconds, "padded_tokens": tokens, "examples_per_second": {mode: n / s for mode, s in seconds.items()},
        "mixed_vs_grouped": seconds["grouped"] / seconds["mixed"], "mixed_vs_file_order": seconds["file order"] / seconds["mixed"],
        "command": "python experiments/mixed_batches.py " + " ".join(sys.argv[1:]), "machine": machine_description(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "continual_rpt": continual_rpt.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed_batches.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Mixed-task batches: {stream.name}", "",
             f"{n} test examples of {len(names)} tasks ({', '.join(names)}), dealt round-robin; batch size {BATCH}, "
             f"{'bf16' if bf16 else 'fp32'}, median of {REPEATS} after a warm-up. Machine: {result['machine']}.", "",
             "| mode | seconds | examples/s | mixed is × faster | padded token positions |", "|---|---:|---:|---:|---:|"]
    for mode, s in seconds.items():
        lines.append(f"| {mode} | {s:.2f} | {n / s:.1f} | {s / seconds['mixed']:.2f} | {tokens[mode]:,} |")
    lines += ["", f"File order makes {len(runs)} batches (a new one at every change of task). "
              f"Mixed and grouped give the same answer for {100 * agree:.1f}% of the rows.",
              f"Command: `{result['command']}`", ""]
    (args.out / "mixed_batches.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
