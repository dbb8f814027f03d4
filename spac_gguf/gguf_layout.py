"""Where every routed expert lives inside a GGUF file, without starting llama.cpp.

Why: the expert cache, the placement planner and the simulator all need the byte offset and size of
"expert e of layer l, projection p" in the mapped file, plus dense-vs-expert byte totals.  In
ggml's layout an expert tensor is ``[ne0, ne1, n_expert]`` and expert e is one contiguous block of
``nb[2]`` bytes at ``tensor data offset + e * nb[2]`` (quantised rows included).

The header is parsed here with ``struct`` on a read-only mmap, using the ``gguf`` package's
constants (value types, quant block sizes).  ``gguf.GGUFReader`` is correct but builds a numpy
view per array item: for a 150k-token vocabulary it takes 10-30 s, which is too slow for
``inspect`` and for tests; this parser walks the same bytes in well under a second.
"""
from __future__ import annotations

import itertools
import math
import mmap
import os
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType


class GGUFError(ValueError):
    """A model file we cannot use; str() is a one-line message for the user."""


class GGUFNotFoundError(GGUFError):
    pass


class NotGGUFError(GGUFError):
    pass


class GGUFCorruptError(GGUFError):
    pass


class GGUFTruncatedError(GGUFCorruptError):
    pass


# ----------------------------------------------------------------------------------------------
# Header parser
# ----------------------------------------------------------------------------------------------

# struct format of each scalar value type; numpy reads the same codes (np.dtype("<I") is uint32)
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass
class SkippedStrings:
    """A string array whose items were not decoded (read_gguf(strings=False)); only its length."""
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass
class TensorInfo:
    name: str
    ggml_type: int
    qtype: str
    shape: tuple[int, ...]       # ggml order: ne[0] (row length) first
    offset: int                  # absolute file offset of the tensor's first byte
    nbytes: int


@dataclass
class GGUFHeader:
    path: str
    file_size: int
    version: int
    alignment: int
    data_offset: int             # absolute offset of the tensor data region
    kv: dict[str, Any]
    kv_types: dict[str, tuple[int, ...]]
    tensors: list[TensorInfo]
    # byte spans of the sections, for tools that need to know where things are (fuzzing, debugging):
    # (key, start, value_start, end) per KV pair and (name, start, end) per tensor info
    kv_spans: list[tuple[str, int, int, int]] = field(default_factory=list)
    tensor_info_spans: list[tuple[str, int, int]] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.kv.get(key, default)


GGML_MAX_NAME = 64              # ggml's tensor-name buffer (with its NUL): gguf.cpp refuses longer names
_INT64_MAX = 2**63 - 1


def _q(name: str, limit: int = 48) -> str:
    """A key or tensor name for an error message: quoted, escaped to one line, shortened (a corrupt
    file's names can be megabytes of arbitrary bytes)."""
    r = repr(name[:limit])
    return r + ("..." if len(name) > limit else "")


def _one_line(msg: str, limit: int = 400) -> str:
    """`msg` as one printable line of at most `limit` characters."""
    msg = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in msg)
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


class _Cursor:
    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFTruncatedError(f"header ends inside {_one_line(what, 60)} at byte {self.pos}")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s


