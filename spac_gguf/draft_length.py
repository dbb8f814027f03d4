"""How many tokens to draft this round: K chosen online to maximise expected tokens per second.

A fixed K wastes time both ways: when the draft is often wrong, later drafts are rarely examined
and each still costs a draft decode and a verify row; when verify rows are expensive (an MoE
target whose extra rows route to experts streamed from the CPU), one more row can cost more than
the token it is expected to add. K = 0 is plain decoding, and sometimes the fastest.

Per round, with alpha_i the probability that draft i is accepted given drafts 0..i-1 were,
t_d(K) = c_0 + c_1 K the draft time of a round of K proposals and t_v(rows) the verify pass time:

    E[tokens](K) = 1 + sum_{j=1..K} prod_{i<j} alpha_i        (accepted drafts + the target's token)
    T(K)         = t_d(K) + t_v(K + 1)                         (K = 0: t_v(1), no draft)
    K*           = argmax_{0 <= K <= limit} E[tokens](K) / T(K)

Everything on the right is measured by the loop itself (its draft and verify timers, and how many
drafts each pass accepted), so the choice follows the machine, the cache's state and the text.
Acceptance and draft times are running means that turn into exponential averages once warm, verify
times the median of the last five passes per row count, so they track drift (a warming expert cache
makes verify rows cheaper) without following one cold pass, and start from priors that speculate.
What the loop stops measuring also ages: a row count not measured for `stale_after` rounds that a
fresh one contradicts is interpolated instead of read (and its old samples go when a new one falls
outside their range), and a later draft position's acceptance loses half its weight every
`stale_after / 2` drafting rounds that do not offer it (K below it), so a workload change (the text,
the cache's state) re-opens the K it had ruled out.
Exploration (`explore`): without it, a K that once looked bad (K = 0 above all, which observes no
acceptance at all; a K measured once while the machine was busy or the cache cold; a draft position
rejected early and never examined again) would never be re-measured. "sample" (Thompson
sampling, opt-in) picks each round's K from one draw of what the loop knows: each position's
acceptance from a Beta around its estimate with the estimate's (aged) weight, each row count's
verify time from a lognormal around its median whose spread `time_noise` shrinks with the samples
behind it and grows again as they age. Uncertain choices get tried in proportion to the chance that
they are best, and settle as their samples come in; on synthetic rounds with the H200's measured
costs (45-round cells, as in the benchmark; acceptance 0.3-0.9) its rounds 15-45 made 0.91-0.97 of
the best rate on average where the probes below made 0.85-0.98 (lower at low acceptance, higher at
0.9), but over 150 rounds, after a workload change and with a useless cheap draft the probes did as
well or better (docs/BENCHMARKS.md, session 7), so the default stays "probe": now and then a round
probes K*+1, K*-1, the largest allowed K or plain decoding, in turn (skipping K* itself). Both keep
the second round plain: verify time is far from linear in rows when extra rows route to
experts that must be streamed (one row touches k experts, six rows up to 6k), so the one-row cost
cannot be read off a line through the drafting rounds (seen on the H200: 15 ms for one row against
50 ms for six, where the line said 37). With "probe", probes are at least `explore_every` rounds apart, and
further when they are dear: a probe expected to take x times a K* round, at a rate r against K*'s
r*, waits max(x - 1, x (1 - r / r*)) / explore_share rounds, so probing costs about
`explore_share` of the time at most (a probe to K = 8 with a draft as slow as the target is rare).

`DraftLength(adaptive=False)` is today's fixed K: min(draft_max, tokens still wanted, context room).
"""
from __future__ import annotations

import math
import random
import statistics
from collections import deque


class _Mean:
    """Running mean with `prior` worth `n0` observations, exponential (weight >= floor) once warm."""

    def __init__(self, prior: float = 0.0, n0: float = 0.0, floor: float = 0.05):
        self.value, self.n, self.n0, self.floor = prior, 0, n0, floor

    def add(self, x: float) -> None:
        self.n += 1
        w = max(1.0 / (self.n + self.n0), self.floor)
        self.value += w * (x - self.value)


def _weight(m: _Mean) -> float:
    """How many observations a mean stands for: an exponential one ~1/floor recent ones."""
    return min(m.n, 1.0 / m.floor) if m.floor > 0 else m.n


