"""Thin, explicit wrapper over llama-cpp-python's low-level C API.

Why not `llama_cpp.Llama`: speculative decoding needs batch decodes with logits on chosen rows,
KV rollback, placement of routed experts (tensor_buft_overrides), and an eval callback; the
high-level class hides or fixes all of these.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import llama_cpp as llc

# Routed-expert tensors, as `--n-cpu-moe` / `-ot exps=CPU` match them (common/arg.cpp).
EXPERT_TENSOR_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def expert_pattern(layers=None) -> str:
    """Regex of routed-expert tensors: of every layer, or only of `layers` (`--n-cpu-moe` style)."""
    if layers is None:
        return EXPERT_TENSOR_PATTERN
    return r"^blk\.(" + "|".join(str(int(il)) for il in layers) + r")" + EXPERT_TENSOR_PATTERN


class BackendError(RuntimeError):
    """llama.cpp refused something (a load, a decode); the message says what."""


_LOG_CB = None          # keep the CFUNCTYPE alive: C holds a pointer to it
_INITIALISED = False
_ERRORS: list[str] | None = None    # llama.cpp's error log while a load collects it (one line for the user)
_BUFFERS: list[str] | None = None   # its "<buffer> model buffer size" lines while a load collects them


def _init_backend() -> None:
    global _INITIALISED, _LOG_CB
    if _INITIALISED:
        return
    verbose = os.environ.get("SPAC_LLAMA_LOG") == "1"

    last = [0]

    @llc.llama_log_callback
    def _log(level, text, user_data):  # noqa: ARG001 - C signature
        # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line
        lvl = last[0] if level == 5 else level
        last[0] = lvl
        if _BUFFERS is not None and lvl == 2 and b"model buffer size" in (text or b""):
            _BUFFERS.append((text or b"").decode("utf-8", "replace"))
        if lvl == 4 and _ERRORS is not None and not verbose:
            _ERRORS.append((text or b"").decode("utf-8", "replace"))    # the caller words the error
        elif verbose or lvl == 4:
            os.write(2, text or b"")

    _LOG_CB = _log
    llc.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    _install_abort_handler()
    llc.llama_backend_init()
    _INITIALISED = True


_ABORT_CB = None        # keep alive: ggml holds a pointer to it


def _install_abort_handler() -> None:
    """A failed check inside ggml (a CUDA error during a copy or a kernel, a broken invariant) ends in
    GGML_ABORT: by default a backtrace and SIGABRT (exit 134). The process cannot go on after one (the
    device or ggml's state is gone), so say it in one line and exit 2 instead; SPAC_LLAMA_LOG=1 keeps
    ggml's own report."""
    global _ABORT_CB
    try:
        base = ggml()
    except BackendError:
        return
    if not hasattr(base, "ggml_set_abort_callback") or os.environ.get("SPAC_LLAMA_LOG") == "1":
        return
    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def on_abort(message):
        text = (message or b"").decode("utf-8", "replace").replace("\n", " ").strip()
        # ggml logs the cause first (e.g. CUDA's error string) and aborts with a short text; where a
        # caller holds error lines back, the last one is that cause (elsewhere it is already printed)
        held = [ln.strip() for ln in "".join(_ERRORS or []).splitlines() if ln.strip()]
        cause = f" ({held[-1]})" if held else ""
        os.write(2, f"spac-gguf: llama.cpp stopped on an internal error: {text}{cause}\n".encode())
        os._exit(2)

    _ABORT_CB = proto(on_abort)
    base.ggml_set_abort_callback.restype = ctypes.c_void_p
    base.ggml_set_abort_callback.argtypes = [proto]
    base.ggml_set_abort_callback(_ABORT_CB)


def _load_error_reason(lines: list[str]) -> str:
    """The most specific line of llama.cpp's error log of a failed load, as one short line."""
    text = [ln.strip() for ln in "".join(lines).splitlines() if ln.strip()]
    generic = ("failed to load model", "error loading model")
    specific = [ln for ln in text if not any(g in ln for g in generic)] or text
    if not specific:
        return ""
    reason = specific[0].split(": ", 1)[-1] if specific[0].startswith("llama_") else specific[0]
    return reason[:300]


@contextlib.contextmanager
def errors_worded_by_caller():
    """llama.cpp's error lines during the block are held back in the list it yields (the caller raises
    one line of its own if the call failed, from them or not) and shown if the block ends without an
    exception (a call that worked despite them)."""
    global _ERRORS
    _init_backend()
    held, _ERRORS = _ERRORS, []
    errors = _ERRORS
    ok = False
    try:
        yield errors
        ok = True
    finally:
        _ERRORS = held
        if ok:
            for e in errors:
                os.write(2, e.encode())


class _InterruptibleLoad:
    """Ctrl-C during a model load: Python's default handler would raise KeyboardInterrupt inside
    whichever ctypes callback runs (log, progress), where ctypes prints and swallows it and the load
    goes on. Instead a flag is set and the progress callback returns false, which makes llama.cpp stop
    the load; the caller then raises KeyboardInterrupt. (SPAC_TEST_SIGINT_AT_LOAD=1 sends that signal
    at the first progress report, for tests.)"""

    def __init__(self):
        self.interrupted = False
        self._old = None
        self._inject = os.environ.get("SPAC_TEST_SIGINT_AT_LOAD") == "1"

        @llc.llama_progress_callback
        def _progress(progress, user_data):  # noqa: ARG001 - C signature
            if self._inject:
                self._inject = False
                signal.raise_signal(signal.SIGINT)
            return not self.interrupted
        self.callback = _progress           # keep alive while C may call it

    def _on_sigint(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.interrupted = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _sibling_lib(stem: str) -> ctypes.CDLL | None:
    """lib<stem> from the same directory as libllama (the bundled _ggml.py may load another), or None."""
    libdir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llc.__file__).parent / "lib")
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        p = libdir / name
        if p.exists():
            return ctypes.CDLL(str(p))
    return None


