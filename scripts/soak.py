#!/usr/bin/env python3
"""Soak: many generated tokens with the expert cache on, then many load/close cycles; memory, threads
and the slot ledger are checked (issue 11).

    soak.py [--tokens 10000] [--pairs test,demo] [--policies spac,lru] [--cycles 100] [--out FILE.json]

Per pair and policy: generate `--tokens` tokens (greedy, K up to 4, in generations of up to 400 tokens
over rotating prompts), sampling RSS and the thread count every second; at the end every mapped slot
of the first and last cached layers must hold the file's bytes of the expert the C ledger names.
Then `--cycles` times: load the pair with its cache, generate 4 tokens, close. Exit 1 when RSS grows
more than 5 % between the first quarter of the tokens and the end, when threads leak, or when a slot's
bytes differ. `demo` is skipped (with a note) when the demo pair has not been built.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spac_gguf import gguf_layout  # noqa: E402
from spac_gguf.testing import models as testmodels  # noqa: E402
from spac_gguf.pair import load  # noqa: E402

PROMPTS = ["The history of the city begins", "def parse(text):", "Once upon a time", "In the year 1850,",
           "A recipe for bread:", "The theory of evolution"]
PROJ = {0: "up", 1: "gate", 2: "down"}


def proc_status() -> tuple[float, int]:
    """(RSS in MB, threads) of this process."""
    rss, threads = 0.0, 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


class Sampler(threading.Thread):
    """RSS and threads every `every` seconds, with the token count at that moment."""

    def __init__(self, every: float = 1.0):
        super().__init__(daemon=True)
        self.every, self.tokens, self.samples = every, 0, []
        self._stop_ev = threading.Event()

    def run(self):
        while not self._stop_ev.wait(self.every):
            self.samples.append((self.tokens, *proc_status()))

    def stop(self):
        self._stop_ev.set()
        self.join()
        self.samples.append((self.tokens, *proc_status()))


def pair_files(name: str):
    if name == "test":
        return testmodels.make_pair(arch="qwen3moe", quant="Q8_0")
    if name == "demo":
        from spac_gguf import registry
        spec = registry.pair_spec("demo")
        t, d = spec.target, spec.draft
        return (t, d) if t.is_file() and d is not None and d.is_file() else None
    raise SystemExit(f"unknown pair {name!r} (test, demo)")


def ledger_ok(p, lay) -> bool:
    """Every mapped slot of the first and last cached layers holds its expert's bytes from the file."""
    c = p.cache
    c.sync()
    raw = np.memmap(lay.path, dtype=np.uint8, mode="r")
    layers = np.nonzero(c.cached_layers)[0]
    for il in (int(layers[0]), int(layers[-1])):
        for s in np.nonzero(c.mapped[il])[0]:
            e = int(c.slot_expert[il, s])
            for proj, name in PROJ.items():
                off, n = lay.expert_offset(il, e, name)
                if n and c.read_slot(il, int(s), proj, n) != raw[off:off + n].tobytes():
                    return False
    return True


def soak_one(files, policy: str, tokens: int, threads: int) -> dict:
    lay = gguf_layout.describe(files[0])
    p = load(files[0], files[1], n_ctx=1024, n_threads=threads, policy=policy, budget="50%",
             hw="desktop-pcie4x16", inpass=True)
    mon = Sampler()
    mon.start()
    t0, done, i = time.perf_counter(), 0, 0
    while done < tokens:
        n = min(400, tokens - done)
        for _ in p.generate(PROMPTS[i % len(PROMPTS)], max_tokens=n, draft_max=4, stop_at_eog=False):
            done += 1
            mon.tokens = done
        i += 1
    mon.stop()
    ok = ledger_ok(p, lay)
    st = p.cache_stats()
    p.close()
    s = mon.samples
    first_q = [r for t, r, _ in s if t >= tokens // 4] or [s[-1][1]]
    out = {"policy": policy, "tokens": done, "seconds": round(time.perf_counter() - t0, 1),
           "rss_mb": {"start": s[0][1], "quarter": first_q[0], "middle": s[len(s) // 2][1], "end": s[-1][1]},
           "threads": {"start": s[0][2], "max": max(x[2] for x in s), "end": s[-1][2]},
           "ledger_ok": ok, "inpass_loads": st["inpass_loads"], "hit_rate": st["hit_rate"]}
    out["rss_growth"] = out["rss_mb"]["end"] / out["rss_mb"]["quarter"] - 1.0
    return out


def cycles(files, n: int, threads: int) -> dict:
    rss0, th0 = proc_status()
    for _ in range(n):
        p = load(files[0], files[1], n_ctx=256, n_threads=threads, policy="lru", budget="50%", inpass=True)
        list(p.generate("hello", max_tokens=4, stop_at_eog=False))
        p.close()
    rss1, th1 = proc_status()
    return {"cycles": n, "rss_mb": [rss0, rss1], "threads": [th0, th1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--pairs", default="test,demo")
    ap.add_argument("--policies", default="spac,lru")
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    res: dict = {"runs": [], "cycles": [], "skipped": []}
    bad = []
    base_threads = proc_status()[1]
    for name in a.pairs.split(","):
        files = pair_files(name.strip())
        if files is None:
            res["skipped"].append(f"{name}: not built (spac-gguf demo build)")
            continue
        for pol in a.policies.split(","):
            r = soak_one(files, pol.strip(), a.tokens, a.threads)
            r["pair"] = name
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
            if r["rss_growth"] > 0.05 or not r["ledger_ok"]:
                bad.append(f"{name}/{pol}: rss growth {r['rss_growth']:.1%}, ledger ok {r['ledger_ok']}")
        c = cycles(files, a.cycles, a.threads)
        c["pair"] = name
        res["cycles"].append(c)
        print(json.dumps(c), flush=True)
        if c["threads"][1] > c["threads"][0]:
            bad.append(f"{name}: threads {c['threads'][0]} -> {c['threads'][1]} after {a.cycles} load/close cycles")
    res["threads_now_vs_start"] = [base_threads, proc_status()[1]]
    res["problems"] = bad
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    for b in bad:
        print("soak:", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
