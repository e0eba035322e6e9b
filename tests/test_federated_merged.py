"""Federated recovery of a pruned model: ``fedprune federate`` on a pruned checkpoint directory,
then ``fedprune export --lora`` / ``fedprune eval --lora`` of the run's merged global model."""
from __future__ import annotations

import json
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fedprune import load_model, save_model
from fedprune.adapters import get_adapter
from fedprune.cli import main
from fedprune.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    from fedprune.federated.tiny_tokenizer import tiny_bpe_tokenizer

    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def recovered(tok, tmp_path_factory):
    """A tiny LLaMA pruned to different widths per layer, saved, then 2 FedIT rounds on it."""
    root = tmp_path_factory.mktemp("recovery")
    m = tiny_model("llama", vocab_size=len(tok), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=256)
    ad = get_adapter(m)
    ad.prune_heads(1, [2, 3])  # layer 1: 2 of 4 query heads, 1 of 2 KV heads
    ad.prune_ffn_channels(1, range(0, 80, 2))
    ad.prune_ffn_channels(2, range(64))
    pruned = save_model(m, root / "pruned", tokenizer=tok)
    run = root / "run"
    assert main(["federate", "--output", str(run), f"model.name={pruned}", f"model.tokenizer={pruned}",
                 "data.max_examples_per_client=4", "train.local_steps=2", "train.grad_accum=1", "train.seq_len=48",
                 "train.lr=0.01", "federation.rounds=2", "federation.clients_per_round=2", "federation.dropout=false",
                 "lora.rank=4", "lora.target_modules=[q_proj,v_proj,down_proj]", "eval.loss_examples=4",
                 "eval.rouge_examples=0", "eval.batch_size=2"]) == 0
    return pruned, run


def test_federate_trains_on_a_pruned_checkpoint(recovered):
    pruned, run = recovered
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2] and all(m["test_loss"] > 0 for m in metrics)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    # LoRA factors follow each layer's own width: layer 1 has 2 heads x 16 = 32 query rows, FFN 40 / 64 / 96
    a = {k: tuple(v.shape) for k, v in state["tensors"].items()}
    assert a["layers.1.self_attn.q_proj.lora_B"] == (32, 4) and a["layers.0.self_attn.q_proj.lora_B"] == (64, 4)
    assert a["layers.1.mlp.down_proj.lora_A"] == (4, 40) and a["layers.2.mlp.down_proj.lora_A"] == (4, 64)


def test_merged_model_is_what_the_server_evaluated(recovered, tok):
    from fedprune.federated.evaluation import heldout_loss, spread_subset
    from fedprune.federated.merged import load_merged_run
    from fedprune.federated.partition import load_test_set

    pruned, run = recovered
    merged, _, info = load_merged_run(run)
    assert info["round"] == 2 and info["strategy"] == "fedit"
    base = load_model(pruned)
    # the merge is W0 + alpha/r * B @ A on the adapted modules only
    state = torch.load(run / "checkpoint.pt", weights_only=True)["tensors"]
    for key in ("layers.1.self_attn.q_proj", "layers.2.mlp.down_proj"):
        i, path = int(key.split(".")[1]), key.split(".", 2)[2]
        w0 = get_adapter(base).layers[i].get_submodule(path).weight
        w = get_adapter(merged).layers[i].get_submodule(path).weight
        expected = w0 + (16 / 4) * state[key + ".lora_B"] @ state[key + ".lora_A"]
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
        assert (w - w0).abs().max() > 1e-4  # the run did move it
    k_base = get_adapter(base).layers[0].self_attn.k_proj.weight
    assert torch.equal(get_adapter(merged).layers[0].self_attn.k_proj.weight, k_base)  # not a target module
    # the held-out loss of the plain merged model equals the one the run logged for its last round
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    ours = heldout_loss(types.SimpleNamespace(model=merged), tok, spread_subset(load_test_set(), 4), 48, 2)
    assert ours["test_loss"] == pytest.approx(last["test_loss"], abs=1e-5)


def test_export_lora_writes_the_merged_weights(recovered, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    from fedprune.deploy.gguf_export import to_llamacpp_rotary
    from fedprune.federated.merged import load_merged_run

    pruned, run = recovered
    out = tmp_path / "merged.gguf"
    assert main(["export", "--lora", str(run), "--outtype", "f32", "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lora"]["round"] == 2 and report["architecture"] == "deci"  # per-layer widths
    merged, _, _ = load_merged_run(run)
    ad = get_adapter(merged)
    tensors = {t.name: t.data for t in gguf.GGUFReader(str(out)).tensors}
    for i, layer in enumerate(ad.layers):
        q, _, v = ad.qkv(layer)
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_v.weight"], v.weight.detach().numpy())
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_q.weight"],
                                      to_llamacpp_rotary(q.weight.detach(), ad.num_heads(layer)).numpy())
        np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_down.weight"], ad.ffn_out(layer).weight.detach().numpy())
    base_v = get_adapter(load_model(pruned)).qkv(get_adapter(load_model(pruned)).layers[1])[2].weight
    assert not np.array_equal(tensors["blk.1.attn_v.weight"], base_v.detach().numpy())  # LoRA really merged
    assert main(["export", "--lora", str(run), "--model", str(pruned), "--output", str(tmp_path / "x.gguf")]) != 0
    assert "not both" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


def test_eval_lora_scores_the_merged_model(recovered, tmp_path, capsys):
    from fedprune.evaluate import evaluate
    from fedprune.federated.merged import load_merged_run

    pruned, run = recovered
    out = tmp_path / "eval.json"
    assert main(["eval", "--lora", str(run), "--tasks", "piqa", "--limit", "4", "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    merged, tok, _ = load_merged_run(run)
    want = evaluate(merged, tok, ["piqa"], limit=4, progress=False)
    assert got["results"] == want["results"] and got["model"].endswith(f"+lora:{run}")
    assert main(["eval", "--lora", str(run), "--model", "smollm2-135m", "--tasks", "piqa"]) != 0
    assert "drop --model" in capsys.readouterr().err
