import numpy as np
import pytest

from spac_gguf.balancer import InfeasibleBudget
from spac_gguf.hardware import REF_EXPERT_BYTES, HardwareProfile, load_profile
from spac_gguf.policies import LRUPolicy
from spac_gguf.simulator import format_table, simulate, slots_per_layer, verify_time
from spac_gguf.testing.synthetic import synthetic_trace

HW = load_profile("desktop-pcie4x16")
ALL = ["none", "static", "lru", "lfu", "oracle_budgeted", "belady", "spac"]


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(120, 4, 32, 4, dense_layers=(0,), expert_bytes=2 << 20, seed=1)


@pytest.fixture(scope="module")
def result(trace):
    return simulate(trace, ALL, cache_slots=6, hw=HW)


def test_belady_hit_rate_beats_every_policy(result):
    r = result["policies"]
    assert set(r) == set(ALL)
    for name in ALL:
        assert r["belady"]["hit_rate"] >= r[name]["hit_rate"], name
    assert r["belady"]["hit_rate"] > r["oracle_budgeted"]["hit_rate"] > r["lru"]["hit_rate"] > 0


def test_none_loads_nothing(result):
    r = result["policies"]["none"]
    assert (r["bytes_loaded"], r["hit_rate"]) == (0, 0.0)
    assert result["policies"]["lru"]["bytes_loaded"] > 0
    assert "oracle_budgeted" in format_table(result) and "belady" in format_table(result)


def test_simulator_runs_the_policy_objects_it_is_given(trace, result):
    calls = []

    class Spy(LRUPolicy):
        def plan(self, resident, link_bytes):
            calls.append(resident.shape)
            return super().plan(resident, link_bytes)

    spy = Spy(trace.n_layers, trace.n_expert, trace.meta["expert_bytes"])
    got = simulate(trace, [spy], cache_slots=6, hw=HW)["policies"]["lru"]
    assert len(calls) == trace.n_passes and calls[0] == (4, 6)
    want = dict(result["policies"]["lru"])
    assert got.pop("mean_solve_us") > 0 and want.pop("mean_solve_us") > 0
    assert got == want


def test_budget_as_share_or_size(trace):
    B = trace.meta["expert_bytes"]
    assert slots_per_layer(trace, "25%", None) == 8
    assert slots_per_layer(trace, f"{4 * 12 * B}", None) == 12
    with pytest.raises(InfeasibleBudget):
        slots_per_layer(trace, "1MiB", None)
    with pytest.raises(ValueError):
        slots_per_layer(trace, "25%", 4)


def test_verify_time_by_hand():
    B = REF_EXPERT_BYTES                                        # per-row costs are given for this size
    hw = HardwareProfile("h", link_gbps=B / 1e9, cpu_expert_gbps=2 * B / 1e9, cpu_s_per_expert_token=0.1,
                         gpu_s_per_expert_token=0.01, gpu_pass_s=0.5, draft_s_per_token=0.0)
    ids = np.array([[[0, 1]], [[0, 2]]], np.int32)             # 1 layer: expert 0 twice, 1 and 2 once
    cached = np.array([[True, False, False]])
    # CPU: experts 1, 2: 2 × (B / 2B B/s + 0.1) = 1.2; GPU: 0.5 + 2 × 0.01 = 0.52
    assert verify_time(ids, cached, hw, B, split=False) == pytest.approx(1.2)
    # per-row costs scale with expert size: half-size experts halve them (and the streaming)
    assert verify_time(ids, cached, hw, B // 2, split=False) == pytest.approx(0.6)
    # split: moving expert 1 (CPU 0.6, link 1.01) gives max(0.6, 1.53) — worse; a fraction f of one
    # expert balances 1.2 − 0.6 f = 0.52 + 1.01 f → f = 0.68 / 1.61
    assert verify_time(ids, cached, hw, B, split=True) == pytest.approx(1.2 - 0.6 * 0.68 / 1.61)


def test_profiles_from_toml_and_calibrate(tmp_path, monkeypatch):
    toml = tmp_path / "models.toml"
    toml.write_text('[hw.mine]\nlink_gbps = 7.5\ncpu_expert_gbps = 9\ncpu_s_per_expert_token = 0\n'
                    '[hw.h100-pcie5]\nlink_gbps = 40\n')
    mine = load_profile("mine", models_toml=toml)
    assert (mine.link_gbps, mine.cpu_expert_gbps, mine.missing()) == (
        7.5, 9.0, ["gpu_s_per_expert_token", "gpu_pass_s", "draft_s_per_token"])
    over = load_profile("h100-pcie5", models_toml=toml)           # a table overrides a built-in's fields
    assert (over.link_gbps, over.cpu_expert_gbps) == (40.0, 41.0)
    (tmp_path / "one.toml").write_text(HW.to_toml())
    assert load_profile(str(tmp_path / "one.toml")) == HW
    with pytest.raises(ValueError, match="lacks"):
        mine.require_complete()
    monkeypatch.setattr("spac_gguf.hardware.measure_cpu_stream_gbps", lambda: 12.345)
    from spac_gguf.hardware import calibrate
    cal = calibrate("here")
    assert cal.cpu_expert_gbps == round(12.345 * 0.61, 2) and cal.gpu_pass_s is None
    assert calibrate("here", base="laptop-pcie4x8").link_gbps == 13.0
