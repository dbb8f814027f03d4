#!/usr/bin/env python3
"""CPU overheads, measured side by side in one run (docs/BENCHMARKS.md):

1. Python controller time per speculative round: wall time of the round minus the time spent inside
   llama_decode (target and draft), on a test pair and on SmolLM2-135M as target and draft.
2. Routing capture per target decode: none vs the Python eval callback vs the patch's export.
3. Expert cache, two-branch graph: decode time per token with the cache on (host slots, nothing
   mapped, i.e. equal placement) vs off, and with half the slots mapped.

    python scripts/bench_overhead.py [--smollm PATH] [--out docs/bench/overhead.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spac_gguf import native  # noqa: E402
from spac_gguf.testing import models as testmodels  # noqa: E402
from spac_gguf.cache import ExpertCache  # noqa: E402
from spac_gguf.llama_backend import LlamaContext, LlamaModel  # noqa: E402
from spac_gguf.pair import load  # noqa: E402


class DecodeTimer:
    """Wraps a context's decode to add up the seconds spent inside llama_decode (+ logits copy)."""

    def __init__(self, ctx: LlamaContext):
        self.ctx, self.seconds, self._orig = ctx, 0.0, ctx.decode

        def timed(tokens, logits="last"):
            t = time.perf_counter()
            try:
                return self._orig(tokens, logits)
            finally:
                self.seconds += time.perf_counter() - t
        ctx.decode = timed


def controller_overhead(target, draft, threads: int, n: int = 64, K: int = 4) -> dict:
    p = load(target, draft, n_ctx=512, n_threads=threads)
    list(p.generate("Warm up.", max_tokens=8, draft_max=K, adaptive=False))
    tt, dt = DecodeTimer(p.target_ctx), DecodeTimer(p.draft_ctx)
    t0 = time.perf_counter()
    last = None
    for last in p.generate("The history of the city begins in", max_tokens=n, draft_max=K, adaptive=False,
                           stop_at_eog=False):
        pass
    wall = time.perf_counter() - t0 - last.stats.t_prefill
    st = last.stats
    decode_s = tt.seconds + dt.seconds          # generation only: timers start after the warm-up
    decode_s -= st.t_prefill                     # the prefill decodes happened inside generate too
    rounds = st.n_target_passes
    out = {"rounds": rounds, "acceptance": st.acceptance_rate, "tokens": st.n_generated,
           "wall_ms_per_round": 1e3 * wall / rounds, "decode_ms_per_round": 1e3 * decode_s / rounds,
           "controller_ms_per_round": 1e3 * (wall - decode_s) / rounds,
           "routing_ms_per_round": 1e3 * p.verifier.routing_seconds / rounds}
    p.close()
    return out


def routing_overhead(target, threads: int, reps: int = 30) -> dict:
    res = {}
    for mode in ("off", "callback", "native"):
        if mode == "native" and not native.available():
            continue
        p = load(target, n_ctx=256, n_threads=threads, routing=mode)
        ctx = p.target_ctx
        ctx.decode(p.tokenize("Hello world"), "last")
        base = ctx.n_past
        times = []
        for i in range(reps):
            rows = [100 + i, 200, 300, 400, 500]
            t = time.perf_counter()
            if p.routing is not None:
                p.routing.begin()
            ctx.decode(rows, "all")
            if p.routing is not None:
                p.routing.end(len(rows))
            times.append(time.perf_counter() - t)
            ctx.rollback(base)
        res[mode] = 1e3 * statistics.median(times)
        p.close()
    res["callback_minus_off_ms"] = res["callback"] - res["off"]
    if "native" in res:
        res["native_minus_off_ms"] = res["native"] - res["off"]
    return res


def cache_overhead(target, threads: int, reps: int = 40) -> dict:
    if not native.available():
        return {"skipped": "no expert cache in this build"}
    m = LlamaModel(target)
    res = {}
    for mode in ("off", "on_nothing_mapped", "on_half_mapped"):
        ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
        if mode != "off":
            c = ExpertCache(ctx.ptr, n_slots=4, on_host=True)   # 4 of 8 experts per layer
            if mode == "on_half_mapped":
                for il in np.nonzero(c.cached_layers)[0]:
                    for s in range(c.n_slots):
                        c.load_async(int(il), s, s)
                c.wait_all()
                c.publish()
        ctx.decode([1, 2, 3], "last")
        times = []
        tok = 7
        for _ in range(reps):
            t = time.perf_counter()
            tok = int(np.argmax(ctx.decode([tok], "last")[0]))
            times.append(time.perf_counter() - t)
        res[mode] = 1e3 * statistics.median(times)
        ctx.close()
    res["overhead_nothing_mapped"] = res["on_nothing_mapped"] / res["off"] - 1
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smollm", default=None, help="SmolLM2-135M GGUF (default: the demo pair's draft)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/bench/overhead.json")
    a = ap.parse_args()
    q_t, q_d = testmodels.make_pair(arch="qwen3moe", quant="Q8_0")
    res = {"threads": a.threads, "native": native.available()}
    res["controller_test_qwen3moe"] = controller_overhead(q_t, q_d, a.threads)
    smol = a.smollm
    if smol is None:
        from spac_gguf.registry import pair_spec
        d = pair_spec("demo").draft
        smol = str(d) if d and d.exists() else None
    if smol:
        res["controller_smollm2_self"] = controller_overhead(smol, smol, a.threads)
    res["routing_per_decode_5rows_ms"] = routing_overhead(q_t, a.threads)
    res["cache_cpu_decode_ms_per_token"] = cache_overhead(q_t, a.threads)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
