"""Fuzzing GGUF parsing and loading: corrupted copies of the tiny test models must never crash.

Every case takes one tiny test model, corrupts one region of it (the fixed header, the key-value
section, the tensor-info section or the tensor data) by flipping a few bytes or by truncating it
there, and runs ``spac-gguf inspect FILE`` and ``spac-gguf run FILE -n 2`` on it.  Each must end
with exit code 0 or 2 (a one-line error), within its timeout: never exit 1 (an internal error),
never a signal (abort, segfault), never a hang and never a traceback.

A case is ``(source, region, kind, seed)`` and its bytes depend on nothing else, so a failure
reproduces: ``python tests/test_fuzz.py make SOURCE REGION KIND SEED OUT.gguf`` writes the file.

Speed: one Python process per command would cost ~1 s of imports each.  Instead a driver process
(this file run as a script) imports the CLI once and runs each command in a forked child (output
to files, its own timeout), so a crash in one case shows as that child's exit status and the batch
goes on.  Two drivers run side by side.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REGIONS = ("header", "kv", "tensor_info", "data")
KINDS = ("flip", "truncate")
SOURCES = tuple(f"{arch}:{role}" for arch in ("qwen3moe", "qwen2moe", "llama") for role in ("target", "draft"))
CASE_TIMEOUT_S = 60.0          # per command; a normal one takes well under a second
N_RANDOM_CASES = 320
BASE_SEED = 11                 # issue 11

# Cases that once crashed or hung (found by this fuzzer), kept so they stay fixed.
# (source, region, kind, seed): what the corruption did, and what happened before the fix.
REGRESSIONS: list[tuple[str, str, str, int]] = [
    # flips in the keys of qwen3moe.expert_used_count and ...layer_norm_rms_epsilon: with 8 experts
    # and no expert_used_count, llama.cpp aborted in load_hparams (GGML_ASSERT(n_expert_used_max > 0),
    # SIGABRT); now gguf_layout.check_hparams refuses it
    ("qwen3moe:target", "kv", "flip", 76),
    # rope.dimension_count (16) flipped to 268435472 / 33554448: llama.cpp's qwen3moe / qwen2moe graph
    # aborted (GGML_ASSERT(n_embd_head == n_rot)); and a draft's attention.key_length flipped:
    # qwen2's graph aborted (GGML_ASSERT(n_embd_head == hparams.n_embd_head_k())); now refused
    ("qwen3moe:target", "kv", "flip", 364),
    ("qwen2moe:target", "kv", "flip", 1036),
    ("qwen2moe:draft", "kv", "flip", 1048),
]


# ----------------------------------------------------------------------------------------------
# Making a corrupted copy
# ----------------------------------------------------------------------------------------------

def source_path(source: str) -> Path:
    from spac_gguf.testing import models as testmodels
    arch, role = source.split(":")
    target, draft = testmodels.make_pair(arch=arch, quant="Q8_0")
    return target if role == "target" else draft


def regions_of(path: Path) -> dict:
    """Byte spans of the sections of a valid GGUF (and the KV entries, for targeted flips)."""
    from spac_gguf.gguf_layout import read_gguf
    h = read_gguf(path, strings=False)
    ti_start = h.tensor_info_spans[0][1]
    ti_end = h.tensor_info_spans[-1][2]
    return {"header": (0, 24), "kv": (24, ti_start), "tensor_info": (ti_start, ti_end),
            "data": (h.data_offset, h.file_size), "kv_spans": [s[1:] for s in h.kv_spans]}


_INTERESTING = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0x10, 0x40)


def corrupt(data: bytes, regions: dict, region: str, kind: str, seed: int) -> bytes:
    """The corrupted copy of case (region, kind, seed) of `data` (a valid GGUF)."""
    rng = np.random.default_rng([BASE_SEED, REGIONS.index(region), KINDS.index(kind), seed])
    lo, hi = regions[region]
    if kind == "truncate":
        return data[:int(rng.integers(lo, hi))]
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        if region == "header":
            # the magic rarely (it only gives "not a GGUF"), the version and counts mostly
            pos = int(rng.integers(0, 4)) if rng.random() < 0.1 else int(rng.integers(4, 24))
        elif region == "kv" and rng.random() < 0.8:
            # the structure of a random KV pair: key length, key, value type, array header, scalar
            start, vstart, end = regions["kv_spans"][int(rng.integers(len(regions["kv_spans"])))]
            pos = int(rng.integers(start, min(end, vstart + 16)))
        else:
            pos = int(rng.integers(lo, hi))
        r = rng.random()
        if r < 0.5:
            buf[pos] ^= 1 << int(rng.integers(8))
        elif r < 0.8:
            buf[pos] = _INTERESTING[int(rng.integers(len(_INTERESTING)))]
        else:
            buf[pos] = int(rng.integers(256))
    return bytes(buf)


def random_cases(n: int = N_RANDOM_CASES) -> list[tuple[str, str, str, int]]:
    """n cases spread evenly over sources x regions x kinds (flips twice as often as truncations)."""
    combos = [(r, k) for r in REGIONS for k in ("flip", "flip", "truncate")]
    cases = []
    for i in range(n):
        region, kind = combos[i % len(combos)]
        cases.append((SOURCES[(i // len(combos)) % len(SOURCES)], region, kind, i))
    return cases


# ----------------------------------------------------------------------------------------------
# The driver: runs a batch of cases, each command in a forked child
# ----------------------------------------------------------------------------------------------

COMMANDS = {
    "inspect": lambda f: ["inspect", f],
    "run": lambda f: ["run", f, "-n", "2", "-p", "hi", "-t", "1", "-c", "64"],
}


def _child(args: list[str], out: str, err: str) -> None:
    """In the forked child: run the CLI's entry point with stdout/stderr in files; never returns."""
    code = 1
    try:
        fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fe = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fo, 1)
        os.dup2(fe, 2)
        from spac_gguf.cli import app
        try:
            app(args=args, prog_name="spac-gguf")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported as a traceback in the error file
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_forked(args: list[str], out: str, err: str, timeout: float) -> dict:
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(args, out, err)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"status": "hang", "seconds": round(time.monotonic() - t0, 2)}
        time.sleep(0.005)
    res = {"seconds": round(time.monotonic() - t0, 2)}
    if os.WIFSIGNALED(status):
        res.update(status="signal", code=os.WTERMSIG(status))
    else:
        res.update(status="exit", code=os.WEXITSTATUS(status))
    res["stderr"] = Path(err).read_text(errors="replace")[-4000:]
    return res


