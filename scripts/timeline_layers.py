"""Where a split layer's time goes, from a CUPTI trace of verify passes (scripts/profile_pass.py).

    timeline_layers.py TRACE.json[.gz]        -> a table: per phase of a layer, mean and median µs

The GPU's clock only (kernels and copies; no host events needed). A layer is the stretch between two
plan stops: the compute stream's device-to-host reads of a layer's routed ids (and its input), one
group per cached layer and pass. Between the stop reads of layer i and of layer i+1, in order:

  stop -> first upload   the host wakes, plans and issues the first in-pass copy (GPU and link idle)
  uploads                the in-pass copies (their count, summed time, GB/s), on the copy stream(s)
  slot branch            the compute stream's kernels up to the host branch's result landing
  wait for the CPU       the compute stream idle until the host branch's result is copied in
  join -> segment        that copy's start to the next kernel (the copy, the next launch)
  segment                residual, norms, attention, router of layer i+1 (up to its stop reads)
  segment -> reads       the last kernel to the stop reads (the reads' own queueing)

Layers without a host-branch copy (nothing left to the CPU that pass) are counted apart. Where the
trace has the CUDA runtime calls too (torch's profiler records them, tied to the GPU's work by a
correlation id), the host's side of the same layers:

  host: stop -> CPU start     the stop reads' end to the slot branch's launch returning (the plan,
                              the copies issued, the launch): when the CPU branch starts
  host: CPU branch            from there to the call that copies its result in (the CPU's work)
  host: CPU done -> segment   that call to the next segment's first kernel (the copy, the launch)
  slot end - CPU done         the GPU's slot branch end less the CPU's end (> 0: the GPU was later)
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

UPLOAD_MIN_BYTES = 1 << 20   # an in-pass expert copy (a bench expert is 2.65 MB); smaller ones are inputs
GROUP_GAP_US = 20.0          # device-to-host reads closer than this are one stop's


def _spans(doc, cats: tuple[str, ...]) -> list[dict]:
    """The trace's complete events of these categories."""
    evs = doc.get("traceEvents", []) if isinstance(doc, dict) else doc
    return [e for e in evs if e.get("ph") == "X" and e.get("cat") in cats]


def _calls(doc) -> dict:
    """The CUDA runtime calls by correlation id (what queued each kernel or copy)."""
    return {e["args"]["correlation"]: e for e in _spans(doc, ("cuda_runtime",)) if "correlation" in e.get("args", {})}


def _within(evs: list[dict], ts: list[float], t0: float, t1: float) -> list[dict]:
    """The events (sorted by start, `ts` their starts) that start in [t0, t1)."""
    return evs[bisect.bisect_left(ts, t0):bisect.bisect_left(ts, t1)]


def _call(calls: dict, e: dict) -> dict | None:
    return calls.get(e.get("args", {}).get("correlation"))


def _is_copy(e: dict, kind: str) -> bool:
    return e.get("cat") == "gpu_memcpy" and kind in e.get("name", "")


