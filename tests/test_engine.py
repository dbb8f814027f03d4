import numpy as np
import pytest

from spac_gguf.engine import Engine, SimulatedSlotStore
from spac_gguf.policies import LRUPolicy, Policy

B = 1000


class RandomPolicy(Policy):
    """Proposes random loads, busy slots and resident experts included: the engine must cope."""
    name = "random"

    def __init__(self, L, E, seed):
        super().__init__(L, E, B)
        self.rng = np.random.default_rng(seed)

    def plan(self, resident, link_bytes):
        L, S = resident.shape
        n = int(self.rng.integers(0, 2 * L * S))
        return [(int(self.rng.integers(L)), int(self.rng.integers(self.E)), int(self.rng.integers(S))) for _ in range(n)]


def routing(rng, rows, L, E, k):
    ids = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(rows)]).astype(np.int32)
    ids[:, 0] = -1                                              # a dense layer
    return ids


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["random", "lru"])
def test_maps_never_point_at_incomplete_loads(seed, kind):
    rng = np.random.default_rng(seed)
    L, E, S, k = 3, 10, 3, 2
    store = SimulatedSlotStore(L, E, S, B, link_gbps=B / 1e9 / 0.01, jitter_s=0.05, seed=seed)  # 10 ms per load
    policy = RandomPolicy(L, E, seed) if kind == "random" else LRUPolicy(L, E, B)
    budget = 4 * B
    eng = Engine(store, policy, budget)
    hits = entries = 0
    for _ in range(150):
        eng.before_verify()
        maps = store.decode()                                   # raises on a map into an incomplete slot
        ids = routing(rng, int(rng.integers(1, 6)), L, E, k)
        for l in range(L):                                      # independent hit count from the maps
            for e in ids[:, l].ravel():
                if e >= 0:
                    entries += 1
                    hits += int(e in maps[l])
        loaded = eng.bytes_loaded
        eng.after_verify(ids, int(rng.integers(1, ids.shape[0] + 1)))
        assert eng.bytes_loaded - loaded <= budget
        assert len(store.pending) * B <= budget
        store.advance(float(rng.uniform(0, 0.04)))
    st = eng.stats()
    assert (st["hits"], st["hits"] + st["misses"]) == (hits, entries)
    assert st["bytes_loaded"] > 0 and hits > 0


def test_decode_check_catches_a_missing_publish():
    store = SimulatedSlotStore(1, 4, 2, B, link_gbps=1e-6)
    store.load_async(0, 1, 0)
    store.advance(1.0)
    store.poll()
    store.publish()
    store.load_async(0, 2, 0)                                   # overwrite a published slot ...
    with pytest.raises(AssertionError):
        store.decode()                                          # ... and decode without publishing
    store.publish()
    assert store.decode()[0, 0] == -1


def test_hits_count_only_published_experts():
    store = SimulatedSlotStore(1, 4, 1, B, link_gbps=1e-3)      # 1 ms per load
    eng = Engine(store, LRUPolicy(1, 4, B), B)
    ids = np.array([[[2]]], np.int32)
    eng.before_verify()
    eng.after_verify(ids, 1)                                    # miss; LRU loads expert 2
    eng.before_verify()                                         # load not complete: still a miss
    eng.after_verify(ids, 1)
    store.advance(0.002)
    eng.before_verify()
    eng.after_verify(ids, 1)                                    # now a hit
    st = eng.stats()
    assert (st["hits"], st["misses"], st["bytes_loaded"]) == (1, 2, B)


def test_share_none_takes_the_balancers_split_per_pass():
    """InPass(share=None): each verify hands the C side the split for its own row count, and only
    when it (or the priorities) changed."""
    from spac_gguf.engine import InPass

    class Store(SimulatedSlotStore):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.sent = []

        def set_inpass(self, share, max_loads, priority, routed_bonus):
            self.sent.append(share)

    store = Store(2, 8, 2, 1000, link_gbps=1.0)
    eng = Engine(store, LRUPolicy(2, 8, 1000), 0, inpass=InPass(share=None), split=lambda rows, miss_rate, prev=None, reuse=0.0: 1.0 if rows == 1 else 0.5)
    for rows in (1, 1, 6, 6, 1):
        eng.before_verify(rows)
    assert store.sent == [1.0, 0.5, 1.0]
    fixed = Engine(store, LRUPolicy(2, 8, 1000), 0, inpass=InPass(share=0.25), split=lambda rows, miss_rate, prev=None, reuse=0.0: 0.5)
    store.sent.clear()
    fixed.before_verify(6)
    assert store.sent == [0.25]