_GGML = None


def ggml() -> ctypes.CDLL:
    """libggml-base beside libllama, with the argument types of the functions we call."""
    global _GGML
    if _GGML is None:
        lib = _sibling_lib("ggml-base")
        if lib is None:
            raise BackendError("libggml-base not found beside libllama")
        lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
        lib.ggml_backend_cpu_buffer_type.argtypes = []
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_dev_host_buffer_type.restype = ctypes.c_void_p
        lib.ggml_backend_dev_host_buffer_type.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_buft_name.restype = ctypes.c_char_p
        lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_memory.restype = None
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]
        lib.ggml_backend_dev_description.restype = ctypes.c_char_p
        lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        _GGML = lib
    return _GGML


def first_gpu_device() -> int | None:
    """ggml's first GPU device (a pointer), or None: from the backend registry beside libllama."""
    reg = _sibling_lib("ggml")
    if reg is None:
        return None
    reg.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    reg.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    return reg.ggml_backend_dev_by_type(1) or None   # GGML_BACKEND_DEVICE_TYPE_GPU


def pinned_host_buffer_type() -> int | None:
    """The first GPU's pinned host buffer type (CUDA_Host), or None without a GPU: host memory the
    GPU copies from at link speed (pageable memory goes through a bounce buffer at a tenth of it)."""
    dev = first_gpu_device()
    if dev is None:
        return None
    return ggml().ggml_backend_dev_host_buffer_type(dev) or None


@dataclass
class Placement:
    """Where the weights live. `experts_on_cpu` keeps routed experts in (mmapped) CPU memory: those of
    every layer, or only of `cpu_expert_layers` when given. `pinned_experts` puts those host experts in
    the GPU's pinned host memory instead (read from the file, no mmap: llama.cpp's `--no-mmap`), so
    expert uploads run at link speed; without a GPU it changes nothing."""
    n_gpu_layers: int = 0
    experts_on_cpu: bool = False
    use_mmap: bool = True
    cpu_expert_layers: tuple[int, ...] | None = None
    pinned_experts: bool = False


