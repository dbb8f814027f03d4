"""Asynchronous Execution Engine: loads issued right after a verify overlap the draft; maps change
only between decodes, and only to slots whose load has completed. With in-pass loads on, the C side
also copies a share of each pass's misses into slots during the pass (ordered before the slot branch
that computes them) and evicts by the policy's priority; the engine re-reads the ledger after it.

    engine.after_verify(ids, accepted)   re-read the ledger, count hits of that verify, update the policy,
                                         plan, issue loads
    engine.before_verify(rows)           poll completed loads, publish maps (never an incomplete slot),
                                         hand the in-pass policy (share for these rows, priorities) to the C side
    engine.timed_pass(seconds)           the verify decode's time: per pass kind, and with the counters' change over
                                         a steady split pass, the CPU's measured rate (host_rate.py) that the split reads
    engine.other_decode()                a prompt decoded on the target: the next verify's graph is built anew
    engine.stats()                       policy, slots_per_layer, hits, misses, bytes_loaded, solve_us, fallbacks
                                         (+ host_rate: cpu_scale, passes, ... where the split measures the CPU)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class InPass:
    """How a pass treats its misses: up to round(share x misses) (at most max_loads) are copied into
    slots and computed on the GPU, the rest by the CPU; share None: the balancer's split for the
    pass's rows (`balancer.inpass_share`). With share 1 the C side drops the host branch and runs
    the pass in row chunks that fit the slots, every miss evicting the lowest-priority expert the
    pass does not need. With a host branch a miss takes the slot of the lowest-priority expert not
    routed now only if that priority is below its own + routed_bonus x its rows in the pass: inf
    always evicts (LRU, the upstream design, and spac: with a bonus of 1 a split's misses loaded less
    and the hit rate fell, replayed routing at share 0.7: qwen3-calibrated 0.782 vs 0.821, high-skew
    0.799 vs 0.846, random 0.293 vs 0.317).

    direct_rows: a pass of at most this many rows copies nothing and has no host branch: the GPU
    computes its misses reading them from pinned host memory (no stop in the pass; the cache then
    changes only between passes, by the policy's loads). 0: off.

    prefetch: between passes, also load what the policy's plan ranks highest. spac turns it off:
    with in-pass loads its MIP's prefetch lowered the hit rate (replayed qwen3-calibrated routing,
    17 %: K = 5 0.804 with it, 0.828 without; K = 0 0.785 / 0.786) and costs a solve."""
    share: float | None = 1.0
    max_loads: int = 1 << 20
    routed_bonus: float = math.inf
    direct_rows: int = 0
    prefetch: bool = True

    def __post_init__(self):
        if not 0 <= self.direct_rows <= 4:              # LLAMA_MOE_DIRECT_MAX_ROWS
            raise ValueError(f"direct_rows must be in 0..4, not {self.direct_rows}")


class SlotStore(Protocol):
    n_layers: int
    n_expert: int
    n_slots: int                     # per layer
    expert_bytes: int                # one expert, all projections

    def resident(self) -> np.ndarray: ...       # int32 [n_layers, n_slots]: complete slots, -1 empty
    def load_async(self, layer: int, expert: int, slot: int) -> None: ...
    def poll(self) -> list[tuple[int, int]]: ...  # (layer, slot) loads completed since the last poll
    def loading(self) -> dict[tuple[int, int], int]: ...  # (layer, slot) -> expert whose load is in flight
    def publish(self) -> None: ...               # maps from completed slots; only between decodes


class Engine:
    def __init__(self, store: SlotStore, policy, link_bytes: int, inpass: InPass | None = None,
                 plan_every: int = 1, split=None, host_rate=None):
        self.store, self.policy = store, policy
        self.link_bytes = int(link_bytes)
        self.inpass = inpass
        self.plan_every = max(1, int(plan_every))      # plan loads after every n-th pass (link bytes x n)
        self._passes = 0
        self.split = split                              # (rows, miss rate, last share, reuse=) -> share, when inpass.share is None
        self._sent: np.ndarray | None = None            # the priority the C side holds
        self._sent_share: float | None = None
        self._sent_direct = 0
        L = store.n_layers
        self.live = np.zeros((L, store.n_expert), bool)       # published: what the next verify reads
        self.hits = self.misses = self.bytes_loaded = 0
        self.miss_rate = 1.0                            # a cold cache misses everything
        self.reuse: dict[int, float] = {}               # rows -> share of the last pass's misses a pass of that many rows routes again (EMA)
        self._missed: np.ndarray | None = None          # [n_layers * n_expert]: the last pass's misses
        self._routed: np.ndarray | None = None          # [n_layers * n_expert]: the last pass's experts
        self.solve_s: list[float] = []
        self.timers: dict[str, float] = {}              # seconds per step, summed (benchmarks read them)
        # verify passes by "rows:gpu" (every miss uploaded, no host branch) or "rows:split" (a CPU share):
        # [count, seconds summed, in-pass share summed]: whether the split pays, and at which share, is
        # then a measurement, not only the cost model's
        self.pass_seconds: dict[str, list] = {}
        self._pass_key: str | None = None
        self._pass_share = 1.0
        # the CPU's measured rate (host_rate.HostRate, which the split reads): a split pass's counters
        # before it, then its host time and uploads until its routing gives the experts it missed
        self.host_rate = host_rate
        self._counters_before: dict | None = None
        self._last_key: str | None = None               # the last verify's rows and kind
        self._host_pass: tuple | None = None

    def _lap(self, what: str, t0: float) -> float:
        t = time.perf_counter()
        self.timers[what] = self.timers.get(what, 0.0) + (t - t0)
        return t

    def _sync(self) -> None:
        sync = getattr(self.store, "sync", None)
        if sync is not None:
            sync()                                          # in-pass loads (any decode, prompts too) moved slots

    def before_verify(self, rows: int = 1) -> None:
        t = time.perf_counter()
        self._counters_before = self._host_pass = None  # what a pass that raised midway left behind
        self._sync()
        t = self._lap("ledger", t)
        self.store.poll()
        self.store.publish()
        res = self.store.resident()
        self.live[:] = False
        l, s = np.nonzero(res >= 0)
        self.live[l, res[l, s]] = True
        t = self._lap("poll_publish", t)
        if self.inpass is not None:
            share = self.inpass.share
            if share is None:
                share = (self.split(rows, self.miss_rate, self._sent_share, reuse=self.reuse_for(rows))
                         if self.split is not None else 1.0)
            set_direct = getattr(self.store, "set_direct", None)
            if set_direct is not None and self.inpass.direct_rows != self._sent_direct:
                set_direct(self.inpass.direct_rows)     # layers without pinned GPU experts keep the other paths
                self._sent_direct = self.inpass.direct_rows
            pr = np.asarray(self.priority(), np.float32)
            if self._sent is None or share != self._sent_share or not np.array_equal(pr, self._sent):
                self.store.set_inpass(share, self.inpass.max_loads, pr, self.inpass.routed_bonus)
                self._sent, self._sent_share = pr, share
            key = f"{rows}:{'gpu' if share >= 1.0 else 'split'}"
            # a pass of another shape than the last rebuilds the graph on the host, time the CPU rate
            # must not take for expert work (the first 1-row pass of a K = 5 run took 39 ms, the
            # steady ones 17.5: its sample alone sent the split to all-GPU passes): steady passes only
            steady, self._last_key = key == self._last_key, key
            self._pass_key = key
            self._pass_share = float(share)
            counters = getattr(self.store, "counters", None)
            self._counters_before = (counters() if self.host_rate is not None and counters and share < 1.0
                                     and steady else None)
            self._lap("inpass_policy", t)

    def other_decode(self) -> None:
        """The target decoded something else (a prompt): the next verify's graph is built anew."""
        self._last_key = None

    def timed_pass(self, seconds: float) -> None:
        """The verify decode that followed before_verify took `seconds` (the verifier times it)."""
        if self._pass_key is not None:
            c = self.pass_seconds.setdefault(self._pass_key, [0, 0.0, 0.0])
            c[0] += 1
            c[1] += seconds
            c[2] += self._pass_share
            self._pass_key = None
        if self._counters_before is not None:
            a, b = self._counters_before, self.store.counters()
            d = {key: b[key] - a[key] for key in ("stop_s", "plan_s", "plans", "inpass_loads", "host_pairs",
                                                  "direct_passes", "inpass_wait_s")}
            # a miss served by a load already under way, or read in place on the GPU, is neither
            # uploaded in the pass nor computed by the CPU: such a pass's CPU work is not known
            self._host_pass = None if d["direct_passes"] or d["inpass_wait_s"] else (seconds, d)
            self._counters_before = None

    def reuse_for(self, rows: int) -> float:
        """The measured reuse for passes of `rows` rows (more rows route more experts, so reuse grows
        with them), else that of the nearest row count measured, else 0."""
        if not self.reuse:
            return 0.0
        return self.reuse[min(self.reuse, key=lambda r: (abs(r - rows), r))]

    def priority(self) -> np.ndarray:
        """[n_layers, n_expert]: which experts deserve a slot: the estimator's utility plus 1 for the
        experts the last pass routed (its per-pass averages blur recency, which decides at K = 5 with
        locality: on replayed routing the hit rate went 0.828 -> 0.835 at K = 5 qwen3-calibrated,
        0.843 -> 0.846 high-skew, unchanged at K = 0 and on random routing); else the policy's score."""
        est = getattr(self.policy, "estimator", None)
        if est is None:
            return self.policy.score()
        d = est.demand()
        if self._routed is not None:
            d = d + self._routed.reshape(d.shape)
        return d

    def after_verify(self, ids: np.ndarray, accepted: int) -> None:
        t = time.perf_counter()
        self._sync()
        t = self._lap("ledger", t)
        ids = np.asarray(ids, np.int32)
        E = self.live.shape[1]
        flat = (np.arange(ids.shape[1])[None, :, None] * E + ids)[ids >= 0]   # (layer, expert) of each routed entry
        live = self.live.reshape(-1)
        h, n = int(np.count_nonzero(live[flat])), int(flat.size)
        self.hits += h
        self.misses += n - h
        if n:                                           # recent miss rate (EMA over passes) for the split
            self.miss_rate += 0.2 * ((n - h) / n - self.miss_rate)
            routed = np.zeros(live.size, bool)
            routed[flat] = True
            if self._missed is not None and self._missed.any():   # locality: what an upload spares later
                seen = np.count_nonzero(self._missed & routed) / np.count_nonzero(self._missed)
                r = self.reuse.get(ids.shape[0])
                self.reuse[ids.shape[0]] = seen if r is None else r + 0.2 * (seen - r)
            self._missed = routed & ~live
            self._routed = routed
            if self._host_pass is not None:           # the split pass's CPU experts: misses not uploaded
                seconds, d = self._host_pass
                self.host_rate.observe(seconds, d["stop_s"], d["plan_s"], d["plans"],
                                       int(np.count_nonzero(self._missed)) - d["inpass_loads"], d["host_pairs"])
            elif self.host_rate is not None:          # all-GPU, not steady, or not countable: nothing learnt
                self.host_rate.skipped()
        self._host_pass = None
        t = self._lap("hits", t)
        self.policy.observe(ids, accepted)
        t = self._lap("observe", t)
        self._passes += 1
        if self._passes % self.plan_every or (self.inpass is not None and not self.inpass.prefetch):
            return

        view = self.store.resident().copy()
        loading = self.store.loading()                  # the store's ledger is the one truth
        for (ll, s), e in loading.items():
            view[ll, s] = e
        link_left = self.link_bytes * self.plan_every - len(loading) * self.store.expert_bytes
        t = self._lap("plan_view", t)
        loads = self.policy.plan(view, max(0, link_left))
        self.solve_s.append(time.perf_counter() - t)
        t = self._lap("plan", t)
        B = self.store.expert_bytes
        for ll, e, s in loads:
            if link_left < B or (ll, s) in loading or (view[ll] == e).any():
                continue                                    # over the link's bytes, slot busy, or already there
            self.store.load_async(ll, e, s)
            loading[(ll, s)] = e
            view[ll, s] = e
            link_left -= B
            self.bytes_loaded += B
        self._lap("issue_loads", t)

    def cached(self) -> np.ndarray:
        """bool [n_layers, n_expert]: experts the current maps point at."""
        return self.live

    def stats(self) -> dict:
        n = self.hits + self.misses
        return dict(policy=self.policy.name, slots_per_layer=self.store.n_slots, hits=self.hits,
                    misses=self.misses, hit_rate=self.hits / n if n else 0.0, bytes_loaded=self.bytes_loaded,
                    solve_us=1e6 * float(np.mean(self.solve_s)) if self.solve_s else 0.0,
                    fallbacks=int(self.policy.fallbacks),
                    **({"host_rate": self.host_rate.stats()} if self.host_rate is not None else {}))


