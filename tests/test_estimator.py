import numpy as np
import pytest

from spac_gguf.estimator import UtilityEstimator, update_ema, update_levels, warmup


def ref_levels(U, ids):
    n = np.zeros(U.shape)
    for r in range(ids.shape[0]):
        for l in range(ids.shape[1]):
            for e in ids[r, l]:
                if e >= 0:
                    n[l, e] += 1
    out = U.copy()
    for l in range(U.shape[0]):
        for e in range(U.shape[1]):
            if n[l, e] - U[l, e] >= 5 and U[l, e] < 5:
                out[l, e] += 1
            elif U[l, e] - n[l, e] >= 1:
                out[l, e] -= 1
    return out


def ref_ema(U, ids, accepted, beta, w_rej):
    n = np.zeros(U.shape)
    for r in range(ids.shape[0]):
        for l in range(ids.shape[1]):
            for e in ids[r, l]:
                if e >= 0:
                    n[l, e] += 1.0 if r < accepted else w_rej
    return beta * U + (1 - beta) * n


def pass_with(counts, rows, n_expert=2):
    """ids [rows, 1 layer, k=1]: expert e in the first counts[e] rows, -1 elsewhere (k=1 so rows differ)."""
    ids = np.full((rows, 1, len(counts)), -1, np.int32)
    for e, c in enumerate(counts):
        ids[:c, 0, e] = e
    return ids


def test_levels_hand_sequence():
    U = np.zeros((1, 2), np.float32)
    seen = []
    for c in [6, 6, 0, 6, 1, 1, 5, 2]:      # expert 0's count per pass of 6 rows; expert 1 never used
        update_levels(U, pass_with([c, 0], 6))
        seen.append(int(U[0, 0]))
        assert U[0, 1] == 0
    # 0→1 (6−0≥5), →2 (6−1≥5), →1 (2−0≥1), →2 (6−1≥5), →1 (2−1≥1), 1 (1−1: neither), 1 (5−1=4 <5), 1
    assert seen == [1, 2, 1, 2, 1, 1, 1, 1]


def test_levels_saturate_at_five():
    U = np.zeros((1, 1), np.float32)
    for _ in range(8):
        update_levels(U, pass_with([12], 12, 1))
    assert U[0, 0] == 5


def test_ema_hand_value():
    U = np.zeros((1, 2), np.float32)
    ids = np.array([[[0]], [[1]], [[0]]], np.int32)        # rows 0 and 2 use expert 0; 1 row accepted
    update_ema(U, ids, 1, 0.5, 0.25)
    assert U[0, 0] == pytest.approx(0.5 * (1 + 0.25))
    assert U[0, 1] == pytest.approx(0.5 * 0.25)
    update_ema(U, ids[:0], 0, 0.5, 0.25)                   # an empty pass halves it
    assert U[0, 0] == pytest.approx(0.3125)


@pytest.mark.parametrize("seed", range(5))
def test_kernels_match_python_reference(seed):
    rng = np.random.default_rng(seed)
    L, E, k, rows = 3, 10, 3, int(rng.integers(1, 12))
    ids = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(rows)]).astype(np.int32)
    ids[rng.random(ids.shape) < 0.1] = -1
    U = rng.integers(0, 6, (L, E)).astype(np.float32)
    want = ref_levels(U, ids)
    update_levels(U, ids)
    np.testing.assert_array_equal(U, want)
    V = rng.random((L, E)).astype(np.float32)
    acc = int(rng.integers(0, rows + 1))
    want = ref_ema(V.astype(np.float64), ids, acc, 0.8, 0.5)
    update_ema(V, ids, acc, 0.8, 0.5)
    np.testing.assert_allclose(V, want, rtol=1e-5)


def test_dense_layers_ignored_and_demand_units():
    warmup()
    est = UtilityEstimator(2, 4, "levels")
    ids = np.full((10, 2, 2), -1, np.int32)
    ids[:, 1, 0] = 3
    est.update(ids, 10)
    assert est.U[0].sum() == 0 and est.U[1, 3] == 1
    assert est.demand()[1, 3] == pytest.approx(10 / 5)
    with pytest.raises(ValueError):
        UtilityEstimator(2, 4, "median")


def test_kernels_are_compiled_when_an_estimator_is_built():
    """JIT happens at load: in a fresh interpreter, building the estimator leaves both kernels
    compiled for the types the engine passes, so the first update compiles nothing."""
    import subprocess
    import sys
    code = """
import numpy as np
from spac_gguf.estimator import UtilityEstimator, update_ema, update_levels
assert not update_ema.signatures and not update_levels.signatures
UtilityEstimator(3, 5)
n = (len(update_ema.signatures), len(update_levels.signatures))
assert n[0] and n[1], n
U = np.zeros((3, 5), np.float32)
ids = np.zeros((4, 3, 2), np.int32)
update_ema(U, ids, 2, 0.8, 0.5)
update_levels(U, ids)
assert (len(update_ema.signatures), len(update_levels.signatures)) == n
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
