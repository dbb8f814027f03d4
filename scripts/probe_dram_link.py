"""Do host-to-device copies and CPU expert reads share host DRAM bandwidth? (GPU machine.)

A pass's misses can be uploaded (the DMA engine reads pinned host memory) or computed by the CPU
(its cores read the same experts from DRAM). Whether splitting a pass's misses between the two
pipes can beat either pipe alone depends on whether they add up: if the DMA's reads take DRAM
bandwidth from the cores, the split's roofline is DRAM bandwidth, not DRAM + link. This probe
measures, with numpy worker processes (like the benchmark's DRAM figure) and torch for the copies,
each pipe alone and both at once, at several core counts. Prints one JSON line.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

CHUNK = 64 << 20          # bytes a worker sums per step (64 MiB, far beyond any cache)


def _reader(go, stop, q, chunk):
    x = np.ones(chunk // 4, np.float32)
    x.sum()
    while True:
        go.wait()
        if stop.is_set():
            return
        steps = []
        while go.is_set():
            t = time.perf_counter()
            x.sum()
            steps.append((t, time.perf_counter()))
        q.put(steps)


def _cpu_rate(steps_per_worker, t0, t1, chunk) -> float:
    """GB/s the workers read inside [t0, t1]: each step counts by the part of it inside the window."""
    total = 0.0
    for steps in steps_per_worker:
        for a, b in steps:
            lo, hi = max(a, t0), min(b, t1)
            if hi > lo:
                total += chunk * (hi - lo) / (b - a)
    return total / (t1 - t0) / 1e9


def main() -> int:
    ncpu = os.cpu_count() or 1
    counts = sorted({ncpu, max(1, ncpu // 2), max(1, (3 * ncpu) // 4)}, reverse=True)
    ctx = mp.get_context("fork")            # fork before CUDA is initialised in this process
    stop = ctx.Event()
    pools = {}
    for n in counts:
        go, q = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_reader, args=(go, stop, q, CHUNK), daemon=True) for _ in range(n)]
        for p in procs:
            p.start()
        pools[n] = (go, q, procs)

    import torch
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    nbytes = 256 << 20
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()

    def dma(seconds: float) -> tuple[float, float, float]:
        """Copies 256 MiB at a time for about `seconds`; returns (t0, t1, GB/s)."""
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            n += 1
        t1 = time.perf_counter()
        return t0, t1, n * nbytes / (t1 - t0) / 1e9

    def run_cpu(n: int, during=None, seconds: float = 1.0):
        go, q, procs = pools[n]
        go.set()
        time.sleep(0.2)                      # every worker is streaming before the window opens
        if during is None:
            t0 = time.perf_counter()
            time.sleep(seconds)
            t1 = time.perf_counter()
            res = None
        else:
            t0, t1, res = during(seconds)
        go.clear()
        steps = [q.get(timeout=60) for _ in procs]
        return _cpu_rate(steps, t0, t1, CHUNK), res

    out = {"device": torch.cuda.get_device_name(0), "cpus": ncpu}
    out["link_alone_gbps"] = round(dma(1.0)[2], 2)
    for n in counts:
        alone, _ = run_cpu(n)
        cpu, link = run_cpu(n, during=dma)
        out[f"cpu{n}_alone_gbps"] = round(alone, 2)
        out[f"cpu{n}_with_link_gbps"] = round(cpu, 2)
        out[f"link_with_cpu{n}_gbps"] = round(link, 2)
        out[f"sum{n}_gbps"] = round(cpu + link, 2)
    out["link_alone_after_gbps"] = round(dma(1.0)[2], 2)
    stop.set()
    for go, _, procs in pools.values():
        go.set()
        for p in procs:
            p.join(timeout=5)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
