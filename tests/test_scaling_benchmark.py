"""benchmarks/scaling/run.py: the random checkpoint writer, the growth-exponent fit, the OOM guard and resume.

Fast (no prune is launched): a tiny LLaMA shape is written and loaded, the fit is checked against a
hand computation, and the run loop is driven with rows already there or runs the guard refuses.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import fedprune
from bench_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sb():
    mod = load_benchmark("benchmarks/scaling/run.py", "scaling_bench")
    return mod


@pytest.fixture(scope="module")
def tiny(sb):
    return sb.Shape("tiny", hidden=64, intermediate=96, layers=3, heads=4, kv_heads=2, vocab=300, tied=False,
                    rope_theta=10000.0, max_positions=256, source="test")


def test_public_shapes_have_their_published_parameter_counts(sb):
    # SmolLM2-135M: 134,515,008 (the installed model's own count); LLaMA-2-7B: 6,738,415,616
    assert sb.param_count(sb.SHAPES["smollm2-135m"]) == 134_515_008
    assert sb.param_count(sb.SHAPES["llama2-7b"]) == 6_738_415_616
    # its vocabulary raised to the SmolLM2 tokenizer's: embeddings and head grow by 17152 x 4096 each
    assert sb.param_count(sb.SHAPES["llama2-7b"], 49152) == 6_738_415_616 + 2 * 17152 * 4096


def test_checkpoint_writer_gives_a_loadable_sharded_model_of_the_config(sb, tiny, tmp_path, tok):
    d = tmp_path / "tiny-bf16"
    sb.write_random_checkpoint(tiny, d, "bfloat16", vocab=len(tok), shard_bytes=40_000, tokenizer=tok)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    expected = sb.param_count(tiny, len(tok))
    # by hand: 3 layers x (2*64*64 + 2*64*32 + 3*64*96 + 2*64) + 2 * vocab * 64 + 64
    assert expected == 3 * (8192 + 4096 + 18432 + 128) + 2 * len(tok) * 64 + 64
    assert index["metadata"]["total_size"] == 2 * expected  # bfloat16
    model = fedprune.load_model(d, dtype="bfloat16")
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == len(tok)
    w = model.model.layers[1].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16 and 0.01 < w.float().std().item() < 0.03  # N(0, 0.02^2), not zeros
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    ids = torch.randint(0, len(tok), (1, 8))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    streamed = fedprune.load_model(d, dtype="bfloat16", weight_offload="disk")  # the layers memory-mapped
    assert streamed.model.layers[0].mlp.up_proj.weight.is_meta
    # reused when present (same config); another shape there is refused by name
    mtime = (d / shards[0]).stat().st_mtime_ns
    sb.write_random_checkpoint(tiny, d, "bfloat16", vocab=len(tok), shard_bytes=40_000)
    assert (d / shards[0]).stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="intermediate_size"):
        sb.write_random_checkpoint(sb.Shape(**{**tiny.__dict__, "intermediate": 128}), d, "bfloat16", vocab=len(tok))


def test_exponent_fit_equals_a_hand_computation(sb):
    assert sb.fit_exponent([1e8, 4e8, 16e8], [3 * x ** 1.5 for x in (1e8, 4e8, 16e8)]) == pytest.approx(1.5)
    # x = 1, e, e^2 so log x = 0, 1, 2; log y = 0, 2, 3: slope = sum((lx - 1)(ly - 5/3)) / sum((lx - 1)^2) = 3/2
    xs = [1.0, math.e, math.e ** 2]
    ys = [1.0, math.e ** 2, math.e ** 3]
    assert sb.fit_exponent(xs, ys) == pytest.approx(1.5)
    # log10 x = 1, 2, 3 and log10 y = 1, 2, 3.5 (the base cancels): mean y 13/6,
    # slope = ((-1)(1 - 13/6) + (1)(3.5 - 13/6)) / ((-1)^2 + 1^2) = (7/6 + 8/6) / 2 = 1.25
    assert sb.fit_exponent([10.0, 100.0, 1000.0], [10.0, 100.0, 10 ** 3.5]) == pytest.approx(1.25)
    assert sb.fit_exponent([5.0], [1.0]) is None
    rows = [{"method": "m", "shape": f"s{x}", "status": "ok", "params": x, "wall_s": x ** 2, "cpu_s": x, "peak_rss_bytes": 7.0}
            for x in (2.0, 8.0)] + [{"method": "m", "status": "oom", "params": 64.0}]
    e = sb.exponents(rows)["m"]
    assert e["points"] == 2 and e["wall_s_exponent"] == pytest.approx(2) and e["cpu_s_exponent"] == pytest.approx(1)
    assert e["peak_rss_bytes_exponent"] == pytest.approx(0)


def args_for(sb, tmp_path, *extra):
    return sb.parse_args(["--results", str(tmp_path / "results"), "--work", str(tmp_path / "work"), *extra])


def test_oom_guard_marks_a_run_with_its_estimate_without_launching(sb, tmp_path):
    args = args_for(sb, tmp_path, "--shapes", "llama2-7b", "--methods", "llm_pruner", "comp",
                    "--memory-limit", "24", "--margin", "1")
    launched = []
    rows = sb.run_all(args, launch=lambda row, a: launched.append(row["key"]) or {**row, "status": "ok"})
    llm, comp = rows
    assert llm["status"] == "oom" and llm["weight_offload"] == "none"
    weights = sb.param_count(sb.SHAPES["llama2-7b"], 49152) * 2
    assert llm["needs_bytes"] == llm["estimate_bytes"] > 2 * weights > 23 * 2 ** 30  # weights + gradients
    assert "needs about" in llm["reason"] and "gradients" in llm["reason"]
    saved = json.loads((tmp_path / "results" / "rows" / f"{llm['key']}.json").read_text())
    assert saved["status"] == "oom" and saved["needs_bytes"] == llm["needs_bytes"]
    # COMP streams its weights: its estimate is below its 13.8 GB of bfloat16 weights, so it is launched
    assert comp["weight_offload"] == "disk" and comp["estimate_bytes"] < weights < llm["estimate_bytes"] / 2
    assert launched == [comp["key"]]


def test_resume_skips_finished_rows_and_reruns_a_timed_out_one(sb, tmp_path):
    args = args_for(sb, tmp_path, "--shapes", "smollm2-135m", "--methods", "comp", "wanda_sp")
    rows_dir = tmp_path / "results" / "rows"
    done = {"key": sb.row_key("comp", "smollm2-135m", "bfloat16", "disk"), "method": "comp", "shape": "smollm2-135m",
            "status": "ok", "params": 1, "wall_s": 12.5}
    cut = {"key": sb.row_key("wanda_sp", "smollm2-135m", "bfloat16", "disk"), "method": "wanda_sp",
           "shape": "smollm2-135m", "status": "timeout", "attempts": [{"wall_s": 5.0}]}
    sb.write_row(rows_dir, done)
    sb.write_row(rows_dir, cut)
    seen = []

    def launch(row, a):
        seen.append((row["key"], list(row["attempts"])))
        return {**row, "status": "ok", "wall_s": 9.0}

    rows = sb.run_all(args, launch=launch)
    assert seen == [(cut["key"], [{"wall_s": 5.0}])]  # the finished row is not launched; the cut one keeps its attempts
    assert rows[0] == done and rows[1]["status"] == "ok"
    assert json.loads((rows_dir / f"{done['key']}.json").read_text()) == done
    assert not (tmp_path / "work").exists()  # nothing was written for the finished run
    s = sb.report(tmp_path / "results")
    assert [r["key"] for r in s["rows"]] == [done["key"], cut["key"]] and s["caveat"] == sb.CAVEAT
    assert sb.CAVEAT in (tmp_path / "results" / "scaling.md").read_text()


def test_a_restart_from_scratch_does_not_add_the_lost_attempts(sb):
    old = [{"wall_s": 100.0, "cpu_s": 50.0}]
    row = {"attempts": list(old), "finished_layers": 3}
    assert sb.earlier_attempts(row, resumed_layers=3) == old  # resumed: its time adds up
    assert "discarded_attempts" not in row
    assert sb.earlier_attempts(row, resumed_layers=0) == []  # partial output gone: starts over
    assert row["discarded_attempts"] == old and "finished_layers" not in row
    assert sb.earlier_attempts({"attempts": []}, resumed_layers=0) == []
