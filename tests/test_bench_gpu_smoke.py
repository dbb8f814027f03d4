"""The GPU benchmark's script end to end on the CPU (small benchmark pair, a few tokens): it runs every
kind of system (plain, cache with and without a draft), and every system does the same work, the
point of the benchmark: the same tokens as the target alone, a measured acceptance near the set one,
the routing labelled as replayed. Timings are not checked (performance lives in the benchmarks)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spac_gguf import native

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the patched llama.cpp")


def test_bench_gpu_runs_on_the_cpu_and_every_system_does_the_same_work(tmp_path):
    mk = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_bench_model.py"), "--out", str(tmp_path),
                         "--scale", "small"], capture_output=True, text=True, timeout=300)
    assert mk.returncode == 0, mk.stderr
    out = tmp_path / "bench.json"
    systems = ["llama_ar_cpu", "sd_lru", "spac", "spac_ak", "spac_aks", "spac_ar", "llama_ar_offload1"]   # the last in a child process
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"),
                        "--target", str(tmp_path / "bench-target.gguf"), "--draft", str(tmp_path / "bench-draft.gguf"),
                        "--systems", ",".join(systems), "--routing", "random", "--budgets", "0.17",
                        "--acceptances", "0.7,0.9", "--repeats", "1", "-n", "20", "--no-bw", "-t", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {row["system"]: row for row in doc["results"] if row["acceptance_target"] in (None, 0.7)}
    assert sorted(rows) == sorted(systems)
    ak = [row for row in doc["results"] if row["system"] == "spac_ak"]
    assert len(ak) == 2
    for row in ak:   # a controller per workload: its rounds are one untimed run of that cell's and the cell's own
        own, seen = sum(row["k_histogram"].values()), sum(row["draft_length"]["k_histogram"].values())
        assert own < seen <= own + 20, (own, seen)
    for name, row in rows.items():
        assert row["output_matches_reference"] is True, name
        assert row["accepted_matches_loop"] in (None, True), name    # the oracle's acceptance accounting
        assert row["routing"] == "random" and row["n_generated"] == 20, name
        # the passes computed the trace's experts (the bench's own check of its replay)
        assert row["replay_rows_checked"] >= 20 and row["replay_rows_mismatched"] == 0, name
    assert "replayed" in doc["method"]["routing"]["random"]
    for name in ("sd_lru", "spac"):                                # the oracle draft, 30 % of it corrupted
        assert rows[name]["draft_max"] == 5 and 0.6 <= rows[name]["acceptance"] <= 0.9, rows[name]["acceptance"]
    assert rows["spac_ar"]["draft_max"] == 0 and rows["spac_ar"]["acceptance"] is None
    # adaptive K (lossless above, like every system) reports its controller's estimates
    assert rows["spac_ak"]["adaptive"] and len(rows["spac_ak"]["draft_length"]["alpha"]) >= 1
    assert rows["spac_ak"]["draft_length"]["explore"] == "probe" and rows["spac_aks"]["draft_length"]["explore"] == "sample"
    assert rows["spac_aks"]["adaptive"] and rows["spac_aks"]["output_matches_reference"]
    assert any(k.startswith("first:") for k in rows["sd_lru"]["draft_calls"])   # draft decodes timed by place
    assert doc["method"]["catch_up"] == "auto"
    assert rows["llama_ar_offload1"]["config"]["GGML_OP_OFFLOAD_MIN_BATCH"] == 1
    # the llama.cpp systems stand for stock llama.cpp: its synchronous host-input copies, ours the patch's
    assert rows["llama_ar_cpu"]["config"]["host_inputs"].startswith("synchronous"), rows["llama_ar_cpu"]["config"]
    assert rows["llama_ar_offload1"]["config"]["host_inputs"].startswith("synchronous")
    assert rows["spac_ar"]["config"]["host_inputs"].startswith("asynchronous")
    assert rows["spac"]["hits"] + rows["spac"]["misses"] > 0   # the cache saw the replayed routing
    steps = rows["spac"]["engine_ms_per_pass"]                  # where the engine's time goes reaches the JSON
    assert {"ledger", "observe", "hits"} <= set(steps) and all(v >= 0 for v in steps.values())
    assert rows["llama_ar_cpu"]["engine_ms_per_pass"] == {}
    for name in ("spac", "sd_lru", "spac_ar"):                 # every verify pass timed by its rows and kind
        kinds = rows[name]["pass_kinds"]
        assert sum(c for c, _, _ in kinds.values()) == rows[name]["passes"], (name, kinds)
        assert all(k.split(":")[1] in ("gpu", "split") and 1 <= int(k.split(":")[0]) <= 6 and ms > 0
                   for k, (_, ms, _) in kinds.items()), kinds
        # the share each kind ran at: all uploads at 1, a split below it
        assert all((sh == 1.0) == k.endswith(":gpu") and 0.0 <= sh <= 1.0 for k, (_, _, sh) in kinds.items()), kinds
    assert all(k.endswith(":gpu") for k in rows["sd_lru"]["pass_kinds"])   # upstream's design: no CPU share
    assert rows["llama_ar_cpu"]["pass_kinds"] == {}
    # the plan stops' time reaches the JSON (waiting for the nodes before the plan, the plan itself)
    assert rows["spac"]["plans"] > 0 and rows["spac"]["plan_s"] > 0 and rows["spac"]["stop_s"] > 0
    assert rows["llama_ar_cpu"]["plans"] == 0 and rows["llama_ar_cpu"]["plan_s"] == 0
    # the cache's counters cover the timed passes only: plain decoding plans each MoE layer once a pass,
    # and the prompt's pass (with its tens of misses per layer) is reported apart
    n_moe = doc["model"]["n_layer"]                           # every layer of the bench model is MoE
    assert rows["spac_ar"]["plans"] == rows["spac_ar"]["passes"] * n_moe, (rows["spac_ar"]["plans"], n_moe)
    assert rows["spac_ar"]["prefill_counters"]["plans"] >= n_moe
    # the per-pass roofline's GPU term comes from this run even without llama_ar_gpu among the systems
    assert sorted(doc["gpu_pass_rows_s"]) == ["1", "6"] and all(v > 0 for v in doc["gpu_pass_rows_s"].values())
    assert "bound only" in doc["gpu_pass_rows_basis"]
    # the CPU baseline is timed at both ends of the run (it drifts): one row, both visits' rates in it
    base = [row for row in doc["results"] if row["system"] == "llama_ar_cpu"]
    assert len(base) == 1 and base[0]["repeats"] == 1 and len(base[0]["tps_runs"]) == 2, base
    assert [len(v) for v in base[0]["anchor_tps_runs"].values()] == [1, 1], base[0]["anchor_tps_runs"]
    assert sorted(base[0]["tps_runs"]) == sorted(sum(base[0]["anchor_tps_runs"].values(), []))


def test_bench_catch_up_ways_keep_the_same_work(tmp_path):
    """--catch-up split / batch (how the draft decodes the two tokens it has not seen after a round that
    accepted every draft: a = 0.9): same tokens, same acceptance either way, the one-row catch-up
    decodes counted apart, and each way timed only when used."""
    mk = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_bench_model.py"), "--out", str(tmp_path),
                         "--scale", "small"], capture_output=True, text=True, timeout=300)
    assert mk.returncode == 0, mk.stderr
    acc = {}
    for way in ("batch", "split"):
        out = tmp_path / f"bench-{way}.json"
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"),
                            "--target", str(tmp_path / "bench-target.gguf"), "--draft", str(tmp_path / "bench-draft.gguf"),
                            "--systems", "llama_sd_cpu", "--routing", "random", "--acceptances", "0.9",
                            "--repeats", "1", "-n", "24", "--no-bw", "-t", "2", "--out", str(out), "--catch-up", way],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        doc = json.loads(out.read_text())
        row = doc["results"][0]
        assert doc["method"]["catch_up"] == way and row["output_matches_reference"] is True
        acc[way] = row["acceptance"]
        catchups = [k for k in row["draft_calls"] if k.startswith("catchup:")]
        assert bool(catchups) == (way == "split"), row["draft_calls"]
        assert row["catch_up_pair"][way][0] > 0 and row["catch_up_pair"]["batch" if way == "split" else "split"][0] == 0
    assert acc["split"] == acc["batch"]


def test_the_stock_scheduler_is_held_for_the_pairs_whole_life(monkeypatch):
    """llama.cpp reads GGML_SCHED_SYNC_HOST_INPUTS whenever it makes a scheduler (every reserve), so the
    bench holds it set while a llama.cpp system's pair lives and restores it after; ours never get it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_gpu
    monkeypatch.delenv(bench_gpu.STOCK_SCHED_ENV, raising=False)
    a = argparse.Namespace(baseline_async_inputs=False)
    with bench_gpu.host_inputs_for("llama_ar_cpu", a) as label:
        assert os.environ[bench_gpu.STOCK_SCHED_ENV] == "1" and label.startswith("synchronous")
    assert bench_gpu.STOCK_SCHED_ENV not in os.environ
    with bench_gpu.host_inputs_for("spac_ar", a) as label:
        assert bench_gpu.STOCK_SCHED_ENV not in os.environ and label.startswith("asynchronous")
    with bench_gpu.host_inputs_for("llama_ar_cpu", argparse.Namespace(baseline_async_inputs=True)) as label:
        assert bench_gpu.STOCK_SCHED_ENV not in os.environ and label.startswith("asynchronous")
    monkeypatch.setenv(bench_gpu.STOCK_SCHED_ENV, "0")
    with bench_gpu.host_inputs_for("llama_ar_cpu", a):
        assert os.environ[bench_gpu.STOCK_SCHED_ENV] == "1"
    assert os.environ[bench_gpu.STOCK_SCHED_ENV] == "0"
    with bench_gpu.host_inputs_for("spac_ar", a) as label:     # "0" reads as off, as ggml's atoi does
        assert label.startswith("asynchronous")


