"""GPU (CUDA build on the device machine): the cache is lossless and close to the stock path."""
from __future__ import annotations

import numpy as np
import pytest

from spac_gguf import native
from spac_gguf.testing import models as testmodels
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


def test_cache_free_gives_gpu_memory_back_and_stays_close(files):
    """llama_moe_cache_free on CUDA: the device memory comes back, the context decodes as the stock
    path does, and a larger cache can follow."""
    from spac_gguf import autofit
    target, _ = files
    m = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=True))
    ref = LlamaContext(m, n_ctx=128)
    ctx = LlamaContext(m, n_ctx=128)
    toks = m.tokenize(PROMPTS[1])
    a = ref.decode(toks, "all")
    ctx.decode(toks, "all")
    free0 = autofit.device_memory().free
    for n_slots in (2, 6):
        cache = ExpertCache(ctx.ptr, n_slots=n_slots, on_host=False)
        assert autofit.device_memory().free <= free0 - cache.slot_bytes + (64 << 20)
        t = int(np.argmax(a[-1]))
        a, b = ref.decode([t], "all"), ctx.decode([t], "all")
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-3
        cache.free()
        assert autofit.device_memory().free >= free0 - (64 << 20)
        t = int(np.argmax(a[-1]))
        a, b = ref.decode([t], "all"), ctx.decode([t], "all")
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-3


@pytest.mark.parametrize("copy_2d", [False, True], ids=["copies", "copy2d"])
def test_inpass_loads_on_gpu_are_close_and_exact_bytes(files, copy_2d, monkeypatch):
    """Pinned host experts, in-pass loads every pass (half the misses, random priorities): the logits
    are as close to the stock CPU-expert path as the stock all-GPU path is (the GPU's expert kernels
    quantise activations differently, so the oracle is that spread, or 1e-3), and the slots the passes
    filled hold the file's bytes in every projection; with copy2d (the default) the same through one
    2-D copy per expert (cudaMemcpy2DAsync), which every cached layer then uses, with copies
    (LLAMA_MOE_COPY_2D=0) one copy per projection."""
    from spac_gguf import gguf_layout
    monkeypatch.setenv("LLAMA_MOE_COPY_2D", "1" if copy_2d else "0")
    target, _ = files
    lay = gguf_layout.describe(target)
    m = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=True, pinned_experts=True))
    m_gpu = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=False))
    assert m.pinned
    ref = LlamaContext(m, n_ctx=128)
    ref_gpu = LlamaContext(m_gpu, n_ctx=128)
    ctx = LlamaContext(m, n_ctx=128)
    cache = ExpertCache(ctx.ptr, n_slots=4, on_host=False)
    n_cached = int(np.count_nonzero(cache.cached_layers))
    assert cache.counters()["copy_2d_layers"] == (n_cached if copy_2d else 0)
    # one copy per expert with 2-D copies. (The fillers that keep slot tensors equally spaced where CUDA
    # pads projections differently are not exercised here: these models' projections pad alike; the
    # benchmark model's are not, and its cache_init log line shows one copy per expert.)
    assert cache.counters()["copy_groups"] == (n_cached if copy_2d else 3 * n_cached)
    rng = np.random.default_rng(1)
    toks = m.tokenize(PROMPTS[2])
    a, g, b = ref.decode(toks, "all"), ref_gpu.decode(toks, "all"), ctx.decode(toks, "all")
    for step in range(16):
        cache.set_inpass(0.5 if step % 2 else 1.0, 1 << 20,
                         rng.random((cache.n_layers, cache.n_expert)).astype(np.float32), np.inf if step % 3 else 0.0)
        rows = [int(np.argmax(a[-1]))] + [int(t) for t in rng.integers(100, 1000, step % 5)]
        a2, g2, b2 = ref.decode(rows, "all"), ref_gpu.decode(rows, "all"), ctx.decode(rows, "all")
        a, g, b = np.vstack([a, a2]), np.vstack([g, g2]), np.vstack([b, b2])
        cache.sync()
    scale = np.abs(a).max()
    rel, spread = np.abs(a - b).max() / scale, np.abs(a - g).max() / scale
    assert rel < max(1e-3, 2.0 * spread), (rel, spread)
    assert cache.counters()["inpass_loads"] > 0 and cache.counters()["host_pairs"] > 0   # both branches ran
    raw = np.memmap(lay.path, dtype=np.uint8, mode="r")
    il = int(np.nonzero(cache.cached_layers)[0][0])
    for s in np.nonzero(cache.mapped[il])[0]:
        for p, name in enumerate(("up", "gate", "down")):
            off, n = lay.expert_offset(il, int(cache.slot_expert[il, s]), name)
            assert cache.read_slot(il, int(s), p, n) == raw[off:off + n].tobytes()