def _read_value(c: _Cursor, vtype: int, key: str, strings: bool) -> tuple[Any, tuple[int, ...]]:
    try:
        vt = GGUFValueType(vtype)
    except ValueError:
        raise GGUFCorruptError(f"unknown value type {vtype} for key {_q(key)}") from None
    if vt in _SCALAR:
        return c.unpack(_SCALAR[vt], key), (vt,)
    if vt == GGUFValueType.STRING:
        return c.string(key).decode("utf-8", errors="replace"), (vt,)
    # ARRAY
    sub = c.unpack("<I", key)
    count = c.unpack("<Q", key)
    try:
        st = GGUFValueType(sub)
    except ValueError:
        raise GGUFCorruptError(f"unknown array item type {sub} for key {_q(key)}") from None
    if st in _SCALAR:
        n = struct.calcsize(_SCALAR[st]) * count
        c.need(n, key)
        arr = np.frombuffer(c.buf, dtype=_SCALAR[st], count=count, offset=c.pos).copy()
        c.pos += n
        return arr, (vt, st)
    if st == GGUFValueType.STRING:
        if count > (c.size - c.pos) // 8:
            raise GGUFTruncatedError(f"header ends inside {_q(key)} (array of {count} strings)")
        buf, pos, size = c.buf, c.pos, c.size
        unpack = struct.Struct("<Q").unpack_from
        items: list[bytes] | None = [] if strings else None
        for _ in range(count):
            if pos + 8 > size:
                raise GGUFTruncatedError(f"header ends inside {_q(key)} at byte {pos}")
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > size:
                raise GGUFTruncatedError(f"header ends inside {_q(key)} at byte {pos}")
            if items is not None:
                items.append(buf[pos:pos + n])
            pos += n
        c.pos = pos
        return (items if items is not None else SkippedStrings(count)), (vt, st)
    # nested arrays: walk them recursively
    return [_read_value(c, st, key, strings)[0] for _ in range(count)], (vt, st)


def read_gguf(path: str | os.PathLike, *, strings: bool = True) -> GGUFHeader:
    """Parse a GGUF header (KV pairs and tensor infos) and check the tensor data fits the file.

    String arrays come back as lists of raw ``bytes`` (byte-exact; tokens need not be UTF-8), or
    as :class:`SkippedStrings` when ``strings=False``; numeric arrays as numpy arrays.
    """
    p = Path(path)
    if not p.exists():
        raise GGUFNotFoundError(f"model file not found: {p}")
    if p.is_dir():
        raise GGUFNotFoundError(f"model path is a directory, not a GGUF file: {p}")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or struct.unpack("<I", magic)[0] != GGUF_MAGIC:
                raise NotGGUFError(f"not a GGUF file (bad magic {magic[:4]!r}): {p}")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFNotFoundError(f"cannot read model file {p}: {e.strerror or e}") from None
    try:
        return _parse(mm, size, str(p), strings)
    except GGUFError as e:
        if not str(e).endswith(str(p)):
            raise type(e)(f"{'truncated' if isinstance(e, GGUFTruncatedError) else 'corrupt'} GGUF "
                          f"({_one_line(str(e))}): {p}") from None
        raise
    except (struct.error, ValueError, IndexError, OverflowError, MemoryError) as e:
        msg = _one_line(str(e)) if str(e) else type(e).__name__
        raise GGUFCorruptError(f"corrupt GGUF ({msg}): {p}") from None
    finally:
        mm.close()