def test_anchor_between_brackets_every_system_with_baseline_visits(tmp_path):
    """--anchor-between: the CPU baseline is timed first (though listed last), again after every other
    system, and each row holds its ratio to the baseline's visits right before and after it (the
    visit after one system is the one before the next), so a baseline that drifts during the run
    shows in the brackets; the baseline's row holds every visit."""
    mk = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_bench_model.py"), "--out", str(tmp_path),
                         "--scale", "small"], capture_output=True, text=True, timeout=300)
    assert mk.returncode == 0, mk.stderr
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"),
                        "--target", str(tmp_path / "bench-target.gguf"), "--draft", str(tmp_path / "bench-draft.gguf"),
                        "--systems", "spac_ar,lru_ar,llama_ar_cpu", "--routing", "random", "--budgets", "0.17",
                        "--repeats", "1", "-n", "12", "--no-bw", "--no-pass-bound", "-t", "2", "--anchor-between",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["system"]: row for row in json.loads(out.read_text())["results"]}
    base = rows["llama_ar_cpu"]
    visits = base["anchor_tps_runs"]
    assert [len(visits[k]) for k in ("first", "between", "last")] == [1, 1, 1], visits
    assert sorted(base["tps_runs"]) == sorted(sum(visits.values(), []))
    first, mid, last = visits["first"][0], visits["between"][0], visits["last"][0]
    # systems in the order given, each between two visits
    assert rows["spac_ar"]["anchor_bracket"]["before"] == first and rows["spac_ar"]["anchor_bracket"]["after"] == mid
    assert rows["lru_ar"]["anchor_bracket"]["before"] == mid and rows["lru_ar"]["anchor_bracket"]["after"] == last
    for name in ("spac_ar", "lru_ar"):
        br = rows[name]["anchor_bracket"]
        assert br["ratio"] == pytest.approx(rows[name]["tps"] / ((br["before"] + br["after"]) / 2)), (name, br)
        assert rows[name]["output_matches_reference"] is True
