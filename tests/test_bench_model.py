"""The GPU benchmark's target (scripts/make_bench_model.py, small scale): greedy output follows the
token permutation the generator chose, by a wide logit margin, one row at a time and in verify
batches alike, so every benchmarked system does the same work."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from spac_gguf.gguf_layout import read_gguf
from spac_gguf.llama_backend import LlamaContext, LlamaModel

ROOT = Path(__file__).resolve().parent.parent


def _maker():
    spec = importlib.util.spec_from_file_location("make_bench_model", ROOT / "scripts" / "make_bench_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_bench_model"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_small(tmp_path_factory):
    mk = _maker()
    out = tmp_path_factory.mktemp("bench-small")
    assert mk.main(["--out", str(out), "--scale", "small", "--only", "target"]) == 0
    path = out / "bench-target.gguf"
    types = np.asarray(read_gguf(path).kv["tokenizer.ggml.token_type"])
    m = LlamaModel(path)
    yield m, mk.next_token_map(types, seed=0)
    m.close()


def _chain(next_of: np.ndarray, start: int, n: int) -> list[int]:
    out, t = [], start
    for _ in range(n):
        t = int(next_of[t])
        out.append(t)
    return out


def test_greedy_follows_the_permutation_with_a_wide_margin(bench_small, threads):
    m, next_of = bench_small
    ctx = LlamaContext(m, n_ctx=128, n_threads=threads)
    prompt = m.tokenize("The history of the Roman Empire begins with", add_special=False)
    logits = ctx.decode(prompt, "last")[0]
    got, margins = [], []
    for _ in range(24):
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        t = int(np.argmax(logits))
        got.append(t)
        logits = ctx.decode([t], "last")[0]
    assert got == _chain(next_of, prompt[-1], 24)          # the generator's map is the oracle
    assert min(margins) > 10.0, margins                      # logits std is ~2 at this scale


def test_verify_batches_agree_with_one_row_decoding(bench_small, threads):
    """A 6-row verify batch over the true continuation argmaxes to the same tokens, row by row."""
    m, next_of = bench_small
    ctx = LlamaContext(m, n_ctx=128, n_threads=threads)
    prompt = m.tokenize("def quicksort(xs):", add_special=False)
    cont = _chain(next_of, prompt[-1], 30)
    ctx.decode(prompt[:-1], "last")
    rows = [prompt[-1]] + cont
    for i in range(0, 24, 6):
        lg = ctx.decode(rows[i:i + 6], "all")
        assert [int(np.argmax(r)) for r in lg] == cont[i:i + 6]
