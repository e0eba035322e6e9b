"""SLEB's candidate scoring with shared prefixes equals one full forward per candidate."""
import pytest
import torch

from fedprune.adapters import get_adapter
from fedprune.models.tiny import tiny_model
from fedprune.pruning.criteria.layer import calibration_nll, removal_nlls, sleb_removal
from fedprune.pruning.layerwise import capture_layer0_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def calib(n=7, L=16, seed=0):
    return torch.randint(3, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def full_forward_nlls(ad, ids, alive, candidates, batch_size):
    out = {}
    for c in candidates:
        with ad.only_layers([i for i in alive if i != c]):
            out[c] = calibration_nll(ad, ids, batch_size)
    return out


def reference_sleb(ad, ids, n_remove, batch_size, keep_first=0, keep_last=0):
    """The greedy search run the slow way: one full model forward per candidate."""
    alive, removed = list(range(ad.num_layers)), []
    for _ in range(n_remove):
        cands = alive[keep_first:len(alive) - keep_last]
        nll = full_forward_nlls(ad, ids, alive, cands, batch_size)
        best = min(cands, key=lambda c: nll[c])
        alive.remove(best)
        removed.append(best)
    return sorted(removed)


def test_removal_nlls_equal_one_forward_per_candidate(arch):
    """Every family, a batch size that leaves a short last batch (7 rows in batches of 3), an alive
    set with a gap and candidates that skip the ends."""
    ad = get_adapter(tiny_model(arch, num_hidden_layers=5).eval())
    ids = calib()
    alive, cands = [0, 1, 3, 4], [1, 3, 4]
    x0, kw = capture_layer0_stream(ad, ids, 3, "memory")
    with x0:
        fast = removal_nlls(ad, x0, kw, ids, alive, cands)
    slow = full_forward_nlls(ad, ids, alive, cands, 3)
    assert fast.keys() == slow.keys()
    for c in cands:
        assert fast[c] == pytest.approx(slow[c], rel=1e-5), c
    # the scores differ between candidates, so the equality above is not a constant's
    assert len({round(v, 6) for v in fast.values()}) == len(cands)


def test_removal_nlls_refuse_a_candidate_that_is_not_alive():
    ad = get_adapter(tiny_model("llama", num_hidden_layers=3).eval())
    ids = calib(4)
    x0, kw = capture_layer0_stream(ad, ids, 4, "memory")
    with x0, pytest.raises(ValueError, match=r"candidates \[1\] are not among the alive layers"):
        removal_nlls(ad, x0, kw, ids, [0, 2], [1])


@pytest.mark.parametrize("keep", [(0, 0), (1, 1)])
def test_sleb_removal_matches_the_full_forward_search(keep):
    ad = get_adapter(tiny_model("llama", num_hidden_layers=6).eval())
    ids = calib(6, 20, seed=1)
    assert sleb_removal(ad, ids, 3, 4, *keep) == reference_sleb(ad, ids, 3, 4, *keep)
    assert ad.num_layers == 6  # the search itself removes nothing


def test_final_nll_is_the_same_in_token_chunks():
    """Logits a few positions at a time (chunks that cut windows and leave a short last chunk) give the
    model's own loss."""
    from fedprune.pruning.layerwise import final_logits_nll, run_layer

    ad = get_adapter(tiny_model("llama", num_hidden_layers=2).eval())
    ids = calib(5, 12)
    x0, kw = capture_layer0_stream(ad, ids, 2, "memory")
    with x0:
        hidden = x0.to_tensor()
    for layer in ad.layers:
        hidden = run_layer(layer, hidden, kw, 2)
    whole = calibration_nll(ad, ids, 2)
    for chunk in (7, 11, 2048):
        assert final_logits_nll(ad, hidden, ids, 2, chunk) == pytest.approx(whole, rel=1e-5)
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        final_logits_nll(ad, hidden, ids, 2, 0)
