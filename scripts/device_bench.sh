#!/usr/bin/env bash
# Issue 6 on the GPU machine, one command (< 10 minutes): generate the Qwen3-30B-A3B-shaped random
# pair into /tmp, run the interleaved benchmark, write the JSON + table + plot.
#
# Assumes: cwd = repo root; the CUDA build of our llama.cpp at $CUDA_LIB (default /tmp/spac-cuda/lib:
# libllama.so + libggml*.so, e.g. from `SKIP_TESTS=1 bash scripts/device_test.sh`); llama_cpp, gguf, numpy (torch, matplotlib optional) on PYTHONPATH;
# the qwen2 vocab GGUF at $VOCAB (or one of the paths tried below).
# Outputs: docs/bench/gpu-DATE.{json,md,png} and copies in "$OUT" (when set), plus bench.log.
#
# Knobs (env): TAG (file name suffix), VOCAB, SCALE (full|small), MODELS (default /tmp/spac-bench-$SCALE), BENCH_ARGS (extra bench_gpu.py flags,
# e.g. "--systems spac,sd_lru --repeats 5"), BUDGET_S (total seconds, default 570).
set -euo pipefail
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
PY=${PY:-python3}
SCALE=${SCALE:-full}
MODELS=${MODELS:-/tmp/spac-bench-$SCALE}
DATE=$(date +%F)
OUTDIR=${OUT:-}
LOG=${OUTDIR:-/tmp}/bench.log
CUDA_LIB=${CUDA_LIB:-/tmp/spac-cuda/lib}
export PYTHONUNBUFFERED=1

if [ -z "${VOCAB:-}" ]; then
  for v in .dev/vocab/ggml-vocab-qwen2.gguf shared/ggml-vocab-qwen2.gguf .dev/ggml-vocab-qwen2.gguf ggml-vocab-qwen2.gguf \
           "$HOME/.cache/spac-gguf/vocab/0.3.36/ggml-vocab-qwen2.gguf"; do
    [ -f "$v" ] && VOCAB=$v && break
  done
fi
[ -f "${VOCAB:-}" ] || { echo "qwen2 vocab GGUF not found: set VOCAB=path/ggml-vocab-qwen2.gguf" >&2; exit 2; }
[ -f "$CUDA_LIB/libllama.so" ] || { echo "no libllama.so in $CUDA_LIB" >&2; exit 2; }
# llama_cpp's _ggml.py always loads libggml from its own package dir: put the CUDA libs there (as
# scripts/device_test.sh does) so one libggml is loaded; fall back to LLAMA_CPP_LIB_PATH if read-only.
PKG=$($PY -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llama_cpp').origin))")
if ! cmp -s "$CUDA_LIB/libllama.so" "$PKG/lib/libllama.so"; then
  if [ -w "$PKG/lib" ]; then cp -P "$CUDA_LIB"/*.so* "$PKG/lib/"
  else echo "warning: $PKG/lib is read-only; using LLAMA_CPP_LIB_PATH=$CUDA_LIB" >&2; export LLAMA_CPP_LIB_PATH=$CUDA_LIB; fi
fi

{
  echo "== device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  nproc; free -g | head -2
  $PY -c "import llama_cpp, sys; sys.path.insert(0, '.'); import llama_cpp.llama_cpp as l; \
llama_cpp._lib = getattr(llama_cpp, '_lib', l._lib); from spac_gguf import native, llama_backend; \
print('llama_cpp', llama_cpp.__version__, 'gpu', llama_backend.gpu_available(), 'expert cache', native.available())"

  echo "== models ($(( $(date +%s) - T0 )) s)"
  if [ ! -f "$MODELS/bench-target.gguf" ] || [ ! -f "$MODELS/bench-draft.gguf" ]; then
    $PY scripts/make_bench_model.py --out "$MODELS" --scale "$SCALE" --vocab "$VOCAB"
  else
    echo "reusing $MODELS"
  fi

  # what is left of the budget, less ~60 s for the last phase to finish and the report
  LEFT=$(( BUDGET_S - ($(date +%s) - T0) - 60 ))
  echo "== bench ($(( $(date +%s) - T0 )) s; time limit for new runs ${LEFT} s)"
  BENCH_DIR=${BENCH_DIR:-docs/bench}
  mkdir -p "$BENCH_DIR"
  JSON=$BENCH_DIR/gpu-$DATE${TAG:+-$TAG}.json
  timeout $(( LEFT + 50 )) $PY scripts/bench_gpu.py --target "$MODELS/bench-target.gguf" \
      --draft "$MODELS/bench-draft.gguf" --out "$JSON" --time-limit "$LEFT" ${BENCH_ARGS:-} || echo "bench exit $?"

  echo "== report ($(( $(date +%s) - T0 )) s)"
  if [ -f "$JSON" ]; then
    $PY scripts/report_gpu.py "$JSON" --out-dir "$BENCH_DIR" || echo "report exit $?"
    if [ -n "$OUTDIR" ] && [ "$(cd "$BENCH_DIR" && pwd)" != "$(cd "$OUTDIR" && pwd)" ]; then
      cp "$BENCH_DIR"/gpu-"$DATE${TAG:+-$TAG}".* "$OUTDIR"/ 2>/dev/null || true
    fi
  fi
  echo "== done in $(( $(date +%s) - T0 )) s"
} 2>&1 | tee "$LOG"
