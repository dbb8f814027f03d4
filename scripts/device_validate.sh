#!/usr/bin/env bash
# One device call (< 10 minutes) for what this repo still has to show on the GPU machine:
#   1. the CUDA build and the GPU tests (incl. auto-fit on the real device)   scripts/device_test.sh
#   2. auto-fit on the 18 GB benchmark model with no placement flag, in a pseudo-terminal so the
#      plan block and the live status line are captured as a user sees them   $OUT/autofit-capture.txt
#   3. spac's per-pass split rule (--spac-share auto) against fixed shares 1 and 0.7, K = 0 and 5,
#      random and qwen3-calibrated routing                                   $OUT/split-*.json
# Carry: .whl, .dev/llama-src.tar.xz, .dev/vocab (see scripts/device_test.sh).
set -uo pipefail
OUT=${OUT:-/tmp/validate}
mkdir -p "$OUT"
T0=$(date +%s)
bash scripts/device_test.sh 2>&1 | tail -5
export PYTHONPATH=/tmp/site:$PWD
M=/tmp/spac-bench-full
[ -f $M/bench-target.gguf ] || python3 scripts/make_bench_model.py --out $M --scale full --vocab .dev/vocab/ggml-vocab-qwen2.gguf | tail -1
PROMPT="<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
# `script` gives the CLI a terminal (the status line only shows on one); -q: no banner. First as is
# (the 18 GB model fits an H200: all on the GPU), then on a GPU squeezed to 12 GiB free (a cache plan).
for free in "" 12288; do
  timeout 120 env ${free:+SPAC_TEST_GPU_FREE_MIB=$free} script -q -c \
      "python3 -m spac_gguf.cli run $M/bench-target.gguf --draft $M/bench-draft.gguf -n 64 -p '$PROMPT'" \
      "$OUT/autofit-capture${free:+-$free}.txt" > /dev/null 2>&1 || echo "auto-fit run exit $?"
  sed -e 's/\x1b\[[0-9;]*[a-zA-Z]//g' "$OUT/autofit-capture${free:+-$free}.txt" | tr '\r' '\n' | grep -v '^\s*$' | head -12
done
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
B="python3 scripts/bench_gpu.py --target $M/bench-target.gguf --draft $M/bench-draft.gguf --routing random,qwen3-calibrated --budgets 0.17 --acceptances 0.7 --repeats 2 --no-bw"
for sh in auto 1 0.7; do
  LEFT=$(( 570 - ($(date +%s) - T0) ))
  [ "$LEFT" -gt 60 ] || { echo "no time left for share $sh"; break; }
  timeout $(( LEFT - 10 )) $B --out "$OUT/split-$sh.json" --systems spac_ar,spac$([ "$sh" = auto ] && echo ,llama_ar_cpu,sd_lru) \
      --spac-share $sh --time-limit $(( LEFT - 40 )) 2>&1 | grep -E "tps=" || echo "bench share $sh exit $?"
done
echo "done in $(( $(date +%s) - T0 )) s"
