#!/usr/bin/env bash
# The accelerator check, as one script: about 5.5 minutes on one H200 (2026-11-30, numbers in README):
#   1. versions and devices;
#   2. the attention parity suite with cuDNN (tests/test_attention_parity.py);
#   3. train-step tokens/s and MFU (against the datasheet and a bf16 matmul measured in the same
#      run) of GPT-2 124M with attention 'auto' (cuDNN) and 'xla', and of SmolLM2-135M, bf16,
#      batch 32 x 1024, then greedy decoding of those weights at batch 1 and 64;
#   4. `lm.bench step` (the main job's shape: before/now/remat/bf16) and `lm.bench layers`
#      (compile time against depth, scanned vs unrolled; temporary memory against remat).
# Every stage has its own time limit and the script goes on after a failure; each stage's
# output lands in $OUT/<stage>.txt (default ./gpu_check).
#
#     OUT=/tmp/gpu_check bash launch/gpu_check.sh            # needs jax with CUDA (jax[cuda12])
#     BATCH=8 SEQ=256 STEPS=3 bash launch/gpu_check.sh       # a smoke run of the same steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
BATCH=${BATCH:-32}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-10}
LIMIT=${LIMIT:-150}  # seconds per stage
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
run() {  # name, command...: run under the stage limit, keep going on failure, remember it
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*" | tee "$OUT/$name.txt"
  timeout "$LIMIT" "$@" 2>&1 | tee -a "$OUT/$name.txt" || status=1
  echo "== $name: $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}
run devices $PYTHON -c "import jax, flax, optax, orbax.checkpoint as ocp, numpy
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', ocp.__version__,
      'numpy', numpy.__version__); print(jax.default_backend(), jax.devices())"
# tests/conftest.py defaults JAX_PLATFORMS to cpu; the parity suite must see the GPU.
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv | tee -a "$OUT/devices.txt"
JAX_PLATFORMS=${JAX_PLATFORMS:-} run parity $PYTHON -m pytest -q -p no:cacheprovider tests/test_attention_parity.py
if grep -q failed "$OUT/parity.txt"; then  # float32 on a GPU: TF32 matmuls, or a real error?
  JAX_PLATFORMS=${JAX_PLATFORMS:-} JAX_DEFAULT_MATMUL_PRECISION=highest run parity_highest \
    $PYTHON -m pytest -q -p no:cacheprovider tests/test_attention_parity.py
fi
mfu=($PYTHON -m lm.bench mfu --batch "$BATCH" --seq "$SEQ" --precision bf16 --steps "$STEPS")
run mfu_gpt2 "${mfu[@]}" --shape gpt2_124m --attention auto --decode_batches 1,64
run mfu_gpt2_xla "${mfu[@]}" --shape gpt2_124m --attention xla --decode_batches ""
run mfu_smollm2 "${mfu[@]}" --shape smollm2_135m --attention auto --decode_batches 1,64
run step $PYTHON -m lm.bench step --steps 10 --rounds 3
run layers $PYTHON -m lm.bench layers --depths 4,30
exit $status
