#!/usr/bin/env bash
# The cl-cpu stream (the CL benchmark's tasks that ../shared/data/cl_benchmark holds) with the given
# methods and seeds, then `crpt compare`. Every run also scores the two controls (majority class,
# linear probe) on the same data. Finished runs are kept; re-running continues where it stopped.
#   bash experiments/compare_cl_cpu.sh [DATA_DIR] [SEEDS] [METHODS]
#   e.g. bash experiments/compare_cl_cpu.sh ../shared/data/cl_benchmark "0 1 2" "rpt pt linear-probe"
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/cl_benchmark}
seeds=${2:-0 1 2}
methods=${3:-rpt pt linear-probe}
out=experiments/results/cl_cpu_compare
mkdir -p "$out/runs"
for seed in $seeds; do
  for method in $methods; do
    run="$out/runs/$method-$seed"
    if [ -f "$run/metrics.json" ]; then continue; fi
    if [ -d "$run" ]; then resume=--resume; else resume=; fi
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 crpt run streams/cl-cpu.yaml --data-dir "$data" --method "$method" --seed "$seed" \
      --out "$run" --no-progress $resume | tail -n 12
  done
done
# Runs in method order, so differences.md gives each method's paired difference from the first (rpt).
runs=()
for method in $methods; do for seed in $seeds; do runs+=("$out/runs/$method-$seed"); done; done
crpt compare "${runs[@]}" --out "$out/report"
python - "$out/report/environment.json" "$seeds" "$methods" <<'PY'
import json, platform, sys, time
import sklearn, torch, transformers
import continual_rpt
sys.path.insert(0, "experiments")
from grid import machine_description
env = {"command": f"bash experiments/compare_cl_cpu.sh DATA_DIR '{sys.argv[2]}' '{sys.argv[3]}'", "machine": machine_description(),
       "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
       "scikit-learn": sklearn.__version__, "continual_rpt": continual_rpt.__version__,
       "seeds": [int(s) for s in sys.argv[2].split()], "methods": sys.argv[3].split(), "date": time.strftime("%Y-%m-%d")}
open(sys.argv[1], "w").write(json.dumps(env, indent=2, sort_keys=True) + "\n")
PY