def _parse(mm: mmap.mmap, size: int, path: str, strings: bool) -> GGUFHeader:
    c = _Cursor(mm, size)
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            raise GGUFCorruptError(f"big-endian GGUF (version field {version:#x}) is not supported")
        raise GGUFCorruptError(f"unsupported GGUF version {version}")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the key count")
    if n_kv > size // 13 or n_tensors > size // 25:
        raise GGUFCorruptError(f"implausible counts ({n_kv} keys, {n_tensors} tensors for {size} bytes)")
    kv: dict[str, Any] = {}
    kv_types: dict[str, tuple[int, ...]] = {}
    kv_spans: list[tuple[str, int, int, int]] = []
    for i in range(n_kv):
        start = c.pos
        key = c.string(f"key #{i}").decode("utf-8", errors="replace")
        vtype = c.unpack("<I", key)
        vstart = c.pos
        if key in kv:
            raise GGUFCorruptError(f"duplicate key {_q(key)}")
        kv[key], kv_types[key] = _read_value(c, vtype, key, strings)
        kv_spans.append((key, start, vstart, c.pos))
    alignment = kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFCorruptError(f"bad general.alignment {alignment!r}")
    raw = []
    ti_spans: list[tuple[str, int, int]] = []
    for i in range(n_tensors):
        start = c.pos
        raw_name = c.string(f"tensor info #{i}")
        name = raw_name.decode("utf-8", errors="replace")
        if len(raw_name) >= GGML_MAX_NAME:
            raise GGUFCorruptError(f"tensor name {_q(name)} is too long (ggml allows {GGML_MAX_NAME - 1} bytes)")
        n_dims = c.unpack("<I", name)
        if not 1 <= n_dims <= 4:
            raise GGUFCorruptError(f"tensor {_q(name)} has {n_dims} dimensions")
        c.need(8 * n_dims, name)
        dims = struct.unpack_from(f"<{n_dims}Q", mm, c.pos)
        c.pos += 8 * n_dims
        gtype = c.unpack("<I", name)
        rel = c.unpack("<Q", name)
        raw.append((name, dims, gtype, rel))
        ti_spans.append((name, start, c.pos))
    data_offset = -(-c.pos // alignment) * alignment
    tensors: list[TensorInfo] = []
    seen = set()
    for name, dims, gtype, rel in raw:
        if name in seen:
            raise GGUFCorruptError(f"duplicate tensor {_q(name)}")
        seen.add(name)
        try:
            qt = GGMLQuantizationType(gtype)
            block, tsize = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise GGUFCorruptError(f"tensor {_q(name)} has unknown type {gtype}") from None
        if dims[0] % block:
            raise GGUFCorruptError(f"tensor {_q(name)}: row of {dims[0]} is not a multiple of {qt.name} blocks ({block})")
        n_el = math.prod(dims)
        if 0 in dims or n_el > _INT64_MAX:
            raise GGUFCorruptError(f"tensor {_q(name)} has a bad shape {list(dims)}")
        if rel % alignment:
            raise GGUFCorruptError(f"tensor {_q(name)} data offset {rel} is not {alignment}-aligned")
        tensors.append(TensorInfo(name, int(qt), qt.name, tuple(int(d) for d in dims), data_offset + rel,
                                  n_el // block * tsize))
    # The tensor data must fit the file and tensors must not overlap.
    end = data_offset
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end:
            raise GGUFCorruptError(f"tensor {_q(t.name)} overlaps the previous tensor")
        end = t.offset + t.nbytes
    if tensors and end > size:
        raise GGUFTruncatedError(f"truncated GGUF: tensor data ends at byte {end} but the file has {size} bytes: {path}")
    return GGUFHeader(path, size, version, alignment, data_offset, kv, kv_types, tensors, kv_spans, ti_spans)


# ----------------------------------------------------------------------------------------------
# Model layout
# ----------------------------------------------------------------------------------------------

_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate_up|gate|up|down)_(ch)?exps\.(weight|bias|scale)$")
_SHEXP_RE = re.compile(r"^blk\.(\d+)\.ffn_\w+_shexp\b")
_BLK_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass
class ExpertTensor:
    """One stacked expert tensor; expert e is bytes [offset + e*expert_stride, +expert_stride)."""
    name: str
    proj: str                    # gate | up | down | gate_up (suffix _ch for chunked experts)
    qtype: str
    shape: tuple[int, ...]       # ggml order, last dim = n_expert
    offset: int                  # absolute file offset of expert 0
    nbytes: int                  # whole tensor
    expert_stride: int           # nb[last]: bytes of one expert

    def expert(self, e: int) -> tuple[int, int]:
        return self.offset + e * self.expert_stride, self.expert_stride

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass
class LayerLayout:
    index: int
    is_moe: bool
    projections: dict[str, ExpertTensor] = field(default_factory=dict)  # routed-expert weights
    extras: dict[str, ExpertTensor] = field(default_factory=dict)       # per-expert bias / scale
    router: str | None = None
    shared_tensors: list[str] = field(default_factory=list)
    dense_bytes: int = 0         # everything in this block that is not a routed expert

    @property
    def bytes_per_expert(self) -> int:
        """One expert of this layer over all its projections (and its bias/scale, if any)."""
        return sum(t.expert_stride for t in [*self.projections.values(), *self.extras.values()])

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in [*self.projections.values(), *self.extras.values()])

    def to_json(self) -> dict:
        return {"index": self.index, "is_moe": self.is_moe,
                "projections": {k: v.to_json() for k, v in self.projections.items()},
                "extras": {k: v.to_json() for k, v in self.extras.items()},
                "router": self.router, "shared_tensors": list(self.shared_tensors),
                "bytes_per_expert": self.bytes_per_expert, "expert_bytes": self.expert_bytes,
                "dense_bytes": self.dense_bytes}


@dataclass
class ModelLayout:
    path: str
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None
    file_type: int | None
    n_layer: int
    n_embd: int | None
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    has_shared_experts: bool
    moe_layers: list[int]
    layers: list[LayerLayout]
    expert_qtypes: dict[str, list[str]]
    vocab_size: int | None
    tokenizer_model: str | None
    tokenizer_pre: str | None
    alignment: int
    data_offset: int
    n_tensors: int
    tensor_bytes: int
    expert_bytes: int
    dense_bytes: int

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert over all projections; the largest over MoE layers if they differ."""
        return max((self.layers[i].bytes_per_expert for i in self.moe_layers), default=0)

    def expert_offset(self, layer: int, expert: int, proj: str) -> tuple[int, int]:
        """(file_offset, nbytes) of expert `expert` of layer `layer`, projection `proj`.

        `proj` is gate | up | down | gate_up, or the tensor's name (``ffn_up_exps``)."""
        if not 0 <= layer < len(self.layers) or not self.layers[layer].is_moe:
            raise ValueError(f"layer {layer} is not a MoE layer (MoE layers: {_ranges(self.moe_layers) or 'none'})")
        if not 0 <= expert < self.n_expert:
            raise ValueError(f"expert {expert} out of range 0..{self.n_expert - 1}")
        projs = self.layers[layer].projections
        key = _proj_key(proj)
        if key not in projs:
            raise ValueError(f"layer {layer} has no {proj!r} experts (has: {', '.join(projs)})")
        return projs[key].expert(expert)

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}
        d["bytes_per_expert"] = self.bytes_per_expert
        d["layers"] = [layer.to_json() for layer in self.layers]
        return d


