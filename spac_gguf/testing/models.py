"""Tiny deterministic random-weight GGUF pairs (MoE target + dense draft) for tests.

Why: tests need real llama.cpp MoE graphs (routing, expert offsets, speculative decoding) without
downloading multi-GB models.  Every file is a function of (arch, quant, GENERATOR_VERSION, the
pinned sdist's vocab file), so results are cached under ``~/.cache/spac-gguf/test-models/<key>/``
and are byte-identical between runs.

Shapes (all archs): n_embd 64, 4 heads (head_dim 16), 2 KV heads, target 4 layers with 8 experts,
top-2, expert n_ff 64; draft 2 dense layers with n_ff 128.  qwen2moe adds one shared expert
(n_ff 128) with its sigmoid gate.  Tokenizers are copied verbatim from the sdist's vocab GGUFs.

Draft/target agreement: the draft shares the target's token embedding, output matrix and the
attention weights of its layers (draft layer i == target layer i attention).  Residual branches are
scaled down (``BRANCH_SCALE``) so the next token is mostly a function of the current token through
the shared embedding/output, which both models share; the branches still move the argmax often
enough that acceptance is well below 1 (exercising rejection).  Measured with BRANCH_SCALE 0.2:
greedy draft/target argmax agreement 0.35-0.55 per position over the target's own continuation.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT

from ..gguf_layout import read_gguf
from ..registry import cache_dir, sha256_file
from ..sdist import SDIST_NAME, SDIST_VERSION

GENERATOR_VERSION = 1  # bump whenever the bytes written for the same options change
ARCHS = ("qwen3moe", "qwen2moe", "llama")
QUANTS = ("F16", "Q8_0", "Q4_0")
BRANCH_SCALE = 0.2    # scale of attention / FFN outputs relative to the embedding (rms 1)
LOGIT_SCALE = 4.0     # std of logits for a unit-rms hidden state: peaked enough to avoid near-ties

_FILE_TYPE = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


@dataclass(frozen=True)
class ArchSpec:
    """Everything that defines one pair; its JSON (plus versions) is the cache key."""
    arch: str
    draft_arch: str
    vocab_file: str
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_layer: int = 4
    n_layer_draft: int = 2
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 64
    n_ff_shexp: int = 0
    n_ff_draft: int = 128
    qk_norm: bool = False
    qkv_bias: bool = False
    n_ctx_train: int = 4096
    rope_freq_base: float = 1000000.0
    rms_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SPECS = {
    "qwen3moe": ArchSpec("qwen3moe", "qwen3", "ggml-vocab-qwen2.gguf", qk_norm=True),
    "qwen2moe": ArchSpec("qwen2moe", "qwen2", "ggml-vocab-qwen2.gguf", n_ff_shexp=128, qkv_bias=True),
    "llama": ArchSpec("llama", "llama", "ggml-vocab-llama-spm.gguf", rope_freq_base=10000.0, rms_eps=1e-5),
}


def _sdist_path() -> Path:
    """The pinned sdist (downloaded and verified once)."""
    from ..sdist import fetch
    return fetch()


def vocab_path(vocab_file: str) -> Path:
    """A vocab GGUF from the sdist's vendor/llama.cpp/models/, extracted once into the cache."""
    dst = cache_dir() / "vocab" / SDIST_VERSION / vocab_file
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    member = f"{SDIST_NAME}-{SDIST_VERSION}/vendor/llama.cpp/models/{vocab_file}"
    with tarfile.open(_sdist_path()) as tf:
        src = tf.extractfile(member)
        if src is None:
            raise FileNotFoundError(f"{member} not in the sdist")
        fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".part")
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
    os.replace(tmp, dst)
    return dst


@functools.lru_cache(maxsize=4)
def tokenizer_kv(vocab: str | os.PathLike) -> list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """All tokenizer.* pairs of the vocab GGUF at `vocab`, in file order, token strings as raw bytes."""
    h = read_gguf(vocab)
    out = []
    for key, val in h.kv.items():
        if not key.startswith("tokenizer."):
            continue
        types = [gguf.GGUFValueType(t) for t in h.kv_types[key]]
        if isinstance(val, np.ndarray):
            val = val.tolist()
        out.append((key, val, types[0], types[1] if len(types) > 1 else None))
    return out


def add_hparams(w: gguf.GGUFWriter, name: str, file_type: int, tokenizer: list, *, n_ctx: int, n_embd: int,
                n_layer: int, n_ff: int, n_head: int, n_head_kv: int, head_dim: int, rope_freq_base: float,
                rms_eps: float) -> None:
    """The KV pairs every generated model opens with (the test pairs here, the benchmark pair of
    scripts/make_bench_model.py): name, file type, shape, rope and norm constants (one head size for
    keys, values and rope), then the vocab GGUF's tokenizer.* pairs (`tokenizer_kv`)."""
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(rms_eps)
    for key, val, vt, sub in tokenizer:
        w.add_key_value(key, val, vt, sub)


