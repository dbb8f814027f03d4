"""scripts/timeline_layers.py on a made-up trace whose phases are known by construction."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import timeline_layers  # noqa: E402

C, U = 7, 9   # the compute stream and the copy stream


_corr = iter(range(1, 1 << 30))


def k(ts, dur, stream=C, corr=None):
    return {"ph": "X", "cat": "kernel", "name": "k", "tid": stream, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def call(ts, dur, corr):
    """The host's runtime call that queued the event with the same correlation id."""
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "tid": 1, "ts": ts, "dur": dur,
            "args": {"correlation": corr}}


def cp(ts, dur, kind, nbytes, stream=C):
    pin = "Pinned -> Device" if kind == "HtoD" else "Device -> Pinned"
    return {"ph": "X", "cat": "gpu_memcpy", "name": f"Memcpy {kind} ({pin})", "tid": stream, "ts": ts, "dur": dur,
            "args": {"bytes": nbytes, "correlation": next(_corr)}}


def layer(t, n_up, ids=32):
    """One split layer from its stop reads at t: known gaps, returned with the events."""
    ev = [cp(t, 2, "DtoH", ids), cp(t + 3, 2, "DtoH", 8192)]            # stop reads end at t + 5
    up0 = t + 5 + 12                                                      # stop -> first upload: 12
    ev += [cp(up0 + 50 * i, 50, "HtoD", 2 << 20, U) for i in range(n_up)]
    s0 = up0 + 50 * n_up + 1
    c = next(_corr)
    ev += [k(s0, 10, corr=c), k(s0 + 10, 20)]                             # slot branch: 30
    ev += [call(t + 5 + 40, 10, c)]                                       # its launch returns at t + 55: the CPU starts
    j = s0 + 30 + 25                                                      # wait for the CPU: 25
    join = cp(j, 3, "HtoD", 65536)
    ev += [join, call(j - 2, 1, join["args"]["correlation"])]            # the CPU is done at j - 2
    g0 = j + 40                                                           # join -> segment: 40
    ev += [k(g0, 30), k(g0 + 30, 30)]                                     # segment: 60
    return ev, g0 + 60 + 4                                                # segment -> reads: 4


def trace(n_layers=4, n_up=3, prompt_first=True):
    ev, t = [], 1000.0
    if prompt_first:                                                      # a prompt's layer: other ids size
        e, t = layer(t, 8, ids=224)
        ev += e
    for _ in range(n_layers):
        e, t = layer(t, n_up)
        ev += e
    ev += [cp(t, 2, "DtoH", 32)]                                          # the last layer's end
    return {"traceEvents": ev + [{"ph": "M", "name": "process_name"}]}


def test_phases_are_the_made_up_ones():
    res = timeline_layers.layer_phases(trace())
    assert res["ids_bytes"] == 32 and res["layers"] == 4 and res["layers_without_host_branch"] == 0
    want = {"stop -> first upload": 12, "uploads (summed)": 150, "slot branch": 30, "wait for the CPU": 25,
            "join -> segment": 40, "segment": 60, "segment -> reads": 4}
    for name, us in want.items():
        assert res["phases"][name]["median_us"] == pytest.approx(us), name
    assert res["uploads_per_layer"] == 3
    assert res["upload_gbps"] == pytest.approx((2 << 20) / 50 / 1e3)
    # a layer: its stop reads (5) and the phases above, less what they share (the slot branch starts 1 after)
    assert res["phases"]["layer"]["median_us"] == pytest.approx(5 + 12 + 150 + 1 + 30 + 25 + 40 + 60 + 4)
    # the host's side: the CPU from the slot branch's launch (t + 55) to the join's call (j - 2)
    s0 = 5 + 12 + 150 + 1                                                 # the slot branch, from the layer's t
    host = {"host: stop -> CPU start": 50, "host: CPU branch": (s0 + 55 - 2) - 55,
            "host: CPU done -> segment": 42, "slot end - CPU done": -23}
    for name, us in host.items():
        assert res["phases"][name]["median_us"] == pytest.approx(us), name


def test_the_prompts_layers_apart_and_on_request():
    res = timeline_layers.layer_phases(trace(), ids_bytes=224)
    assert res["layers"] == 1 and res["uploads_per_layer"] == 8


def test_cli_reads_a_gzipped_trace_and_refuses_a_broken_one(tmp_path):
    p = tmp_path / "t.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump(trace(), f)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "timeline_layers.py"), str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "| join -> segment | 40.0 | 40.0 |" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "timeline_layers.py"), str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr
    odd = tmp_path / "odd.json"                                          # JSON, but events without their fields
    odd.write_text(json.dumps({"traceEvents": [k(0, 1), {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH",
                                                          "tid": C, "ts": 2, "dur": 1}]}))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "timeline_layers.py"), str(odd)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a CUPTI trace" in r.stderr and "Traceback" not in r.stderr, r.stderr
