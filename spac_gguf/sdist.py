"""The pinned llama-cpp-python sdist: what we build llama.cpp from (scripts/build_llama.py) and take
the tokenizer vocab files of the test models from (testmodels.py). Downloaded once, verified every
time; standard library only, so the build script can use it before anything else is installed."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .registry import cache_dir, sha256_file

SDIST_NAME = "llama_cpp_python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


class SdistError(RuntimeError):
    """The sdist could not be fetched or does not match the pinned hash."""


def path() -> Path:
    return cache_dir() / "sdist" / f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"


def fetch() -> Path:
    """The pinned sdist, downloaded from the package index once (pip) and verified every time."""
    dst = path()
    if dst.exists() and sha256_file(dst) == SDIST_SHA256:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    print(f"spac-gguf: downloading {SDIST_NAME}=={SDIST_VERSION} (sdist) from the package index", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-q", "-d", tmp, f"llama-cpp-python=={SDIST_VERSION}"])
        got_files = list(Path(tmp).glob("*.tar.gz"))
        if r.returncode != 0 or not got_files:
            raise SdistError(f"pip download of llama-cpp-python=={SDIST_VERSION} failed (exit {r.returncode})")
        got = sha256_file(got_files[0])
        if got != SDIST_SHA256:
            raise SdistError(f"sdist sha256 mismatch: got {got}, pinned {SDIST_SHA256}")
        part = dst.with_suffix(".part")
        shutil.copy2(got_files[0], part)
    part.rename(dst)
    return dst
