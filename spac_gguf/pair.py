"""The Python API: load a target (and optional draft) once, then generate, mlx-lm style.

    from spac_gguf import load
    pair = load("target.gguf", draft="draft.gguf")
    for tok in pair.generate("Once upon a time", max_tokens=32):
        print(tok.text, end="", flush=True)
    print(tok.stats.acceptance_rate, tok.stats.tokens_per_second)
"""
from __future__ import annotations

import codecs
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import gguf_layout, native
from .draft_length import DraftLength
from .engine import InPass
from .llama_backend import BackendError, errors_worded_by_caller, LlamaContext, LlamaModel, Placement
from .registry import DEFAULT_DRAFT_MAX
from .routing import EvalCallbackRouting, RoutingSource
from .sampling import Sampler
from .speculative import CatchUp, ContextSide, Drafter, DrafterLike, Stats, generate as speculative_generate
from .trace import RoutingTrace, TraceRecorder


# At most this many pass slots per device (a 6-row verify pass of a top-8 model routes ~40 experts;
# the budget's remainder after whole slots per layer is usually less)
PASS_SLOTS_MAX = 64


class InputError(ValueError):
    """Bad input from the user (files, flags); the message is one line meant for them."""


@dataclass
class Token:
    token: int
    text: str              # the text this token completes (may be "" inside a multi-byte char)
    from_draft: bool
    stats: Stats
    routing: np.ndarray | None   # int32 [rows, layers, k] of the target pass that produced it


class PassObserver:
    """What a caller may watch (or steer, as the benchmark's routing replay does) around the target's
    passes of one generate() call, without wrapping the pair's objects. Every method is a no-op here;
    override the ones you need."""

    def before_decode(self, n_past: int, n_rows: int, kind: str) -> None:
        """The target is about to decode n_rows rows at positions n_past.. ("prefill" or "verify")."""

    def after_decode(self, n_rows: int, seconds: float) -> None:
        """That decode took `seconds` (llama_decode and copying its logits out)."""

    def on_routing(self, ids: np.ndarray) -> None:
        """A verify pass's routing, int32 [rows, layers, k] (-1: no MoE layer)."""

    def on_engine(self, phase: str, seconds: float) -> None:
        """Time the expert engine took "before" a verify (publish, in-pass policy) or "after" it (plan)."""


class TargetVerifier(ContextSide):
    """Target decodes with routing capture; forwards each pass to the engine and the trace."""

    def __init__(self, ctx: LlamaContext, routing: RoutingSource | None, engine=None):
        super().__init__(ctx)
        self.routing = routing
        self.engine = engine
        self.recorder: TraceRecorder | None = None
        self.observer: PassObserver | None = None
        self.routing_seconds = 0.0
        self._ids = None

    def _decode(self, tokens: list[int], logits: str, kind: str) -> np.ndarray:
        """One target decode, timed once for the observer and, for a verify pass, the engine."""
        obs = self.observer
        if obs is not None:
            obs.before_decode(self.ctx.n_past, len(tokens), kind)
        t = time.perf_counter()
        try:
            out = self.ctx.decode(tokens, logits)
        finally:
            dt = time.perf_counter() - t
            if obs is not None:
                obs.after_decode(len(tokens), dt)
        if kind == "verify" and self.engine is not None:
            self.engine.timed_pass(dt)
        return out

    def prefill(self, tokens: list[int]) -> None:
        if tokens:
            if self.engine is not None:
                self.engine.other_decode()
            self._decode(tokens, "last", "prefill")

    def verify(self, tokens: list[int]) -> np.ndarray:
        if self.engine is not None:
            t = time.perf_counter()
            self.engine.before_verify(len(tokens))
            if self.observer is not None:
                self.observer.on_engine("before", time.perf_counter() - t)
        if self.routing is not None:
            self.routing.begin()
        logits = self._decode(tokens, "all", "verify")
        if self.routing is not None:
            t = time.perf_counter()
            self._ids = self.routing.end(len(tokens))
            self.routing_seconds += time.perf_counter() - t
        return logits

    def observe(self, accepted_rows: int) -> np.ndarray | None:
        ids, self._ids = self._ids, None
        if ids is not None:
            if self.engine is not None:
                t = time.perf_counter()
                self.engine.after_verify(ids, accepted_rows)
                if self.observer is not None:
                    self.observer.on_engine("after", time.perf_counter() - t)
            if self.recorder is not None:
                self.recorder.add_pass(ids, accepted_rows)
            if self.observer is not None:
                self.observer.on_routing(ids)
        return ids


