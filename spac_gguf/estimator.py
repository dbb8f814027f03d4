"""Speculative Utility Estimator: routing of each K+1-row verify pass → utility U[layer, expert].

Two estimators, same input (`ids` int32 [rows, n_layers, k], -1 = dense layer / no expert, and
`accepted` = rows of the pass that became output) and same output (U float32, updated in place):

* `levels`: the reference state machine. U[l, e] is a level 0..5. The count n[l, e] is the number
  of rows of THIS verify pass (all K+1, accepted or not: the pass computes them all) routed to e at
  layer l; a row picks an expert at most once per layer, so 0 ≤ n ≤ K+1. Up one level when
  n − U ≥ 5, down one when U − n ≥ 1. With K+1 ≤ 5 rows only level 1 is reachable — that is the
  reference rule, kept as is; it suits larger drafts.
* `ema`: an exponential average with inertia β of the row-weighted count, accepted rows weighing 1
  and rejected rows `w_rej`: U ← β·U + (1 − β)·Σ_r w_r·[e ∈ ids[r, l]]. U is then the expected
  number of (accepted-equivalent) rows per pass that need the expert — the balancer's demand.
"""
from __future__ import annotations

import numpy as np
from numba import njit

LEVEL_UP = 5      # n − U ≥ LEVEL_UP → up one level
LEVEL_DOWN = 1    # U − n ≥ LEVEL_DOWN → down one level
LEVEL_MAX = 5


@njit(cache=True, nogil=True)
def _counts(ids, w_acc, w_rej, accepted, n):
    rows, n_layers, k = ids.shape
    for r in range(rows):
        w = w_acc if r < accepted else w_rej
        for l in range(n_layers):
            for j in range(k):
                e = ids[r, l, j]
                if e >= 0:
                    n[l, e] += w


@njit(cache=True, nogil=True)
def update_levels(U, ids):
    """Reference level machine, in place on U float32 [n_layers, n_expert]."""
    n = np.zeros(U.shape, np.float32)
    _counts(ids, np.float32(1.0), np.float32(1.0), 0, n)
    for l in range(U.shape[0]):
        for e in range(U.shape[1]):
            u = U[l, e]
            if n[l, e] - u >= LEVEL_UP and u < LEVEL_MAX:
                U[l, e] = u + 1
            elif u - n[l, e] >= LEVEL_DOWN:
                U[l, e] = u - 1


@njit(cache=True, nogil=True)
def update_ema(U, ids, accepted, beta, w_rej):
    """Exponential average with inertia beta; rows ≥ accepted (rejected drafts) weigh w_rej."""
    n = np.zeros(U.shape, np.float32)
    _counts(ids, np.float32(1.0), np.float32(w_rej), accepted, n)
    a = np.float32(1.0 - beta)
    b = np.float32(beta)
    for l in range(U.shape[0]):
        for e in range(U.shape[1]):
            U[l, e] = b * U[l, e] + a * n[l, e]


def warmup() -> None:
    """Compile (or load from the numba cache) both kernels so the first token pays no JIT."""
    U = np.zeros((2, 4), np.float32)
    ids = np.full((3, 2, 2), -1, np.int32)
    ids[0, 0, 0] = 1
    update_levels(U, ids)
    update_ema(U, ids, 1, 0.8, 0.5)


class UtilityEstimator:
    """U[layer, expert] from verify passes; `demand()` turns it into expected rows per pass."""

    KINDS = ("ema", "levels")

    def __init__(self, n_layers: int, n_expert: int, kind: str = "ema", *, beta: float = 0.8,
                 w_rej: float = 0.5):
        if kind not in self.KINDS:
            raise ValueError(f"estimator kind {kind!r} not in {self.KINDS}")
        self.kind, self.beta, self.w_rej = kind, float(beta), float(w_rej)
        self.U = np.zeros((n_layers, n_expert), np.float32)
        self._rows = 1.0
        warmup()   # at load (a policy is built with the model), never on the first generated token

    def update(self, ids: np.ndarray, accepted: int) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        self._rows = float(ids.shape[0])
        if self.kind == "ema":
            update_ema(self.U, ids, int(accepted), self.beta, self.w_rej)
        else:
            update_levels(self.U, ids)

    def demand(self) -> np.ndarray:
        """Expected rows per pass routed to each (layer, expert), float64.

        ema: U itself. levels: a level is a confidence, mapped linearly onto 0..rows of the last pass.
        """
        if self.kind == "ema":
            return self.U.astype(np.float64)
        return self.U.astype(np.float64) * (self._rows / LEVEL_MAX)
