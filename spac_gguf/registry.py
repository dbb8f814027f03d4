"""Known target/draft pairs and defaults from models.toml; `cache:` paths live in the user cache."""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

MODELS_TOML = Path(__file__).resolve().parent.parent / "models.toml"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spac-gguf"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(path: str) -> Path:
    if path.startswith("cache:"):
        return cache_dir() / path[len("cache:"):]
    return Path(path).expanduser()


def load_registry(path: Path = MODELS_TOML) -> dict:
    if not path.exists():
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def _default(key: str, fallback):
    try:
        return type(fallback)(load_registry().get("defaults", {}).get(key, fallback))
    except (OSError, ValueError, tomllib.TOMLDecodeError):
        return fallback


# the one place these defaults live (models.toml [defaults], else these values)
DEFAULT_DRAFT_MAX: int = _default("draft_max", 4)


@dataclass
class PairSpec:
    name: str
    target: Path
    draft: Path | None
    draft_max: int


def find_file(models_dir: Path, patterns: list[str], order: list[str]) -> Path | None:
    """The file in models_dir (not recursive) matching the first pattern that matches anything,
    case-insensitively; among several, the first quant of `order` in the name, then by name."""
    files = sorted(p for p in models_dir.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    for pat in patterns:
        hits = [p for p in files if fnmatch.fnmatch(p.name.lower(), pat.lower())]
        hits = [p for p in hits if not re.search(r"-0000[2-9]-of-|mmproj", p.name, re.I)]  # first shard; no projectors
        if hits:
            def rank(p: Path) -> tuple[int, str]:
                up = p.name.upper()
                return next((i for i, q in enumerate(order) if q.upper() in up), len(order)), p.name
            return min(hits, key=rank)
    return None


def pair_spec(name: str | None = None, models_dir: str | Path | None = None) -> PairSpec:
    """A pair from models.toml: `target`/`draft` paths, or `target_files`/`draft_files` patterns
    looked up in models_dir."""
    reg = load_registry()
    name = name or reg.get("defaults", {}).get("pair", "demo")
    pairs = reg.get("pairs", {})
    if name not in pairs:
        raise KeyError(f"no pair named {name!r} in {MODELS_TOML.name} (known: {', '.join(sorted(pairs))})")
    p = pairs[name]
    draft_max = int(p.get("draft_max", DEFAULT_DRAFT_MAX))
    if "target_files" not in p:
        return PairSpec(name, resolve(p["target"]), resolve(p["draft"]) if p.get("draft") else None, draft_max)
    if models_dir is None:
        raise ValueError(f"pair {name!r} is found by file name: give --models-dir DIR (the folder with its GGUF files)")
    d = Path(models_dir).expanduser()
    if not d.is_dir():
        raise ValueError(f"--models-dir {d}: not a directory")
    order = reg.get("quant_order", {}).get("order", [])
    target = find_file(d, p["target_files"], order)
    if target is None:
        raise ValueError(f"pair {name!r}: no file in {d} matches {', '.join(p['target_files'])}")
    draft = find_file(d, p["draft_files"], order) if p.get("draft_files") else None
    return PairSpec(name, target, draft, draft_max if draft is not None else 0)
