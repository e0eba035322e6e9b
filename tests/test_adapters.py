"""Contract suite run over a tiny random model of every registered adapter."""
import pytest
import torch

from fedprune import load_model, save_model
from fedprune.adapters import get_adapter, supported_architectures
from fedprune.models.tiny import tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_registered_architecture_has_a_tiny_model():
    for mt in supported_architectures():
        tiny_model(mt)


def test_unknown_architecture_names_the_supported_ones():
    class Cfg:
        model_type = "gpt_neox"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(ValueError, match="unsupported architecture 'gpt_neox'.*llama"):
        get_adapter(M())


def test_locations_and_shapes(model):
    ad = get_adapter(model)
    c = model.config
    assert ad.num_layers == c.num_hidden_layers
    for layer in ad.layers:
        q, k, v = ad.qkv(layer)
        assert q.in_features == c.hidden_size
        assert ad.num_heads(layer) == c.num_attention_heads
        assert k.out_features == ad.num_kv_heads(layer) * ad.head_dim
        assert ad.o_proj(layer).out_features == c.hidden_size
        for lin in ad.ffn_in(layer):
            assert lin.out_features == ad.intermediate_size(layer)
        assert ad.ffn_out(layer).out_features == c.hidden_size
    assert ad.num_parameters() == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_removing_nothing_keeps_logits(model, input_ids):
    ref = logits(model, input_ids)
    ad = get_adapter(model)
    for i, layer in enumerate(ad.layers):
        ad.prune_heads(i, range(ad.num_heads(layer)))
        ad.prune_ffn_channels(i, range(ad.intermediate_size(layer)))
    ad.remove_layers([])
    assert torch.equal(logits(model, input_ids), ref)


def test_removing_zero_channel_keeps_logits(model, input_ids):
    ad = get_adapter(model)
    layer = ad.layers[1]
    with torch.no_grad():
        ad.ffn_out(layer).weight[:, 5] = 0  # channel 5 contributes nothing
    ref = logits(model, input_ids)
    n_before = ad.num_parameters()
    width = ad.intermediate_size(layer)
    ad.prune_ffn_channels(1, [c for c in range(width) if c != 5])
    assert ad.intermediate_size(ad.layers[1]) == width - 1
    per_channel = sum(lin.in_features + (lin.bias is not None) for lin in ad.ffn_in(layer)) + ad.hidden_size
    assert ad.num_parameters() == n_before - per_channel
    torch.testing.assert_close(logits(model, input_ids), ref, atol=1e-5, rtol=1e-5)


def test_removing_zero_head_keeps_logits(model, input_ids):
    ad = get_adapter(model)
    layer = ad.layers[2]
    nh, hd, g = ad.num_heads(layer), ad.head_dim, ad.group_size(layer)
    # zero the o_proj columns of every query head of KV group 0: the group contributes nothing
    dead = list(range(g))
    with torch.no_grad():
        for h in dead:
            ad.o_proj(layer).weight[:, h * hd:(h + 1) * hd] = 0
    ref = logits(model, input_ids)
    ad.prune_heads(2, [h for h in range(nh) if h not in dead])
    assert ad.num_heads(ad.layers[2]) == nh - g
    assert ad.plan.layers[2].q_heads == [h for h in range(nh) if h not in dead]
    torch.testing.assert_close(logits(model, input_ids), ref, atol=1e-5, rtol=1e-5)


def test_gqa_uneven_head_removal_is_refused(model):
    ad = get_adapter(model)
    if ad.group_size(ad.layers[0]) == 1:
        pytest.skip("multi-head attention: every head is its own group")
    with pytest.raises(ValueError, match="evenly"):
        ad.prune_heads(0, [0, 1, 2])


