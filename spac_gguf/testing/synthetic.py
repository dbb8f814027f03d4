"""Synthetic routing traces: Zipf-skewed expert popularity per layer that drifts between phases,
with temporal locality (a row repeats experts of the row before it)."""
from __future__ import annotations

import numpy as np

from ..trace import RoutingTrace


def synthetic_trace(n_passes=200, n_layers=4, n_expert=32, k=4, draft_max=4, *, zipf=1.1, locality=0.5,
                    phase=50, expert_bytes=1 << 20, dense_layers=(), seed=0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    rows = draft_max + 1
    logp = -zipf * np.log(np.arange(1, n_expert + 1))
    perm = np.stack([rng.permutation(n_expert) for _ in range(n_layers)])
    ids = np.empty((n_passes * rows, n_layers, k), np.int32)
    prev = None
    for r in range(n_passes * rows):
        if r % (phase * rows) == 0 and r:                       # drift: swap a quarter of the ranks
            for l in range(n_layers):
                i = rng.choice(n_expert, n_expert // 4, replace=False)
                perm[l, i] = perm[l, rng.permutation(i)]
        score = np.empty((n_layers, n_expert))
        np.put_along_axis(score, perm, np.broadcast_to(logp, perm.shape), axis=1)
        score += rng.gumbel(size=score.shape)
        if prev is not None:
            score[np.arange(n_layers)[:, None], prev] += np.where(rng.random(prev.shape) < locality, 50.0, 0.0)
        top = np.argpartition(-score, k - 1, axis=1)[:, :k]
        ids[r] = top
        prev = top
    for l in dense_layers:
        ids[:, l, :] = -1
    accepted = rng.integers(1, rows + 1, n_passes).astype(np.int32)
    meta = dict(arch="synthetic", n_expert=n_expert, k=k, draft_max=draft_max, expert_bytes=expert_bytes,
                dense_bytes=8 * expert_bytes, n_layers=n_layers, moe_layers=n_layers - len(dense_layers))
    return RoutingTrace(ids=ids, pass_start=np.arange(0, n_passes * rows, rows, dtype=np.int32),
                        accepted=accepted, meta=meta)
