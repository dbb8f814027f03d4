"""Token choice from logits: greedy, or temperature + top-p with a seeded generator.

The same `Sampler.probs` is applied to target and draft logits, so speculative acceptance
(min(1, p/q), resample from max(p - q, 0)) preserves the target's processed distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sampler:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Processed distribution (float64, sums to 1) for one row of logits."""
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            csum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(csum, self.top_p) + 1)]
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return p

    def draw(self, p: np.ndarray) -> int:
        return int(self.rng.choice(p.shape[0], p=p))

    def sample(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        return self.draw(self.probs(logits))

    def accept(self, p_x: float, q_x: float) -> bool:
        """Speculative acceptance test for a drafted token x: r < p(x)/q(x)."""
        return self.rng.random() * q_x < p_x

    def residual(self, p: np.ndarray, q: np.ndarray) -> int:
        """Resample after a rejection, from norm(max(p - q, 0))."""
        r = np.maximum(p - q, 0.0)
        s = r.sum()
        return self.draw(r / s if s > 0 else p)
