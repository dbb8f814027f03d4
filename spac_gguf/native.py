"""ctypes bindings for our llama.cpp patch: the MoE expert cache, in-pass loads, routing export and
replay (llama.h, "MoE expert cache"). Present only in our build; `available()` says whether libllama
has them at the API version this package speaks (API_VERSION)."""
from __future__ import annotations

import ctypes

import numpy as np

import llama_cpp.llama_cpp as llc

_lib = llc._lib  # the libllama that llama_cpp loaded (ours, or LLAMA_CPP_LIB_PATH)
API_VERSION = 9  # LLAMA_MOE_API_VERSION this package was written against
SLOT_EMPTY, SLOT_LOADING, SLOT_READY, SLOT_MAPPED = 0, 1, 2, 3   # llama_moe_slot_state
ERR_ALLOC = -8                                                   # LLAMA_MOE_ERR_ALLOC

STATUS = {
    0: "ok", -1: "layer out of range or not cacheable", -2: "slot out of range", -3: "expert out of range",
    -4: "slot is mapped or loading", -5: "map names a slot that is not ready with that expert",
    -6: "no expert cache on this context", -7: "no layer of this model can be cached",
    -8: "could not allocate slot memory", -9: "unknown load ticket", -10: "bad argument",
    -11: "the context has an expert cache already", -12: "an array argument is missing or too small",
    -13: "routing export is off",
}


class NativeError(RuntimeError):
    """The patch refused a call; `code` is the llama_moe_status."""

    def __init__(self, what: str, code: int):
        super().__init__(f"{what}: {STATUS.get(code, 'error')} (code {code})")
        self.code = code


class LayerInfo(ctypes.Structure):
    _fields_ = [("n_expert", ctypes.c_int32), ("n_expert_used", ctypes.c_int32), ("n_slots", ctypes.c_int32),
                ("cacheable", ctypes.c_int32), ("expert_bytes", ctypes.c_uint64 * 3), ("n_pass_slots", ctypes.c_int32)]


class CacheParams(ctypes.Structure):
    _fields_ = [("n_slots", ctypes.c_int32), ("on_host", ctypes.c_bool), ("n_pass_slots", ctypes.c_int32)]


_SIGS = {
    "llama_moe_n_layer": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_moe_get_layer_info": ([ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(LayerInfo)], ctypes.c_int32),
    "llama_moe_cache_default_params": ([], CacheParams),
    "llama_moe_cache_init": ([ctypes.c_void_p, ctypes.POINTER(CacheParams)], ctypes.c_int32),
    "llama_moe_cache_bytes": ([ctypes.c_void_p], ctypes.c_uint64),
    "llama_moe_cache_free": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_moe_cache_load": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], ctypes.c_int64),
    "llama_moe_cache_poll": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int32),
    "llama_moe_cache_wait": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int32),
    "llama_moe_cache_set_map": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p], ctypes.c_int32),
    "llama_moe_cache_read_slot": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                   ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int32),
    "llama_moe_routing_enable": ([ctypes.c_void_p, ctypes.c_bool], ctypes.c_int32),
    "llama_moe_routing_n_rows": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_moe_routing_get": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32], ctypes.c_int32),
    "llama_moe_api_version": ([], ctypes.c_int32),
    "llama_moe_cache_set_inpass": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_float, ctypes.c_float,
                                    ctypes.c_void_p], ctypes.c_int32),
    "llama_moe_cache_get_slots": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32],
                                  ctypes.c_int32),
    "llama_moe_cache_counters": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32], ctypes.c_int32),
    "llama_moe_cache_set_direct": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int32),
    "llama_moe_routing_replay": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32], ctypes.c_int32),
}


def library_version() -> int:
    """LLAMA_MOE_API_VERSION of the loaded libllama: 0 without the patch, 1 before the version call."""
    if hasattr(_lib, "llama_moe_api_version"):
        return int(api.api_version())
    return 1 if hasattr(_lib, "llama_moe_cache_init") else 0


def available() -> bool:
    return all(hasattr(_lib, name) for name in _SIGS) and library_version() == API_VERSION


def unavailable_reason() -> str:
    v = library_version()
    if v == 0:
        return "this llama.cpp build has no expert cache (unpatched?)"
    return (f"libllama speaks expert-cache API {v}, this package needs {API_VERSION}: "
            "rebuild it with `make setup` (scripts/build_llama.py)")


class _Api:
    def __init__(self):
        for name, (args, res) in _SIGS.items():
            if hasattr(_lib, name):
                f = getattr(_lib, name)
                f.argtypes, f.restype = args, res
                setattr(self, name[len("llama_moe_"):], f)


api = _Api()


def check(what: str, rc: int) -> int:
    if rc < 0:
        raise NativeError(what, rc)
    return rc


DIRECT_MAX_ROWS = 4  # LLAMA_MOE_DIRECT_MAX_ROWS


