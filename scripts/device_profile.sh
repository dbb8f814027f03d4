#!/usr/bin/env bash
# One device call: the CUDA build (scripts/device_test.sh; TESTS=1 also runs the GPU tests), the benchmark
# pair written meanwhile, then scripts/profile_pass.py: where a split pass's time goes on the GPU's clock
# (CUPTI), a chrome trace and a summary per system (with a split layer's phases, printed too).
# SYSTEMS (default spac_ar), SHARE (default auto), TOKENS (default 12).
#   OUT=... bash scripts/device_profile.sh        -> $OUT/<system>.trace.json.gz, $OUT/<system>.summary.json
# Carry: .whl, .dev (bash scripts/device_prep.sh here first).
set -uo pipefail
OUT=${OUT:-/tmp/profile}
mkdir -p "$OUT"
T0=$(date +%s)
source scripts/device_setup.sh          # the CUDA build, the bench pair in $M
echo "build and model: $(( $(date +%s) - T0 )) s"
PYTHONUNBUFFERED=1 python3 scripts/profile_pass.py --target $M/bench-target.gguf \
    --draft $M/bench-draft.gguf --out "$OUT" --systems "${SYSTEMS:-spac_ar}" --share "${SHARE:-auto}" \
    -n "${TOKENS:-12}" 2>&1 | grep -v "^llama\|^load\|^print_info" | tail -40
ls -la "$OUT"; echo "done in $(( $(date +%s) - T0 )) s"
