"""ExpertCache: slot bookkeeping over the patched llama.cpp expert cache (the engine's SlotStore).

The C side enforces exactness (a map may only name a slot whose copy finished and that holds that
expert; a mapped or loading slot cannot be overwritten) and owns the slot ledger: in-pass loads change
it during a decode, so `sync()` re-reads it after every pass and this class never guesses. It turns
completed asynchronous loads into published maps, passes the in-pass policy down, and counts bytes.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import native

EMPTY, LOADING, READY, MAPPED = native.SLOT_EMPTY, native.SLOT_LOADING, native.SLOT_READY, native.SLOT_MAPPED


class ExpertCache:
    """n_slots GPU (or host) slots per cacheable MoE layer of one llama context, and `pass_slots` more
    per device that a host-branch pass uploads misses into beyond the free slots, for that pass only
    (its layers run one after another and share them; llama.h, llama_moe_cache_params)."""

    def __init__(self, ctx_ptr, n_slots: int, on_host: bool = False, pass_slots: int = 0):
        if not native.available():
            raise native.NativeError(native.unavailable_reason(), -6)
        self.ctx = ctx_ptr
        self.n_layers = native.api.n_layer(ctx_ptr)
        infos = [native.layer_info(ctx_ptr, il) for il in range(self.n_layers)]
        moe = [i for i in infos if i.n_expert > 0]
        if not moe:
            raise native.NativeError("the target has no MoE layers", -7)
        self.n_expert = max(i.n_expert for i in moe)
        self.k = max(i.n_expert_used for i in moe)
        self.expert_bytes = int(max(sum(i.expert_bytes) for i in moe))
        params = native.api.cache_default_params()
        params.n_slots, params.on_host, params.n_pass_slots = int(n_slots), bool(on_host), int(pass_slots)
        native.check("cache_init", native.api.cache_init(ctx_ptr, ctypes.byref(params)))
        self.n_slots = n_slots
        infos = [native.layer_info(ctx_ptr, il) for il in range(self.n_layers)]
        self.cached_layers = np.array([i.n_slots > 0 for i in infos])
        # the pool the C side made, not the one asked for: none for unquantized experts or a device
        # whose kernels may read id -1 (layers of another shape than the pooled ones have none)
        self.n_pass_slots = max((i.n_pass_slots for i in infos), default=0)
        self.slot_bytes = int(native.api.cache_bytes(ctx_ptr))
        L, S = self.n_layers, n_slots
        self.slot_expert = np.full((L, S), -1, np.int32)
        self.state = np.zeros((L, S), np.int32)
        self._tickets: dict[int, tuple[int, int]] = {}
        self._dirty: set[int] = set()
        self.bytes_loaded = 0

    # --- SlotStore protocol -------------------------------------------------------------------
    @property
    def mapped(self) -> np.ndarray:
        return self.state == MAPPED

    def resident(self) -> np.ndarray:
        """int32 [n_layers, n_slots]: the expert whose copy is complete in each slot, -1 otherwise."""
        return np.where(self.state >= READY, self.slot_expert, -1).astype(np.int32)

    def sync(self) -> None:
        """Re-read the ledger from the C side (in-pass loads change it during a decode): one call."""
        native.check("get_slots", native.api.cache_get_slots(self.ctx, -1, self.slot_expert.ctypes.data,
                                                             self.state.ctypes.data, self.slot_expert.size))

    def set_inpass(self, share: float, max_loads: int, priority: np.ndarray | None, routed_bonus: float = 0.0) -> None:
        """Every cached layer's in-pass policy for the coming passes: up to round(share x misses) (halves up),
        at most max_loads, loaded in decreasing priority [n_layers, n_expert] (< 0: never); a miss
        takes the slot of a mapped expert whose priority is below its own + routed_bonus."""
        pr = None
        if priority is not None:
            pr = np.ascontiguousarray(priority, np.float32)
            if pr.shape != (self.n_layers, self.n_expert):
                raise ValueError(f"priority must be [{self.n_layers}, {self.n_expert}], got {list(pr.shape)}")
        native.check("set_inpass", native.api.cache_set_inpass(self.ctx, -1, int(max_loads), float(share),
                                                               float(routed_bonus),
                                                               None if pr is None else pr.ctypes.data))

    def set_direct(self, max_rows: int) -> int:
        """Passes of at most max_rows rows (0: off) compute the experts no slot serves on the GPU,
        reading them from pinned host memory (no in-pass load, no host branch, no stop in the pass).
        Returns how many layers can: 0 when the experts are not pinned host tensors of a GPU."""
        return native.check("set_direct", native.api.cache_set_direct(self.ctx, int(max_rows)))

    def counters(self) -> dict:
        return native.counters(self.ctx)

    def load_async(self, layer: int, expert: int, slot: int) -> None:
        """Start copying `expert` into `slot`; a mapped victim is unmapped first (between decodes)."""
        if self.state[layer, slot] == MAPPED:
            self.state[layer, slot] = READY
            self._set_map(layer)
        ticket = native.check(f"load layer {layer} expert {expert} slot {slot}",
                              native.api.cache_load(self.ctx, layer, expert, slot))
        for old in [t for t, key in self._tickets.items() if key == (layer, slot)]:
            del self._tickets[old]           # a finished, unpolled load of that slot: overwritten now
        self._tickets[ticket] = (layer, slot)
        self.slot_expert[layer, slot] = expert
        self.state[layer, slot] = LOADING
        self.bytes_loaded += self.expert_bytes

    def loading(self) -> dict[tuple[int, int], int]:
        """(layer, slot) -> expert of every load not yet polled: its slot stays busy until poll() says
        it is done, even where sync() already reads the copy as complete (the map is set at publish)."""
        return {(layer, slot): int(self.slot_expert[layer, slot]) for layer, slot in self._tickets.values()}

    def poll(self) -> list[tuple[int, int]]:
        done = []
        for ticket, (layer, slot) in list(self._tickets.items()):
            rc = native.check("poll", native.api.cache_poll(self.ctx, ticket))
            if rc == 1:
                del self._tickets[ticket]
                self.state[layer, slot] = READY
                self._dirty.add(layer)
                done.append((layer, slot))
        return done

    def publish(self) -> None:
        """Map every ready slot (only between decodes)."""
        for layer in sorted(self._dirty):
            self.state[layer][self.state[layer] == READY] = MAPPED
            self._set_map(layer)
        self._dirty.clear()

    def free(self) -> None:
        """Give the slots back (GPU memory); the context decodes as without a cache. A new
        ExpertCache may follow on the same context (another size)."""
        native.check("cache_free", native.api.cache_free(self.ctx))
        self.state[:] = EMPTY
        self.slot_expert[:] = -1
        self._tickets.clear()
        self._dirty.clear()

    # --- helpers -------------------------------------------------------------------------------
    def wait_all(self) -> None:
        for ticket in list(self._tickets):
            native.check("wait", native.api.cache_wait(self.ctx, ticket))
        self.poll()

    def slot_of_expert(self, layer: int) -> np.ndarray:
        m = np.full(self.n_expert, -1, np.int32)
        for s in np.nonzero(self.state[layer] == MAPPED)[0]:
            m[self.slot_expert[layer, s]] = s
        return m

    def _set_map(self, layer: int) -> None:
        m = self.slot_of_expert(layer)
        native.check(f"set_map layer {layer}", native.api.cache_set_map(self.ctx, layer, m.ctypes.data))

    def read_slot(self, layer: int, slot: int, proj: int, nbytes: int) -> bytes:
        buf = np.empty(nbytes, np.uint8)
        native.check("read_slot", native.api.cache_read_slot(self.ctx, layer, slot, proj, buf.ctypes.data, nbytes))
        return buf.tobytes()
