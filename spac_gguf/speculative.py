"""The speculative decoding loop: draft proposes K tokens, the target verifies K+1 rows at once.

One round (the algorithm, with the names of Leviathan et al. / gpt-fast):
  1. the draft catches up on the verified tokens it has not seen and proposes d_0..d_{K-1}
     (greedy: argmax; sampling: d_i ~ q_i);
  2. the target decodes [x_last, d_0, .., d_{K-1}] in ONE batch: p_0..p_K;
  3. accept d_i while it matches (greedy: d_i == argmax p_i; sampling: r < p_i(d_i)/q_i(d_i));
     at the first rejection emit argmax p_i (greedy) or a draw from norm(max(p_i - q_i, 0));
     with all K accepted, emit a bonus token from p_K;
  4. both KV caches forget the rejected positions.
K = 0 (or no draft) is plain decoding: one row per target pass. K is draft_max (capped by the tokens
and context left) unless a `DraftLength` controller picks it per round (draft_length.py).
The target's routing of the K+1 rows (step 2) goes to the engine and the trace after step 3.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from .draft_length import DraftLength
from .sampling import Sampler


class KVContext(Protocol):
    """What the loop needs of a model context (llama_backend.LlamaContext is one)."""
    n_ctx: int
    n_past: int

    def decode(self, tokens: list[int], logits: str = "last") -> np.ndarray: ...
    def rollback(self, n_past: int) -> None: ...


class Verifier(Protocol):
    """The target side of a round. It owns its KV cache: the loop never touches a backend."""
    n_ctx: int

    def prefill(self, tokens: list[int]) -> None:
        """Put `tokens` into the KV cache (the prompt but its last token)."""

    def verify(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), n_vocab] for every row."""

    def keep(self, n_valid: int) -> None:
        """Forget every position >= n_valid (the rejected rows)."""

    def observe(self, accepted_rows: int) -> np.ndarray | None:
        """Called after acceptance; returns the pass's routing [rows, layers, k] or None."""


class DrafterLike(Protocol):
    n_ctx: int

    def prefill(self, tokens: list[int]) -> None: ...
    def propose(self, tokens: list[int], K: int, sampler: Sampler) -> tuple[list[int], list[np.ndarray]]: ...
    def keep(self, n_valid: int) -> None: ...


@dataclass
class Stats:
    """Running numbers, attached to every yielded token (a UI can show them live)."""
    n_prompt: int = 0
    n_generated: int = 0
    n_target_passes: int = 0
    n_drafted: int = 0
    n_draft_accepted: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_prefill: float = 0.0
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_last: float = 0.0
    k_counts: dict[int, int] = field(default_factory=dict)   # K drafted -> rounds
    stop_reason: str = ""       # "max_tokens", "eog" or "context" (the context is full), once generation ends

    @property
    def acceptance_rate(self) -> float | None:
        return self.n_draft_accepted / self.n_drafted if self.n_drafted else None

    @property
    def tokens_per_second(self) -> float:
        """Generation speed after the prompt (prefill excluded)."""
        dt = self.t_last - (self.t_start + self.t_prefill)
        return self.n_generated / dt if dt > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "n_prompt": self.n_prompt, "n_generated": self.n_generated,
            "n_target_passes": self.n_target_passes, "n_drafted": self.n_drafted,
            "n_draft_accepted": self.n_draft_accepted, "acceptance_rate": self.acceptance_rate,
            "tokens_per_second": self.tokens_per_second,
            "k_histogram": dict(sorted(self.k_counts.items())), "stop_reason": self.stop_reason,
            "time": {"prefill_s": self.t_prefill, "draft_s": self.t_draft, "verify_s": self.t_verify,
                     "total_s": self.t_last - self.t_start},
        }


@dataclass
class Step:
    token: int
    from_draft: bool
    stats: Stats
    routing: np.ndarray | None = None    # the target pass that produced this token


