#!/usr/bin/env bash
# Here, before a device call: everything the GPU machine (no network) needs, in the two ignored folders
# that `carry` takes: .dev (the patched llama.cpp source packed, the test vocab GGUFs) and .whl (our cpu
# wheel, whose Python package the CUDA build reuses, and the Python deps the device image lacks).
#   bash scripts/device_prep.sh        then: run(command=..., carry=[".whl", ".dev"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY scripts/build_llama.py --variant cpu > /dev/null          # the cached wheel (seconds once built)
$PY scripts/pack_llama_src.py | tail -1
mkdir -p .whl .dev/vocab
rm -f .whl/llama_cpp_python-*.whl
cp "$($PY -c 'import sys; sys.path.insert(0, "scripts"); import build_llama as b; print(b.build_wheel("cpu", "90", 2))' | tail -1)" .whl/
# deps missing from the device image (its list: /work/.library/device/KINDS.md), one version each
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl gguf highspy diskcache 2>&1 | grep -v "^WARNING: Location" || true
for v in ggml-vocab-qwen2.gguf ggml-vocab-llama-spm.gguf; do
    cp "$($PY -c "from spac_gguf.testing.models import vocab_path; print(vocab_path('$v'))")" .dev/vocab/
done
ls -la .whl .dev .dev/vocab | grep -v "^total"
du -sh .whl .dev
