"""Which experts each target row was routed to: top-k ids per (MoE layer, batch row).

Two sources behind one interface (`RoutingSource`):
- `EvalCallbackRouting`: a Python `cb_eval` that observes the `ffn_moe_topk-<il>` nodes of the
  stock graph. Works on any build; costs a graph split + sync per MoE layer and a Python call per
  graph node (measured in docs/BENCHMARKS.md).
- `NativeRouting` (spac_gguf/native.py): the patched llama.cpp exports the ids as graph outputs
  and we copy them once after the decode. No callback.
"""
from __future__ import annotations

import ctypes
from typing import Protocol

import numpy as np

import llama_cpp as llc

from .llama_backend import ggml

TOPK_PREFIX = b"ffn_moe_topk-"


class _GgmlTensor(ctypes.Structure):
    """Leading fields of `struct ggml_tensor` (ggml.h, GGML_MAX_SRC = 10, GGML_MAX_NAME = 64)."""
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


class RoutingSource(Protocol):
    n_layers: int
    k: int

    def begin(self) -> None:
        """Call before a target decode."""

    def end(self, n_rows: int) -> np.ndarray:
        """Call after it: int32 [n_rows, n_layers, k]; -1 for dense layers."""


class EvalCallbackRouting:
    """Routing read through llama.cpp's scheduler eval callback (no patch needed)."""

    def __init__(self, n_layers: int, k: int):
        self.n_layers = n_layers
        self.k = k
        self._chunks: dict[int, list[np.ndarray]] = {}
        self.callback = llc.ggml_backend_sched_eval_callback(self._on_eval)

    def _on_eval(self, t_ptr, ask, user_data):  # noqa: ARG002 - C signature
        t = _GgmlTensor.from_address(t_ptr)
        name = t.name
        if not name.startswith(TOPK_PREFIX):
            return False if ask else True
        if ask:
            return True
        il = int(name[len(TOPK_PREFIX):])
        k, rows = int(t.ne[0]), int(t.ne[1])
        row_stride = int(t.nb[1])
        span = (rows - 1) * row_stride + k * 4 if rows else 0
        buf = np.empty(max(span, 4) // 4 + 1, np.int32)
        if span:
            ggml().ggml_backend_tensor_get(ctypes.c_void_p(t_ptr), buf.ctypes.data, 0, span)
        ids = np.lib.stride_tricks.as_strided(buf, shape=(rows, k), strides=(row_stride, 4)).copy()
        self._chunks.setdefault(il, []).append(ids)
        return True

    def begin(self) -> None:
        self._chunks.clear()

    def end(self, n_rows: int) -> np.ndarray:
        out = np.full((n_rows, self.n_layers, self.k), -1, np.int32)
        for il, parts in self._chunks.items():
            ids = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            m = min(n_rows, ids.shape[0])
            out[:m, il, :ids.shape[1]] = ids[:m]
        return out
