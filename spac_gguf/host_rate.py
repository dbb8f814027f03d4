"""The CPU's expert rate, measured while decoding: the split's CPU side priced from the machine now.

The balancer splits a pass's misses where the CPU's part and the uploads finish together, so it
needs the CPU's time per expert. The hardware profile gives one, fitted once, but the same kind of H200 host
ran the same passes' CPU part 1.5x slower in session 15 than in session 14 (docs/BENCHMARKS.md; its
plain llama.cpp baseline 32 vs 45 tok/s), and the share fitted for the fast machine left the slow
one's K = 5 pass CPU-bound: 73.8 ms against 50.8.

Each steady split pass measures it. The host's own time in a pass is the pass less the plan stops
(where the host waits for the GPU) and the plans: X = pass - stop - plan, the CPU path of every split
layer (the host branch, the join's copies, the next segment launched). The split rule prices that
path as a fixed part per layer (`host_branch_s`, 0 on the H200) plus the experts the host computed
(the misses not uploaded) at the profile's cost C: their bytes streamed + a per-row cost. The
measured rate is

    scale = EMA(X - plans x host_branch_s) / EMA(C)

(each smoothed on its own, so passes with more CPU work weigh more). Over whole passes X per host
expert was 62 us on session 14's machine at K = 0 and at K = 5 alike (61.6 and 62.4, the profile
says 60: scale 1.03) and 89-97 us on session 15's (scale 1.5): a per-layer fixed part beyond the
profile's is lost in the noise there, so the scale carries it. The balancer multiplies the profile's
CPU cost by `scale`: 1 before any measurement, kept within [1/4, 4]. A measurement ages: after
`max_age` verify passes without a steady split pass (the balancer chose all-GPU passes, which measure
nothing) the rate returns to the profile's, so one slow spell cannot keep the split away for good.
"""
from __future__ import annotations

from .hardware import HardwareProfile


class HostRate:
    """Ratio of the CPU path's measured time per expert to the profile's, from split passes."""

    MIN_SCALE, MAX_SCALE = 0.25, 4.0

    def __init__(self, hw: HardwareProfile, expert_bytes: int, smoothing: float = 0.2, max_age: int = 256):
        self.hw, self.expert_bytes = hw, int(expert_bytes)
        self.smoothing = float(smoothing)
        self.max_age = int(max_age)
        self._measured = 0.0            # EMA of X - plans x host_branch_s, seconds per pass
        self._modelled = 0.0            # EMA of the profile's price of the same CPU work
        self.passes = 0                 # split passes in the current measurement
        self.age = 0                    # verify passes since the last one measured
        self.total_measured = self.total_modelled = 0.0     # sums over every pass measured (benchmarks)

    def modelled(self, experts: int, pairs: int) -> float:
        """The profile's seconds for the CPU computing `experts` experts over `pairs` (row, expert) pairs."""
        hw = self.hw
        return (experts * self.expert_bytes / (hw.cpu_expert_gbps * 1e9)
                + pairs * hw.cpu_s_per_expert_token * hw.row_scale(self.expert_bytes))

    def observe(self, pass_s: float, stop_s: float, plan_s: float, plans: int, experts: int, pairs: int) -> None:
        """One pass: its wall time, the time its plan stops and plans took, how many plans it ran, and
        the experts and (row, expert) pairs its host branches computed. A pass without a plan or CPU
        work, or one whose parts do not add up (a counter that went back), teaches nothing."""
        host = pass_s - stop_s - plan_s - plans * (self.hw.host_branch_s or 0.0)
        if experts <= 0 or pairs <= 0 or plans <= 0 or pass_s <= 0 or stop_s < 0 or plan_s < 0 or host <= 0:
            self.skipped()
            return
        model = self.modelled(experts, max(pairs, experts))
        if self.passes == 0:
            self._measured, self._modelled = host, model
        else:
            a = self.smoothing
            self._measured += a * (host - self._measured)
            self._modelled += a * (model - self._modelled)
        self.passes += 1
        self.age = 0
        self.total_measured += host
        self.total_modelled += model

    def skipped(self) -> None:
        """A verify pass that measured nothing; after max_age of them the profile's rate is back."""
        self.age += 1
        if self.age >= self.max_age:
            self.passes = 0

    @property
    def measured(self) -> bool:
        return self.passes > 0 and self._modelled > 0

    @property
    def scale(self) -> float:
        """Factor on the profile's CPU cost per expert (1 while nothing is measured)."""
        if not self.measured:
            return 1.0
        return min(max(self._measured / self._modelled, self.MIN_SCALE), self.MAX_SCALE)

    def stats(self) -> dict:
        return {"cpu_scale": self.scale if self.measured else None, "passes": self.passes,
                "host_s_per_pass": self._measured if self.measured else None,
                "cpu_s_per_expert": self.scale * self.modelled(1, 1)}
