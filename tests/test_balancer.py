import itertools

import numpy as np
import pytest

from spac_gguf.balancer import EPS_LOAD_MS, Balancer, InfeasibleBudget, greedy_swaps, slots_for_budget
from spac_gguf.hardware import HardwareProfile

HW = HardwareProfile("test", link_gbps=10.0, cpu_expert_gbps=20.0, cpu_s_per_expert_token=2e-5,
                     gpu_s_per_expert_token=5e-5, gpu_pass_s=3e-4, draft_s_per_token=1e-3)
B = 1_000_000


def best_split_T(c, g, k, G0, cached, split):
    """Dual of min_x max(A − Σc·x, G + Σk·x): max over λ of λA + (1−λ)G + Σ min(0, (1−λ)k − λc),
    a concave piecewise-linear function, so its maximum sits at 0, 1 or a breakpoint k/(c+k)."""
    A, G = c[~cached].sum(), G0 + g[cached].sum()
    if not split:
        return max(A, G)
    cu, ku = c[~cached], k[~cached]
    lams = np.r_[0.0, 1.0, ku / np.maximum(cu + ku, 1e-300)]
    return max(l * A + (1 - l) * G + np.minimum(0, (1 - l) * ku - l * cu).sum() for l in lams)


def brute(bal, d, resident, budget):
    """Min of T + ε·loads over every placement with |R_l| ≤ experts ≤ S per layer (a resident leaves
    only for a load) and ≤ budget/B new ones."""
    L, E = d.shape
    S = resident.shape[1]
    c, g, k = bal.costs(d)
    res = np.zeros((L, E), bool)
    for l in range(L):
        res[l, resident[l][resident[l] >= 0]] = True
    per_layer = [[m for n in range(res[l].sum(), S + 1) for m in itertools.combinations(range(E), n)]
                 for l in range(L)]
    best = np.inf
    for choice in itertools.product(*per_layer):
        cached = np.zeros((L, E), bool)
        for l, m in enumerate(choice):
            cached[l, list(m)] = True
        loads = int((cached & ~res).sum())
        if loads * B > budget:
            continue
        best = min(best, best_split_T(c, g, k, 1e3 * HW.gpu_pass_s, cached, bal.split) + EPS_LOAD_MS * loads)
    return best


def random_instance(rng, L, E, S):
    d = rng.exponential(1.0, (L, E)) * (rng.random((L, E)) < 0.8)
    resident = np.full((L, S), -1, np.int32)
    for l in range(L):
        n = int(rng.integers(0, S + 1))
        resident[l, rng.choice(S, n, replace=False)] = rng.choice(E, n, replace=False)
    return d, resident


def plan_value(bal, d, resident, plan):
    c, g, k = bal.costs(d)
    cached = np.zeros(d.shape, bool)
    for l in range(d.shape[0]):
        cached[l, resident[l][resident[l] >= 0]] = True
    for l, e, s in plan.loads:
        if resident[l, s] >= 0:
            cached[l, resident[l, s]] = False
        cached[l, e] = True
    return best_split_T(c, g, k, 1e3 * HW.gpu_pass_s, cached, bal.split) + EPS_LOAD_MS * len(plan.loads)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_equals_brute_force(split, seed):
    rng = np.random.default_rng(seed)
    L, E, S = int(rng.integers(1, 3)), int(rng.integers(3, 7)), int(rng.integers(1, 4))
    d, resident = random_instance(rng, L, E, S)
    budget = int(rng.integers(0, 4)) * B + int(rng.integers(0, B))
    bal = Balancer(HW, B, split=split, time_limit_s=1.0)
    plan = bal.solve(d, resident, budget)
    want = brute(bal, d, resident, budget)
    assert plan_value(bal, d, resident, plan) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert plan.T * 1e3 + EPS_LOAD_MS * len(plan.loads) == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("max_free", [8, 32])
def test_never_exceeds_slots_or_link_bytes(max_free):
    rng = np.random.default_rng(7)
    bal = Balancer(HW, B, split=True, max_free=max_free)
    L, E, S = 6, 32, 4
    d, resident = random_instance(rng, L, E, S)
    for _ in range(20):
        budget = int(rng.integers(0, 12)) * B
        plan = bal.solve(d, resident, budget)
        assert len(plan.loads) * B <= budget
        slots = [(l, s) for l, _, s in plan.loads]
        assert len(set(slots)) == len(slots)
        for l, e, s in plan.loads:
            assert e not in resident[l]
            resident[l, s] = e
        for l in range(L):
            live = resident[l][resident[l] >= 0]
            assert len(set(live.tolist())) == len(live) <= S
        d = np.maximum(d + rng.normal(0, 0.5, d.shape), 0)
    assert bal.solves == 20