class ContextSide:
    """A side of the round over a KVContext: its context size, prefill and rollback."""

    def __init__(self, ctx: KVContext):
        self.ctx = ctx

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def prefill(self, tokens: list[int]) -> None:
        if tokens:
            self.ctx.decode(tokens, "last")

    def keep(self, n_valid: int) -> None:
        self.ctx.rollback(min(self.ctx.n_past, n_valid))


class CatchUp:
    """How the draft decodes two tokens it has not seen (a round that accepted every draft leaves the
    last draft and the bonus token): one two-row decode, or two one-row decodes, whichever measures
    faster here. On the H200 a GPU draft's two-row decode took 5.5 ms and two one-row decodes 4.4
    (llama.cpp replays a CUDA graph for a graph shape it has seen run twice in a row, and one-row
    decodes keep the shape); a CPU draft reads its weights once for both rows. Each way is timed
    `tries` times, alternately, then the cheaper is used, the other re-timed every `recheck` uses.
    `mode` "batch" or "split" fixes it. Lives on the pair: it outlives one generation."""

    def __init__(self, mode: str = "auto", tries: int = 3, recheck: int = 32):
        if mode not in ("auto", "batch", "split"):
            raise ValueError(f"catch-up mode {mode!r}: auto, batch or split")
        self.mode, self.tries, self.recheck = mode, tries, recheck
        self.seconds = {False: [0, 0.0], True: [0, 0.0]}   # split? -> [count, mean seconds]
        self.uses = 0

    def split(self) -> bool:
        """Whether the next two-token catch-up decodes one row at a time."""
        if self.mode != "auto":
            return self.mode == "split"
        (nb, tb), (ns, ts) = self.seconds[False], self.seconds[True]
        if min(nb, ns) < self.tries:
            return ns < nb
        self.uses += 1
        cheaper = ts < tb
        return (not cheaper) if self.uses % self.recheck == 0 else cheaper

    def timed(self, split: bool, seconds: float) -> None:
        c = self.seconds[split]
        c[0] += 1
        c[1] += (seconds - c[1]) / min(c[0], 8)          # a mean, then an exponential one (drift)


class Drafter(ContextSide):
    """The draft model's side: keeps its KV equal to a prefix of the verified tokens."""

    def __init__(self, ctx: KVContext, catch_up: CatchUp | None = None):
        super().__init__(ctx)
        self.catch_up = catch_up if catch_up is not None else CatchUp()
        self.backlog_s = 0.0     # of the last propose: catching up on rounds that did not draft
        self._left = 1           # unseen tokens the last drafting round left (1, or 2 if all accepted)
        self._proposed = False

    def keep(self, n_valid: int) -> None:
        super().keep(n_valid)
        if self._proposed:      # a drafting round: the target's token follows the n_valid kept ones
            self._left = n_valid + 1 - self.ctx.n_past
            self._proposed = False

    def _decode(self, toks: list[int], when: str) -> np.ndarray:
        """One draft decode; `when`: "backlog", "catchup", "first" or "next" in the round (the bench
        times them)."""
        return self.ctx.decode(toks, "last")[0]

    def _first(self, pending: list[int]) -> np.ndarray:
        """The round's first decode: the tokens the draft has not seen, last row's logits. Those beyond
        what the last drafting round left are a backlog of rounds that did not draft (K = 0): decoded
        apart and timed as `backlog_s`, a cost of switching drafting back on, not of a drafting round
        (the H200 showed it: counted in, it priced a round's drafting at 8 ms where it takes 2-4, and K
        stayed at 0)."""
        self.backlog_s = 0.0
        self._proposed = True
        extra = len(pending) - self._left
        if extra > 0:
            t = time.perf_counter()
            self._decode(pending[:extra], "backlog")
            self.backlog_s = time.perf_counter() - t
            pending = pending[extra:]
        if len(pending) != 2:
            return self._decode(pending, "first")
        split = self.catch_up.split()
        t = time.perf_counter()
        if split:
            self._decode(pending[:1], "catchup")
            logits = self._decode(pending[1:], "first")
        else:
            logits = self._decode(pending, "first")
        self.catch_up.timed(split, time.perf_counter() - t)
        return logits

    def propose(self, tokens: list[int], K: int, sampler: Sampler) -> tuple[list[int], list[np.ndarray]]:
        """d_0..d_{K-1} after `tokens`, and q_i (only when sampling)."""
        drafts: list[int] = []
        qs: list[np.ndarray] = []
        pending = tokens[self.ctx.n_past:]
        for i in range(K):
            logits = self._first(pending) if i == 0 else self._decode(pending, "next")
            if sampler.greedy:
                d = int(np.argmax(logits))
            else:
                q = sampler.probs(logits)
                d = sampler.draw(q)
                qs.append(q)
            drafts.append(d)
            pending = [d]
        return drafts, qs