def layer_phases(doc, ids_bytes: int | None = None) -> dict:
    """Per-layer phases (µs) of the split layers in a trace; see the module docstring. Only the layers
    whose stop read `ids_bytes` of routed ids (a pass's rows x top-k x 4; default: the most common
    size, the decode passes), so that a prompt's pass does not blend in."""
    evs = sorted(_spans(doc, ("kernel", "gpu_memcpy")), key=lambda e: e["ts"])
    count = Counter(e["tid"] for e in evs if e["cat"] == "kernel")
    if not count:
        return {"layers": 0, "layers_without_host_branch": 0, "phases": {}}
    compute = count.most_common(1)[0][0]             # the busiest stream computes
    on_c = [e for e in evs if e["tid"] == compute]
    uploads = [e for e in evs if _is_copy(e, "HtoD") and e.get("args", {}).get("bytes", 0) >= UPLOAD_MIN_BYTES]
    on_c_ts, uploads_ts = [e["ts"] for e in on_c], [e["ts"] for e in uploads]
    # the stop reads: device-to-host copies on the compute stream, grouped
    stops: list[list[dict]] = []
    for e in on_c:
        if _is_copy(e, "DtoH"):
            if stops and e["ts"] - (stops[-1][-1]["ts"] + stops[-1][-1]["dur"]) < GROUP_GAP_US:
                stops[-1].append(e)
            else:
                stops.append([e])
    sizes = Counter(g[0]["args"].get("bytes", 0) for g in stops)
    if ids_bytes is None and sizes:
        ids_bytes = sizes.most_common(1)[0][0]
    ph: dict[str, list[float]] = {k: [] for k in (
        "stop -> first upload", "uploads (summed)", "slot branch", "wait for the CPU", "join -> segment",
        "segment", "segment -> reads", "layer",
        "host: stop -> CPU start", "host: CPU branch", "host: CPU done -> segment", "slot end - CPU done")}
    calls = _calls(doc)
    n_up, up_bytes, up_us = [], 0, 0.0
    without = 0
    for a, b in zip(stops, stops[1:]):
        if a[0]["args"].get("bytes", 0) != ids_bytes:
            continue
        t0 = a[-1]["ts"] + a[-1]["dur"]               # this layer's stop reads done
        t1 = b[0]["ts"]                               # the next layer's stop reads begin
        win = _within(on_c, on_c_ts, t0, t1)
        ks = [e for e in win if e["cat"] == "kernel"]
        ups = _within(uploads, uploads_ts, t0, t1)
        # the host branch's result: the first host-to-device copy on the compute stream after a kernel
        first_k = ks[0]["ts"] if ks else t1
        joins = [e for e in win if _is_copy(e, "HtoD") and e["ts"] > first_k
                 and e.get("args", {}).get("bytes", 0) < UPLOAD_MIN_BYTES]
        if not ks or not joins:
            without += 1
            continue
        join = joins[0]
        slot = [e for e in ks if e["ts"] < join["ts"]]
        seg = [e for e in ks if e["ts"] > join["ts"]]
        if not slot or not seg:
            without += 1
            continue
        slot_end = max(e["ts"] + e["dur"] for e in slot)
        seg_end = max(e["ts"] + e["dur"] for e in seg)
        if ups:
            ph["stop -> first upload"].append(ups[0]["ts"] - t0)
            ph["uploads (summed)"].append(sum(e["dur"] for e in ups))
            n_up.append(len(ups))
            up_bytes += sum(e["args"]["bytes"] for e in ups)
            up_us += sum(e["dur"] for e in ups)
        ph["slot branch"].append(slot_end - slot[0]["ts"])
        ph["wait for the CPU"].append(max(0.0, join["ts"] - slot_end))
        ph["join -> segment"].append(seg[0]["ts"] - join["ts"])
        ph["segment"].append(seg_end - seg[0]["ts"])
        ph["segment -> reads"].append(max(0.0, t1 - seg_end))
        ph["layer"].append(t1 - t0 + (b[-1]["ts"] + b[-1]["dur"] - t1))
        launch, done = _call(calls, slot[0]), _call(calls, join)      # the slot branch's launch, the join's copy
        if launch is not None and done is not None:
            cpu0 = launch["ts"] + launch["dur"]
            ph["host: stop -> CPU start"].append(cpu0 - t0)
            ph["host: CPU branch"].append(done["ts"] - cpu0)
            ph["host: CPU done -> segment"].append(seg[0]["ts"] - done["ts"])
            ph["slot end - CPU done"].append(slot_end - done["ts"])
    out = {"ids_bytes": ids_bytes, "stops_by_ids_bytes": dict(sizes),
           "layers": len(ph["layer"]), "layers_without_host_branch": without,
           "uploads_per_layer": statistics.mean(n_up) if n_up else 0.0,
           "upload_gbps": up_bytes / up_us / 1e3 if up_us else 0.0,
           "phases": {k: {"mean_us": statistics.mean(v), "median_us": statistics.median(v)}
                      for k, v in ph.items() if v}}
    return out


def table(res: dict) -> str:
    lines = [f"{res['layers']} split layers whose stop read {res.get('ids_bytes')} B of ids "
             f"({res['layers_without_host_branch']} without a host branch left out); "
             f"{res.get('uploads_per_layer', 0):.2f} uploads per layer at {res.get('upload_gbps', 0):.1f} GB/s",
             "| phase | mean µs | median µs |", "|---|---|---|"]
    for k, v in res["phases"].items():
        lines.append(f"| {k} | {v['mean_us']:.1f} | {v['median_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="a chrome trace from profile_pass.py (.json or .json.gz)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--ids-bytes", type=int, default=None,
                    help="the layers whose stop read this many bytes of ids (default: the most common)")
    a = ap.parse_args(argv)
    p = Path(a.trace)
    try:
        doc = json.loads(gzip.open(p, "rt").read() if p.suffix == ".gz" else p.read_text())
    except (OSError, ValueError) as e:
        print(f"timeline_layers: cannot read {p}: {e}", file=sys.stderr)
        return 2
    try:
        res = layer_phases(doc, a.ids_bytes)
    except (KeyError, TypeError, AttributeError) as e:     # JSON, but not events as CUPTI writes them
        print(f"timeline_layers: {p} is not a CUPTI trace: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
