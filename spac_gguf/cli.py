"""`spac-gguf`: a thin shell over the Python API. Flags follow llama.cpp where they exist."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Run Mixture-of-Experts GGUF models with speculative decoding and a GPU expert cache.")
demo_app = typer.Typer(add_completion=False, help="The built-in real-weights demo pair.")
app.add_typer(demo_app, name="demo")


# The flags that choose and place the models, shared by run and serve (llama.cpp's names where they
# exist). Each is declared once, here, and reaches the command as the RunConfig field of its name
# (TARGET and -m both as `target`): see _takes_pair_flags.
TargetArg = Annotated[Optional[Path], typer.Argument(help="target GGUF (default: the demo pair)")]
ModelOpt = Annotated[Optional[Path], typer.Option("-m", "--model", help="target GGUF (same as TARGET)")]
DraftOpt = Annotated[Optional[Path], typer.Option("-md", "--model-draft", "--draft", help="draft GGUF")]
PairOpt = Annotated[Optional[str], typer.Option("--pair", help="a pair from models.toml")]
ModelsDirOpt = Annotated[Optional[Path], typer.Option("--models-dir", help="folder where --pair looks for its GGUF files")]
DraftMaxOpt = Annotated[Optional[int], typer.Option("--draft-max", help="K: most tokens drafted per round")]
CtxOpt = Annotated[int, typer.Option("-c", "--ctx-size")]
ThreadsOpt = Annotated[Optional[int], typer.Option("-t", "--threads")]
GpuLayersOpt = Annotated[Optional[int], typer.Option("-ngl", "--gpu-layers", "--n-gpu-layers",
                                     help="layers on the GPU (default: auto-fit when a GPU is present, else 0)")]
CpuOpt = Annotated[bool, typer.Option("--cpu", help="no GPU even if one is present")]
CacheSlotsOpt = Annotated[Optional[int], typer.Option("--cache-slots", help="cache slots per MoE layer")]
BudgetOpt = Annotated[Optional[str], typer.Option("--budget", help="cache size: 2GiB, 512MB or 25% of expert bytes")]
HwOpt = Annotated[Optional[str], typer.Option("--hw", help="hardware profile (models.toml [hw.*])")]
MmapOpt = Annotated[Optional[bool], typer.Option("--mmap/--no-mmap",
                                          help="with -ngl: --no-mmap reads host experts into pinned memory (uploads "
                                               "at link speed; the default), --mmap keeps them mapped")]


def _takes_pair_flags(n_ctx: int, policy_help: str, inpass_help: str):
    """Decorator of a command that loads a pair: the flags above come before its own in its
    signature (so in --help), and it is called with them as one validated RunConfig, `cfg`.
    `n_ctx` is the command's -c default; the help of --policy and --inpass is the command's own."""
    import functools
    import inspect

    flags = {
        "target": (TargetArg, None), "model": (ModelOpt, None), "draft": (DraftOpt, None), "pair": (PairOpt, None),
        "models_dir": (ModelsDirOpt, None), "draft_max": (DraftMaxOpt, None), "n_ctx": (CtxOpt, n_ctx),
        "threads": (ThreadsOpt, None), "gpu_layers": (GpuLayersOpt, None), "cpu": (CpuOpt, False),
        "policy": (Annotated[Optional[str], typer.Option("--policy", help=policy_help)], None),
        "cache_slots": (CacheSlotsOpt, None), "budget": (BudgetOpt, None), "hw": (HwOpt, None),
        "mmap": (MmapOpt, None), "inpass": (Annotated[Optional[bool], typer.Option("--inpass/--no-inpass",
                                                                                   help=inpass_help)], None),
    }

    def decorate(fn):
        own = [p for name, p in inspect.signature(fn).parameters.items() if name != "cfg"]
        shared = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann, default=default)
                  for name, (ann, default) in flags.items()]

        @functools.wraps(fn)
        def command(**kw):
            from .config import RunConfig
            given = {name: kw.pop(name) for name in flags}
            model = given.pop("model")
            given["target"] = given["target"] or model
            return fn(cfg=RunConfig(**given).validate(), **kw)

        command.__signature__ = inspect.Signature(shared + own)
        return command
    return decorate


class UsageError(Exception):
    """A one-line message for the user; exit code 2."""


def _fail(msg: str, code: int = 2) -> None:
    sys.stderr.write(f"spac-gguf: {msg}\n")
    raise typer.Exit(code)


def _guarded(fn):
    """Turn every expected error into one line on stderr and exit code 2 — never a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from . import gguf_layout
        from .llama_backend import BackendError
        from .pair import InputError
        try:
            return fn(*a, **kw)
        except typer.Exit:
            raise
        except (UsageError, InputError, gguf_layout.GGUFError, BackendError, KeyError, ValueError,
                FileNotFoundError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            _fail(str(msg))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as e:  # noqa: BLE001 - the CLI must not print a raw traceback
            if os.environ.get("SPAC_DEBUG") == "1":
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (SPAC_DEBUG=1 shows the traceback)", 1)
    return wrapper


class StatusLine:
    """One live status (tokens/s, acceptance, K, cache hit rate, bytes loaded) on stderr while
    generating in a terminal, redrawn at most 4 times a second and erased before more text comes.
    When stdout is the same terminal the status sits after the text of the current line (dimmed), and
    erasing it rewrites that partial line; it is not shown where it would wrap."""

    def __init__(self, stream, enabled: bool, same_tty: bool, every_s: float = 0.25):
        self.stream, self.enabled, self.same_tty, self.every_s = stream, enabled, same_tty, every_s
        self.shown = False
        self.t_last = 0.0
        self.line = ""                                  # text after the last newline on stdout

    def text(self, piece: str) -> None:
        self.line = (self.line + piece).rsplit("\n", 1)[-1]

    def update(self, stats, cache: dict | None) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.t_last < self.every_s:
            return
        self.t_last = now
        parts = [f"{stats.n_generated} tok", f"{stats.tokens_per_second:.1f} tok/s"]
        if stats.acceptance_rate is not None:
            parts.append(f"accept {stats.acceptance_rate:.2f}")
        if stats.k_counts:
            parts.append(f"K {max(stats.k_counts, key=stats.k_counts.get)}")
        if cache:
            if cache.get("hit_rate") is not None:
                parts.append(f"hit {cache['hit_rate']:.0%}")
            loaded = (cache.get("bytes_loaded") or 0) + (cache.get("inpass_bytes") or 0)
            parts.append(f"{loaded / 1e6:.0f} MB loaded")
        status = "[" + " | ".join(parts) + "]"
        prefix = self.line if self.same_tty else ""
        if len(prefix) + 2 + len(status) >= shutil.get_terminal_size((80, 24)).columns or "\t" in prefix:
            self.clear()
            return
        self.stream.write("\r\033[K" + prefix + ("  " if prefix else "") + "\033[2m" + status + "\033[0m")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K" + (self.line if self.same_tty else ""))
            self.stream.flush()
            self.shown = False


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    """llama.cpp's prompt escapes (-e, on by default there): \\n, \\t, \\r, \\\\, \\', \\"."""
    return re.sub(r"""\\([ntr\\'"])""", lambda m: _ESCAPES[m.group(1)], text)


@app.command()
@_guarded
@_takes_pair_flags(2048, policy_help="expert cache policy: none, static, lru, lfu, spac (default: spac when "
                                     "auto-fit caches experts, else none)",
                   inpass_help="copy a share of each pass's misses into GPU slots during the pass "
                               "(default: on for lru and spac with GPU slots)")
def run(
    cfg,
    prompt: str = typer.Option("The quick brown fox", "-p", "--prompt"),
    n_predict: int = typer.Option(64, "-n", "--n-predict", help="tokens to generate"),
    temp: float = typer.Option(0.0, "--temp", help="temperature; 0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="sampling seed; -1 = random (as in llama.cpp)"),
    adaptive: bool = typer.Option(True, "--adaptive/--no-adaptive",
                                  help="choose K per round up to --draft-max (off: always --draft-max)"),
    trace: Optional[Path] = typer.Option(None, "--trace", help="write the routing trace (.npz)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="trace for --policy static"),
    slots_on_host: bool = typer.Option(False, "--slots-on-host", help="keep cache slots in host memory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object at the end"),
    escape: bool = typer.Option(True, "--escape/--no-escape", "-e", help="process \\n, \\t, ... in the prompt"),
):
    """Generate text from TARGET, speculatively when a draft is given."""
    from .trace import TraceRecorder
    cfg.calibration, cfg.slots_on_host = calibration, slots_on_host       # flags of run only
    if n_predict < 1:
        raise UsageError(f"-n must be >= 1 (got {n_predict})")
    if seed is not None and seed < -1:
        raise UsageError(f"--seed must be >= -1 (got {seed})")
    seed = None if seed == -1 else seed
    if trace is not None:                                # fail before generating, not after
        parent = trace.resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK) or (trace.exists() and not os.access(trace, os.W_OK)):
            raise UsageError(f"--trace {trace}: cannot write there")
    if escape:
        prompt = unescape(prompt)
    p, tpath, dpath, K = cfg.load()
    if not p.is_moe:
        sys.stderr.write("spac-gguf: the target is dense (no routed experts): expert features are off\n")
    rec = TraceRecorder(p.trace_meta(K)) if trace else None
    toks, text = [], []
    last = None
    tty = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    status = StatusLine(sys.stderr, enabled=not as_json and tty, same_tty=tty and sys.stdout.isatty())
    try:
        for tok in p.generate(prompt, max_tokens=n_predict, temperature=temp, top_p=top_p, seed=seed,
                              draft_max=K if dpath else 0, adaptive=adaptive, recorder=rec):
            toks.append(tok.token)
            text.append(tok.text)
            last = tok
            if not as_json:
                status.clear()
                sys.stdout.write(tok.text)
                sys.stdout.flush()
                status.text(tok.text)
                status.update(tok.stats, p.cache_stats())
    finally:
        status.clear()
    stats = last.stats if last else None
    for note in p.notices:
        sys.stderr.write(f"spac-gguf: {note}\n")
    if stats is not None and stats.stop_reason == "context":
        sys.stderr.write(f"spac-gguf: context full after {stats.n_generated} generated tokens "
                         f"({stats.n_prompt} prompt + {stats.n_generated} = n_ctx {p.target_ctx.n_ctx}): raise -c\n")
    if rec is not None:
        tr = rec.trace()
        tr.meta["prompt_tokens"] = stats.n_prompt if stats else 0
        try:
            tr.save(trace)
        except OSError as e:
            raise UsageError(f"--trace {trace}: {e.strerror or e}") from None
    result = {
        "tokens": toks, "text": "".join(text), "n_generated": len(toks),
        "n_target_passes": stats.n_target_passes if stats else 0,
        "acceptance_rate": (stats.acceptance_rate if dpath else None) if stats else None,
        "tokens_per_second": stats.tokens_per_second if stats else 0.0,
        "routing": p.routing_info,
        "draft_max": K if dpath else 0,
        "adaptive": bool(adaptive and dpath),
        "target": str(tpath), "draft": str(dpath) if dpath else None,
        "stats": stats.as_dict() if stats else None,
        "cache": p.cache_stats(),
    }
    if as_json:
        print(json.dumps(result))
    else:
        acc = "n/a" if result["acceptance_rate"] is None else f"{result['acceptance_rate']:.2f}"
        ks = (f"K<={K} {dict(sorted(stats.k_counts.items()))}" if result["adaptive"] and stats
              else f"K={result['draft_max']}")
        sys.stdout.write("\n")
        sys.stderr.write(f"[{len(toks)} tokens, {result['tokens_per_second']:.1f} tok/s, "
                         f"{result['n_target_passes']} target passes, acceptance {acc}, {ks}]\n")
    p.close()


@app.command()
@_guarded
@_takes_pair_flags(4096, policy_help="expert cache policy (default as in run)",
                   inpass_help="in-pass loads of misses (see run)")
def serve(
    cfg,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    alias: Optional[str] = typer.Option(None, "--alias", help="model name clients use (default: the target's file stem)"),
):
    """Serve TARGET over an OpenAI-compatible HTTP API (llama-server's flags where they exist)."""
    import socket

    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535 (got {port})")
    try:                                                  # fail before loading a model, not after
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        import uvicorn

        from .server import make_app
    except ImportError as e:
        raise UsageError(f"serve needs fastapi and uvicorn ({e.name} is missing): pip install fastapi uvicorn") from None
    p, tpath, dpath, K = cfg.load()
    name = alias or Path(tpath).stem
    application = make_app(p, alias=name, draft_max=K)
    sys.stderr.write(f"spac-gguf: serving {name} on http://{host}:{port}/v1 (Ctrl-C stops)\n")
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        application.state.worker.stop()
        p.close()
    if server.should_exit and not server.started:
        raise UsageError(f"the server on {host}:{port} did not start")
    raise typer.Exit(130 if server.should_exit else 0)


@app.command()
@_guarded
def inspect(model: Path = typer.Argument(..., help="a GGUF file"),
            as_json: bool = typer.Option(False, "--json")):
    """Describe a GGUF: architecture, experts, byte layout."""
    from . import gguf_layout
    lay = gguf_layout.describe(model)
    if as_json:
        print(json.dumps(lay.to_json()))
    else:
        print(gguf_layout.format_layout(lay))


@app.command()
@_guarded
def simulate(
    trace: Optional[Path] = typer.Argument(None, help="routing trace (.npz) from `spac-gguf run --trace`"),
    routing: Optional[str] = typer.Option(None, "--routing",
                                          help="generate the trace instead: random, qwen3-calibrated, high-skew"),
    seed: int = typer.Option(0, "--seed", help="seed of the --routing trace"),
    budget: Optional[str] = typer.Option(None, "--budget", help="2GiB, 512MB or 25% of expert bytes"),
    cache_slots: Optional[int] = typer.Option(None, "--cache-slots"),
    hw: str = typer.Option("desktop-pcie4x16", "--hw", help="hardware profile"),
    policy: str = typer.Option("none,static,lru,lfu,oracle_budgeted,belady,spac", "--policy", help="P[,P...]"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="trace for static (default: first 20%)"),
    split: bool = typer.Option(False, "--split", help="uncached experts may also be copied at verify time"),
    lookahead: bool = typer.Option(False, "--lookahead", help="also report top-S precision/recall per ranker"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Replay a routing trace (a file, or one generated with --routing) through each policy's
    decision code with a cost model."""
    from .hardware import load_profile
    from .simulator import format_table, simulate as run_sim
    from .trace import RoutingTrace
    if (budget is None) == (cache_slots is None):
        raise UsageError("give exactly one of --budget or --cache-slots")
    if (trace is None) == (routing is None):
        raise UsageError("give a trace file or --routing PRESET, not both or neither")
    if routing is not None:
        from .locality import PRESETS, generate
        if routing not in PRESETS:
            raise UsageError(f"unknown --routing preset {routing!r}; known: {', '.join(PRESETS)}")
        tr = generate(routing, seed=seed)
    else:
        tr = RoutingTrace.load(trace)                    # checks the file (one-line errors)
    cal = RoutingTrace.load(calibration) if calibration else None
    res = run_sim(tr, policy.split(","), budget=budget, cache_slots=cache_slots, hw=load_profile(hw),
                  calibration=cal, split=split, with_lookahead=lookahead)
    print(json.dumps(res) if as_json else format_table(res))


@app.command()
@_guarded
def calibrate(base: Optional[str] = typer.Option(None, "--base", help="profile to take GPU fields from"),
              name: Optional[str] = typer.Option(None, "--name")):
    """Measure this machine's CPU expert bandwidth; print a [hw.NAME] table for models.toml."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .hardware import calibrate as measure
    # one measurement with no steps to count: a spinner, in a terminal only (like run's status line)
    tty = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    with Progress(SpinnerColumn(), TextColumn("calibrate: measuring CPU streaming bandwidth"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True, disable=not tty) as prog:
        prog.add_task("calibrate", total=None)
        prof = measure(name=name, base=base)
    print(prof.to_toml())


@demo_app.command("build")
@_guarded
def demo_build(force: bool = typer.Option(False, "--force", help="rebuild even if present")):
    """Build the real-weights demo pair (SmolLM2-135M cut into experts) into the cache."""
    from . import demo
    from .config import _build_demo_with_progress
    t, d = demo.build_demo_pair(force=force) if force else _build_demo_with_progress()
    print(f"target: {t}\ndraft:  {d}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
