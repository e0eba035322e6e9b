"""Time to target on what FedSpine deploys: the data-weighted mean held-out loss of the devices'
pruned models equals evaluating each physically pruned model by itself."""
import types

import pytest
import torch

from fedprune.federated.evaluation import heldout_loss
from fedprune.federated.lora import LoraSettings, SharedBaseModel
from fedprune.federated.partition import load_test_set
from fedprune.fedspine.device import full_unit_masks
from fedprune.fedspine.evaluation import deployed_heldout_loss
from fedprune.fedspine.export import deployable_model
from fedprune.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_deployed_loss_is_the_weighted_mean_of_the_pruned_models():
    from fedprune.federated.tiny_tokenizer import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer()
    base = SharedBaseModel(tiny_model("llama", vocab_size=len(tok), num_hidden_layers=3),
                           LoraSettings(rank=2, target_modules=["q_proj", "v_proj"]))
    ad = base.adapter
    g = torch.Generator().manual_seed(0)
    delta = {k: 0.05 * torch.randn(*shape, generator=g) for k, shape in base.shapes.items()}
    dense = full_unit_masks(ad)
    hm, cm = full_unit_masks(ad)
    hm[1][:2] = False  # one KV group of layer 1 (2 query heads per group)
    cm[2][::2] = False
    records = load_test_set(None)[:6]
    out = deployed_heldout_loss(base, tok, records, 48, 4, {}, delta, {0: dense, 1: (hm, cm), 2: (hm, cm)},
                                {0: 1.0, 1: 2.0, 2: 1.0})

    def alone(masks):
        model = deployable_model(base, delta, *masks)
        return heldout_loss(types.SimpleNamespace(model=model), tok, records, 48, 4)["test_loss"]

    l_dense, l_pruned = alone(dense), alone((hm, cm))
    assert l_dense != pytest.approx(l_pruned)
    assert out["per_device"][0] == pytest.approx(l_dense, rel=1e-5)
    assert out["per_device"][1] == pytest.approx(l_pruned, rel=1e-5) == out["per_device"][2]
    assert out["deployed_loss"] == pytest.approx((l_dense + 3 * l_pruned) / 4, rel=1e-5)
    # the base is left as it was: no delta merged, no masks attached
    with torch.no_grad(), base.lora_disabled():
        ids = torch.tensor([[1, 2, 3, 4]])
        ref = tiny_model("llama", vocab_size=len(tok), num_hidden_layers=3)(input_ids=ids).logits
        torch.testing.assert_close(base.model(input_ids=ids).logits, ref)
    with pytest.raises(ValueError, match="weight"):
        deployed_heldout_loss(base, tok, records, 48, 4, {}, delta, {5: dense}, {})
