"""Cache policies behind one narrow interface, shared by the engine and the simulator.

    policy.observe(ids, accepted)                  after each verify pass; ids int32 [rows, n_layers, k], -1 ignored
    policy.plan(resident, link_bytes)       -> [(layer, expert, victim_slot), ...] loads to issue now

`resident` is int32 [n_layers, S] (-1 empty; slots with a load in flight show the incoming expert).
Every baseline ranks experts by a score and hands it to the balancer's `greedy_swaps`; `spac` runs
the estimator and the MIP balancer.
"""
from __future__ import annotations

import numpy as np

from .balancer import Balancer, greedy_swaps
from .estimator import UtilityEstimator
from .hardware import HardwareProfile
from .trace import RoutingTrace


def _used(ids: np.ndarray, n_expert: int) -> np.ndarray:
    """Rows per (layer, expert) in one pass, int64 [n_layers, n_expert]."""
    rows, L, k = ids.shape
    n = np.zeros((L, n_expert), np.int64)
    l = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    ok = ids >= 0
    np.add.at(n, (l[ok], ids[ok]), 1)
    return n


class Policy:
    name = "?"
    fallbacks = 0

    def __init__(self, n_layers: int, n_expert: int, expert_bytes: int):
        self.L, self.E, self.B = n_layers, n_expert, int(expert_bytes)

    def observe(self, ids: np.ndarray, accepted: int) -> None:
        pass

    def plan(self, resident: np.ndarray, link_bytes: int) -> list[tuple[int, int, int]]:
        return greedy_swaps(self.score(), resident, link_bytes // self.B)

    def score(self) -> np.ndarray:
        raise NotImplementedError


class NonePolicy(Policy):
    """All routed experts on the CPU (llama.cpp `-ot exps=CPU`)."""
    name = "none"

    def plan(self, resident, link_bytes):
        return []


class StaticPolicy(Policy):
    """Pins each layer's most-used experts of a calibration trace; never changes them."""
    name = "static"

    def __init__(self, n_layers, n_expert, expert_bytes, calibration: RoutingTrace):
        super().__init__(n_layers, n_expert, expert_bytes)
        self.counts = _used(calibration.ids, n_expert).astype(np.float64)

    def plan(self, resident, link_bytes):
        S = resident.shape[1]
        top = np.argsort(-self.counts, axis=1, kind="stable")[:, :S]
        pinned = np.zeros_like(self.counts)
        np.put_along_axis(pinned, top, np.take_along_axis(self.counts, top, axis=1), axis=1)
        return greedy_swaps(pinned, resident, link_bytes // self.B)


class LRUPolicy(Policy):
    """Keep the experts used most recently (score: pass of last use, ties by rows in that pass)."""
    name = "lru"

    def __init__(self, n_layers, n_expert, expert_bytes):
        super().__init__(n_layers, n_expert, expert_bytes)
        self.last = np.zeros((n_layers, n_expert))
        self.t = 0

    def observe(self, ids, accepted):
        self.t += 1
        n = _used(ids, self.E)
        self.last[n > 0] = self.t + n[n > 0] / (ids.shape[0] + 1.0)

    def score(self):
        return self.last


class LFUPolicy(Policy):
    """Keep the experts used most often since the start."""
    name = "lfu"

    def __init__(self, n_layers, n_expert, expert_bytes):
        super().__init__(n_layers, n_expert, expert_bytes)
        self.count = np.zeros((n_layers, n_expert))

    def observe(self, ids, accepted):
        self.count += _used(ids, self.E)

    def score(self):
        return self.count


class OraclePolicy(Policy):
    """Belady under the per-round link bytes (simulator only): rank by the next use in the future
    trace, score 1/(1 + passes to next use). It loads only what the link moves during one draft,
    so it is not an upper bound: on real routing LRU can beat it. The bound is `belady`."""
    name = "oracle_budgeted"

    def __init__(self, n_layers, n_expert, expert_bytes, trace: RoutingTrace):
        super().__init__(n_layers, n_expert, expert_bytes)
        self.used = [_used(trace.pass_rows(p), n_expert) > 0 for p in range(trace.n_passes)]
        self.nxt = np.full((n_layers, n_expert), np.inf)     # next pass ≥ the coming one that uses it
        self.succ = [None] * len(self.used)                  # pass p's experts: their next use after p
        for p in range(len(self.used) - 1, -1, -1):
            self.succ[p] = self.nxt[self.used[p]]
            self.nxt[self.used[p]] = p
        self.p = 0                                           # passes observed

    def observe(self, ids, accepted):
        self.nxt[self.used[self.p]] = self.succ[self.p]
        self.p += 1

    def score(self):
        return 1.0 / (1.0 + self.nxt - self.p)


class BeladyPolicy(OraclePolicy):
    """Belady's MIN with an unlimited link (simulator only): before each pass every layer holds the
    S experts the coming pass routes most rows to (then those whose next use is soonest). The
    simulator runs it with loads that cost nothing and finish at once (`unlimited_link`), so no
    policy, whatever it loads, hits more often: a pass can hit at most its S most-routed experts."""
    name = "belady"
    unlimited_link = True

    def __init__(self, n_layers, n_expert, expert_bytes, trace: RoutingTrace):
        super().__init__(n_layers, n_expert, expert_bytes, trace)
        self.rows = [_used(trace.pass_rows(p), n_expert) for p in range(trace.n_passes)]

    def score(self):
        soon = 1.0 / (2.0 + self.nxt - self.p)                # ≤ 1/2: used later than the coming pass
        if self.p >= len(self.rows):
            return soon
        n = self.rows[self.p]
        return np.where(n > 0, 1.0 + n, soon)


class SpacPolicy(Policy):
    """Utility estimator + MIP workload balancer."""
    name = "spac"

    def __init__(self, n_layers, n_expert, expert_bytes, hw: HardwareProfile, *, estimator: str = "ema",
                 split: bool = False):
        super().__init__(n_layers, n_expert, expert_bytes)
        self.estimator = UtilityEstimator(n_layers, n_expert, estimator)
        self.balancer = Balancer(hw, expert_bytes, split=split)

    @property
    def fallbacks(self):
        return self.balancer.fallbacks

    def observe(self, ids, accepted):
        self.estimator.update(ids, accepted)

    def plan(self, resident, link_bytes):
        return self.balancer.solve(self.estimator.demand(), resident, link_bytes).loads


NAMES = ("none", "static", "lru", "lfu", "oracle", "spac")          # "oracle": old name of oracle_budgeted
SIM_NAMES = ("none", "static", "lru", "lfu", "oracle_budgeted", "belady", "spac")   # the simulator's
ALIASES = {"oracle": "oracle_budgeted"}


def make_policy(name: str, n_layers: int, n_expert: int, expert_bytes: int, *, hw: HardwareProfile | None = None,
                calibration: RoutingTrace | None = None, future: RoutingTrace | None = None, **spac_kw) -> Policy:
    """A policy by name; static needs `calibration`, oracle_budgeted and belady the `future` trace
    (simulator only), spac `hw`. "oracle" is an alias of oracle_budgeted."""
    name = ALIASES.get(name, name)
    if name == "none":
        return NonePolicy(n_layers, n_expert, expert_bytes)
    if name == "static":
        if calibration is None:
            raise ValueError("static needs a calibration trace")
        return StaticPolicy(n_layers, n_expert, expert_bytes, calibration)
    if name == "lru":
        return LRUPolicy(n_layers, n_expert, expert_bytes)
    if name == "lfu":
        return LFUPolicy(n_layers, n_expert, expert_bytes)
    if name in ("oracle_budgeted", "belady"):
        if future is None:
            raise ValueError(f"{name} needs the future trace: simulator only")
        cls = BeladyPolicy if name == "belady" else OraclePolicy
        return cls(n_layers, n_expert, expert_bytes, future)
    if name == "spac":
        if hw is None:
            raise ValueError("spac needs a hardware profile")
        return SpacPolicy(n_layers, n_expert, expert_bytes, hw, **spac_kw)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(SIM_NAMES)}")