@functools.lru_cache(maxsize=4)
def n_vocab_of(vocab_file: str) -> int:
    return len(read_gguf(vocab_path(vocab_file), strings=False).kv["tokenizer.ggml.tokens"])


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded by a stable hash of `parts` (never Python's salted hash())."""
    seed = int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def _normal(shape: tuple[int, ...], std: float, *seed: object) -> np.ndarray:
    return (_rng(*seed).standard_normal(shape) * std).astype(np.float32)


def _qtype(name: str) -> QT:
    return QT[name]


class _Builder:
    def __init__(self, path: Path, arch: str):
        self.w = gguf.GGUFWriter(path, arch)
        self.arrays: dict[str, tuple[np.ndarray, QT]] = {}

    def t(self, name: str, arr: np.ndarray, qtype: QT = QT.F32) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        self.arrays[name] = (arr, qtype)
        if qtype in (QT.F32, QT.F16):
            self.w.add_tensor(name, gguf.quants.quantize(arr, qtype))
        else:
            self.w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    def finish(self) -> None:
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def _common_kv(b: _Builder, s: ArchSpec, quant: str, n_layer: int, n_ff: int, name: str, vocab_file: str) -> None:
    add_hparams(b.w, name, int(_FILE_TYPE[quant]), tokenizer_kv(vocab_path(vocab_file)), n_ctx=s.n_ctx_train,
                n_embd=s.n_embd, n_layer=n_layer, n_ff=n_ff, n_head=s.n_head, n_head_kv=s.n_head_kv,
                head_dim=s.head_dim, rope_freq_base=s.rope_freq_base, rms_eps=s.rms_eps)
    if s.arch == "llama" or s.draft_arch == "llama":
        b.w.add_vocab_size(n_vocab_of(vocab_file))


def _shared_tensors(b: _Builder, s: ArchSpec, n_vocab: int) -> None:
    """Embedding and output: identical in target and draft (seeded by the vocab, not the role)."""
    e = s.n_embd
    b.t("token_embd.weight", _normal((n_vocab, e), 1.0, s.vocab_file, e, "token_embd"), QT.Q8_0)
    b.t("output_norm.weight", np.ones(e, np.float32))
    b.t("output.weight", _normal((n_vocab, e), LOGIT_SCALE / np.sqrt(e), s.vocab_file, e, "output"), QT.Q8_0)


def _attention(b: _Builder, s: ArchSpec, i: int) -> None:
    """Attention of layer i, seeded by (arch family, layer) so target and draft share it."""
    e, hd = s.n_embd, s.head_dim
    nq, nkv = s.n_head * hd, s.n_head_kv * hd
    fam = s.arch
    p = f"blk.{i}."
    b.t(p + "attn_norm.weight", np.ones(e, np.float32))
    b.t(p + "attn_q.weight", _normal((nq, e), 1 / np.sqrt(e), fam, i, "q"))
    b.t(p + "attn_k.weight", _normal((nkv, e), 1 / np.sqrt(e), fam, i, "k"))
    b.t(p + "attn_v.weight", _normal((nkv, e), 1 / np.sqrt(e), fam, i, "v"))
    if s.qkv_bias:
        b.t(p + "attn_q.bias", _normal((nq,), 0.1, fam, i, "qb"))
        b.t(p + "attn_k.bias", _normal((nkv,), 0.1, fam, i, "kb"))
        b.t(p + "attn_v.bias", _normal((nkv,), 0.1, fam, i, "vb"))
    b.t(p + "attn_output.weight", _normal((e, nq), BRANCH_SCALE / np.sqrt(nq), fam, i, "o"))
    if s.qk_norm:
        b.t(p + "attn_q_norm.weight", np.ones(hd, np.float32))
        b.t(p + "attn_k_norm.weight", np.ones(hd, np.float32))
    b.t(p + "ffn_norm.weight", np.ones(e, np.float32))


def expert_source(arch: str, layer: int, proj: str) -> np.ndarray:
    """The float32 weights of a target's routed experts before quantisation, numpy shape
    (n_expert, rows, row_length); tests compare file bytes at reported offsets against these."""
    s = SPECS[arch]
    e, f, E = s.n_embd, s.n_ff_exp, s.n_expert
    if proj == "down":
        return _normal((E, e, f), BRANCH_SCALE / np.sqrt(f), s.arch, layer, "down_exps")
    if proj in ("gate", "up"):
        return _normal((E, f, e), 1 / np.sqrt(e), s.arch, layer, f"{proj}_exps")
    raise ValueError(f"unknown projection {proj!r}")


def _write_target(path: Path, s: ArchSpec, quant: str) -> None:
    q = _qtype(quant)
    n_vocab = n_vocab_of(s.vocab_file)
    b = _Builder(path, s.arch)
    # llama reads its expert n_ff from feed_forward_length; the qwen MoE archs from expert_*.
    _common_kv(b, s, quant, s.n_layer, s.n_ff_exp if s.arch == "llama" else s.n_ff_exp * s.n_expert_used,
               f"spac-test-{s.arch}-target-{quant}", s.vocab_file)
    b.w.add_expert_count(s.n_expert)
    b.w.add_expert_used_count(s.n_expert_used)
    if s.arch != "llama":
        b.w.add_expert_feed_forward_length(s.n_ff_exp)
    if s.n_ff_shexp:
        b.w.add_expert_shared_count(1)
        b.w.add_expert_shared_feed_forward_length(s.n_ff_shexp)
    _shared_tensors(b, s, n_vocab)
    e, E = s.n_embd, s.n_expert
    for i in range(s.n_layer):
        _attention(b, s, i)
        p = f"blk.{i}."
        # Router logits with std ~2 so top-k choices are clear and vary by token.
        b.t(p + "ffn_gate_inp.weight", _normal((E, e), 2.0 / np.sqrt(e), s.arch, i, "router"))
        for proj in ("gate", "up", "down"):
            b.t(p + f"ffn_{proj}_exps.weight", expert_source(s.arch, i, proj), q)
        if s.n_ff_shexp:
            g = s.n_ff_shexp
            b.t(p + "ffn_gate_inp_shexp.weight", _normal((e,), 1 / np.sqrt(e), s.arch, i, "shexp_gate_inp"))
            b.t(p + "ffn_gate_shexp.weight", _normal((g, e), 1 / np.sqrt(e), s.arch, i, "gate_shexp"), q)
            b.t(p + "ffn_up_shexp.weight", _normal((g, e), 1 / np.sqrt(e), s.arch, i, "up_shexp"), q)
            b.t(p + "ffn_down_shexp.weight", _normal((e, g), BRANCH_SCALE / np.sqrt(g), s.arch, i, "down_shexp"), q)
    b.finish()


def _write_draft(path: Path, s: ArchSpec, quant: str) -> None:
    q = _qtype(quant)
    n_vocab = n_vocab_of(s.vocab_file)
    b = _Builder(path, s.draft_arch)
    _common_kv(b, s, quant, s.n_layer_draft, s.n_ff_draft, f"spac-test-{s.arch}-draft-{quant}", s.vocab_file)
    _shared_tensors(b, s, n_vocab)
    e, f = s.n_embd, s.n_ff_draft
    for i in range(s.n_layer_draft):
        _attention(b, s, i)
        p = f"blk.{i}."
        b.t(p + "ffn_gate.weight", _normal((f, e), 1 / np.sqrt(e), s.arch, "draft", i, "gate"), q)
        b.t(p + "ffn_up.weight", _normal((f, e), 1 / np.sqrt(e), s.arch, "draft", i, "up"), q)
        b.t(p + "ffn_down.weight", _normal((e, f), BRANCH_SCALE / np.sqrt(f), s.arch, "draft", i, "down"), q)
    b.finish()


def pair_key(arch: str, quant: str) -> str:
    """Content hash of the generator options: changes whenever the produced bytes could."""
    s = _spec(arch, quant)
    blob = json.dumps({"spec": asdict(s), "quant": quant, "gen": GENERATOR_VERSION,
                       "branch": BRANCH_SCALE, "logit": LOGIT_SCALE, "sdist": SDIST_VERSION,
                       "numpy": np.__version__.split(".")[0], "gguf": _gguf_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


def _spec(arch: str, quant: str) -> ArchSpec:
    if arch not in SPECS:
        raise ValueError(f"unknown test arch {arch!r} (choose from {', '.join(ARCHS)})")
    if quant not in QUANTS:
        raise ValueError(f"unknown expert quant {quant!r} (choose from {', '.join(QUANTS)})")
    return SPECS[arch]


def _atomic(path: Path, writer) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_pair(out_dir: str | os.PathLike, arch: str, quant: str = "Q8_0") -> tuple[Path, Path]:
    """Write `<arch>-target.gguf` and `<arch>-draft.gguf` into out_dir (no caching)."""
    s = _spec(arch, quant)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target, draft = out / f"{arch}-target.gguf", out / f"{arch}-draft.gguf"
    _atomic(target, lambda p: _write_target(p, s, quant))
    _atomic(draft, lambda p: _write_draft(p, s, quant))
    return target, draft


def _same_file(a: Path, b: Path) -> bool:
    if not (a.exists() and b.exists()) or a.stat().st_size != b.stat().st_size:
        return False
    return sha256_file(a) == sha256_file(b)




def make_pair(out_dir: str | os.PathLike | None = None, arch: str = "qwen3moe",
              quant: str = "Q8_0") -> tuple[Path, Path]:
    """(target_path, draft_path) for `arch` with experts in `quant`, built once per content key.

    Files live in ``<cache>/test-models/<key>/``; with `out_dir` they are also copied there as
    ``<arch>-target.gguf`` / ``<arch>-draft.gguf`` (rewritten only when the bytes differ).
    """
    _spec(arch, quant)
    cdir = cache_dir() / "test-models" / pair_key(arch, quant)
    target, draft = cdir / f"{arch}-target.gguf", cdir / f"{arch}-draft.gguf"
    if not (target.exists() and draft.exists()):
        build_pair(cdir, arch, quant)
    if out_dir is None:
        return target, draft
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = []
    for src in (target, draft):
        dst = out / src.name
        if not _same_file(src, dst):
            _atomic(dst, lambda p, src=src: shutil.copyfile(src, p))
        res.append(dst)
    return res[0], res[1]
