"""Host-to-device copy rate for a pass's misses, by copy size and number of streams (GPU machine).

A missed expert is three projection copies of ~0.9 MB from pinned host memory into a slot. This
probe measures, with torch only (no llama.cpp), what the link gives for that pattern against one
2.65 MB copy per expert and against several streams sharing the copies, so that a change to the
patch's upload path is chosen by a measurement. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time


def best_pass_gbps(torch, g, n_expert: int, n_miss: int, reps: int, expert_bytes: int, copy_one) -> float:
    """Best rate over `reps` passes of `n_miss` random distinct experts of `n_expert`, each copied by
    `copy_one(i, expert)` (the i-th miss of the pass), timed from a synchronised device to the last
    copy's end: the pass's misses as the patch uploads them."""
    best = 0.0
    for _ in range(reps):
        experts = torch.randperm(n_expert, generator=g)[:n_miss].tolist()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, e in enumerate(experts):
            copy_one(i, e)
        torch.cuda.synchronize()
        best = max(best, n_miss * expert_bytes / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    proj = [884736, 884736, 1290240]     # Q4_K gate/up, Q6_K down (as Q4_K_M files have; the bench model is all Q4_K)
    n_expert, n_miss, reps = 128, 96, 20
    per_expert = sum(proj)
    host = torch.empty(n_expert * per_expert, dtype=torch.uint8).pin_memory()
    dev = torch.empty(64 * per_expert, dtype=torch.uint8, device="cuda")
    g = torch.Generator().manual_seed(0)
    out = {"device": torch.cuda.get_device_name(0), "expert_bytes": per_expert, "misses_per_pass": n_miss}

    def run(n_streams: int, whole: bool) -> float:
        streams = [torch.cuda.Stream() for _ in range(n_streams)]

        def copy_one(i, e):
            slot = i % 64
            with torch.cuda.stream(streams[i % n_streams]):
                if whole:
                    dev[slot * per_expert:(slot + 1) * per_expert].copy_(
                        host[e * per_expert:(e + 1) * per_expert], non_blocking=True)
                else:
                    off = 0
                    for nb in proj:
                        dev[slot * per_expert + off:slot * per_expert + off + nb].copy_(
                            host[e * per_expert + off:e * per_expert + off + nb], non_blocking=True)
                        off += nb
        return best_pass_gbps(torch, g, n_expert, n_miss, reps, per_expert, copy_one)

    for n_streams in (1, 2, 3, 4):
        out[f"three_copies_{n_streams}_streams_gbps"] = round(run(n_streams, False), 2)
        out[f"one_copy_{n_streams}_streams_gbps"] = round(run(n_streams, True), 2)
    big = host[: 64 * per_expert]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dev.copy_(big, non_blocking=True)
    torch.cuda.synchronize()
    out["link_64_experts_one_copy_gbps"] = round(5 * big.numel() / (time.perf_counter() - t0) / 1e9, 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