@pytest.mark.parametrize("on_host,copies_first,pass_slots,early_down",
                         [(False, False, 0, True), (True, False, 0, True), (False, True, 0, True),
                          (False, False, 8, True), (False, False, 0, False)],
                         ids=["gpu-slots", "host-slots", "gpu-slots-copies-first", "gpu-pass-slots", "gpu-slots-late-down"])
def test_replayed_passes_with_a_host_branch_on_gpu_are_close(files, on_host, copies_first, pass_slots, early_down,
                                                             monkeypatch):
    """Replayed ids (the benchmarks' routing) do not depend on the layer's input, which the plan stop
    copies down for the host branch while the GPU computes the slot branch: the input must be computed
    before the stop reads it (with host slots the plan node can sit on the CPU, the input on the GPU).
    Under the same replay, logits as close to the stock CPU-expert path as the stock all-GPU path is
    (or 1e-3), with in-pass loads and a host branch every pass. Host slots: the slot branch reads them
    on the CPU (in-pass loads write them in the pass). LLAMA_MOE_COPIES_FIRST=1: the input is fetched
    after the plan's copies are issued, before the compute stream waits for them. Pass slots: misses
    beyond the free slots upload into the device's pool (nearly every miss loads) and run on the GPU.
    The stop's reads are queued with the range before the plan node (the scheduler's launch callback)
    unless LLAMA_MOE_EARLY_DOWN=0 (a wait of their own, the A/B switch)."""
    from spac_gguf import gguf_layout
    monkeypatch.setenv("LLAMA_MOE_COPIES_FIRST", "1" if copies_first else "0")
    monkeypatch.setenv("LLAMA_MOE_EARLY_DOWN", "1" if early_down else "0")
    target, _ = files
    lay = gguf_layout.describe(target)
    m = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=True, pinned_experts=True))
    m_gpu = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=False))
    ref, ref_gpu, ctx = (LlamaContext(x, n_ctx=128) for x in (m, m_gpu, m))
    cache = ExpertCache(ctx.ptr, n_slots=4, on_host=on_host, pass_slots=pass_slots)
    assert cache.n_pass_slots == pass_slots          # the pool made on CUDA (quantized experts)
    rng = np.random.default_rng(5)
    toks = m.tokenize(PROMPTS[1])
    a, g, b = ref.decode(toks, "all"), ref_gpu.decode(toks, "all"), ctx.decode(toks, "all")
    h0 = cache.counters()["host_pairs"]
    for step in range(8):
        n = 1 + step % 4
        for il in lay.moe_layers:
            ids = np.stack([rng.choice(lay.n_expert, size=lay.n_expert_used, replace=False) for _ in range(n)])
            for c in (ref, ref_gpu, ctx):
                native.replay(c.ptr, il, ids.astype(np.int32))
        cache.set_inpass(0.999 if pass_slots else 0.5, 1 << 20,
                         rng.random((cache.n_layers, cache.n_expert)).astype(np.float32), 0.0)
        rows = [int(t) for t in rng.integers(100, 1000, n)]
        a, g, b = (np.vstack([x, c.decode(rows, "all")]) for x, c in ((a, ref), (g, ref_gpu), (b, ctx)))
        cache.sync()
    scale = np.abs(a).max()
    rel, spread = np.abs(a - b).max() / scale, np.abs(a - g).max() / scale
    assert rel < max(1e-3, 2.0 * spread), (rel, spread)
    assert cache.counters()["host_pairs"] > h0 and cache.counters()["inpass_loads"] > 0
    assert (cache.counters()["pass_loads"] > 0) == (pass_slots > 0)
    # the stop's reads went with the range before the plan node (the launch hook), or not when off; host
    # slots have no slot device, hence no pinned staging for the stop's reads (read as before)
    assert (cache.counters()["early_downs"] > 0) == (early_down and not copies_first and not on_host), cache.counters()