def test_greedy_swaps_matches_sorting_reference():
    rng = np.random.default_rng(3)
    score = rng.random((3, 8)) - 0.2
    resident = np.array([[0, 1, -1], [2, 3, 4], [-1, -1, -1]], np.int32)
    got = greedy_swaps(score, resident, 100)
    want = []
    for l in range(3):
        vict = sorted(range(3), key=lambda s: -np.inf if resident[l, s] < 0 else score[l, resident[l, s]])
        cand = sorted((e for e in range(8) if e not in resident[l] and score[l, e] > 0), key=lambda e: -score[l, e])
        for e, s in zip(cand, vict):
            v = -np.inf if resident[l, s] < 0 else score[l, resident[l, s]]
            if score[l, e] > v:
                want.append((l, e, s))
    assert sorted(got) == sorted(want)
    assert len(greedy_swaps(score, resident, 2)) == 2


def test_infeasible_budgets_raise():
    with pytest.raises(InfeasibleBudget, match="holds no expert"):
        slots_for_budget(10 * B, B, 48, 128)
    assert slots_for_budget(100 * B, B, 48, 128) == 2
    assert slots_for_budget(10**15, B, 48, 128) == 128
    with pytest.raises(InfeasibleBudget):
        Balancer(HW, B).solve(np.ones((1, 4)), np.full((1, 2), -1, np.int32), -1)


