"""The CLI: bad input gives one line on stderr and exit code 2; good input prints text and stats."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spac_gguf import native
from spac_gguf.testing import models as testmodels

from conftest import n_test_threads


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spac_gguf.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_clean_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def qwen():
    return testmodels.make_pair(arch="qwen3moe", quant="Q8_0")


@pytest.fixture(scope="module")
def llama_pair():
    return testmodels.make_pair(arch="llama", quant="Q8_0")


def test_missing_file(tmp_path):
    assert_clean_error(cli("run", str(tmp_path / "nope.gguf"), "-n", "4"), "not found")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_text("hello, I am not a model\n" * 10)
    assert_clean_error(cli("run", str(f), "-n", "4"), "GGUF")


def test_truncated_gguf(tmp_path, qwen):
    data = qwen[0].read_bytes()
    f = tmp_path / "trunc.gguf"
    f.write_bytes(data[: len(data) // 2])
    assert_clean_error(cli("run", str(f), "-n", "4"), "truncated")


def test_draft_vocab_mismatch(qwen, llama_pair):
    r = cli("run", str(qwen[0]), "--draft", str(llama_pair[1]), "-n", "4")
    assert_clean_error(r, "151936", "32000")


@pytest.mark.parametrize("args,needle", [(["--draft-max", "-1"], "--draft-max"), (["-n", "0"], "-n")])
def test_bad_numbers(qwen, args, needle):
    assert_clean_error(cli("run", str(qwen[0]), "--draft", str(qwen[1]), *args), needle)


def test_dense_target_runs_with_notice(llama_pair):
    r = cli("run", str(llama_pair[1]), "-n", "4", "-t", str(n_test_threads()), "--json")
    assert r.returncode == 0, r.stderr
    assert "dense" in r.stderr and "expert features are off" in r.stderr
    out = json.loads(r.stdout)
    assert out["routing"] is None and out["n_generated"] == 4


def test_run_json_and_trace(qwen, tmp_path):
    tr = tmp_path / "trace.npz"
    r = cli("run", str(qwen[0]), "-md", str(qwen[1]), "-p", "Hello", "-n", "12", "--draft-max", "3",
            "-t", str(n_test_threads()), "--trace", str(tr), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("tokens", "text", "n_generated", "n_target_passes", "acceptance_rate", "tokens_per_second",
                "routing"):
        assert key in out
    assert out["n_generated"] == len(out["tokens"]) == 12
    assert out["routing"] == {"layers": 4, "experts": 8, "used": 2}
    plain = json.loads(cli("run", str(qwen[0]), "-p", "Hello", "-n", "12", "-t", str(n_test_threads()),
                           "--json").stdout)
    assert plain["tokens"] == out["tokens"] and plain["acceptance_rate"] is None
    assert tr.exists()


def test_inspect_json(qwen):
    r = cli("inspect", str(qwen[0]), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["n_expert"] == 8


@pytest.mark.skipif(not native.available(), reason="needs our patched llama.cpp build")
def test_lru_cache_is_lossless_and_hits(qwen):
    base = ["run", str(qwen[0]), "-md", str(qwen[1]), "-p", "Once upon a time", "-n", "32", "--draft-max", "3",
            "-t", str(n_test_threads()), "--json"]
    plain = json.loads(cli(*base, "--policy", "none").stdout)
    r = cli(*base, "--policy", "lru", "--cache-slots", "4")
    assert r.returncode == 0, r.stderr
    lru = json.loads(r.stdout)
    assert lru["tokens"] == plain["tokens"]
    c = lru["cache"]
    assert c["policy"] == "lru" and c["slots_per_layer"] == 4
    assert c["hits"] > 0 and c["bytes_loaded"] > 0


@pytest.mark.skipif(not native.available(), reason="needs our patched llama.cpp build")
def test_cache_bad_args(qwen):
    assert_clean_error(cli("run", str(qwen[0]), "--policy", "lru", "--cache-slots", "99", "-n", "2"), "cache-slots")
    assert_clean_error(cli("run", str(qwen[0]), "--policy", "static", "--cache-slots", "2", "-n", "2"), "calibration")
    assert_clean_error(cli("run", str(qwen[0]), "--policy", "none", "--cache-slots", "2", "--inpass", "-n", "2"),
                       "inpass")


@pytest.mark.skipif(not native.available(), reason="needs our patched llama.cpp build")
def test_every_policy_is_lossless(qwen, tmp_path):
    """static (calibrated on a recorded trace), lfu and spac: same tokens as no cache."""
    base = ["run", str(qwen[0]), "-md", str(qwen[1]), "-p", "def main():", "-n", "24", "--draft-max", "4",
            "-t", str(n_test_threads()), "--json"]
    calib = tmp_path / "calib.npz"
    plain = json.loads(cli(*base, "--trace", str(calib)).stdout)
    assert calib.exists()
    for extra in (["--policy", "static", "--calibration", str(calib)], ["--policy", "lfu"],
                  ["--policy", "spac", "--hw", "laptop-pcie4x8"], ["--policy", "lru", "--inpass"],
                  ["--policy", "spac", "--hw", "laptop-pcie4x8", "--inpass"]):
        r = cli(*base, *extra, "--budget", "50%")
        assert r.returncode == 0, (extra, r.stderr)
        out = json.loads(r.stdout)
        assert out["tokens"] == plain["tokens"], extra
        assert out["cache"]["policy"] == extra[1] and out["cache"]["slots_per_layer"] == 4
        assert out["cache"]["inpass"] == ("--inpass" in extra)
        assert (out["cache"]["inpass_loads"] > 0) == ("--inpass" in extra), extra


def test_prompt_escapes_like_llama_cpp():
    from spac_gguf.cli import unescape
    assert unescape(r"a\nb\tc") == "a\nb\tc"
    assert unescape(r"keep \\n and \x") == "keep \\n and \\x"
    assert unescape("plain é") == "plain é"


def test_expert_pattern_selects_layers():
    """`--n-cpu-moe`-style placement: the override regex names only the given layers' experts."""
    import re
    from spac_gguf.llama_backend import expert_pattern
    names = [f"blk.{i}.ffn_{p}_exps.weight" for i in (0, 1, 2, 12) for p in ("up", "gate", "down")]
    names += ["blk.1.ffn_up.weight", "blk.1.ffn_gate_inp.weight", "blk.1.attn_q.weight"]
    every = [n for n in names if re.search(expert_pattern(), n)]
    assert len(every) == 12
    some = [n for n in names if re.search(expert_pattern((1, 2)), n)]
    assert sorted(some) == sorted(f"blk.{i}.ffn_{p}_exps.weight" for i in (1, 2) for p in ("up", "gate", "down"))


