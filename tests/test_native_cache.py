"""The patched llama.cpp expert cache: exact split, slot bytes, misuse errors (CPU build, host slots)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from spac_gguf import gguf_layout, native
from spac_gguf.testing import models as testmodels
from spac_gguf.cache import ExpertCache
from spac_gguf.llama_backend import LlamaContext, LlamaModel

from conftest import PROMPTS

pytestmark = pytest.mark.skipif(not native.available(), reason="needs our patched llama.cpp build")

PROJ = {0: "up", 1: "gate", 2: "down"}


@pytest.fixture(scope="module", params=[(a, q) for a in testmodels.ARCHS for q in testmodels.QUANTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    arch, quant = request.param
    target, _ = testmodels.make_pair(arch=arch, quant=quant)
    m = LlamaModel(target)
    yield m, gguf_layout.describe(target)
    m.close()


def _random_placement(cache: ExpertCache, rng: np.random.Generator) -> None:
    """Put random experts in random slots (some slots left empty) and publish."""
    for il in np.nonzero(cache.cached_layers)[0]:
        for s in range(cache.n_slots):
            if rng.random() < 0.8:
                resident = set(cache.slot_expert[il][cache.state[il] > 0].tolist())
                choices = [e for e in range(cache.n_expert) if e not in resident]
                cache.load_async(int(il), int(rng.choice(choices)), s)
    cache.wait_all()
    cache.publish()


def test_split_is_bit_exact_with_random_maps(model, threads):
    """Logits with a different random cache placement every decode == the uncached context's."""
    m, lay = model
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=3, on_host=True)
    assert cache.cached_layers.sum() == len(lay.moe_layers)
    rng = np.random.default_rng(0)
    toks = m.tokenize(PROMPTS[0])
    a = ref.decode(toks, "all")
    _random_placement(cache, rng)
    b = ctx.decode(toks, "all")
    assert np.array_equal(a, b)
    hits = 0
    routing = native.NativeRouting(ctx.ptr, m.n_layer, lay.n_expert_used)
    for _ in range(64):
        t = int(np.argmax(a[-1]))
        _random_placement(cache, rng)
        hits += int(cache.mapped.sum())
        a = ref.decode([t], "all")
        cached = np.zeros((cache.n_layers, cache.n_expert), bool)    # the maps this decode reads
        l, s_ = np.nonzero(cache.mapped)
        cached[l, cache.slot_expert[l, s_]] = True
        before = cache.counters()["host_pairs"]
        routing.begin()
        b = ctx.decode([t], "all")
        ids = routing.end(1)[0]                                     # [layers, k]
        assert np.array_equal(a, b)
        # the host computed exactly the routed pairs no slot serves (the counter the bench reports)
        want = sum(int((~cached[il][ids[il]]).sum()) for il in lay.moe_layers)
        assert cache.counters()["host_pairs"] - before == want
    assert hits > 0
    # a 20-row batch (slot branch in chunks of 4) and a 40-row one (stock path) stay exact too
    for n in (20, 40):
        _random_placement(cache, rng)
        chunk = [int(t) for t in rng.integers(100, 1000, size=n)]
        c0 = cache.counters()
        assert np.array_equal(ref.decode(chunk, "all"), ctx.decode(chunk, "all"))
        c1 = cache.counters()
        # a planned pass times its stops (waiting for the nodes before the plan, the plan); the stock
        # path (over 32 rows) has none
        timed = c1["plans"] > c0["plans"] and c1["plan_s"] >= c0["plan_s"] and c1["stop_s"] > c0["stop_s"]
        untouched = all(c1[x] == c0[x] for x in ("plans", "plan_s", "stop_s", "down_s", "copy_s"))
        assert timed if n == 20 else untouched, (n, c0, c1)
        # the plan's parts (ids and inputs down, copies issued) are inside it; no in-pass loads here
        d = {x: c1[x] - c0[x] for x in ("plan_s", "down_s", "copy_s", "inpass_loads")}
        assert d["inpass_loads"] == 0 and d["copy_s"] == 0 and 0 <= d["down_s"] <= d["plan_s"] + 1e-9, d


