"""Auto-fit sizing with made-up device memory (the GPU machine checks it for real), and the CLI path
with a pretend GPU on this CPU build (SPAC_TEST_GPU_FREE_MIB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from spac_gguf import autofit, gguf_layout
from spac_gguf.testing import models as testmodels

MiB = 1 << 20


@pytest.fixture(scope="module")
def pair():
    return testmodels.make_pair(arch="qwen3moe", quant="Q8_0")


def test_kv_bytes_from_the_gguf_hparams(pair):
    r = gguf.GGUFReader(str(pair[0]))
    f = {k: r.fields[k].parts[-1][0] for k in r.fields if k.startswith("qwen3moe.")}
    n_layer, n_kv = int(f["qwen3moe.block_count"]), int(f["qwen3moe.attention.head_count_kv"])
    head = int(f.get("qwen3moe.attention.key_length", int(f["qwen3moe.embedding_length"]) // int(f["qwen3moe.attention.head_count"])))
    assert autofit.kv_bytes(pair[0], 1000) == n_layer * 1000 * n_kv * 2 * head * 2


@pytest.mark.parametrize("free_gib,mode", [(40.0, "gpu"), (19.0, "cache"), (8.0, "cache"), (5.0, "cache"),
                                           (4.0, "host-experts"), (2.5, "host-experts")])
def test_plan_fills_the_gpu_and_never_overfills_it(free_gib, mode):
    """The Qwen3-30B-A3B-shaped numbers: everything on the GPU when it fits, else the largest cache
    that fits beside the fixed parts (and never more), else experts on the host."""
    n_moe, E, B = 48, 128, 2_654_208
    free = int(free_gib * (1 << 30))
    fit = autofit.plan(dense=1_600_000_000, experts=n_moe * E * B, bytes_per_expert=B, n_moe_layers=n_moe, n_expert=E,
                       draft_bytes=800 * MiB, kv=400 * MiB, compute=768 * MiB + 151936 * 4 * 512, free=free)
    fixed = fit.dense + fit.draft + fit.kv + fit.compute + fit.margin
    row = n_moe * B
    if fixed + n_moe * E * B <= free:
        assert fit.mode == "gpu"
    elif free - fixed < 2 * row:
        assert fit.mode == "host-experts"
    else:
        assert fit.mode == "cache"
        used = fixed + (fit.slots_per_layer + 1) * row          # + the all-zero slot
        assert used <= free
        assert fit.slots_per_layer == E - 1 or used + row > free   # the largest that fits
        assert fit.cache == fit.slots_per_layer * row
    assert fit.mode == mode


def test_cache_after_loading_takes_the_measured_free_memory():
    """After loading, the cache is sized from what the GPU has free then, with the margin and the zero
    slot: the largest count that fits, never one more; below one expert per layer, none. The H200
    numbers: 8.61 GiB left after loading the benchmark pair (70 slots ran, 128 did not fit)."""
    n_moe, E, B = 48, 128, 2_654_208
    row = n_moe * B
    for free in (int(8.61 * (1 << 30)), 3 << 30, int(0.6 * (1 << 30)), 200 * MiB):
        s = autofit.slots_after_load(free, B, n_moe, E)
        margin = max(384 * MiB, free // 25)
        if s:
            assert (s + 1) * row + margin <= free < (s + 2) * row + margin
            # what is left for pass slots: less than one more slot per layer, everything the slots leave
            room = autofit.room_after_slots(free, B, n_moe, s)
            assert 0 <= room < row and (s + 1) * row + margin + room == free
        else:
            assert 2 * row + margin > free
    assert 65 <= autofit.slots_after_load(int(8.61 * (1 << 30)), B, n_moe, E) <= 70
    assert autofit.slots_after_load(1 << 40, B, n_moe, E) == E - 1


def test_cli_prints_the_plan_and_stays_lossless(pair):
    t, d = pair
    lay = gguf_layout.describe(t)
    base = autofit.plan_pair(t, d, 256, free=0)
    fixed = base.dense + base.draft + base.kv + base.compute + 512 * MiB
    free_mib = (fixed + 4.5 * len(lay.moe_layers) * lay.bytes_per_expert) / MiB   # room for 3 slots + the zero slot
    args = [sys.executable, "-m", "spac_gguf.cli", "run", str(t), "--draft", str(d), "-n", "12", "-c", "256",
            "-t", "2", "-p", "Hello there", "--json"]
    env = dict(os.environ, SPAC_TEST_GPU_FREE_MIB=f"{free_mib:.3f}")
    auto = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert auto.returncode == 0, auto.stderr
    assert "auto-fit" in auto.stderr and "GPU cache" in auto.stderr and "policy spac" in auto.stderr
    res = json.loads(auto.stdout)
    assert res["cache"]["policy"] == "spac" and res["cache"]["slots_per_layer"] == 3
    cpu = subprocess.run(args + ["--cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert cpu.returncode == 0 and "auto-fit" not in cpu.stderr
    assert json.loads(cpu.stdout)["tokens"] == res["tokens"]
    assert json.loads(cpu.stdout)["cache"] is None
    assert np.array_equal(json.loads(cpu.stdout)["tokens"], res["tokens"])
    # an explicit cache size wins over the plan's, and the plan block says so
    more = subprocess.run(args + ["--cache-slots", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout)["cache"]["slots_per_layer"] == 2
    assert "overridden   --cache-slots 2" in more.stderr
    assert "overridden" not in auto.stderr


def test_auto_fit_measures_the_machine_profile_once(pair, tmp_path):
    """The balancer's costs under auto-fit are this machine's: the first run measures the CPU on top of
    the closest named profile and caches it under the user cache; later runs read it; another device
    (here: another total memory) is measured anew; --hw overrides."""
    from spac_gguf.hardware import load_profile
    t, d = pair
    lay = gguf_layout.describe(t)
    base = autofit.plan_pair(t, d, 256, free=0)
    fixed = base.dense + base.draft + base.kv + base.compute + 512 * MiB
    free_mib = (fixed + 4.5 * len(lay.moe_layers) * lay.bytes_per_expert) / MiB
    args = [sys.executable, "-m", "spac_gguf.cli", "run", str(t), "--draft", str(d), "-n", "4", "-c", "256",
            "-t", "2", "-p", "Hello there", "--json"]

    def run(mib, *extra):
        env = dict(os.environ, SPAC_TEST_GPU_FREE_MIB=f"{mib:.3f}", XDG_CACHE_HOME=str(tmp_path))
        r = subprocess.run(args + list(extra), capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stderr

    hw_dir = tmp_path / "spac-gguf" / "hw"
    first = run(free_mib)
    assert "profile      measured now" in first
    files = list(hw_dir.glob("*.toml"))
    assert len(files) == 1
    prof = load_profile(str(files[0]))
    assert prof.cpu_expert_gbps > 0 and prof.link_gbps == load_profile("desktop-pcie4x16").link_gbps
    stamp = files[0].stat().st_mtime_ns
    assert "profile      measured before" in run(free_mib)
    assert files[0].stat().st_mtime_ns == stamp
    other = (fixed + 3.5 * len(lay.moe_layers) * lay.bytes_per_expert) / MiB    # another device: 2 slots
    assert "profile      measured now" in run(other)
    assert len(list(hw_dir.glob("*.toml"))) == 2
    assert "profile " not in run(free_mib, "--hw", "h200-pcie5")


def test_compute_estimate_and_gpu_weights_follow_llama_cpp(pair):
    """Checked against an independent reader: the compute reserve holds the logits of a full ubatch
    (every row an output, as llama.cpp reserves) and one layer's attention scores, both growing with -c
    up to the 512-row ubatch; the GPU's share of the weights leaves out token_embd (llama.cpp keeps the
    input layer on the host)."""
    t, d = pair
    r = gguf.GGUFReader(str(t))
    n_head = int(r.fields["qwen3moe.attention.head_count"].parts[-1][0])
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    small, large = autofit.compute_bytes(t, 256), autofit.compute_bytes(t, 32768)
    assert small == 128 * MiB + n_head * 256 * 256 * 4 + vocab * 4 * 256
    assert large == 128 * MiB + n_head * 32768 * 512 * 4 + vocab * 4 * 512
    emb = next(int(x.n_bytes) for x in r.tensors if x.name == "token_embd.weight")
    assert emb > 0 and autofit.input_embedding_bytes(t) == emb
    fit = autofit.plan_pair(t, d, 256, free=0)
    assert fit.dense == gguf_layout.describe(t).dense_bytes - emb
    assert fit.draft == os.path.getsize(d) - autofit.input_embedding_bytes(d)
