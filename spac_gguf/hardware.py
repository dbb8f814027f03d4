"""Hardware profiles: the few rates the cost model and the balancer need, named or measured.

A profile prices one verify pass: experts not in GPU slots stream through the CPU expert path
(`cpu_expert_gbps` of expert bytes, plus `cpu_s_per_expert_token` per routed row), cached experts
cost `gpu_s_per_expert_token` per routed row on top of the dense part (`gpu_pass_s`), and slot loads
move `link_gbps` over the host→GPU link while the draft proposes (`draft_s_per_token` each).
"""
from __future__ import annotations

import dataclasses
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .registry import MODELS_TOML


# one Qwen3-30B-A3B expert in Q4_K (gate + up + down, 2048 x 768): the unit of the per-row costs
REF_EXPERT_BYTES = 2_654_208


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    link_gbps: float | None                 # host→GPU copies from pinned memory, GB/s (1e9 B/s)
    cpu_expert_gbps: float                  # expert bytes per second the CPU expert path streams
    cpu_s_per_expert_token: float           # CPU compute per (expert, row) beyond streaming its bytes *
    gpu_s_per_expert_token: float | None    # GPU compute per (expert, row) for an expert in a slot *
    # * for a reference expert of REF_EXPERT_BYTES; per-row costs scale with the expert's bytes
    #   (its FLOPs), so the same profile prices a 66 KB SmolLM2 expert and a 2.65 MB Qwen3 one
    gpu_pass_s: float | None                # dense work of one verify pass on the GPU (attention, router, head)
    draft_s_per_token: float | None         # one draft token
    # fixed cost per MoE layer of the CPU's part of a split pass (its threads start), net of the slot
    # branch's GPU work that runs beside it (the model's GPU side counts uploads only), in parallel
    # with the uploads; the split also pays one `stop_s` that nothing overlaps. Fitted on the H200 to
    # K = 0 share sweeps (docs/BENCHMARKS.md, sessions 8 and 9: ~0 since the plan stop hands the
    # host branch its inputs); elsewhere, until measured, the first fit's 250 us per split less the stop
    host_branch_s: float = 1.8e-4
    # one more stop of a pass per layer (a sync between GPU and host; the plan runs at one): a pass
    # whose experts exceed the slots runs in row chunks, one stop each. Fitted on the H200 from K = 5
    # verify passes, 3 chunks vs a split (docs/BENCHMARKS.md, "the split rule"): about 70 us
    stop_s: float = 7e-5

    def row_scale(self, expert_bytes: int) -> float:
        """Factor on the per-row costs for experts of `expert_bytes`."""
        return float(expert_bytes) / REF_EXPERT_BYTES

    def expert_costs(self, rows, expert_bytes: int, p_need=1.0):
        """The one cost model (seconds, per (layer, expert), numpy-broadcast): for an expert routed
        `rows` rows in a pass that needs its bytes with probability p_need, (cpu, gpu, copy):
        cpu = stream its bytes on the CPU + per-row compute; gpu = per-row compute in a slot;
        copy = upload its bytes over the link + the GPU's compute. The balancer prices expected
        demand with it, the simulator actual rows, the per-pass split one expert."""
        self.require_complete()
        r = self.row_scale(expert_bytes)
        gpu = rows * self.gpu_s_per_expert_token * r
        cpu = p_need * expert_bytes / (self.cpu_expert_gbps * 1e9) + rows * self.cpu_s_per_expert_token * r
        copy = p_need * expert_bytes / (self.link_gbps * 1e9) + gpu
        return cpu, gpu, copy

    def missing(self) -> list[str]:
        """Fields still unknown (None): a calibrated profile without a GPU leaves the GPU ones open."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]

    def require_complete(self) -> "HardwareProfile":
        if self.missing():
            raise ValueError(f"hardware profile {self.name!r} lacks {', '.join(self.missing())}: "
                             f"take them from a named profile (calibrate(base=...)) or models.toml [hw.*]")
        return self

    def link_bytes_during_draft(self, k_draft: int) -> int:
        """Bytes the link moves while the draft proposes k_draft tokens: the link bytes per round (loads between passes)."""
        self.require_complete()
        return int(self.link_gbps * 1e9 * self.draft_s_per_token * k_draft)

    def to_toml(self) -> str:
        lines = [f"[hw.{self.name}]"]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "name" and v is not None:
                lines.append(f"{f.name} = {v:g}" if isinstance(v, float) else f"{f.name} = {v}")
        return "\n".join(lines) + "\n"


# GPU and draft timings of the first two are estimates for a mid-range laptop / desktop GPU with a
# 0.1–0.5B draft; the link rates are what PCIe 4.0 x8 / x16 deliver from pinned memory. h100-pcie5
# takes DESIGN.md §9: H2D pinned 51 GB/s, CPU expert streaming ≈ 41 GB/s; a 6-row verify pass with
# all experts on GPU ≈ 9 ms (pp6 665 t/s) of which ≈ 5 ms dense, the rest over 6×48×8 expert-rows.
BUILTIN: dict[str, HardwareProfile] = {p.name: p for p in (
    HardwareProfile("laptop-pcie4x8", link_gbps=13.0, cpu_expert_gbps=25.0, cpu_s_per_expert_token=2e-6,
                    gpu_s_per_expert_token=1e-6, gpu_pass_s=0.012, draft_s_per_token=0.004),
    HardwareProfile("desktop-pcie4x16", link_gbps=25.0, cpu_expert_gbps=35.0, cpu_s_per_expert_token=1.5e-6,
                    gpu_s_per_expert_token=5e-7, gpu_pass_s=0.008, draft_s_per_token=0.003),
    HardwareProfile("h100-pcie5", link_gbps=51.0, cpu_expert_gbps=41.0, cpu_s_per_expert_token=1e-6,
                    gpu_s_per_expert_token=2e-7, gpu_pass_s=0.005, draft_s_per_token=0.002),
    HardwareProfile("h200-pcie5", link_gbps=46.0, cpu_expert_gbps=45.0, cpu_s_per_expert_token=1e-6,
                    gpu_s_per_expert_token=2e-7, gpu_pass_s=0.006, draft_s_per_token=0.002, host_branch_s=0.0),
)}


def _from_table(name: str, table: dict) -> HardwareProfile:
    known = {f.name for f in dataclasses.fields(HardwareProfile)} - {"name"}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"[hw.{name}]: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    defaults = {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(HardwareProfile)}
    base = dataclasses.asdict(BUILTIN[name]) if name in BUILTIN else {k: defaults[k] for k in known}
    base.update({k: float(v) for k, v in table.items()})
    base["name"] = name
    if base.get("cpu_expert_gbps") is None or base.get("cpu_s_per_expert_token") is None:
        raise ValueError(f"[hw.{name}] needs cpu_expert_gbps and cpu_s_per_expert_token")
    return HardwareProfile(**base)


def load_profile(name_or_path: str, models_toml: str | Path | None = None) -> HardwareProfile:
    """A profile by name ([hw.NAME] in models.toml first, then the built-ins) or from a TOML file.

    A file holds one `[hw.NAME]` table (the first is taken) — what `calibrate` writes with `to_toml`.
    """
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        hw = tomllib.loads(p.read_text()).get("hw", {})
        if not hw:
            raise ValueError(f"{p}: no [hw.NAME] table")
        name, table = next(iter(hw.items()))
        return _from_table(name, table)
    toml_path = Path(models_toml) if models_toml is not None else MODELS_TOML
    tables = tomllib.loads(toml_path.read_text()).get("hw", {}) if toml_path.is_file() else {}
    if name_or_path in tables:
        return _from_table(name_or_path, tables[name_or_path])
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    raise ValueError(f"unknown hardware profile {name_or_path!r}; known: {sorted(set(BUILTIN) | set(tables))}")


def measure_cpu_stream_gbps(nbytes: int = 256 << 20, repeats: int = 5, threads: int | None = None) -> float:
    """Best-of-n read bandwidth of a large float32 reduction over `threads` threads (default: every
    core, as llama.cpp's CPU expert path runs): that path's ceiling. numpy releases the GIL in sum()."""
    from concurrent.futures import ThreadPoolExecutor
    n = max(1, threads or os.cpu_count() or 1)
    a = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(a, n)
    best = float("inf")
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(np.sum, parts))
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


# llama.cpp's CPU expert path (quantised matrix-vector products over every core) reads expert bytes at
# about 0.61 of what a plain streaming reduction reaches: 45 vs 73.6 GB/s on the H200 host (models.toml
# [hw.h200-pcie5], DESIGN.md §10). Calibration scales its streaming measurement by it.
EXPERT_PATH_EFFICIENCY = 0.61


def calibrate(name: str | None = None, base: str | HardwareProfile | None = None) -> HardwareProfile:
    """Measure what this machine tells without a GPU (CPU streaming, scaled to the expert path); GPU
    fields from `base` or None.

    The CPU per-row compute is left at the base's value (0 without one): at verify batch sizes the
    CPU expert path is bandwidth-bound, so streaming dominates.
    """
    b = load_profile(base) if isinstance(base, str) else base
    gbps = measure_cpu_stream_gbps() * EXPERT_PATH_EFFICIENCY
    if b is None:                                       # no GPU fields to take, no per-row CPU compute
        b = HardwareProfile("", link_gbps=None, cpu_expert_gbps=0.0, cpu_s_per_expert_token=0.0,
                            gpu_s_per_expert_token=None, gpu_pass_s=None, draft_s_per_token=None)
    return dataclasses.replace(b, name=name or f"calibrated-{os.uname().nodename}", cpu_expert_gbps=round(gbps, 2))


def closest_profile(device_name: str) -> str:
    """The named profile whose GPU and link a device is most like (its GPU fields seed a calibration)."""
    d = device_name.upper()
    if "H200" in d or "H100" in d or "GH200" in d:
        return "h200-pcie5" if "H200" in d else "h100-pcie5"
    if any(m in d for m in ("LAPTOP", "MOBILE", "ORIN", "MAX-Q")):
        return "laptop-pcie4x8"
    return "desktop-pcie4x16"


def _machine_key(device_name: str, device_total: int) -> str:
    """What would change the profile: the GPU (name, memory), its driver, the CPU model and core count."""
    import hashlib
    import platform
    parts = ["v4", device_name, str(device_total), platform.machine(), str(os.cpu_count())]   # v4: host inputs at the plan
    for path in ("/proc/driver/nvidia/version", "/proc/cpuinfo"):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        line = next((ln for ln in text.splitlines() if ln.startswith(("NVRM", "model name"))), "")
        parts.append(line)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def machine_profile(device_name: str, device_total: int, cache_dir: Path) -> tuple[Path, bool]:
    """This machine's profile as a TOML file: calibrated (seconds) on top of the closest named profile
    the first time, then read from `cache_dir/hw/<key>.toml`; a new GPU, driver or CPU is a new key,
    so it is measured again. Returns (path, whether it was measured now)."""
    path = Path(cache_dir) / "hw" / f"{_machine_key(device_name, device_total)}.toml"
    if path.is_file():
        try:
            load_profile(str(path))
            return path, False
        except (ValueError, OSError, tomllib.TOMLDecodeError):
            pass                                         # unreadable: measure again
    import tempfile
    base = closest_profile(device_name)
    prof = calibrate(name=f"{base}-calibrated", base=base)
    text = f"# {device_name}: {base} with this machine's CPU streaming measured\n" + prof.to_toml()
    try:                                             # a file of our own, then one rename: runs may race
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:                                  # a read-only cache: measured, just not kept
        path = Path(tempfile.gettempdir()) / f"spac-gguf-hw-{os.getpid()}.toml"
        path.write_text(text)
    return path, True
