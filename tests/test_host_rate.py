"""The CPU's measured expert rate (host_rate.py) and the split that follows it (balancer.inpass_share)."""
from __future__ import annotations

import numpy as np
import pytest

from spac_gguf.balancer import inpass_share
from spac_gguf.engine import Engine, InPass, SimulatedSlotStore
from spac_gguf.hardware import load_profile
from spac_gguf.host_rate import HostRate
from spac_gguf.policies import LRUPolicy

EXPERT = 2_654_208                       # a Qwen3-30B-A3B Q4_K expert
HW = load_profile("h200-pcie5")


def _pass(rate: HostRate, true_scale: float, experts: int, pairs: int, rng, noise: float = 0.0):
    """A pass whose host time is true_scale x the profile's price of its CPU work (+ noise), beside
    made-up stop and plan times that the rate must take out."""
    stop, plan = rng.uniform(2e-3, 8e-3), rng.uniform(5e-4, 4e-3)
    host = true_scale * rate.modelled(experts, pairs) * (1.0 + noise * rng.standard_normal())
    rate.observe(stop + plan + host, stop, plan, 48, experts, pairs)


def test_the_scale_is_the_measured_over_the_modelled_cpu_time():
    rng = np.random.default_rng(0)
    rate = HostRate(HW, EXPERT)
    assert rate.scale == 1.0                                  # nothing measured: the profile
    for _ in range(30):                                       # K = 0 and K = 5 passes mixed
        experts = int(rng.choice([148, 652]))
        _pass(rate, 1.5, experts, int(experts * rng.uniform(1.0, 1.4)), rng)
    assert rate.scale == pytest.approx(1.5, rel=1e-9)
    assert rate.stats()["cpu_s_per_expert"] == pytest.approx(1.5 * rate.modelled(1, 1))


def test_the_scale_follows_a_machine_that_slows_down_and_ignores_passes_without_cpu_work():
    rng = np.random.default_rng(1)
    rate = HostRate(HW, EXPERT)
    for _ in range(20):
        _pass(rate, 1.0, 148, 148, rng, noise=0.05)
    assert rate.scale == pytest.approx(1.0, abs=0.06)
    for _ in range(30):                                       # the same host, 1.5x slower now
        _pass(rate, 1.5, 148, 148, rng, noise=0.05)
    assert rate.scale == pytest.approx(1.5, abs=0.08)
    n = rate.passes
    rate.observe(0.02, 0.005, 0.001, 48, 0, 0)                # every miss uploaded: no CPU work
    rate.observe(0.02, 0.030, 0.001, 48, 148, 148)            # parts that do not add up
    rate.observe(0.02, 0.005, 0.001, 0, 148, 148)             # no plan: not a split pass
    assert rate.passes == n


def test_the_layers_fixed_part_the_split_prices_apart_is_not_counted_twice():
    """A profile whose split rule adds a fixed host part per layer (host_branch_s, 180 us by default):
    the scale measures the experts only, so a host exactly as the profile says reads 1."""
    hw = load_profile("desktop-pcie4x16")
    assert hw.host_branch_s > 0
    rate = HostRate(hw, EXPERT)
    for experts in (40, 148, 652):
        model = rate.modelled(experts, experts)
        rate.observe(0.004 + 0.001 + 48 * hw.host_branch_s + model, 0.004, 0.001, 48, experts, experts)
    assert rate.scale == pytest.approx(1.0)


def test_a_measurement_ages_back_to_the_profile_and_says_when_it_has_none():
    rng = np.random.default_rng(3)
    rate = HostRate(HW, EXPERT, max_age=10)
    assert rate.stats()["cpu_scale"] is None                  # nothing measured: not a measured 1
    _pass(rate, 2.0, 148, 148, rng)
    for _ in range(9):
        rate.skipped()                                        # e.g. all-GPU passes, which measure nothing
    assert rate.scale == pytest.approx(2.0)
    rate.skipped()
    assert rate.scale == 1.0 and rate.stats()["cpu_scale"] is None
    _pass(rate, 1.5, 148, 148, rng)                           # a new measurement starts afresh
    assert rate.scale == pytest.approx(1.5)
    assert rate.total_measured / rate.total_modelled == pytest.approx((2.0 + 1.5) / 2)


def test_the_scale_is_clamped():
    rng = np.random.default_rng(2)
    rate = HostRate(HW, EXPERT)
    _pass(rate, 40.0, 148, 148, rng)
    assert rate.scale == HostRate.MAX_SCALE


def _modelled_pass(hw, share, m, cpu_scale):
    """The split rule's pass (per layer) at `share` of m misses, the CPU priced at cpu_scale x the profile."""
    cpu, gpu, copy = hw.expert_costs(1.0, EXPERT)
    n = share * m
    return max(n * (copy - gpu), hw.host_branch_s + (m - n) * cpu * cpu_scale)


@pytest.mark.parametrize("cpu_scale", [0.7, 1.0, 1.5, 2.5])
def test_the_split_moves_with_the_measured_cpu_and_is_the_brute_force_optimum(cpu_scale):
    """K = 0, random routing at 17 %: the share is where the modelled pass is shortest (a grid of
    shares searched by brute force), and a slower CPU gets a larger GPU share."""
    m_rate = 0.833
    share = inpass_share(HW, EXPERT, 1, 8, 128, 21, m_rate, cpu_scale=cpu_scale)
    assert share < 1.0
    m = 8 * m_rate
    grid = np.linspace(0.0, 1.0, 2001)
    best = grid[np.argmin([_modelled_pass(HW, s, m, cpu_scale) for s in grid])]
    assert share == pytest.approx(best, abs=1e-3)
    assert (inpass_share(HW, EXPERT, 1, 8, 128, 21, m_rate, cpu_scale=cpu_scale * 1.2) > share)


