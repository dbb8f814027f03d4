"""RunConfig: one validation for run and serve, each error naming its flag."""
from __future__ import annotations

import pytest

from spac_gguf.config import ConfigError, RunConfig
from spac_gguf.registry import DEFAULT_DRAFT_MAX, load_registry


@pytest.mark.parametrize("kw,flag", [
    (dict(n_ctx=8), "-c"), (dict(draft_max=-1), "--draft-max"), (dict(threads=0), "-t"),
    (dict(cache_slots=2, budget="1GiB"), "--cache-slots or --budget"), (dict(cache_slots=-2), "--cache-slots"),
    (dict(policy="fifo"), "--policy"), (dict(cpu=True, gpu_layers=99), "--cpu and -ngl"),
])
def test_bad_values_name_their_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-")):
        RunConfig(**kw).validate()


def test_defaults_live_in_one_place(tmp_path):
    assert RunConfig().validate().draft_max is None                       # resolved from the pair, else:
    assert DEFAULT_DRAFT_MAX == int(load_registry()["defaults"]["draft_max"])
    t = tmp_path / "t.gguf"
    t.write_bytes(b"")
    assert RunConfig(target=t).models() == (t, None, DEFAULT_DRAFT_MAX)
    assert RunConfig(target=t, draft_max=0).models()[2] == 0
    assert RunConfig(cpu=True, gpu_layers=None).placement(t, None) == {"n_gpu_layers": 0, "policy": "none", "cache_slots": None}


def test_mmap_flags_mean_what_llama_cpp_means():
    """--no-mmap: host experts read into pinned memory; --mmap: mapped; neither: the pair's default."""
    assert RunConfig(mmap=False).pinned_experts is True
    assert RunConfig(mmap=True).pinned_experts is False
    assert RunConfig().pinned_experts is None
