"""Markdown table + PNG plot from one or more bench_gpu.py JSONs.

    report_gpu.py docs/bench/gpu-DATE.json [more.json ...] [--name STEM] [--out-dir docs/bench]

Writes <out-dir>/<stem>.md and <stem>.png (the plot needs matplotlib; without it the markdown says
so) and prints the markdown, ready to paste into docs/BENCHMARKS.md. Several JSONs (a matrix split
over device calls) merge into one table; every ratio is taken against the baseline of the same run
(`source`), never across runs, because the CPU baselines move between runs and machines.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ("llama_ar_cpu", "llama_ar_offload1", "llama_ar_layers", "lru_ar", "spac_ar", "llama_sd_cpu",
         "llama_sd_offload1", "sd_lru", "sd_static", "spac", "spac_ak", "spac_aks", "llama_ar_gpu")
PLAIN = ("llama_ar_cpu", "llama_sd_cpu", "llama_ar_gpu", "llama_ar_offload1", "llama_sd_offload1")  # no budget
ROUTING_ORDER = ("qwen3-calibrated", "high-skew", "random", "model")
GOALS = {"llama_sd_cpu": 1.6, "sd_lru": 1.3}


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _routing(r):
    return r.get("routing", "model")


def _key(r):
    ro = _routing(r)
    return (ROUTING_ORDER.index(ro) if ro in ROUTING_ORDER else 99,
            ORDER.index(r["system"]) if r["system"] in ORDER else 99, r["budget"] or 0.0,
            r["acceptance_target"] if r["acceptance_target"] is not None else -1)


def find(res, system, budget=None, acc=None, routing=None, source=None):
    """The row of `system` in a cell; `source`: only rows of that run (a merged doc's ratios stay within a run)."""
    for r in res:
        if r["system"] != system or (routing is not None and _routing(r) != routing):
            continue
        if source is not None and r.get("source") != source:
            continue
        if budget is not None and r["system"] not in PLAIN and abs((r["budget"] or 0) - budget) > 1e-9:
            continue
        if acc is not None and r["acceptance_target"] is not None and abs(r["acceptance_target"] - acc) > 1e-9:
            continue
        return r
    return None


def _pass(p: dict | None) -> str:
    if not p:
        return "–"
    return f"{1e3 * p['measured_s']:.1f} ({1e3 * p['roofline_s']:.1f}, {p['ratio']:.2f}×)"


def table(doc) -> str:
    res = sorted(doc["results"], key=_key)
    merged = len(_sources(res)) > 1
    head = (("| run " if merged else "") + "| routing | system | budget (actual) | a set | a meas. | tok/s median [min–max] | × SD-cpu | × AR-cpu | passes | "
            "hit rate | in-pass loads | copied MB | draft ms/tok | target decode ms/tok | engine ms/tok | roofline tok/s | "
            "% of roofline | pass ms (bound ms, ×) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res:
        n = r["n_generated"] or 1
        b = r["breakdown"]
        sd = (find(res, "llama_sd_cpu", acc=r["acceptance_target"], routing=_routing(r), source=r.get("source"))
              if r["acceptance_target"] is not None else None)
        x_sd = r["tps"] / sd["tps"] if sd else None
        x_ar = _x_ar(res, r)
        roof = r.get("roofline") or {}
        lines.append(
            (f"| {r.get('source')} " if merged else "") + f"| {_routing(r)} | {r['system']} | {_f(r['budget'], '{:.0%}')} ({_f(r.get('budget_actual'), '{:.1%}')}) "
            f"| {_f(r['acceptance_target'])} | {_f(r['acceptance'])} "
            f"| {r['tps']:.2f} [{r['tps_min']:.2f}–{r['tps_max']:.2f}] | {_f(x_sd)} | {_f(x_ar)} "
            f"| {r['passes']:.0f} | {_f(r['hit_rate'], '{:.1%}')} | {r.get('inpass_loads', 0):.0f} "
            f"| {(r['bytes_copied'] + r.get('inpass_bytes', 0)) / 1e6:.0f} "
            f"| {1e3 * b['draft_s'] / n:.1f} | {1e3 * b['target_decode_s'] / n:.1f} "
            f"| {1e3 * (b['engine_publish_s'] + b['engine_plan_s']) / n:.2f} "
            f"| {_f(roof.get('tps'))} | {_f(roof.get('fraction'), '{:.0%}')} | {_pass(roof.get('pass'))} |")
    return "\n".join(lines)


def _sources(res) -> list:
    out = []
    for r in res:
        if r.get("source") not in out:
            out.append(r.get("source"))
    return out


def ratios(doc) -> str:
    """Per run, routing, budget and acceptance: spac_ak (the default, adaptive K), spac (K fixed) and
    spac_ar (K = 0) against the baselines of the same run."""
    res = doc["results"]
    out = []
    for src in _sources(res):
        rs = [r for r in res if r.get("source") == src]
        budgets = sorted({r["budget"] for r in rs if r["system"] in ("sd_lru", "sd_static", "spac", "spac_ak", "spac_aks",
                                                                     "spac_ar")})
        accs = sorted({r["acceptance_target"] for r in rs if r["acceptance_target"] is not None})
        routings = sorted({_routing(r) for r in rs}, key=lambda x: ROUTING_ORDER.index(x) if x in ROUTING_ORDER else 99)
        for ro in routings:
            for b in budgets:
                for a in accs + [None]:
                    for me in (("spac_ak", "spac_aks", "spac") if a is not None else ("spac_ar",)):
                        sp = find(rs, me, b, a, ro)
                        if not sp or (a is None and sp["acceptance_target"] is not None):
                            continue
                        parts = []
                        others = (("llama_sd_cpu", "sd_lru", "sd_static", "llama_ar_cpu") if a is not None
                                  else ("lru_ar", "llama_ar_cpu"))
                        for other in others:
                            o = find(rs, other, b, a, ro)
                            if o:
                                g = GOALS.get(other) if a is not None else None
                                parts.append(f"{sp['tps'] / o['tps']:.2f}× {other}" + (f" (goal ≥ {g}×)" if g else ""))
                                br = sp.get("anchor_bracket") if other == "llama_ar_cpu" else None
                                if br:                  # against the baseline's visits right before and after it
                                    sides = " and ".join(f"{br[k]:.2f} tok/s {k}" for k in ("before", "after") if k in br)
                                    parts.append(f"{br['ratio']:.2f}× llama_ar_cpu bracketed ({sides})")
                        roof = sp.get("roofline", {}).get("split_fraction")
                        if roof:
                            parts.append(f"{roof:.0%} of the split roofline (goal ≥ 80%)")
                        pas = sp.get("roofline", {}).get("pass")
                        if pas:
                            parts.append(f"pass {1e3 * pas['measured_s']:.1f} ms = {pas['ratio']:.2f}× its bound "
                                         f"{1e3 * pas['roofline_s']:.1f} ms" + (" (goal ≤ 1.3×)" if a is not None else ""))
                        what = f"a = {a:.1f}" if a is not None else "K = 0"
                        run = f"[{src}] " if src else ""
                        out.append(f"- {run}{ro}: {me} at budget {b:.0%}, {what}: " + ", ".join(parts))
    if not out:
        out.append("- no spac results (expert cache missing in this build?)")
    return "\n".join(out)


def _x_ar(res, r) -> float | None:
    """tok/s over llama_ar_cpu of the same run and routing."""
    ar = find(res, "llama_ar_cpu", routing=_routing(r), source=r.get("source"))
    return r["tps"] / ar["tps"] if ar else None


def plot(doc, png: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:                             # noqa: BLE001 - a plot is optional; any import failure skips it
        return f"plot skipped: matplotlib not importable ({type(e).__name__})"
    res = doc["results"]
    mb = doc.get("method", {}).get("main_budget")
    ma = doc.get("method", {}).get("main_acceptance")
    routings = sorted({_routing(r) for r in res}, key=lambda x: ROUTING_ORDER.index(x) if x in ROUTING_ORDER else 99)
    fig, axes = plt.subplots(1, len(routings) + 1, figsize=(4.2 * (len(routings) + 1), 4.2), squeeze=False)
    axes = axes[0]
    # one panel per routing: × llama_ar_cpu (same run) against acceptance at the main budget; K = 0 systems as lines
    for ax, ro in zip(axes, routings):
        for s in ("llama_sd_cpu", "sd_lru", "sd_static", "spac", "spac_ak", "spac_aks"):
            pts = sorted((r["acceptance_target"], _x_ar(res, r)) for r in res if r["system"] == s and _routing(r) == ro
                         and r["acceptance_target"] is not None and _x_ar(res, r) is not None
                         and (s in PLAIN or mb is None or abs(r["budget"] - mb) < 1e-9))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        for s, ls in (("spac_ar", "-."), ("llama_ar_layers", ":"), ("llama_ar_offload1", "--")):
            r = find(res, s, mb, routing=ro)
            if r and _x_ar(res, r):
                ax.axhline(_x_ar(res, r), ls=ls, color="gray", label=f"{s} (K = 0)")
        ax.axhline(1.0, color="black", lw=0.8, label="llama_ar_cpu")
        ax.set_xlabel("draft acceptance a (oracle draft)")
        ax.set_ylabel("× llama_ar_cpu of the same run")
        ax.set_title(f"{ro}, budget {mb:.0%}" if mb else ro)
        ax.legend(fontsize=7)
    # last panel: against the budget at the main acceptance (qwen3-calibrated when present)
    ax = axes[-1]
    ro = "qwen3-calibrated" if "qwen3-calibrated" in routings else routings[0]
    for s in ("llama_ar_layers", "sd_lru", "sd_static", "spac", "spac_ak", "spac_ar"):
        pts = sorted((r["budget"], _x_ar(res, r)) for r in res if r["system"] == s and _routing(r) == ro
                     and _x_ar(res, r) is not None
                     and (r["acceptance_target"] is None or ma is None or abs(r["acceptance_target"] - ma) < 1e-9))
        if pts:
            ax.plot([100 * b for b, _ in pts], [t for _, t in pts], marker="o", label=s)
    ax.axhline(1.0, color="black", lw=0.8, label="llama_ar_cpu")
    ax.set_xlabel("expert budget (% of expert bytes on the GPU)")
    ax.set_ylabel("× llama_ar_cpu of the same run")
    ax.set_title(f"{ro}, a = {ma}" if ma else ro)
    ax.legend(fontsize=7)
    fig.suptitle(f"{doc.get('device', '?')} — {doc['model'].get('target')} (random weights, replayed routing)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return None


def merge(docs: list[tuple[str, dict]]) -> dict:
    """One doc from several runs of the same model: rows tagged with their run, method and bandwidth of the first."""
    if len(docs) == 1:
        return docs[0][1]
    name0, d0 = docs[0]
    out = dict(d0)
    out["results"], out["skipped"], out["sources"] = [], [], []
    out["timed_out"] = False
    out["method"] = dict(d0.get("method", {}))
    out["method"]["routing"] = {}
    for name, d in docs:
        out["method"]["routing"].update(d.get("method", {}).get("routing") or {})
        if d["model"].get("target") != d0["model"].get("target"):
            raise SystemExit(f"report_gpu: {name} measured another target ({d['model'].get('target')})")
        for r in d["results"]:
            out["results"].append(dict(r, source=name))
        out["skipped"] += [dict(s, source=name) for s in d.get("skipped", [])]
        out["timed_out"] = out["timed_out"] or bool(d.get("timed_out"))
        ar = {_routing(r): round(r["tps"], 2) for r in d["results"] if r["system"] == "llama_ar_cpu"}
        out["sources"].append({"source": name, "date": d.get("date"), "device": d.get("device"),
                               "bandwidth": d.get("bandwidth"), "llama_ar_cpu_tps": ar,
                               "routing": d.get("method", {}).get("routing")})
    return out


def render(doc, json_name: str, png_name: str, plot_note: str | None) -> str:
    bw = doc.get("bandwidth", {})
    m, md = doc["model"], doc.get("method", {})
    pcie = bw.get("pcie_h2d_pinned_gbps")
    runs = ""
    if doc.get("sources"):
        runs = " Runs (each ratio is read within its run): " + "; ".join(
            f"`{s['source']}` (llama_ar_cpu {', '.join(f'{k} {v}' for k, v in s['llama_ar_cpu_tps'].items()) or 'not run'}"
            + (f", DRAM {s['bandwidth']['dram_read_gbps']:.1f} GB/s" if (s.get('bandwidth') or {}).get('dram_read_gbps') else "")
            + ")" for s in doc["sources"]) + "."
    lines = [
        f"### GPU benchmark {doc.get('date', '')}: {doc.get('device', '?')}",
        "",
        f"Source: `{json_name}`.{runs} Target `{m['target']}` ({m['arch']}, {m['n_layer']} layers, {m['n_expert']} experts, "
        f"top-{m['k']}, {m['bytes_per_expert'] / 2**20:.2f} MiB per expert, experts {m['expert_bytes'] / 2**30:.2f} GiB, "
        f"dense {m['dense_bytes'] / 2**30:.2f} GiB); draft `{m['draft']}` ({m['draft_arch']}, {m['draft_layers']} layers). "
        f"Weights: {m.get('weights', 'random')}. Routing per row: {md.get('routing', 'the model router')}. "
        f"Host experts pinned: {md.get('pinned_experts', False)}; in-pass loads: {md.get('inpass', False)}.",
        f"Greedy, {md.get('tokens')} tokens per run, median of {md.get('repeats')} prompts, K = {md.get('draft_max')}; "
        f"drafts: **{md.get('drafter')}** (the target's own greedy continuation, each token replaced with probability "
        f"1 − a; the real draft model still runs every round). Expert cache: {doc.get('expert_cache')}. "
        f"Host: {doc.get('host_cpu')} ({doc.get('cpu_threads')} threads).",
        f"Bandwidths: DRAM read {_f(bw.get('dram_read_gbps'), '{:.1f}')} GB/s ({bw.get('dram_threads', '?')} threads), "
        f"PCIe H2D pinned {_f(pcie, '{:.1f}')} GB/s (one 2.65 MB expert: {_f(bw.get('pcie_h2d_pinned_2650KB_gbps'), '{:.1f}')} GB/s), "
        f"pageable {_f(bw.get('pcie_h2d_pageable_gbps'), '{:.1f}')} GB/s" + (f" ({bw['pcie_note']})" if bw.get("pcie_note") else "")
        + (f"; slot loads as the engine issues them {bw['slot_upload_gbps']:.1f} GB/s ({bw.get('slot_upload_source')})"
           if bw.get("slot_upload_gbps") else "") + ".",
        "",
        table(doc),
        "",
        "Columns: `a meas.` = accepted / examined drafts; `× SD-cpu` = tok/s over llama_sd_cpu at the same a; "
        "`hit rate` = routed (row, layer, k) entries served from GPU memory (for no-cache systems: the share of expert "
        "layers on the GPU); `roofline` = drafting as measured + per pass the all-GPU pass time + the uncached experts "
        "that pass touched streamed once at DRAM bandwidth (see `roofline.basis` in the JSON); `pass ms (bound ms, ×)` = "
        "target decode time per pass against max(its CPU expert bytes / DRAM read, its in-pass upload bytes / the pinned "
        "host-to-GPU link, both probed in the run) + the all-GPU pass time of the same rows (llama_ar_gpu, measured in this run).",
        "",
        "Ratios:",
        ratios(doc),
    ]
    div = [(r["system"], r["acceptance_target"]) for r in doc["results"] if not r.get("output_matches_reference", True)]
    off = [(r["system"], _routing(r), r["acceptance_target"], round(r["acceptance"], 3)) for r in doc["results"]
           if r["acceptance_target"] is not None and r.get("acceptance") is not None
           and abs(r["acceptance"] - r["acceptance_target"]) > 0.05]
    bad = [(r["system"], _routing(r)) for r in doc["results"] if r.get("accepted_matches_loop") is False]
    lines.append("")
    lines.append("Output identical to the target alone (plain decoding, experts on CPU): "
                 + ("yes, in every run." if not div else f"NO for {div} (see `diverged` in the JSON)."))
    lines.append("Measured acceptance within ±0.05 of the set value: "
                 + ("yes, in every speculative row." if not off else f"NO for {off}."))
    if bad:
        lines.append(f"The oracle's count of accepted drafts disagrees with the loop's for {bad}.")
    if doc.get("skipped"):
        lines.append("Skipped: " + "; ".join(f"{s['system']} ({s['reason']})" for s in doc["skipped"]) + ".")
    if doc.get("timed_out"):
        lines.append("The run hit its time limit: some cells are missing or have fewer repeats.")
    lines.append("")
    lines.append(plot_note if plot_note else f"![tokens/s]({png_name})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("json", type=Path, nargs="+", help="one run, or several runs of one matrix to merge")
    ap.add_argument("--name", help="output stem (default: the first JSON's; with several, its stem + '-merged')")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "bench")
    a = ap.parse_args(argv)
    doc = merge([(p.stem, json.loads(p.read_text())) for p in a.json])
    stem = a.name or (a.json[0].stem + ("-merged" if len(a.json) > 1 else ""))
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if len(a.json) > 1:                                # the merged rows, for whoever reads the table's source
        (a.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    png = a.out_dir / f"{stem}.png"
    note = plot(doc, png)
    md = render(doc, f"docs/bench/{stem}.json", f"bench/{png.name}", note)
    (a.out_dir / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
