"""Routing traces: the .npz that `spac-gguf run --trace` writes and `spac-gguf simulate` reads.

Format (one file, numpy .npz):
  ids         int32 [n_rows, n_layers, k]  expert ids of every target row in decode order
                                           (rejected draft rows included; -1 for dense layers)
  pass_start  int32 [n_passes]             first row of each target pass
  accepted    int32 [n_passes]             rows of that pass that became output
  meta        str (JSON)                   arch, n_expert, k, draft_max, target, draft,
                                           expert_bytes (one expert, all projections), dense_bytes,
                                           n_layers, moe_layers
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RoutingTrace:
    ids: np.ndarray          # int32 [n_rows, n_layers, k]
    pass_start: np.ndarray   # int32 [n_passes]
    accepted: np.ndarray     # int32 [n_passes]
    meta: dict = field(default_factory=dict)

    @property
    def n_passes(self) -> int:
        return int(self.pass_start.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def n_expert(self) -> int:
        return int(self.meta["n_expert"])

    def pass_rows(self, i: int) -> np.ndarray:
        """ids of pass i: int32 [rows_i, n_layers, k]."""
        a = int(self.pass_start[i])
        b = int(self.pass_start[i + 1]) if i + 1 < self.n_passes else int(self.ids.shape[0])
        return self.ids[a:b]

    def passes(self):
        for i in range(self.n_passes):
            yield self.pass_rows(i), int(self.accepted[i])

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, ids=self.ids.astype(np.int32), pass_start=self.pass_start.astype(np.int32),
                            accepted=self.accepted.astype(np.int32), meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        with np.load(path, allow_pickle=False) as z:
            return cls(ids=z["ids"].astype(np.int32), pass_start=z["pass_start"].astype(np.int32),
                       accepted=z["accepted"].astype(np.int32), meta=json.loads(str(z["meta"])))


class TraceRecorder:
    """Accumulates the routing of each target pass while generating."""

    def __init__(self, meta: dict):
        self.meta = dict(meta)
        self._ids: list[np.ndarray] = []
        self._starts: list[int] = []
        self._accepted: list[int] = []
        self._rows = 0

    def add_pass(self, ids: np.ndarray, accepted: int) -> None:
        self._starts.append(self._rows)
        self._accepted.append(int(accepted))
        self._ids.append(np.asarray(ids, dtype=np.int32))
        self._rows += int(ids.shape[0])

    def trace(self) -> RoutingTrace:
        if self._ids:
            ids = np.concatenate(self._ids, axis=0)
        else:
            ids = np.zeros((0, int(self.meta.get("n_layers", 0)), int(self.meta.get("k", 0))), np.int32)
        return RoutingTrace(ids=ids, pass_start=np.array(self._starts, np.int32),
                            accepted=np.array(self._accepted, np.int32), meta=self.meta)