class SimulatedSlotStore:
    """The slot store on a simulated clock: loads queue on one link of `link_gbps`, each finishing
    after its transfer time plus a random extra latency in [0, jitter_s) (so completions reorder)."""

    def __init__(self, n_layers: int, n_expert: int, n_slots: int, expert_bytes: int, *, link_gbps: float,
                 jitter_s: float = 0.0, seed: int = 0):
        self.n_layers, self.n_expert, self.n_slots, self.expert_bytes = n_layers, n_expert, n_slots, expert_bytes
        self.link_Bps = link_gbps * 1e9
        self.jitter_s = jitter_s
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self.link_free = 0.0
        self.slots = np.full((n_layers, n_slots), -1, np.int32)     # complete contents
        self.maps = np.full((n_layers, n_slots), -1, np.int32)      # what a decode reads
        self.pending: dict[tuple[int, int], tuple[float, int]] = {}  # (layer, slot) -> (done at, expert)

    def advance(self, dt: float) -> None:
        self.now += dt

    def resident(self) -> np.ndarray:
        return self.slots.copy()

    def load_async(self, layer: int, expert: int, slot: int) -> None:
        if (layer, slot) in self.pending:
            raise RuntimeError(f"load into busy slot {layer}/{slot}")
        start = max(self.now, self.link_free)
        self.link_free = start + self.expert_bytes / self.link_Bps
        extra = self.rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0
        self.pending[(layer, slot)] = (self.link_free + extra, expert)
        self.slots[layer, slot] = -1                                 # overwritten from now on

    def loading(self) -> dict[tuple[int, int], int]:
        return {key: e for key, (_, e) in self.pending.items()}

    def poll(self) -> list[tuple[int, int]]:
        done = [key for key, (t, _) in self.pending.items() if t <= self.now]
        for key in done:
            self.slots[key] = self.pending.pop(key)[1]
        return done

    def publish(self) -> None:
        self.maps[:] = self.slots

    def decode(self) -> np.ndarray:
        """A verify reads the maps: check that none points at a slot being overwritten."""
        for (l, s) in self.pending:
            if self.maps[l, s] >= 0:
                raise AssertionError(f"map of layer {l} points at slot {s} while its load is in flight")
        return self.maps.copy()
