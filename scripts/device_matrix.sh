#!/usr/bin/env bash
# One device call (< 10 minutes): the CUDA build (scripts/device_test.sh; TESTS=1 also runs the GPU
# tests), the issue-9 table in one benchmark run (every system incl. adaptive K and the all-GPU reference;
# ROUTINGS, BUDGETS, ACCEPTANCES override the replayed random and qwen3-calibrated
# routing, 17 % budget, set acceptance 0.7, bandwidths measured for the rooflines), then FIT=1 runs
# scripts/device_fit.sh (auto-fit against 12 GiB of free GPU memory). BENCH_ARGS adds bench_gpu.py flags
# (e.g. "--pass-slots 0 --spac-share 0.5").
#   OUT=... bash scripts/device_matrix.sh        -> $OUT/matrix.json, $OUT/matrix.log, $OUT/fit.txt
# Carry: .whl, .dev/llama-src.tar.xz, .dev/vocab.
set -uo pipefail
OUT=${OUT:-/tmp/matrix}
mkdir -p "$OUT"
T0=$(date +%s)
source scripts/device_setup.sh          # the CUDA build, the bench pair in $M
LEFT=$(( ${BUDGET_S:-570} - ($(date +%s) - T0) - $([ "${FIT:-1}" = 1 ] && echo "${FIT_S:-110}" || echo 0) ))
[ "$LEFT" -gt 90 ] || { echo "only $LEFT s left after the build: no benchmark"; exit 1; }
timeout $(( LEFT - 5 )) python3 scripts/bench_gpu.py --target $M/bench-target.gguf --draft $M/bench-draft.gguf \
    --routing ${ROUTINGS:-random,qwen3-calibrated} --budgets ${BUDGETS:-0.17} --acceptances ${ACCEPTANCES:-0.7} --repeats 2 --out "$OUT/matrix.json" \
    --systems ${SYSTEMS:-llama_ar_gpu,llama_ar_cpu,llama_sd_cpu,sd_lru,spac,spac_ak,spac_ar} --time-limit $(( LEFT - 40 )) ${BENCH_ARGS:-} > "$OUT/matrix.log" 2>&1
echo "bench exit $?"; grep -E "tps=|roofline|GB/s" "$OUT/matrix.log" | tail -14
[ "${FIT:-1}" = 1 ] && bash scripts/device_fit.sh > "$OUT/fit.txt" 2>&1 && tail -22 "$OUT/fit.txt"
echo "done in $(( $(date +%s) - T0 )) s"