class RecordingRate(HostRate):
    """The rate, with every pass the engine hands it kept in `seen`."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def observe(self, *a):
        self.seen.append(a)
        super().observe(*a)


class CountingStore(SimulatedSlotStore):
    """The simulated store with the native counters the engine reads around a split pass."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.c = {"stop_s": 0.0, "plan_s": 0.0, "plans": 0, "inpass_loads": 0, "host_pairs": 0,
                  "direct_passes": 0, "inpass_wait_s": 0.0}

    def set_inpass(self, *a):
        pass

    def counters(self):
        return dict(self.c)

    def step(self, **extra):             # one split pass's counters: 2 plans, 1 upload, 3 pairs
        c = self.c
        self.c = {**c, "stop_s": c["stop_s"] + 0.002, "plan_s": c["plan_s"] + 0.001, "plans": c["plans"] + 2,
                  "inpass_loads": c["inpass_loads"] + 1, "host_pairs": c["host_pairs"] + 3,
                  **{k: c[k] + v for k, v in extra.items()}}


def test_the_engine_feeds_a_split_pass_host_time_and_cpu_experts_to_the_rate():
    """The engine hands the rate each steady split pass: its time, the counters' change over it (stop,
    plan, plans, pairs) and as the CPU's experts the pass's distinct misses less its in-pass uploads.
    A pass that uploaded every miss (share 1) teaches nothing, nor one of another shape than the pass
    before it (its graph was rebuilt on the host)."""
    store = CountingStore(2, 8, 2, EXPERT, link_gbps=1.0)
    store.c.update({"stop_s": 1.0, "plan_s": 0.5, "plans": 10, "inpass_loads": 100, "host_pairs": 7})
    rate = RecordingRate(HW, EXPERT)
    seen = rate.seen
    shares = iter([0.5, 0.5, 1.0, 0.5, 0.5])
    eng = Engine(store, LRUPolicy(2, 8, EXPERT), 0, inpass=InPass(share=None),
                 split=lambda *a, **kw: next(shares), host_rate=rate)
    ids = np.array([[[0, 1], [2, 3]], [[0, 4], [5, 5]]], np.int32)     # [rows, layers, k]: 6 distinct misses
    eng.before_verify(2)                                                 # the first pass of its shape
    eng.timed_pass(0.010)
    eng.after_verify(ids, 1)
    assert seen == []
    eng.before_verify(2)                                                 # nothing loaded: 6 misses again
    store.c = {**store.c, "stop_s": 1.004, "plan_s": 0.501, "plans": 12, "inpass_loads": 102, "host_pairs": 10}
    eng.timed_pass(0.010)
    eng.after_verify(ids, 1)
    assert len(seen) == 1
    pass_s, stop_s, plan_s, plans, experts, pairs = seen[0]
    assert (pass_s, plans, experts, pairs) == (0.010, 2, 6 - 2, 3)
    assert (stop_s, plan_s) == (pytest.approx(0.004), pytest.approx(0.001))
    assert rate.passes == 1
    for rows in (2, 2, 1):             # share 1 (all on the GPU), a split after it, one of another shape
        eng.before_verify(rows)
        eng.timed_pass(0.010)
        eng.after_verify(ids[:rows], 1)
    assert len(seen) == 1


def test_the_engine_learns_nothing_from_a_pass_after_a_prompt_an_aborted_pass_or_an_uncountable_one():
    """Only a split pass of the same shape as the verify before it, with nothing in between, teaches
    the rate: not the first verify after a prompt (its graph is built anew), not a pass whose
    after_verify never came (it raised midway: the next pass must not inherit its time), not one
    whose misses were partly served by loads under way or read in place (its CPU work is unknown);
    each of those ages the measurement instead."""
    store = CountingStore(2, 8, 2, EXPERT, link_gbps=1.0)
    rate = RecordingRate(HW, EXPERT)
    seen = rate.seen
    eng = Engine(store, LRUPolicy(2, 8, EXPERT), 0, inpass=InPass(share=None, prefetch=False),
                 split=lambda *a, **kw: 0.5, host_rate=rate)
    ids = np.array([[[0, 1], [2, 3]]], np.int32)

    def verify(seconds=0.010, finish=True, **extra):
        eng.before_verify(1)
        store.step(**extra)
        eng.timed_pass(seconds)
        if finish:
            eng.after_verify(ids, 1)

    verify()                                     # the first: not steady
    verify()
    assert len(seen) == 1 and seen[-1][4] == 4 - 1
    eng.other_decode()                           # a prompt
    verify()
    assert len(seen) == 1
    verify()
    assert len(seen) == 2
    verify(seconds=0.999, finish=False)          # raised before after_verify
    eng.other_decode()
    verify()                                     # not steady: learns nothing, its own or the other's
    assert len(seen) == 2
    verify(seconds=0.020)
    assert len(seen) == 3 and seen[-1][0] == 0.020
    age = rate.age
    verify(inpass_wait_s=1e-4)
    verify(direct_passes=1)
    assert len(seen) == 3 and rate.age == age + 2
