"""Heterogeneous Workload Balancer: which experts occupy each layer's S GPU slots next round.

Per round a small MIP over demand d[l, e] (expected rows per verify pass, from the estimator):

    min  T + ε·Σ_new y                                  (ε: a nanosecond per load breaks ties)
    s.t. T ≥ Σ_e c_e·(1 − y_e − x_e)                     CPU: uncached experts it computes
         T ≥ G0 + Σ_e g_e·y_e + Σ_e k_e·x_e              GPU: dense + cached + experts copied on demand
         |R_l| ≤ Σ_{e in layer l} y_e ≤ S                slots (R_l resident: a slot is freed only by a load)
         Σ_{e not resident} y_e ≤ ⌊link bytes / B⌋        loads the link moves during the draft
         x_e + y_e ≤ 1,  y ∈ {0,1},  x ∈ [0,1]           x only with split=True
with q = 1 − exp(−d) (chance the expert is needed at all), B = expert bytes and
c = q·B/cpu_bw + d·t_cpu (CPU streams the expert), g = d·t_gpu, k = q·B/link_bw + d·t_gpu.
T is the epigraph of max(CPU, GPU + copy): one verify pass. x is the per-pass split of the
uncached work (copy an expert over the link at verify time and run it on the GPU instead of the CPU,
DESIGN.md §9); split=False models stock llama.cpp, where uncached experts always run on the CPU.

HiGHS needs ~1 ms for ~30 binaries, so at 48×128 the MIP searches a neighbourhood of the greedy
plan (`swap_pairs` by caching benefit c − g): the max_free/4 swaps each side of the greedy's cut are
free, everything else stays as the greedy has it (the split of the fixed uncached experts is one
aggregate column). With n_layers·n_expert ≤ max_free the whole problem is free and the MIP is exact.
The plan is the better of MIP and greedy under the exact cost (`pass_time`); a round where HiGHS
has not proven optimality within the time limit counts as a fallback.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import highspy
import numpy as np

from .hardware import HardwareProfile

INF = highspy.kHighsInf
EPS_LOAD_MS = 1e-6


class InfeasibleBudget(ValueError):
    """A cache budget (or link bytes per round) that no placement can satisfy."""


def slots_for_budget(budget_bytes: int, expert_bytes: int, n_layers: int, n_expert: int) -> int:
    """Slots per layer that a byte budget over all MoE layers buys."""
    S = int(budget_bytes) // (int(expert_bytes) * int(n_layers))
    if S < 1:
        raise InfeasibleBudget(f"budget of {budget_bytes} B holds no expert per layer: one slot in each of "
                               f"{n_layers} layers takes {expert_bytes * n_layers} B")
    return min(S, int(n_expert))


def swap_pairs(score: np.ndarray, resident: np.ndarray):
    """Every improving swap, best gain first: per layer the i-th best non-resident expert (score > 0)
    against the i-th worst slot (empty slots first). Returns arrays (l, e, slot, gain); gains fall
    along each layer, so any prefix of the list is a consistent set of swaps."""
    L, S = resident.shape
    occ = resident >= 0
    vs = np.where(occ, np.take_along_axis(score, np.maximum(resident, 0), axis=1), -np.inf)
    v_slot = np.argsort(vs, axis=1, kind="stable")
    v_score = np.take_along_axis(vs, v_slot, axis=1)
    cs = np.where(score > 0, score, -np.inf)
    li, si = np.nonzero(occ)
    cs[li, resident[li, si]] = -np.inf
    n = min(S, cs.shape[1])
    c_exp = np.argsort(-cs, axis=1, kind="stable")[:, :n]
    c_score = np.take_along_axis(cs, c_exp, axis=1)
    ok = (c_score > v_score[:, :n]) & np.isfinite(c_score)
    l, i = np.nonzero(ok)
    gain = c_score[l, i] - v_score[l, i]
    order = np.lexsort((-c_score[l, i], -gain))
    l, i = l[order], i[order]
    return l, c_exp[l, i], v_slot[l, i], gain[order]


def greedy_swaps(score: np.ndarray, resident: np.ndarray, max_loads: int) -> list[tuple[int, int, int]]:
    """(layer, expert, victim_slot): the `max_loads` best improving swaps of `swap_pairs`."""
    l, e, s, _ = swap_pairs(score, resident)
    m = max(0, int(max_loads))
    return list(zip(l[:m].tolist(), e[:m].tolist(), s[:m].tolist()))


def pass_time(c: np.ndarray, g: np.ndarray, k: np.ndarray, G0: float, cached: np.ndarray, split: bool) -> float:
    """One verify pass: max(CPU, GPU + copies), with the best split of uncached work when split=True
    (move experts to the link in order of CPU time saved per link time spent until both sides meet)."""
    A = float(c[~cached].sum())
    Bg = G0 + float(g[cached].sum())
    if not split or A <= Bg:
        return max(A, Bg)
    cu, ku = c[~cached].ravel(), k[~cached].ravel()
    order = np.argsort(-(cu / np.maximum(ku, 1e-300)), kind="stable")
    cu, ku = cu[order], ku[order]
    a_after = A - np.cumsum(cu)
    b_after = Bg + np.cumsum(ku)
    i = int(np.searchsorted(a_after <= b_after, True))   # first item whose full move crosses over
    if i == len(cu):
        return float(b_after[-1])
    a0 = a_after[i - 1] if i else A
    b0 = b_after[i - 1] if i else Bg
    f = (a0 - b0) / (cu[i] + ku[i])
    return float(a0 - cu[i] * f)


@dataclass
class Plan:
    loads: list[tuple[int, int, int]]   # (layer, expert, victim_slot)
    T: float                            # predicted verify seconds with this placement
    fallback: bool                      # MIP not proven optimal within the time limit
    solve_s: float


class Balancer:
    # HiGHS's MIP setup costs ~0.5 ms; its feasibility-jump heuristic and presolve cost ~10 ms more
    # on these models and never help (the greedy start is already feasible).
    OPTIONS = (("output_flag", False), ("threads", 1), ("presolve", "off"),
               ("mip_heuristic_run_feasibility_jump", False), ("mip_rel_gap", 1e-7), ("mip_abs_gap", 1e-9))

    def __init__(self, hw: HardwareProfile, expert_bytes: int, *, split: bool = False, max_free: int = 32,
                 time_limit_s: float = 0.001):
        self.hw = hw.require_complete()
        self.B = int(expert_bytes)
        self.split, self.max_free = bool(split), int(max_free)
        self.h = _quiet_highs()
        for key, val in self.OPTIONS + (("time_limit", float(time_limit_s)),):
            self.h.setOptionValue(key, val)
        self.solves = 0
        self.fallbacks = 0

    def costs(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(c, g, k) in milliseconds per (layer, expert) for demand d."""
        c, g, k = self.hw.expert_costs(d, self.B, p_need=1.0 - np.exp(-d))
        return 1e3 * c, 1e3 * g, 1e3 * k

    def solve(self, d: np.ndarray, resident: np.ndarray, link_bytes: int) -> Plan:
        t0 = time.perf_counter()
        d = np.asarray(d, np.float64)
        resident = np.asarray(resident, np.int32)
        L, E = d.shape
        S = resident.shape[1]
        if resident.shape[0] != L:
            raise ValueError(f"resident has {resident.shape[0]} layers, demand {L}")
        if link_bytes < 0:
            raise InfeasibleBudget(f"negative link bytes per round {link_bytes}")
        res = np.zeros((L, E), bool)
        li, si = np.nonzero(resident >= 0)
        res[li, resident[li, si]] = True
        if res.sum() != len(li):
            raise ValueError("an expert sits in two slots of one layer")
        max_loads = int(link_bytes) // self.B
        c, g, k = self.costs(d)
        G0 = 1e3 * self.hw.gpu_pass_s

        pl, pe, ps, _ = swap_pairs(c - g, resident)
        m = min(max_loads, len(pl))
        greedy = list(zip(pl[:m].tolist(), pe[:m].tolist(), ps[:m].tolist()))
        g_cached = _apply(res, resident, pl[:m], pe[:m], ps[:m])
        best = (pass_time(c, g, k, G0, g_cached, self.split) + EPS_LOAD_MS * m, greedy)

        if L * E <= self.max_free:
            free = np.ones((L, E), bool)                      # small instance: the whole problem
        else:                                                 # the swaps around the greedy cut
            w = slice(max(0, m - self.max_free // 4), m + self.max_free // 4)
            free = np.zeros((L, E), bool)
            free[pl[w], pe[w]] = True
            vic = resident[pl[w], ps[w]]
            free[pl[w][vic >= 0], vic[vic >= 0]] = True
        fixed = g_cached & ~free
        fallback = False
        if free.any():
            y, fallback = self._mip(c, g, k, G0, res, free, fixed, S, max_loads)
            if y is not None:
                cached = fixed | y
                loads = _loads_for(cached, res, resident, d)
                T = pass_time(c, g, k, G0, cached, self.split) + EPS_LOAD_MS * len(loads)
                if T <= best[0] + 1e-12:
                    best = (T, loads)
        self.solves += 1
        self.fallbacks += int(fallback)
        return Plan(best[1], (best[0] - EPS_LOAD_MS * len(best[1])) / 1e3, fallback, time.perf_counter() - t0)

    def _mip(self, c, g, k, G0, res, free, fixed, S, max_loads):
        """The MIP over the free experts (the rest fixed as `fixed` says), passed as CSC arrays.
        Returns (cached mask of the free experts or None, not proven optimal)."""
        L = c.shape[0]
        lj, ej = np.nonzero(free)
        J = len(lj)
        new = ~res[lj, ej]
        cj, gj, kj = c[lj, ej], g[lj, ej], k[lj, ej]
        rest = ~fixed & ~free & (c > 0)                       # uncached whatever the MIP does
        R_LOAD, R_CPU, R_GPU, R_SPLIT = L, L + 1, L + 2, L + 3
        jy = np.arange(J)
        rows = [lj, np.full(new.sum(), R_LOAD), np.full(J, R_CPU), np.full(J, R_GPU)]
        cols = [jy, jy[new], jy, jy]
        vals = [np.ones(J), np.ones(new.sum()), cj, -gj]
        n_col = J + 1
        if self.split:                                        # x_j per free expert, one x for the rest
            jx, jr = J + jy, 2 * J
            rows += [R_SPLIT + jy, R_SPLIT + jy, np.full(J, R_CPU), np.full(J, R_GPU), [R_CPU, R_GPU]]
            cols += [jy, jx, jx, jx, [jr, jr]]
            vals += [np.ones(J), np.ones(J), cj, -kj, [c[rest].sum(), -k[rest].sum()]]
            n_col = 2 * J + 2
        jT = n_col - 1
        rows.append([R_CPU, R_GPU])
        cols.append([jT, jT])
        vals.append([1.0, 1.0])
        rows, cols, vals = (np.concatenate([np.asarray(a) for a in x]) for x in (rows, cols, vals))
        nz = vals != 0
        order = np.argsort(cols[nz], kind="stable")
        rows, cols, vals = rows[nz][order].astype(np.int32), cols[nz][order], vals[nz][order].astype(np.float64)
        start = np.searchsorted(cols, np.arange(n_col)).astype(np.int32)

        n_row = R_SPLIT + (J if self.split else 0)
        row_lo = np.full(n_row, -INF)
        row_hi = np.full(n_row, INF)
        row_lo[:L] = res.sum(axis=1) - fixed.sum(axis=1)
        row_hi[:L] = S - fixed.sum(axis=1)
        row_hi[R_LOAD] = max_loads - (fixed & ~res).sum()
        row_lo[R_CPU] = cj.sum() + c[rest].sum()
        row_lo[R_GPU] = G0 + g[fixed].sum()
        row_hi[R_SPLIT:] = 1.0
        cost = np.zeros(n_col)
        cost[:J][new] = EPS_LOAD_MS
        cost[jT] = 1.0
        lo = np.zeros(n_col)
        hi = np.ones(n_col)
        hi[jT] = INF
        integ = np.zeros(n_col, np.int32)
        integ[:J] = 1
        h = self.h
        h.clearSolver()
        h.passModel(n_col, n_row, len(vals), 1, 1, 0.0, cost, lo, hi, row_lo, row_hi, start, rows, vals, integ)
        h.run()
        status = h.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            raise InfeasibleBudget("balancer model infeasible: the slots cannot hold what is resident")
        not_optimal = status != highspy.HighsModelStatus.kOptimal
        if h.getInfo().primal_solution_status != highspy.kSolutionStatusFeasible:
            return None, not_optimal
        yv = np.asarray(h.getSolution().col_value[:J]) > 0.5
        out = np.zeros_like(free)
        out[lj[yv], ej[yv]] = True
        return out, not_optimal


def _quiet_highs() -> highspy.Highs:
    """A Highs instance without its banner on stdout (it would corrupt `simulate --json`)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return h


def _apply(res: np.ndarray, resident: np.ndarray, l, e, s) -> np.ndarray:
    """Cached mask after loading experts e into slots s of layers l."""
    out = res.copy()
    old = resident[l, s]
    out[l[old >= 0], old[old >= 0]] = False
    out[l, e] = True
    return out


def _loads_for(cached: np.ndarray, res: np.ndarray, resident: np.ndarray, d: np.ndarray):
    """Loads that turn `resident` into `cached`: new experts by demand into the slots of the residents
    that leave (lowest demand first), then into empty slots."""
    L, S = resident.shape
    arrive = cached & ~res
    n_new = arrive.sum(axis=1)
    new = np.argsort(np.where(arrive, -d, np.inf), axis=1, kind="stable")[:, :S]
    occ = resident >= 0
    r = np.maximum(resident, 0)
    stays = occ & np.take_along_axis(cached, r, axis=1)
    key = np.where(occ, np.take_along_axis(d, r, axis=1), np.finfo(np.float64).max)
    free = np.argsort(np.where(stays, np.inf, key), axis=1, kind="stable")
    l, i = np.nonzero(np.arange(S)[None, :] < n_new[:, None])
    return list(zip(l.tolist(), new[l, i].tolist(), free[l, i].tolist()))


def inpass_share(hw: HardwareProfile, expert_bytes: int, rows: int, k: int, n_expert: int, n_slots: int,
                 miss_rate: float = 1.0, prev: float | None = None, hysteresis: float = 0.15,
                 reuse: float = 0.0, pass_slots: int | None = None, cpu_scale: float = 1.0) -> float:
    """The per-pass split (the fast path that runs before every verify, in microseconds): the share
    of a layer's distinct misses the GPU uploads and computes, the rest going to the CPU meanwhile.

    For m expected misses per layer (distinct experts of `rows` rows x the recent miss rate) it
    compares all on the GPU, m uploads (no host branch) plus a stop per extra row chunk (a pass
    whose experts can exceed the slots runs in chunks of slots // k rows; a plan also serves the
    chunks after it whose experts still fit, so this many stops is the most, met by rows that share
    no expert), with the best split: n uploads while the CPU takes m - n after the host branch's fixed
    cost c0, n = (c0 + m cpu) / (upload + cpu) so that both pipes finish together, plus one stop
    (`stop_s`) that nothing overlaps: the GPU waits for the CPU's results. 1 means no host
    branch. (Measured on the H200, K = 0: with ~2 misses per layer a split costs +77 us per layer
    (session 4), the serial stop; with ~6.7 misses share 0.5 saves 100-115 us per layer against all
    uploads since the host branch runs beside the slot branch (session 9; share 0.6 saved ~75 in
    session 8).)
    With a host branch the slots the pass's own hits hold cannot take a miss: a split's uploads go
    into the n_slots - hits free slots, then into the device's `pass_slots` (the C side stops loading
    when both are full), so n is capped at their sum; None leaves the cap out (the model as it was
    fitted, for callers that do not know the pool).

    An upload into a cache slot also leaves the expert there (one into a pass slot does not, so with
    `pass_slots` given only the uploads into free slots earn this): with probability `reuse`
    (measured by the engine: the share of a pass's misses that the next pass routes again) it spares
    the next pass that upload, so
    each option is priced at its pass time less reuse x its uploads' time (the CPU's work on a miss
    leaves nothing behind). The split point stays where both pipes of this pass finish together:
    beyond it more uploads lengthen the pass by more than they spare later. With
    locality (reuse 0.45 for Qwen3-30B-A3B) this keeps plain decoding all on the GPU, as measured on
    the H200 (71 vs 56 tok/s for a split); with random routing a split still wins.

    `cpu_scale`: the CPU's time per expert as measured while decoding, over the profile's
    (host_rate.HostRate: 1.03 on session 14's H200 host, 1.5 on session 15's); the split moves with
    it, the CPU's part shrinking where the CPU is slow today.

    `prev`, the share of the last pass: a switch between all-GPU (1) and a split needs the other to be
    `hysteresis` faster. The two run different graphs (with and without a host branch), so flipping on
    the recent miss rate's noise rebuilds graphs and was measured slower than either fixed choice.
    """
    hw.require_complete()
    miss_rate = min(max(float(miss_rate), 0.0), 1.0)
    distinct = n_expert * (1.0 - (1.0 - k / n_expert) ** rows)          # per layer, uniform routing
    m = distinct * miss_rate
    if m <= 0.0:                                                          # nothing to split: keep the graph
        return 1.0 if prev is None or prev >= 1.0 else 0.999
    cpu, gpu, copy = hw.expert_costs(rows * k / max(distinct, 1.0), expert_bytes)
    up = copy - gpu                                                       # the upload alone
    cpu *= float(cpu_scale)                                               # host_rate.HostRate keeps it in [1/4, 4]
    r = min(max(float(reuse), 0.0), 0.95)
    n = min(m, (hw.host_branch_s + m * cpu) / (up + cpu))   # both pipes finish together
    kept = n                                                  # uploads that stay in a cache slot
    if pass_slots is not None:
        free = max(0.0, n_slots - distinct * (1.0 - miss_rate))  # slots the pass's hits do not hold
        n = min(n, free + max(int(pass_slots), 0))
        kept = min(n, free)
    t_split = (hw.stop_s + max(n * up, hw.host_branch_s + (m - n) * cpu)
               - r * kept * up)                                            # less the uploads it spares later
    chunks = math.ceil(rows / max(1, n_slots // max(k, 1)))
    t_gpu = m * up * (1.0 - r) + (chunks - 1) * hw.stop_s
    if prev is None:
        all_gpu = t_gpu <= t_split
    elif prev >= 1.0:
        all_gpu = not t_split < (1.0 - hysteresis) * t_gpu
    else:
        all_gpu = t_gpu < (1.0 - hysteresis) * t_split
    # a split keeps its graph (a host branch) even while the CPU's part is empty
    return 1.0 if all_gpu else min(float(n / m), 0.999)
