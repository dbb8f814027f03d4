"""RunConfig: every user-facing knob of loading a pair, validated in one place, with its defaults.

`spac-gguf run` and `spac-gguf serve` build one from their flags; `RunConfig.load()` resolves the
models (paths, a models.toml pair, or the demo), applies auto-fit where the user left placement
open, and returns the loaded ModelPair with the K to draft.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .registry import DEFAULT_DRAFT_MAX

POLICIES = ("none", "static", "lru", "lfu", "spac")


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag (one line for the user)."""


@dataclass
class RunConfig:
    target: Path | None = None          # TARGET / -m; None: the named pair, else models.toml's default pair
    draft: Path | None = None           # -md
    pair: str | None = None             # --pair
    models_dir: Path | None = None      # --models-dir (pairs found by file name)
    n_ctx: int = 2048                   # -c
    threads: int | None = None          # -t
    gpu_layers: int | None = None       # -ngl; None: auto-fit with a GPU, else 0
    cpu: bool = False                   # --cpu
    policy: str | None = None           # --policy; None: spac when auto-fit caches, else none
    cache_slots: int | None = None      # --cache-slots
    budget: str | None = None           # --budget (the cache's size)
    hw: str | None = None               # --hw
    calibration: Path | None = None     # --calibration
    slots_on_host: bool = False         # --slots-on-host
    mmap: bool | None = None            # --mmap/--no-mmap; None: pinned host experts with a GPU, mapped without
    inpass: bool | None = None          # --inpass/--no-inpass
    draft_max: int | None = None        # --draft-max; None: the pair's, else DEFAULT_DRAFT_MAX

    @property
    def pinned_experts(self) -> bool | None:
        """--no-mmap reads host experts into pinned memory, --mmap keeps them mapped; None: the
        pair's default (pinned when layers go to a GPU)."""
        return None if self.mmap is None else not self.mmap

    def validate(self) -> "RunConfig":
        if self.n_ctx < 16:
            raise ConfigError(f"-c must be >= 16 (got {self.n_ctx})")
        if self.draft_max is not None and self.draft_max < 0:
            raise ConfigError(f"--draft-max must be >= 0 (got {self.draft_max})")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"-t must be >= 1 (got {self.threads})")
        if self.cache_slots is not None and self.budget is not None:
            raise ConfigError("give --cache-slots or --budget, not both")
        if self.cache_slots is not None and self.cache_slots < 0:
            raise ConfigError(f"--cache-slots must be >= 0 (got {self.cache_slots})")
        if self.policy is not None and self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)} (got {self.policy!r})")
        if self.cpu and self.gpu_layers:
            raise ConfigError("--cpu and -ngl contradict each other")
        return self

    def models(self) -> tuple[Path, Path | None, int]:
        """(target, draft, K): paths from the flags, else the pair from models.toml (the demo is built
        on first use)."""
        from .registry import pair_spec
        if self.target is not None:
            return self.target, self.draft, self.draft_max if self.draft_max is not None else DEFAULT_DRAFT_MAX
        spec = pair_spec(self.pair, self.models_dir)
        if self.models_dir is not None:
            sys.stderr.write(f"spac-gguf: pair {spec.name}: target {spec.target.name}"
                             f"{', draft ' + spec.draft.name if spec.draft else ', no draft'}\n")
        if spec.name == "demo" and not spec.target.exists():
            _build_demo_with_progress()
        for role, p in (("target", spec.target), ("draft", spec.draft)):
            if p is not None and not p.exists():
                raise ConfigError(f"{role} of pair {spec.name!r} is missing: {p} (build it: see README)")
        return spec.target, (self.draft or spec.draft), self.draft_max if self.draft_max is not None else spec.draft_max

    def placement(self, target: Path, draft: Path | None) -> dict:
        """load() keywords for where things go: the flags where given, else the auto-fit plan when a
        GPU is present (printed as one block on stderr), else the CPU path."""
        from . import autofit
        kw = dict(n_gpu_layers=self.gpu_layers or 0, policy=self.policy or "none", cache_slots=self.cache_slots)
        if self.cpu or self.gpu_layers is not None:
            return kw
        dev = autofit.device_memory()
        if dev is None:
            return kw
        fit = autofit.plan_pair(target, draft, self.n_ctx, free=dev.free, device=dev.name)
        kw["n_gpu_layers"] = 99
        if fit.mode == "gpu":
            kw["experts_on_cpu"] = False
        elif fit.mode == "cache":
            kw["policy"] = self.policy or "spac"
            if self.cache_slots is None and self.budget is None and kw["policy"] != "none":
                kw["cache_slots"] = fit.slots_per_layer
                kw["fit_cache"] = True                  # re-sized from the free memory after loading
        sys.stderr.write("spac-gguf: auto-fit (override with -ngl, --policy, --budget, --cache-slots; --cpu: no GPU)\n")
        for line in fit.lines():
            sys.stderr.write(f"  {line}\n")
        if fit.mode == "cache" and self.hw is None and kw["policy"] != "none":   # this machine's costs, once
            from .hardware import machine_profile
            from .registry import cache_dir
            path, measured = machine_profile(dev.name, dev.total, cache_dir())
            kw["hw"] = str(path)
            sys.stderr.write(f"  profile      {'measured now' if measured else 'measured before'}, {path} (--hw overrides)\n")
        if fit.mode == "cache":                         # where the plan's cache line is not what runs
            given = [f"{flag} {v}" for flag, v in (("--cache-slots", self.cache_slots), ("--budget", self.budget))
                     if v is not None]
            if self.policy not in (None, "spac"):
                given.append(f"--policy {self.policy}")
            if given:
                sys.stderr.write(f"  overridden   {', '.join(given)} (the plan: {fit.slots_per_layer} slots, spac)\n")
        return kw

    def load(self):
        """(ModelPair, target path, draft path, K)."""
        from .pair import load
        self.validate()
        target, draft, K = self.models()
        place = self.placement(target, draft)
        place.setdefault("hw", self.hw)
        p = load(target, draft, n_ctx=self.n_ctx, n_threads=self.threads, budget=self.budget,
                 calibration=self.calibration, draft_max=K, slots_on_host=True if self.slots_on_host else None,
                 pinned_experts=self.pinned_experts, inpass=self.inpass, **place)
        for note in [n for n in p.notices if n.startswith("auto-fit: ")]:   # the plan block's last line
            sys.stderr.write(f"  loaded       {note[len('auto-fit: '):]}\n")
            p.notices.remove(note)
        return p, target, draft, K


def _build_demo_with_progress():
    from rich.console import Console
    from rich.progress import Progress

    from . import demo
    with Progress(transient=True, console=Console(stderr=True)) as prog:
        task = prog.add_task("building the demo pair", total=1.0)

        def cb(stage: str, done: float, total: float):
            prog.update(task, completed=(done / total) if total else 0.0, description=f"demo pair: {stage}")
        return demo.build_demo_pair(progress=cb)