def _fit(pts: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(intercept, slope >= 0) of the weighted least-squares line through (x, y, weight) points
    with at least two distinct x."""
    sw = sum(w for _, _, w in pts)
    mx = sum(w * x for x, _, w in pts) / sw
    my = sum(w * y for _, y, w in pts) / sw
    slope = sum(w * (x - mx) * (y - my) for x, y, w in pts) / sum(w * (x - mx) ** 2 for x, _, w in pts)
    slope = max(slope, 0.0)
    return my - slope * mx, slope


class _Recent:
    """Median of the last `size` samples (n counts all): from three samples on, one cold pass among
    warm ones (the first round after a prompt, while the expert cache fills) does not move it (with
    two it is their mean), and drift moves it in a few. `last`: the round of the latest sample; a
    sample after more than `expire` rounds without one that falls outside the old samples' range (by
    more than `slack`) starts afresh: the old ones describe another state of the machine. (Inside it,
    they stay: a row count measured only by probes, which come back less often than `expire`, keeps
    the median's protection against one cold pass.)"""

    def __init__(self, size: int = 5):
        self.samples: deque[float] = deque(maxlen=size)
        self.n = 0
        self.last = 0

    def add(self, x: float, now: int = 0, expire: float = math.inf, slack: float = 0.15) -> None:
        if self.samples and now - self.last > expire and not (
                (1.0 - slack) * min(self.samples) <= x <= (1.0 + slack) * max(self.samples)):
            self.samples.clear()
        self.samples.append(x)
        self.n += 1
        self.last = now

    @property
    def value(self) -> float:
        return statistics.median(self.samples)


class DraftLength:
    """Chooses K each round (`choose`) and learns from the round's outcome (`observe`)."""

    def __init__(self, adaptive: bool = True, *, prior_alpha: float = 0.7, prior_strength: float = 2.0,
                 neighbour_strength: float = 6.0,
                 alpha_floor: float = 0.03, time_floor: float = 0.1, prior_row_cost: float = 0.1,
                 explore_every: int = 16, explore_share: float = 0.05, trust_n: int = 3, optimism: float = 0.5,
                 stale_after: int = 32, explore: str = "probe", time_noise: float = 0.15, seed: int | None = 0):
        if explore not in ("sample", "probe"):
            raise ValueError(f"explore must be 'sample' or 'probe', not {explore!r}")
        self.explore = explore
        self.time_noise = time_noise             # relative spread of one verify sample (sample mode)
        self._rng = random.Random(seed)
        self.adaptive = adaptive
        self.prior_alpha, self.prior_strength, self.alpha_floor = prior_alpha, prior_strength, alpha_floor
        self.neighbour_strength = neighbour_strength   # how many rounds position i-1's rate is worth to i
        self.time_floor = time_floor
        self.prior_row_cost = prior_row_cost     # extra verify row / one-row pass, until two row counts are seen
        self.explore_every, self.explore_share = explore_every, explore_share
        self.trust_n = trust_n                   # samples before a row count's own time is believed (_values)
        self.optimism = optimism                 # standard errors added to position 0's acceptance (alpha)
        if stale_after < 1:
            raise ValueError(f"stale_after must be >= 1, not {stale_after}")
        self.stale_after = stale_after           # rounds after which what was not re-measured ages
        self._t = 0                              # rounds observed
        self._drafting = 0                       # rounds observed with K > 0
        self._drafted_at = 0                     # the round (of _t) that drafted last
        self._offered: list[int] = []            # per draft position i: _drafting when K > i last
        self._alpha: list[_Mean] = []            # per draft position
        self._verify: dict[int, _Recent] = {}    # per row count
        self._draft: dict[int, _Mean] = {}       # seconds of a round's drafting, per K > 0
        self._rounds = 0                         # rounds that could draft (limit > 0)
        self._probes, self._next_probe = -1, explore_every
        self.probing = False                     # whether the last choice was a probe
        self.counts: dict[int, int] = {}         # chosen K -> rounds, over this object's life

    # ---- the two calls the loop makes ----

    def choose(self, limit: int) -> int:
        """K in [0, limit] for the next round (limit = draft_max capped by tokens and context left)."""
        self.probing = False
        if not self.adaptive or limit <= 0:
            return max(limit, 0)
        self._rounds += 1
        if not self._verify or not self._draft:
            return limit                         # nothing measured yet: speculate fully, to measure
        if 1 not in self._verify and (self.explore == "sample" or self.explore_every):
            self.probing = True                  # then measure plain decoding once (see the docstring)
            return 0
        rates = self.rates(limit)
        best = rates.index(max(rates))
        if self.explore == "sample":
            drawn = self.sampled_rates(limit)
            k = drawn.index(max(drawn))
            self.probing = k != best             # a round the estimates alone would not have chosen
            return k
        if self.explore_every and self._rounds >= self._next_probe:
            cycle = (min(best + 1, limit), max(best - 1, 0), limit, 0)
            for _ in cycle:                      # the next candidate in turn that is not K* itself
                self._probes += 1
                k = cycle[self._probes % len(cycle)]
                if k != best:
                    break
            wait = self.explore_every
            if k != best:
                times = self.round_times(limit)
                x = times[k] / times[best]       # a probe round's time / a K* round's
                loss = max(x - 1.0, x * (1.0 - rates[k] / rates[best]))
                wait = max(wait, math.ceil(loss / self.explore_share))
                self.probing = True
            self._next_probe = self._rounds + wait
            return k
        return best

    def observe(self, K: int, accepted: int, t_draft: float, t_verify: float) -> None:
        """One round's outcome: K drafts proposed, `accepted` of them kept, its draft and verify seconds."""
        self.counts[K] = self.counts.get(K, 0) + 1
        self._t += 1
        if K > 0:
            self._drafting += 1
            self._drafted_at = self._t
            self._offered[:K] = [self._drafting] * K     # (grows the list when K is a new maximum)
        for i in range(min(accepted + 1, K)):    # position i is examined only if 0..i-1 were accepted
            while len(self._alpha) <= i:
                self._alpha.append(_Mean(floor=self.alpha_floor))
            self._alpha[i].add(1.0 if i < accepted else 0.0)
        if K > 0:
            self._draft.setdefault(K, _Mean(floor=self.time_floor)).add(t_draft)
        self._verify.setdefault(K + 1, _Recent()).add(t_verify, self._t, self.stale_after)

    # ---- the model ----

    def alpha(self, n: int, optimistic: bool = False) -> list[float]:
        """Estimated acceptance of positions 0..n-1: position 0's rate shrunk toward the prior (weight
        `prior_strength`), each later one's toward the estimate of the position before it (weight
        `neighbour_strength`). A position rarely examined (K chosen below it) thus reads like its
        neighbour, not like a fixed prior or its few samples: at acceptance 0.9 a prior of 0.7 for
        positions 3 and 4 kept K at 3 where 5 was best, and one early rejection at position 1 kept K
        at 1 (the position is examined again only when K > 1).

        `optimistic` (for choosing K): position 0 also gets `optimism` standard errors of its estimate.
        Plain decoding observes no acceptance, so two early rejections of a good draft could keep K at 0
        for good; the bonus shrinks as drafting rounds come in (docs/BENCHMARKS.md has its effect)."""
        out, prev, strength = [], self.prior_alpha, self.prior_strength
        for i in range(n):
            m = self._alpha[i] if i < len(self._alpha) else None
            if m is not None and m.n:
                w = self._aged_weight(i)
                prev = (w * m.value + strength * prev) / (w + strength)
            out.append(prev)
            strength = self.neighbour_strength
        if optimistic and out:
            w = self._aged_weight(0) if self._alpha else 0.0
            p = out[0]
            out[0] = max(p, min(0.99, p + self.optimism * math.sqrt(p * (1.0 - p) / (w + self.prior_strength))))
        return out

    def _aged_weight(self, i: int) -> float:
        """Position i's observations, halved for every stale_after / 2 drafting rounds that did not offer
        it (K chosen below i+1); rounds that offered it and stopped earlier (a rejection before it) do
        not age it. Position 0 ages over plain rounds (K = 0) when sampling; with probes it does not
        (they re-examine it), and without either a phase of low acceptance kept K = 0 for good.
        Sampling halves every stale_after / 4 rounds: it explores only as far as the estimates are
        uncertain, so their uncertainty has to come back soon enough for a workload change (synthetic
        acceptance 0.5 -> 0.95 after 60 rounds: rounds 100-200 at 0.63-0.99 of the best rate with
        stale_after / 2, 0.91-0.99 with / 4; stationary cells within 0.01)."""
        if i == 0:
            age = self._t - self._drafted_at if self.explore == "sample" and self._drafting else 0
        else:
            age = self._drafting - self._offered[i] if i < len(self._offered) else 0
        halvings = (4.0 if self.explore == "sample" else 2.0) * age / self.stale_after
        return _weight(self._alpha[i]) * 0.5 ** halvings

    def verify_time(self, rows: int) -> float:
        return self.verify_times(rows)[rows - 1]

    def _line(self, pts: list[tuple[int, float]]) -> tuple[float, float]:
        """(intercept, slope >= 0) of t_v against rows: least squares through the points, or through
        one point with the prior's relative cost per extra row."""
        if len(pts) == 1:
            r0, t0 = pts[0]
            t1 = t0 / (1.0 + self.prior_row_cost * (r0 - 1))
            return t1 * (1.0 - self.prior_row_cost), t1 * self.prior_row_cost
        return _fit([(r, t, 1.0) for r, t in pts])

    def _values(self) -> list[tuple[int, float]]:
        """The seen (rows, t_v), where a row count above every well-measured one (so seen fewer than
        `trust_n` times) costs at most what the line through the row counts up to the best-measured
        largest one says (not through other such thin ones, which may be as cold). Seen on the H200:
        the first round speculates fully while the expert cache is cold, and that one six-row sample
        kept K = 5 out for the whole run. A long K that looks best by the line is chosen, measured
        again, and trusted (or not) after `trust_n` samples."""
        raw = sorted((r, m.value) for r, m in self._verify.items())
        trusted = [r for r, m in self._verify.items() if len(m.samples) >= self.trust_n]
        if not trusted or len(raw) < 2:
            return raw
        top = max(trusted)
        a, b = self._line([(q, v) for q, v in raw if q <= top])
        return [(r, min(t, a + b * r) if r > top else t) for r, t in raw]

    def _monotone_points(self) -> list[tuple[int, float]]:
        """The seen (rows, t_v) (see _values) made non-decreasing in rows by pooling adjacent
        violators, each weighted by its observations: a pass with more rows never costs less with the
        same cache. Measurements are taken at different times (K = 0 measured while the expert cache
        was cold and rarely after) and otherwise make a cheap row count look dear for good. A row count
        not measured for `stale_after` rounds that a fresh one contradicts (fewer rows dearer, or more
        rows cheaper) is left out instead, to be interpolated: it describes an older machine state."""
        blocks: list[list[float]] = []           # [weighted sum, weight, first rows index]
        pts = self._values()
        fresh = {r: v for r, v in pts if self._t - self._verify[r].last <= self.stale_after}
        pts = [(r, v) for r, v in pts if r in fresh or not any(
            (q > r and u < v) or (q < r and u > v) for q, u in fresh.items())]
        for i, (r, v) in enumerate(pts):
            w = float(len(self._verify[r].samples))   # the samples the median stands for
            blocks.append([v * w, w, i])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                s, w, _ = blocks.pop()
                blocks[-1][0] += s
                blocks[-1][1] += w
        out, ends = [], [b[2] for b in blocks[1:]] + [len(pts)]
        for b, end in zip(blocks, ends):
            out += [(pts[j][0], b[0] / b[1]) for j in range(b[2], end)]
        return out

    def verify_times(self, max_rows: int) -> list[float]:
        """t_v(1..max_rows): measured where seen (pooled to be monotone in rows); else a line through
        the seen row counts (slope >= 0), clamped between the nearest seen neighbours.
        Plain Python: a handful of points, and this runs every round."""
        pts = self._monotone_points() or [(1, 1.0)]   # (unmeasured: relative)
        line = self._line(pts)                   # one anchor: the prior's relative cost per row
        seen = dict(pts)
        out = []
        for rows in range(1, max_rows + 1):
            if rows in seen:
                out.append(seen[rows])
                continue
            t = line[0] + line[1] * rows
            lo = max((v for r, v in pts if r < rows), default=-math.inf)
            hi = min((v for r, v in pts if r > rows), default=math.inf)
            out.append(min(max(t, lo), hi) if lo <= hi else t)
        return out

    def draft_line(self) -> tuple[float, float]:
        """(c_0, c_1 >= 0): a round of K proposals drafts for c_0 + c_1 K seconds, weighted least squares
        over the K seen. Not K x a per-token mean: a round's first draft decode also catches the draft
        up on the tokens it has not seen, right after the target's pass (inferred on the H200 from the
        totals of K = 2 and K = 5 rounds: ~6 ms against ~1 ms for the next ones), so a mean per token
        measured at K = 2 made K = 5 look 1.7x dearer than it is and kept long drafts out. One K seen:
        proportional (c_0 = 0)."""
        pts = [(K, m.value, _weight(m)) for K, m in sorted(self._draft.items())]
        if not pts:
            return 0.0, 0.0
        if len(pts) > 1:
            c0, c1 = _fit(pts)
            if c0 >= 0.0:
                return c0, c1
        # one K, or a line below the origin: through the origin
        return 0.0, sum(w * k * t for k, t, w in pts) / sum(w * k * k for k, _, w in pts)

    def round_times(self, limit: int) -> list[float]:
        """Expected seconds of a round with K drafts, K = 0..limit: t_d(K) + t_v(K + 1)."""
        tv = self.verify_times(limit + 1)
        c0, c1 = self.draft_line()
        return [max((c0 + c1 * K if K else 0.0) + tv[K], 1e-9) for K in range(limit + 1)]

    def rates(self, limit: int) -> list[float]:
        """Expected tokens per second of a round with K drafts, K = 0..limit."""
        e_tokens, reach = [1.0], 1.0
        for a in self.alpha(limit, optimistic=True):
            reach *= a
            e_tokens.append(e_tokens[-1] + reach)
        return [e / t for e, t in zip(e_tokens, self.round_times(limit))]

    def sampled_rates(self, limit: int) -> list[float]:
        """Tokens per second of K = 0..limit under one draw from what the loop knows (Thompson
        sampling): position i's acceptance ~ Beta(m w, (1 - m) w), m its estimate (shrunk as in
        `alpha`), w its aged weight plus the prior's or neighbour's strength; a row count's verify
        time ~ its median x exp(N(0, time_noise^2 / (n + 1/2))), n all its samples halved for every
        `stale_after` rounds since the last (unmeasured row counts: n = 0 around the interpolation)."""
        means = self.alpha(limit)
        acc = []
        for i, m in enumerate(means):
            w = self.prior_strength if i == 0 else self.neighbour_strength
            if i < len(self._alpha) and self._alpha[i].n:
                w += self._aged_weight(i)
            acc.append(self._rng.betavariate(max(m * w, 1e-3), max((1.0 - m) * w, 1e-3)))
        tv = self.verify_times(limit + 1)
        c0, c1 = self.draft_line()
        e, reach, out = 1.0, 1.0, []
        for K in range(limit + 1):
            r = self._verify.get(K + 1)
            n = r.n * 0.5 ** (max(self._t - r.last, 0) / self.stale_after) if r is not None else 0.0
            t = tv[K] * math.exp(self._rng.gauss(0.0, self.time_noise / math.sqrt(n + 0.5)))
            if K:
                reach *= acc[K - 1]
                e += reach
                t += c0 + c1 * K
            out.append(e / max(t, 1e-9))
        return out

    def best(self, limit: int) -> int:
        """argmax_K rate(K) over 0..limit; ties go to the smaller K (less work for the same speed)."""
        r = self.rates(limit)
        return r.index(max(r))

    def summary(self) -> dict:
        """For reports: the K histogram and the current estimates."""
        return {"adaptive": self.adaptive, "explore": self.explore, "k_histogram": dict(sorted(self.counts.items())),
                "alpha": [round(a, 4) for a in self.alpha(len(self._alpha))],
                "draft_s_round_and_per_token": self.draft_line() if self._draft else None,
                "verify_s_by_rows": {r: self._verify[r].value for r in sorted(self._verify)}}
