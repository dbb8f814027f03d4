#!/usr/bin/env python3
"""Build our patched llama-cpp-python wheel from the pinned sdist, cached by its inputs.

Inputs that define a build: the sdist's sha256, the bytes of every ``patches/*.patch`` (in
order), the variant (``cpu`` or ``cuda``) and the CUDA architectures.  The wheel is cached under
``$XDG_CACHE_HOME/spac-gguf/wheels/<key>/`` so an unchanged rebuild is a pip install (seconds).

    python scripts/build_llama.py                 # cpu wheel, installed into this interpreter
    python scripts/build_llama.py --variant cuda --cuda-arch 90
    python scripts/build_llama.py --print-key     # the cache key only
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                     # spac_gguf.sdist is standard library only
from spac_gguf.registry import cache_dir  # noqa: E402
from spac_gguf.sdist import SDIST_NAME, SDIST_SHA256, SDIST_VERSION, SdistError, fetch  # noqa: E402
PATCHES = ROOT / "patches"
# Bump when the build recipe itself (flags, version stamp) changes in a way patches do not show.
RECIPE = 1

COMMON_CMAKE = [
    "-DGGML_NATIVE=OFF",
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_OPENMP=ON",
]


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("*.patch"))


def build_key(variant: str, cuda_arch: str) -> str:
    h = hashlib.sha256()
    h.update(f"{SDIST_SHA256}|{variant}|{cuda_arch}|recipe{RECIPE}".encode())
    for p in patch_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def local_version(variant: str) -> str:
    return f"{SDIST_VERSION}+spac{RECIPE}.{variant}"


def fetch_sdist() -> Path:
    try:
        return fetch()
    except SdistError as e:
        sys.exit(f"build_llama: {e}")


def unpack_and_patch(sdist: Path, workdir: Path, variant: str) -> Path:
    with tarfile.open(sdist) as tf:
        tf.extractall(workdir, filter="data")
    src = workdir / f"{SDIST_NAME}-{SDIST_VERSION}"
    vendor = src / "vendor" / "llama.cpp"
    for p in patch_files():
        print(f"build_llama: applying {p.name}", flush=True)
        subprocess.run(["git", "apply", "--whitespace=nowarn", "-p1", str(p)], cwd=vendor, check=True)
    init = src / "llama_cpp" / "__init__.py"
    text = init.read_text()
    text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{local_version(variant)}"', text)
    init.write_text(text)
    return src


def build_wheel(variant: str, cuda_arch: str, jobs: int) -> Path:
    key = build_key(variant, cuda_arch)
    out = cache_dir() / "wheels" / key
    wheels = sorted(out.glob("*.whl"))
    if wheels:
        print(f"build_llama: cached wheel {wheels[0]}", flush=True)
        return wheels[0]
    sdist = fetch_sdist()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="spac-llama-") as tmp:
        src = unpack_and_patch(sdist, Path(tmp), variant)
        cmake = list(COMMON_CMAKE)
        if variant == "cuda":
            # NCCL off and static-archive symbols hidden: the CUDA runtime's copies of libstdc++
            # templates, exported from libggml-cuda, otherwise capture libllama's iostream calls
            # when Python loads it (segfault in llama_model::print_info; see docs/BENCHMARKS.md)
            cmake += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}", "-DGGML_CUDA_NCCL=OFF",
                      "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"]
        env = dict(os.environ)
        env["CMAKE_ARGS"] = " ".join(cmake)
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
        stage = Path(tmp) / "wheel"
        print(f"build_llama: building {variant} wheel (CMAKE_ARGS={env['CMAKE_ARGS']})", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-cache-dir", "-w", str(stage)],
            env=env, check=True,
        )
        built = sorted(stage.glob("*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        final = out / built[0].name
        shutil.copy2(built[0], final.with_suffix(".part"))
        final.with_suffix(".part").rename(final)
    (out / "build.json").write_text(json.dumps(
        {"variant": variant, "cuda_arch": cuda_arch, "seconds": round(time.time() - t0, 1),
         "patches": [p.name for p in patch_files()]}, indent=1))
    print(f"build_llama: built {final} in {time.time() - t0:.0f} s", flush=True)
    return final


def installed_version(python: str) -> str | None:
    r = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('llama_cpp_python'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["cpu", "cuda"], default=os.environ.get("SPAC_VARIANT", "cpu"))
    ap.add_argument("--cuda-arch", default=os.environ.get("SPAC_CUDA_ARCH", "90"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--python", default=sys.executable, help="interpreter to install the wheel into")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--print-key", action="store_true")
    args = ap.parse_args()
    key = build_key(args.variant, args.cuda_arch)
    if args.print_key:
        print(key)
        return
    wheel = build_wheel(args.variant, args.cuda_arch, args.jobs)
    if args.no_install:
        print(wheel)
        return
    # Reinstall when the wheel differs from what is installed (same version string, other patches).
    stamp = Path(args.python).absolute().parent.parent / ".spac-llama-key"
    if installed_version(args.python) == local_version(args.variant) and stamp.exists() \
            and stamp.read_text().strip() == key:
        print("build_llama: up to date", flush=True)
        return
    subprocess.run([args.python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
                   check=True)
    try:
        stamp.write_text(key + "\n")
    except OSError:
        pass
    print(f"build_llama: installed {wheel.name}", flush=True)


if __name__ == "__main__":
    main()