def test_cache_free_and_init_again_stay_exact(model, threads):
    """llama_moe_cache_free gives the slots back and the context decodes exactly as without a cache;
    a cache of another size can follow; freeing twice is refused."""
    m, lay = model
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    rng = np.random.default_rng(3)
    toks = m.tokenize(PROMPTS[0])
    assert np.array_equal(ref.decode(toks, "all"), ctx.decode(toks, "all"))
    for n_slots in (3, 5):
        cache = ExpertCache(ctx.ptr, n_slots=n_slots, on_host=True)
        assert cache.slot_bytes > 0 and native.api.cache_bytes(ctx.ptr) == cache.slot_bytes
        for _ in range(4):
            _random_placement(cache, rng)
            t = [int(x) for x in rng.integers(100, 1000, size=3)]
            assert np.array_equal(ref.decode(t, "all"), ctx.decode(t, "all"))
        assert cache.counters()["host_pairs"] > 0 and cache.counters()["stop_s"] > 0
        cache.free()
        assert native.api.cache_bytes(ctx.ptr) == 0
        c = cache.counters()                                          # counters restart with the next cache
        assert c["host_pairs"] == 0 and c["plans"] == 0 and all(c[x] == 0 for x in ("stop_s", "plan_s", "down_s", "copy_s"))
        t = [int(x) for x in rng.integers(100, 1000, size=3)]
        assert np.array_equal(ref.decode(t, "all"), ctx.decode(t, "all"))
        with pytest.raises(native.NativeError, match="no expert cache"):
            cache.free()


def test_direct_reads_need_pinned_gpu_experts(model, threads):
    """Direct reads (the GPU computing misses from pinned host memory) need a GPU: with host slots no
    layer can, a pass asked for them takes the other paths and stays exact, the counter stays 0;
    rows beyond LLAMA_MOE_DIRECT_MAX_ROWS are refused. (The GPU side: tests/test_gpu.py.)"""
    m, lay = model
    ref = LlamaContext(m, n_ctx=128, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=128, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=3, on_host=True)
    assert cache.set_direct(native.DIRECT_MAX_ROWS) == 0
    with pytest.raises(native.NativeError):
        cache.set_direct(native.DIRECT_MAX_ROWS + 1)
    with pytest.raises(native.NativeError):
        cache.set_direct(-1)
    _random_placement(cache, np.random.default_rng(4))
    toks = m.tokenize(PROMPTS[1])
    a, b = ref.decode(toks, "all"), ctx.decode(toks, "all")
    for _ in range(3):
        t = int(np.argmax(a[-1]))
        a, b = ref.decode([t], "all"), ctx.decode([t], "all")
        assert np.array_equal(a, b)
    assert cache.counters()["direct_passes"] == 0


def test_loads_in_flight_come_from_the_ledger(model):
    """The engine plans around loads in flight from the store's ledger (no mirror of its own): issued
    and not yet completed, they are exactly what loading() reports, and nothing after they land."""
    m, lay = model
    ctx = LlamaContext(m, n_ctx=64, n_threads=1)
    cache = ExpertCache(ctx.ptr, n_slots=2, on_host=True)
    a, b = lay.moe_layers[0], lay.moe_layers[-1]
    issued = {(a, 0): 3, (b, 1): 1}
    for (il, slot), expert in issued.items():
        cache.load_async(il, expert, slot)
    assert cache.loading() == issued
    # a load the C side finished but poll() has not seen is still busy: sync() reads it complete, and a
    # second load into it would have its slot marked ready by the first one's poll while it copies
    for ticket in list(cache._tickets):
        native.check("wait", native.api.cache_wait(cache.ctx, ticket))
    cache.sync()
    assert cache.loading() == issued
    cache.wait_all()
    assert cache.loading() == {}
    cache.sync()
    assert cache.loading() == {} and cache.resident()[a, 0] == 3 and cache.resident()[b, 1] == 1