def drive(cases_file: str, workdir: str) -> None:
    """Run the cases in `cases_file` (JSON list); print one JSON line per case."""
    import spac_gguf.cli  # noqa: F401 - import (and load llama.cpp) once, before forking
    import spac_gguf.gguf_layout  # noqa: F401
    import spac_gguf.llama_backend  # noqa: F401
    import spac_gguf.pair  # noqa: F401
    cases = json.loads(Path(cases_file).read_text())
    wd = Path(workdir)
    srcs: dict[str, tuple[bytes, dict]] = {}
    for source, region, kind, seed in cases:
        if source not in srcs:
            p = source_path(source)
            srcs[source] = (p.read_bytes(), regions_of(p))
        data, regions = srcs[source]
        f = wd / f"{source.replace(':', '-')}-{region}-{kind}-{seed}.gguf"
        f.write_bytes(corrupt(data, regions, region, kind, seed))
        result = {"case": [source, region, kind, seed], "file": str(f)}
        for name, argv in COMMANDS.items():
            result[name] = run_forked(argv(str(f)), str(f) + f".{name}.out", str(f) + f".{name}.err",
                                      CASE_TIMEOUT_S)
        if not any(_problem(result[n]) for n in COMMANDS):
            for g in wd.glob(f.name + "*"):
                g.unlink()
        print(json.dumps(result), flush=True)


