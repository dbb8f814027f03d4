"""The generated test pairs: deterministic across processes, <= 32 MB, real tokenizers, loadable
and decodable by our llama.cpp build, draft and target compatible (and agreeing sometimes)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spac_gguf.testing import models as testmodels
from spac_gguf.gguf_layout import read_gguf

MAX_BYTES = 32 * 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_deterministic_across_processes(tmp_path):
    """A fresh interpreter (different hash seed) writes the same bytes as this one."""
    a = testmodels.build_pair(tmp_path / "a", "llama", "Q4_0")
    code = ("import sys; from spac_gguf.testing import models as t; "
            "t.build_pair(sys.argv[1], 'llama', 'Q4_0')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, cwd=ROOT,
                   env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin",
                        "HOME": str(Path.home()), "PYTHONPATH": str(ROOT)})
    b = (tmp_path / "b" / "llama-target.gguf", tmp_path / "b" / "llama-draft.gguf")
    assert [_sha(p) for p in a] == [_sha(p) for p in b]
    # and the content-keyed cache holds the same bytes
    c = testmodels.make_pair(arch="llama", quant="Q4_0")
    assert [_sha(p) for p in a] == [_sha(p) for p in c]


def test_make_pair_out_dir_and_keys(tmp_path):
    t, d = testmodels.make_pair(tmp_path, "llama", "Q8_0")
    assert (t.name, d.name) == ("llama-target.gguf", "llama-draft.gguf") and t.parent == tmp_path
    ct, _ = testmodels.make_pair(arch="llama", quant="Q8_0")
    assert _sha(t) == _sha(ct)
    keys = {testmodels.pair_key(a, q) for a in testmodels.ARCHS for q in testmodels.QUANTS}
    assert len(keys) == len(testmodels.ARCHS) * len(testmodels.QUANTS)
    with pytest.raises(ValueError):
        testmodels.make_pair(tmp_path, "mixtral", "Q8_0")
    with pytest.raises(ValueError):
        testmodels.make_pair(tmp_path, "llama", "Q5_K")


@pytest.mark.parametrize("arch_name", testmodels.ARCHS)
def test_sizes_structure_and_vocab(arch_name):
    spec = testmodels.SPECS[arch_name]
    t, d = testmodels.make_pair(arch=arch_name, quant="F16")  # F16: the largest variant
    assert t.stat().st_size <= MAX_BYTES and d.stat().st_size <= MAX_BYTES
    ht, hd = read_gguf(t), read_gguf(d)
    assert ht.kv["general.architecture"] == arch_name
    assert hd.kv["general.architecture"] == spec.draft_arch
    names_t = {x.name for x in ht.tensors}
    names_d = {x.name for x in hd.tensors}
    for i in range(spec.n_layer):
        for n in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            assert f"blk.{i}.{n}.weight" in names_t
        shexp = {f"blk.{i}.{n}.weight" for n in ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp",
                                                   "ffn_down_shexp")}
        assert (shexp <= names_t) == (arch_name == "qwen2moe")
    assert not any("exps" in n or "gate_inp" in n for n in names_d)
    # same tokenizer, copied verbatim from the sdist's vocab file
    hv = read_gguf(testmodels.vocab_path(spec.vocab_file))
    tok_keys = [k for k in hv.kv if k.startswith("tokenizer.")]
    assert tok_keys and len(hv.kv["tokenizer.ggml.tokens"]) in (32000, 151936)
    for h in (ht, hd):
        for k in tok_keys:
            a, b = h.kv[k], hv.kv[k]
            assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), k
            assert h.kv_types[k] == hv.kv_types[k], k
    # the draft shares the target's embedding and output bytes
    for name in ("token_embd.weight", "output.weight"):
        ot = next(x for x in ht.tensors if x.name == name)
        od = next(x for x in hd.tensors if x.name == name)
        with open(t, "rb") as ft, open(d, "rb") as fd:
            ft.seek(ot.offset)
            fd.seek(od.offset)
            assert ot.nbytes == od.nbytes and ft.read(ot.nbytes) == fd.read(od.nbytes)


# ---- llama.cpp -----------------------------------------------------------------------------------

def _load(path, logits_all=False):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False,
                           logits_all=logits_all)


def _greedy(m, prompt: bytes, n: int) -> list[int]:
    out = []
    for tok in m.generate(m.tokenize(prompt), temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if len(out) >= n:
            break
    return out


@pytest.mark.parametrize("arch_name,quant", [(a, "Q8_0") for a in testmodels.ARCHS]
                         + [("qwen3moe", "Q4_0"), ("qwen2moe", "F16")])
def test_loads_and_decodes(arch_name, quant):
    t, d = testmodels.make_pair(arch=arch_name, quant=quant)
    # logits_all: without it llama-cpp-python never writes `scores` (the row checked below would be
    # uninitialised memory, finite only by luck)
    mt, md = _load(t, logits_all=True), _load(d)
    n_vocab = 32000 if arch_name == "llama" else 151936
    assert mt.n_vocab() == md.n_vocab() == n_vocab
    text = b"Hello world, this is a test"
    ids = mt.tokenize(text, add_bos=False)
    assert ids == md.tokenize(text, add_bos=False) and len(ids) < len(text)  # a real tokenizer
    assert mt.detokenize(ids).lstrip() == text
    out = _greedy(mt, b"The capital of France is", 12)
    assert len(out) == 12 and len(set(out)) > 3  # not stuck on one token
    assert out == _greedy(mt, b"The capital of France is", 12)  # deterministic
    assert np.isfinite(np.asarray(mt.scores[mt.n_tokens - 1])).all()
    assert len(_greedy(md, b"The capital of France is", 12)) == 12


@pytest.mark.parametrize("arch_name", testmodels.ARCHS)
def test_draft_agrees_sometimes(arch_name):
    """Speculation tests need acceptance strictly between 0 and 1: the draft's argmax matches the
    target's on some, not all, positions of the target's own greedy continuation."""
    t, d = testmodels.make_pair(arch=arch_name, quant="Q8_0")
    mt, md = _load(t, logits_all=True), _load(d, logits_all=True)
    prompt = mt.tokenize(b"def fibonacci(n):")
    seq = prompt + _greedy(mt, b"def fibonacci(n):", 40)
    mt.reset(); mt.eval(seq)
    md.reset(); md.eval(seq)
    lt = np.asarray(mt.scores[:len(seq)])
    ld = np.asarray(md.scores[:len(seq)])
    assert np.isfinite(lt).all() and np.isfinite(ld).all()
    agree = float((lt.argmax(1) == ld.argmax(1)).mean())
    assert 0.1 < agree < 0.9, agree