@pytest.mark.parametrize("rows,miss_rate", [(1, 1.0), (1, 0.8), (1, 0.25), (6, 0.7), (6, 0.2), (8, 1.0)])
def test_inpass_share_is_the_best_split(rows, miss_rate):
    """The share minimises the layer's time against a brute-force search over every number of
    uploads n of the m expected misses: all on the GPU (m uploads, no host branch, share 1) or
    one stop + max(n uploads, host-branch cost + (m - n) CPU experts)."""
    from spac_gguf.balancer import inpass_share
    hw = HardwareProfile("t", link_gbps=40.0, cpu_expert_gbps=50.0, cpu_s_per_expert_token=2e-6,
                         gpu_s_per_expert_token=1e-7, gpu_pass_s=0.005, draft_s_per_token=0.002, host_branch_s=2e-4,
                         stop_s=1e-4)
    B, k, E, S = 2_654_208, 8, 128, 21
    s = inpass_share(hw, B, rows, k, E, S, miss_rate)
    distinct = E * (1 - (1 - k / E) ** rows)
    m = distinct * miss_rate
    up = B / 40e9
    cpu = B / 50e9 + rows * k / distinct * 2e-6
    grid = np.linspace(0.0, m, 20001)
    t = 1e-4 + np.maximum(grid * up, 2e-4 + (m - grid) * cpu)
    best_split = float(t.min())
    chunks = -(-rows // (S // k))                                 # all on the GPU: one stop per extra row chunk
    if m * up + (chunks - 1) * 1e-4 <= best_split:
        assert s == 1.0
    else:
        assert s < 1.0
        n = s * m
        assert 1e-4 + max(n * up, 2e-4 + (m - n) * cpu) <= best_split * (1 + 1e-3)


@pytest.mark.parametrize("rows,miss_rate,reuse", [(1, 0.25, 0.45), (1, 0.84, 0.06), (6, 0.7, 0.3), (6, 0.25, 0.45),
                                                   (6, 0.5, 0.45)])
def test_uploads_that_are_reused_are_cheaper(rows, miss_rate, reuse):
    """An upload spares the next pass that upload with probability `reuse`: each option costs its pass
    time less reuse x its uploads' time; the share is the brute-force best of that, and more locality
    never lowers it."""
    from spac_gguf.balancer import inpass_share
    hw = HardwareProfile("t", link_gbps=42.0, cpu_expert_gbps=45.0, cpu_s_per_expert_token=1e-6,
                         gpu_s_per_expert_token=2e-7, gpu_pass_s=0.006, draft_s_per_token=0.002, host_branch_s=2.5e-4,
                         stop_s=7e-5)
    B, k, E, S = 2_654_208, 8, 128, 21
    s = inpass_share(hw, B, rows, k, E, S, miss_rate, reuse=reuse)
    distinct = E * (1 - (1 - k / E) ** rows)
    m = distinct * miss_rate
    up = B / 42e9
    cpu = B / 45e9 + rows * k / distinct * 1e-6 * B / 2_654_208
    grid = np.linspace(0.0, m, 20001)
    cost = lambda n: 7e-5 + np.maximum(n * up, 2.5e-4 + (m - n) * cpu) - reuse * n * up   # noqa: E731
    best_split = float(cost(grid).min())
    chunks = -(-rows // (S // k))
    if m * up * (1 - reuse) + (chunks - 1) * 7e-5 <= best_split:
        assert s == 1.0
    else:
        assert s < 1.0 and float(cost(s * m)) <= best_split + 1e-3 * abs(best_split)
    shares = [inpass_share(hw, B, rows, k, E, S, miss_rate, reuse=r) for r in (0.0, 0.2, 0.45, 0.8)]
    assert shares == sorted(shares)


@pytest.mark.parametrize("rows,miss_rate,reuse,pass_slots", [(6, 0.83, 0.0, 0), (6, 0.83, 0.0, 6), (6, 0.83, 0.0, 64),
                                                              (6, 0.5, 0.45, 0), (6, 0.5, 0.45, 64), (6, 0.5, 0.6, 64),
                                                              (1, 0.9, 0.3, 0)])
def test_a_splits_uploads_are_capped_by_the_free_slots_and_the_pass_slots(rows, miss_rate, reuse, pass_slots):
    """With a host branch a split uploads into the slots its pass's hits leave free, then into the
    pass slots: the share is the brute-force best over n in [0, min(m, free + pass slots)], and only
    the uploads into free slots are credited with reuse (a pass slot keeps nothing). More pass slots
    never lower the share; without the cap (None) the share is the uncapped model's."""
    from spac_gguf.balancer import inpass_share
    hw = HardwareProfile("t", link_gbps=42.0, cpu_expert_gbps=45.0, cpu_s_per_expert_token=1e-6,
                         gpu_s_per_expert_token=2e-7, gpu_pass_s=0.006, draft_s_per_token=0.002, host_branch_s=2.5e-4,
                         stop_s=7e-5)
    B, k, E, S = 2_654_208, 8, 128, 21
    s = inpass_share(hw, B, rows, k, E, S, miss_rate, reuse=reuse, pass_slots=pass_slots)
    distinct = E * (1 - (1 - k / E) ** rows)
    m = distinct * miss_rate
    free = S - distinct * (1 - miss_rate)
    up = B / 42e9
    cpu = B / 45e9 + rows * k / distinct * 1e-6
    grid = np.linspace(0.0, min(m, free + pass_slots), 20001)
    cost = lambda n: 7e-5 + np.maximum(n * up, 2.5e-4 + (m - n) * cpu) - reuse * np.minimum(n, free) * up  # noqa: E731
    best_split = float(cost(grid).min())
    chunks = -(-rows // (S // k))
    if m * up * (1 - reuse) + (chunks - 1) * 7e-5 <= best_split:
        assert s == 1.0
    else:
        assert s < 1.0 and s * m <= free + pass_slots + 1e-9
        assert float(cost(s * m)) <= best_split + 1e-3 * abs(best_split)
    # more pass slots only make a split cheaper: once it beats all-GPU it stays, its share never falls
    shares = [inpass_share(hw, B, rows, k, E, S, miss_rate, reuse=reuse, pass_slots=p) for p in (0, 2, 8, 64)]
    splits = [x for x in shares if x < 1.0]
    assert splits == sorted(splits) and shares[len(shares) - len(splits):] == splits, shares
    if reuse == 0.0:                       # no credit to split: a pool without bound is the uncapped model
        assert inpass_share(hw, B, rows, k, E, S, miss_rate, pass_slots=10**6) == inpass_share(hw, B, rows, k, E, S, miss_rate)


def test_row_chunks_make_all_on_the_gpu_dearer():
    """A verify pass whose experts exceed the slots runs all-GPU in row chunks, a stop each: with few
    misses per layer (locality) the upload alone is cheaper than a split (which pays one stop), the
    chunk stops are not."""
    from spac_gguf.balancer import inpass_share
    B, k, E, S = 2_654_208, 8, 128, 21
    kw = dict(link_gbps=42.0, cpu_expert_gbps=45.0, cpu_s_per_expert_token=1e-6, gpu_s_per_expert_token=2e-7,
              gpu_pass_s=0.006, draft_s_per_token=0.002, host_branch_s=1e-4)
    free_stops = HardwareProfile("t", stop_s=0.0, **kw)
    real_stops = HardwareProfile("t", stop_s=7e-5, **kw)
    assert inpass_share(free_stops, B, 6, k, E, S, 0.03) == 1.0
    assert inpass_share(real_stops, B, 6, k, E, S, 0.03) < 1.0
    assert inpass_share(real_stops, B, 1, k, E, S, 0.03) == 1.0   # one row: one chunk, no extra stop


def test_inpass_share_keeps_its_mode_near_the_break_even():
    """Around the miss rate where all-GPU and a split cost the same, the share does not flip between
    them pass by pass (each flip rebuilds graphs); a clear change of regime still switches."""
    from spac_gguf.balancer import inpass_share
    hw = HardwareProfile("t", link_gbps=40.0, cpu_expert_gbps=50.0, cpu_s_per_expert_token=2e-6,
                         gpu_s_per_expert_token=1e-7, gpu_pass_s=0.005, draft_s_per_token=0.002, host_branch_s=2e-4,
                         stop_s=0.0)
    B, k, E, S = 2_654_208, 8, 128, 21
    rates = np.linspace(0.05, 1.0, 400)
    fresh = [inpass_share(hw, B, 6, k, E, S, r) < 1.0 for r in rates]
    assert fresh[0] is False and fresh[-1] is True                # both regimes exist on this range
    edge = rates[fresh.index(True)]                               # where the memoryless rule switches
    wobble = edge * (1 + 0.03 * np.sin(np.arange(60)))            # +-3 % around it
    for start in (1.0, 0.5):
        prev, modes = start, []
        for r in wobble:
            prev = inpass_share(hw, B, 6, k, E, S, float(r), prev)
            modes.append(prev < 1.0)
        assert len(set(modes)) == 1, modes                        # no flip while the rate wobbles
    prev = 1.0
    for r in (0.1, 1.0):                                          # far from the edge: both switches happen
        prev = inpass_share(hw, B, 6, k, E, S, r, prev)
        assert (prev < 1.0) == (r == 1.0)
    assert inpass_share(hw, B, 6, k, E, S, 0.05, 0.5) == 1.0


def test_the_h200_profile_reproduces_the_measured_split_choices():
    """The H200 profile against its K = 0 share sweeps (docs/BENCHMARKS.md, session 9): with random
    routing (~6.6 misses per layer, no reuse) share 0.5 was the fastest of 1 / 0.6 / 0.5 / 0.4 / 0.35
    in three calls (0.3 once as fast, where replay's early plan may have flattered it), and with qwen3-calibrated routing (~1.8 misses, reuse ~0.45) all uploads beat a
    split (88 of 96 passes all-GPU, 12.1-12.5 ms): the split's stop, which nothing overlaps, decides
    that one."""
    import dataclasses

    from spac_gguf.balancer import inpass_share
    from spac_gguf.hardware import load_profile
    hw = load_profile("h200-pcie5")
    B, k, E, S = 2_654_208, 8, 128, 21                       # the benchmark model's expert (Q4_K)
    assert 0.45 <= inpass_share(hw, B, 1, k, E, S, 0.83, reuse=0.0) <= 0.55
    assert inpass_share(hw, B, 1, k, E, S, 0.23, reuse=0.45) == 1.0
    no_stop = dataclasses.replace(hw, stop_s=0.0)
    assert inpass_share(no_stop, B, 1, k, E, S, 0.23, reuse=0.45) < 1.0


def test_a_budgets_remainder_buys_pass_slots_only_for_spac_on_the_gpu():
    """spac's pass slots take what a budget leaves after whole slots per layer: slots x layers + pass
    slots never exceed the budget, one more pass slot would (below the cap), none for host slots, other
    policies or a cache that holds every expert; an explicit count wins."""
    from spac_gguf.pair import PASS_SLOTS_MAX, pass_slots_for
    n_layers, n_expert = 48, 128
    for budget in (100 * B + 7, 130 * B, 48 * 20 * B + 33 * B, 48 * 20 * B + 500 * B):
        S = slots_for_budget(budget, B, n_layers, n_expert)
        rem = budget - S * n_layers * B
        P = pass_slots_for("spac", False, S, n_expert, B, rem, None)
        assert S * n_layers * B + P * B <= budget
        assert P == PASS_SLOTS_MAX or S * n_layers * B + (P + 1) * B > budget
        assert P <= PASS_SLOTS_MAX
    assert pass_slots_for("spac", False, 2, n_expert, B, 40 * B, None) == 40
    assert pass_slots_for("lru", False, 2, n_expert, B, 40 * B, None) == 0
    assert pass_slots_for("spac", True, 2, n_expert, B, 40 * B, None) == 0
    assert pass_slots_for("spac", False, n_expert, n_expert, B, 40 * B, None) == 0
    assert pass_slots_for("spac", False, 2, n_expert, B, 40 * B, 3) == 3
    assert pass_slots_for("spac", False, 2, n_expert, B, 40 * B, 0) == 0


def _split_lp(hw, B, rows, k, E, S, miss_rate, reuse, pass_slots):
    """The per-layer split as a HiGHS LP (the offline check of inpass_share's closed form): n1 uploads
    into free slots (credited with reuse), n2 into pass slots, T at least either pipe:
        min T − reuse·up·n1   s.t.  T ≥ stop + up·(n1 + n2),  T ≥ stop + c0 + cpu·(m − n1 − n2),
        0 ≤ n1 ≤ free, 0 ≤ n2 ≤ pass_slots, n1 + n2 ≤ m.       Returns (n1 + n2, objective)."""
    import highspy
    distinct = E * (1 - (1 - k / E) ** rows)
    m = distinct * miss_rate
    free = max(0.0, S - distinct * (1 - miss_rate))
    cpu, gpu, copy = hw.expert_costs(rows * k / distinct, B)
    up = copy - gpu
    inf = highspy.kHighsInf
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = 3, 3                                   # T, n1, n2
    lp.col_cost_ = np.array([1.0, -reuse * up, 0.0])
    lp.col_lower_ = np.array([-inf, 0.0, 0.0])
    lp.col_upper_ = np.array([inf, free, float(pass_slots)])
    # rows: T − up n1 − up n2 ≥ stop;  T + cpu n1 + cpu n2 ≥ stop + c0 + cpu m;  n1 + n2 ≤ m
    A = np.array([[1.0, -up, -up], [1.0, cpu, cpu], [0.0, 1.0, 1.0]])
    lp.row_lower_ = np.array([hw.stop_s, hw.stop_s + hw.host_branch_s + cpu * m, -inf])
    lp.row_upper_ = np.array([inf, inf, m])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.array([0, 2, 5, 8], np.int32)
    lp.a_matrix_.index_ = np.array([0, 1, 0, 1, 2, 0, 1, 2], np.int32)
    lp.a_matrix_.value_ = np.array([A[0, 0], A[1, 0], A[0, 1], A[1, 1], A[2, 1], A[0, 2], A[1, 2], A[2, 2]])
    h.passModel(lp)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    x = h.getSolution().col_value
    return x[1] + x[2], h.getInfo().objective_function_value


@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("miss_rate", [0.3, 0.83, 1.0])
@pytest.mark.parametrize("reuse", [0.0, 0.45])
@pytest.mark.parametrize("pass_slots", [0, 4, 64])
def test_highs_checks_the_fast_split(rows, miss_rate, reuse, pass_slots):
    """The split that runs before every verify pass is a closed form (microseconds); the same model
    as a HiGHS LP, solved offline here, must find the same uploads where the closed form splits, and
    a split no cheaper than all-GPU where it chooses all-GPU (the H200 profile's costs)."""
    from spac_gguf.balancer import inpass_share
    from spac_gguf.hardware import load_profile
    hw = load_profile("h200-pcie5")
    B, k, E, S = 2_654_208, 8, 128, 21
    s = inpass_share(hw, B, rows, k, E, S, miss_rate, reuse=reuse, pass_slots=pass_slots)
    n_lp, t_lp = _split_lp(hw, B, rows, k, E, S, miss_rate, reuse, pass_slots)
    distinct = E * (1 - (1 - k / E) ** rows)
    m = distinct * miss_rate
    _, gpu, copy = hw.expert_costs(rows * k / distinct, B)
    chunks = -(-rows // (S // k))
    t_gpu = m * (copy - gpu) * (1 - reuse) + (chunks - 1) * hw.stop_s
    if s < 1.0:
        assert s * m == pytest.approx(n_lp, rel=1e-6, abs=1e-6)
        assert t_lp < t_gpu
    else:
        assert t_gpu <= t_lp * (1 + 1e-9)
