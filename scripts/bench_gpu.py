"""GPU proof benchmark (issue 6): one run, same files, systems interleaved, every number with a roofline.

    bench_gpu.py --target T.gguf --draft D.gguf [--out docs/bench/gpu-DATE.json]
                 [--systems ...] [--budgets 0.10,0.17,0.30] [--acceptances 0.5,0.7,0.9]
                 [--main-budget 0.17] [--main-acceptance 0.7] [--full-matrix]
                 [-n 48] [--repeats 3] [--draft-max 5] [-ngl 99] [--hw h200-pcie5] [--time-limit 420]

Systems (all from our build; (1)-(3) run with the expert cache off):
  llama_ar_cpu     plain decoding, routed experts on the CPU (llama.cpp `-ot exps=CPU`)
  llama_ar_layers  plain decoding, the experts of the LAST whole layers on the GPU, as many layers as fit
                   the budget (llama.cpp `--n-cpu-moe N`: the first N layers' experts stay on the CPU)
  llama_sd_cpu     speculative decoding, experts on the CPU, no cache (the paper's "llama.cpp w/ SD")
  sd_lru           speculative + expert cache, LRU
  sd_static        speculative + expert cache, static hot set from a calibration routing trace
                   (recorded here, on a different prompt, with plain decoding of the target)
  spac             speculative + expert cache, the SpAc policy (estimator + balancer)
  lru_ar, spac_ar  the same caches with plain decoding (K = 0)
  spac_ak          spac with K chosen per round in 0..--draft-max (spac_gguf.draft_length; one controller
                   per routing and acceptance, learned on an untimed run of that workload on the warm-up
                   prompt, then learning on; its K histogram is in the row)
  spac_aks         spac_ak exploring by Thompson sampling instead of probes (draft_length's explore="sample",
                   opt-in in the library: the A/B of the two)
  llama_ar_gpu     reference only: every weight on the GPU (the dense-part / all-GPU bound)
  llama_ar_offload1, llama_sd_offload1
                   llama_ar_cpu / llama_sd_cpu with llama.cpp's GGML_OP_OFFLOAD_MIN_BATCH=1: every pass
                   copies the experts it uses from pinned host memory and computes them on the GPU
                   (a setting llama.cpp users run; read once per process, so run in a child process)

Every system with host experts keeps them in pinned host memory (--no-pinned: mmap). The cache systems
use in-pass loads (--no-inpass: off): `sd_lru`/`lru_ar` upload every miss and evict by recency (the
upstream llama.cpp design), `spac`/`spac_ar`/`spac_ak` split each pass's misses between uploads and the
CPU (the balancer) and evict by the estimator's utility, without MIP prefetch (pair.py says why).

Routing (--routing): `model` (the random model's own router) or a replayed trace from
spac_gguf.locality (`random`, `qwen3-calibrated`, `high-skew`): every decode of every system computes
the trace's experts for the positions it decodes (the patch's routing replay), so all systems see the
same routing, row for row. The benchmark target's greedy output does not depend on routing
(scripts/make_bench_model.py), so every system still emits the same tokens.

Acceptance control ("oracle draft, corrupted"): random weights give ~0 acceptance, so the proposals are
the target's own greedy continuation (recorded first, plain decoding, experts on CPU) with each position
replaced by a random other token at a share 1 - a of the positions (stratified in blocks of 20, so a
short run measures a, not a +-0.1 draw). The mask is fixed per (a, prompt) position, so
every system sees the same proposals and, with exact verification, makes the same target passes. The
real draft model still decodes every round (the same calls and shapes as Drafter.propose); only its
argmax is discarded. Measured `acceptance` = accepted / examined draft tokens (examined = accepted +
first rejection of each round), the per-token rate the setting a controls; `acceptance_rate` is
accepted / drafted (what Stats reports: lower, because drafts after a rejection are never examined).

Matrix (default): every system at the main budget and the main acceptance; the acceptance sweep for the
speculative systems at the main budget; the budget sweep for llama_ar_layers and the cache systems at
the main acceptance. Budget-free systems run once. Pairs of one budget are loaded together and runs are
interleaved (repeat → acceptance → system); a cache keeps its contents between runs (steady state).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402

from spac_gguf import gguf_layout, llama_backend, locality, native  # noqa: E402
from spac_gguf.hardware import measure_cpu_stream_gbps  # noqa: E402
from spac_gguf.draft_length import DraftLength  # noqa: E402
from spac_gguf.engine import InPass  # noqa: E402
from spac_gguf.pair import ModelPair, PassObserver  # noqa: E402
from spac_gguf.speculative import CatchUp, Drafter  # noqa: E402

SD_SYSTEMS = ("llama_sd_cpu", "sd_lru", "sd_static", "spac", "spac_ak", "spac_aks")
ADAPTIVE = {"spac_ak": "probe", "spac_aks": "sample"}   # adaptive K: how the controller explores
CACHE_POLICY = {"sd_lru": "lru", "sd_static": "static", "spac": "spac", "lru_ar": "lru", "spac_ar": "spac",
                "spac_ak": "spac", "spac_aks": "spac"}
# llama.cpp's own small-batch offload: experts in pinned host memory, every pass's used experts copied to
# the GPU and computed there (GGML_OP_OFFLOAD_MIN_BATCH=1, read once per process: a process of its own)
OFFLOAD1 = {"llama_ar_offload1": "llama_ar_cpu", "llama_sd_offload1": "llama_sd_cpu"}
# the patch's counters a run reports as differences (native.counters): in-pass loads and bytes,
# layer-passes read from host memory (direct), plans waiting for async loads, plan stops between a
# layer's router and its experts, those stops' time (waiting for the nodes before the plan: launch,
# run, sync; the plan itself), and of the plan: the ids and layer input read down, the copies issued
NATIVE_COUNTERS = ("inpass_loads", "inpass_bytes", "direct_passes", "inpass_wait_s", "plans",
                   "stop_s", "plan_s", "down_s", "copy_s", "pass_loads", "early_downs")
ALL_SYSTEMS = ("llama_ar_cpu", "llama_ar_layers", "llama_sd_cpu", "sd_lru", "sd_static", "spac", "spac_ak", "spac_aks",
               "lru_ar", "spac_ar", "llama_ar_gpu", *OFFLOAD1)
ROUTINGS = ("model", "random", "qwen3-calibrated", "high-skew")

PROMPTS = [
    "The history of the Roman Empire begins with",
    "def quicksort(xs):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Write a short poem about the sea and the wind.",
    "In quantum mechanics, the uncertainty principle states that",
    "Recipe: how to bake sourdough bread at home. Step 1:",
]
CALIB_PROMPT = "A calibration text about mountains, rivers, cities and the people who live there."
DRAFTER_LABEL = "oracle draft, corrupted"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# acceptance control
# ---------------------------------------------------------------------------------------------
class OracleDrafter(Drafter):
    """Proposals: the target's recorded greedy continuation, position j replaced by `replacement[j]`
    where `mask[j]` (probability 1 - a). The draft model decodes exactly as Drafter.propose does
    (pending tokens, the pair's catch-up choice for two, then one row per proposal), fed the proposals
    it makes, so its KV stays valid."""

    def __init__(self, ctx, prompt_len: int, continuation: list[int], mask: np.ndarray, replacement: np.ndarray,
                 catch_up=None):
        super().__init__(ctx, catch_up)
        self.prompt_len = prompt_len
        self.cont = list(continuation)
        self.mask, self.replacement = mask, replacement
        self.rounds = self.accepted = self.examined = 0
        self.diverged_at: int | None = None
        self.calls: dict[str, list] = {}               # draft decodes, "backlog|catchup|first|next:rows": [count, s]
        self._L = self._K = 0

    def propose(self, tokens, K, sampler):
        if not sampler.greedy:
            raise ValueError("the oracle drafter is greedy-only")
        n = len(tokens) - self.prompt_len
        if self.diverged_at is None and tokens[self.prompt_len:] != self.cont[:n]:
            gen = tokens[self.prompt_len:]
            self.diverged_at = next(i for i in range(n) if i >= len(self.cont) or gen[i] != self.cont[i])
        drafts: list[int] = []
        pending = tokens[self.ctx.n_past:]
        for i in range(K):
            logits = self._first(pending) if i == 0 else self._decode(pending, "next")
            own = int(np.argmax(logits))               # the real draft's choice: computed, then replaced
            j = n + i
            if self.diverged_at is None and j < len(self.cont):
                d = int(self.replacement[j]) if self.mask[j] else int(self.cont[j])
            else:
                d = own
            drafts.append(d)
            pending = [d]
        self._L, self._K = len(tokens), K
        return drafts, []

    def _decode(self, toks: list[int], when: str) -> np.ndarray:
        """One draft decode, timed by its place in the round and its rows (the first decode of a round
        follows the target's pass and carries the tokens the draft has not seen)."""
        t = time.perf_counter()
        logits = self.ctx.decode(toks, "last")[0]
        c = self.calls.setdefault(f"{when}:{len(toks)}", [0, 0.0])
        c[0] += 1
        c[1] += time.perf_counter() - t
        return logits

    def keep(self, n_valid: int) -> None:
        if self._proposed:                             # a drafting round (keep also follows K = 0 rounds)
            a = n_valid - self._L
            self.rounds += 1
            self.accepted += a
            self.examined += a + (1 if a < self._K else 0)
        super().keep(n_valid)


def corruption(a: float, n: int, n_vocab: int, cont: list[int], seed: int, block: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Which positions the draft gets wrong, and with what. Stratified: every block of `block`
    positions has exactly round(block x (1 - a)) wrong ones at random places, so the measured
    acceptance of a short run is a to within a few hundredths (i.i.d. draws vary by +-0.1 at 48 tokens)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, bool)
    for b0 in range(0, n, block):
        m = min(block, n - b0)
        mask[b0 + rng.choice(m, int(round(m * (1.0 - a))), replace=False)] = True
    rep = rng.integers(0, n_vocab - 1, n)
    c = np.asarray(cont[:n] + [0] * (n - len(cont[:n])))
    rep = np.where(rep >= c, rep + 1, rep)             # a token different from the continuation's
    return mask, rep


# ---------------------------------------------------------------------------------------------
# instrumentation (the library's PassObserver: no wrapped methods)
# ---------------------------------------------------------------------------------------------
class Probe(PassObserver):
    """Per-run timers and routing statistics of one ModelPair; replays the routing trace.

    It runs inside the timed loop, so it does the least there: the trace is laid out per layer once
    (`native.ReplayTrace`), and each pass's routing is only kept (with the maps it read) for the
    statistics and the replay self-check computed after the run (`finish`)."""

    def __init__(self, pair: ModelPair, gpu_layers: set[int] | None = None):
        self.pair = pair
        self.gpu_layers = gpu_layers or set()
        self.moe_layers = list(pair.layout.moe_layers)
        self._trace: np.ndarray | None = None
        self._replay: native.ReplayTrace | None = None
        self.reset()

    @property
    def replay(self) -> np.ndarray | None:
        """[positions, layers, k] routing to replay (None: the model's router)."""
        return self._trace

    @replay.setter
    def replay(self, trace: np.ndarray | None) -> None:
        if trace is not self._trace:
            self._trace = trace
            self._replay = native.ReplayTrace(trace, self.moe_layers) if trace is not None else None

    def before_decode(self, n_past: int, n_rows: int, kind: str) -> None:
        if self._replay is not None:                   # the rows' positions pick the trace's rows
            self._replay.set_rows(self.pair.target_ctx.ptr, n_past, n_rows)
        if kind == "verify":
            if self.native_at_verify is None and self.pair.cache is not None and native.available():
                # the prompt's pass loads and plans too (tens of misses per layer): the counters the
                # run reports start here, so they cover the same passes as its tok/s and pass count
                self.native_at_verify = self.pair.cache.counters()
            self.rows.append(n_rows)
            self._verify_at = n_past

    def after_decode(self, n_rows: int, seconds: float) -> None:
        self.decodes.append((n_rows, seconds))

    def on_routing(self, ids: np.ndarray) -> None:
        eng = self.pair.engine                         # the maps this verify read (updated before the next)
        self._passes.append((ids, eng.live.copy() if eng is not None else None, self._verify_at))

    def on_engine(self, phase: str, seconds: float) -> None:
        if phase == "before":
            self.engine_before_s += seconds
        else:
            self.engine_after_s += seconds

    def reset(self):
        self._verify_at: int | None = None
        self._passes: list = []                        # (ids, live maps, position) per verify pass
        self.replay_checked = self.replay_mismatched = 0   # verify rows compared with the trace
        self.decodes: list[tuple[int, float]] = []
        self.rows: list[int] = []
        self.unique: list[int] = []
        self.uncached: list[int] = []
        self.engine_before_s = self.engine_after_s = 0.0
        self.native_at_verify: dict | None = None      # the cache's counters when the first verify began

    def finish(self) -> None:
        """The run's routing statistics and replay self-check, after the timed loop."""
        for ids, live, at in self._passes:
            self._routing(ids, live)
            if self._trace is not None and at is not None:
                # the routing the pass really used must be the trace's rows (a self-check of the replay)
                want = self._trace[at:at + len(ids)]
                ml = self.moe_layers
                same = (ids[:len(want)][:, ml] == want[:, ml]).all(axis=(1, 2))
                self.replay_checked += int(len(same))
                self.replay_mismatched += int((~same).sum())
        self._passes = []

    def _routing(self, ids: np.ndarray, live: np.ndarray | None) -> None:
        ok = ids >= 0
        L = ids.shape[1]
        l = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
        used = np.zeros((L, int(ids.max()) + 1 if ok.any() else 1), bool)
        used[l[ok], ids[ok]] = True
        cached = np.zeros_like(used)
        if live is not None:
            cached[:, :min(used.shape[1], live.shape[1])] = live[:, :used.shape[1]]
        for il in self.gpu_layers:
            cached[il] = True
        self.unique.append(int(used.sum()))
        self.uncached.append(int((used & ~cached).sum()))


def cache_counters(pair: ModelPair) -> dict:
    if pair.engine is None:
        return {"hits": 0, "misses": 0, "bytes": 0}
    e = pair.engine
    return {"hits": e.hits, "misses": e.misses, "bytes": int(getattr(pair.cache, "bytes_loaded", e.bytes_loaded))}


def run_once(pair: ModelPair, probe: Probe, prompt: list[int], n: int, K: int,
             oracle: tuple | None, replay: np.ndarray | None = None, adaptive: bool = False,
             catch_up: str = "auto") -> tuple[list[int], dict]:
    """One greedy generation of exactly n tokens; K = 0 is plain decoding; adaptive: K per round up to K."""
    pair.target_ctx.reset()
    probe.replay = replay
    drafter = None
    if K > 0:
        pair.draft_ctx.reset()
        cont, mask, rep = oracle
        if pair.catch_up.mode != catch_up:
            pair.catch_up = CatchUp(catch_up)
        drafter = OracleDrafter(pair.draft_ctx, len(prompt), cont, mask, rep, pair.catch_up)
    probe.reset()
    c0 = cache_counters(pair)
    n0 = pair.cache.counters() if pair.cache is not None and native.available() else None
    e0 = dict(pair.engine.timers) if pair.engine is not None else {}
    p0 = {k: list(v) for k, v in pair.engine.pass_seconds.items()} if pair.engine is not None else {}
    hr = pair.engine.host_rate if pair.engine is not None else None
    h0 = (hr.total_measured, hr.total_modelled) if hr is not None else None
    out, st = [], None
    for tok in pair.generate(prompt, max_tokens=n, draft_max=K, adaptive=adaptive, stop_at_eog=False,
                             drafter=drafter, observer=probe):
        out.append(tok.token)
        st = tok.stats
    probe.finish()
    c1 = cache_counters(pair)
    n1 = pair.cache.counters() if n0 is not None else None
    e1 = dict(pair.engine.timers) if pair.engine is not None else {}
    p1 = pair.engine.pass_seconds if pair.engine is not None else {}
    nv = (probe.native_at_verify or n1) if n0 is not None else None
    dec = probe.decodes[1:] if len(prompt) > 1 else probe.decodes      # first call is the prefill
    gen_s = st.t_last - st.t_start - st.t_prefill
    m = {
        "tps": st.tokens_per_second, "n_generated": st.n_generated, "passes": st.n_target_passes,
        "rows": int(sum(probe.rows)),
        "acceptance": (drafter.accepted / drafter.examined) if drafter and drafter.examined else None,
        # the oracle's own count of accepted drafts agrees with the loop's (a check of the accounting)
        "accepted_matches_loop": (drafter.accepted == st.n_draft_accepted) if drafter else None,
        "acceptance_rate": st.acceptance_rate, "k_histogram": dict(st.k_counts),
        # adaptive K's estimates after the run (acceptance per position, draft line, verify per rows):
        # the cell's controller, carried over from its warm-up run and earlier repeats (its K counts too)
        "draft_length": pair.draft_length.summary() if adaptive and pair.draft_length else None,
        "diverged_at": drafter.diverged_at if drafter else None,
        # draft decode calls by rows (the pending tokens, then one per proposal): count, ms per call
        "draft_calls": {k: [c, 1e3 * t / c] for k, (c, t) in sorted(drafter.calls.items())} if drafter else {},
        # the pair's two-token catch-up after the run (its state over the pair's life, warm-ups and earlier
        # cells included): [uses timed, mean ms] of one two-row decode and of two one-row ones
        "catch_up_pair": {("split" if k else "batch"): [c, 1e3 * t] for k, (c, t) in pair.catch_up.seconds.items()} if drafter else {},
        "hits": c1["hits"] - c0["hits"], "misses": c1["misses"] - c0["misses"], "bytes_copied": c1["bytes"] - c0["bytes"],
        "unique_experts": int(sum(probe.unique)), "uncached_experts": int(sum(probe.uncached)),
        # the cache's counters over the verify passes (the prefill's apart: it is not in the tok/s)
        **{k: (n1[k] - nv[k]) if n0 else (0.0 if k.endswith("_s") else 0) for k in NATIVE_COUNTERS},
        "prefill_counters": {k: nv[k] - n0[k] for k in ("inpass_loads", "inpass_bytes", "plans")} if n0 else {},
        "routing_seen": bool(probe.unique),
        "replay_rows_checked": probe.replay_checked, "replay_rows_mismatched": probe.replay_mismatched,
        # where the engine's time goes, ms per target pass (ledger reads, poll/publish, the in-pass
        # policy, hit counting, the estimator, the plan's view, the plan, issuing loads)
        "engine_ms_per_pass": {k: 1e3 * (v - e0.get(k, 0.0)) / max(st.n_target_passes, 1) for k, v in e1.items()},
        # verify passes by rows and kind ("gpu": all misses uploaded; "split": a CPU share):
        # [count, summed s, summed in-pass share]
        "pass_kinds": {k: [x - x0 for x, x0 in zip(v, p0.get(k, (0, 0.0, 0.0)))] for k, v in p1.items()
                       if v[0] > p0.get(k, (0,))[0]},
        # the CPU's time per expert as the split passes measured it, over the profile's (host_rate.py),
        # at the run's end; None where the split is fixed (sd_lru, a set --spac-share)
        "cpu_scale": hr.scale if hr is not None and hr.measured else None,
        # ... and this run's own: its passes' host time over the profile's price (sums, not smoothed)
        "cpu_scale_run": ((hr.total_measured - h0[0]) / (hr.total_modelled - h0[1])
                          if hr is not None and hr.total_modelled > h0[1] else None),
        "breakdown": {
            "total_s": gen_s, "draft_s": st.t_draft, "verify_s": st.t_verify,
            "target_decode_s": float(sum(t for _, t in dec)),
            "engine_publish_s": probe.engine_before_s, "engine_plan_s": probe.engine_after_s,
            "prefill_s": st.t_prefill,
        },
    }
    b = m["breakdown"]
    b["routing_and_accept_s"] = max(0.0, b["verify_s"] - b["target_decode_s"] - b["engine_publish_s"] - b["engine_plan_s"])
    b["other_s"] = max(0.0, gen_s - b["draft_s"] - b["verify_s"])
    return out, m


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def layers_for_budget(budget: float, n_moe: int) -> int:
    return max(1, min(n_moe, int(budget * n_moe + 1e-9)))


# The patch's scheduler copies a split's inputs from host memory without a wait on the host (ggml-backend.cpp,
# `host_input_events`), and syncs an eval callback's ranges and input-less splits only where needed; stock
# llama.cpp waits each time. The llama.cpp systems stand for stock llama.cpp, so they run with the stock
# scheduler (GGML_SCHED_SYNC_HOST_INPUTS=1 restores all of it) unless --baseline-async-inputs; each
# row's config says which it ran with. llama.cpp reads the variable whenever it makes a context's
# scheduler, which it does again at every reserve (routing export, replay and cache changes ask for
# one), so it is set for the pair's whole life, not only its load.
STOCK_SCHED_ENV = "GGML_SCHED_SYNC_HOST_INPUTS"


def _atoi(v: str | None) -> int:
    """C's atoi: the leading integer of v, 0 without one (how ggml reads the variable)."""
    m = re.match(r"\s*([+-]?\d+)", v or "")
    return int(m.group(1)) if m else 0


@contextlib.contextmanager
def host_inputs_for(system: str, a: argparse.Namespace):
    """Yields the row label of the host-input copies `system` runs with, holding the variable set
    while the block runs (the pair's life) for the llama.cpp systems."""
    stock = system.startswith("llama_") and not getattr(a, "baseline_async_inputs", False)
    saved = os.environ.get(STOCK_SCHED_ENV)
    if stock:
        os.environ[STOCK_SCHED_ENV] = "1"
    try:
        yield ("synchronous (stock llama.cpp)" if stock or _atoi(saved) != 0
               else "asynchronous (the patch's scheduler)")
    finally:
        if stock:
            if saved is None:
                os.environ.pop(STOCK_SCHED_ENV, None)
            else:
                os.environ[STOCK_SCHED_ENV] = saved


def load_pair(system: str, budget: float | None, a: argparse.Namespace, lay, calib_path: str | None):
    """(pair, probe, info) for one system at one budget; a system that cannot load raises."""
    kw = dict(n_gpu_layers=a.ngl, n_ctx=a.n_ctx, n_threads=a.threads, pinned_experts=a.pinned)
    base_routing = "native" if native.available() else "off"
    draft = a.draft if system in SD_SYSTEMS else None
    info = {"budget": budget}
    gpu_layers: set[int] = set()
    if system == "llama_ar_gpu":
        pair = ModelPair(a.target, None, experts_on_cpu=False, routing=base_routing, **kw)
        info["budget"] = 1.0
        gpu_layers = set(lay.moe_layers)
    elif system == "llama_ar_layers":
        n_moe = len(lay.moe_layers)
        n_gpu = layers_for_budget(budget, n_moe)
        cpu = lay.moe_layers[:n_moe - n_gpu]
        gpu_layers = set(lay.moe_layers[n_moe - n_gpu:])
        if cpu:
            pair = ModelPair(a.target, None, experts_on_cpu=True, cpu_expert_layers=tuple(cpu),
                             routing=base_routing, **kw)
        else:
            pair = ModelPair(a.target, None, experts_on_cpu=False, routing=base_routing, **kw)
        info.update(gpu_expert_layers=sorted(gpu_layers), n_cpu_moe=len(cpu), budget_actual=n_gpu / n_moe)
    elif system in CACHE_POLICY:
        pol = CACHE_POLICY[system]
        pair = ModelPair(a.target, draft, experts_on_cpu=True, routing="auto", policy=pol,
                         budget=f"{budget * 100:g}%", hw=a.hw, draft_max=a.draft_max,
                         calibration=calib_path if pol == "static" else None,
                         inpass=(InPass(share=None if a.spac_share == "auto" else float(a.spac_share),
                                        routed_bonus=a.spac_bonus, direct_rows=a.spac_direct,
                                        prefetch=a.spac_prefetch)
                                 if a.inpass and pol == "spac" else a.inpass and pol in ("lru", "spac")),
                         pass_slots=a.pass_slots, **kw)
        c = pair.cache
        # the budget the cache really holds: its slots per layer plus the pass slots' pool
        info.update(slots_per_layer=c.n_slots, pass_slots=c.n_pass_slots, inpass=str(pair.engine.inpass),
                    budget_actual=(c.n_slots * len(lay.moe_layers) + c.n_pass_slots) / (lay.n_expert * len(lay.moe_layers)),
                    slot_bytes=int(c.slot_bytes),
                    policy=pol, hw=a.hw)
        if pol == "static":
            info["calibration"] = Path(calib_path).name
    else:                                             # llama_ar_cpu, llama_sd_cpu
        pair = ModelPair(a.target, draft, experts_on_cpu=True, routing=base_routing, **kw)
        info["budget"] = 0.0
    info.setdefault("budget_actual", info["budget"])
    info["pinned_experts"] = bool(getattr(pair.target, "pinned", False))
    if pair.cache is not None and native.available():   # layers with the 2-D copy (the default), as the library reports it
        cc = pair.cache.counters()
        info["copy_2d_layers"] = cc["copy_2d_layers"]
        info["copy_groups"] = cc["copy_groups"]                              # copies per expert, summed over layers
    info["routing_capture"] = ("native" if native.available() else
                               ("callback" if pair.routing is not None else "off"))
    return pair, Probe(pair, gpu_layers), info


# ---------------------------------------------------------------------------------------------
# bandwidths (a subprocess: torch never shares a process with llama.cpp's CUDA runtime)
# ---------------------------------------------------------------------------------------------
def _dram_worker(nbytes, barrier, q, reps):
    x = np.ones(nbytes // 4, np.float32)
    x.sum()
    ts = []
    for _ in range(reps):
        barrier.wait()
        t = time.perf_counter()
        x.sum()
        ts.append((t, time.perf_counter()))
    q.put(ts)


def measure_bandwidths(mb_per_worker: int = 128, reps: int = 5) -> dict:
    """DRAM read bandwidth (numpy sum: one process, then one process per core started together) and,
    with torch + CUDA, host→device copy bandwidth (pinned, pageable, one expert-sized copy)."""
    import multiprocessing as mp
    out: dict = {}
    nt = os.cpu_count() or 1
    nbytes = mb_per_worker << 20
    out["dram_read_gbps_1thread"] = measure_cpu_stream_gbps(nbytes, reps, threads=1)
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(nt), ctx.Queue()
    procs = [ctx.Process(target=_dram_worker, args=(nbytes, barrier, q, reps)) for _ in range(nt)]
    for p in procs:
        p.start()
    res = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    best = min(max(r[i][1] for r in res) - min(r[i][0] for r in res) for i in range(reps))
    out["dram_read_gbps"] = nbytes * nt / best / 1e9
    out["dram_threads"] = nt
    try:
        import torch
    except Exception as e:                             # noqa: BLE001
        out["pcie_note"] = f"torch not importable ({type(e).__name__}): PCIe not measured"
        return out
    if not torch.cuda.is_available():
        out["pcie_note"] = "torch has no CUDA device: PCIe not measured"
        return out
    out["device"] = torch.cuda.get_device_name(0)
    out["device_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30

    def h2d(nbytes, pinned, reps):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        src.fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return nbytes / best / 1e9
    out["pcie_h2d_pinned_gbps"] = h2d(1 << 30, True, 5)
    out["pcie_h2d_pageable_gbps"] = h2d(256 << 20, False, 3)
    out["pcie_h2d_pinned_2650KB_gbps"] = h2d(2_654_208, True, 50)
    return out


def measure_slot_upload(pair: ModelPair, n_layers: int = 4) -> dict:
    """Slot loads the way the engine issues them (ExpertCache.load_async, one batch, then wait): the
    experts of `n_layers` layers into empty slots. Done before the pair's first run, so every slot is free."""
    c = pair.cache
    layers = [int(il) for il in np.nonzero(c.cached_layers)[0][:n_layers]]
    S = min(c.n_slots, 16)
    t = time.perf_counter()
    for il in layers:
        for sl in range(S):
            c.load_async(il, sl, sl)
    c.wait_all()
    dt = time.perf_counter() - t
    nbytes = len(layers) * S * c.expert_bytes
    return {"slot_upload_gbps": nbytes / dt / 1e9, "slot_upload_bytes": nbytes, "slot_upload_experts": len(layers) * S,
            "slot_upload_source": "pinned host experts" if getattr(pair.target, "pinned", False) else "mmap (staged)"}


def bandwidths_subprocess(timeout: int = 120) -> dict:
    try:
        r = subprocess.run([sys.executable, __file__, "--measure-bw"], capture_output=True, text=True, timeout=timeout)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:                             # noqa: BLE001
        return {"error": f"bandwidth measurement failed: {e}"}


def device_name() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    except Exception:                                  # noqa: BLE001
        pass
    return "no GPU"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ---------------------------------------------------------------------------------------------
# roofline
# ---------------------------------------------------------------------------------------------
def expected_unique(rows: int, k: int, E: int) -> float:
    """Distinct experts per layer of a pass of `rows` rows under uniform independent routing."""
    return E * (1.0 - (1.0 - k / E) ** rows)


def roofline(res: dict, lay, bw: dict, gpu_pass_s: float, gpu_pass_basis: str,
             gpu_pass_rows: dict | None = None) -> dict:
    """Lower bound on generation time for the passes this run made: draft as measured, plus per pass
    the all-GPU pass time, plus the uncached experts it touched streamed once at DRAM read bandwidth
    (the CPU expert path's ceiling); `split` also lets PCIe carry part of them concurrently."""
    dram = bw.get("dram_read_gbps")
    if not dram:
        return {"note": "no DRAM bandwidth"}
    B = lay.bytes_per_expert
    n_moe = len(lay.moe_layers)
    if res["routing_seen"]:
        uncached = res["uncached_experts"]              # per-run means
        basis = "measured routing"
    else:                                             # plain decoding without routing capture: estimate
        r = res["rows"] / max(res["passes"], 1)
        cpu_layers = n_moe * (1.0 - (res.get("budget_actual") or 0.0))
        uncached = res["passes"] * cpu_layers * expected_unique(r, lay.n_expert_used, lay.n_expert)
        basis = "uniform-routing estimate"
    cpu_bytes = uncached * B
    draft_s = res["breakdown"]["draft_s"]
    passes = max(res["passes"], 1)
    out_pass = None
    if gpu_pass_rows and res["routing_seen"]:
        # the per-pass bound: both pipes at their measured bandwidths, in parallel, plus the
        # all-GPU pass of the same rows (measured by llama_ar_gpu in this run)
        rows = res["rows"] / passes
        t_gpu = _interp_rows(gpu_pass_rows, rows)
        cpu_b = max(0.0, res["uncached_experts"] - res.get("inpass_loads", 0.0)) * B / passes
        up_b = res.get("inpass_bytes", 0.0) / passes
        link = bw.get("pcie_h2d_pinned_gbps") or bw.get("slot_upload_gbps")   # the link itself: the bound
        if link:
            roof_s = max(cpu_b / (dram * 1e9), up_b / (link * 1e9)) + t_gpu
            meas_s = res["breakdown"]["target_decode_s"] / passes
            out_pass = {"rows": rows, "gpu_pass_s": t_gpu, "cpu_bytes": cpu_b, "upload_bytes": up_b,
                        "dram_gbps": dram, "link_gbps": link, "roofline_s": roof_s, "measured_s": meas_s,
                        "ratio": meas_s / roof_s}
            if up_b > 0 and cpu_b <= 0.01 * up_b and meas_s > t_gpu:
                # all misses on the GPU: the in-pass miss path's effective rate, a pass's uploads over the time
                # it took beyond the all-GPU pass of its rows (it also pays the stops and plans: a lower bound)
                out_pass["inpass_upload_gbps"] = up_b / (meas_s - t_gpu) / 1e9
    passes = res["passes"]
    t_cpu = cpu_bytes / (dram * 1e9)
    t_min = draft_s + passes * gpu_pass_s + t_cpu
    out = {"basis": basis, "gpu_pass_s": gpu_pass_s, "gpu_pass_basis": gpu_pass_basis,
           "cpu_expert_bytes": cpu_bytes, "est_cpu_experts_s": t_cpu, "dram_gbps": dram,
           "tps": res["n_generated"] / t_min if t_min > 0 else None}
    out["fraction"] = res["tps"] / out["tps"] if out["tps"] else None
    pcie = bw.get("pcie_h2d_pinned_gbps")
    if pcie:
        t_split = draft_s + passes * gpu_pass_s + cpu_bytes / ((dram + pcie) * 1e9)
        out["split_tps"] = res["n_generated"] / t_split
        out["split_fraction"] = res["tps"] / out["split_tps"]
        out["copy_s_at_pcie"] = res["bytes_copied"] / (pcie * 1e9)
    if out_pass:
        out["pass"] = out_pass
    return out


def _interp_rows(table: dict, rows: float) -> float:
    """All-GPU pass time at `rows` rows, linear between the measured row counts (clamped)."""
    xs = sorted(table)
    if rows <= xs[0]:
        return table[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if rows <= hi:
            return table[lo] + (table[hi] - table[lo]) * (rows - lo) / (hi - lo)
    return table[xs[-1]]


def measure_pass_rows(pair, prompt: list[int], rows_list, reps: int = 8) -> dict:
    """Median wall time of one target decode of r rows (greedy tokens, rolled back), per r."""
    ctx = pair.target_ctx
    out = {}
    for r in rows_list:
        ctx.reset()
        ctx.decode(prompt, "last")
        n0 = len(prompt)
        ts = []
        for i in range(reps + 1):
            toks = [int(prompt[(i + j) % len(prompt)]) for j in range(r)]
            t = time.perf_counter()
            ctx.decode(toks, "all")
            if i:                                     # the first is a warm-up
                ts.append(time.perf_counter() - t)
            ctx.rollback(n0)
        out[int(r)] = float(statistics.median(ts))
    return out


# ---------------------------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------------------------
def cells(a) -> list[tuple[str, float | None, float | None]]:
    """(system, budget, acceptance) to measure; None = not applicable."""
    out = []
    for s in a.systems:
        if s in ("llama_ar_cpu", "llama_ar_gpu"):
            out.append((s, None, None))
        elif s in ("llama_ar_layers", "lru_ar", "spac_ar"):
            out += [(s, b, None) for b in a.budgets if a.full_matrix or b == a.main_budget or s == "llama_ar_layers"]
        elif s == "llama_sd_cpu":
            out += [(s, None, acc) for acc in a.acceptances]
        else:
            for b in a.budgets:
                for acc in a.acceptances:
                    if a.full_matrix or b == a.main_budget or acc == a.main_acceptance:
                        out.append((s, b, acc))
    return out


def phase_of(cell, a) -> str:
    s, b, _ = cell
    if s == "llama_ar_gpu":
        return "gpu-ref"
    return f"{(b if b is not None else a.main_budget):g}"


def aggregate(runs: list[dict]) -> dict:
    tps = [r["tps"] for r in runs]
    agg = {"tps": statistics.median(tps), "tps_runs": tps, "repeats": len(runs),
           "tps_min": min(tps), "tps_max": max(tps)}
    for k in ("passes", "rows", "n_generated", "hits", "misses", "bytes_copied", "unique_experts", "uncached_experts",
              *NATIVE_COUNTERS):
        agg[k] = float(np.mean([r[k] for r in runs]))
    agg["prefill_counters"] = {k: float(np.mean([r["prefill_counters"].get(k, 0) for r in runs]))
                               for k in runs[0]["prefill_counters"]}
    acc = [r["acceptance"] for r in runs if r["acceptance"] is not None]
    agg["acceptance"] = float(np.mean(acc)) if acc else None
    ar = [r["acceptance_rate"] for r in runs if r["acceptance_rate"] is not None]
    agg["acceptance_rate"] = float(np.mean(ar)) if ar else None
    agg["diverged"] = [r["diverged_at"] for r in runs if r["diverged_at"] is not None]
    checks = [r["accepted_matches_loop"] for r in runs if r["accepted_matches_loop"] is not None]
    agg["accepted_matches_loop"] = all(checks) if checks else None
    calls: dict = {}                                   # draft decodes summed over the runs: [count, ms per call]
    for r in runs:
        for key, (c, ms) in r["draft_calls"].items():
            n0, ms0 = calls.get(key, (0, 0.0))
            calls[key] = [n0 + c, (n0 * ms0 + c * ms) / (n0 + c)]
    agg["draft_calls"] = calls
    agg["draft_length"] = runs[-1]["draft_length"]      # the controller after the cell's last run
    agg["catch_up_pair"] = runs[-1]["catch_up_pair"]    # the pair's catch-up timings after the cell
    hist: dict = {}
    for r in runs:
        for k, c in r["k_histogram"].items():
            hist[int(k)] = hist.get(int(k), 0) + c
    agg["k_histogram"] = dict(sorted(hist.items()))
    agg["output_matches_reference"] = all(r["matches_reference"] for r in runs)
    agg["routing_seen"] = all(r["routing_seen"] for r in runs)
    agg["replay_rows_checked"] = sum(r["replay_rows_checked"] for r in runs)
    agg["replay_rows_mismatched"] = sum(r["replay_rows_mismatched"] for r in runs)
    agg["breakdown"] = {k: float(np.mean([r["breakdown"][k] for r in runs])) for k in runs[0]["breakdown"]}
    for key in ("cpu_scale", "cpu_scale_run"):
        scales = [r[key] for r in runs if r.get(key) is not None]
        agg[key] = float(np.mean(scales)) if scales else None
    kinds: dict = {}                           # verify passes by "rows:gpu|split": [count, mean ms, mean share]
    for r in runs:
        for key, (c, t, sh) in r["pass_kinds"].items():
            k0 = kinds.setdefault(key, [0, 0.0, 0.0])
            k0[0] += c
            k0[1] += t
            k0[2] += sh
    agg["pass_kinds"] = {k: [c, 1e3 * t / c, sh / c] for k, (c, t, sh) in sorted(kinds.items())}
    steps = sorted({k for r in runs for k in r["engine_ms_per_pass"]})
    agg["engine_ms_per_pass"] = {k: float(np.mean([r["engine_ms_per_pass"].get(k, 0.0) for r in runs])) for k in steps}
    n = agg["hits"] + agg["misses"]
    agg["hit_rate"] = agg["hits"] / n if n else None
    return agg


def run_offload1(argv: list[str] | None, systems: list[str], out_path: Path, time_left: float) -> list[dict]:
    """The OFFLOAD1 systems: the llama.cpp systems they stand for, run by this script in a child process
    with GGML_OP_OFFLOAD_MIN_BATCH=1 (same model, prompts, routing replay and acceptance), renamed."""
    drop = {"--systems", "--out", "--time-limit"}
    args, it = [], iter(argv if argv is not None else sys.argv[1:])
    for tok in it:
        if tok in drop:
            next(it, None)
        elif tok.split("=", 1)[0] not in drop and tok != "--no-bw":
            args.append(tok)
    sub_out = out_path.with_suffix(".offload1.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--no-bw", "--no-anchor-end", "--out", str(sub_out),
           "--systems", ",".join(OFFLOAD1[s] for s in systems), "--time-limit", f"{max(time_left - 20, 10):.0f}"]
    log("  llama.cpp small-batch offload (GGML_OP_OFFLOAD_MIN_BATCH=1):", " ".join(cmd[2:]))
    try:
        subprocess.run(cmd, env=dict(os.environ, GGML_OP_OFFLOAD_MIN_BATCH="1"), timeout=time_left, check=False)
        sub = json.loads(sub_out.read_text())
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        log(f"SKIP {systems}: {type(e).__name__}: {e}")
        return []
    finally:
        with contextlib.suppress(OSError):
            sub_out.unlink()
    back = {v: k for k, v in OFFLOAD1.items()}
    rows = []
    for r in sub["results"]:
        if r["system"] in back:
            r["system"] = back[r["system"]]
            r["config"] = {**r.get("config", {}), "GGML_OP_OFFLOAD_MIN_BATCH": 1}
            rows.append(r)
    return rows


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (also how scripts/profile_pass.py loads a system exactly as the bench does)."""
    ap = argparse.ArgumentParser(description="spac-gguf GPU benchmark (issue 6)")
    ap.add_argument("--measure-bw", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--out", default=None, help="JSON path (default docs/bench/gpu-<date>.json)")
    ap.add_argument("--systems", default=",".join(x for x in ALL_SYSTEMS if x != "spac_aks"),
                    help="comma list (default: all but spac_aks, the exploration A/B)")
    ap.add_argument("--budgets", default="0.10,0.17,0.30")
    ap.add_argument("--acceptances", default="0.5,0.7,0.9")
    ap.add_argument("--main-budget", type=float, default=0.17)
    ap.add_argument("--main-acceptance", type=float, default=0.7)
    ap.add_argument("--full-matrix", action="store_true")
    ap.add_argument("-n", "--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-max", type=int, default=5, help="K (the verify pass has K+1 rows)")
    ap.add_argument("-ngl", "--gpu-layers", dest="ngl", type=int, default=None, help="default 99 with a GPU, else 0")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-c", "--n-ctx", type=int, default=None)
    ap.add_argument("--hw", default=None, help="hardware profile for spac/the engine (default h200-pcie5 / desktop-pcie4x16)")
    ap.add_argument("--time-limit", type=float, default=420.0, help="seconds; later runs are skipped, noted in the JSON")
    ap.add_argument("--calib-tokens", type=int, default=64)
    ap.add_argument("--no-bw", action="store_true", help="skip the bandwidth measurements")
    ap.add_argument("--no-pass-bound", dest="pass_bound", action="store_false",
                    help="without llama_ar_gpu among the systems, do not load the model on the GPU once to time the "
                         "all-GPU pass (the per-pass roofline's GPU term; default: timed whenever a cache system runs)")
    ap.add_argument("--no-anchor-end", dest="anchor_end", action="store_false",
                    help="time llama_ar_cpu once (default: again at the end of the run, both visits in its rows)")
    ap.add_argument("--anchor-between", action="store_true",
                    help="time llama_ar_cpu again after every other system (a load each, while time is left): each "
                         "row then also holds its ratio to the mean of the visits just before and after it "
                         "(anchor_bracket), which a drift of the CPU baseline during the run cannot bend")
    ap.add_argument("--routing", default="random,qwen3-calibrated",
                    help=f"comma list of {', '.join(ROUTINGS)} (model: no replay)")
    ap.add_argument("--no-pinned", dest="pinned", action="store_false", help="host experts mmapped, not pinned")
    ap.add_argument("--no-inpass", dest="inpass", action="store_false", help="cache systems without in-pass loads")
    ap.add_argument("--spac-share", default="auto",
                    help="spac's in-pass share of a pass's misses uploaded (the rest run on the CPU): a number, or "
                         "auto (the library default: the balancer's split per pass, 1 when the pass fits the slots)")
    ap.add_argument("--spac-bonus", type=float, default=float("inf"), metavar="B",
                    help="spac: with a host branch a miss takes the slot of an expert whose utility is below its own "
                         "+ B x its rows in the pass (default inf, the library's: always evict the lowest, as sd_lru)")
    ap.add_argument("--catch-up", choices=("auto", "batch", "split"), default="auto",
                    help="how the draft decodes two tokens it has not seen: the library's default auto (timed both "
                         "ways, the faster used), one two-row decode, or two one-row decodes (an A/B)")
    ap.add_argument("--spac-prefetch", action="store_true",
                    help="spac: also prefetch the MIP's plan between passes (the library leaves it off with in-pass loads)")
    ap.add_argument("--baseline-async-inputs", action="store_true",
                    help="run the llama.cpp systems with the patch's asynchronous host-input copies too "
                         "(default: stock llama.cpp's synchronous ones)")
    ap.add_argument("--pass-slots", type=int, default=None, metavar="N",
                    help="spac's pass slots (GPU slots a pass uploads misses into beyond the free cache slots; "
                         "default: what the budget leaves after whole slots per layer, at most 64; 0: none)")
    ap.add_argument("--spac-direct", type=int, default=0, metavar="ROWS",
                    help="spac: passes of at most ROWS rows read their misses from pinned host memory on the GPU "
                         "(no in-pass upload; 0 off, at most 4)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if not 0 <= a.spac_direct <= native.DIRECT_MAX_ROWS:
        ap.error(f"--spac-direct must be in 0..{native.DIRECT_MAX_ROWS}, not {a.spac_direct}")
    if a.spac_share != "auto":
        try:
            ok = 0.0 <= float(a.spac_share) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            ap.error(f"--spac-share must be auto or a number in [0, 1], not {a.spac_share!r}")
    if a.measure_bw:
        print(json.dumps(measure_bandwidths()))
        return 0
    if not a.target or not a.draft:
        ap.error("--target and --draft are required")
    T0 = time.perf_counter()
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.systems if s not in ALL_SYSTEMS]
    if bad:
        ap.error(f"unknown systems {bad}; known: {', '.join(ALL_SYSTEMS)}")
    a.routings = [r.strip() for r in a.routing.split(",") if r.strip()]
    if [r for r in a.routings if r not in ROUTINGS]:
        ap.error(f"unknown routing in {a.routing!r}; known: {', '.join(ROUTINGS)}")
    a.budgets = [float(x) for x in a.budgets.split(",")]
    a.acceptances = [float(x) for x in a.acceptances.split(",")]
    if a.main_budget not in a.budgets:
        a.budgets.append(a.main_budget)
    if a.main_acceptance not in a.acceptances:
        a.acceptances.append(a.main_acceptance)
    gpu = llama_backend.gpu_available()
    if a.ngl is None:
        a.ngl = 99 if gpu else 0
    a.hw = a.hw or ("h200-pcie5" if gpu else "desktop-pcie4x16")
    a.n_ctx = a.n_ctx or (256 + a.tokens + a.draft_max + 64)
    date = datetime.date.today().isoformat()
    out_path = Path(a.out or ROOT / "docs" / "bench" / f"gpu-{date}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    skipped: list[dict] = []
    if not native.available():
        for s in [s for s in a.systems if s in CACHE_POLICY]:
            log(f"SKIP {s}: this llama.cpp build has no expert cache (spac_gguf.native.available() is False)")
            skipped.append({"system": s, "reason": "llama.cpp build without the expert-cache patch"})
        a.systems = [s for s in a.systems if s not in CACHE_POLICY]
    if "llama_ar_gpu" in a.systems and not gpu:
        skipped.append({"system": "llama_ar_gpu", "reason": "no GPU"})
        a.systems.remove("llama_ar_gpu")

    offload1 = [s for s in a.systems if s in OFFLOAD1]       # run by a process of their own, below
    a.systems = [s for s in a.systems if s not in OFFLOAD1]

    lay = gguf_layout.describe(a.target)
    dlay = gguf_layout.describe(a.draft)
    bw = {} if a.no_bw else bandwidths_subprocess()
    log("bandwidths:", bw)

    doc = {
        "device": device_name(), "date": date, "host_cpu": cpu_name(), "cpu_threads": os.cpu_count(),
        "llama_cpp": getattr(llama_cpp, "__version__", "?"), "gpu_offload": gpu, "n_gpu_layers": a.ngl,
        "expert_cache": "patched" if native.available() else "absent",
        "model": {
            "target": Path(a.target).name, "target_bytes": lay.file_size, "arch": lay.architecture,
            "n_layer": lay.n_layer, "n_expert": lay.n_expert, "k": lay.n_expert_used, "n_embd": lay.n_embd,
            "expert_qtypes": lay.expert_qtypes, "bytes_per_expert": lay.bytes_per_expert,
            "expert_bytes": lay.expert_bytes, "dense_bytes": lay.dense_bytes, "vocab": lay.vocab_size,
            "draft": Path(a.draft).name, "draft_bytes": dlay.file_size, "draft_arch": dlay.architecture,
            "draft_layers": dlay.n_layer, "draft_n_embd": dlay.n_embd,
            "weights": "random (scripts/make_bench_model.py): greedy output follows a fixed token permutation "
                       "by a wide logit margin; locality comes from replayed routing",
        },
        "method": {
            "tokens": a.tokens, "repeats": a.repeats, "main_budget": a.main_budget,
            "main_acceptance": a.main_acceptance, "budgets": a.budgets, "acceptances": a.acceptances, "draft_max": a.draft_max, "greedy": True,
            "drafter": DRAFTER_LABEL, "prompts": PROMPTS[:a.repeats], "calibration_prompt": CALIB_PROMPT,
            "calibration_tokens": a.calib_tokens, "hw_profile": a.hw, "n_ctx": a.n_ctx,
            "interleaving": "per budget: all pairs loaded, then repeat -> acceptance -> system",
            "tps": "median over repeats of generated tokens / generation time (prefill excluded)",
            "acceptance": "accepted / examined draft tokens (per-token rate); acceptance_rate = accepted / drafted",
        },
        "bandwidth": bw, "results": [], "skipped": skipped,
    }

    def save():
        out_path.write_text(json.dumps(doc, indent=1, default=float) + "\n")

    # 1. reference continuations (target alone, plain greedy decoding) + calibration trace
    prompts_txt = [PROMPTS[i % len(PROMPTS)] for i in range(a.repeats)]
    need_calib = "sd_static" in a.systems
    log("loading the reference (target alone, experts on CPU)")
    ref = ModelPair(a.target, None, n_gpu_layers=a.ngl, experts_on_cpu=True, n_ctx=a.n_ctx, n_threads=a.threads,
                    routing="auto" if need_calib else ("native" if native.available() else "off"))
    prompts = [ref.tokenize(p) for p in prompts_txt]
    ref_probe = Probe(ref)
    conts = []
    for p in prompts:
        toks, m = run_once(ref, ref_probe, p, a.tokens, 0, None)
        conts.append(toks)
        lg = ref.target_ctx.decode([toks[-1]], "last")
        if not np.isfinite(lg).all():
            raise SystemExit("the target's logits are not finite: regenerate the model")
    doc["method"]["reference_tps"] = m["tps"]
    warm_prompt = ref.tokenize(CALIB_PROMPT)           # warm-up runs: a prompt no timed run uses
    warm_cont, _ = run_once(ref, ref_probe, warm_prompt, a.tokens, 0, None)
    calib_path = None
    if need_calib:
        _, trace = ref.record_trace(CALIB_PROMPT, max_tokens=a.calib_tokens, draft_max=0, stop_at_eog=False)
        calib_path = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"spac-bench-calib-{os.getpid()}.npz")
        trace.save(calib_path)
        log(f"calibration trace: {trace.ids.shape[0]} rows")
    n_vocab = ref.target.n_vocab
    ref.close()
    warm_oracle = (warm_cont,) + corruption(a.main_acceptance, a.tokens, n_vocab, warm_cont, seed=999)
    warm_oracles = {acc: (warm_cont,) + corruption(acc, a.tokens, n_vocab, warm_cont, seed=999 + int(round(acc * 100)))
                    for acc in a.acceptances}
    oracles = {acc: [(conts[i],) + corruption(acc, a.tokens, n_vocab, conts[i], seed=1000 * i + int(round(acc * 100)))
                     for i in range(a.repeats)] for acc in a.acceptances}
    log(f"reference continuations done ({time.perf_counter() - T0:.0f} s)")
    # routing to replay, per prompt (and one for the warm-up): one row per context position
    replays = {r: (None if r == "model" else
                   [locality.generate(r, n_layers=lay.n_layer, n_expert=lay.n_expert, k=lay.n_expert_used,
                                      tokens=a.n_ctx, prompts=1, draft_max=0, seed=100 + i).ids
                    for i in range(a.repeats + 1)]) for r in a.routings}
    doc["method"]["routing"] = {r: ("the model's router" if r == "model" else
                                    f"replayed spac_gguf.locality preset {r!r}, seeds 100..{100 + a.repeats}")
                                for r in a.routings}
    doc["method"]["pinned_experts"] = a.pinned
    doc["method"]["inpass"] = a.inpass
    doc["method"]["catch_up"] = a.catch_up               # the draft's two-token catch-up (speculative.CatchUp)

    # 2. phases: one pair in memory at a time (pinned host experts are a copy per pair, 17 GB each);
    #    within a pair: repeat -> routing -> acceptance
    todo = cells(a)
    phases: dict[str, list] = {}
    for c in todo:
        phases.setdefault(phase_of(c, a), []).append(c)
    # the all-GPU reference first: every roofline needs its pass times, and it must never be the cell cut
    order = sorted(phases, key=lambda k: (k != "gpu-ref", k != f"{a.main_budget:g}", k))
    gpu_pass_rows = None
    gpu_pass = None
    timed_out = False
    def measure(s: str, b, accs: list, why: str = "") -> tuple[dict, dict] | None:
        """One system's cells: load its pair, warm up, time every repeat x routing x acceptance."""
        with host_inputs_for(s, a) as host_inputs:
            got = _measure(s, b, accs, why)
        if got is not None:
            got[0]["host_inputs"] = host_inputs
        return got

    def _measure(s: str, b, accs: list, why: str = "") -> tuple[dict, dict] | None:
        nonlocal timed_out, gpu_pass_rows
        t = t_visit = time.perf_counter()
        try:
            pair, probe, info = load_pair(s, b, a, lay, calib_path)
        except Exception as e:                     # noqa: BLE001
            log(f"SKIP {s} budget {b}: {type(e).__name__}: {e}")
            skipped.append({"system": s, "budget": b, "reason": f"{why}{type(e).__name__}: {e}"})
            return None
        info["load_s"] = time.perf_counter() - t
        log(f"  loaded {s} budget={b} in {info['load_s']:.1f} s {info}")
        if pair.cache is not None and "slot_upload_gbps" not in doc["bandwidth"]:
            doc["bandwidth"].update(measure_slot_upload(pair))
            log("  slot upload:", {k: v for k, v in doc["bandwidth"].items() if k.startswith("slot_")})
        if s == "llama_ar_gpu" and gpu_pass_rows is None:
            gpu_pass_rows = measure_pass_rows(pair, prompts[0], sorted({1, a.draft_max + 1}))
            doc["gpu_pass_rows_s"] = gpu_pass_rows
            log("  all-GPU pass time by rows:", gpu_pass_rows)
        K0 = a.draft_max if s in SD_SYSTEMS else 0
        # warm-up: one untimed run on the calibration prompt (kernels, page cache, cache fill)
        run_once(pair, probe, warm_prompt, a.tokens, K0, warm_oracle if K0 else None,
                 replays[a.routings[0]][-1] if replays[a.routings[0]] else None, s in ADAPTIVE, a.catch_up)
        runs: dict[tuple, list] = {}
        controllers: dict[tuple, DraftLength] = {}   # adaptive K: one per workload (routing, acceptance)
        warmed: set[tuple] = set()                   # cells that had their untimed run
        for rep in range(a.repeats):
            for routing in a.routings:
                for acc in accs:
                    if time.perf_counter() - T0 > a.time_limit:
                        timed_out = True
                        continue
                    K = a.draft_max if acc is not None else 0
                    rp = replays[routing][rep] if replays[routing] else None
                    if (routing, acc) not in warmed:
                        # every system, every cell: one untimed run on the warm-up prompt with the
                        # cell's routing and acceptance. Adaptive K gets a controller of its own per
                        # workload and learns on it (a serving process learns on its first requests;
                        # 48 tokens are ~25 rounds, too few to time learning); the caches see the
                        # cell's routing preset before it is timed, the same for every system.
                        warmed.add((routing, acc))
                        if s in ADAPTIVE and K:
                            controllers[(routing, acc)] = DraftLength(explore=ADAPTIVE[s])
                            pair.draft_length = controllers[(routing, acc)]
                        run_once(pair, probe, warm_prompt, a.tokens, K, warm_oracles[acc] if K else None,
                                 replays[routing][-1] if replays[routing] else None, s in ADAPTIVE, a.catch_up)
                    if s in ADAPTIVE and K:
                        pair.draft_length = controllers[(routing, acc)]
                    toks, m = run_once(pair, probe, prompts[rep], a.tokens, K, oracles[acc][rep] if K else None, rp,
                                       s in ADAPTIVE, a.catch_up)
                    m["matches_reference"] = toks == conts[rep]
                    runs.setdefault((routing, acc), []).append(m)
        pair.close()
        info["visit_s"] = time.perf_counter() - t_visit
        return info, runs

    def add_rows(s: str, b, info: dict, runs: dict, anchor: dict | None = None,
                 between: list[dict] | None = None) -> list[dict]:
        """A row per (routing, acceptance), returned; `anchor`: the same cells timed again at the run's
        end, `between`: visits in between (the row's statistics then cover every visit, each visit's
        rates kept apart)."""
        nonlocal gpu_pass
        added = []
        for (routing, acc), rs in runs.items():
            again = (anchor or {}).get((routing, acc), [])
            mid = [x for v in (between or []) for x in v.get((routing, acc), [])]
            r = {"system": s, "budget": info["budget"] if info["budget"] is not None else b,
                 "budget_actual": info.get("budget_actual"), "acceptance_target": acc,
                 "routing": routing, "drafter": DRAFTER_LABEL if acc is not None else None,
                 "draft_max": a.draft_max if acc is not None else 0, "adaptive": s in ADAPTIVE,
                 **aggregate(rs + mid + again), "config": info}
            if anchor is not None or between:      # repeats stays per visit (prompts); tps_runs has all
                r["anchor_tps_runs"] = {"first": [x["tps"] for x in rs], "last": [x["tps"] for x in again]}
                if between:
                    r["anchor_tps_runs"]["between"] = [x["tps"] for x in mid]
                r["repeats"] = len(rs)
            if r["hit_rate"] is None:              # no cache: the share of routed entries whose experts sit on the GPU
                r["hit_rate"] = float(r["budget_actual"] or 0.0)
            if s == "llama_ar_gpu" and gpu_pass is None:
                gpu_pass = r["breakdown"]["target_decode_s"] / max(r["passes"], 1)
            doc["results"] = [x for x in doc["results"]
                              if (x["system"], x["budget"], x["routing"], x["acceptance_target"])
                              != (s, r["budget"], routing, acc)]
            doc["results"].append(r)
            added.append(r)
            log(f"  {s:16s} b={r['budget']!s:5s} r={routing:16s} a={acc!s:4s} tps={r['tps']:.2f} "
                f"passes={r['passes']:.0f} acc={r['acceptance']} hit={r['hit_rate']} inpass={r['inpass_loads']:.0f} (pass slots {r['pass_loads']:.0f}) direct={r['direct_passes']:.0f} plans={r['plans']:.0f} "
                f"stop_ms/pass={1e3 * r['stop_s'] / max(r['passes'], 1):.2f} plan_ms/pass={1e3 * r['plan_s'] / max(r['passes'], 1):.2f} "
                f"(down {1e3 * r['down_s'] / max(r['passes'], 1):.2f} copy {1e3 * r['copy_s'] / max(r['passes'], 1):.2f}) "
                + (f"cpu_scale={r['cpu_scale']:.2f} " if r.get("cpu_scale") is not None else "")
                + (f"(run {r['cpu_scale_run']:.2f}) " if r.get("cpu_scale_run") is not None else "")
                + f"match={r['output_matches_reference']}" + (f" anchor={r['anchor_tps_runs']}" if "anchor_tps_runs" in r else ""))
        save()
        return added

    def bracket(rows: list[dict], before: dict | None, after: dict | None) -> None:
        """Each row's ratio to the CPU baseline's visits just before and after its system ran (the
        median of each visit, their mean), beside the row's own; a missing side is left out."""
        for r in rows:
            sides = {k: statistics.median([x["tps"] for x in v[(r["routing"], None)]])
                     for k, v in (("before", before), ("after", after)) if v and (r["routing"], None) in v}
            if sides:
                r["anchor_bracket"] = {**sides, "ratio": r["tps"] / statistics.mean(sides.values())}
        save()

    # the per-pass roofline's GPU term belongs to the same run: without llama_ar_gpu among the systems,
    # load the model on the GPU once just to time its pass (session 13 ran the matrix without it
    # and had to borrow the bound from earlier sessions)
    if a.pass_bound and not any(s == "llama_ar_gpu" for s, _, _ in todo) and \
            any(s in CACHE_POLICY for s, _, _ in todo) and native.available():
        with host_inputs_for("llama_ar_gpu", a):     # as llama_ar_gpu runs: stock llama.cpp's scheduler
            try:
                pair, _, _ = load_pair("llama_ar_gpu", 1.0, a, lay, calib_path)
            except Exception as e:                     # noqa: BLE001
                log(f"no all-GPU pass bound: {type(e).__name__}: {e}")
                skipped.append({"system": "llama_ar_gpu", "reason": f"pass bound only: {type(e).__name__}: {e}"})
            else:
                try:
                    gpu_pass_rows = measure_pass_rows(pair, prompts[0], sorted({1, a.draft_max + 1}))
                finally:
                    pair.close()
                doc["gpu_pass_rows_s"] = gpu_pass_rows
                doc["gpu_pass_rows_basis"] = "all-GPU pass timed for the bound only (llama_ar_gpu not among the systems)"
                log("  all-GPU pass time by rows (bound only):", gpu_pass_rows)

    first_visit: dict[tuple, tuple[dict, dict]] = {}
    anchor_key = ("llama_ar_cpu", None)
    anchor_visits: list[dict] = []          # the CPU baseline's visits (their runs) in order: the brackets' ends
    bracketing = a.anchor_between           # off once a visit no longer fits

    def anchor_visit(why: str) -> dict | None:
        """The CPU baseline once more, when a visit like its first still fits in the time left."""
        left = a.time_limit - (time.perf_counter() - T0)
        cost = first_visit[anchor_key][0].get("visit_s", 0.0)
        if left <= 1.2 * cost + 10:
            log(f"the anchor's visit {why}does not fit ({left:.0f} s left, the first took {cost:.0f} s)")
            skipped.append({"system": "llama_ar_cpu", "reason": f"anchor {why}: time limit"})
            return None
        again = measure(*anchor_key, [None], why=f"anchor {why}(its row has the first visit): ")
        return again[1] if again is not None else None

    for ph in order:
        cs = phases[ph]
        log(f"phase budget={ph}: {len(cs)} cells x {len(a.routings)} routings")
        keys = list(dict.fromkeys((s, b) for s, b, _ in cs))
        if a.anchor_between:                # the anchor first, so that every system has a visit before it
            keys.sort(key=lambda k: k != anchor_key)
        for key in keys:
            s, b = key
            if time.perf_counter() - T0 > a.time_limit:
                timed_out = True
                skipped += [{"system": s, "budget": b, "reason": "time limit"}]
                continue
            got = measure(s, b, [acc for cs_, b_, acc in cs if (cs_, b_) == key])
            if got is not None:
                first_visit[key] = got
                rows = add_rows(s, b, *got)
                if key == anchor_key:
                    anchor_visits.append(got[1])
                elif bracketing and anchor_visits and s != "llama_ar_gpu":
                    after = anchor_visit("after " + s + " ")
                    bracket(rows, anchor_visits[-1], after)
                    if after is None:
                        bracketing = False
                    else:
                        anchor_visits.append(after)

    # llama.cpp's small-batch offload systems: this script again, in a process with the variable set
    left = a.time_limit - (time.perf_counter() - T0)
    if offload1 and left > 30:
        sub_rows = run_offload1(argv, offload1, out_path, left)
        doc["results"] += sub_rows
        if not sub_rows:
            skipped += [{"system": s, "reason": "its process produced no result"} for s in offload1]
    elif offload1:
        timed_out = True
        skipped += [{"system": s, "reason": "time limit"} for s in offload1]

    # the CPU baseline again at the very end (its rate drifted 32-38 tok/s within one device call):
    # every ratio against it then holds against both ends of the run. Only when it fits: a visit costs
    # about what the first did (its load and its runs, warm-ups included)
    # (with --anchor-between, the visit after the last system is the end one)
    if len(anchor_visits) > 1:
        add_rows(*anchor_key, first_visit[anchor_key][0], anchor_visits[0], anchor_visits[-1],
                 between=anchor_visits[1:-1])
    elif a.anchor_end and anchor_key in first_visit and len(first_visit) > 1:
        again = anchor_visit("at the end ")
        if again is not None:
            add_rows(*anchor_key, first_visit[anchor_key][0], first_visit[anchor_key][1], again)

    # 3. rooflines (after all phases: the all-GPU pass time comes from the reference phase)
    if gpu_pass is None and gpu_pass_rows and 1 in gpu_pass_rows:
        gpu_pass, basis = gpu_pass_rows[1], "measured: the all-GPU pass of 1 row (bound only)"
    elif gpu_pass is None:
        from spac_gguf.hardware import load_profile
        gpu_pass, basis = load_profile(a.hw).gpu_pass_s, f"hardware profile {a.hw} gpu_pass_s"
    else:
        basis = "measured: llama_ar_gpu target decode time per pass (1 row)"
    for r in doc["results"]:
        r["roofline"] = roofline(r, lay, bw, gpu_pass, basis, gpu_pass_rows)
    doc["timed_out"] = timed_out
    doc["wall_s"] = time.perf_counter() - T0
    save()
    if calib_path:
        with contextlib.suppress(OSError):
            os.unlink(calib_path)
    log(f"wrote {out_path} ({doc['wall_s']:.0f} s)")
    print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
