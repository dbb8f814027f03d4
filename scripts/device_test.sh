#!/usr/bin/env bash
# On the GPU machine (no network): build the CUDA variant of our patched llama.cpp and run the GPU
# tests. Prepare here first: bash scripts/device_prep.sh (.dev: the patched source packed, the vocab
# GGUFs; .whl: our cpu wheel, whose Python package is reused, and the deps the device lacks), then run
# with .dev and .whl carried:  bash scripts/device_test.sh [pytest args]
set -euo pipefail
ROOT=$(pwd)
# the build lives outside the carried paths: carrying .dev replaces that folder on the device, so a
# build kept there was lost on every call and a warm machine rebuilt from nothing (180 s)
DEV=${CUDA_DIR:-/tmp/spac-cuda}
SITE=/tmp/site
mkdir -p "$DEV"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$ROOT"/.whl/*.whl
export PYTHONPATH=$SITE:$ROOT
# tokenizer vocab files for the test models (normally extracted from the sdist, absent here)
mkdir -p "$HOME/.cache/spac-gguf/vocab/0.3.36" && cp -n "$ROOT"/.dev/vocab/*.gguf "$HOME/.cache/spac-gguf/vocab/0.3.36/" 2>/dev/null || true
SHA=$(sha256sum "$ROOT/.dev/llama-src.tar.xz" | cut -c1-16)
if [ -f "$DEV/lib/libllama.so" ] && [ "$(cat "$DEV/src.sha" 2>/dev/null)" != "$SHA" ]; then
    # a warm machine with another source: copy only the files that changed, rebuild incrementally
    t0=$(date +%s)
    rm -rf "$DEV/new" && mkdir -p "$DEV/new" && tar -xJf "$ROOT/.dev/llama-src.tar.xz" -C "$DEV/new"
    python3 - "$DEV/new" "$DEV/src" <<'PY'
import filecmp, os, shutil, sys
new, old = sys.argv[1], sys.argv[2]
for d, _, files in os.walk(new):
    for f in files:
        a = os.path.join(d, f); b = os.path.join(old, os.path.relpath(a, new))
        if not os.path.exists(b) or not filecmp.cmp(a, b, shallow=False):
            os.makedirs(os.path.dirname(b), exist_ok=True); shutil.copy2(a, b); os.utime(b); print("changed:", b[len(old)+1:])
PY
    cmake --build "$DEV/build" --target llama -j "$(nproc)" > "$DEV/build.log" 2>&1 || { tail -50 "$DEV/build.log"; exit 1; }
    cp -P "$DEV"/build/bin/*.so* "$DEV/lib/" && echo "$SHA" > "$DEV/src.sha"
    echo "cuda rebuild: $(( $(date +%s) - t0 )) s"
fi
if [ ! -f "$DEV/lib/libllama.so" ]; then
    t0=$(date +%s)
    rm -rf "$DEV/src" && mkdir -p "$DEV/src" && tar -xJf "$ROOT/.dev/llama-src.tar.xz" -C "$DEV/src"
    cmake -S "$DEV/src/llama.cpp" -B "$DEV/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$DEV/cmake.log"
    cmake --build "$DEV/build" --target llama -j "$(nproc)" > "$DEV/build.log" 2>&1 || { tail -50 "$DEV/build.log"; exit 1; }
    mkdir -p "$DEV/lib" && cp -P "$DEV"/build/bin/*.so* "$DEV/lib/" && echo "$SHA" > "$DEV/src.sha"
    echo "cuda build: $(( $(date +%s) - t0 )) s"
fi
cp -P "$DEV"/lib/*.so* "$SITE/llama_cpp/lib/"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import llama_cpp, spac_gguf.native as n; print('llama_cpp', llama_cpp.__version__, 'native', n.available())"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    # a bound, so that a hang (a device wait nobody releases) ends the call with the tests named
    timeout -k 10 "${TEST_TIMEOUT_S:-360}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py "$@"
fi
