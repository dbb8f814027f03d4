"""GPU (CUDA build on the device machine): the cache is lossless and close to the stock path."""
from __future__ import annotations

import numpy as np
import pytest

from spac_gguf import native, testmodels
from spac_gguf.cache import ExpertCache
from spac_gguf.llama_backend import LlamaContext, LlamaModel, Placement, gpu_available
from spac_gguf.pair import load

from conftest import PROMPTS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (native.available() and gpu_available()), reason="needs a GPU build and a GPU")]


@pytest.fixture(scope="module", params=testmodels.ARCHS)
def files(request):
    return testmodels.make_pair(arch=request.param, quant="Q8_0")


def test_greedy_identical_with_cache_on_and_off(files):
    target, draft = files
    kw = dict(n_gpu_layers=99, experts_on_cpu=True, n_ctx=256)
    off = load(target, draft, **kw)
    ref = [t.token for t in off.generate(PROMPTS[0], max_tokens=48, draft_max=3, stop_at_eog=False)]
    off.close()
    on = load(target, draft, policy="lru", cache_slots=4, slots_on_host=False, **kw)
    out = [t.token for t in on.generate(PROMPTS[0], max_tokens=48, draft_max=3, stop_at_eog=False)]
    st = on.cache_stats()
    on.close()
    assert out == ref
    assert st["hits"] > 0


def test_logits_close_to_stock_cuda(files):
    """Slots on the GPU vs all experts on the CPU (stock path): relative error < 1e-3."""
    target, _ = files
    m = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=True))
    ref = LlamaContext(m, n_ctx=128)
    ctx = LlamaContext(m, n_ctx=128)
    cache = ExpertCache(ctx.ptr, n_slots=4, on_host=False)
    rng = np.random.default_rng(0)
    for il in np.nonzero(cache.cached_layers)[0]:
        for s, e in enumerate(rng.choice(cache.n_expert, 4, replace=False)):
            cache.load_async(int(il), int(e), s)
    cache.wait_all()
    cache.publish()
    toks = m.tokenize(PROMPTS[1])
    a, b = ref.decode(toks, "all"), ctx.decode(toks, "all")
    for _ in range(16):
        t = int(np.argmax(a[-1]))
        a2, b2 = ref.decode([t], "all"), ctx.decode([t], "all")
        a, b = np.vstack([a, a2]), np.vstack([b, b2])
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel < 1e-3, rel