def cli_in_terminal(*args: str, timeout: int = 120) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI with stderr a terminal (a pty) and stdout a pipe."""
    import os
    import pty
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm")
    p = subprocess.Popen([sys.executable, "-m", "spac_gguf.cli", *args], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 4096)
        except OSError:
            break
        if not b:
            break
        chunks.append(b)
    out = p.stdout.read().decode()
    p.wait(timeout=timeout)
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode("utf-8", "replace")


def test_status_line_in_a_terminal_only(qwen):
    """With stderr a terminal (a pty here) the run shows a live status line and erases it before the
    summary; with stderr a pipe (every other test) there is no escape code at all."""
    t, d = qwen
    rc, _, err = cli_in_terminal("run", str(t), "--draft", str(d), "-n", "24", "-t", str(n_test_threads()),
                                 "-p", "Hello")
    assert rc == 0
    assert "\r\x1b[K\x1b[2m[" in err and "tok/s" in err          # the status was drawn
    summary = err.split("\r\x1b[K")[-1]                           # what is left after the last erase
    assert summary.lstrip().startswith("[24 tokens") and "\x1b[2m" not in summary
    plain = cli("run", str(t), "--draft", str(d), "-n", "8", "-t", str(n_test_threads()))
    assert "\x1b[" not in plain.stderr


def test_calibrate_spinner_in_a_terminal_only():
    """calibrate prints its [hw.NAME] table on stdout either way; a spinner runs on stderr only when
    stderr is a terminal, and is erased (transient) before the command ends."""
    rc, out, err = cli_in_terminal("calibrate", "--name", "here")
    assert rc == 0 and out.startswith("[hw.here]") and "cpu_expert_gbps" in out
    assert "measuring CPU streaming bandwidth" in err
    assert err.endswith("\x1b[2K")                      # the last thing drawn is the erase
    plain = cli("calibrate", "--name", "here")
    assert plain.returncode == 0 and plain.stdout.startswith("[hw.here]") and plain.stderr == ""
