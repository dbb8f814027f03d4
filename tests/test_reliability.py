"""Never abort, never hang (issue 11): batch limits, use after close, two callers, bad traces, a full
context, --seed -1. Crash-prone cases run in a subprocess, so an abort fails the test, not the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from spac_gguf.testing import models as testmodels
from spac_gguf.llama_backend import BackendError, LlamaContext, LlamaModel
from spac_gguf.pair import load
from spac_gguf.trace import RoutingTrace

from conftest import n_test_threads
from test_cli import assert_clean_error, cli

LONG = "The history of the city begins with a small village by the river, " * 6


@pytest.fixture(scope="module")
def qwen():
    return testmodels.make_pair(arch="qwen3moe", quant="Q8_0")


def test_small_context_long_prompt_and_large_k_do_not_abort(qwen):
    """-c 64: llama.cpp caps a decode at 64 rows and pads n_ctx to 256. A 100+ token prompt and
    --draft-max 100 used to hit GGML_ASSERT(n_tokens_all <= n_batch) (exit 134)."""
    r = cli("run", str(qwen[0]), "-md", str(qwen[1]), "-c", "64", "-p", LONG, "-n", "8", "--draft-max", "100",
            "--no-adaptive", "-t", str(n_test_threads()), "--json")
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    out = json.loads(r.stdout)
    assert out["n_generated"] == 8
    assert out["stats"]["n_prompt"] > 64
    assert "K capped at 63" in r.stderr and "pads the context to 256" in r.stderr


def test_context_full_says_so(qwen):
    r = cli("run", str(qwen[0]), "-c", "256", "-p", LONG, "-n", "400", "-t", str(n_test_threads()))
    assert r.returncode == 0, r.stderr
    assert "context full after" in r.stderr and "raise -c" in r.stderr


def test_use_after_close_raises(qwen, threads):
    p = load(qwen[0], qwen[1], n_ctx=128, n_threads=threads)
    p.close()
    p.close()                                            # idempotent
    with pytest.raises(BackendError, match="closed"):
        list(p.generate("hi", max_tokens=2))
    with pytest.raises(BackendError, match="closed"):
        p.tokenize("hi")
    m = LlamaModel(qwen[0])
    ctx = LlamaContext(m, n_ctx=64, n_threads=1)
    ctx.close()
    with pytest.raises(BackendError, match="closed"):
        ctx.decode([1, 2])
    m.close()
    with pytest.raises(BackendError, match="closed"):
        m.tokenize("hi")


def test_one_generation_at_a_time(qwen, threads):
    p = load(qwen[0], qwen[1], n_ctx=128, n_threads=threads)
    g = p.generate("Once upon a time", max_tokens=6, draft_max=2)
    first = next(g)                                      # this generation now owns the pair
    errors = []

    def second():
        try:
            list(p.generate("hello", max_tokens=2))
        except BackendError as e:
            errors.append(str(e))
    t = threading.Thread(target=second)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and errors and "already generating" in errors[0]
    with pytest.raises(BackendError, match="unfinished"):
        p.close()
    rest = [tok.token for tok in g]
    assert len(rest) == 5 and first.token >= 0
    assert len(list(p.generate("hello", max_tokens=2))) == 2    # free again
    p.close()


def test_bad_traces_are_one_line_errors(qwen, tmp_path):
    not_npz = tmp_path / "trace.npz"
    not_npz.write_bytes(b"\x80\x04\x95 this is a pickle, not a trace")
    r = cli("simulate", str(not_npz), "--cache-slots", "2")
    assert_clean_error(r, "not a routing trace")
    assert "pickle" not in r.stderr.lower()
    good = tmp_path / "good.npz"
    r = cli("run", str(qwen[0]), "-p", "hi", "-n", "6", "--trace", str(good), "-t", "1")
    assert r.returncode == 0, r.stderr
    tr = RoutingTrace.load(good)
    for bad_id in (tr.n_expert, -2):
        ids = tr.ids.copy()
        ids[0, tr.meta["moe_layers"][0], 0] = bad_id
        bad = tmp_path / f"bad{bad_id}.npz"
        RoutingTrace(ids, tr.pass_start, tr.accepted, tr.meta).save(bad)
        assert_clean_error(cli("simulate", str(bad), "--cache-slots", "2"), "outside")
    short = tmp_path / "short.npz"
    np.savez(short, ids=tr.ids, pass_start=tr.pass_start, meta=np.array(json.dumps(tr.meta)))
    assert_clean_error(cli("simulate", str(short), "--cache-slots", "2"), "accepted")


def test_seed_minus_one_means_random(qwen):
    r = cli("run", str(qwen[0]), "-p", "hi", "-n", "3", "--temp", "0.8", "--seed", "-1", "-t", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert_clean_error(cli("run", str(qwen[0]), "-p", "hi", "-n", "3", "--seed", "-5"), "--seed")


def test_ctrl_c_while_loading_exits_130_without_traceback(qwen):
    """A SIGINT delivered during llama.cpp's model load (injected at its first progress report) stops
    the load: exit 130, one line, no traceback, no generated text."""
    import subprocess
    import sys
    env = dict(os.environ, SPAC_TEST_SIGINT_AT_LOAD="1")
    r = subprocess.run([sys.executable, "-m", "spac_gguf.cli", "run", str(qwen[0]), "-p", "hi", "-n", "4", "-t", "1"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 130, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stdout.strip() == ""
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == ["spac-gguf: interrupted"]


def test_trace_path_that_cannot_be_written(qwen, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):                       # root ignores directory modes: use a missing dir
            target = tmp_path / "no-such-dir" / "t.npz"
        else:
            target = ro / "t.npz"
        assert_clean_error(cli("run", str(qwen[0]), "-p", "hi", "-n", "2", "--trace", str(target)), "--trace")
    finally:
        ro.chmod(0o700)


def test_trace_write_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves neither a half trace nor a temporary file."""
    tr = RoutingTrace(np.zeros((2, 1, 1), np.int32), np.array([0], np.int32), np.array([2], np.int32),
                      {"n_expert": 4})
    path = tmp_path / "t.npz"
    tr.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError):
        RoutingTrace(tr.ids + 1, tr.pass_start, tr.accepted, tr.meta).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]


def test_an_abort_inside_ggml_is_one_line_and_exit_2():
    """GGML_ABORT (a CUDA error during a copy, a failed internal check) used to end in a backtrace and
    SIGABRT (exit 134): now one line and exit 2. Triggered through ggml's own abort entry point."""
    code = ("from spac_gguf import llama_backend as lb\n"
            "lb._init_backend()\n"
            "lb._sibling_lib('ggml-base').ggml_abort(b'ggml-cuda.cu', 88, b'CUDA error: %s', b'an illegal memory access')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CUDA error: an illegal memory access" in lines[0], r.stderr
    # as ggml-cuda does it: the cause is logged as an error first, the abort text is short; where the
    # caller holds error lines back (a load, the cache's allocation), the one line still names the cause
    code = ("from spac_gguf import llama_backend as lb\n"
            "with lb.errors_worded_by_caller():\n"
            "    lb._ERRORS.append('CUDA error: out of memory\\n')\n"
            "    lb._sibling_lib('ggml-base').ggml_abort(b'ggml-cuda.cu', 109, b'CUDA error')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "(CUDA error: out of memory)" in lines[0], r.stderr
