#!/usr/bin/env python3
"""Simulator table for docs/BENCHMARKS.md: policies x budgets x hardware profiles, on routing traces
recorded from the test pair and the real-weights demo pair (recorded here if missing).

    python scripts/bench_sim.py [--tokens 96] [--out docs/bench/sim.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spac_gguf.balancer import InfeasibleBudget  # noqa: E402
from spac_gguf.hardware import load_profile  # noqa: E402
from spac_gguf.pair import load  # noqa: E402
from spac_gguf.registry import cache_dir, pair_spec  # noqa: E402
from spac_gguf.simulator import simulate  # noqa: E402
from spac_gguf.testing import models as testmodels  # noqa: E402
from spac_gguf.testing.synthetic import synthetic_trace  # noqa: E402
from spac_gguf.trace import RoutingTrace  # noqa: E402

PROMPTS = ["def quicksort(items):\n", "The old lighthouse keeper walked down to the shore and",
           "<|im_start|>user\nHow do I make a good cup of tea?<|im_end|>\n<|im_start|>assistant\n"]
POLICIES = ["none", "static", "lru", "lfu", "spac", "oracle_budgeted", "belady"]
BUDGETS = ["10%", "25%", "50%"]
HW = ["laptop-pcie4x8", "desktop-pcie4x16", "h100-pcie5"]


def record(name: str, target, draft, tokens: int, threads: int) -> RoutingTrace:
    """One trace over the three prompts (code, prose, chat), passes concatenated."""
    path = cache_dir() / "traces" / f"{name}-{tokens}.npz"
    if path.exists():
        return RoutingTrace.load(path)
    p = load(target, draft, n_ctx=1024, n_threads=threads)
    parts = [p.record_trace(pr, max_tokens=tokens, draft_max=4, adaptive=False, stop_at_eog=False)[1] for pr in PROMPTS]
    p.close()
    import numpy as np
    ids = np.concatenate([t.ids for t in parts])
    starts, off = [], 0
    for t in parts:
        starts.append(t.pass_start + off)
        off += t.ids.shape[0]
    tr = RoutingTrace(ids=ids, pass_start=np.concatenate(starts), accepted=np.concatenate([t.accepted for t in parts]),
                      meta=dict(parts[0].meta, prompts=len(PROMPTS)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tr.save(path)
    return tr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/bench/sim.json")
    a = ap.parse_args()
    # progress bars on stderr in a terminal only; the table on stdout is the same either way
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True, disable=not sys.stderr.isatty()) as prog:
        traces = {}
        demo = pair_spec("demo")
        step = prog.add_task("traces", total=3 if demo.target.exists() else 2)
        prog.update(step, description="trace: test-qwen3moe")
        t, d = testmodels.make_pair(arch="qwen3moe", quant="Q8_0")
        traces["test-qwen3moe (random weights)"] = record("test-qwen3moe", t, d, a.tokens, a.threads)
        prog.advance(step)
        if demo.target.exists():
            prog.update(step, description="trace: demo")
            traces["demo SmolLM2-MoE (real weights)"] = record("demo", demo.target, demo.draft, a.tokens, a.threads)
            prog.advance(step)
        # Qwen3-30B-A3B-shaped, synthetic routing (Zipf popularity that drifts, temporal locality): the
        # shape where the expert path dominates a pass, unlike the two small models above
        prog.update(step, description="trace: synthetic")
        traces["synthetic 48x128 top-8, 2.65 MB experts"] = synthetic_trace(
            n_passes=120, n_layers=48, n_expert=128, k=8, draft_max=5, expert_bytes=2_654_208, seed=1)
        prog.advance(step)
        rows = []
        sim = prog.add_task("simulate", total=len(traces) * len(HW) * len(BUDGETS))
        for tname, tr in traces.items():
            for hw in HW:
                prof = load_profile(hw)
                for budget in BUDGETS:
                    prog.update(sim, description=f"simulate: {tname.split(' ')[0]} {hw} {budget}")
                    try:
                        res = simulate(tr, POLICIES, budget=budget, hw=prof)
                    except InfeasibleBudget:
                        continue                      # less than one slot per layer
                    finally:
                        prog.advance(sim)
                    for pol, r in res["policies"].items():
                        rows.append({"trace": tname, "hw": hw, "budget": budget, "policy": pol,
                                     "slots_per_layer": res.get("slots_per_layer"), **r})
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"rows": rows, "traces": {k: {"passes": v.n_passes, "rows": int(v.ids.shape[0]),
                                                                     "meta": v.meta} for k, v in traces.items()}},
                                      indent=1, default=str))
    lines = ["| trace | hw | budget | slots | " + " | ".join(POLICIES) + " |",
             "|---|---|---|---|" + "---|" * len(POLICIES)]
    for tname in traces:
        for hw in HW:
            for budget in BUDGETS:
                sel = {r["policy"]: r for r in rows if r["trace"] == tname and r["hw"] == hw and r["budget"] == budget}
                if not sel:
                    lines.append(f"| {tname} | {hw} | {budget} | 0 | " + " | ".join("–" for _ in POLICIES) + " |")
                    continue
                cells = [f"{sel[p]['pred_tps']:.1f} / {100 * sel[p]['hit_rate']:.0f}%" for p in POLICIES]
                slots = next(iter(sel.values()))["slots_per_layer"]
                lines.append(f"| {tname} | {hw} | {budget} | {slots} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    Path(a.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
