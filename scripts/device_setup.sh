# Sourced by the device_*.sh scripts (not run on its own): the CUDA build (scripts/device_test.sh; TESTS=1
# also runs the GPU tests, into $OUT/tests.txt) while the full benchmark pair is written to $M (its own copy
# of the Python deps: the build's install replaces /tmp/site meanwhile), then PYTHONPATH for what follows.
M=/tmp/spac-bench-full
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-model $(find .whl -maxdepth 1 -type f -name "*.whl")  # callers may set -f
[ -f $M/bench-target.gguf ] || { PYTHONPATH=/tmp/site-model:$PWD python3 scripts/make_bench_model.py --out $M --scale full \
    --vocab .dev/vocab/ggml-vocab-qwen2.gguf > /tmp/bench-model.log 2>&1 & }
SKIP_TESTS=$([ "${TESTS:-0}" = 1 ] && echo 0 || echo 1) bash scripts/device_test.sh 2>&1 | tee "$OUT/tests.txt" | tail -4
wait; tail -1 /tmp/bench-model.log 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
