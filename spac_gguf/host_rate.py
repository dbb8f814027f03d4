"""The CPU's expert rate, measured while decoding: the split's CPU side priced from the machine now.

The balancer splits a pass's misses where the CPU's part and the uploads finish together, so it
needs the CPU's time per expert. The hardware profile gives one, fitted once, but the same H200 host
ran the same passes' CPU part 1.5x slower in session 15 than in session 14 (docs/BENCHMARKS.md; its
plain llama.cpp baseline 32 vs 45 tok/s), and the share fitted for the fast machine left the slow
one's K = 5 pass CPU-bound: 73.8 ms against 50.8.

Each split pass measures it. The host's own time in a pass is the pass less the plan stops (where the
host waits for the GPU) and the plans: X = pass - stop - plan, the CPU path of every split layer
(the host branch, the join's copies, the next segment launched). The profile prices the experts the
host computed (the misses not uploaded) as C: their bytes streamed + a per-row cost. The measured
rate is

    scale = EMA(X) / EMA(C)

(each smoothed on its own, so passes with more CPU work weigh more). Fitted over whole passes, X
per host expert was 62 us on session 14's machine at K = 0 and at K = 5 alike (61.6 and 62.4, the
profile says 60: scale 1.03) and 89-97 us on session 15's (scale 1.5): the per-layer fixed part is
lost in the noise, so the scale carries it. The balancer multiplies the profile's CPU cost by
`scale`: 1 before any measurement, kept within [1/4, 4].
"""
from __future__ import annotations

from .hardware import HardwareProfile


class HostRate:
    """Ratio of the CPU path's measured time per expert to the profile's, from split passes."""

    MIN_SCALE, MAX_SCALE = 0.25, 4.0

    def __init__(self, hw: HardwareProfile, expert_bytes: int, smoothing: float = 0.2):
        self.hw, self.expert_bytes = hw, int(expert_bytes)
        self.smoothing = float(smoothing)
        self._measured = 0.0            # EMA of X, seconds per pass
        self._modelled = 0.0            # EMA of the profile's price of the same CPU work
        self.passes = 0                 # split passes observed

    def modelled(self, experts: int, pairs: int) -> float:
        """The profile's seconds for the CPU computing `experts` experts over `pairs` (row, expert) pairs."""
        hw = self.hw
        return (experts * self.expert_bytes / (hw.cpu_expert_gbps * 1e9)
                + pairs * hw.cpu_s_per_expert_token * hw.row_scale(self.expert_bytes))

    def observe(self, pass_s: float, stop_s: float, plan_s: float, plans: int, experts: int, pairs: int) -> None:
        """One pass: its wall time, the time its plan stops and plans took, how many plans it ran, and
        the experts and (row, expert) pairs its host branches computed. A pass without a plan or CPU
        work, or one whose parts do not add up (a counter that went back), teaches nothing."""
        host = pass_s - stop_s - plan_s
        if experts <= 0 or plans <= 0 or pass_s <= 0 or stop_s < 0 or plan_s < 0 or host <= 0:
            return
        model = self.modelled(experts, max(pairs, experts))
        if self.passes == 0:
            self._measured, self._modelled = host, model
        else:
            a = self.smoothing
            self._measured += a * (host - self._measured)
            self._modelled += a * (model - self._modelled)
        self.passes += 1

    @property
    def scale(self) -> float:
        """Factor on the profile's CPU cost per expert (1 until a split pass was measured)."""
        if self.passes == 0 or self._modelled <= 0:
            return 1.0
        return min(max(self._measured / self._modelled, self.MIN_SCALE), self.MAX_SCALE)

    def stats(self) -> dict:
        return {"cpu_scale": self.scale, "passes": self.passes,
                "cpu_s_per_expert": self.scale * self.modelled(1, 1)}