def test_slot_bytes_equal_file_bytes(model, monkeypatch):
    """One copy per projection (LLAMA_MOE_COPY_2D=0; the 2-D copy, the default, has its own test)."""
    monkeypatch.setenv("LLAMA_MOE_COPY_2D", "0")
    m, lay = model
    ctx = LlamaContext(m, n_ctx=64, n_threads=1)
    cache = ExpertCache(ctx.ptr, n_slots=2, on_host=True)
    assert cache.counters()["copy_2d_layers"] == 0
    assert cache.counters()["copy_groups"] == 3 * int(np.count_nonzero(cache.cached_layers))
    il = lay.moe_layers[-1]
    raw = np.memmap(lay.path, dtype=np.uint8, mode="r")
    for expert, slot in ((5, 0), (2, 1)):
        cache.load_async(il, expert, slot)
    cache.wait_all()
    for expert, slot in ((5, 0), (2, 1)):
        for p, name in PROJ.items():
            off, n = lay.expert_offset(il, expert, name)
            assert cache.read_slot(il, slot, p, n) == raw[off:off + n].tobytes()
    # the zero slot (index n_slots) stays all zeros after loads
    _, n = lay.expert_offset(il, 0, "down")
    assert cache.read_slot(il, cache.n_slots, 2, n) == bytes(n)


def test_one_2d_copy_per_expert_lands_every_projection(model, threads, monkeypatch):
    """The default copy: an expert's projections whose rows have one size and sit at one distance on
    the host and in the slots move in one 2-D copy. Every slot then holds the file's bytes of the
    expert the ledger names, in every projection; the zero slot stays zero; passes with in-pass loads
    stay bit-identical to the uncached context."""
    monkeypatch.delenv("LLAMA_MOE_COPY_2D", raising=False)
    m, lay = model
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=3, on_host=True)
    raw = np.memmap(lay.path, dtype=np.uint8, mode="r")
    rng = np.random.default_rng(7)

    def check_slots(c: ExpertCache) -> int:
        c.sync()
        checked = 0
        for il in np.nonzero(c.cached_layers)[0]:
            for s in np.nonzero(c.state[il] > 0)[0]:
                e = int(c.slot_expert[il, s])
                for p, name in PROJ.items():
                    off, n = lay.expert_offset(int(il), e, name)
                    assert c.read_slot(int(il), int(s), p, n) == raw[off:off + n].tobytes(), (il, s, name)
                    checked += 1
            for p, name in PROJ.items():
                _, n = lay.expert_offset(int(il), 0, name)
                assert c.read_slot(int(il), c.n_slots, p, n) == bytes(n)
        return checked

    # every test model has one quant type for all three projections at equal distances in the file:
    # every cached layer groups them, all three in one copy per expert
    n_cached = int(np.count_nonzero(cache.cached_layers))
    assert cache.counters()["copy_2d_layers"] == n_cached > 0
    assert cache.counters()["copy_groups"] == n_cached
    _random_placement(cache, rng)                                     # the copy worker's loads
    assert check_slots(cache) > 0
    toks = m.tokenize(PROMPTS[0])
    assert np.array_equal(ref.decode(toks, "all"), ctx.decode(toks, "all"))
    for step in range(8):                                             # in-pass loads, every miss
        cache.set_inpass(1.0, 1 << 20, rng.random((cache.n_layers, cache.n_expert)).astype(np.float32), np.inf)
        chunk = [int(t) for t in rng.integers(100, 1000, size=1 + step % 4)]
        assert np.array_equal(ref.decode(chunk, "all"), ctx.decode(chunk, "all")), f"step {step}"
    assert cache.counters()["inpass_loads"] > 0
    assert check_slots(cache) > 0
    del cache


def test_api_misuse_returns_error_codes(model):
    m, lay = model
    ctx = LlamaContext(m, n_ctx=64, n_threads=1)
    api = native.api
    assert api.cache_load(ctx.ptr, lay.moe_layers[0], 0, 0) == -6          # no cache yet
    cache = ExpertCache(ctx.ptr, n_slots=2, on_host=True)
    il = lay.moe_layers[0]
    assert api.cache_load(ctx.ptr, 999, 0, 0) == -1                        # layer out of range
    assert api.cache_load(ctx.ptr, il, 0, 2) == -2                         # slot out of range
    assert api.cache_load(ctx.ptr, il, lay.n_expert, 0) == -3              # expert out of range
    t = api.cache_load(ctx.ptr, il, 1, 0)
    assert t >= 0
    assert api.cache_wait(ctx.ptr, t) == 0
    m_bad = np.full(lay.n_expert, -1, np.int32)
    m_bad[2] = 0                                                           # slot 0 holds expert 1, not 2
    assert api.cache_set_map(ctx.ptr, il, m_bad.ctypes.data) == -5
    m_ok = np.full(lay.n_expert, -1, np.int32)
    m_ok[1] = 0
    assert api.cache_set_map(ctx.ptr, il, m_ok.ctypes.data) == 0
    assert api.cache_load(ctx.ptr, il, 3, 0) == -4                         # slot 0 is mapped
    assert api.cache_poll(ctx.ptr, 10**9) == -9                            # unknown ticket
    params = api.cache_default_params()
    params.n_slots, params.on_host = 2, True
    assert api.cache_init(ctx.ptr, ctypes.byref(params)) == -11             # one cache per context
    assert api.cache_counters(ctx.ptr, None, 6) == -12                      # no output array
    fresh = LlamaContext(m, n_ctx=64, n_threads=1)
    assert api.cache_init(fresh.ptr, None) == -10                           # no params
    params.n_slots = 0
    assert api.cache_init(fresh.ptr, ctypes.byref(params)) == -10           # no slots
    assert api.routing_get(fresh.ptr, lay.moe_layers[0], None, 0) == -13    # routing export off
    del cache