class LlamaModel:
    """A loaded GGUF model (weights + vocabulary; only the vocabulary with `vocab_only`, enough to
    tokenize without mapping weights or making a context)."""

    def __init__(self, path: str | Path, placement: Placement | None = None, vocab_only: bool = False):
        _init_backend()
        self.path = str(path)
        self.placement = placement or Placement()
        params = llc.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = self.placement.n_gpu_layers
        pinned = pinned_host_buffer_type() if self.placement.pinned_experts and self.placement.experts_on_cpu else None
        self.pinned = pinned is not None
        params.load_mode = 1 if self.placement.use_mmap and not pinned else 0   # LLAMA_LOAD_MODE_MMAP / NONE
        params.use_extra_bufts = False       # CPU_REPACK changes the byte layout and disables op offload
        self._overrides = None
        if self.placement.experts_on_cpu:
            arr = (_BuftOverride * 2)()             # zeroed: arr[1] is the list's terminator
            arr[0].pattern = expert_pattern(self.placement.cpu_expert_layers).encode()
            arr[0].buft = pinned or ggml().ggml_backend_cpu_buffer_type()
            self._overrides = arr
            params.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
        global _BUFFERS
        _BUFFERS = []
        try:
            with errors_worded_by_caller() as errors:   # shown after a load that worked despite them
                with _InterruptibleLoad() as guard:
                    params.progress_callback = guard.callback
                    params.progress_callback_user_data = None
                    ptr = llc.llama_model_load_from_file(self.path.encode(), params)
                if guard.interrupted:
                    if ptr:
                        llc.llama_model_free(ptr)
                    raise KeyboardInterrupt
                if not ptr:
                    why = _load_error_reason(errors)
                    raise BackendError(f"llama.cpp could not load {self.path}" + (f": {why}" if why else ""))
        finally:
            buffers, _BUFFERS = _BUFFERS, None
        if pinned and not vocab_only:
            self._check_pinned(pinned, buffers)
        self.ptr = ptr
        self.vocab = llc.llama_model_get_vocab(ptr)
        self.n_vocab = llc.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llc.llama_model_n_layer(ptr)
        self.n_embd = llc.llama_model_n_embd(ptr)
        self.add_bos = bool(llc.llama_vocab_get_add_bos(self.vocab))

    def _check_pinned(self, buft: int, buffers: list[str]) -> None:
        """The GPU may refuse to pin (host memory short, a locked-memory limit, GGML_CUDA_NO_PINNED):
        llama.cpp then keeps the experts in pageable memory without a word, and every upload goes
        through a bounce buffer at a fraction of the link. Say so once, and how to fix it."""
        name = (ggml().ggml_backend_buft_name(buft) or b"").decode()
        if not name or any(name in line for line in buffers):
            return
        self.pinned = False
        os.write(2, ("spac-gguf: warning: the GPU could not pin the experts' host memory (llama.cpp kept them in "
                     "pageable memory: uploads run at a fraction of the link); free host memory or raise the "
                     "locked-memory limit (ulimit -l, or --ulimit memlock=-1 in a container); --mmap skips pinning\n"
                     ).encode())

    def _check_open(self) -> None:
        if not getattr(self, "ptr", None):
            raise BackendError(f"model {self.path} is closed")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        self._check_open()
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llc.llama_token * cap)()
        n = llc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llc.llama_token * cap)()
            n = llc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The token's text; a control token's (<|im_end|>...) is empty unless `special`."""
        self._check_open()
        buf = ctypes.create_string_buffer(64)
        n = llc.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llc.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        self._check_open()
        return bool(llc.llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> str | None:
        """The GGUF's default chat template (tokenizer.chat_template), or None."""
        self._check_open()
        t = llc.llama_model_chat_template(self.ptr, None)
        return t.decode("utf-8", "replace") if t else None

    def special_tokens(self) -> dict[str, str]:
        """bos/eos as text (what chat templates call bos_token / eos_token); empty where absent."""
        self._check_open()
        out = {}
        for name, fn in (("bos_token", llc.llama_vocab_bos), ("eos_token", llc.llama_vocab_eos)):
            tok = fn(self.vocab)
            out[name] = self.token_bytes(tok, special=True).decode("utf-8", "replace") if tok >= 0 else ""
        return out

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llc.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):  # models are big: free them deterministically when dropped
        with contextlib.suppress(Exception):
            self.close()


