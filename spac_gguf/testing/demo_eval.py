"""How good the demo pair is (docs/DEMO.md): held-out perplexity of target and draft, greedy
agreement, speculative acceptance replayed along the target's greedy stream, and routing statistics
(entropy, reuse from one token to the next).

Measurement, not run time: `scripts/make_demo_pair.py --eval` and tests/test_demo.py use it; the
pair itself is built by `spac_gguf.demo`. Evaluation text is disjoint from the fitting text
(`demo.fit_text`).
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from ..demo import Dense, tokenize

def heldout_texts() -> dict[str, str]:
    """Evaluation text never used for fitting: license prose, stdlib code, markdown README."""
    std = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    lic = std / "LICENSE.txt"
    if lic.exists():
        out["license"] = lic.read_text(encoding="utf-8", errors="replace")
    fr = (std / "fractions.py").read_text(encoding="utf-8")
    out["code"] = fr[fr.index("class Fraction"):]
    try:
        import importlib.metadata as md
        body = md.metadata("rich").get_payload()
        if body:
            out["markdown"] = body
    except Exception:
        pass
    return out


CHAT_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in a few sentences why the sky is blue.",
    "Give me three tips for staying focused while studying.",
)


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _llama(path, n_ctx: int = 512, n_threads: int = 1):
    import llama_cpp
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, logits_all=True,
                           verbose=False)


def all_logits(llm, tokens: list[int]) -> np.ndarray:
    """Logits after each token of `tokens` (fresh KV cache)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def perplexity(llm, tokens: list[int]) -> tuple[float, int]:
    """(sum of NLL, count) of tokens[1:] given their prefix."""
    lg = all_logits(llm, tokens)[:-1].astype(np.float64)
    mx = lg.max(1, keepdims=True)
    lse = np.log(np.exp(lg - mx).sum(1)) + mx[:, 0]
    nll = lse - lg[np.arange(len(lg)), np.asarray(tokens[1:])]
    return float(nll.sum()), len(nll)


def greedy(llm, tokens: list[int], n: int) -> list[int]:
    """n greedy tokens after `tokens` (one token per eval step, as a decoder would)."""
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def spec_acceptance(match: list[bool], k: int = 4) -> float:
    """Fraction of greedy draft proposals accepted, replaying speculative decoding with `k` drafts
    per round over the target's greedy stream (match[i]: draft argmax == target token i)."""
    prop = acc = 0
    p = 0
    while p < len(match):
        run = match[p:p + k]
        m = next((i for i, ok in enumerate(run) if not ok), len(run))
        prop += len(run)
        acc += m
        p += m + 1
    return acc / max(prop, 1)


def heldout_tokens(model_path, n_tokens: int = 400) -> dict[str, list[int]]:
    return {name: tokenize(model_path, text)[:n_tokens] for name, text in heldout_texts().items()}


def routing_stats(target_path, dense_path, token_lists: list[list[int]]) -> dict:
    """Per-layer routing entropy (bits, of the expert-usage distribution) and the probability
    that an expert used at token t is used again at t+1, from the target's router applied to
    the dense model's FFN inputs (numpy)."""
    import gguf
    r = gguf.GGUFReader(str(target_path))
    k = int(r.fields["llama.expert_used_count"].contents())
    gate = {t.name: np.asarray(t.data, np.float32) for t in r.tensors if t.name.endswith("ffn_gate_inp.weight")}
    dense = Dense(dense_path)
    ent, reuse = [], []
    for l, h, _ in dense.layer_activations(token_lists):
        w = gate[f"blk.{l}.ffn_gate_inp.weight"]  # [E, n_embd]
        logit = h @ w.T
        sel = np.argsort(-logit, axis=1, kind="stable")[:, :k]
        E = w.shape[0]
        mask = np.zeros((len(h), E), bool)
        np.put_along_axis(mask, sel, True, 1)
        p = mask.mean(0) / k
        ent.append(float(-(p[p > 0] * np.log2(p[p > 0])).sum()))
        same, tot = 0, 0
        start = 0
        for c in token_lists:  # no reuse across chunk borders
            mk = mask[start:start + len(c)]
            same += int((mk[1:] & mk[:-1]).sum())
            tot += int(mk[:-1].sum())
            start += len(c)
        reuse.append(same / max(tot, 1))
    return {"entropy_bits": ent, "max_entropy_bits": float(np.log2(E)), "reuse": reuse,
            "reuse_if_random": k / E}


def evaluate_pair(target_path, draft_path, n_tokens: int = 400, n_greedy: int = 32, n_threads: int = 1,
                  routing: bool = True, agreement: bool = True) -> dict:
    """Held-out perplexity of target and draft, greedy agreement (unless not `agreement`), K=4
    acceptance along the target's greedy streams, routing stats (unless not `routing`)."""
    held = heldout_tokens(draft_path, n_tokens)
    prompts = [tokenize(draft_path, chat_prompt(p), special=True) for p in CHAT_PROMPTS]
    res: dict = {"heldout": {n: len(t) for n, t in held.items()}}
    streams = {}
    for role, path in (("draft", draft_path), ("target", target_path)):
        llm = _llama(path, n_threads=n_threads)
        s = c = 0.0
        per = {}
        for name, toks in held.items():
            a, b = perplexity(llm, toks)
            per[name] = float(np.exp(a / b))
            s += a
            c += b
        res[f"{role}_ppl"] = float(np.exp(s / c))
        res[f"{role}_ppl_by_text"] = per
        if role == "target" or agreement:
            streams[role] = [greedy(llm, p, n_greedy) for p in prompts]
        llm.close()
    if agreement:
        pairs = list(zip(streams["draft"], streams["target"]))
        res["greedy_agreement"] = float(np.mean([np.mean(np.array(x) == np.array(y)) for x, y in pairs]))
        res["greedy_common_prefix"] = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
                                       for x, y in pairs]
    # draft predictions along the target's greedy stream
    llm = _llama(draft_path, n_threads=n_threads)
    match = []
    acc = []
    for p, s in zip(prompts, streams["target"]):
        lg = all_logits(llm, p + s)
        m = [bool(x) for x in lg[len(p) - 1:len(p) - 1 + len(s)].argmax(1) == np.array(s)]
        match += m
        acc.append(spec_acceptance(m, 4))
    llm.close()
    res["draft_agreement"] = float(np.mean(match))
    res["acceptance_k4"] = float(np.mean(acc))
    res["target_text"] = [tokens_to_text(draft_path, s) for s in streams["target"]]
    if routing:
        res["routing"] = routing_stats(target_path, draft_path, list(held.values()))
    return res


def tokens_to_text(model_path, tokens: list[int]) -> str:
    from ..llama_backend import LlamaModel
    m = LlamaModel(model_path, vocab_only=True)
    try:
        return m.detokenize(tokens)
    finally:
        m.close()