def _problem(r: dict) -> str | None:
    """Why a command's result is a failure, or None."""
    if r["status"] == "hang":
        return f"hang (killed after {r['seconds']} s)"
    if r["status"] == "signal":
        return f"killed by signal {r['code']} ({signal.Signals(r['code']).name})"
    if r["code"] not in (0, 2):
        return f"exit code {r['code']}"
    if "Traceback" in r["stderr"]:
        return "traceback"
    if r["code"] == 2:
        # exactly our one-line error; where llama.cpp itself refuses the file, its reason is in it
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        if len(lines) != 1 or not lines[0].startswith("spac-gguf: "):
            return "exit 2 without exactly one error line"
    return None


def run_cases(cases: list, workdir: Path, n_drivers: int = 2, timeout: float = 1800) -> list[dict]:
    """Run cases over `n_drivers` driver processes side by side; their results, in case order."""
    batches = [cases[i::n_drivers] for i in range(n_drivers)]
    procs = []
    for i, batch in enumerate(batches):
        if not batch:
            continue
        cf = workdir / f"cases-{i}.json"
        cf.write_text(json.dumps(batch))
        procs.append(subprocess.Popen([sys.executable, __file__, "drive", str(cf), str(workdir)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    deadline = time.monotonic() + timeout
    for p in procs:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert p.returncode == 0, f"fuzz driver failed ({p.returncode}): {err[-3000:]}"
        results += [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    order = {tuple(c): i for i, c in enumerate(cases)}
    return sorted(results, key=lambda r: order[tuple(r["case"])])


def _failures(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        for name in COMMANDS:
            why = _problem(r[name])
            if why:
                last = (r[name].get("stderr") or "").strip().splitlines()[-3:]
                out.append(f"{name} {tuple(r['case'])}: {why}: {' | '.join(last)}")
    return out


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

def test_corruption_is_deterministic_and_in_region():
    p = source_path("llama:draft")
    data = p.read_bytes()
    regions = regions_of(p)
    for region in REGIONS:
        lo, hi = regions[region]
        a = corrupt(data, regions, region, "flip", 3)
        assert a == corrupt(data, regions, region, "flip", 3)
        diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(data, np.uint8))
        assert diff.size and lo <= diff.min() and diff.max() < hi, region
        t = corrupt(data, regions, region, "truncate", 3)
        assert lo <= len(t) < hi


def test_fuzz_gguf(tmp_path):
    cases = [tuple(c) for c in REGRESSIONS] + random_cases()
    n_drivers = max(1, min(2, os.cpu_count() or 1))
    t0 = time.monotonic()
    results = run_cases(cases, tmp_path, n_drivers=n_drivers)
    elapsed = time.monotonic() - t0
    assert len(results) == len(cases)
    fails = _failures(results)
    codes = {name: {c: sum(1 for r in results if r[name].get("code") == c) for c in (0, 2)} for name in COMMANDS}
    by_llama = sum(1 for r in results if "spac-gguf: llama.cpp could not load" in r["run"].get("stderr", ""))
    print(f"\nfuzz: {len(cases)} cases in {elapsed:.1f} s on {n_drivers} drivers; exit codes {codes}; "
          f"{by_llama} refused by llama.cpp itself (the rest of the exit-2 runs by our checks)")
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:40])
    # the cases must exercise both outcomes: some corruptions are harmless, most are rejected
    assert codes["inspect"][2] > len(cases) // 4 and codes["run"][0] > 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["drive"]:
        drive(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["make"]:       # make SOURCE REGION KIND SEED OUT: write one case's file
        src, region, kind, seed, out = sys.argv[2:7]
        p = source_path(src)
        Path(out).write_bytes(corrupt(p.read_bytes(), regions_of(p), region, kind, int(seed)))
    else:
        sys.exit("usage: test_fuzz.py drive CASES.json WORKDIR | make SOURCE REGION KIND SEED OUT.gguf")