class LlamaContext:
    """One decoding context (one sequence, id 0) over a model, with its own KV cache."""

    def __init__(self, model: LlamaModel, n_ctx: int = 2048, n_batch: int = 512, n_threads: int | None = None,
                 eval_callback=None):
        self.model = model
        params = llc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads or max(1, os.cpu_count() or 1)
        params.no_perf = True
        self._cb = eval_callback            # keep alive: C holds the pointer
        if eval_callback is not None:
            params.cb_eval = eval_callback
            params.cb_eval_user_data = None
        ptr = llc.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise BackendError("llama.cpp could not create a context (n_ctx too large for memory?)")
        self.ptr = ptr
        self.n_ctx = llc.llama_n_ctx(ptr)
        # the context's own limit (llama.cpp caps n_batch at the requested n_ctx, then pads n_ctx up):
        # one llama_decode must never carry more rows, or llama.cpp aborts
        self.n_batch = int(llc.llama_n_batch(ptr))
        self.mem = llc.llama_get_memory(ptr)
        self.batch = llc.llama_batch_init(self.n_batch, 0, 1)
        self.n_past = 0                     # tokens whose KV is in the cache (positions 0..n_past-1)

    def decode(self, tokens: list[int], logits: str | list[int] = "last") -> np.ndarray:
        """Append `tokens` at positions n_past.. and return float32 logits [rows, n_vocab].

        `logits`: "last", "all", or a list of row indices within `tokens`.
        Long inputs are split into n_batch chunks; only the requested rows are returned.
        """
        self._check_open()
        n = len(tokens)
        if n == 0:
            raise ValueError("decode of zero tokens")
        if self.n_past + n > self.n_ctx:
            raise BackendError(f"context full: {self.n_past} + {n} tokens > n_ctx {self.n_ctx}")
        want = {n - 1} if logits == "last" else set(range(n) if logits == "all" else logits)
        out = []
        for c0 in range(0, n, self.n_batch):
            chunk = tokens[c0:c0 + self.n_batch]
            b = self.batch
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = self.n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = (c0 + i) in want
            b.n_tokens = len(chunk)
            rc = llc.llama_decode(self.ptr, b)
            if rc != 0:
                # the failed chunk left nothing behind: drop what it may have written
                llc.llama_memory_seq_rm(self.mem, 0, self.n_past, -1)
                raise BackendError(f"llama_decode failed with code {rc}")
            self.n_past += len(chunk)
            n_out = sum(1 for i in range(len(chunk)) if (c0 + i) in want)
            if n_out:
                ptr = llc.llama_get_logits(self.ptr)
                arr = np.ctypeslib.as_array(ptr, shape=(n_out, self.model.n_vocab))
                out.append(arr.copy())
        if not out:
            return np.zeros((0, self.model.n_vocab), np.float32)
        return np.concatenate(out, axis=0) if len(out) > 1 else out[0]

    def _check_open(self) -> None:
        if not getattr(self, "ptr", None):
            raise BackendError("this llama context is closed")

    def rollback(self, n_past: int) -> None:
        """Forget every position >= n_past (rejected draft tokens)."""
        self._check_open()
        if n_past < self.n_past:
            if not llc.llama_memory_seq_rm(self.mem, 0, n_past, -1):
                raise BackendError("KV rollback failed")
            self.n_past = n_past

    def reset(self) -> None:
        self._check_open()
        llc.llama_memory_clear(self.mem, True)
        self.n_past = 0

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llc.llama_batch_free(self.batch)
            llc.llama_free(self.ptr)
            self.ptr = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def gpu_available() -> bool:
    _init_backend()
    return bool(llc.llama_supports_gpu_offload())
