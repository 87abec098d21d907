#!/usr/bin/env bash
# The accelerator check of issue 14, as one script that fits in about 8 minutes on one H200:
# the attention parity suite with cuDNN, then train-step tokens/s and MFU of the GPT-2 124M
# and SmolLM2-135M shapes in bf16 (20 timed steps after warm-up), then greedy decoding at
# batch 1 and 64. Everything it prints also lands in $OUT (default ./gpu_check).
#
#     OUT=/tmp/gpu_check bash launch/gpu_check.sh            # needs jax with CUDA (jax[cuda12])
#     BATCH=8 SEQ=256 STEPS=3 bash launch/gpu_check.sh       # a smoke run of the same steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
BATCH=${BATCH:-32}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
run() {  # name, command...: run, keep going on failure, remember it
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.txt"
  "$@" 2>&1 | tee -a "$OUT/$name.txt" || status=1
}
run devices python -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())"
# tests/conftest.py defaults JAX_PLATFORMS to cpu; the parity suite must see the GPU.
JAX_PLATFORMS=${JAX_PLATFORMS:-} run parity python -m pytest -q -p no:cacheprovider tests/test_attention_parity.py
for shape in gpt2_124m smollm2_135m; do
  run "mfu_$shape" python -m lm.bench mfu --shape "$shape" --batch "$BATCH" --seq "$SEQ" --precision bf16 \
    --steps "$STEPS" --decode_batches 1,64
done
exit $status
