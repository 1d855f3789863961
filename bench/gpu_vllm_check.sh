#!/usr/bin/env bash
# The vllm backend with vLLM on a CUDA GPU: the smoke pipeline, then a short real-model training with
# the vllm and hf backends, step times side by side. Prepared, not yet run: it needs a GPU machine
# that reaches PyPI (vLLM's CUDA wheels are far larger than what can be carried to a machine without
# the network). The trainer itself runs on the CPU (this engine's training pass is CPU-only); only
# the vLLM server uses the GPU, which is where generation, most of a GRPO step, happens.
#
#   bash bench/gpu_vllm_check.sh            # from the repository root; about 10 minutes
#
# Output: bench/results/<machine>/gpu-vllm-check.txt
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 \
  PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_DISABLE_TELEMETRY=1 GX_ANALYTICS_ENABLED=false

make install
make vllm VLLM_PACKAGE=vllm==0.32.0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
out="bench/results/$(.venv/bin/python bench/machine.py --slug)-gpu"
mkdir -p "$out"
log="$out/gpu-vllm-check.txt"
work=$(mktemp -d)
git archive HEAD | tar -x -C "$work"
cd "$work"
export PATH="$OLDPWD/.venv/bin:$PATH"
gpu_server='runtime.vllm.extra_args=["--gpu-memory-utilization", "0.4"]'

{
  echo "== smoke pipeline, vllm backend on the GPU (tiny model, 32-wide heads for vLLM's kernels)"
  /usr/bin/time -f "%e s" grpo run --preset smoke -S runtime.rollout_backend=vllm \
    -S runtime.vllm.python="$OLDPWD/.venv-vllm/bin/python" -S "$gpu_server" -S runtime.vllm.enforce_eager=false \
    -S snapshot.tiny.num_attention_heads=2 -S snapshot.tiny.num_key_value_heads=1 | tail -20
  grpo params restore 2>/dev/null || git checkout -- params.yaml

  for backend in vllm hf; do
    echo "== 10 steps of the demo on the embedded SmolLM2, rollouts on $backend"
    rm -rf checkpoints
    grpo validate >/dev/null && grpo snapshot >/dev/null
    grpo train -S train.steps=10 -S train.eval_every=0 -S runtime.rollout_backend=$backend \
      -S runtime.vllm.python="$OLDPWD/.venv-vllm/bin/python" -S "$gpu_server" -S runtime.vllm.enforce_eager=false \
      >/dev/null
    python - <<'EOF'
import csv, statistics
rows = list(csv.DictReader(open("plots/train.csv")))
steps = [float(r["step_time"]) for r in rows]
gen = [float(r["generation_time"]) for r in rows]
print(f"steps {len(rows)}: median step {statistics.median(steps):.2f} s, generation {statistics.median(gen):.2f} s, "
      f"final reward {float(rows[-1]['reward']):.3f}")
EOF
  done
} 2>&1 | tee "$log"
echo "wrote $log"
