"""Replay a routing trace through each policy's real decision code (engine + SimulatedSlotStore)
and price every verify pass with the cost model of the balancer (`pass_time`).

One round on the simulated clock: before_verify (publish) → verify (priced from the pass's routing
and the published maps) → after_verify (loads start) → draft of rows−1 tokens (loads overlap it).

`belady` runs on an unlimited link (loads free and instant): its hit rate bounds every policy's.
`lookahead` measures how well each ranking (spac's estimator, LRU recency, LFU counts) names the
experts of the next pass: precision and recall of its top-S per layer, the paper's premise made a
number; `run_policy` reports the same for the experts a policy actually held (`held_*`).
"""
from __future__ import annotations


import numpy as np

from .balancer import InfeasibleBudget, pass_time, slots_for_budget
from .engine import Engine, SimulatedSlotStore
from .hardware import HardwareProfile
from .estimator import UtilityEstimator
from .policies import BeladyPolicy, LFUPolicy, LRUPolicy, Policy, _used, make_policy
from .sizes import parse_size
from .trace import RoutingTrace


def verify_time(ids: np.ndarray, cached: np.ndarray, hw: HardwareProfile, expert_bytes: int, split: bool) -> float:
    """Seconds of one verify pass: uncached routed experts stream through the CPU (or the link, with
    split), cached ones cost GPU time per routed row, on top of the dense GPU part."""
    n = _used(ids, cached.shape[1]).astype(np.float64)
    need = n > 0
    c, g, k = hw.expert_costs(n, expert_bytes, p_need=need.astype(np.float64))
    return pass_time(c, g, k, hw.gpu_pass_s, cached & need, split)


def slots_per_layer(trace: RoutingTrace, budget: str | None, slots: int | None) -> int:
    """Slots per layer from `--cache-slots N` or `--budget 2GiB|25%` (of the trace's expert bytes)."""
    if (budget is None) == (slots is None):
        raise ValueError("give exactly one of budget and cache_slots")
    L, E, B = trace.n_layers, trace.n_expert, int(trace.meta["expert_bytes"])
    if slots is not None:
        if not 0 <= slots <= E:
            raise InfeasibleBudget(f"cache_slots={slots} outside 0..{E}")
        return int(slots)
    return slots_for_budget(parse_size(budget, total=L * E * B), B, L, E)


def run_policy(trace: RoutingTrace, policy: Policy, S: int, hw: HardwareProfile, split: bool = False) -> dict:
    """Replay `trace` through `policy`. A policy with `unlimited_link` (belady) loads for free and at
    once; its passes are still priced with the cost model."""
    L, E, B = trace.n_layers, trace.n_expert, int(trace.meta["expert_bytes"])
    k_draft = int(trace.meta.get("draft_max", max(1, int(np.median(np.diff(trace.pass_start))) - 1)))
    free = bool(getattr(policy, "unlimited_link", False))
    store = SimulatedSlotStore(L, E, S, B, link_gbps=np.inf if free else hw.link_gbps)
    engine = Engine(store, policy, L * S * B if free else hw.link_bytes_during_draft(k_draft))
    total_s = 0.0
    tokens = 0
    both = held = used_n = 0
    for ids, accepted in trace.passes():
        engine.before_verify()
        cached = engine.cached()
        used = _used(ids, E) > 0
        both += int((cached & used).sum())
        held += int(cached.sum())
        used_n += int(used.sum())
        t = verify_time(ids, cached, hw, B, split)
        store.advance(t)
        engine.after_verify(ids, accepted)
        draft = (ids.shape[0] - 1) * hw.draft_s_per_token
        store.advance(draft)
        total_s += t + draft
        tokens += accepted
    st = engine.stats()
    P = max(1, trace.n_passes)
    return dict(hit_rate=st["hit_rate"], bytes_loaded=st["bytes_loaded"], pred_pass_ms=1e3 * total_s / P,
                pred_tps=tokens / total_s if total_s else 0.0, mean_solve_us=st["solve_us"],
                fallbacks=st["fallbacks"], slots_per_layer=S,
                held_precision=both / held if held else 0.0, held_recall=both / used_n if used_n else 0.0)


RANKERS = ("spac", "lru", "lfu", "belady")


