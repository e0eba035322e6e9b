"""The modelled deployment's scale: reference shapes, the FLOP and byte factors, simulated times under
them and the per-class compute share, against hand-computed values."""
from dataclasses import replace

import pytest

from fedprune.federated.config import load_config
from fedprune.federated.cost import (KNOWN_SHAPES, CostScale, cost_scale, nearest_shape, shape_lora_params_per_rank)
from fedprune.federated.devices import DEVICE_PROFILES, MBIT, compute_share, parse_fleet, simulated_time

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_reference_shapes_reproduce_the_published_parameter_counts():
    # SmolLM2-135M: embeddings 49152 x 576 (tied) + 30 x (q 576^2, k/v 192 x 576, o 576^2, 3 x 1536 x 576, 2 norms) + norm
    assert KNOWN_SHAPES["smollm2-135m"].params == 28_311_552 + 30 * 3_540_096 + 576 == 134_515_008
    # LLaMA-2-7B: 2 x 32000 x 4096 + 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 4096
    assert KNOWN_SHAPES["llama-2-7b"].params == 6_738_415_616
    assert abs(KNOWN_SHAPES["llama-3.2-3b"].params / 3.21e9 - 1) < 0.01
    assert nearest_shape(7e9).name == "llama-2-7b" and nearest_shape(3.2e9).name == "llama-3.2-3b"
    assert nearest_shape(1.3e8).name == "smollm2-135m"


def test_lora_params_per_rank_by_hand():
    # per layer: q 576+576, k 576+192, v 576+192, o 576+576, gate/up/down 576+1536 each = 10176
    assert shape_lora_params_per_rank(KNOWN_SHAPES["smollm2-135m"], ALL) == 30 * 10176
    # q/v only on LLaMA-2-7B: 32 x (8192 + 8192)
    assert shape_lora_params_per_rank(KNOWN_SHAPES["llama-2-7b"], ["q_proj", "v_proj"]) == 32 * 16384
    with pytest.raises(ValueError, match="wq"):
        shape_lora_params_per_rank(KNOWN_SHAPES["llama-2-7b"], ["wq"])


def test_cost_scale_to_a_7b_deployment():
    own = KNOWN_SHAPES["smollm2-135m"]
    dims = [d for _ in range(own.layers) for d in own.module_dims().values()]
    s = cost_scale(6.74e9, own.params, dims, ALL)
    assert s.shape == "llama-2-7b"
    assert s.flops == pytest.approx(6.74e9 / 134_515_008)  # ~50x the FLOPs
    # LoRA parameters per rank: 32 x (4 x 8192 + 3 x 15104) = 2 498 560 vs 30 x 10176 = 305 280
    assert s.bytes == pytest.approx(2_498_560 / 305_280)
    assert cost_scale(0, own.params, dims, ALL) == CostScale()  # own size: both factors exactly 1
    with pytest.raises(ValueError, match="reference_params"):
        cost_scale(-1, own.params, dims, ALL)


def _steady(profile):
    """A profile without jitter, on an exact 10 Mbit/s link that does not fluctuate."""
    return replace(profile, jitter=0.0, link_fluctuation=0.0, bandwidth_mbit=(10.0, 10.0))


def test_scaled_simulated_time_and_compute_share_by_hand():
    tx2, agx = _steady(DEVICE_PROFILES.get("tx2")), _steady(DEVICE_PROFILES.get("agx-xavier"))
    # TX2 at 0.25 TFLOP/s: 1e12 FLOPs x 2 = 8 s; 2.5 MB x 2 over 10 Mbit/s (1.25 MB/s) = 4 s
    t = simulated_time(tx2, 1e12, 2_500_000, 0, 1, 0, flops_scale=2.0, bytes_scale=2.0)
    assert t["compute_s"] == pytest.approx(8.0) and t["comm_s"] == pytest.approx(4.0)
    assert t["total_s"] == pytest.approx(12.0) and t["bandwidth_mbit"] == pytest.approx(10.0)
    # AGX Xavier is 6x the TX2: the same work takes 8 / 6 s of compute
    a = simulated_time(agx, 1e12, 2_500_000, 0, 1, 1, flops_scale=2.0, bytes_scale=2.0)
    assert a["compute_s"] == pytest.approx(8.0 / 6)
    unscaled = simulated_time(tx2, 1e12, 2_500_000, 0, 1, 0)
    assert unscaled["compute_s"] == 4.0 and unscaled["comm_s"] == 2_500_000 / (10 * MBIT)
    recs = [{"device": "tx2", **t}, {"device": "tx2", "compute_s": 1.0, "comm_s": 3.0},
            {"device": "agx-xavier", **a}, {"device": "tx2", "status": "dropped"}]
    share = compute_share(recs)
    assert share["tx2"] == pytest.approx((8 / 12 + 1 / 4) / 2)
    assert share["agx-xavier"] == pytest.approx((8 / 6) / (8 / 6 + 4))
    assert share["all"] == pytest.approx((share["tx2"] + share["agx-xavier"]) / 2)
    assert compute_share([]) == {}


def test_fleet_speed_factor_scales_the_assumed_throughput():
    slow, fast = parse_fleet("tx2*0.5:1,agx-xavier@16GB*2:1")
    assert slow.train_flops_per_s == pytest.approx(0.5 * DEVICE_PROFILES.get("tx2").train_flops_per_s)
    assert fast.rel_throughput == 12.0 and fast.memory_gb == 16 and fast.name == "agx-xavier@16GB*2"
    for bad in ("tx2*0:1", "tx2*-1:1", "tx2*fast:1"):
        with pytest.raises(ValueError, match="speed factor"):
            parse_fleet(bad)


def test_reference_params_is_validated_and_defaults_to_own_size():
    assert load_config(None, ["model.name=tiny-llama"]).federation.reference_params == 0
    assert load_config(None, ["federation.reference_params=6.74e9"]).federation.reference_params == 6.74e9
    with pytest.raises(ValueError, match="federation.reference_params"):
        load_config(None, ["federation.reference_params=-5"])
