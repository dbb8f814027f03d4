"""scripts/report_gpu.py: a matrix split over device calls merges into one table whose ratios are read
within each run (the CPU baseline moves between runs), and the report flags acceptance off target."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "report_gpu", Path(__file__).resolve().parent.parent / "scripts" / "report_gpu.py")
report_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_gpu)


def _row(system, tps, routing="qwen3-calibrated", budget=0.17, acc=None, measured=None):
    return {"system": system, "tps": tps, "tps_min": tps, "tps_max": tps, "routing": routing, "budget": budget,
            "budget_actual": budget, "acceptance_target": acc, "acceptance": measured if measured is not None else acc,
            "n_generated": 48, "passes": 48, "hit_rate": 0.5, "inpass_loads": 0, "bytes_copied": 0,
            "breakdown": {"draft_s": 0.0, "target_decode_s": 1.0, "engine_publish_s": 0.0, "engine_plan_s": 0.0},
            "output_matches_reference": True, "accepted_matches_loop": True if acc is not None else None}


def _doc(rows, routing):
    return {"device": "test", "date": "2026-11-30", "results": rows, "skipped": [], "timed_out": False,
            "bandwidth": {}, "method": {"main_budget": 0.17, "main_acceptance": 0.7, "routing": routing},
            "model": {"target": "t.gguf", "arch": "qwen3moe", "n_layer": 48, "n_expert": 128, "k": 8,
                      "bytes_per_expert": 2 ** 21, "expert_bytes": 2 ** 30, "dense_bytes": 2 ** 30, "draft": "d.gguf",
                      "draft_arch": "qwen3", "draft_layers": 28}}


def test_merged_ratios_stay_within_their_run():
    run1 = _doc([_row("llama_ar_cpu", 40.0), _row("spac_ak", 80.0, acc=0.7), _row("sd_lru", 64.0, acc=0.7)],
                {"qwen3-calibrated": "replayed"})
    run2 = _doc([_row("llama_ar_cpu", 50.0), _row("spac_ak", 75.0, acc=0.7)], {"high-skew": "replayed"})
    doc = report_gpu.merge([("one", run1), ("two", run2)])
    assert [r["source"] for r in doc["results"]] == ["one"] * 3 + ["two"] * 2
    assert set(doc["method"]["routing"]) == {"qwen3-calibrated", "high-skew"}
    lines = report_gpu.ratios(doc).splitlines()
    one = next(x for x in lines if x.startswith("- [one]") and "spac_ak" in x)
    two = next(x for x in lines if x.startswith("- [two]") and "spac_ak" in x)
    assert "2.00× llama_ar_cpu" in one and "1.25× sd_lru" in one      # 80 / 40, 80 / 64
    assert "1.50× llama_ar_cpu" in two and "sd_lru" not in two         # 75 / 50: not 75 / 40, no sd_lru in run two
    table = report_gpu.table(doc)
    assert "| two | qwen3-calibrated | spac_ak" in table and "| 1.50 |" in table


def test_one_run_is_unchanged_and_acceptance_off_target_is_named():
    run = _doc([_row("llama_ar_cpu", 40.0), _row("spac_ak", 80.0, acc=0.7, measured=0.62)], {"random": "replayed"})
    assert report_gpu.merge([("one", run)]) is run
    md = report_gpu.render(run, "x.json", "x.png", "no plot")
    assert "NO for [('spac_ak', 'qwen3-calibrated', 0.7, 0.62)]" in md


def test_runs_of_other_targets_do_not_merge():
    other = _doc([_row("llama_ar_cpu", 40.0)], {})
    other["model"] = {"target": "other.gguf"}
    with pytest.raises(SystemExit):
        report_gpu.merge([("one", _doc([_row("llama_ar_cpu", 40.0)], {})), ("two", other)])