def test_inpass_loads_are_exact_and_fill_slots(model, threads):
    """In-pass loads (misses copied into slots during the pass, LRU-style eviction and a 50 % share
    with priorities) leave logits bit-identical to the uncached context, and every slot they fill
    holds the file's bytes of the expert the ledger names."""
    m, lay = model
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=3, on_host=True)
    rng = np.random.default_rng(1)
    raw = np.memmap(lay.path, dtype=np.uint8, mode="r")
    toks = m.tokenize(PROMPTS[1])
    assert np.array_equal(ref.decode(toks, "all"), ctx.decode(toks, "all"))
    before = cache.counters()["inpass_loads"]
    for step in range(24):
        prio = rng.random((cache.n_layers, cache.n_expert)).astype(np.float32)
        share, bonus = (1.0, np.inf) if step % 2 else (0.5, 0.0)
        cache.set_inpass(share, 1 << 20, prio, bonus)
        chunk = [int(t) for t in rng.integers(100, 1000, size=1 + step % 6)]
        assert np.array_equal(ref.decode(chunk, "all"), ctx.decode(chunk, "all")), f"step {step}"
        cache.sync()
        assert (cache.state[cache.cached_layers] != 1).all()               # in-pass copies are complete
    assert cache.counters()["inpass_loads"] > before
    for il in np.nonzero(cache.cached_layers)[0][:2]:
        for s in np.nonzero(cache.mapped[il])[0]:
            e = int(cache.slot_expert[il, s])
            off, n = lay.expert_offset(int(il), e, "down")
            assert cache.read_slot(int(il), int(s), 2, n) == raw[off:off + n].tobytes()
    cache.set_inpass(1.0, 0, None)                                          # off: the ledger stops moving
    n0 = cache.counters()["inpass_loads"]
    ctx.decode([int(toks[0])], "last")
    assert cache.counters()["inpass_loads"] == n0


def test_inpass_respects_priority_and_share(model, threads):
    """priority < 0 never loads; with share 0 nothing loads; a miss only evicts lower priority."""
    m, lay = model
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=2, on_host=True)
    toks = m.tokenize(PROMPTS[0])
    never = np.full((cache.n_layers, cache.n_expert), -1.0, np.float32)
    cache.set_inpass(1.0, 1 << 20, never, np.inf)
    ctx.decode(toks, "last")
    assert cache.counters()["inpass_loads"] == 0
    cache.set_inpass(0.0, 1 << 20, np.ones_like(never), np.inf)
    ctx.decode(toks[:3], "last")
    assert cache.counters()["inpass_loads"] == 0
    # fill the slots with priority 1, then misses of priority 0.5 and no bonus must not evict them
    cache.set_inpass(1.0, 1 << 20, np.ones_like(never), np.inf)
    ctx.decode(toks[:4], "last")
    cache.sync()
    held = cache.slot_expert.copy()
    assert (held[cache.cached_layers] >= 0).all()
    low = np.full_like(never, 0.5)
    low[np.arange(cache.n_layers)[:, None], np.maximum(held, 0)] = 1.0
    rows = 8
    cache.set_inpass(1.0, rows * lay.n_expert_used - 1, low, 0.0)     # loads capped: the host branch stays
    ctx.decode([int(t) for t in np.random.default_rng(3).integers(100, 1000, rows)], "all")
    cache.sync()
    assert np.array_equal(cache.slot_expert, held)
    # misses that outrank what the slots hold do evict it (same capped loads, so the host branch stays)
    high = np.full_like(never, 2.0)
    high[np.arange(cache.n_layers)[:, None], np.maximum(held, 0)] = 1.0
    cache.set_inpass(1.0, lay.n_expert_used - 1, high, 0.0)             # one row at a time
    n0 = cache.counters()["inpass_loads"]
    for t in np.random.default_rng(4).integers(100, 1000, 16):
        ctx.decode([int(t)], "all")
        if cache.counters()["inpass_loads"] > n0:
            break
    cache.sync()
    assert cache.counters()["inpass_loads"] > n0
    assert not np.array_equal(cache.slot_expert, held)