def _check_vocab(target: LlamaModel, draft: LlamaModel) -> None:
    if target.n_vocab != draft.n_vocab:
        raise InputError(f"draft vocabulary has {draft.n_vocab} tokens but the target's has {target.n_vocab}: "
                         "they must share one tokenizer")
    step = max(1, target.n_vocab // 97)
    for t in range(0, target.n_vocab, step):
        if target.token_bytes(t) != draft.token_bytes(t):
            raise InputError(f"draft and target vocabularies differ (token {t}: "
                             f"{target.token_bytes(t)!r} vs {draft.token_bytes(t)!r})")


def _describe(path: str | Path, role: str) -> gguf_layout.ModelLayout:
    try:
        return gguf_layout.describe(path)
    except gguf_layout.GGUFError as e:
        raise InputError(f"{role}: {e}") from None


class ModelPair:
    """A target with its optional draft, contexts and routing capture, ready to generate."""

    def __init__(self, target: str | Path, draft: str | Path | None = None, *, n_gpu_layers: int = 0,
                 experts_on_cpu: bool | None = None, n_ctx: int = 2048, n_threads: int | None = None,
                 routing: str = "auto", policy: str = "none", cache_slots: int | None = None,
                 budget: str | None = None, hw: str | None = None, calibration: str | Path | None = None,
                 draft_max: int = DEFAULT_DRAFT_MAX, slots_on_host: bool | None = None,
                 cpu_expert_layers: tuple[int, ...] | None = None, pinned_experts: bool | None = None,
                 inpass: "bool | InPass | None" = None, fit_cache: bool = False, pass_slots: int | None = None):
        """fit_cache: cache_slots is auto-fit's estimate; once the models and contexts are loaded the
        cache takes what the GPU really has free (autofit.slots_after_load). pass_slots: GPU slots a
        verify pass uploads misses into beyond the free cache slots, for that pass only (None: what a
        --budget or auto-fit's free memory leaves after whole slots per layer, at most PASS_SLOTS_MAX,
        for spac; 0: none)."""
        self.notices: list[str] = []                    # what changed of the request, said once (the CLI prints these)
        self.target_path, self.draft_path = str(target), (str(draft) if draft else None)
        self.layout = _describe(target, "target")
        if draft:
            _describe(draft, "draft")                   # a bad draft file fails here, in one line
        self.is_moe = bool(self.layout.moe_layers)
        if experts_on_cpu is None:
            experts_on_cpu = n_gpu_layers != 0
        wants_cache = policy != "none" or bool(cache_slots) or bool(budget)
        if n_threads is None and wants_cache:
            # the cache's copy worker needs a core: an oversubscribed OpenMP barrier stalls every decode
            n_threads = max(1, (os.cpu_count() or 2) - 1)
        if pinned_experts is None:                     # host experts feed GPU uploads: pin them (no mmap)
            pinned_experts = n_gpu_layers != 0
        self.target = LlamaModel(target, Placement(n_gpu_layers, experts_on_cpu and self.is_moe,
                                                   cpu_expert_layers=cpu_expert_layers,
                                                   pinned_experts=pinned_experts))
        self.draft = LlamaModel(draft, Placement(n_gpu_layers)) if draft else None
        if self.draft is not None:
            _check_vocab(self.target, self.draft)
        if routing not in ("auto", "native", "callback", "off"):
            raise InputError(f"routing must be auto, native, callback or off (got {routing!r})")
        if routing == "auto":
            routing = "native" if native.available() else "callback"
        if routing == "native" and not native.available():
            raise InputError("this llama.cpp build has no routing export (build ours: make setup)")
        self.routing: RoutingSource | None = None
        cb = None
        if self.is_moe and routing == "callback":
            r = EvalCallbackRouting(self.target.n_layer, self.layout.n_expert_used)
            self.routing, cb = r, r.callback
        self.target_ctx = LlamaContext(self.target, n_ctx=n_ctx, n_threads=n_threads, eval_callback=cb)
        if self.is_moe and routing == "native":
            self.routing = native.NativeRouting(self.target_ctx.ptr, self.target.n_layer, self.layout.n_expert_used)
        self.draft_ctx = LlamaContext(self.draft, n_ctx=n_ctx, n_threads=n_threads) if self.draft else None
        self.cache, self.engine, self.policy_name = None, None, policy
        self._profile = None                             # the hardware profile the engine prices with
        if wants_cache:
            on_host = slots_on_host if slots_on_host is not None else n_gpu_layers == 0
            fit_remainder = 0                           # GPU bytes auto-fit leaves after whole slots per layer
            if fit_cache and cache_slots and not on_host:
                cache_slots, fit_remainder = self._slots_from_free_memory(cache_slots)
            if cache_slots == 0:                        # no room after all: experts on the CPU, no cache
                self.policy_name = "none"
            else:
                self._start_engine(policy, cache_slots, budget, hw, calibration, draft_max, on_host, inpass,
                                   pass_slots, fit_remainder)
        self.verifier = TargetVerifier(self.target_ctx, self.routing, self.engine)
        # one caller at a time: a generation owns both KV caches and the expert cache until it ends
        self._busy = threading.Lock()
        self._closed = False
        if self.target_ctx.n_ctx != n_ctx:
            self.notices.append(f"-c {n_ctx}: llama.cpp pads the context to {self.target_ctx.n_ctx} tokens "
                                f"and caps one decode at {self.target_ctx.n_batch} rows")
        # K per round; its cost and acceptance estimates outlive one generate() (same machine, same pair)
        self.draft_length = DraftLength() if self.draft is not None else None
        self.catch_up = CatchUp()                        # the draft's two-token catch-up, by measurement
        self.last_stats: Stats | None = None

    def _slots_from_free_memory(self, planned: int) -> tuple[int, int]:
        """(slots per layer, bytes left beyond them) for the GPU memory left after loading (the plan's
        estimate and nothing left where none is measured); the bytes left go to pass slots."""
        from .autofit import device_memory, room_after_slots, slots_after_load
        mem = device_memory()
        if mem is None or mem.pretend:                  # no GPU, or a pretended one: the plan
            return planned, 0
        lay = self.layout
        slots = slots_after_load(mem.free, lay.bytes_per_expert, len(lay.moe_layers), lay.n_expert)
        if slots < 1:
            self.notices.append(f"auto-fit: {mem.free / 2**30:.2f} GiB free after loading: no room for an expert "
                                "cache, the CPU computes the experts")
            return 0, 0
        if slots != planned:
            self.notices.append(f"auto-fit: {mem.free / 2**30:.2f} GiB free after loading: {slots} slots per layer "
                                f"({slots / lay.n_expert:.0%}), the plan said {planned}")
        return slots, room_after_slots(mem.free, lay.bytes_per_expert, len(lay.moe_layers), slots)

    def _cache_too_big(self, cache_slots: int) -> str:
        """The one line for a cache the GPU could not allocate (without pass slots, already dropped):
        its size against the free memory."""
        from .autofit import device_memory
        lay = self.layout
        need = (cache_slots + 1) * lay.bytes_per_expert * len(lay.moe_layers)   # + the all-zero slot
        mem = device_memory()
        free = f" of the {mem.free / 2**30:.2f} GiB the GPU has free now" if mem else ""
        return (f"expert cache: {cache_slots} slots per layer need {need / 2**30:.2f} GiB, more than the GPU could "
                f"allocate{free}; lower --budget or --cache-slots, or leave both out (auto-fit sizes the cache)")

    def _start_engine(self, policy: str, cache_slots, budget, hw, calibration, draft_max: int, on_host: bool,
                      inpass: "bool | InPass | None", pass_slots: int | None = None, fit_remainder: int = 0):
        """Expert cache + policy + asynchronous engine on the target context."""
        from .balancer import InfeasibleBudget, inpass_share, slots_for_budget
        from .cache import ExpertCache
        from .engine import Engine
        from .host_rate import HostRate
        from .hardware import load_profile
        from .policies import NAMES, make_policy
        from .sizes import parse_size
        if not self.is_moe:
            raise InputError("the target is dense: there are no experts to cache")
        if self.routing is None:
            raise InputError("a cache policy needs routing capture")
        if policy not in NAMES or policy == "oracle":
            raise InputError(f"unknown policy {policy!r} for run (use none, static, lru, lfu or spac)")
        lay = self.layout
        remainder = fit_remainder                        # what a budget or auto-fit leaves after whole slots per layer
        if cache_slots is None:
            if budget is None:
                raise InputError("a cache needs --cache-slots N or --budget SIZE")
            try:
                nbytes = parse_size(budget, total=lay.expert_bytes)
                cache_slots = slots_for_budget(nbytes, lay.bytes_per_expert, len(lay.moe_layers), lay.n_expert)
            except InfeasibleBudget as e:
                raise InputError(str(e)) from None
            remainder = nbytes - cache_slots * len(lay.moe_layers) * lay.bytes_per_expert
        if not 1 <= cache_slots <= lay.n_expert:
            raise InputError(f"--cache-slots must be in 1..{lay.n_expert} (got {cache_slots})")
        if pass_slots is not None and pass_slots < 0:
            raise InputError(f"pass slots must be >= 0 (got {pass_slots})")
        pass_slots = pass_slots_for(policy, on_host, cache_slots, lay.n_expert, lay.bytes_per_expert, remainder,
                                    pass_slots)
        try:
            profile = load_profile(hw or "desktop-pcie4x16")
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise InputError(f"hardware profile: {e}") from None
        calib = RoutingTrace.load(calibration) if calibration else None
        if policy == "static" and calib is None:
            raise InputError("--policy static needs --calibration TRACE (record one with --trace)")
        try:
            try:
                with errors_worded_by_caller():             # ggml's out-of-memory lines: ours says it in one
                    self.cache = ExpertCache(self.target_ctx.ptr, cache_slots, on_host=on_host, pass_slots=pass_slots)
            except native.NativeError as e:
                if e.code != native.ERR_ALLOC or not pass_slots:
                    raise
                # the pool is an extra: without it the cache still works (misses beyond the slots on the CPU)
                with errors_worded_by_caller():
                    self.cache = ExpertCache(self.target_ctx.ptr, cache_slots, on_host=on_host)
                self.notices.append(f"expert cache: no room for {pass_slots} pass slots beside the cache; "
                                    "running without them")
        except native.NativeError as e:
            if e.code == native.ERR_ALLOC and not on_host:   # the GPU is short of memory
                raise InputError(self._cache_too_big(cache_slots)) from None
            raise InputError(f"expert cache: {e}") from None
        pol = make_policy(policy, self.cache.n_layers, self.cache.n_expert, self.cache.expert_bytes,
                          hw=profile, calibration=calib)
        # in-pass loads: misses copied into GPU slots during the pass. lru: every miss, evicting the least
        # recent (the upstream llama.cpp design, CPU share 0; plus greedy swaps of recent experts between
        # passes); spac: the balancer's split per pass (all misses when the pass's experts fit the slots,
        # else the share that makes upload and CPU finish together), evicting by the estimator's utility,
        # no MIP prefetch (it lowered the hit rate next to in-pass loads: InPass.prefetch). Slots in host
        # memory gain nothing from in-pass loads (off there; the MIP plans the cache then).
        if inpass is None:
            inpass = not on_host and policy in ("lru", "spac")
        if inpass and policy not in ("lru", "lfu", "spac"):
            raise InputError(f"--inpass needs a policy that ranks every expert (lru, lfu or spac), not {policy}")
        if inpass and not isinstance(inpass, InPass):
            inpass = InPass(share=None, prefetch=False) if policy == "spac" else InPass()
        ip = inpass or None
        c = self.cache
        # spac's split prices the CPU's part at the rate its split passes measure (the upstream design,
        # lru, keeps a fixed share and measures nothing)
        host_rate = HostRate(profile, c.expert_bytes) if ip is not None and ip.share is None else None
        def split(rows: int, miss_rate: float, prev: float | None = None, reuse: float = 0.0) -> float:
            return inpass_share(profile, c.expert_bytes, rows, c.k, c.n_expert, c.n_slots, miss_rate, prev, reuse=reuse,
                                pass_slots=c.n_pass_slots, cpu_scale=host_rate.scale if host_rate is not None else 1.0)
        self._profile = profile
        self.engine = Engine(c, pol, profile.link_bytes_during_draft(max(draft_max, 1)), inpass=ip,
                             plan_every=4 if ip is not None and policy == "spac" else 1, split=split,
                             host_rate=host_rate)

    @property
    def routing_info(self) -> dict | None:
        if not self.is_moe:
            return None
        return {"layers": len(self.layout.moe_layers), "experts": self.layout.n_expert,
                "used": self.layout.n_expert_used}

    def trace_meta(self, draft_max: int) -> dict:
        lay = self.layout
        return {"arch": lay.architecture, "n_expert": lay.n_expert, "k": lay.n_expert_used, "draft_max": draft_max,
                "n_layers": self.target.n_layer, "moe_layers": list(lay.moe_layers),
                "target": Path(self.target_path).name,
                "draft": Path(self.draft_path).name if self.draft_path else None,
                "expert_bytes": lay.bytes_per_expert, "dense_bytes": lay.dense_bytes}

    def tokenize(self, prompt: str) -> list[int]:
        self._check_open()
        return self.target.tokenize(prompt, add_special=True, parse_special=True)

    def generate(self, prompt: str | list[int], *, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, draft_max: int = DEFAULT_DRAFT_MAX, adaptive: bool = True,
                 recorder: TraceRecorder | None = None, stop_at_eog: bool = True, drafter: DrafterLike | None = None,
                 observer: PassObserver | None = None) -> Iterator[Token]:
        """Generate up to `max_tokens` after `prompt`, yielding one Token at a time.

        With a draft, K is chosen each round in 0..draft_max for speed (`adaptive`, draft_length.py);
        `adaptive=False` drafts draft_max every round. `drafter` replaces the draft model's own
        proposals (it decodes on `draft_ctx`; the benchmark's oracle draft is one); `observer` watches
        the target's passes (PassObserver)."""
        self._check_open()
        if max_tokens < 1:
            raise InputError("max_tokens (-n) must be >= 1")
        if draft_max < 0:
            raise InputError("draft_max (--draft-max) must be >= 0")
        rows = min(self.target_ctx.n_batch, self.draft_ctx.n_batch if self.draft_ctx else self.target_ctx.n_batch)
        if draft_max + 1 > rows:                        # a verify pass is one decode: it must fit n_batch
            note = f"--draft-max {draft_max}: a verify pass holds at most {rows} rows here; K capped at {rows - 1}"
            if note not in self.notices:
                self.notices.append(note)
            draft_max = rows - 1
        if not self._busy.acquire(blocking=False):
            raise BackendError("this ModelPair is already generating (another thread or an unfinished generator); "
                               "one generation at a time: finish or close it first")
        try:
            if self.engine is not None and self._profile is not None:
                # the call's K decides what the link may move while the draft runs (not the constructor's)
                self.engine.link_bytes = self._profile.link_bytes_during_draft(max(draft_max, 1))
            self.verifier.observer = observer
            yield from self._generate(prompt, max_tokens, temperature, top_p, seed, draft_max, adaptive, recorder,
                                      stop_at_eog, drafter)
        finally:
            self.verifier.observer = None
            self._busy.release()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("this ModelPair is closed")

    def _generate(self, prompt, max_tokens, temperature, top_p, seed, draft_max, adaptive, recorder, stop_at_eog,
                  custom_drafter):
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise InputError("the prompt tokenizes to nothing")
        if len(tokens) + 1 >= self.target_ctx.n_ctx:
            raise InputError(f"prompt has {len(tokens)} tokens; context is {self.target_ctx.n_ctx} (-c)")
        self.target_ctx.reset()
        drafter = None
        if self.draft_ctx is not None and draft_max > 0:
            self.draft_ctx.reset()
            drafter = custom_drafter if custom_drafter is not None else Drafter(self.draft_ctx, self.catch_up)
        self.verifier.recorder = recorder
        sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        eog = self.target.is_eog if stop_at_eog else (lambda t: False)
        try:
            for step in speculative_generate(self.verifier, drafter, tokens, max_tokens=max_tokens,
                                             draft_max=draft_max, sampler=sampler, is_eog=eog,
                                             draft_length=self.draft_length if adaptive else None):
                self.last_stats = step.stats
                text = "" if self.target.is_eog(step.token) else decoder.decode(self.target.token_bytes(step.token))
                yield Token(step.token, text, step.from_draft, step.stats, step.routing)
        finally:
            self.verifier.recorder = None

    def record_trace(self, prompt: str, **kw) -> tuple[list[int], RoutingTrace]:
        """Generate and return (tokens, routing trace) in the `--trace` format."""
        rec = TraceRecorder(self.trace_meta(kw.get("draft_max", DEFAULT_DRAFT_MAX)))
        toks = [t.token for t in self.generate(prompt, recorder=rec, **kw)]
        trace = rec.trace()
        trace.meta["prompt_tokens"] = len(self.tokenize(prompt)) if isinstance(prompt, str) else len(prompt)
        return toks, trace

    def cache_stats(self) -> dict | None:
        if self.engine is None:
            return None
        st = self.engine.stats()
        return {"policy": self.policy_name, "slots_per_layer": self.cache.n_slots, "hits": st["hits"],
                "misses": st["misses"], "hit_rate": st.get("hit_rate"), "bytes_loaded": self.cache.bytes_loaded,
                "slot_bytes": self.cache.slot_bytes, "mean_solve_us": st.get("solve_us"),
                "fallbacks": st.get("fallbacks"), "inpass": self.engine.inpass is not None,
                "cpu_scale": st["host_rate"]["cpu_scale"] if "host_rate" in st else None,   # None: not measured
                **self.cache.counters()}

    def close(self) -> None:
        """Free both models and contexts. Idempotent; every later call raises BackendError. Refused
        while a generation is unfinished (another thread's, or a generator not exhausted or closed)."""
        if getattr(self, "_closed", True):
            return
        if not self._busy.acquire(blocking=False):
            raise BackendError("close() while a generation of this ModelPair is unfinished (another thread, or a "
                               "generator not exhausted or closed): finish or close it first")
        try:
            self._closed = True
            self.cache = self.engine = None
            for obj in (self.draft_ctx, self.target_ctx, self.draft, self.target):
                if obj is not None:
                    obj.close()
        finally:
            self._busy.release()


def pass_slots_for(policy: str, on_host: bool, cache_slots: int, n_expert: int, bytes_per_expert: int,
                   remainder: int, asked: int | None) -> int:
    """Pass slots for a cache: `asked` where given, else what a budget's remainder buys (at most
    PASS_SLOTS_MAX); none for host slots (nothing to upload), for a policy without the per-pass split
    (only spac splits a pass's misses) or when every expert has a slot (no pass misses one)."""
    if on_host or policy != "spac" or cache_slots >= n_expert:
        return 0
    if asked is not None:
        return int(asked)
    return int(min(max(remainder, 0) // bytes_per_expert, PASS_SLOTS_MAX))


def load(target: str | Path, draft: str | Path | None = None, **kw) -> ModelPair:
    """Load a target GGUF and an optional draft GGUF sharing its vocabulary."""
    for role, p in (("target", target), ("draft", draft)):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{role} model not found: {p}")
    return ModelPair(target, draft, **kw)
