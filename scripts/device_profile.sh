#!/usr/bin/env bash
# One device call: the CUDA build (scripts/device_test.sh; TESTS=1 also runs the GPU tests), the benchmark
# pair written meanwhile, then scripts/profile_pass.py: where a split pass's time goes on the GPU's clock
# (CUPTI), a chrome trace and a summary per system. SYSTEMS (default spac_ar), SHARE (default auto),
# TOKENS (default 12).
#   OUT=... bash scripts/device_profile.sh        -> $OUT/<system>.trace.json.gz, $OUT/<system>.summary.json
# Carry: .whl, .dev (bash scripts/device_prep.sh here first).
set -uo pipefail
OUT=${OUT:-/tmp/profile}
mkdir -p "$OUT"
T0=$(date +%s)
M=/tmp/spac-bench-full
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-model .whl/*.whl
[ -f $M/bench-target.gguf ] || { PYTHONPATH=/tmp/site-model:$PWD python3 scripts/make_bench_model.py --out $M --scale full \
    --vocab .dev/vocab/ggml-vocab-qwen2.gguf > /tmp/bench-model.log 2>&1 & }
SKIP_TESTS=$([ "${TESTS:-0}" = 1 ] && echo 0 || echo 1) bash scripts/device_test.sh 2>&1 | tee "$OUT/tests.txt" | tail -3
wait; tail -1 /tmp/bench-model.log 2>/dev/null
echo "build and model: $(( $(date +%s) - T0 )) s"
PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD python3 scripts/profile_pass.py --target $M/bench-target.gguf \
    --draft $M/bench-draft.gguf --out "$OUT" --systems "${SYSTEMS:-spac_ar}" --share "${SHARE:-auto}" \
    -n "${TOKENS:-12}" 2>&1 | grep -v "^llama\|^load\|^print_info" | tail -20
ls -la "$OUT"; echo "done in $(( $(date +%s) - T0 )) s"