def test_the_calls_K_sets_the_link_bytes_per_round():
    """--draft-max reaches the engine by one road: each generate() call's K, not the constructor's."""
    from spac_gguf.testing import models as testmodels
    from spac_gguf.hardware import load_profile
    from spac_gguf.pair import load
    t, d = testmodels.make_pair(arch="qwen3moe", quant="Q8_0")
    p = load(t, d, n_ctx=256, n_threads=2, policy="lru", cache_slots=2, draft_max=2, hw="h200-pcie5")
    try:
        hw = load_profile("h200-pcie5")
        for K in (6, 1, 0):
            list(p.generate("Hello", max_tokens=3, draft_max=K))
            assert p.engine.link_bytes == hw.link_bytes_during_draft(max(K, 1))
    finally:
        p.close()


def test_reuse_is_the_share_of_misses_the_next_pass_routes_again():
    """The engine measures locality for the split, per row count: of a pass's misses, the share the
    next pass routes again (an upload of them would have been a hit). Same experts every pass: 1;
    then disjoint ones: it falls to 0; half of them back: 0.5; a row count never seen takes the
    nearest one measured."""
    store = SimulatedSlotStore(2, 16, 2, 1000, link_gbps=1.0)
    eng = Engine(store, LRUPolicy(2, 16, 1000), 0)
    assert eng.reuse_for(1) == 0.0
    ids = np.array([[[3, 4], [5, 6]]], np.int32)                # [rows, layers, k]
    for _ in range(30):
        eng.before_verify(1)
        eng.after_verify(ids, 0)
    assert eng.reuse_for(1) > 0.99
    for t in range(30):
        eng.before_verify(1)
        e = 2 * (t % 8)                                         # never the last pass's experts
        eng.after_verify(np.array([[[e, e + 1], [e, e + 1]]], np.int32), 0)
    assert eng.reuse_for(1) < 0.01
    store = SimulatedSlotStore(1, 16, 1, 1000, link_gbps=1.0)
    half = Engine(store, LRUPolicy(1, 16, 1000), 0)
    for t in range(60):
        half.before_verify(2)
        half.after_verify(np.array([[[t % 16, (t + 1) % 16]], [[(t + 8) % 16, (t + 9) % 16]]], np.int32), 0)
    assert abs(half.reuse_for(2) - 0.5) < 0.05
    assert half.reuse_for(6) == half.reuse_for(2) and 1 not in half.reuse


def test_no_prefetch_issues_no_loads_between_passes():
    """InPass(prefetch=False): the engine observes every pass but never asks the policy for loads (the
    misses are loaded during the passes); with prefetch it does."""
    from spac_gguf.engine import InPass
    for prefetch, want in ((False, 0), (True, 1)):
        store = SimulatedSlotStore(2, 8, 2, 1000, link_gbps=1.0)
        store.set_inpass = lambda *a, **kw: None
        eng = Engine(store, LRUPolicy(2, 8, 1000), 10_000, inpass=InPass(prefetch=prefetch))
        for t in range(6):
            eng.before_verify(1)
            eng.after_verify(np.array([[[t % 8, (t + 1) % 8], [t % 8, (t + 2) % 8]]], np.int32), 0)
            store.advance(1.0)
        assert (eng.bytes_loaded > 0) == bool(want)
        assert (eng.policy.score() > 0).any()                       # it still observed every pass


def test_priority_is_utility_plus_one_for_the_last_pass():
    """spac's eviction priority: the estimator's demand, plus 1 for what the last pass routed."""
    from spac_gguf.hardware import load_profile
    from spac_gguf.policies import make_policy
    store = SimulatedSlotStore(2, 8, 2, 1000, link_gbps=1.0)
    pol = make_policy("spac", 2, 8, 1000, hw=load_profile("h200-pcie5"))
    eng = Engine(store, pol, 0)
    for ids in ([[[1, 2], [3, 4]]], [[[5, 6], [3, 7]]]):
        eng.before_verify(1)
        eng.after_verify(np.array(ids, np.int32), 1)
    pr, d = eng.priority(), pol.estimator.demand()
    last = np.zeros((2, 8), bool)
    last[0, [5, 6]] = last[1, [3, 7]] = True
    assert np.allclose(pr - d, last.astype(float))
