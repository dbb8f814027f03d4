"""gguf_layout: expert offsets/sizes against independent oracles, and one-line errors on bad files.

Oracles: (1) the float weights the generator quantised (testmodels.expert_source), requantised here
and compared byte for byte with the file at the reported offset; (2) gguf.GGUFReader's own tensor
views (a separate parser) on the small-vocab llama model.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import gguf
from spac_gguf.testing import models as testmodels
from spac_gguf.gguf_layout import (GGUFCorruptError, GGUFError, GGUFNotFoundError, GGUFTruncatedError,
                                   NotGGUFError, describe, format_layout)

CASES = [("qwen3moe", "Q8_0"), ("qwen2moe", "Q8_0"), ("llama", "Q8_0"), ("qwen2moe", "F16"), ("llama", "Q4_0")]
VOCAB = {"qwen3moe": (151936, "gpt2"), "qwen2moe": (151936, "gpt2"), "llama": (32000, "llama")}


def _read(path, off, n) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


@pytest.mark.parametrize("arch_name,quant", CASES)
def test_expert_bytes_match_source_weights(arch_name, quant):
    target, _ = testmodels.make_pair(arch=arch_name, quant=quant)
    L = describe(target)
    spec = testmodels.SPECS[arch_name]
    assert L.architecture == arch_name
    assert (L.n_layer, L.n_expert, L.n_expert_used) == (spec.n_layer, spec.n_expert, spec.n_expert_used)
    assert L.moe_layers == list(range(spec.n_layer))
    assert L.expert_qtypes == {"gate": [quant], "up": [quant], "down": [quant]}
    qt = gguf.GGMLQuantizationType[quant]
    block, tsize = gguf.GGML_QUANT_SIZES[qt]
    total = 0
    for layer in range(spec.n_layer):
        for proj in ("gate", "up", "down"):
            src = testmodels.expert_source(arch_name, layer, proj)
            E, rows, row_len = src.shape
            want_n = rows * row_len // block * tsize
            for e in range(E):
                off, n = L.expert_offset(layer, e, proj)
                assert n == want_n
                got = _read(target, off, n)
                assert got == gguf.quants.quantize(src[e], qt).tobytes(), (layer, proj, e)
                total += n
            # the next byte after the last expert is not part of this tensor's expert block
            assert L.expert_offset(layer, E - 1, proj)[0] + want_n == off + n
    assert total == L.expert_bytes
    assert L.bytes_per_expert == 3 * want_n
    assert L.dense_bytes + L.expert_bytes == L.tensor_bytes
    assert L.vocab_size == VOCAB[arch_name][0] and L.tokenizer_model == VOCAB[arch_name][1]


def test_offsets_agree_with_gguf_reader():
    """A second, unrelated parser (gguf.GGUFReader) sees the same bytes for every tensor."""
    target, _ = testmodels.make_pair(arch="llama", quant="Q4_0")
    L = describe(target)
    r = gguf.GGUFReader(target)
    by_name = {t.name: t for t in r.tensors}
    assert L.tensor_bytes == sum(int(t.n_bytes) for t in r.tensors)
    assert L.data_offset == r.data_offset
    n_checked = 0
    for lay in L.layers:
        for proj, et in lay.projections.items():
            rt = by_name[et.name]
            assert et.offset == rt.data_offset and et.nbytes == rt.n_bytes
            assert list(et.shape) == [int(x) for x in rt.shape]
            assert et.qtype == rt.tensor_type.name
            for e in range(L.n_expert):
                off, n = L.expert_offset(lay.index, e, proj)
                assert _read(target, off, n) == np.ascontiguousarray(rt.data[e]).tobytes()
                n_checked += 1
    assert n_checked == L.n_layer * 3 * L.n_expert
    dense = sum(int(t.n_bytes) for t in r.tensors if "_exps." not in t.name)
    assert dense == L.dense_bytes


def test_shared_experts_and_dense_draft():
    t2, d2 = testmodels.make_pair(arch="qwen2moe", quant="Q8_0")
    L = describe(t2)
    assert L.has_shared_experts and L.n_expert_shared == 1
    for lay in L.layers:
        assert sorted(n.split(".")[2] for n in lay.shared_tensors) == \
            ["ffn_down_shexp", "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp"]
        assert lay.router == f"blk.{lay.index}.ffn_gate_inp.weight"
    t3, _ = testmodels.make_pair(arch="qwen3moe", quant="Q8_0")
    L3 = describe(t3)
    assert not L3.has_shared_experts and L3.n_expert_shared == 0
    D = describe(d2)
    assert D.architecture == "qwen2" and not D.is_moe and D.moe_layers == []
    assert D.expert_bytes == 0 and D.dense_bytes == D.tensor_bytes and D.n_expert == 0
    with pytest.raises(ValueError, match="not a MoE layer"):
        D.expert_offset(0, 0, "up")
    assert "dense model" in format_layout(D)


def test_expert_offset_arguments_and_json():
    target, _ = testmodels.make_pair(arch="qwen3moe", quant="Q8_0")
    L = describe(target)
    assert L.expert_offset(1, 3, "up") == L.expert_offset(1, 3, "ffn_up_exps") == \
        L.expert_offset(1, 3, "blk.1.ffn_up_exps.weight")
    for bad in [(9, 0, "up"), (0, 8, "up"), (0, -1, "up"), (0, 0, "gate_up")]:
        with pytest.raises(ValueError):
            L.expert_offset(*bad)
    j = json.loads(json.dumps(L.to_json()))
    assert j["n_expert"] == 8 and j["moe_layers"] == [0, 1, 2, 3]
    lj = j["layers"][2]["projections"]["down"]
    assert lj["offset"] + 5 * lj["expert_stride"] == L.expert_offset(2, 5, "down")[0]
    assert j["bytes_per_expert"] == L.bytes_per_expert
    text = format_layout(L)
    assert "qwen3moe" in text and "blk.3.ffn_down_exps.weight" in text


# ---- errors --------------------------------------------------------------------------------------

def _one_line(e: Exception) -> str:
    msg = str(e)
    assert msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(GGUFNotFoundError) as ei:
        describe(tmp_path / "nope.gguf")
    assert "not found" in _one_line(ei.value) and isinstance(ei.value, ValueError)


@pytest.mark.parametrize("content", [b"", b"GG", b"hello, I am a text file\n" * 10, b"\x00" * 64])
def test_not_gguf(tmp_path, content):
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    with pytest.raises(NotGGUFError) as ei:
        describe(p)
    assert "not a GGUF" in _one_line(ei.value)


@pytest.fixture(scope="module")
def llama_target():
    return testmodels.make_pair(arch="llama", quant="Q8_0")[0]


@pytest.mark.parametrize("cut", [6, 30, 1000, 700_000, -1, -5000])
def test_truncated(tmp_path, llama_target, cut):
    data = llama_target.read_bytes()
    n = cut if cut > 0 else len(data) + cut
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:n])
    with pytest.raises(GGUFError) as ei:
        describe(p)
    msg = _one_line(ei.value)
    assert isinstance(ei.value, (GGUFTruncatedError, GGUFCorruptError)), type(ei.value)
    assert "truncated" in msg and str(p) in msg


def test_corrupt_header(tmp_path, llama_target):
    data = bytearray(llama_target.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")  # version
    p = tmp_path / "v.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFCorruptError) as ei:
        describe(p)
    assert "version 99" in _one_line(ei.value)


def test_directory(tmp_path):
    with pytest.raises(GGUFError):
        describe(tmp_path)


def test_copy_is_unchanged(tmp_path, llama_target):
    """A byte copy under another name describes identically (no path-dependent state)."""
    p = tmp_path / "copy.gguf"
    shutil.copyfile(llama_target, p)
    a, b = describe(llama_target).to_json(), describe(p).to_json()
    a.pop("path"), b.pop("path")
    assert a == b
