#!/usr/bin/env bash
# The accelerator check, as one script (about 6 minutes on one H100 or H200):
#   1. versions and devices;
#   2. the attention parity suite with cuDNN (tests/test_attention_parity.py), packed segments
#      through cuDNN's offsets on Hopper included;
#   3. train-step tokens/s and MFU (against the datasheet and a bf16 matmul measured in the same
#      run) of GPT-2 124M (batch 32 x 1024) and Llama 3.2 1B's shape (batch 8 x 2048), bf16,
#      the model's default remat and attention 'auto' (cuDNN), each with the per-kernel time of
#      3 traced steps (`lm.bench mfu --profile`; traces under $TRACES, kept off $OUT);
#   4. GPT-2 124M again under XLA flags that may be made defaults: the latency-hiding scheduler,
#      command buffers (CUDA graphs) off, and unrolled layers;
#   5. 20 train steps of GPT-2 124M in bf16 against the CPU's losses for the same seed
#      (tests/goldens/losses: within twice bf16's own rounding noise at every step);
#   6. with FULL=1 also `lm.bench step` and `lm.bench layers`.
# Every stage has its own time limit and the script goes on after a failure; all output lands
# in one file, $OUT/gpu_check.log (default ./gpu_check), and each stage's in $TRACES/stages.
#
#     OUT=/tmp/gpu_check bash launch/gpu_check.sh            # needs jax with CUDA (jax[cuda12])
#     BATCH=8 SEQ=256 STEPS=3 bash launch/gpu_check.sh       # a smoke run of the same steps
#     JAX_PLATFORMS=cpu LLAMA_1B=0 BATCH=1 SEQ=32 STEPS=1 LIMIT=400 bash launch/gpu_check.sh  # on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
BATCH=${BATCH:-32}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-10}
BATCH_1B=${BATCH_1B:-8}
SEQ_1B=${SEQ_1B:-2048}
TRACES=${TRACES:-/tmp/gpu_check_traces}
LIMIT=${LIMIT:-150}  # seconds per stage
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
STAGES=$TRACES/stages  # one file per stage; all of them also in $OUT/gpu_check.log
mkdir -p "$STAGES"
LOG=$OUT/gpu_check.log
run() {  # name, command...: run under the stage limit, keep going on failure, remember it
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*" | tee "$STAGES/$name.txt" >> "$LOG"
  timeout "$LIMIT" "$@" 2>&1 | tee -a "$STAGES/$name.txt" | tee -a "$LOG" || status=1
  echo "== $name: $((SECONDS - start)) s" | tee -a "$STAGES/$name.txt" >> "$LOG"
}
run devices $PYTHON -c "import jax, flax, optax, orbax.checkpoint as ocp, numpy
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', ocp.__version__,
      'numpy', numpy.__version__); print(jax.default_backend(), jax.devices())"
# tests/conftest.py defaults JAX_PLATFORMS to cpu; the parity suite must see the GPU.
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv | tee -a "$STAGES/devices.txt" >> "$LOG"
JAX_PLATFORMS=${JAX_PLATFORMS:-} run parity $PYTHON -m pytest -q -p no:cacheprovider tests/test_attention_parity.py
if grep -q failed "$STAGES/parity.txt"; then  # float32 on a GPU: TF32 matmuls, or a real error?
  JAX_PLATFORMS=${JAX_PLATFORMS:-} JAX_DEFAULT_MATMUL_PRECISION=highest run parity_highest \
    $PYTHON -m pytest -q -p no:cacheprovider tests/test_attention_parity.py
fi
mfu=($PYTHON -m lm.bench mfu --precision bf16 --steps "$STEPS" --top 20)
gpt2=("${mfu[@]}" --shape gpt2_124m --batch "$BATCH" --seq "$SEQ")
run mfu_gpt2 "${gpt2[@]}" --decode_batches 1,64 --profile "$TRACES/gpt2"
if [ "${LLAMA_1B:-1}" = 1 ]; then  # LLAMA_1B=0 leaves it out (a CPU smoke run: 20 GB of state)
  run mfu_llama3_1b "${mfu[@]}" --shape llama3_1b --batch "$BATCH_1B" --seq "$SEQ_1B" \
    --decode_batches "" --profile "$TRACES/llama3_1b"
fi
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true" \
  run mfu_gpt2_lhs "${gpt2[@]}" --decode_batches ""
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" run mfu_gpt2_no_graphs "${gpt2[@]}" --decode_batches ""
run mfu_gpt2_unrolled "${gpt2[@]}" --decode_batches "" --unroll_layers
goldens=tests/goldens/losses
run losses $PYTHON -m lm.bench losses --shape gpt2_124m --precision bf16 --steps 20
grep '^{' "$STAGES/losses.txt" > "$TRACES/losses_gpu.json"
run losses_compare $PYTHON -m lm.bench losses --compare "$TRACES/losses_gpu.json" \
  $goldens/gpt2_124m_cpu_bf16.json $goldens/gpt2_124m_cpu_fp32.json
if [ "${FULL:-0}" = 1 ]; then
  run step $PYTHON -m lm.bench step --steps 10 --rounds 3
  run layers $PYTHON -m lm.bench layers --depths 4,30
fi
exit $status
