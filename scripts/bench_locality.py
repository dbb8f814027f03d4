#!/usr/bin/env python3
"""Locality presets for docs/BENCHMARKS.md: what each preset measures like (against the published
Qwen3-30B-A3B numbers), simulator hit rates per preset × policy × budget, and lookahead quality
(top-S precision/recall of spac's estimator, LRU recency and LFU counts against the next pass).
CPU only, a few minutes on 2 cores.

    python scripts/bench_locality.py [--hw h100-pcie5] [--real] [--out docs/bench/locality.json]

--real also records traces from the real models (demo pair; the random-weight test pair) through
scripts/bench_sim.py's recorder, when llama.cpp and the models are there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spac_gguf.hardware import load_profile  # noqa: E402
from spac_gguf.locality import PRESETS, generate  # noqa: E402
from spac_gguf.simulator import lookahead, simulate, slots_per_layer  # noqa: E402
from spac_gguf.testing.locality_stats import measure  # noqa: E402

POLICIES = ["static", "lru", "lfu", "spac", "oracle_budgeted", "belady"]
BUDGETS = ["10%", "17%", "30%"]


def real_traces(tokens: int, threads: int) -> dict:
    out = {}
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_sim import record
        from spac_gguf.registry import pair_spec
        from spac_gguf.testing import models as testmodels
        demo = pair_spec("demo")
        if demo.target.exists():
            out["demo SmolLM2-MoE (real weights)"] = record("demo", demo.target, demo.draft, tokens, threads)
        else:
            print("demo pair not built (spac-gguf demo build): skipped", file=sys.stderr)
        t, d = testmodels.make_pair(arch="qwen3moe", quant="Q8_0")
        out["test-qwen3moe (random weights)"] = record("test-qwen3moe", t, d, tokens, threads)
    except Exception as e:  # noqa: BLE001 - real traces are optional here
        print(f"real-model traces skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hw", default="h100-pcie5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--tokens", type=int, default=96, help="tokens per prompt of the real-model traces")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/bench/locality.json")
    a = ap.parse_args()
    hw = load_profile(a.hw)
    traces = {name: generate(name, seed=a.seed) for name in PRESETS}     # 48 × 128, top-8, 3 × 512, K = 4
    if a.real:
        traces.update(real_traces(a.tokens, a.threads))
    stats = {name: measure(tr) for name, tr in traces.items()}
    rows, look = [], {}
    t0 = time.perf_counter()
    for name, tr in traces.items():
        for budget in BUDGETS:
            try:
                res = simulate(tr, POLICIES, budget=budget, hw=hw)
            except Exception as e:  # noqa: BLE001 - e.g. less than one slot per layer
                print(f"{name} {budget}: {e}", file=sys.stderr)
                continue
            for pol, r in res["policies"].items():
                rows.append(dict(trace=name, budget=budget, policy=pol, **r))
        try:
            S = slots_per_layer(tr, "17%", None)
            look[name] = dict(slots=S, **lookahead(tr, S))
        except Exception as e:  # noqa: BLE001 - one trace without lookahead must not stop the table
            print(f"{name} lookahead: {e}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(hw=a.hw, seed=a.seed, stats=stats, rows=rows, lookahead=look,
                                           sim_seconds=elapsed,
                                           traces={k: dict(passes=v.n_passes, rows=int(v.ids.shape[0]),
                                                           meta=v.meta) for k, v in traces.items()}),
                                      indent=1, default=str))
    md = ["#### Measured locality (`measure`: LRU at 40 % of experts, warm-up 64 tokens)", "",
          "| trace | next-token reuse | within 8 | median dist. | LRU hit (steady) | miss first 64 | "
          "new/layer/token (per prompt) | top-10 % share |", "|---|---|---|---|---|---|---|---|"]
    md.append("| published Qwen3-30B-A3B | 0.45 | 0.80 | 2 | 0.900–0.953 | 0.138 | 0.38–0.80 | – |")
    for name, m in stats.items():
        per = " / ".join(f"{p['new_per_layer_token']:.2f}" for p in m["per_prompt"])
        md.append(f"| {name} | {m['next_token_reuse']:.3f} | {m['reuse_within']:.3f} | {m['median_reuse_distance']} | "
                  f"{m['lru_hit_steady']:.3f} | {m['lru_miss_warmup']:.3f} | {per} | {m['top_share']:.2f} |")
    md += ["", f"#### Simulated hit rate / predicted tok/s ({a.hw})", "",
           "| trace | budget | slots | " + " | ".join(POLICIES) + " |", "|---|---|---|" + "---|" * len(POLICIES)]
    for name in traces:
        for budget in BUDGETS:
            sel = {r["policy"]: r for r in rows if r["trace"] == name and r["budget"] == budget}
            if not sel:
                continue
            cells = [f"{100 * sel[p]['hit_rate']:.0f}% / {sel[p]['pred_tps']:.0f}" for p in POLICIES]
            slots = next(iter(sel.values()))["slots_per_layer"]
            md.append(f"| {name} | {budget} | {slots} | " + " | ".join(cells) + " |")
    md += ["", "#### Lookahead at 17 %: precision / recall of the top-S per layer against the next pass", "",
           "| trace | S | spac estimator | LRU recency | LFU counts | belady (ceiling) |", "|---|---|---|---|---|---|"]
    for name, r in look.items():
        cells = [f"{r[k]['precision']:.2f} / {r[k]['recall']:.2f}" for k in ("spac", "lru", "lfu", "belady")]
        md.append(f"| {name} | {r['slots']} | " + " | ".join(cells) + " |")
    md.append("")
    md.append(f"(simulation {elapsed:.0f} s on this machine)")
    text = "\n".join(md)
    Path(a.out).with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