def lookahead(trace: RoutingTrace, S: int, rankers=RANKERS) -> dict:
    """{ranker: {precision, recall}}: after each pass, each ranker's top-S experts per layer (score
    > 0) against the experts the next pass uses, pooled over passes and layers. spac = the
    estimator's demand (the ranking the balancer starts from), lru = recency, lfu = counts, belady =
    the coming pass's own routing (the ceiling: recall min(1, S / used))."""
    L, E = trace.n_layers, trace.n_expert
    make = {"spac": lambda: UtilityEstimator(L, E, "ema"), "lru": lambda: LRUPolicy(L, E, 1),
            "lfu": lambda: LFUPolicy(L, E, 1), "belady": lambda: BeladyPolicy(L, E, 1, trace)}
    passes = list(trace.passes())
    out = {}
    for name in rankers:
        r = make[name]()
        score = r.demand if name == "spac" else r.score
        observe = r.update if name == "spac" else r.observe
        both = pred_n = used_n = 0
        for p in range(len(passes) - 1):
            observe(*passes[p])
            sc = np.asarray(score(), np.float64)
            top = np.argpartition(-sc, min(S, E) - 1, axis=1)[:, :S] if S > 0 else np.zeros((L, 0), int)
            pred = np.zeros((L, E), bool)
            np.put_along_axis(pred, top, np.take_along_axis(sc, top, axis=1) > 0, axis=1)
            used = _used(passes[p + 1][0], E) > 0
            both += int((pred & used).sum())
            pred_n += int(pred.sum())
            used_n += int(used.sum())
        out[name] = dict(precision=both / pred_n if pred_n else 0.0, recall=both / used_n if used_n else 0.0)
    return out


def simulate(trace: RoutingTrace, policies: list, *, budget: str | None = None, cache_slots: int | None = None,
             hw: HardwareProfile, calibration: RoutingTrace | None = None, split: bool = False,
             with_lookahead: bool = False) -> dict:
    """{"policies": {name: {hit_rate, bytes_loaded, pred_pass_ms, pred_tps, mean_solve_us, fallbacks,
    held_precision, held_recall}}} (+ "lookahead": see `lookahead`, when asked).

    `policies` holds names (see policies.SIM_NAMES) or ready Policy objects. static calibrates on the
    first 20 % of the trace's passes unless `calibration` is given; it is then scored in-sample there.
    """
    hw.require_complete()
    S = slots_per_layer(trace, budget, cache_slots)
    if calibration is None:
        cut = max(1, trace.n_passes // 5)
        end = int(trace.pass_start[cut]) if cut < trace.n_passes else trace.ids.shape[0]
        calibration = RoutingTrace(trace.ids[:end], trace.pass_start[:cut], trace.accepted[:cut], trace.meta)
    L, E, B = trace.n_layers, trace.n_expert, int(trace.meta["expert_bytes"])
    out = {}
    for p in policies:
        if isinstance(p, Policy):
            pol = p
        else:
            kw = {"split": split} if p == "spac" else {}
            pol = make_policy(p, L, E, B, hw=hw, calibration=calibration, future=trace, **kw)
        out[pol.name] = run_policy(trace, pol, S, hw, split)
    res = {"policies": out, "slots_per_layer": S, "hw": hw.name, "passes": trace.n_passes}
    if with_lookahead:
        res["lookahead"] = lookahead(trace, S)
    return res


def format_table(result: dict) -> str:
    head = (f"{'policy':15s} {'hit rate':>8s} {'loaded':>10s} {'pass ms':>8s} {'tok/s':>8s} {'solve µs':>9s} "
            f"{'fallb.':>6s} {'held P':>6s} {'held R':>6s}")
    lines = [f"hw {result.get('hw', '?')}, {result.get('slots_per_layer', '?')} slots/layer, "
             f"{result.get('passes', '?')} passes", head]
    for name, r in result["policies"].items():
        lines.append(f"{name:15s} {r['hit_rate']:8.3f} {r['bytes_loaded'] / 2**30:7.2f}GiB {r['pred_pass_ms']:8.2f} "
                     f"{r['pred_tps']:8.1f} {r['mean_solve_us']:9.0f} {r['fallbacks']:6d} "
                     f"{r.get('held_precision', 0.0):6.3f} {r.get('held_recall', 0.0):6.3f}")
    if result.get("lookahead"):
        lines.append("lookahead (top-S per layer vs the next pass's experts): ranker precision recall")
        for name, r in result["lookahead"].items():
            lines.append(f"  {name:13s} {r['precision']:6.3f} {r['recall']:6.3f}")
    return "\n".join(lines)
