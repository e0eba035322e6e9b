"""Aggregators against values computed by hand."""
import pytest
import torch

from fedprune.federated.aggregators import (
    AGGREGATORS, compact, coordinate_reduce, count_average, fedavg, flexlora_aggregate, flexlora_distribute,
    flexlora_factor, flexlora_robust, flora_stack, hetlora_aggregate, lora_delta, pad_rank, robust_average,
    robust_count_average, scatter_to_full, truncate_rank,
)

T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731


def pair(A, B, m="m"):
    return {f"{m}.lora_A": T(A), f"{m}.lora_B": T(B)}


def test_registered_by_name():
    for name in ("fedavg", "hetlora", "flexlora", "flora", "count_average", "median", "trimmed_mean"):
        assert name in AGGREGATORS


def test_fedavg_weighted_by_data_size():
    s1 = pair([[1.0, 2.0]], [[1.0], [0.0]])
    s2 = pair([[3.0, 6.0]], [[5.0], [4.0]])
    out = fedavg([s1, s2], [1, 3])  # p = 1/4, 3/4
    assert torch.allclose(out["m.lora_A"], T([[2.5, 5.0]]))
    assert torch.allclose(out["m.lora_B"], T([[4.0], [3.0]]))


def test_fedavg_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        fedavg([pair([[1.0]], [[1.0]]), pair([[1.0], [2.0]], [[1.0, 1.0]])], [1, 1])


def test_pad_and_truncate():
    A_p, B_p = pad_rank(T([[1.0, 2.0]]), T([[3.0], [4.0]]), 3)
    assert A_p.tolist() == [[1, 2], [0, 0], [0, 0]]
    assert B_p.tolist() == [[3, 0, 0], [4, 0, 0]]
    t = truncate_rank({"m.lora_A": A_p, "m.lora_B": B_p}, 1)
    assert t["m.lora_A"].tolist() == [[1, 2]] and t["m.lora_B"].tolist() == [[3], [4]]


def test_hetlora_pads_and_weights_by_frobenius_norm():
    # client 1: rank 1, B A = [[1,0],[0,0]] -> norm 1
    s1 = pair([[1.0, 0.0]], [[1.0], [0.0]])
    # client 2: rank 2, B A = 3 * I -> norm 3*sqrt(2)
    s2 = pair([[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 3.0]])
    out = hetlora_aggregate([s1, s2])
    n1, n2 = 1.0, 3.0 * 2 ** 0.5
    p1, p2 = n1 / (n1 + n2), n2 / (n1 + n2)
    assert torch.allclose(out["m.lora_A"], T([[1.0, 0.0], [0.0, p2]]))
    assert torch.allclose(out["m.lora_B"], T([[p1 + 3 * p2, 0.0], [0.0, 3 * p2]]))


def test_flexlora_full_space_average_and_svd():
    alpha = 2.0
    s1 = pair([[1.0, 0.0]], [[1.0], [0.0]])            # r=1: (2/1) * [[1,0],[0,0]]
    s2 = pair([[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 0.0]])  # r=2: (2/2) * [[0,0],[0,2]]
    dW = flexlora_aggregate([s1, s2], [1, 1], alpha)["m"]
    assert torch.allclose(dW, T([[1.0, 0.0], [0.0, 1.0]]))
    # rank 2 reconstructs dW exactly; rank 1 gives the best rank-1 approximation
    A, B = flexlora_factor(dW, 2, alpha)
    assert torch.allclose((alpha / 2) * B @ A, dW)
    dW2 = T([[3.0, 0.0], [0.0, 1.0]])
    A1, B1 = flexlora_factor(dW2, 1, alpha)
    assert torch.allclose((alpha / 1) * B1 @ A1, T([[3.0, 0.0], [0.0, 0.0]]))
    st = flexlora_distribute({"m": dW2}, 1, alpha)
    assert st["m.lora_A"].shape == (1, 2) and st["m.lora_B"].shape == (2, 1)


def test_flexlora_reconstruction_random():
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(6, 5, generator=g, dtype=torch.float64)
    A, B = flexlora_factor(dW, 5, 16.0)
    assert torch.allclose((16.0 / 5) * B @ A, dW, atol=1e-10)
    A8, B8 = flexlora_factor(dW, 8, 16.0)  # more rank than singular values: zero-padded
    assert A8.shape == (8, 5) and torch.allclose((16.0 / 8) * B8 @ A8, dW, atol=1e-10)


def test_flora_stacking_equals_weighted_sum_exactly():
    g = torch.Generator().manual_seed(1)
    states = [{"m.lora_A": torch.randn(r, 7, generator=g, dtype=torch.float64),
               "m.lora_B": torch.randn(5, r, generator=g, dtype=torch.float64)} for r in (2, 3, 4)]
    w = [10, 20, 30]
    st = flora_stack(states, w)
    assert st["m.lora_A"].shape == (9, 7) and st["m.lora_B"].shape == (5, 9)
    expect = sum((wk / 60) * s["m.lora_B"] @ s["m.lora_A"] for wk, s in zip(w, states))
    assert torch.allclose(lora_delta(st)["m"], expect, atol=1e-12)
    # hand-computed case, with per-client scalings
    s1, s2 = pair([[1.0, 1.0]], [[1.0], [2.0]]), pair([[0.0, 2.0]], [[3.0], [0.0]])
    st = flora_stack([s1, s2], [1, 1], scalings=[2.0, 4.0])
    # 0.5*2*[[1,1],[2,2]] + 0.5*4*[[0,6],[0,0]] = [[1,13],[2,2]]
    assert torch.allclose(lora_delta(st)["m"], T([[1.0, 13.0], [2.0, 2.0]]))