def test_layer_removal_updates_config_and_runs(model, input_ids):
    ad = get_adapter(model)
    ad.remove_layers([0, 2])
    assert model.config.num_hidden_layers == 2 == ad.num_layers
    assert [lp.orig_index for lp in ad.plan.layers] == [1, 3]
    assert logits(model, input_ids).shape == (2, 12, model.config.vocab_size)
    # generation with a KV cache uses the renumbered layer indices
    out = model.generate(input_ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 7


def test_cannot_remove_every_layer(model):
    ad = get_adapter(model)
    with pytest.raises(ValueError, match="at least one"):
        ad.remove_layers(range(ad.num_layers))
    with pytest.raises(ValueError, match="out of range"):
        ad.remove_layers([99])


def _prune_unevenly(model):
    ad = get_adapter(model)
    g = ad.group_size(ad.layers[0])
    ad.prune_heads(0, list(range(g, ad.num_heads(ad.layers[0]))))  # drop KV group 0
    ad.prune_ffn_channels(1, range(0, 96, 2))
    ad.prune_ffn_channels(2, range(10, 30))
    ad.remove_layers([3])


def test_pruned_checkpoint_round_trip(model, input_ids, tmp_path):
    _prune_unevenly(model)
    ref = logits(model, input_ids)
    out = save_model(model, tmp_path / "pruned")
    assert (out / "plan.json").exists() and list(out.glob("*.safetensors"))
    again = load_model(out)
    assert torch.equal(logits(again, input_ids), ref)
    assert get_adapter(again).plan.to_dict() == get_adapter(model).plan.to_dict()
    assert not list(tmp_path.glob(".pruned*")), "no temporary directory left behind"


def test_uniformly_pruned_checkpoint_is_plain_hf(arch, input_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    ad = get_adapter(model)
    for i in range(ad.num_layers):
        ad.prune_ffn_channels(i, range(48))
    ad.remove_layers([1])
    ref = logits(model, input_ids)
    save_model(model, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(logits(plain, input_ids), ref)


def test_corrupt_checkpoint_is_named(model, tmp_path):
    _prune_unevenly(model)
    out = save_model(model, tmp_path / "p")
    for f in out.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt weights"):
        load_model(out)


# ---- layers, sizes, masks and biases: what algorithms ask the adapter for ------------------
def test_keep_only_layers_updates_config_and_layer_idx(model, input_ids):
    ad = get_adapter(model)
    model.config.layer_types = [f"t{i}" for i in range(ad.num_layers)]
    kept = [ad.layers[1], ad.layers[3]]
    ad.keep_only_layers([3, 1])  # order does not matter: layers run in ascending order
    assert list(ad.layers) == kept and model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["t1", "t3"]
    for new_i, layer in enumerate(ad.layers):
        assert all(m.layer_idx == new_i for m in (layer, ad.attention(layer)) if hasattr(m, "layer_idx"))
    assert [lp.orig_index for lp in ad.plan.layers] == [0, 1, 2, 3], "the plan is remove_layers' business"
    with pytest.raises(ValueError, match="non-empty subset"):
        ad.keep_only_layers([2])


def test_only_layers_equals_removal_and_restores_everything(arch, input_ids):
    model, removed = tiny_model(arch), tiny_model(arch)
    ad = get_adapter(model)
    model.config.layer_types = ["full_attention"] * 4
    before = (list(ad.layers), [getattr(ad.attention(layer), "layer_idx", None) for layer in ad.layers])
    ref = logits(model, input_ids)
    with ad.only_layers([0, 2]):
        sub = logits(model, input_ids)
        assert model.config.num_hidden_layers == 2 and len(model.config.layer_types) == 2
    assert (list(ad.layers), [getattr(ad.attention(layer), "layer_idx", None) for layer in ad.layers]) == before
    assert model.config.num_hidden_layers == 4 and len(model.config.layer_types) == 4
    assert torch.equal(logits(model, input_ids), ref)
    get_adapter(removed).remove_layers([1, 3])
    torch.testing.assert_close(logits(removed, input_ids), sub)
    assert not torch.allclose(sub, ref)


def test_model_shape_counts_the_real_parameters(arch):
    from fedprune.adapters import ModelShape

    variants = [{}, {"tie_word_embeddings": False}]
    if arch == "opt":  # embeddings narrower than the layers (project_in/out), pre-LN without final norm
        variants += [{"word_embed_proj_dim": 32}, {"do_layer_norm_before": False}, {"enable_bias": False}]
    for overrides in variants:
        model = tiny_model(arch, **overrides)
        shape = ModelShape.from_config(model.config)
        assert shape.num_parameters() == get_adapter(model).num_parameters(), overrides
        assert shape.layer_parameters() == sum(p.numel() for p in get_adapter(model).layers[0].parameters())
        lin = get_adapter(model).linear_modules(get_adapter(model).layers[0])
        assert {k: (m.in_features, m.out_features) for k, m in lin.items()} == shape.linear_shapes()


def test_every_family_brings_its_tiny_config():
    from fedprune.adapters import ADAPTERS
    from fedprune.models.tiny import TINY_ARCHS, tiny_config

    assert set(TINY_ARCHS) == set(supported_architectures())
    for arch in TINY_ARCHS:
        assert tiny_config(arch).model_type == arch
        assert tiny_config(arch, num_hidden_layers=2).num_hidden_layers == 2
        assert ADAPTERS.get(arch).tiny_config(arch).to_dict() == tiny_config(arch).to_dict()
    with pytest.raises(ValueError, match="no tiny config"):
        tiny_config("gpt_neox")


def test_written_uniform_sizes_build_the_pruned_model(model):
    import copy

    from transformers import AutoModelForCausalLM

    ad = get_adapter(model)
    g = ad.group_size(ad.layers[0])
    for i in range(ad.num_layers):
        ad.prune_ffn_channels(i, range(40))
        ad.prune_heads(i, [h for h in range(ad.num_heads(ad.layers[i])) if h % g == 0])  # one head per group
    config = copy.deepcopy(model.config)
    if ad.write_uniform_sizes(config, ad.num_heads(ad.layers[0]), ad.num_kv_heads(ad.layers[0]), 40):
        rebuilt = AutoModelForCausalLM.from_config(config)
        assert get_adapter(rebuilt).num_parameters() == ad.num_parameters()
    else:  # the family's config cannot say it: only OPT, whose head_dim follows the head count
        assert model.config.model_type == "opt"


def test_soft_masks_equal_removal(model, input_ids):
    ad = get_adapter(model)
    layer = ad.layers[1]
    g, nh, width = ad.group_size(layer), ad.num_heads(layer), ad.intermediate_size(layer)
    keep_heads = [h for h in range(nh) if h // g != 0]  # drop KV group 0
    hm = torch.tensor([h in keep_heads for h in range(nh)])
    cm = torch.arange(width) % 3 != 0
    with ad.soft_masks({1: hm}, {1: cm}) as masks:
        masked = logits(model, input_ids)
        masks.channel_masks[1] = torch.ones(width, dtype=torch.bool)  # edited in place: takes effect
        heads_only = logits(model, input_ids)
    ref = logits(model, input_ids)
    assert not torch.allclose(masked, ref)
    ad.prune_heads(1, keep_heads)
    torch.testing.assert_close(logits(model, input_ids), heads_only, atol=1e-5, rtol=1e-5)
    ad.prune_ffn_channels(1, cm.nonzero().flatten().tolist())
    torch.testing.assert_close(logits(model, input_ids), masked, atol=1e-5, rtol=1e-5)


def test_added_output_bias_is_declared_on_reload(model, input_ids, tmp_path):
    ad = get_adapter(model)
    _prune_unevenly(model)
    g = torch.Generator().manual_seed(3)
    ad.add_output_bias(0, "o_proj", torch.randn(model.config.hidden_size, generator=g))
    ad.add_output_bias(1, "ffn_out", torch.randn(model.config.hidden_size, generator=g))
    created = ad.plan.layers[0].added_biases + ad.plan.layers[1].added_biases
    assert created == ([] if model.config.model_type == "opt" else ["o_proj", "ffn_out"])  # OPT has biases
    ref = logits(model, input_ids)
    again = load_model(save_model(model, tmp_path / "b"))
    assert torch.equal(logits(again, input_ids), ref)
    with pytest.raises(ValueError, match="unknown bias site"):
        ad.add_output_bias(0, "q_proj", torch.zeros(model.config.hidden_size))
