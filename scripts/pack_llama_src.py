#!/usr/bin/env python3
"""Pack the pinned llama.cpp with patches/ applied, trimmed to what a CUDA build needs (~5 MB).

The GPU machine has no network: `scripts/device_test.sh` builds from this tarball.
    python scripts/pack_llama_src.py --out .dev/llama-src.tar.xz
"""
from __future__ import annotations

import argparse
import importlib.util
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DROP = {".git", "models", "docs", "benches", "tests", "media", "tools/ui"}
DROP_BACKENDS = {"vulkan", "sycl", "metal", "opencl", "cann", "hexagon", "webgpu", "openvino", "zdnn", "zendnn",
                 "et", "virtgpu", "musa", "hip"}


def _build_module():
    spec = importlib.util.spec_from_file_location("build_llama", ROOT / "scripts" / "build_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def keep(rel: str) -> bool:
    parts = rel.split("/")
    if any(rel == d or rel.startswith(d + "/") for d in DROP):
        return False
    if len(parts) >= 3 and parts[0] == "ggml" and parts[1] == "src" and parts[2].startswith("ggml-"):
        return parts[2][len("ggml-"):] not in DROP_BACKENDS
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / ".dev" / "llama-src.tar.xz"))
    args = ap.parse_args()
    b = _build_module()
    with tempfile.TemporaryDirectory() as tmp:
        src = b.unpack_and_patch(b.fetch_sdist(), Path(tmp), "cuda") / "vendor" / "llama.cpp"
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz") as tf:
            for p in sorted(src.rglob("*")):
                rel = p.relative_to(src).as_posix()
                if p.is_file() and keep(rel):
                    tf.add(p, arcname=f"llama.cpp/{rel}", recursive=False)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB, key {b.build_key('cuda', '90')})")


if __name__ == "__main__":
    main()