def counters(ctx_ptr) -> dict:
    """In-pass and asynchronous loads since cache_init (count, bytes), (row, expert) pairs the host
    computed, layer-passes that read their misses straight from pinned host memory, the time
    in-pass plans waited for asynchronous loads (a routed miss still loading), and plans run (each
    one stop of a pass between a layer's router and its experts), the cached layers whose experts
    go in one 2-D copy (all of them unless LLAMA_MOE_COPY_2D=0 or their layout forbids it), and the
    plan stops' time: from the scheduler's ask to the callback (the nodes before the plan node
    launched and run, the sync: `stop_s`) and inside the callback (ids and inputs down, the plan,
    copies issued, the map published: `plan_s`), of which reading the ids and a host branch's layer
    input down (`down_s`) and issuing the in-pass copies (`copy_s`), and the copies an expert takes,
    summed over the cached layers (`copy_groups`: one per layer when an expert is one 2-D copy), and
    the in-pass loads that went into pass slots (`pass_loads`, also in `inpass_loads`), the layer ids the
    routing export read through pinned memory with one wait per pass (`routing_async_reads`, since the
    context began; 0 where the ids are in host memory) and the plan stops whose reads were queued right
    after the range before them (`early_downs`: their wait is the scheduler's, in `stop_s`, and `down_s`
    only the copy out of pinned memory); 0 from builds without them."""
    out = (ctypes.c_uint64 * 17)()
    n = check("cache_counters", api.cache_counters(ctx_ptr, out, 17))
    return {"inpass_loads": int(out[0]), "inpass_bytes": int(out[1]),
            "async_loads": int(out[2]), "async_bytes": int(out[3]), "host_pairs": int(out[4]),
            "direct_passes": int(out[5]), "inpass_wait_s": int(out[6]) * 1e-6, "plans": int(out[7]),
            "copy_2d_layers": int(out[8]) if n >= 9 else 0,
            "stop_s": int(out[9]) * 1e-6 if n >= 11 else 0.0, "plan_s": int(out[10]) * 1e-6 if n >= 11 else 0.0,
            "down_s": int(out[11]) * 1e-6 if n >= 13 else 0.0, "copy_s": int(out[12]) * 1e-6 if n >= 13 else 0.0,
            "copy_groups": int(out[13]) if n >= 14 else 0, "pass_loads": int(out[14]) if n >= 15 else 0,
            "routing_async_reads": int(out[15]) if n >= 16 else 0, "early_downs": int(out[16]) if n >= 17 else 0}


def replay(ctx_ptr, il: int, ids: np.ndarray | None) -> None:
    """Layer il's next decodes use `ids` [rows, k] instead of the router's top-k (None: off)."""
    if ids is None:
        check(f"routing_replay layer {il}", api.routing_replay(ctx_ptr, il, None, 0))
        return
    a = np.ascontiguousarray(ids, np.int32)
    check(f"routing_replay layer {il}", api.routing_replay(ctx_ptr, il, a.ctypes.data, a.shape[0]))


class ReplayTrace:
    """A routing trace [positions, layers, k] laid out per layer once, so that setting a pass's rows
    costs one C call per layer and no copy (the benchmark sets them before every pass, inside the
    timed loop; the C side copies what it is given)."""

    def __init__(self, trace: np.ndarray, layers):
        self.layers = [int(il) for il in layers]
        self.positions, self.k = int(trace.shape[0]), int(trace.shape[2])
        self._by_layer = {il: np.ascontiguousarray(trace[:, il], np.int32) for il in self.layers}
        self._addr = {il: a.ctypes.data for il, a in self._by_layer.items()}
        self._row_bytes = 4 * self.k

    def set_rows(self, ctx_ptr, start: int, n_rows: int) -> None:
        """Every layer's next decode uses the trace's rows [start, start + n_rows) (cut at its end)."""
        if start < 0:
            raise ValueError(f"replay from position {start}")
        n = max(0, min(n_rows, self.positions - start))
        off = start * self._row_bytes
        for il in self.layers:
            check(f"routing_replay layer {il}", api.routing_replay(ctx_ptr, il, self._addr[il] + off, n))


def layer_info(ctx_ptr, il: int) -> LayerInfo:
    info = LayerInfo()
    check("get_layer_info", api.get_layer_info(ctx_ptr, il, ctypes.byref(info)))
    return info


class NativeRouting:
    """Routing read from the patch's exported graph outputs (no eval callback)."""

    def __init__(self, ctx_ptr, n_layers: int, k: int):
        self.ctx = ctx_ptr
        self.n_layers, self.k = n_layers, k
        check("routing_enable", api.routing_enable(ctx_ptr, True))
        self._buf = np.empty(0, np.int32)

    def begin(self) -> None:
        pass

    def end(self, n_rows: int) -> np.ndarray:
        rows = api.routing_n_rows(self.ctx)
        k = max(self.k, 1)
        # each layer's ids land in its own slice of one buffer [layers, rows, k]; one transposing copy
        # at the end (a slice assignment per layer cost more than the C calls themselves)
        need = self.n_layers * rows * k
        if self._buf.size < need:
            self._buf = np.empty(need, np.int32)
        buf = self._buf[:need].reshape(self.n_layers, rows, k)
        base, stride = buf.ctypes.data, rows * k * 4
        irregular = []
        for il in range(self.n_layers):
            n = check("routing_get", api.routing_get(self.ctx, il, base + il * stride, rows * k))
            if n != rows * k:
                irregular.append((il, n))        # a dense layer (0), or a smaller top-k than the model's
        m = min(rows, n_rows)
        sel = buf[:, rows - m:] if rows > n_rows else buf[:, :m]
        out = np.full((n_rows, self.n_layers, self.k), -1, np.int32)
        out[:m] = sel.transpose(1, 0, 2)
        for il, n in irregular:
            out[:, il] = -1
            if n:
                kk = n // rows
                ids = np.empty(n, np.int32)
                check("routing_get", api.routing_get(self.ctx, il, ids.ctypes.data, n))
                ids = ids.reshape(rows, kk)
                out[:m, il, :kk] = ids[rows - m:] if rows > n_rows else ids[:m]
        return out