def test_host_inputs_copied_without_a_wait_give_the_same_logits(files, monkeypatch):
    """The patch's scheduler queues a split's inputs from host memory (the CPU experts' results, the
    user's inputs) on the GPU's stream without a host wait; stock llama.cpp waits for each
    (GGML_SCHED_SYNC_HOST_INPUTS=1, read whenever a scheduler is made, restores the stock scheduler
    whole: also its sync after every eval-callback range and before input-less splits). Experts on the CPU, a prompt
    in several decodes and single rows after it, and the same with a cache and a host branch: logits
    bit-identical either way, the same copies in another order of waiting."""
    target, _ = files
    m = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=True, pinned_experts=True))
    toks = m.tokenize(PROMPTS[0] + " " + PROMPTS[1])
    rows = [int(t) for t in np.random.default_rng(2).integers(100, 1000, 6)]
    out = {}
    for sync in ("1", "0"):
        monkeypatch.setenv("GGML_SCHED_SYNC_HOST_INPUTS", sync)
        plain = LlamaContext(m, n_ctx=256, n_batch=8)
        cached = LlamaContext(m, n_ctx=256, n_batch=8)
        cache = ExpertCache(cached.ptr, n_slots=2, on_host=False)
        cache.set_inpass(0.5, 1 << 20, np.ones((cache.n_layers, cache.n_expert), np.float32), 0.0)
        out[sync] = [np.vstack([c.decode(toks, "all")] + [c.decode([t], "all") for t in rows]) for c in (plain, cached)]
        assert cache.counters()["host_pairs"] > 0
        del cache, cached, plain
    for a, b in zip(out["1"], out["0"]):
        assert np.array_equal(a, b)


def test_direct_reads_on_gpu_are_close_and_copy_nothing(files):
    """Direct reads: passes of <= 4 rows compute the experts no slot serves on the GPU straight from
    pinned host memory (the kernels skip the slot-served ids, -1). Logits as close to the stock
    CPU-expert path as the stock all-GPU path is; every such pass, and only those, reads directly in
    every cached layer; nothing is copied during those passes although in-pass loads are on."""
    target, _ = files
    m = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=True, pinned_experts=True))
    m_gpu = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=False))
    assert m.pinned
    ref, ref_gpu, ctx = LlamaContext(m, n_ctx=128), LlamaContext(m_gpu, n_ctx=128), LlamaContext(m, n_ctx=128)
    cache = ExpertCache(ctx.ptr, n_slots=4, on_host=False)
    n_cached = int(cache.cached_layers.sum())
    assert cache.set_direct(4) == n_cached
    rng = np.random.default_rng(5)
    for il in np.nonzero(cache.cached_layers)[0]:                 # half the experts in slots: hits and misses
        for s, e in enumerate(rng.choice(cache.n_expert, 4, replace=False)):
            cache.load_async(int(il), int(e), s)
    cache.wait_all()
    cache.publish()
    cache.set_inpass(1.0, 1 << 20, np.zeros((cache.n_layers, cache.n_expert), np.float32), np.inf)
    toks = m.tokenize(PROMPTS[2])
    a, g, b = ref.decode(toks, "all"), ref_gpu.decode(toks, "all"), ctx.decode(toks, "all")
    c0 = cache.counters()
    short = 0
    for step in range(12):
        rows = [int(np.argmax(a[-1]))] + [int(t) for t in rng.integers(100, 1000, step % 6)]
        short += len(rows) <= 4
        a2, g2, b2 = ref.decode(rows, "all"), ref_gpu.decode(rows, "all"), ctx.decode(rows, "all")
        a, g, b = np.vstack([a, a2]), np.vstack([g, g2]), np.vstack([b, b2])
    c1 = cache.counters()
    scale = np.abs(a).max()
    rel, spread = np.abs(a - b).max() / scale, np.abs(a - g).max() / scale
    assert rel < max(1e-3, 2.0 * spread), (rel, spread)
    assert c1["direct_passes"] - c0["direct_passes"] == short * n_cached
    assert c1["inpass_loads"] - c0["inpass_loads"] > 0            # the 5- and 6-row passes still upload
    cache.set_direct(0)
    before = cache.counters()["direct_passes"]
    ctx.decode([int(np.argmax(b[-1]))], "all")
    assert cache.counters()["direct_passes"] == before


