#!/usr/bin/env python3
"""Write tiny deterministic MoE target + dense draft GGUF pairs for tests and `make run`.

    python scripts/make_test_models.py                       # all archs, Q8_0 experts, into the cache
    python scripts/make_test_models.py --out DIR --quant Q4_0 --arch qwen2moe

Writes DIR/<arch>-target.gguf and DIR/<arch>-draft.gguf.  Default DIR is
<cache>/test-models (what models.toml's `cache:test-models/...` paths point at).  Generation is
cached by content key (spac_gguf.testing.models.make_pair), so a rerun only copies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spac_gguf.registry import cache_dir  # noqa: E402
from spac_gguf.testing import models as testmodels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=cache_dir() / "test-models",
                    help="output folder (default: %(default)s)")
    ap.add_argument("--quant", default="Q8_0", choices=testmodels.QUANTS, help="routed-expert quant type")
    ap.add_argument("--arch", action="append", choices=testmodels.ARCHS,
                    help="arch to write (repeatable; default: all)")
    args = ap.parse_args(argv)
    for arch in args.arch or testmodels.ARCHS:
        for p in testmodels.make_pair(args.out, arch, args.quant):
            print(f"{p}  ({p.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
