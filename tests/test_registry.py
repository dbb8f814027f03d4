"""models.toml pairs found by file name in --models-dir (nothing downloads)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spac_gguf.testing import models as testmodels
from spac_gguf.registry import find_file, load_registry, pair_spec


def _touch(d: Path, *names: str) -> None:
    for n in names:
        (d / n).write_bytes(b"")


def test_find_file_prefers_the_quant_order_and_skips_shards_and_projectors(tmp_path):
    _touch(tmp_path, "Qwen3-30B-A3B-Q8_0.gguf", "Qwen_Qwen3-30B-A3B-Q4_K_M.gguf", "Qwen3-30B-A3B-Q2_K.gguf",
           "Qwen3-30B-A3B-Q4_K_M-00002-of-00003.gguf", "mmproj-Qwen3-30B-A3B-F16.gguf", "notes.txt")
    order = load_registry()["quant_order"]["order"]
    assert find_file(tmp_path, ["*qwen3-30b-a3b*.gguf"], order).name == "Qwen_Qwen3-30B-A3B-Q4_K_M.gguf"
    assert find_file(tmp_path, ["*Qwen3-0.6B*.gguf"], order) is None


def test_every_listed_pair_is_complete():
    reg = load_registry()
    for name, p in reg["pairs"].items():
        assert ("target" in p) != ("target_files" in p), name
        if "target_files" in p:
            assert p["target_files"] and all(f.endswith(".gguf") for f in p["target_files"]), name
            assert int(p.get("draft_max", 4)) == 0 or p.get("draft_files"), name   # no draft, no K


def test_pair_needs_models_dir_and_says_what_it_looked_for(tmp_path):
    with pytest.raises(ValueError, match="--models-dir"):
        pair_spec("qwen3-30b-a3b")
    with pytest.raises(ValueError, match=r"Qwen3-30B-A3B"):
        pair_spec("qwen3-30b-a3b", tmp_path)
    _touch(tmp_path, "gpt-oss-20b-MXFP4.gguf")
    spec = pair_spec("gpt-oss-20b", tmp_path)
    assert spec.target.name == "gpt-oss-20b-MXFP4.gguf" and spec.draft is None and spec.draft_max == 0


def test_run_a_pair_from_a_models_dir(tmp_path):
    """The test pair under the names of a real conversion: --pair finds both, the vocabulary check
    passes, and the output equals the same files given by path."""
    t, d = testmodels.make_pair(arch="qwen3moe", quant="Q8_0")
    (tmp_path / "Qwen3-30B-A3B-Q4_K_M.gguf").symlink_to(t)
    (tmp_path / "Qwen3-0.6B-Q8_0.gguf").symlink_to(d)
    common = ["-n", "6", "-t", "2", "-p", "Hello", "--json", "--cpu"]
    by_pair = subprocess.run([sys.executable, "-m", "spac_gguf.cli", "run", "--pair", "qwen3-30b-a3b",
                              "--models-dir", str(tmp_path), *common], capture_output=True, text=True, timeout=300)
    assert by_pair.returncode == 0, by_pair.stderr
    assert "target Qwen3-30B-A3B-Q4_K_M.gguf, draft Qwen3-0.6B-Q8_0.gguf" in by_pair.stderr
    by_path = subprocess.run([sys.executable, "-m", "spac_gguf.cli", "run", str(t), "--draft", str(d), *common],
                             capture_output=True, text=True, timeout=300)
    assert json.loads(by_pair.stdout)["tokens"] == json.loads(by_path.stdout)["tokens"]
    missing = subprocess.run([sys.executable, "-m", "spac_gguf.cli", "run", "--pair", "mixtral-8x7b",
                              "--models-dir", str(tmp_path), *common], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Mixtral-8x7B" in missing.stderr
