"""Locality statistics of a routing trace: what `spac_gguf.locality`'s presets are held to.

Written independently of the generator (it reads ids only), so tests can check the
`qwen3-calibrated` preset against the published Qwen3-30B-A3B numbers (DESIGN.md §10,
docs/BENCHMARKS.md) and scripts/bench_locality.py can report every preset.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..trace import RoutingTrace


def committed(trace: RoutingTrace) -> tuple[np.ndarray, list[int]]:
    """The committed token stream (accepted rows of each pass, in order) [T, L, k] and its prompt
    lengths (meta["segments"] when the trace has them, else one prompt)."""
    keep = np.zeros(trace.ids.shape[0], bool)
    for a, n in zip(trace.pass_start.tolist(), trace.accepted.tolist()):
        keep[a:a + n] = True
    ids = trace.ids[keep]
    seg = trace.meta.get("segments")
    if not seg or sum(seg) != ids.shape[0]:
        seg = [int(ids.shape[0])]
    return ids, [int(s) for s in seg]


@njit(cache=True)
def _scan(ids, n_expert, cap, dist_hist, lru):
    """One prompt. dist_hist[d] += choices whose previous use (same layer) was d tokens back
    (d = 0: never used before in this prompt). lru[t, l] = LRU-cap misses of token t at layer l:
    the cache before token t holds the `cap` experts used most recently (ties: later pick first)."""
    T, L, k = ids.shape
    for l in range(L):
        stamp = np.full(n_expert, -1, np.int64)       # t * k + j of the last use
        for t in range(T):
            for j in range(k):
                e = ids[t, l, j]
                if e < 0:
                    continue
                s = stamp[e]
                if s < 0:
                    dist_hist[0] += 1
                    lru[t, l] += 1
                    continue
                d = t - s // k
                dist_hist[min(d, dist_hist.shape[0] - 1)] += 1
                newer = 0
                for x in range(n_expert):             # experts used after e, before token t
                    if stamp[x] > s and stamp[x] < t * k:
                        newer += 1
                if newer >= cap:
                    lru[t, l] += 1
            for j in range(k):
                e = ids[t, l, j]
                if e >= 0:
                    stamp[e] = t * k + j


def measure(trace: RoutingTrace, *, cache_share: float = 0.4, warmup: int = 64, window: int = 8) -> dict:
    """Locality statistics of the committed tokens of a trace, per prompt then pooled:

    next_token_reuse   share of a token's picks also picked by the token before (same layer)
    reuse_within       share of picks used in one of the `window` tokens before
    median_reuse_distance   median tokens back to the previous use (picks with one in the prompt)
    lru_hit            hit rate of an LRU cache of round(cache_share · n_expert) experts per layer
                       (demand-loaded, cold at each prompt), over all tokens
    lru_hit_steady     the same after `warmup` tokens; per_prompt lists it per prompt
    lru_miss_warmup    its miss rate over the first `warmup` tokens of each prompt
    new_per_layer_token     LRU misses per layer per token after warm-up (experts the cache must
                       fetch: 0.38–0.80 for Qwen3-30B-A3B), per prompt and pooled
    top_share          share of routes that go to the top 10 % of experts of each layer (skew)
    """
    ids, seg = committed(trace)
    E = trace.n_expert
    cap = max(1, int(round(cache_share * E)))
    dist = np.zeros(4097, np.int64)
    misses, picks, steady_m, steady_n, per_prompt = 0, 0, 0, 0, []
    warm_m, warm_n = 0, 0
    off = 0
    for n in seg:
        part = np.ascontiguousarray(ids[off:off + n])
        off += n
        lru = np.zeros(part.shape[:2], np.int64)
        _scan(part, E, cap, dist, lru)
        ok = (part >= 0).sum(axis=2)                 # picks per (token, layer); 0 for dense layers
        moe = ok.sum(axis=0) > 0
        misses += int(lru.sum())
        picks += int(ok.sum())
        m, c = int(lru[warmup:].sum()), int(ok[warmup:].sum())
        warm_m += int(lru[:warmup].sum())
        warm_n += int(ok[:warmup].sum())
        steady_m += m
        steady_n += c
        rows = max(1, (n - warmup) * int(moe.sum()))
        per_prompt.append(dict(lru_hit_steady=1 - m / c if c else float("nan"),
                               new_per_layer_token=m / rows if n > warmup else float("nan")))
    reused = dist[1:]
    n_reused = int(reused.sum())
    cdf = np.cumsum(reused)
    median = int(np.searchsorted(cdf, (n_reused + 1) / 2) + 1) if n_reused else float("nan")
    counts = np.zeros((ids.shape[1], E), np.int64)
    l = np.broadcast_to(np.arange(ids.shape[1])[None, :, None], ids.shape)
    ok = ids >= 0
    np.add.at(counts, (l[ok], ids[ok]), 1)
    top = max(1, int(round(0.1 * E)))
    srt = -np.sort(-counts, axis=1)
    n_moe_layers = int((counts.sum(axis=1) > 0).sum())
    return dict(
        picks=picks, cache_experts=cap,
        next_token_reuse=float(dist[1] / picks) if picks else float("nan"),
        reuse_within=float(dist[1:window + 1].sum() / picks) if picks else float("nan"),
        median_reuse_distance=median,
        lru_hit=1 - misses / picks if picks else float("nan"),
        lru_hit_steady=1 - steady_m / steady_n if steady_n else float("nan"),
        lru_miss_warmup=warm_m / warm_n if warm_n else float("nan"),
        new_per_layer_token=steady_m / max(1, sum(max(0, n - warmup) for n in seg) * n_moe_layers),
        top_share=float(srt[:, :top].sum() / max(1, counts.sum())),
        per_prompt=per_prompt,
    )