@pytest.mark.parametrize("where", ["experts-on-cpu", "cache", "all-gpu"])
def test_replay_on_gpu_computes_the_given_experts(files, where):
    """The routing export returns exactly the replayed ids, pass after pass of changing row counts:
    the ids read down from the GPU (queued into pinned memory, one wait per pass) land in the right
    layer and row, with the experts on the CPU, with the cache planning every layer, and all on the GPU."""
    from spac_gguf import gguf_layout
    target, _ = files
    lay = gguf_layout.describe(target)
    m = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=where != "all-gpu",
                                     pinned_experts=where == "cache"))
    ctx = LlamaContext(m, n_ctx=128)
    cache = ExpertCache(ctx.ptr, n_slots=4) if where == "cache" else None
    k = lay.n_expert_used
    r = native.NativeRouting(ctx.ptr, m.n_layer, k)
    rng = np.random.default_rng(2)
    toks = m.tokenize(PROMPTS[0])
    for n in (6, 1, 3, 1, 6):                       # the export's buffer grows and is reused
        batch = [int(t) for t in rng.choice(toks, size=n)]
        want = np.stack([np.stack([rng.permutation(lay.n_expert)[:k] for _ in lay.moe_layers]) for _ in batch])
        for j, il in enumerate(lay.moe_layers):
            native.replay(ctx.ptr, il, want[:, j])
        if cache is not None:
            cache.set_inpass(0.5, 1 << 20, rng.random((cache.n_layers, cache.n_expert)).astype(np.float32), 0.0)
        r.begin()
        lg = ctx.decode(batch, "all")
        assert np.isfinite(lg).all()
        assert np.array_equal(r.end(n)[:, lay.moe_layers], want), n
        if cache is not None:
            cache.sync()
    if cache is not None:
        assert cache.counters()["plans"] > 0


def test_routing_export_on_gpu_reads_every_layer_through_pinned_memory(files):
    """The router's own routing on the GPU (no replay): each decode's ids of every MoE layer are read
    with one wait into pinned memory (one async read per layer per decode), and they are routings:
    k distinct experts in range per row."""
    from spac_gguf import gguf_layout
    target, _ = files
    lay = gguf_layout.describe(target)
    m = LlamaModel(target, Placement(n_gpu_layers=99, experts_on_cpu=False))
    ctx = LlamaContext(m, n_ctx=128)
    r = native.NativeRouting(ctx.ptr, m.n_layer, lay.n_expert_used)
    toks = m.tokenize(PROMPTS[0])
    a0 = native.counters(ctx.ptr)["routing_async_reads"]
    for n in (6, 1, 1):
        r.begin()
        ctx.decode(toks[:n] if n > 1 else toks[-1:], "all")
        ids = r.end(n)[:, lay.moe_layers]
        assert ids.shape == (n, len(lay.moe_layers), lay.n_expert_used)
        assert ((ids >= 0) & (ids < lay.n_expert)).all()
        assert all(len(set(row)) == lay.n_expert_used for row in ids.reshape(-1, lay.n_expert_used))
    assert native.counters(ctx.ptr)["routing_async_reads"] - a0 == 3 * len(lay.moe_layers)