def _proj_key(proj: str) -> str:
    m = re.fullmatch(r"(?:blk\.\d+\.)?(?:ffn_)?(gate_up|gate|up|down)(?:_(ch)?exps)?(?:\.weight)?", proj)
    if not m:
        return proj
    return m.group(1) + ("_ch" if m.group(2) else "")


def _ranges(xs: list[int]) -> str:
    """Runs of consecutive numbers: [0, 1, 2, 5] -> "0-2,5" (x - i is constant along a run)."""
    runs = [[x for _, x in run] for _, run in itertools.groupby(enumerate(xs), key=lambda p: p[1] - p[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _scalar(v: Any) -> Any:
    """Per-layer array keys (e.g. expert_used_count) collapse to their first value."""
    if isinstance(v, np.ndarray):
        return v.flat[0].item() if v.size else None
    return v


LLAMA_MAX_LAYERS = 512          # llama-hparams.h
LLAMA_MAX_EXPERTS = 1024
# architectures whose llama.cpp graph has one head size for keys, values and rope
_ONE_HEAD_DIM_ARCHS = ("llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe")


def _uint(v: Any) -> int | None:
    """An integer hyperparameter's value (the largest, for a per-layer array); None when it is not
    integer-typed (llama.cpp then refuses the key's type itself, with an error, not an abort)."""
    if isinstance(v, np.ndarray):
        return int(v.max()) if v.size and v.dtype.kind in "iu" else None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    return None


def check_hparams(h: GGUFHeader, arch: str) -> None:
    """Refuse hyperparameters on which llama.cpp's model loader aborts (GGML_ASSERT in
    ``llama_model::load_hparams``) instead of returning an error: the process would die before
    we could say anything.  Only keys llama.cpp reads for every architecture are checked here."""
    def get(key: str) -> int | None:
        return _uint(h.get(f"{arch}.{key}"))

    def bad(msg: str) -> GGUFCorruptError:
        return GGUFCorruptError(f"corrupt GGUF ({msg}): {h.path}")

    n_layer = get("block_count")
    if n_layer is not None and not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise bad(f"{arch}.block_count is {n_layer}; llama.cpp allows 1..{LLAMA_MAX_LAYERS}")
    nextn = get("nextn_predict_layers")
    if n_layer is not None and nextn is not None and nextn > n_layer:
        raise bad(f"{arch}.nextn_predict_layers {nextn} > block_count {n_layer}")
    n_expert = get("expert_count") or 0
    used = h.get(f"{arch}.expert_used_count")
    if isinstance(used, np.ndarray) and n_layer is not None:
        used = used[:n_layer]
    n_used = _uint(used) or 0
    groups = get("expert_group_count") or 0
    group_used = get("expert_group_used_count") or 0
    if n_expert > LLAMA_MAX_EXPERTS:
        raise bad(f"{arch}.expert_count is {n_expert}; llama.cpp allows at most {LLAMA_MAX_EXPERTS}")
    if n_used > n_expert:
        raise bad(f"{arch}.expert_used_count {n_used} > expert_count {n_expert}")
    if n_expert > 0:
        if n_used == 0:
            raise bad(f"{arch}.expert_count is {n_expert} but {arch}.expert_used_count is missing or 0")
        if groups >= n_expert:
            raise bad(f"{arch}.expert_group_count {groups} >= expert_count {n_expert}")
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            raise bad(f"{arch}: {n_expert} experts do not split into {groups} groups with {group_used} used")
    elif groups:
        raise bad(f"{arch}.expert_group_count is {groups} without experts")
    if arch in _ONE_HEAD_DIM_ARCHS:
        # their graph builders assert n_embd_head_v == n_embd_head_k == n_rot (models/<arch>.cpp)
        n_embd, n_head = get("embedding_length"), _uint(_scalar(h.get(f"{arch}.attention.head_count")))
        if n_embd and n_head:
            hk = get("attention.key_length") or n_embd // n_head
            hv = get("attention.value_length") or n_embd // n_head
            rot = get("rope.dimension_count") or hk
            if not hk == hv == rot:
                raise bad(f"{arch}: key length {hk}, value length {hv} and rope dimensions {rot} must be equal")


def describe(path: str | os.PathLike) -> ModelLayout:
    """Layout of a GGUF model: architecture, experts, byte offsets and dense vs expert bytes."""
    h = read_gguf(path, strings=False)
    arch = h.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFCorruptError(f"GGUF has no general.architecture: {h.path}")
    check_hparams(h, arch)

    def a(key: str, default: Any = None) -> Any:
        return _scalar(h.get(f"{arch}.{key}", default))

    n_layer = int(a("block_count", 0) or 0)
    blk_ids = [int(m.group(1)) for t in h.tensors if (m := _BLK_RE.match(t.name))]
    if blk_ids:
        n_layer = max(n_layer, max(blk_ids) + 1)
    layers = [LayerLayout(i, False) for i in range(n_layer)]
    n_expert = int(a("expert_count", 0) or 0)
    tensor_bytes = sum(t.nbytes for t in h.tensors)
    for t in h.tensors:
        m = _EXPERT_RE.match(t.name)
        if m:
            li, proj, ch, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            key = proj + ("_ch" if ch else "")
            ne_last = t.shape[-1]
            if n_expert == 0:
                n_expert = ne_last
            if ne_last != n_expert or t.nbytes % ne_last:
                raise GGUFCorruptError(f"expert tensor {_q(t.name)} has shape {list(t.shape)} "
                                       f"but the model has {n_expert} experts: {h.path}")
            et = ExpertTensor(t.name, key, t.qtype, t.shape, t.offset, t.nbytes, t.nbytes // ne_last)
            lay = layers[li]
            lay.is_moe = True
            (lay.projections if kind == "weight" else lay.extras)[key if kind == "weight" else f"{key}.{kind}"] = et
            continue
        mb = _BLK_RE.match(t.name)
        if mb:
            lay = layers[int(mb.group(1))]
            lay.dense_bytes += t.nbytes
            if t.name == f"blk.{lay.index}.ffn_gate_inp.weight":
                lay.router = t.name
            if _SHEXP_RE.match(t.name):
                lay.shared_tensors.append(t.name)
    moe_layers = [lay.index for lay in layers if lay.is_moe]
    if not moe_layers:
        n_expert = int(a("expert_count", 0) or 0)
    expert_bytes = sum(lay.expert_bytes for lay in layers)
    has_shexp = any(lay.shared_tensors for lay in layers)
    n_shared = a("expert_shared_count")
    n_shared = int(n_shared) if n_shared is not None else (1 if has_shexp else 0)
    qtypes: dict[str, list[str]] = {}
    for lay in layers:
        for k, t in lay.projections.items():
            if t.qtype not in qtypes.setdefault(k, []):
                qtypes[k].append(t.qtype)
    tokens = h.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else a("vocab_size")
    if vocab is None:
        emb = next((t for t in h.tensors if t.name == "token_embd.weight"), None)
        vocab = emb.shape[1] if emb is not None and len(emb.shape) > 1 else None
    used = a("expert_used_count", 0) or 0
    ft = h.get("general.file_type")
    return ModelLayout(
        path=h.path, file_size=h.file_size, gguf_version=h.version, architecture=arch,
        name=h.get("general.name"), file_type=int(ft) if ft is not None else None,
        n_layer=n_layer, n_embd=a("embedding_length"), n_expert=n_expert, n_expert_used=int(used),
        n_expert_shared=n_shared, has_shared_experts=has_shexp or n_shared > 0, moe_layers=moe_layers,
        layers=layers, expert_qtypes=qtypes, vocab_size=int(vocab) if vocab is not None else None,
        tokenizer_model=h.get("tokenizer.ggml.model"), tokenizer_pre=h.get("tokenizer.ggml.pre"),
        alignment=h.alignment, data_offset=h.data_offset, n_tensors=len(h.tensors),
        tensor_bytes=tensor_bytes, expert_bytes=expert_bytes, dense_bytes=tensor_bytes - expert_bytes)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def format_layout(layout: ModelLayout, *, per_layer: bool = True) -> str:
    """A human-readable summary (what `spac-gguf inspect` prints without --json)."""
    L = layout
    dense_l = [lay.index for lay in L.layers if not lay.is_moe]
    lines = [
        f"file         {L.path}  ({_fmt(L.file_size)}, GGUF v{L.gguf_version}, {L.n_tensors} tensors, "
        f"data at {L.data_offset:#x})",
        f"architecture {L.architecture}" + (f"  ({L.name})" if L.name else ""),
        f"layers       {L.n_layer}  (MoE: {_ranges(L.moe_layers) or 'none'}; dense: {_ranges(dense_l) or 'none'})",
    ]
    if L.is_moe:
        lines.append(f"experts      {L.n_expert} routed, top-{L.n_expert_used}, shared: {L.n_expert_shared}")
        lines.append("expert types " + ", ".join(f"{k} {'/'.join(v)}" for k, v in L.expert_qtypes.items()))
        lines.append(f"per expert   {_fmt(L.bytes_per_expert)} over all projections (one layer)")
    else:
        lines.append("experts      none (dense model)")
    lines.append(f"vocab        {L.vocab_size}  (tokenizer {L.tokenizer_model}"
                 + (f", pre {L.tokenizer_pre}" if L.tokenizer_pre else "") + ")")
    share = 100.0 * L.expert_bytes / L.tensor_bytes if L.tensor_bytes else 0.0
    lines.append(f"bytes        {_fmt(L.tensor_bytes)} = dense {_fmt(L.dense_bytes)} + experts "
                 f"{_fmt(L.expert_bytes)} ({share:.1f}%)")
    if per_layer and L.is_moe:
        lines.append("")
        lines.append(f"{'layer':>5}  {'tensor':<28} {'type':<7} {'shape':<18} {'offset':>14} {'per expert':>12}")
        for lay in L.layers:
            for t in [*lay.projections.values(), *lay.extras.values()]:
                shape = "x".join(map(str, t.shape))
                lines.append(f"{lay.index:>5}  {t.name:<28} {t.qtype:<7} {shape:<18} {t.offset:>14} "
                             f"{t.expert_stride:>12}")
        lines.append("expert e of a tensor starts at offset + e * (per expert)")
    return "\n".join(lines)
