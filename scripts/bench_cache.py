#!/usr/bin/env python3
"""Expert-cache mechanism on a GPU: async load bandwidth, overlap with decode, tok/s vs share cached.

    python scripts/bench_cache.py --target bench-target.gguf --out docs/bench/cache-DATE.json

1. Async load path (worker thread: mmap -> pinned staging -> own CUDA stream) in GB/s, against a
   pinned cudaMemcpy of the same bytes (torch, in a subprocess so two CUDA runtimes never share a
   process with llama.cpp).
2. Overlap: loads issued, then decodes run while they complete; timestamps of both.
3. Plain decode tok/s with 0 %, 25 %, 100 % of every layer's experts resident in slots.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spac_gguf.cache import ExpertCache  # noqa: E402
from spac_gguf.llama_backend import LlamaContext, LlamaModel, Placement  # noqa: E402

TORCH_H2D = r"""
import json, sys, time, torch
n = int(sys.argv[1]); src = torch.empty(n, dtype=torch.uint8).pin_memory(); dst = torch.empty(n, dtype=torch.uint8, device="cuda")
for _ in range(3): dst.copy_(src, non_blocking=True)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): dst.copy_(src, non_blocking=True)
torch.cuda.synchronize(); print(json.dumps({"gbps": 10 * n / (time.perf_counter() - t) / 1e9}))
"""


def torch_h2d(nbytes: int) -> float | None:
    try:
        r = subprocess.run([sys.executable, "-c", TORCH_H2D, str(nbytes)], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])["gbps"]
    except Exception:  # noqa: BLE001 - torch is optional
        return None


def fill(cache: ExpertCache, share: float) -> int:
    """Load the first round(share * n_expert) experts of every cached layer and publish."""
    n = min(cache.n_slots, int(round(share * cache.n_expert)))
    for il in np.nonzero(cache.cached_layers)[0]:
        for s in range(n):
            cache.load_async(int(il), s, s)
    cache.wait_all()
    cache.publish()
    return n


def decode_tps(ctx: LlamaContext, n: int = 32) -> float:
    ctx.reset()
    ctx.decode([1, 2, 3, 4], "last")
    t = time.perf_counter()
    tok = 5
    for _ in range(n):
        logits = ctx.decode([tok], "last")[0]
        tok = int(np.argmax(logits))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=max(1, (__import__("os").cpu_count() or 2) - 1))
    a = ap.parse_args()
    res: dict = {"target": Path(a.target).name}
    m = LlamaModel(a.target, Placement(n_gpu_layers=99, experts_on_cpu=True))

    # 1 + 2: bandwidth and overlap, on a context with 32 slots per layer
    ctx = LlamaContext(m, n_ctx=256, n_threads=a.threads)
    cache = ExpertCache(ctx.ptr, n_slots=32, on_host=False)
    layers = [int(i) for i in np.nonzero(cache.cached_layers)[0]]
    ctx.decode([1, 2, 3], "last")
    jobs = [(il, e, e % 32) for il in layers for e in range(32, 36)]     # 4 experts per layer
    t0 = time.perf_counter()
    for il, e, s in jobs:
        cache.load_async(il, e, s)
    cache.wait_all()
    dt = time.perf_counter() - t0
    nbytes = len(jobs) * cache.expert_bytes
    res["async_load"] = {"experts": len(jobs), "bytes": nbytes, "seconds": dt, "gbps": nbytes / dt / 1e9,
                         "expert_bytes": cache.expert_bytes}
    res["torch_pinned_h2d_gbps_same_bytes"] = torch_h2d(nbytes)
    res["torch_pinned_h2d_gbps_one_expert"] = torch_h2d(cache.expert_bytes)

    cache.publish()
    events = []
    t0 = time.perf_counter()
    for il in layers:
        for s in range(4, 12):
            cache.load_async(il, 64 + s, s)
    events.append(("loads_issued", time.perf_counter() - t0))
    tok = 7
    while cache._tickets:
        d0 = time.perf_counter() - t0
        tok = int(np.argmax(ctx.decode([tok], "last")[0]))
        events.append(("decode", d0, time.perf_counter() - t0))
        done = cache.poll()
        if done:
            events.append(("loads_completed", len(done), time.perf_counter() - t0))
        if ctx.n_past > 200:
            ctx.rollback(3)
    res["overlap_timeline"] = events
    res["overlap_decodes_during_loads"] = sum(1 for e in events if e[0] == "decode")
    cache = None
    ctx.close()

    # 3: tok/s with 0 %, 25 %, 100 % of experts resident
    tps = {}
    for share in (0.0, 0.25, 1.0):
        c = LlamaContext(m, n_ctx=256, n_threads=a.threads)
        if share > 0:
            ec = ExpertCache(c.ptr, n_slots=max(1, int(round(share * 128))), on_host=False)
            fill(ec, share)
        tps[f"{int(share * 100)}%"] = decode_tps(c)
        c.close()
    plain = LlamaContext(m, n_ctx=256, n_threads=a.threads)
    tps["no_cache"] = decode_tps(plain)
    res["decode_tps_by_share_cached"] = tps
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "overlap_timeline"}, indent=1))


if __name__ == "__main__":
    main()
