"""A FedPruner device's submodel with the weights it does not hold freed: the planned forward is
unchanged, the dropped layers and bypassed sub-blocks hold nothing, their LoRA only where kept."""
import pytest
import torch

from fedprune.adapters import get_adapter
from fedprune.federated.lora import LoraSettings, SharedBaseModel
from fedprune.fedpruner.materialise import materialise_submodel
from fedprune.fedpruner.submodel import only_layers, skip_blocks
from fedprune.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_materialised_submodel_runs_the_plan_unchanged():
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=4)
    base = SharedBaseModel(model, LoraSettings(rank=2, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"]))
    ad = get_adapter(model)
    model.eval()  # no LoRA dropout: the two forwards must be comparable exactly
    with torch.no_grad():  # non-zero LoRA B, so the LoRA of kept layers matters in the forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    keep, attn = [0, 2], [2]
    with torch.no_grad(), skip_blocks(model, attn=attn), only_layers(model, keep):
        before = model(input_ids=ids).logits
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    dropped = params(ad.layers[1]) + params(ad.layers[3])
    attn_frozen = sum(p.numel() for n, p in ad.attention(ad.layers[2]).named_parameters() if "lora_" not in n)
    total = params(model)

    freed = materialise_submodel(base.peft, keep, skip_attn=attn)

    assert freed == dropped + attn_frozen and params(model) == total - freed
    assert params(ad.layers[1]) == 0 and params(ad.layers[3]) == 0
    held = {n: p.numel() for n, p in ad.attention(ad.layers[2]).named_parameters()}
    assert all(v == 0 for n, v in held.items() if "lora_" not in n)
    assert all(v > 0 for n, v in held.items() if "lora_" in n)  # the bypassed block's LoRA is in the task
    assert params(ad.mlp(ad.layers[2])) > 0 and params(ad.layers[0]) > 0
    with torch.no_grad(), skip_blocks(model, attn=attn), only_layers(model, keep):
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_materialise_refuses_a_bypassed_block_outside_the_plan():
    model = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises(ValueError, match=r"bypassed sub-blocks \[3\]"):
        materialise_submodel(model, [0, 1], skip_mlp=[3])
    with pytest.raises(ValueError, match="non-empty subset of range"):
        materialise_submodel(model, [])
