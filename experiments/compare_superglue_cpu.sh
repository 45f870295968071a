#!/usr/bin/env bash
# Issue 5's recorded comparison: the superglue-cpu stream with six methods and three seeds,
# then `crpt compare`. Finished runs are kept; re-running the script continues where it stopped.
#   bash experiments/compare_superglue_cpu.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/superglue}
out=experiments/results/superglue_cpu_compare
mkdir -p "$out/runs"
for seed in 0 1 2; do
  for method in rpt pt head shared progressive ewc; do
    run="$out/runs/$method-$seed"
    if [ -f "$run/metrics.json" ]; then continue; fi
    if [ -d "$run" ]; then resume=--resume; else resume=; fi
    HF_HUB_OFFLINE=1 crpt run streams/superglue-cpu.yaml --data-dir "$data" --method "$method" --seed "$seed" \
      --out "$run" --no-progress $resume | tail -n 8
  done
done
crpt compare "$out"/runs/* --out "$out/report"
python - "$out/report/environment.json" <<'PY'
import json, os, platform, sys, time
import torch, transformers
import continual_rpt
env = {"command": "bash experiments/compare_superglue_cpu.sh", "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
       f"{torch.get_num_threads()} torch threads", "python": platform.python_version(), "torch": torch.__version__,
       "transformers": transformers.__version__, "continual_rpt": continual_rpt.__version__, "seeds": [0, 1, 2],
       "date": time.strftime("%Y-%m-%d")}
open(sys.argv[1], "w").write(json.dumps(env, indent=2, sort_keys=True) + "\n")
PY
