"""Linear CKA properties and the exact contiguous-partition DP against brute force."""
import itertools

import pytest
import torch

from fedprune.fedpruner.cka import cka_matrix, layer_outputs, linear_cka
from fedprune.fedpruner.partition import contiguous_partition, partition_score, segment_score
from fedprune.models.tiny import tiny_model


def rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_identity_and_invariances():
    X = rand(200, 12, 0)
    assert linear_cka(X, X) == pytest.approx(1.0)
    Q, _ = torch.linalg.qr(rand(12, 12, 1))
    assert linear_cka(X, X @ Q) == pytest.approx(1.0)
    Y = rand(200, 7, 2)
    ref = linear_cka(X, Y)
    assert 0.0 < ref < 1.0
    Q7, _ = torch.linalg.qr(rand(7, 7, 3))
    assert linear_cka(X @ Q * 3.7, Y @ Q7 * 0.01) == pytest.approx(ref)
    assert linear_cka(X + 5.0, Y - 2.0) == pytest.approx(ref)  # centring removes offsets
    assert linear_cka(Y, X) == pytest.approx(ref)


def test_cka_of_orthogonal_representations_is_zero():
    # columns orthogonal to the all-ones vector are already centred; X and Y span orthogonal subspaces -> Y^T X = 0
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(50, 1, dtype=torch.float64), rand(50, 10, 4)], dim=1))
    X, Y = basis[:, 1:6], basis[:, 6:11]
    assert linear_cka(X, Y) == pytest.approx(0.0, abs=1e-12)


def test_cka_matrix_matches_pairwise():
    outs = [rand(64, 8, s) for s in range(4)]
    outs.append(outs[0] @ torch.linalg.qr(rand(8, 8, 9))[0])
    S = cka_matrix(outs)
    assert torch.allclose(S, S.T)
    for i in range(5):
        for j in range(5):
            assert S[i, j] == pytest.approx(linear_cka(outs[i], outs[j]))
    assert S[0, 4] == pytest.approx(1.0)


def test_layer_outputs_of_a_tiny_model(input_ids):
    model = tiny_model("llama")
    outs = layer_outputs(model, input_ids)
    assert len(outs) == 4 and outs[0].shape == (input_ids.numel(), 64)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    assert layer_outputs(model, input_ids, mask)[0].shape == (input_ids.numel() - 3, 64)
    S = cka_matrix(outs)
    assert torch.allclose(torch.diag(S), torch.ones(4, dtype=torch.float64))


def compositions(L, K):
    for cuts in itertools.combinations(range(1, L), K - 1):
        b = (0,) + cuts + (L,)
        yield [list(range(b[g], b[g + 1])) for g in range(K)]


def brute_segment(S, seg, objective, singleton):
    """Segment score straight from the definitions, pair by pair (independent of the DP's prefix sums)."""
    pairs = [S[i][j] for i in seg for j in seg if i < j]
    if objective == "sum":
        return sum(pairs)
    if objective == "mean":
        return singleton if len(seg) == 1 else sum(pairs) / len(pairs)
    return -sum(1.0 - x for x in pairs) / len(seg)


@pytest.mark.parametrize("objective", ["scatter", "mean", "sum"])
def test_dp_equals_brute_force(objective):
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        L = 8 if trial < 4 else int(torch.randint(1, 8, (1,), generator=g))
        A = torch.rand(L, L, generator=g, dtype=torch.float64)
        S = (A + A.T) / 2
        S.fill_diagonal_(1.0)
        Sl = S.tolist()
        seg = {(a, b): brute_segment(Sl, list(range(a, b)), objective, 0.3)
               for a in range(L) for b in range(a + 1, L + 1)}
        for K in range(1, L + 1):
            dp = contiguous_partition(S, K, objective, singleton_score=0.3)
            assert [i for grp in dp for i in grp] == list(range(L)) and len(dp) == K
            best = max(sum(seg[(p[0], p[-1] + 1)] for p in part) for part in compositions(L, K))
            assert sum(seg[(p[0], p[-1] + 1)] for p in dp) == pytest.approx(best)
            assert partition_score(S, dp, objective, 0.3) == pytest.approx(best)


def test_partition_recovers_planted_blocks():
    # three blocks of highly similar layers, low similarity across
    sizes = [3, 4, 2]
    L = sum(sizes)
    S = torch.full((L, L), 0.1, dtype=torch.float64)
    start = 0
    for m in sizes:
        S[start:start + m, start:start + m] = 0.9
        start += m
    S.fill_diagonal_(1.0)
    assert contiguous_partition(S, 3) == [[0, 1, 2], [3, 4, 5, 6], [7, 8]]


def test_segment_scores_by_hand():
    S = torch.tensor([[1.0, 0.8, 0.2], [0.8, 1.0, 0.4], [0.2, 0.4, 1.0]], dtype=torch.float64)
    assert segment_score(S, 0, 3, "sum") == pytest.approx(1.4)
    assert segment_score(S, 0, 3, "mean") == pytest.approx(1.4 / 3)
    assert segment_score(S, 0, 3, "scatter") == pytest.approx(-(0.2 + 0.8 + 0.6) / 3)
    assert segment_score(S, 1, 2, "scatter") == 0.0
    assert segment_score(S, 1, 2, "mean", singleton_score=0.5) == 0.5
    with pytest.raises(ValueError):
        contiguous_partition(S, 4)
    with pytest.raises(ValueError):
        contiguous_partition(S, 2, "median")