def test_scatter_compact_roundtrip():
    full = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    masks = {0: torch.tensor([True, False, True]), 1: torch.tensor([False, True, True, False])}
    c = compact(full, masks)
    assert c.tolist() == [[1, 2], [9, 10]]
    v, h = scatter_to_full(c, masks, (3, 4))
    assert v.tolist() == [[0, 1, 2, 0], [0, 0, 0, 0], [0, 9, 10, 0]]
    assert h.sum() == 4


def test_count_average_by_holders():
    prev = {"l0.B": T([[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]]), "l1.A": T([[7.0, 7.0]])}
    # client 1 holds rows 0,1 of l0.B and nothing of l1; client 2 holds rows 1,2 of l0.B
    c1 = {"l0.B": T([[1.0, 1.0], [2.0, 2.0]])}
    m1 = {"l0.B": {0: torch.tensor([True, True, False])}}
    c2 = {"l0.B": T([[4.0, 4.0], [6.0, 6.0]])}
    m2 = {"l0.B": {0: torch.tensor([False, True, True])}}
    out = count_average([c1, c2], [m1, m2], prev)
    assert out["l0.B"].tolist() == [[1, 1], [3, 3], [6, 6]]  # row 1 averaged over 2 holders
    assert out["l1.A"].tolist() == [[7, 7]]  # nobody held it: previous global kept
    outw = count_average([c1, c2], [m1, m2], prev, weights=[1, 3])
    assert outw["l0.B"][1].tolist() == [0.25 * 2 + 0.75 * 4] * 2


def test_count_average_rejects_unknown_keys():
    with pytest.raises(ValueError, match="does not have"):
        count_average([{"zz": T([1.0])}], [{}], {"a": T([0.0])})


def test_coordinate_reduce_over_holders_only():
    # 4 clients x 3 entries; entry 0 held by all, entry 1 by clients 0-2, entry 2 by nobody
    v = T([[1.0, 5.0, 9.0], [2.0, 7.0, 9.0], [30.0, 6.0, 9.0], [4.0, 99.0, 9.0]])
    h = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # entry 0: sorted [1, 2, 4, 30] -> (2 + 4) / 2 = 3; entry 1: [5, 6, 7] -> 6 (the 99 is not held)
    assert coordinate_reduce(v, h, "median").tolist() == [3.0, 6.0, 0.0]
    # trim 0.25: entry 0 drops 1 per end of 4 -> (2 + 4) / 2; entry 1 floor(0.75) = 0 -> mean 6
    assert coordinate_reduce(v, h, "trimmed_mean", 0.25).tolist() == [3.0, 6.0, 0.0]
    # weighted mean among holders: entry 1 = (1*5 + 1*7 + 2*6) / 4
    assert coordinate_reduce(v, h, "mean", weights=[1, 1, 2, 1]).tolist() == [(1 + 2 + 60 + 4) / 5, 6.0, 0.0]
    with pytest.raises(ValueError, match="unknown robust aggregation"):
        coordinate_reduce(v, h, "mode")


def test_robust_average_mean_is_fedavg_and_count_variant_keeps_unheld():
    s1, s2, s3 = ({"x": T([a, 0.0])} for a in (1.0, 2.0, 60.0))
    assert torch.equal(robust_average([s1, s2, s3], [1, 1, 2])["x"], fedavg([s1, s2, s3], [1, 1, 2])["x"])
    assert robust_average([s1, s2, s3], [1, 1, 1000], "median")["x"].tolist() == [2.0, 0.0]  # unweighted
    prev = {"l0.B": T([[9.0], [9.0], [9.0]])}
    mk = lambda rows: {"l0.B": {0: torch.tensor(rows)}}  # noqa: E731
    states = [{"l0.B": T([[1.0], [2.0]])}, {"l0.B": T([[3.0], [50.0]])}, {"l0.B": T([[4.0]])}]
    masks = [mk([True, True, False]), mk([True, True, False]), mk([True, False, False])]
    out = robust_count_average(states, masks, prev, method="median")
    # row 0 held by all three [1, 3, 4] -> 3; row 1 by two [2, 50] -> 26; row 2 by nobody -> previous 9
    assert out["l0.B"].flatten().tolist() == [3.0, 26.0, 9.0]


def test_flexlora_median_of_full_size_updates():
    alpha = 2.0
    s1 = pair([[1.0, 0.0]], [[1.0], [0.0]])    # (2/1) * [[1,0],[0,0]] = [[2,0],[0,0]]
    s2 = pair([[0.0, 1.0]], [[0.0], [1.0]])    # [[0,0],[0,2]]
    s3 = pair([[1.0, 1.0]], [[50.0], [50.0]])  # [[100,100],[100,100]]
    med = flexlora_robust([s1, s2, s3], alpha, "median")["m"]
    assert med.tolist() == [[2.0, 0.0], [0.0, 2.0]]
    assert torch.equal(flexlora_robust([s1, s2, s3], alpha, "trimmed_mean", 0.4)["m"], med)  # floor(1.2) = 1 per end
