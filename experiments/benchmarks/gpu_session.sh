#!/usr/bin/env bash
# A lent GPU's checks in one command, cheapest first (README: "On a GPU session").
#   device run, carry [".whl"], timeout_s 560:  bash experiments/benchmarks/gpu_session.sh
# 1. the accelerator suite's own path on a tiny model, in seconds: a broken path stops here, not after minutes;
# 2. cuDNN flash attention against a float32 reference, forward and backward (tests/test_attention.py -m gpu);
# 3. the accelerator suite, resuming from this device's committed table where there is one: the rows it lacks
#    first, then (REFRESH=1, the default) its rows again, each kept where its new measurement finds no time; the
#    train steps compiled first, COMPILE_AHEAD (default 8) processes at once. Its time budget is what steps 1-2
#    left of SESSION_S (default 540 s, inside the run's 560), at most 450 s; SUITE_BUDGET_S sets it instead. Its
#    table is rewritten after each row, so a run stopped at the limit keeps what it measured.
#    Everything lands in $OUT (default /tmp/gpu_session).
# ATTENTION_TESTS=0 leaves step 2 out (60 s on an H200).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then  # pure-Python packages the device image lacks (dm-pix, ml-collections)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

python3 -m hybrid_jax.analysis.accelerator --library --smoke --in_process --models test_vit 2>&1 | tee "$OUT/smoke.txt"
if ! grep "| test_vit | xla |" "$OUT/smoke.txt" | grep -qv "failed"; then  # the XLA row: cuDNN's may fail alone
  echo "the smoke's XLA row failed: stopping before the suite"; exit 1
fi

if [ "${ATTENTION_TESTS:-1}" != 0 ]; then
  JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_attention.py 2>&1 \
    | tee "$OUT/attention_tests.txt" | tail -n 12
fi

left=$(( ${SESSION_S:-540} - SECONDS - 15 ))  # 15 s: the suite's start (the device kind) and its last table
budget=${SUITE_BUDGET_S:-$(( left < 450 ? left : 450 ))}
echo "accelerator suite: $SECONDS s into the session, time budget $budget s"
python3 -m hybrid_jax.analysis.accelerator --library --time_budget_s "$budget" --out_dir "$OUT" \
  --resume experiments/benchmarks $([ "${REFRESH:-1}" != 0 ] && echo --refresh) \
  --compile_ahead "${COMPILE_AHEAD:-8}" 2>&1 | tee "$OUT/accelerator_log.txt"