def test_auto_fit_on_the_gpu(files):
    """No placement flags on a GPU machine: ggml's real free memory, one plan block, and the run
    works; squeezed to a pretend 3-slot budget it caches with spac and stays lossless against the
    same placement without a cache."""
    import json
    import os
    import subprocess
    import sys

    from spac_gguf import autofit, gguf_layout
    dev = autofit.device_memory()
    assert dev is not None and 0 < dev.free <= dev.total
    target, draft = files
    base = [sys.executable, "-m", "spac_gguf.cli", "run", str(target), "--draft", str(draft), "-n", "24", "-c", "256",
            "-p", PROMPTS[0], "--json"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "auto-fit" in r.stderr and dev.name in r.stderr and "the whole model fits" in r.stderr
    lay = gguf_layout.describe(target)
    fit0 = autofit.plan_pair(target, draft, 256, free=0)
    fixed = fit0.dense + fit0.draft + fit0.kv + fit0.compute + 512 * (1 << 20)
    free_mib = (fixed + 4.5 * len(lay.moe_layers) * lay.bytes_per_expert) / (1 << 20)
    env = dict(os.environ, SPAC_TEST_GPU_FREE_MIB=f"{free_mib:.3f}")
    cached = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    assert cached.returncode == 0, cached.stderr
    res = json.loads(cached.stdout)
    assert res["cache"]["policy"] == "spac" and res["cache"]["slots_per_layer"] == 3
    plain = subprocess.run(base + ["-ngl", "99", "--policy", "none"], capture_output=True, text=True, timeout=300)
    assert json.loads(plain.stdout)["tokens"] == res["tokens"]


def test_pinning_refused_falls_back_with_one_warning(files):
    """GGML_CUDA_NO_PINNED makes the GPU refuse pinned host memory (as a short host or a locked-memory
    limit would): llama.cpp keeps the experts in pageable memory, the run says so once and stays
    lossless against the pinned run."""
    import json
    import os
    import subprocess
    import sys

    target, draft = files
    base = [sys.executable, "-m", "spac_gguf.cli", "run", str(target), "--draft", str(draft), "-n", "24", "-c", "256",
            "-p", PROMPTS[0], "--json", "-ngl", "99", "--policy", "lru", "--cache-slots", "3", "--no-mmap"]
    pinned = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert pinned.returncode == 0, pinned.stderr
    assert "could not pin" not in pinned.stderr
    refused = subprocess.run(base, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, GGML_CUDA_NO_PINNED="1"))
    assert refused.returncode == 0, refused.stderr
    assert refused.stderr.count("could not pin") == 1, refused.stderr
    assert json.loads(refused.stdout)["tokens"] == json.loads(pinned.stdout)["tokens"]


def test_spac_measures_the_cpu_rate_from_its_split_passes(files, tmp_path):
    """spac on the GPU with a link priced slow, so that each verify pass splits its misses: the
    engine measures the CPU's rate from those passes (host_rate.py) and the output stays the
    target's."""
    import dataclasses
    from spac_gguf.hardware import load_profile
    target, draft = files
    kw = dict(n_gpu_layers=99, experts_on_cpu=True, n_ctx=256)
    off = load(target, draft, **kw)
    ref = [t.token for t in off.generate(PROMPTS[0], max_tokens=32, draft_max=3, stop_at_eog=False)]
    off.close()
    slow = tmp_path / "slow-link.toml"
    slow.write_text(dataclasses.replace(load_profile("h200-pcie5"), name="slow-link", link_gbps=0.05).to_toml())
    on = load(target, draft, policy="spac", cache_slots=2, slots_on_host=False, hw=str(slow), **kw)
    try:                               # K fixed: passes of one shape, which are the ones the rate learns from
        out = [t.token for t in on.generate(PROMPTS[0], max_tokens=32, draft_max=3, adaptive=False,
                                            stop_at_eog=False)]
        rate = on.engine.host_rate
        kinds = dict(on.engine.pass_seconds)
        assert on.cache_stats()["cpu_scale"] == rate.scale          # what `serve`'s /metrics shows
    finally:
        on.close()
    assert out == ref
    split = [v for k, v in kinds.items() if k.endswith(":split")]
    assert split, kinds
    assert rate.passes > 0
    # the host time it learnt is a pass less its stops and plans: positive, below the passes' own time
    # (the split passes' mean; the rate's average weighs recent ones more, hence the margin)
    host = rate.stats()["host_s_per_pass"]
    mean_split = sum(v[1] for v in split) / sum(v[0] for v in split)
    assert 0 < host < 1.5 * mean_split, (host, mean_split)
