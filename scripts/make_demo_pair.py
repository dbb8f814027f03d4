#!/usr/bin/env python3
"""Build the real-weights demo pair (SmolLM2-135M MoE target + dense draft) into the cache.

Thin wrapper over spac_gguf.demo.build_demo_pair; `--eval` also measures it
(spac_gguf.testing.demo_eval, docs/DEMO.md)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spac_gguf import demo  # noqa: E402
from spac_gguf.testing import demo_eval  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache-dir", help="default: $XDG_CACHE_HOME/spac-gguf or ~/.cache/spac-gguf")
    ap.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    ap.add_argument("--eval", action="store_true", help="print held-out perplexity, acceptance, routing stats")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for --eval")
    a = ap.parse_args(argv)
    t0 = time.time()
    last = [""]

    def progress(stage: str, done: float, total: float) -> None:
        if stage != last[0] or done >= total:
            print(f"[{time.time() - t0:6.1f}s] {stage} {done:g}/{total:g}", file=sys.stderr, flush=True)
            last[0] = stage

    target, draft = demo.build_demo_pair(a.cache_dir, progress=progress, force=a.force)
    print(f"target {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    print(f"draft  {draft} ({draft.stat().st_size / 2**20:.1f} MiB)")
    print(f"ready in {time.time() - t0:.1f}s", file=sys.stderr)
    if a.eval:
        print(json.dumps(demo_eval.evaluate_pair(target, draft, n_threads=a.threads), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
