"""Auto-fit: where a model pair goes when a GPU is present and the user gave no placement flags.

Everything on the GPU if it fits; otherwise the dense part (attention, norms, router, head), the
draft and both KV caches on the GPU, the routed experts in pinned host memory, and the GPU memory
that is left (less compute buffers and a margin) as the expert cache, policy spac. The sizing is a
pure function of the numbers (tested with made-up device memory); `device_memory` asks ggml.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import gguf_layout

MiB = 1 << 20


@dataclass(frozen=True)
class DeviceMemory:
    name: str
    free: int
    total: int
    pretend: bool = False        # SPAC_TEST_GPU_FREE_MIB: no GPU really measured


def device_memory() -> DeviceMemory | None:
    """Free and total memory of the first GPU as ggml reports it, or None without one.
    SPAC_TEST_GPU_FREE_MIB=N pretends a GPU with N MiB free (tests of the CLI path on a CPU build)."""
    import os
    fake = os.environ.get("SPAC_TEST_GPU_FREE_MIB")
    if fake:
        return DeviceMemory("test GPU (SPAC_TEST_GPU_FREE_MIB)", int(float(fake) * MiB), int(float(fake) * MiB), True)
    from .llama_backend import first_gpu_device, ggml, gpu_available
    dev = first_gpu_device() if gpu_available() else None     # gpu_available() starts the backend
    if dev is None:
        return None
    base = ggml()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    name = (base.ggml_backend_dev_description(dev) or b"GPU").decode("utf-8", "replace")
    return DeviceMemory(name, int(free.value), int(total.value))


def _header(src: str | Path | gguf_layout.GGUFHeader) -> gguf_layout.GGUFHeader:
    return src if isinstance(src, gguf_layout.GGUFHeader) else gguf_layout.read_gguf(src, strings=False)


def _heads(h: gguf_layout.GGUFHeader) -> tuple[str, int, int]:
    """(arch, n_head, n_head_kv), the largest where a model gives them per layer."""
    arch = h.get("general.architecture")
    n_head = int(np.asarray(h.get(f"{arch}.attention.head_count", 0) or 0).max())
    n_head_kv = int(np.asarray(h.get(f"{arch}.attention.head_count_kv", n_head) or n_head).max())
    return arch, n_head, n_head_kv


def kv_bytes(src: str | Path | gguf_layout.GGUFHeader, n_ctx: int) -> int:
    """F16 K and V for n_ctx positions in every layer (llama.cpp's default cache types)."""
    h = _header(src)
    arch, n_head, n_head_kv = _heads(h)
    n_layer = int(h.get(f"{arch}.block_count", 0) or 0)
    n_embd = int(h.get(f"{arch}.embedding_length", 0) or 0)
    k_len = int(h.get(f"{arch}.attention.key_length", 0) or (n_embd // n_head if n_head else 0))
    v_len = int(h.get(f"{arch}.attention.value_length", 0) or k_len)
    return n_layer * n_ctx * n_head_kv * (k_len + v_len) * 2


def compute_bytes(src: str | Path | gguf_layout.GGUFHeader, n_ctx: int, n_ubatch: int = 512) -> int:
    """GPU compute buffer of one context as llama.cpp reserves it: its worst graph is a full ubatch
    with every row an output (n_outputs = min(n_ubatch, n_batch)), so the logits of n_ubatch rows, one
    layer's F32 attention scores (n_head x n_ctx x the ubatch's rows; no flash attention in our CUDA
    build), and a fixed part for the rest."""
    h = _header(src)
    arch, n_head, _ = _heads(h)
    tokens = h.get("tokenizer.ggml.tokens")
    vocab = int(h.get(f"{arch}.vocab_size", 0) or (len(tokens) if tokens is not None else 32000))
    rows = min(n_ubatch, n_ctx)
    return 128 * MiB + n_head * n_ctx * rows * 4 + vocab * 4 * rows


def input_embedding_bytes(src: str | Path | gguf_layout.GGUFHeader) -> int:
    """token_embd.weight: llama.cpp keeps the input layer in host memory whatever -ngl says."""
    return sum(t.nbytes for t in _header(src).tensors if t.name == "token_embd.weight")


def plan_pair(target: str | Path, draft: str | Path | None, n_ctx: int, free: int, device: str = "GPU") -> "Fit":
    """The plan for a target (and draft) at context n_ctx: what each needs on the GPU (weights but the
    input embeddings, KV caches, compute buffers), then `plan`."""
    lay = gguf_layout.describe(target)
    th = _header(target)
    kv, compute = kv_bytes(th, n_ctx), compute_bytes(th, n_ctx)
    draft_gpu = 0
    if draft:
        dh = _header(draft)
        kv, compute = kv + kv_bytes(dh, n_ctx), compute + compute_bytes(dh, n_ctx)
        draft_gpu = Path(draft).stat().st_size - input_embedding_bytes(dh)
    return plan(dense=lay.dense_bytes - input_embedding_bytes(th), experts=lay.expert_bytes,
                bytes_per_expert=lay.bytes_per_expert, n_moe_layers=len(lay.moe_layers), n_expert=lay.n_expert,
                draft_bytes=draft_gpu, kv=kv, compute=compute, free=free, device=device)


@dataclass(frozen=True)
class Fit:
    mode: str                    # "gpu": everything on the GPU; "cache": experts on the host + a GPU cache;
                                 # "host-experts": the cache would not hold one expert per layer
    device: str
    free: int
    dense: int
    experts: int
    draft: int
    kv: int
    compute: int
    margin: int
    cache: int                   # bytes of expert slots
    slots_per_layer: int
    n_expert: int

    def lines(self) -> list[str]:
        g = lambda b: f"{b / (1 << 30):.2f} GiB"           # noqa: E731
        out = [f"device       {self.device}, {g(self.free)} free",
               f"on the GPU   dense {g(self.dense)}, draft {g(self.draft)}, KV {g(self.kv)}, "
               f"compute {g(self.compute)}, margin {g(self.margin)}"]
        if self.mode == "gpu":
            out.append(f"experts      {g(self.experts)} on the GPU too: the whole model fits, no cache")
        elif self.mode == "cache":
            out.append(f"experts      {g(self.experts)} in pinned host memory; GPU cache {g(self.cache)} = "
                       f"{self.slots_per_layer} of {self.n_expert} per layer ({self.slots_per_layer / self.n_expert:.0%}), policy spac")
        else:
            out.append(f"experts      {g(self.experts)} in host memory, computed by the CPU: "
                       "the GPU has no room for one expert per layer")
        return out


def plan(*, dense: int, experts: int, bytes_per_expert: int, n_moe_layers: int, n_expert: int,
         draft_bytes: int, kv: int, compute: int, free: int, device: str = "GPU", margin: int | None = None) -> Fit:
    """The placement for `free` bytes of GPU memory (see the module docstring); `compute`: both
    contexts' compute buffers (`compute_bytes`)."""
    if margin is None:
        margin = max(512 * MiB, free // 20)
    common = dict(device=device, free=free, dense=dense, experts=experts, draft=draft_bytes, kv=kv, compute=compute,
                  margin=margin, n_expert=n_expert)
    fixed = dense + draft_bytes + kv + compute + margin
    if n_moe_layers == 0 or fixed + experts <= free:
        return Fit(mode="gpu", cache=0, slots_per_layer=0, **common)
    per_slot_row = n_moe_layers * bytes_per_expert        # one slot in every MoE layer
    slots = _slots_in(max(0, free - fixed), per_slot_row, n_expert)
    if slots < 1:
        return Fit(mode="host-experts", cache=0, slots_per_layer=0, **common)
    return Fit(mode="cache", cache=int(slots * per_slot_row), slots_per_layer=int(slots), **common)


def _slots_in(room: int, per_slot_row: int, n_expert: int) -> int:
    """Slots per layer that `room` bytes hold, with the all-zero slot every layer has; below n_expert
    (a cache of every expert is the all-GPU placement)."""
    return int(min(n_expert - 1, room // per_slot_row - 1)) if per_slot_row > 0 else 0


def slots_after_load(free: int, bytes_per_expert: int, n_moe_layers: int, n_expert: int,
                     margin: int | None = None) -> int:
    """Slots per layer for the GPU memory `free` once the models and contexts are loaded: the plan
    guessed the weights, KV and compute buffers; this measures what they left. The margin covers what
    still comes after the cache (cuBLAS workspaces, the cache's streams, graph buffers that grow):
    384 MiB or 4 %. Measured on the H200 (12 GiB free before loading, the 18 GB benchmark pair):
    8.61 GiB left after loading, 70 slots ran, 128 did not fit."""
    if margin is None:
        margin = _after_load_margin(free)
    return max(0, _slots_in(max(0, free - margin), n_moe_layers * bytes_per_expert, n_expert))


def _after_load_margin(free: int) -> int:
    """What stays free after the cache: 384 MiB or 4 % (slots_after_load says why)."""
    return max(384 * MiB, free // 25)


def room_after_slots(free: int, bytes_per_expert: int, n_moe_layers: int, slots: int,
                     margin: int | None = None) -> int:
    """Bytes of `free` left after the margin and `slots` per layer with each layer's zero slot: what
    pass slots may take (less than one slot per layer when `slots` is slots_after_load's answer below
    its cap of n_expert - 1; more at the cap)."""
    if margin is None:
        margin = _after_load_margin(free)
    return max(0, free - margin - (slots + 1) * n_moe_layers * bytes_per_expert)
