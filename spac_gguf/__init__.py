"""spac-gguf: speculative decoding + a utility-driven GPU expert cache for MoE GGUF models."""
__version__ = "0.1.0"


def load(target, draft=None, **kw):
    """Load a target GGUF and an optional draft; see `spac_gguf.pair.ModelPair`."""
    from .pair import load as _load
    return _load(target, draft, **kw)


__all__ = ["load", "__version__"]
