"""Routing captured during speculation == routing of the same tokens decoded one at a time."""
from __future__ import annotations

import numpy as np
import pytest

from spac_gguf.pair import load
from spac_gguf.trace import RoutingTrace

from conftest import PROMPTS


def _one_at_a_time_routing(p, tokens: list[int], n_prompt: int) -> np.ndarray:
    """Routing of tokens[n_prompt-1:] decoded singly after a prefill of the rest."""
    ctx, r = p.target_ctx, p.routing
    ctx.reset()
    ctx.decode(tokens[: n_prompt - 1], "last")
    rows = []
    for t in tokens[n_prompt - 1:]:
        r.begin()
        ctx.decode([t], "last")
        rows.append(r.end(1)[0])
    return np.stack(rows)


@pytest.mark.parametrize("K", [3])
def test_routing_of_accepted_rows_matches_sequential(pair_files, threads, K, tmp_path):
    target, draft = pair_files
    p = load(target, target, n_ctx=256, n_threads=threads)  # self-draft: many accepted rows
    prompt = PROMPTS[0]
    toks, trace = p.record_trace(prompt, max_tokens=24, draft_max=K, stop_at_eog=False)
    path = tmp_path / "t.npz"
    trace.save(path)
    trace = RoutingTrace.load(path)
    accepted_rows = np.concatenate([rows[:acc] for rows, acc in trace.passes()])
    prompt_toks = p.tokenize(prompt)
    seq = _one_at_a_time_routing(p, prompt_toks + toks, len(prompt_toks))
    n = min(len(accepted_rows), len(seq))
    assert n >= 20
    a = np.sort(accepted_rows[:n], axis=-1)
    b = np.sort(seq[:n], axis=-1)
    moe = np.array(trace.meta["moe_layers"])
    assert (a[:, moe] >= 0).all() and (a[:, moe] < trace.meta["n_expert"]).all()
    # top-k sets equal row by row (ties between batch and single-row float order would show here;
    # none occur on the test models)
    assert (a == b).all(), np.argwhere(a != b)[:5]
    p.close()


def test_trace_format(pair_files, threads, tmp_path):
    target, draft = pair_files
    p = load(target, draft, n_ctx=256, n_threads=threads)
    toks, trace = p.record_trace(PROMPTS[1], max_tokens=16, draft_max=4, stop_at_eog=False)
    path = tmp_path / "trace.npz"
    trace.save(path)
    z = np.load(path)
    assert z["ids"].dtype == np.int32 and z["ids"].ndim == 3
    assert z["ids"].shape[1] == p.target.n_layer and z["ids"].shape[2] == p.layout.n_expert_used
    assert (np.diff(z["pass_start"]) >= 1).all() and z["pass_start"][0] == 0
    # every pass emits accepted drafts + 1 token; all passes together emitted the 16 tokens
    assert int(z["accepted"].sum()) >= len(toks)
    assert (z["accepted"] >= 1).all()
    rows = np.diff(np.append(z["pass_start"], len(z["ids"])))
    assert (z["accepted"] <= rows).all()
    import json
    meta = json.loads(str(z["meta"]))
    for key in ("arch", "n_expert", "k", "draft_max", "expert_bytes", "dense_bytes"):
        assert key in meta
    assert meta["expert_bytes"] > 0 and meta["dense_bytes"] > 0
    p.close()
