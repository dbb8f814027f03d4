"""Where a split verify pass's time goes, on the GPU's own clock (GPU machine, torch's CUPTI profiler).

    profile_pass.py --target T.gguf --draft D.gguf --out DIR [--systems spac_ar,spac] [--share 0.5]
                    [--routing random] [-n 12] [--budget 0.17]

For each system: the pair loaded as scripts/bench_gpu.py loads it, one untimed run, then one run of n
tokens under torch.profiler (kernels, copies and CUDA runtime calls of every library in the process,
llama.cpp's included). Writes DIR/<system>.trace.json.gz (chrome trace, open in Perfetto) and
DIR/<system>.summary.json: per pass kind, GPU kernel time, copy time by direction and size, the
compute stream's idle gaps, the host's time blocked in synchronizations, and a split layer's phases
(scripts/timeline_layers.py, also printed). The counters the bench
reports (stop, plan, down, copy) come from the host's clock; this is the device's view of the same
passes. Not a benchmark: the profiler slows launches; use it for where, not how fast.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch  # first: its CUDA runtime and CUPTI are loaded before llama.cpp's

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_gpu  # noqa: E402
import timeline_layers  # noqa: E402
from spac_gguf import gguf_layout, locality  # noqa: E402


def summarize(events: list[dict], passes: int) -> dict:
    """Device-side totals of one profiled run: kernels, copies by direction and size class, the gaps
    between consecutive kernels of the busiest stream (where the GPU waits for the host or a copy)."""
    kern = [e for e in events if e.get("cat") == "kernel"]
    cpy = [e for e in events if e.get("cat") == "gpu_memcpy"]
    rt = [e for e in events if e.get("cat") == "cuda_runtime"]
    by_stream = defaultdict(list)
    for e in kern:
        by_stream[e.get("args", {}).get("stream")].append(e)
    main = max(by_stream, key=lambda s: len(by_stream[s])) if by_stream else None
    ks = sorted(by_stream.get(main, []), key=lambda e: e["ts"])
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(ks, ks[1:])]
    edges = [2, 5, 10, 20, 50, 100, 200, 500, 1e9]
    hist = {}
    for g in gaps:
        for x in edges:
            if g < x:
                k = f"<{x:g}us" if x < 1e9 else ">=500us"
                hist.setdefault(k, [0, 0.0])
                hist[k][0] += 1
                hist[k][1] += g
                break
    copies = defaultdict(lambda: [0, 0.0, 0])
    for e in cpy:
        name = e.get("name", "")
        nbytes = int(e.get("args", {}).get("bytes", 0))
        size = "large" if nbytes >= 1 << 20 else "small"
        k = f"{name} {size}"
        copies[k][0] += 1
        copies[k][1] += e["dur"]
        copies[k][2] += nbytes
    runtime = defaultdict(lambda: [0, 0.0])
    for e in rt:
        runtime[e["name"]][0] += 1
        runtime[e["name"]][1] += e["dur"]
    span = (max(e["ts"] + e["dur"] for e in ks) - min(e["ts"] for e in ks)) if ks else 0.0
    return {
        "passes": passes,
        "main_stream": main, "main_stream_kernels": len(ks),
        "main_stream_span_us": span,
        "main_stream_busy_us": sum(e["dur"] for e in ks),
        "gap_hist_us": {k: [n, round(t, 1)] for k, (n, t) in hist.items()},
        "kernels_by_name_us": dict(sorted(((n, round(t, 1)) for n, t in
                                           _sum_by(ks, lambda e: e["name"][:60]).items()), key=lambda x: -x[1])[:25]),
        "copies": {k: {"n": n, "us": round(t, 1), "bytes": b, "gbps": round(b / t / 1e3, 2) if t else None}
                   for k, (n, t, b) in copies.items()},
        "runtime_calls_us": {k: [n, round(t, 1)] for k, (n, t) in sorted(runtime.items(), key=lambda x: -x[1][1])[:15]},
    }


def _sum_by(evs, key):
    out = defaultdict(float)
    for e in evs:
        out[key(e)] += e["dur"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--systems", default="spac_ar,spac")
    ap.add_argument("--share", default="0.5")
    ap.add_argument("--routing", default="random")
    ap.add_argument("--budget", type=float, default=0.17)
    ap.add_argument("-n", "--tokens", type=int, default=12)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.cuda.init()
    lay = gguf_layout.describe(a.target)
    n_ctx = 256 + 48 + 5 + 64
    # the bench's own options, so a system loads here exactly as scripts/bench_gpu.py loads it
    ns = bench_gpu.parser().parse_args(["--target", a.target, "--draft", a.draft, "-ngl", "99", "-c", str(n_ctx),
                                        "--hw", "h200-pcie5", "--spac-share", a.share, "--draft-max", "5"])
    replay = locality.generate(a.routing, n_layers=lay.n_layer, n_expert=lay.n_expert, k=lay.n_expert_used,
                               tokens=n_ctx, prompts=1, draft_max=0, seed=100).ids
    for system in [s.strip() for s in a.systems.split(",") if s.strip()]:
        pair, probe, info = bench_gpu.load_pair(system, a.budget, ns, lay, None)
        prompt = pair.tokenize(bench_gpu.PROMPTS[0])
        cont, _ = bench_gpu.run_once(pair, probe, prompt, a.tokens, 0, None, replay)
        K = 5 if system in bench_gpu.SD_SYSTEMS else 0
        oracle = ((cont,) + bench_gpu.corruption(0.7, a.tokens, pair.target.n_vocab, cont, seed=1)) if K else None
        bench_gpu.run_once(pair, probe, prompt, a.tokens, K, oracle, replay)          # warm
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            toks, m = bench_gpu.run_once(pair, probe, prompt, a.tokens, K, oracle, replay)
        wall = time.perf_counter() - t0
        raw = out / f"{system}.trace.json"
        prof.export_chrome_trace(str(raw))
        doc = json.loads(raw.read_text())
        raw.unlink()
        with gzip.open(out / f"{system}.trace.json.gz", "wt") as f:
            json.dump(doc, f)
        evs = doc.get("traceEvents", [])
        s = summarize(evs, int(m["passes"]))
        s.update(system=system, share=a.share, routing=a.routing, tokens=a.tokens, wall_s=wall,
                 tps_profiled=m["tps"], pass_kinds=m["pass_kinds"], stop_s=m["stop_s"], plan_s=m["plan_s"],
                 down_s=m["down_s"], copy_s=m["copy_s"], inpass_loads=m["inpass_loads"], config=info,
                 matches=toks == cont)
        s["layers"] = timeline_layers.layer_phases(doc)      # a split layer's phases (the decode passes')
        (out / f"{system}.summary.json").write_text(json.dumps(s, indent=1, default=float) + "\n")
        print(timeline_layers.table(s["layers"]))
        print(system, json.dumps({k: s[k] for k in ("tps_profiled", "main_stream_span_us", "main_stream_busy_us",
                                                   "gap_hist_us", "copies", "matches")}, default=float))
        pair.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