def accept(drafts: list[int], qs: list[np.ndarray], logits: np.ndarray, sampler: Sampler) -> list[int]:
    """Tokens emitted by one verify pass: the accepted drafts, then one target token."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        if sampler.greedy:
            t = int(np.argmax(logits[i]))
            if t != d:
                return out + [t]
        else:
            p = sampler.probs(logits[i])
            if not sampler.accept(p[d], qs[i][d]):
                return out + [sampler.residual(p, qs[i])]
        out.append(d)
    return out + [sampler.sample(logits[len(drafts)])]


def prefill(target: Verifier, drafter: DrafterLike | None, prompt: list[int]) -> None:
    """Put all prompt tokens but the last into both KV caches; the last one opens round 1."""
    if len(prompt) > 1:
        target.prefill(prompt[:-1])
        if drafter is not None:
            drafter.prefill(prompt[:-1])


def generate(target: Verifier, drafter: DrafterLike | None, prompt: list[int], *, max_tokens: int,
             draft_max: int, sampler: Sampler, is_eog=lambda t: False,
             draft_length: DraftLength | None = None) -> Iterator[Step]:
    """Speculative decoding; yields each emitted token with running stats.

    `draft_length` picks K per round within the bound; None keeps K fixed at `draft_max`."""
    if not prompt:
        raise ValueError("empty prompt")
    draft_length = draft_length or DraftLength(adaptive=False)
    stats = Stats(n_prompt=len(prompt))
    t0 = time.perf_counter()
    prefill(target, drafter, prompt)
    stats.t_prefill = time.perf_counter() - t0
    tokens = list(prompt)
    n_ctx = min(target.n_ctx, drafter.n_ctx) if drafter else target.n_ctx
    while stats.n_generated < max_tokens:
        room = n_ctx - len(tokens) - 1
        if room < 0:
            stats.stop_reason = "context"
            return
        K = draft_length.choose(min(draft_max, max_tokens - stats.n_generated - 1, room) if drafter else 0)
        t1 = time.perf_counter()
        drafts, qs = drafter.propose(tokens, K, sampler) if K > 0 else ([], [])
        t2 = time.perf_counter()
        logits = target.verify([tokens[-1]] + drafts)
        emitted = accept(drafts, qs, logits, sampler)
        a = len(emitted) - 1                          # accepted drafts
        L = len(tokens)
        target.keep(L + a)                            # keep x_last and d_0..d_{a-1}
        routing = target.observe(a + 1)
        if drafter is not None:
            drafter.keep(L + a)
        t3 = time.perf_counter()
        backlog = getattr(drafter, "backlog_s", 0.0) if K > 0 else 0.0
        draft_length.observe(K, a, t2 - t1 - backlog, t3 - t2)   # a drafting round's own cost
        stats.k_counts[K] = stats.k_counts.get(K, 0) + 1
        stats.t_draft += t2 - t1
        stats.t_verify += t3 - t2
        stats.n_target_passes += 1
        stats.n_drafted += len(drafts)
        stats.n_draft_accepted += a
        for i, tok in enumerate(emitted):
            tokens.append(tok)
            stats.n_generated += 1
            stats.t_last = time.perf_counter()
            if stats.t_first is None:
                stats.t_first = stats.t_last
            yield Step(token=tok, from_draft=i < a, stats=stats, routing=routing)
            eog = is_eog(tok)
            if eog or stats.n_generated >= max_tokens:
                stats.stop_reason = "eog" if eog else "max_tokens"
                return
