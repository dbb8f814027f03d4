"""The patched llama.cpp expert cache: exact split, slot bytes, misuse errors (CPU build, host slots)."""
from __future__ import annotations

import numpy as np
import pytest

from spac_gguf import gguf_layout, native, testmodels
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
    for _ in range(64):
        t = int(np.argmax(a[-1]))
        _random_placement(cache, rng)
        hits += int(cache.mapped.sum())
        a = ref.decode([t], "all")
        b = ctx.decode([t], "all")
        assert np.array_equal(a, b)
    assert hits > 0
    # a 20-row batch (slot branch in chunks of 8) and a 40-row one (stock path) stay exact too
    for n in (20, 40):
        _random_placement(cache, rng)
        chunk = [int(t) for t in rng.integers(100, 1000, size=n)]
        assert np.array_equal(ref.decode(chunk, "all"), ctx.decode(chunk, "all"))


def test_slot_bytes_equal_file_bytes(model):
    m, lay = model
    ctx = LlamaContext(m, n_ctx=64, n_threads=1)
    cache = ExpertCache(ctx.ptr, n_slots=2, on_host=True)
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
    assert api.cache_init(ctx.ptr, 2, True) == -10                          # one cache per context
    del cache