def test_inpass_share_loads_the_nearest_count(model, threads):
    """A pass loads share x its misses rounded to the nearest count (halves up), not rounded up: one
    row through an empty cache misses its k experts in every cached layer, and every one could load."""
    m, lay = model
    k = lay.n_expert_used
    tok = m.tokenize(PROMPTS[0])[:1]
    for x, want in ((k // 2 + 0.25, k // 2), (k // 2 + 0.5, k // 2 + 1)):
        ctx = LlamaContext(m, n_ctx=64, n_threads=threads)
        cache = ExpertCache(ctx.ptr, n_slots=k, on_host=True)
        cache.set_inpass(x / k, 1 << 20, np.ones((cache.n_layers, cache.n_expert), np.float32), np.inf)
        ctx.decode(tok, "last")
        n_cached = int(np.count_nonzero(cache.cached_layers))
        assert cache.counters()["inpass_loads"] == want * n_cached, (x, k)
        assert cache.counters()["host_pairs"] == (k - want) * n_cached
        del cache, ctx


def test_pass_slots_take_misses_beyond_the_free_slots_exactly(model, threads):
    """With pass slots, a host-branch pass whose rows may route more experts than the slots uploads the
    misses its share allows beyond the free slots into the device's pool and computes them there: the
    logits stay bit-identical to the uncached context, the host computes fewer (row, expert) pairs
    than the same passes without pass slots, and a pass that fits the slots (one row) takes none.
    Unquantized experts get no pool (the device's per-row kernels skip id -1 only for quantized ones),
    and the cache reports the pool it got. A graph built with the pass branch is reused for the same
    row count, but not once in-pass loads are off (no third branch then)."""
    import llama_cpp
    m, lay = model
    k = lay.n_expert_used
    pooled = not any(q in ("F16", "BF16", "F32") for qs in lay.expert_qtypes.values() for q in qs)
    toks = m.tokenize(PROMPTS[1])
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    want = [ref.decode(toks, "all")]
    rng = np.random.default_rng(11)
    # row counts twice in a row (2, 2, 3, 3, ...): llama.cpp reuses the graph, the pass map is new
    chunks = [[int(t) for t in rng.integers(100, 1000, 2 + (step // 2) % 3)] for step in range(8)]
    want += [ref.decode(c, "all") for c in chunks]
    want_one = ref.decode(toks[:1], "all")
    extra = [[int(t) for t in rng.integers(100, 1000, 3)] for _ in range(2)]
    want_extra = [ref.decode(c, "all") for c in extra]
    reused = lambda c: llama_cpp.llama_perf_context(c.ptr).n_reused   # noqa: E731
    host = {}
    for n_pass in (0, 2 * k):
        ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
        cache = ExpertCache(ctx.ptr, n_slots=k, on_host=True, pass_slots=n_pass)
        assert cache.n_pass_slots == (n_pass if pooled else 0)
        prio = np.random.default_rng(5).random((cache.n_layers, cache.n_expert)).astype(np.float32)
        cache.set_inpass(0.999, 1 << 20, prio, 0.0)   # a host branch; a miss evicts only lower priority
        assert np.array_equal(want[0], ctx.decode(toks, "all"))
        r0 = reused(ctx)
        for step, c in enumerate(chunks):
            assert np.array_equal(want[step + 1], ctx.decode(c, "all")), (n_pass, step)
            cache.sync()
        assert reused(ctx) > r0                          # equal row counts in a row: graphs reused
        n = cache.counters()
        host[n_pass] = n["host_pairs"]
        if n_pass == 0 or not pooled:
            assert n["pass_loads"] == 0
        else:
            assert n["pass_loads"] > 0 and n["inpass_loads"] >= n["pass_loads"]
            before = n["pass_loads"]
            assert np.array_equal(want_one, ctx.decode(toks[:1], "all"))   # k pairs fit the k slots:
            assert cache.counters()["pass_loads"] == before                # no pass slots
            assert np.array_equal(want_extra[0], ctx.decode(extra[0], "all"))
            assert cache.counters()["pass_loads"] > before
            cache.set_inpass(0.999, 0, prio, 0.0)        # in-pass loads off: no third branch, a new graph
            r1 = reused(ctx)
            assert np.array_equal(want_extra[1], ctx.decode(extra[1], "all"))
            assert reused(ctx) == r1
        del cache, ctx
    assert (host[2 * k] < host[0]) if pooled else (host[2 * k] == host[0]), host


def test_passes_that_fit_run_all_in_slots(model, threads):
    """With share 1 there is no host branch: a pass runs in row chunks whose experts fit in the slots,
    each planned right before it runs. Every routed expert of the last chunk is in a slot after the
    pass, even where priorities (bonus 0) would refuse the eviction with a host branch, and the
    logits stay bit-identical to the uncached context."""
    m, lay = model
    k = lay.n_expert_used
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=2 * k, on_host=True)
    routing = native.NativeRouting(ctx.ptr, m.n_layer, k)
    toks = m.tokenize(PROMPTS[1])
    assert np.array_equal(ref.decode(toks, "all"), ctx.decode(toks, "all"))   # (no in-pass loads yet: a host branch)
    host_before = cache.counters()["host_pairs"]
    rng = np.random.default_rng(7)
    for step in range(12):
        cache.sync()
        prio = np.full((cache.n_layers, cache.n_expert), 0.1, np.float32)
        held = cache.slot_expert
        l, s_ = np.nonzero(held >= 0)
        prio[l, held[l, s_]] = 1.0                       # what is cached outranks every miss
        cache.set_inpass(1.0, 1 << 20, prio, 0.0)
        chunk = [int(t) for t in rng.integers(100, 1000, size=1 + step % 6)]   # > 2 rows: planned in chunks
        routing.begin()
        assert np.array_equal(ref.decode(chunk, "all"), ctx.decode(chunk, "all")), f"step {step}"
        ids = routing.end(len(chunk))
        cache.sync()
        last = ids[-(len(chunk) % 2 or 2):]                  # 2k slots: chunks of 2 rows
        for il in lay.moe_layers:
            mapped = set(cache.slot_expert[il][cache.mapped[il]].tolist())
            assert set(last[:, il].ravel().tolist()) <= mapped, f"step {step} layer {il}"
    assert cache.counters()["host_pairs"] == host_before        # no host branch ran


def _replay_groups(lay, groups, *ctxs) -> None:
    """The next decodes of every MoE layer route row r to group groups[r]: experts g k .. g k + k - 1."""
    k = lay.n_expert_used
    ids = np.array([[g * k + j for j in range(k)] for g in groups], np.int32)
    for c in ctxs:
        for il in lay.moe_layers:
            native.replay(c.ptr, il, ids)


def test_a_plan_serves_the_rows_after_it_that_fit(model, threads):
    """Chunks are sized for rows that share no expert; a plan also serves the rows after its chunk
    while all their experts fit in the slots, and their chunks run with no plan (no stop). With 2k
    slots (chunks of 2 rows), 6-row passes whose rows use k-expert groups (one group per row):
    groups 0 0 1 1 0 1 (chunk 0 names one group, its plan must load the other for the chunks it
    serves): one plan per layer; 0 1 2 0 1 2 (3k experts): three; 0 0 1 1 2 2 (the first plan
    serves rows 0-3, the last chunk plans again): two. All bit-identical to the uncached context."""
    m, lay = model
    k, E = lay.n_expert_used, lay.n_expert
    assert E >= 3 * k
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=2 * k, on_host=True)
    cache.set_inpass(1.0, 1 << 20, np.full((cache.n_layers, cache.n_expert), 0.1, np.float32), 0.0)
    toks = m.tokenize(PROMPTS[1])
    assert np.array_equal(ref.decode(toks, "all"), ctx.decode(toks, "all"))
    rng = np.random.default_rng(11)
    for groups, plans_per_layer in (((0, 0, 1, 1, 0, 1), 1), ((0, 1, 2, 0, 1, 2), 3), ((0, 0, 1, 1, 2, 2), 2)):
        _replay_groups(lay, groups, ref, ctx)
        batch = [int(t) for t in rng.integers(100, 1000, size=6)]
        p0 = cache.counters()["plans"]
        assert np.array_equal(ref.decode(batch, "all"), ctx.decode(batch, "all")), f"{groups} groups"
        assert cache.counters()["plans"] - p0 == plans_per_layer * len(lay.moe_layers), f"{groups} groups"


@pytest.mark.parametrize("copies_first", [False, True], ids=["fetch-first", "copies-first"])
def test_replayed_routing_with_a_host_branch_is_bit_exact(model, threads, copies_first, monkeypatch):
    """Replayed ids do not depend on the layer's input, yet the plan stop hands that input to the
    host branch: it must be computed before the plan node. Replay (as the benchmarks run it) with a
    host branch every pass (random maps, half the misses loaded in the pass) == replay without a cache,
    1- and 5-row passes; the input fetched before the plan or (LLAMA_MOE_COPIES_FIRST=1) after its
    copies and before the map is published."""
    monkeypatch.setenv("LLAMA_MOE_COPIES_FIRST", "1" if copies_first else "0")
    m, lay = model
    k, E = lay.n_expert_used, lay.n_expert
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=3, on_host=True)
    toks = m.tokenize(PROMPTS[2])
    assert np.array_equal(ref.decode(toks, "all"), ctx.decode(toks, "all"))
    rng = np.random.default_rng(17)
    host = 0
    c0 = cache.counters()
    for rows in (1, 5, 1, 5, 1, 1):
        for il in lay.moe_layers:
            ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(rows)]).astype(np.int32)
            for c in (ref, ctx):
                native.replay(c.ptr, il, ids)
        cache.sync()                                                  # the last pass's in-pass loads
        _random_placement(cache, rng)
        cache.set_inpass(0.5, 1 << 20, rng.random((cache.n_layers, cache.n_expert)).astype(np.float32), 0.0)
        h0 = cache.counters()["host_pairs"]
        batch = [int(t) for t in rng.integers(100, 1000, size=rows)]
        assert np.array_equal(ref.decode(batch, "all"), ctx.decode(batch, "all")), f"{rows} rows"
        host += cache.counters()["host_pairs"] - h0
    assert host > 0                                                   # the host branch ran
    # in-pass loads ran and the plan was timed (fields 12-13 in their places: copies, then the ids
    # and inputs down, both parts of the plan; each is whole microseconds per plan, so a read-down of
    # host-side replayed ids can sum to 0: only the plan's total must be positive)
    c1 = cache.counters()
    d = {x: c1[x] - c0[x] for x in ("plan_s", "down_s", "copy_s", "inpass_loads")}
    assert d["inpass_loads"] > 0 and d["plan_s"] > 0 and d["copy_s"] >= 0 and d["down_s"] >= 0, d
    assert d["down_s"] + d["copy_s"] <= d["plan_s"] + 1e-9, d


def test_a_plan_leaves_room_when_a_caller_duplicated_an_expert(model, threads):
    """The C API lets a caller load one expert into two slots; such a slot takes no miss, so a plan
    serves later rows only while their experts fit in the other slots. 4 slots (k = 2), expert 0 in
    slots 0 and 1, rows naming experts 0-3 between them: a plan covering all rows would find no victim
    for one of the three misses (that expert would read the zero slot); logits stay exact."""
    m, lay = model
    k = lay.n_expert_used
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    cache = ExpertCache(ctx.ptr, n_slots=2 * k, on_host=True)
    toks = m.tokenize(PROMPTS[1])
    assert np.array_equal(ref.decode(toks, "all"), ctx.decode(toks, "all"))
    cache.sync()
    for il in lay.moe_layers:
        cache.load_async(il, 0, 0)
        cache.load_async(il, 0, 1)
    cache.wait_all()
    cache.publish()
    cache.set_inpass(1.0, 1 << 20, np.full((cache.n_layers, cache.n_expert), 0.1, np.float32), 0.0)
    _replay_groups(lay, (0, 0, 1, 1, 0, 1), ref, ctx)
    batch = [int(t) for t in np.random.default_rng(13).integers(100, 1000, size=6)]
    assert np.array_equal(ref.decode(batch, "all"), ctx.decode(batch, "all"))


def test_routing_replay_computes_the_given_experts(model, threads):
    """Replaying the router's own choice is bit-identical; replaying other ids makes the export report
    exactly those ids and changes the logits; off restores the router."""
    m, lay = model
    ref = LlamaContext(m, n_ctx=256, n_threads=threads)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    k = lay.n_expert_used
    r_ref = native.NativeRouting(ref.ptr, m.n_layer, k)
    r_ctx = native.NativeRouting(ctx.ptr, m.n_layer, k)
    toks = m.tokenize(PROMPTS[2])[:6]
    a = ref.decode(toks, "all")
    own = r_ref.end(len(toks))
    for il in lay.moe_layers:
        native.replay(ctx.ptr, il, own[:, il])
    assert np.array_equal(ctx.decode(toks, "all"), a)
    ctx.reset()
    rng = np.random.default_rng(5)
    other = np.stack([np.stack([rng.permutation(lay.n_expert)[:k] for _ in lay.moe_layers], 0) for _ in toks], 0)
    for j, il in enumerate(lay.moe_layers):
        native.replay(ctx.ptr, il, other[:, j])
    b = ctx.decode(toks, "all")
    got = r_ctx.end(len(toks))
    assert np.array_equal(got[:, lay.moe_layers], other)
    assert not np.array_equal(a, b)
    for il in lay.moe_layers:
        native.replay(ctx.ptr, il, None)
    ctx.reset()
    assert np.array_equal(ctx.decode(toks, "all"), a)
    with pytest.raises(native.NativeError):
        native.replay(ctx.ptr, lay.moe_layers[0], np.full((1, k), lay.n_expert, np.int32))   # out of range
    if k > 1:
        with pytest.raises(native.NativeError):
            native.replay(ctx.ptr, lay.moe_layers[0], np.zeros((1, k), np.int32))          # repeated id


def test_replay_trace_sets_each_pass_rows_by_position(model, threads):
    """native.ReplayTrace (the benchmark's per-pass replay, laid out per layer once) makes two
    successive passes compute the trace's rows at their positions, cut at the trace's end, and the
    export reads them back (NativeRouting.end, one buffer per pass)."""
    m, lay = model
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    k = lay.n_expert_used
    routing = native.NativeRouting(ctx.ptr, m.n_layer, k)
    rng = np.random.default_rng(21)
    trace = np.full((5, m.n_layer, k), -1, np.int32)
    for p in range(5):
        for il in lay.moe_layers:
            trace[p, il] = rng.permutation(lay.n_expert)[:k]
    rt = native.ReplayTrace(trace, lay.moe_layers)
    toks = (m.tokenize(PROMPTS[1]) * 6)[:6]
    assert len(toks) == 6
    rt.set_rows(ctx.ptr, 0, 3)
    ctx.decode(toks[:3], "all")
    first = routing.end(3)
    rt.set_rows(ctx.ptr, 3, 3)                     # positions 3, 4 and one past the trace's end: 2 rows
    ctx.decode(toks[3:5], "all")
    second = routing.end(2)
    got = np.concatenate([first, second], 0)
    assert np.array_equal(got[:, lay.moe_layers], trace[:, lay.moe_layers])


def test_status_table_matches_the_patched_header():
    """native.STATUS names every llama_moe_status of the patch's llama.h, and nothing else."""
    import re
    from pathlib import Path
    patch = (Path(__file__).resolve().parent.parent / "patches" / "0001-moe-expert-cache.patch").read_text()
    codes = {int(v) for v in re.findall(r"^\+\s+LLAMA_MOE_(?:OK|ERR_\w+)\s*=\s*(-?\d+),", patch, re.M)}
    assert len(codes) >= 10
    assert codes == set(native.STATUS)
    assert int(re.search(r"#define LLAMA_MOE_API_VERSION (\d+)", patch).group(1)) == native.API_VERSION
    assert int(re.search(r"#define LLAMA_MOE_DIRECT_MAX_ROWS (\d+)", patch).group(1)) == native.DIRECT_MAX_ROWS
