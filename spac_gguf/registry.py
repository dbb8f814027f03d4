"""Known target/draft pairs and defaults from models.toml; `cache:` paths live in the user cache."""
from __future__ import annotations

import hashlib
import os
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


@dataclass
class PairSpec:
    name: str
    target: Path
    draft: Path | None
    draft_max: int


def pair_spec(name: str | None = None) -> PairSpec:
    reg = load_registry()
    name = name or reg.get("defaults", {}).get("pair", "demo")
    pairs = reg.get("pairs", {})
    if name not in pairs:
        raise KeyError(f"no pair named {name!r} in {MODELS_TOML.name} (known: {', '.join(sorted(pairs))})")
    p = pairs[name]
    return PairSpec(name, resolve(p["target"]), resolve(p["draft"]) if p.get("draft") else None,
                    int(p.get("draft_max", reg.get("defaults", {}).get("draft_max", 4))))


def defaults() -> dict:
    return load_registry().get("defaults", {})
