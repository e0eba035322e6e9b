"""Contract suite over every registered pruning method x every adapter family.

Parametrized from the registry (``fedprune.pruning.METHODS``) and the adapters, so a new method
or family is picked up by name: it must hit the requested ratio within the tolerance it states,
keep the logits finite, and save a checkpoint that ``fedprune.load_model`` rebuilds with
identical logits.
"""
import pytest
import torch

import fedprune
from fedprune.adapters import ADAPTERS, get_adapter
from fedprune.models.tiny import tiny_model
from fedprune.pruning import METHODS, available_methods

pytestmark = pytest.mark.usefixtures("one_thread")

#: one model type per adapter family (LLaMA-like, OPT, ...)
FAMILIES = sorted({cls.model_types[0] for _, cls in ADAPTERS.items()})
RATIO = 0.2


def _model(arch):
    width = {"ffn_dim": 192} if arch == "opt" else {"intermediate_size": 192}
    return tiny_model(arch, num_hidden_layers=8, **width)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", available_methods())
def test_method_meets_its_contract(method, arch, tmp_path):
    model = _model(arch)
    ad = get_adapter(model)
    before, layer_params = ad.num_parameters(), sum(p.numel() for p in ad.layers[0].parameters())
    calib = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    res = fedprune.prune(model, method, RATIO, calib_ids=calib, output=tmp_path / "pruned")
    tolerance = METHODS.get(method).tolerance(before, layer_params)
    assert abs(res.achieved_ratio - RATIO) <= tolerance, (res.achieved_ratio, tolerance)
    assert res.params_after == ad.num_parameters() < before
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    assert ref.isfinite().all()
    again = fedprune.load_model(tmp_path / "pruned")
    assert get_adapter(again).num_parameters() == res.params_after
    assert torch.equal(_logits(again, ids), ref)


def test_every_method_declares_options_and_help():
    from fedprune.cli import build_parser
    from fedprune.option_docs import field_docs

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["prune"]
    text = sub.format_help()
    for name, m in METHODS.items():
        assert f"  {name}: {m.summary}" in text
        for f in field_docs(m.options):
            assert f"{f.name} ({f.type}, default {f.default!r})" in text
            assert f.doc, f"{name}: option {f.name} has no doc (a string after the field)"
    assert "{" + ",".join(available_methods()) + "}" in text


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register("flap", METHODS.get("flap"))
