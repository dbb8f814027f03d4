"""Time the policy core at Qwen3-30B-A3B shape (48 layers × 128 experts, top-8, 5-row verify):
estimator update (µs, after warm-up) and balancer solve (ms), median and p90 over many rounds.
The solve is reported as wall time and as this thread's CPU time (on a shared machine the two part)."""
from __future__ import annotations

import argparse
import time

import numpy as np

from spac_gguf.balancer import Balancer
from spac_gguf.estimator import UtilityEstimator, update_ema, update_levels, warmup
from spac_gguf.hardware import load_profile


def timed(f, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return np.median(ts), np.percentile(ts, 90)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--hw", default="h100-pcie5")
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args(argv)
    L, E, k, R = a.layers, a.experts, a.k, a.rows
    rng = np.random.default_rng(0)
    pop = rng.zipf(1.3, (L, E)).astype(float)
    pop /= pop.sum(1, keepdims=True)
    passes = [np.stack([np.stack([rng.choice(E, k, replace=False, p=pop[l]) for l in range(L)])
                        for _ in range(R)]).astype(np.int32) for _ in range(20)]
    t = time.perf_counter()
    warmup()
    print(f"warm-up (compile or cache load): {1e3 * (time.perf_counter() - t):.0f} ms")
    U = np.zeros((L, E), np.float32)
    rows = [("estimator levels", "µs", 1e6, timed(lambda: update_levels(U, passes[0]), 5000)),
            ("estimator ema", "µs", 1e6, timed(lambda: update_ema(U, passes[0], 3, 0.8, 0.5), 5000))]
    hw = load_profile(a.hw)
    budget = hw.link_bytes_during_draft(R - 1)
    for split in (False, True):
        est = UtilityEstimator(L, E)
        bal = Balancer(hw, 2_650_000, split=split)
        resident = np.full((L, a.slots), -1, np.int32)
        ts, cpu = [], []
        for i in range(a.rounds):
            est.update(passes[i % len(passes)], 3)
            t = time.thread_time()
            plan = bal.solve(est.demand(), resident, budget)
            cpu.append(time.thread_time() - t)
            ts.append(plan.solve_s)
            for l, e, s in plan.loads:
                resident[l, s] = e
        name = f"balancer split={split} ({bal.fallbacks}/{bal.solves} fallbacks)"
        rows.append((name + " wall", "ms", 1e3, (np.median(ts), np.percentile(ts, 90))))
        rows.append((name + " CPU", "ms", 1e3, (np.median(cpu), np.percentile(cpu, 90))))
    print(f"{L} layers × {E} experts, top-{k}, {R} rows, {a.slots} slots, hw {hw.name}")
    print(f"{'':48s} {'median':>9s} {'p90':>9s}")
    for name, unit, scale, (med, p90) in rows:
        print(f"{name:48s} {med * scale:7.2f}{unit} {p90 * scale:7.2f}{unit}")


if __name__ == "__main__":
    main()
