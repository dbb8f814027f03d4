"""Routing traces with chosen locality, and the measurements that say what locality a trace has.

Random routing (the GPU benchmark's random-weight target) has none, so every cache hits about its
slot share there; real MoE routing reuses experts heavily from token to token. This module makes
that a parameter, so the simulator and the policies can be judged on routing like a real model's:

    generate(preset, ...)  -> RoutingTrace   the file format of `spac-gguf run --trace` (trace.py)

and `spac_gguf.testing.locality_stats.measure(trace)` says what locality a trace has (next-token
reuse, reuse within 8, median reuse distance, LRU hit at a share of experts, new experts per token).

The process, per prompt, layer and token, picks k distinct experts one at a time:
  1. with probability `reuse_next` one of the previous token's experts (temporal locality at 1),
  2. else with probability `reuse_window` an expert of a token 2..`window` back (a working set),
  3. else a draw from the layer's popularity: Zipf with exponent `skew` over a per-layer ranking,
     re-ranked between prompts (`prompt_shift`) and drifting inside one (`drift` rank swaps/token).
`layer_spread` scales 1–3 per layer by a factor in [1 − spread, 1 + spread], so layers differ;
`prompt_spread` scales 1–2 per prompt the same way, so prompts differ.

Speculative structure: the committed tokens are cut into verify passes of `draft_max + 1` rows;
each draft is accepted with probability `acceptance` (leading run), the rest of the pass are
rejected drafts whose routing comes from the same process, branching off the committed history.

`measure` is written independently of the generator (it only reads ids), so a test can hold the
`qwen3-calibrated` preset against the published numbers (DESIGN.md §10, docs/BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numba import njit

from .hardware import REF_EXPERT_BYTES
from .trace import RoutingTrace


@dataclass(frozen=True)
class Locality:
    reuse_next: float = 0.0      # P(a pick copies one of the previous token's experts)
    reuse_window: float = 0.0    # P(a pick copies an expert of a token 2..window back), given not 1.
    window: int = 8              # tokens back that step 2 reaches
    skew: float = 0.0            # Zipf exponent of the popularity draw (0 = uniform)
    drift: float = 0.0           # expected swaps of two random popularity ranks per token and layer
    prompt_shift: float = 1.0    # share of ranks re-shuffled at each new prompt (1 = new ranking)
    layer_spread: float = 0.0    # per-layer factor on reuse_next, reuse_window, skew: 1 ± spread
    prompt_spread: float = 0.0   # per-prompt factor on reuse_next and reuse_window: 1 ± spread


PRESETS = {
    "random": Locality(),
    # fitted to Qwen3-30B-A3B (kekzl/imp #1359), 48 × 128, top-8, 3 × 512 tokens: see the test
    "qwen3-calibrated": Locality(reuse_next=0.28, reuse_window=0.65, window=16, skew=1.0, drift=0.05,
                                 prompt_shift=0.5, layer_spread=0.15, prompt_spread=0.1),
    # a few experts carry most routes, with little temporal structure beyond what skew gives
    "high-skew": Locality(reuse_next=0.1, reuse_window=0.1, window=8, skew=1.6, drift=0.01,
                          prompt_shift=0.25, layer_spread=0.1),
}


def preset(name: str) -> Locality:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown routing preset {name!r}; known: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# generator


@njit(cache=True)
def _pick(hist, t, l, k, chosen, n_chosen, rn, rw, window, cum, perm_l):
    """One expert for row t of layer l, distinct from chosen[:n_chosen]; hist[t - d] is d tokens back."""
    for _ in range(64):
        u = np.random.random()
        if t >= 1 and u < rn:
            e = hist[t - 1, l, np.random.randint(k)]
        elif t >= 2 and np.random.random() < rw:
            d = 2 + np.random.randint(max(1, min(window, t) - 1))
            e = hist[t - d, l, np.random.randint(k)]
        else:
            r = np.searchsorted(cum, np.random.random() * cum[-1], side="right")
            e = perm_l[min(r, perm_l.shape[0] - 1)]
        if e not in chosen[:n_chosen]:
            return e
    # very unlikely: fall back to the first expert not chosen
    for e in range(perm_l.shape[0]):
        if e not in chosen[:n_chosen]:
            return e
    return -1


@njit(cache=True)
def _row(hist, t, k, rn, rw, window, cum, perm, out):
    """Routing of one row at history position t (hist[:t] is what came before), into out[L, k]."""
    L = out.shape[0]
    for l in range(L):
        for j in range(k):
            out[l, j] = _pick(hist, t, l, k, out[l], j, rn[l], rw[l], window, cum[l], perm[l])


@njit(cache=True)
def _segment(seed, n_tokens, k, rn, rw, window, cum, perm, drift, draft_max, acceptance, out_ids, out_acc):
    """One prompt: committed tokens cut into passes. Returns (rows, passes) written into out_*."""
    np.random.seed(seed)
    L, E = perm.shape
    R = draft_max + 1
    hist = np.empty((n_tokens + R, L, k), np.int32)   # committed tokens, then a scratch branch
    t = rows = passes = 0
    while t < n_tokens:
        a = 1
        while a < R and np.random.random() < acceptance:
            a += 1
        a = min(a, n_tokens - t)
        for r in range(R):
            # rows < a are committed tokens and extend the history; later rows are rejected drafts,
            # a branch off it that the next pass overwrites (it starts at t + a)
            _row(hist, t + r, k, rn, rw, window, cum, perm, hist[t + r])
            out_ids[rows + r] = hist[t + r]
            # popularity drift, once per row
            for l in range(L):
                if np.random.random() < drift:
                    i = np.random.randint(E)
                    j = np.random.randint(E)
                    perm[l, i], perm[l, j] = perm[l, j], perm[l, i]
        out_acc[passes] = a
        rows += R
        passes += 1
        t += a
    return rows, passes


def _per_layer(rng, value: float, spread: float, n_layers: int, hi: float) -> np.ndarray:
    f = 1.0 + spread * rng.uniform(-1.0, 1.0, n_layers)
    return np.clip(value * f, 0.0, hi)


def generate(loc: Locality | str = "qwen3-calibrated", *, n_layers: int = 48, n_expert: int = 128, k: int = 8,
             tokens: int = 512, prompts: int = 3, draft_max: int = 4, acceptance: float = 0.7, seed: int = 0,
             expert_bytes: int = REF_EXPERT_BYTES, dense_bytes: int | None = None) -> RoutingTrace:
    """A routing trace of `prompts` prompts × `tokens` committed tokens, in verify passes of
    draft_max + 1 rows (draft_max = 0: one row per pass, plain decoding). Same seed → same trace."""
    name = loc if isinstance(loc, str) else "custom"
    loc = preset(loc) if isinstance(loc, str) else loc
    if not 1 <= k <= n_expert:
        raise ValueError(f"k must be in 1..n_expert (got k={k}, n_expert={n_expert})")
    if tokens < 1 or prompts < 1 or draft_max < 0 or not 0.0 <= acceptance <= 1.0:
        raise ValueError("tokens and prompts must be >= 1, draft_max >= 0, acceptance in [0, 1]")
    rng = np.random.default_rng(seed)
    rn = _per_layer(rng, loc.reuse_next, loc.layer_spread, n_layers, 0.99)
    rw = _per_layer(rng, loc.reuse_window, loc.layer_spread, n_layers, 0.99)
    s = _per_layer(rng, loc.skew, loc.layer_spread, n_layers, 10.0)
    cum = np.cumsum(np.arange(1, n_expert + 1, dtype=np.float64)[None, :] ** -s[:, None], axis=1)
    base = np.stack([rng.permutation(n_expert) for _ in range(n_layers)]).astype(np.int32)
    R = draft_max + 1
    ids, starts, acc = [], [], []
    row0 = 0
    for p in range(prompts):
        perm = base.copy()
        n_shift = int(round(loc.prompt_shift * n_expert))
        for l in range(n_layers):                       # this prompt's ranking: part re-shuffled
            i = rng.choice(n_expert, n_shift, replace=False)
            perm[l, i] = perm[l, rng.permutation(i)]
        g = 1.0 + loc.prompt_spread * rng.uniform(-1.0, 1.0)
        rn_p, rw_p = np.clip(rn * g, 0.0, 0.99), np.clip(rw * g, 0.0, 0.99)
        out_ids = np.empty((tokens * R, n_layers, k), np.int32)
        out_acc = np.empty(tokens, np.int32)
        rows, passes = _segment(int(rng.integers(2**31 - 1)), tokens, k, rn_p, rw_p, int(loc.window), cum, perm,
                                float(loc.drift), draft_max, float(acceptance), out_ids, out_acc)
        ids.append(out_ids[:rows])
        acc.append(out_acc[:passes])
        starts.append(row0 + R * np.arange(passes, dtype=np.int32))
        row0 += rows
    meta = dict(arch=f"synthetic:{name}", n_expert=n_expert, k=k, draft_max=draft_max, n_layers=n_layers,
                moe_layers=n_layers, expert_bytes=int(expert_bytes),
                dense_bytes=int(dense_bytes if dense_bytes is not None else 8 * expert_bytes),
                target=None, draft=None, prompt_tokens=0, segments=[tokens] * prompts,
                locality=dict(asdict(loc), preset=name, seed=seed, acceptance=acceptance))
    return RoutingTrace(ids=np.concatenate(ids), pass_start=np.concatenate(starts), accepted=np.concatenate(acc),
                        meta=meta)
