"""Lossless speculative decoding against the target alone (the oracle)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sstats

from spac_gguf.llama_backend import LlamaContext, LlamaModel
from spac_gguf.pair import TargetVerifier, load
from spac_gguf.sampling import Sampler
from spac_gguf.speculative import CatchUp, accept, generate

from conftest import PROMPTS

N_TOKENS = 64


def _tokens(p, prompt, K, **kw):
    """Exactly K drafts per round (adaptive K is tested in test_draft_length.py)."""
    return [t.token for t in p.generate(prompt, max_tokens=N_TOKENS, draft_max=K, adaptive=False,
                                        stop_at_eog=False, **kw)]


@pytest.fixture(scope="module")
def alone(loaded):
    """The oracle: greedy tokens of the target alone (K = 0), per prompt."""
    return {prompt: _tokens(loaded, prompt, 0) for prompt in PROMPTS}


@pytest.mark.parametrize("K", [1, 3, 8])
def test_greedy_speculative_equals_target_alone(loaded, alone, K):
    for prompt in PROMPTS:
        spec = _tokens(loaded, prompt, K)
        assert len(alone[prompt]) == N_TOKENS
        assert spec == alone[prompt], f"K={K} prompt={prompt!r}"
        assert loaded.last_stats.n_drafted > 0


def test_plain_decoding_equals_one_token_at_a_time(pair_files, threads):
    """K=0 through our loop == an independent greedy loop on the raw context."""
    target, _ = pair_files
    m = LlamaModel(target)
    ctx = LlamaContext(m, n_ctx=256, n_threads=threads)
    toks = m.tokenize(PROMPTS[0])
    logits = ctx.decode(toks, "last")[0]
    ref = []
    for _ in range(16):
        t = int(np.argmax(logits))
        ref.append(t)
        logits = ctx.decode([t], "last")[0]
    ctx.reset()
    ours = [s.token for s in generate(TargetVerifier(ctx, None), None, toks, max_tokens=16, draft_max=0,
                                      sampler=Sampler())]
    assert ours == ref


@pytest.mark.parametrize("way", ["auto", "batch", "split"])
def test_draft_with_same_weights_is_always_accepted(pair_files, threads, way):
    """The target as its own draft: every proposal must be accepted (checks the KV bookkeeping), with
    each way of catching the draft up on the two tokens a fully accepted round leaves it."""
    target, _ = pair_files
    p = load(target, target, n_ctx=256, n_threads=threads)
    p.catch_up = CatchUp(way)
    out = _tokens(p, PROMPTS[1], 4)
    st = p.last_stats
    assert st.acceptance_rate == pytest.approx(1.0)
    # 64 tokens at K=4: each pass emits 5 tokens (the last round drafts only what is still needed)
    assert st.n_target_passes == -(-N_TOKENS // 5)
    used = {k: c for k, (c, _) in p.catch_up.seconds.items()}
    assert sum(used.values()) == st.n_target_passes - 1        # every round after the first caught up on two
    if way != "auto":
        assert used[way == "split"] == sum(used.values())
    else:
        assert min(used.values()) >= p.catch_up.tries           # both ways timed
    assert out == _tokens(p, PROMPTS[1], 0)
    p.close()


def test_catch_up_tries_both_ways_then_uses_the_faster_and_rechecks():
    c = CatchUp(tries=2, recheck=8)
    seen = []
    for _ in range(4):                                         # alternates until each way is timed twice
        split = c.split()
        seen.append(split)
        c.timed(split, 0.004 if split else 0.0055)
    assert sorted(seen) == [False, False, True, True]
    ways = [c.split() for _ in range(16)]
    assert ways.count(True) == 14 and ways.count(False) == 2   # the faster, the other every 8th use
    for _ in range(20):                                        # the machine changes: splitting gets dear
        c.timed(True, 0.009)
    assert [c.split() for _ in range(16)].count(False) == 14
    with pytest.raises(ValueError):
        CatchUp("sometimes")


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of `counts` to `probs` over the categories with expected count >= 5."""
    n = counts.sum()
    exp = probs * n
    keep = exp >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(exp[keep], exp[~keep].sum())
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    return float(sstats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def test_accept_rule_preserves_target_distribution():
    """The accept/resample rule alone, on synthetic p and q that differ a lot."""
    rng = np.random.default_rng(0)
    V, K = 6, 2
    t_logits = rng.normal(0, 1.5, size=(K + 1, V))
    d_logits = rng.normal(0, 1.5, size=(K, V))
    s = Sampler(temperature=1.0, seed=1)
    p0 = s.probs(t_logits[0])
    counts = np.zeros(V)
    for _ in range(20000):
        qs = [s.probs(d_logits[i]) for i in range(K)]
        drafts = [s.draw(q) for q in qs]
        counts[accept(drafts, qs, t_logits, s)[0]] += 1
    assert _chi_square_pvalue(counts, p0) > 1e-3
    # and it is not trivially so: the draft's own distribution is rejected by the same test
    assert _chi_square_pvalue(counts, s.probs(d_logits[0])) < 1e-6


def test_sampling_first_token_distribution_matches_target(pair_files, threads):
    """End to end on real models: first token of a speculative round (K=3) ~ target's p."""
    target, draft = pair_files
    p = load(target, draft, n_ctx=64, n_threads=threads)
    temp = 1.0
    toks = p.tokenize(PROMPTS[2])
    probs = Sampler(temperature=temp).probs(p.target_ctx.decode(toks, "last")[0])
    top = np.argsort(-probs)[:12]
    counts = np.zeros(len(top) + 1)
    n = 300
    for seed in range(n):
        gen = p.generate(toks, max_tokens=8, draft_max=3, adaptive=False, temperature=temp, seed=seed)
        first = next(iter(gen)).token
        gen.close()
        hit = np.nonzero(top == first)[0]
        counts[hit[0] if hit.size else -1] += 1
    assert p.last_stats.n_drafted > 0
    ref = np.append(probs[top], 1.0 - probs[top].sum())
    assert _chi_square_pvalue(counts, ref) > 1e-3
    p.close()
