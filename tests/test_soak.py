"""The CI-sized soak (issue 11): 500 tokens per policy with in-pass loads on the test pair, then load/
close cycles; scripts/soak.py fails on RSS growth > 5 %, a thread leak or a slot whose bytes differ
from the file. The 10,000-token run is in docs/BENCHMARKS.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spac_gguf import native

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not native.available(), reason="needs our patched llama.cpp build")
def test_soak_500_tokens(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--tokens", "500", "--pairs", "test",
                        "--cycles", "10", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {x["policy"] for x in res["runs"]} == {"spac", "lru"}
    assert all(x["tokens"] == 500 and x["ledger_ok"] and x["inpass_loads"] > 0 for x in res["runs"])
    assert res["cycles"][0]["threads"][1] <= res["cycles"][0]["threads"][0]
