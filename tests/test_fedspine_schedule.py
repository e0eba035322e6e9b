import pytest

from fedprune.fedspine.schedule import cubic_sparsity, is_prune_step, sparsity_at_local_step, sparsity_schedule


@pytest.mark.parametrize("T,final,initial", [(1, 0.5, 0.0), (7, 0.3, 0.0), (10, 0.5, 0.1), (50, 0.37, 0.0)])
def test_cubic_hits_target_is_monotone_and_bounded(T, final, initial):
    s = sparsity_schedule(T, final, initial)
    assert s[0] == initial
    assert s[-1] == final
    assert all(b >= a for a, b in zip(s, s[1:]))
    assert all(initial <= x <= final for x in s)


def test_cubic_values_by_hand():
    # s_t = s_f + (s_0 - s_f)(1 - t/T)^3 with s_0 = 0, s_f = 0.8, T = 4
    assert cubic_sparsity(1, 4, 0.8) == pytest.approx(0.8 - 0.8 * 0.75 ** 3)
    assert cubic_sparsity(2, 4, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)
    # past the end it stays at the target; before the start at the initial value
    assert cubic_sparsity(9, 4, 0.8) == 0.8
    assert cubic_sparsity(-3, 4, 0.8) == 0.0


def test_front_loaded():
    # cubic decay prunes more in the first half than in the second
    s = sparsity_schedule(10, 0.5)
    assert s[5] - s[0] > s[10] - s[5]


def test_prune_every_interval():
    assert [t for t in range(1, 101) if is_prune_step(t, 20)] == [20, 40, 60, 80, 100]
    assert sparsity_at_local_step(19, 0.5, 5, 20) == 0.0
    assert sparsity_at_local_step(20, 0.5, 5, 20) == cubic_sparsity(1, 5, 0.5)
    assert sparsity_at_local_step(100, 0.5, 5, 20) == 0.5
    assert sparsity_at_local_step(1000, 0.5, 5, 20) == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError):
        cubic_sparsity(1, 0, 0.5)
    with pytest.raises(ValueError):
        cubic_sparsity(1, 5, 1.5)
    with pytest.raises(ValueError):
        is_prune_step(3, 0)
