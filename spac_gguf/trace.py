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

import contextlib
import json
import os
import zipfile
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
        """Write atomically: a temporary file beside `path`, renamed over it once complete, so a failure
        or Ctrl-C never leaves half a trace."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, ids=self.ids.astype(np.int32), pass_start=self.pass_start.astype(np.int32),
                                    accepted=self.accepted.astype(np.int32), meta=np.array(json.dumps(self.meta)))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        """Read and validate a trace; anything else is a ValueError naming the file (never a pickle)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trace not found: {path}")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a routing trace (.npz from `spac-gguf run --trace`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("ids", "pass_start", "accepted", "meta") if k not in z.files]
                if missing:
                    raise ValueError(f"{path} is not a routing trace: no {', '.join(missing)}")
                arrays = {k: z[k] for k in ("ids", "pass_start", "accepted")}
                meta = json.loads(str(z["meta"]))
        except (OSError, zipfile.BadZipFile, json.JSONDecodeError, EOFError) as e:
            raise ValueError(f"{path} is not a readable routing trace ({type(e).__name__}: {e})") from None
        for k, a in arrays.items():
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{path}: {k} must hold integers, not {a.dtype}")
        tr = cls(**{k: a.astype(np.int32) for k, a in arrays.items()}, meta=meta)
        tr.validate(str(path))
        return tr

    def validate(self, name: str = "trace") -> None:
        """Shapes, pass structure and expert ids agree with each other and with meta."""
        if not isinstance(self.meta, dict):
            raise ValueError(f"{name}: meta must be a JSON object")
        n_expert = self.meta.get("n_expert")
        if not isinstance(n_expert, int) or n_expert < 1:
            raise ValueError(f"{name}: meta.n_expert must be a positive integer (got {n_expert!r})")
        if self.ids.ndim != 3:
            raise ValueError(f"{name}: ids must be [rows, layers, k], got shape {list(self.ids.shape)}")
        if self.pass_start.ndim != 1 or self.accepted.shape != self.pass_start.shape:
            raise ValueError(f"{name}: pass_start and accepted must be 1-D and of one length")
        rows = self.ids.shape[0]
        ps = self.pass_start.astype(np.int64)
        if len(ps) and (ps[0] != 0 or (np.diff(ps) <= 0).any() or ps[-1] >= rows):
            raise ValueError(f"{name}: pass_start must start at 0 and rise strictly within the {rows} rows")
        sizes = np.diff(np.append(ps, rows))
        if ((self.accepted < 1) | (self.accepted > sizes)).any():
            raise ValueError(f"{name}: each pass accepts between 1 and its number of rows")
        bad = (self.ids < -1) | (self.ids >= n_expert)
        if bad.any():
            v = int(self.ids[bad][0])
            raise ValueError(f"{name}: expert id {v} outside -1..{n_expert - 1} (meta.n_expert = {n_expert})")


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
