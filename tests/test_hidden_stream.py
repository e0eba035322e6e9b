"""Calibration hidden states held batch by batch, in memory or spilled to a scratch file."""
import pytest
import torch

import fedprune
from fedprune.adapters import get_adapter
from fedprune.models.tiny import tiny_model
from fedprune.pruning.activations import HiddenStream
from fedprune.pruning.criteria.layer import block_influence_scores


@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_stream_round_trips_batches_including_a_short_last_one(offload, tmp_path):
    x = torch.randn(7, 5, 3)
    with HiddenStream(7, 5, 3, batch_size=3, offload=offload, scratch_dir=tmp_path) as s:
        assert s.num_batches == 3 and [s.rows(i) for i in range(3)] == [3, 3, 1]
        for i in range(3):
            s.write(i, x[3 * i:3 * i + 3])
        torch.testing.assert_close(s.to_tensor(), x, rtol=0, atol=0)
        s.write(1, torch.zeros(3, 5, 3))  # overwrite in place
        assert torch.equal(s.read(1), torch.zeros(3, 5, 3))
        c = s.clone()
        s.write(0, torch.ones(3, 5, 3))
        torch.testing.assert_close(c.read(0), x[:3], rtol=0, atol=0)  # the clone is independent
        assert c.on_disk == (offload == "disk")
        c.close()
    assert list(tmp_path.iterdir()) == []  # scratch files are unlinked at once


def test_stream_rejects_bad_shapes_indices_and_unwritten_batches(tmp_path):
    s = HiddenStream(4, 2, 3, batch_size=2, offload="disk", scratch_dir=tmp_path)
    with pytest.raises(ValueError, match="shape"):
        s.write(0, torch.zeros(2, 2, 4))
    with pytest.raises(IndexError, match="out of range"):
        s.read(2)
    with pytest.raises(RuntimeError, match="never written"):
        s.read(1)
    with pytest.raises(ValueError, match="offload"):
        HiddenStream(4, 2, 3, 2, offload="gpu")


def test_auto_offload_spills_only_large_streams():
    assert not HiddenStream(2, 8, 4, 1, offload="auto").on_disk
    assert HiddenStream(128, 512, 576, 4, offload="auto").on_disk  # 151 MiB in float32


def test_block_influence_is_the_same_from_disk_and_memory():
    m = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    ad = get_adapter(m)
    a = block_influence_scores(ad, ids, 4, "memory")
    b = block_influence_scores(ad, ids, 4, "disk")
    c = block_influence_scores(ad, ids, 6, "memory")  # one batch: the batch-weighted mean is the plain mean
    assert a == pytest.approx(b, abs=0) and a == pytest.approx(c, rel=1e-9)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_comp_prunes_the_same_model_with_streams_on_disk(arch):
    ids = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    outs = []
    for offload in ("memory", "disk"):
        m = tiny_model(arch, num_hidden_layers=4)
        fedprune.prune(m, "comp", 0.3, calib_ids=ids, offload=offload, batch_size=4)
        with torch.no_grad():
            outs.append(m(input_ids=ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
