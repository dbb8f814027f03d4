"""Is one 2-D copy per missed expert as fast as one contiguous copy? (GPU machine, torch only.)

llama.cpp keeps an expert's three projections in three tensors (one per projection, experts along
the third axis), so the patch uploads a miss as three copies of ~0.9 MB (48.1 GB/s measured, against
52.3 for one 2.65 MB copy: `probe_copy_streams.py`). `ggml_backend_tensor_set_2d_async`
(`cudaMemcpy2DAsync` on CUDA) can move equally sized projections that sit at a constant distance
from each other, on the host and in the slots, in one call. This probe measures, for a pass's
misses (96 of 128 experts, into 64 slots, host tensors laid out as llama.cpp's loader lays them
out), three copies per expert, one 2-D copy per expert and one contiguous copy per expert; and for
Q4_K_M's shapes (down is Q6_K, larger) three copies against a 2-D copy of gate+up plus down.
Calls cudaMemcpy2DAsync from the CUDA runtime torch loads. Prints one JSON line.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import sys

from probe_copy_streams import best_pass_gbps   # the same timed pass of misses


def _cudart():
    import torch
    cands = []
    try:
        import nvidia.cuda_runtime as m                       # the runtime torch's wheels load
        for d in m.__path__:
            cands += sorted(glob.glob(os.path.join(d, "lib", "libcudart.so*")))
    except ImportError:
        pass
    cands += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libcudart*.so*")))
    cands += ["libcudart.so.12", "libcudart.so"]
    for c in cands:
        try:
            lib = ctypes.CDLL(c)
            f = lib.cudaMemcpy2DAsync
        except (OSError, AttributeError):
            continue
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                      ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        f.restype = ctypes.c_int
        return c, f
    return None, None


def main() -> int:
    import torch
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    lib, memcpy2d = _cudart()
    out = {"device": torch.cuda.get_device_name(0), "cudart": lib}
    if memcpy2d is None:
        out["error"] = "no libcudart with cudaMemcpy2DAsync found"
        print(json.dumps(out))
        return 2
    n_expert, n_slots, n_miss, reps = 128, 64, 96, 20
    H2D = 1
    g = torch.Generator().manual_seed(0)

    def layout(proj):
        # host: one tensor per projection, back to back (the loader's order, 32-byte aligned);
        # device: one slot tensor per projection, back to back
        host_off, off = [], 0
        for nb in proj:
            host_off.append(off)
            off += -(-(n_expert * nb) // 256) * 256
        host = torch.empty(off, dtype=torch.uint8).pin_memory()
        host.fill_(1)
        dev_off, doff = [], 0
        for nb in proj:
            dev_off.append(doff)
            doff += -(-(n_slots * nb) // 256) * 256
        dev = torch.zeros(doff, dtype=torch.uint8, device="cuda")
        return host, host_off, dev, dev_off

    def groups(proj, hoff, doff):
        """(first projection, rows, src pitch, dst pitch) per copy: each run of equally sized
        projections in one 2-D copy (at one distance between every pair of rows), the rest alone."""
        out, p = [], 0
        while p < len(proj):
            q = p
            while q + 1 < len(proj) and proj[q + 1] == proj[p]:
                q += 1
            rows, nb = q - p + 1, proj[p]
            spitch = hoff[p + 1] - hoff[p] if rows > 1 else nb
            dpitch = doff[p + 1] - doff[p] if rows > 1 else nb
            assert all(hoff[j + 1] - hoff[j] == spitch and doff[j + 1] - doff[j] == dpitch for j in range(p, q))
            out.append((p, rows, spitch, dpitch))
            p = q + 1
        return out

    def run(proj, mode):
        host, hoff, dev, doff = layout(proj)
        hp, dp = host.data_ptr(), dev.data_ptr()
        stream = torch.cuda.current_stream().cuda_stream
        plan = ([(p, 1, nb, nb) for p, nb in enumerate(proj)] if mode == "three"
                else groups(proj, hoff, doff))       # worked out once, outside the timed passes

        def copy_one(i, e):
            s = i % n_slots
            for p, rows, spitch, dpitch in plan:
                nb = proj[p]
                rc = memcpy2d(dp + doff[p] + s * nb, dpitch, hp + hoff[p] + e * nb, spitch, nb, rows, H2D, stream)
                if rc:
                    raise RuntimeError(f"cudaMemcpy2DAsync {rc}")
        best = best_pass_gbps(torch, g, n_expert, n_miss, reps, sum(proj), copy_one)
        # the copies landed where the slots are: every slot written holds ones
        written = min(n_miss, n_slots)
        ok = all(int(dev[doff[p]:doff[p] + written * nb].sum()) == written * nb for p, nb in enumerate(proj))
        return round(best, 2), ok

    def contiguous(per_expert):
        host = torch.empty(n_expert * per_expert, dtype=torch.uint8).pin_memory()
        dev = torch.empty(n_slots * per_expert, dtype=torch.uint8, device="cuda")

        def copy_one(i, e):
            s = i % n_slots
            dev[s * per_expert:(s + 1) * per_expert].copy_(host[e * per_expert:(e + 1) * per_expert],
                                                           non_blocking=True)
        return round(best_pass_gbps(torch, g, n_expert, n_miss, reps, per_expert, copy_one), 2)

    q4k = [884736, 884736, 884736]            # the bench model: gate, down, up all Q4_K (2048 x 768)
    q4km = [884736, 884736, 1290240]          # Q4_K_M: gate, up Q4_K, down Q6_K
    for name, proj in (("q4k", q4k), ("q4km", q4km)):
        out[f"{name}_three_copies_gbps"], ok3 = run(proj, "three")
        out[f"{name}_2d_gbps"], ok2 = run(proj, "2d")
        out[f"{name}_one_contiguous_gbps"] = contiguous(sum(proj))
        out[f"{name}_bytes_ok"] = ok3 and ok2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
