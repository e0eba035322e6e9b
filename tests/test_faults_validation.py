"""Validation at the edge: bad options, paths and files are refused before any model loads,
with a message naming the option (or file and line), the value and what is allowed.

Each test here is a probe that once gave a wrong result, a raw traceback or an error pointing
the wrong way. Models are tiny random LLaMAs saved to tmp dirs (context 256 tokens).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

import fedprune
from fedprune.cli import main
from fedprune.models.tiny import tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "federated"
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 8


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tok):
    """A pruned checkpoint whose layers differ (layer 0 keeps 48 of 96 FFN channels): needs plan.json."""
    from fedprune.adapters import get_adapter

    m = tiny_model("llama", vocab_size=len(tok))
    get_adapter(m).prune_ffn_channels(0, list(range(48)))
    d = tmp_path_factory.mktemp("models") / "pruned"
    fedprune.save_model(m, d, tokenizer=tok)
    assert not json.loads((d / "plan.json").read_text())["hf_loadable"]
    return d


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading model weights or a tokenizer."""
    import fedprune.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    for mod in (fedprune, loading):
        monkeypatch.setattr(mod, "load_model", refuse)
        monkeypatch.setattr(mod, "load_tokenizer", refuse)


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``fedprune ARGV``; argparse errors exit 2 through SystemExit."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


# ---- eval --------------------------------------------------------------------------------

def test_eval_seq_len_beyond_the_context_is_refused_before_loading(model_dir, corpus, capsys, no_loading):
    rc, err = run_cli(["eval", "--model", model_dir, "--tasks", f"text:{corpus}", "--seq-len", 300], capsys)
    assert rc == 1
    assert "--seq-len=300 exceeds the context" in err and "max_position_embeddings=256" in err


def test_eval_seq_len_at_the_context_runs(model_dir, tmp_path, capsys):
    long_text = tmp_path / "long.txt"
    long_text.write_text(TEXT * 4)
    rc, err = run_cli(["eval", "--model", model_dir, "--tasks", f"text:{long_text}", "--seq-len", 256,
                       "--limit", 1], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("limit", ["-1", "0", "two"])
def test_eval_limit_must_be_at_least_one(model_dir, corpus, limit, capsys, no_loading):
    rc, err = run_cli(["eval", "--model", model_dir, "--tasks", f"text:{corpus}", "--limit", limit], capsys)
    assert rc == 2
    assert "argument --limit: must be an integer >= 1" in err and limit in err


def test_library_limit_and_seq_len_are_checked(tok):
    from fedprune.evaluate import evaluate, perplexity_of_tokens

    import torch

    lm = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(ValueError, match=r"limit must be an integer >= 1, got -1"):
        evaluate(lm, tok, tasks=["piqa"], limit=-1)
    with pytest.raises(ValueError, match=r"seq_len=300 exceeds the context .*max_position_embeddings=256"):
        perplexity_of_tokens(lm, torch.zeros(1000, dtype=torch.long), seq_len=300, progress=False)
    with pytest.raises(ValueError, match=r"seq_len must be an integer >= 2, got 0"):
        perplexity_of_tokens(lm, torch.zeros(1000, dtype=torch.long), seq_len=0, progress=False)


# ---- every numeric option of every command -------------------------------------------------

NUMERIC = [
    # (command and required args, flag, bad value, the range named in the message)
    (["eval"], "--seq-len", "0", ">= 2"),
    (["eval"], "--batch-size", "0", ">= 1"),
    (["eval"], "--ppl-batch-size", "-2", ">= 1"),
    (["eval"], "--limit", "1.5", ">= 1"),
    (["speed"], "--prompt-len", "0", ">= 1"),
    (["speed"], "--gen-len", "-1", ">= 1"),
    (["speed"], "--batch", "0", ">= 1"),
    (["speed"], "--repeats", "0", ">= 1"),
    (["prune", "--output", "x"], "--nsamples", "0", ">= 1"),
    (["prune", "--output", "x"], "--nsamples", "-3", ">= 1"),
    (["prune", "--output", "x"], "--seq-len", "0", ">= 2"),
    (["prune", "--output", "x"], "--seed", "-1", ">= 0"),
    (["prune", "--output", "x"], "--layer-fraction", "1.5", "[0, 1]"),
    (["federate"], "--threads", "-1", ">= 0"),
    (["export", "--model", "m", "--output", "o.gguf"], "--verify", "-5", ">= 0"),
    (["generate", "--prompt", "hi"], "--max-new-tokens", "0", ">= 1"),
    (["generate", "--prompt", "hi"], "--temperature", "-0.5", ">= 0"),
    (["generate", "--prompt", "hi"], "--threads", "0", ">= 1"),
    (["chat"], "--max-new-tokens", "-1", ">= 1"),
    (["chat"], "--temperature", "nan", ">= 0"),
]


@pytest.mark.parametrize("cmd,flag,value,allowed", NUMERIC, ids=[f"{c[0]}{f}={v}" for c, f, v, _ in NUMERIC])
def test_numeric_options_name_the_option_value_and_range(cmd, flag, value, allowed, capsys, no_loading):
    rc, err = run_cli([*cmd, flag, value], capsys)
    assert rc == 2
    assert f"argument {flag}: must be" in err and allowed in err and value in err


def test_speed_prompt_plus_generation_must_fit_the_context(model_dir, capsys, no_loading):
    rc, err = run_cli(["speed", "--model", model_dir, "--prompt-len", 250, "--gen-len", 10], capsys)
    assert rc == 1
    assert "--prompt-len + --gen-len=260 exceeds the context" in err and "<= 256" in err


# ---- prune: options checked before the model and calibration load --------------------------

def test_comp_option_typo_is_refused_before_loading(model_dir, tmp_path, capsys, no_loading):
    t0 = time.perf_counter()
    rc, err = run_cli(["prune", "--model", model_dir, "-o", "head_sparsty=0.5", "--output", tmp_path / "o"], capsys)
    assert rc == 1 and time.perf_counter() - t0 < 5
    assert "unknown option 'head_sparsty' for pruning method 'comp'" in err
    assert "known:" in err and "head_sparsity" in err and "layer_fraction" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,typo,known", [
    ("flap", "bach_size", "batch_size, bias_compensation"),
    ("wanda_sp", "bias_compensation", "batch_size"),
    ("llm_pruner", "first_layers", "batch_size, first_layer, last_layer_offset"),
    ("shortgpt", "damp", "batch_size"),
    ("sleb", "head_sparsity", "batch_size"),
    ("magnitude", "batch_size", "width_multiple"),
])
def test_peer_method_option_typos_are_refused_with_the_known_list(model_dir, tmp_path, method, typo, known, capsys,
                                                                  no_loading):
    rc, err = run_cli(["prune", "--model", model_dir, "--method", method, "-o", f"{typo}=2",
                       "--output", tmp_path / "o"], capsys)
    assert rc == 1
    assert f"unknown option '{typo}' for pruning method '{method}'; known: {known}" in err


def test_peer_methods_refuse_unknown_options_in_the_library_too():
    import torch

    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    m = tiny_model("llama", num_hidden_layers=4)
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=r"unknown option 'bath_size' for pruning method 'wanda_sp'; known: batch_size"):
        fedprune.prune(m, "wanda_sp", 0.2, calib_ids=calib, bath_size=2)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # refused before any surgery
    with pytest.raises(ValueError, match=r"pruning method 'flap': batch_size must be an integer >= 1, got 0"):
        fedprune.prune(m, "flap", 0.2, calib_ids=calib, batch_size=0)


@pytest.mark.parametrize("flags,named", [
    (["--layer-fraction", "0.2"], "--layer-fraction is a COMP option"),
    (["--neuron-metric", "vif"], "--neuron-metric is a COMP option"),
    (["--no-mask-tuning"], "--no-mask-tuning is a COMP option"),
    (["--no-mask-tuning", "--layer-fraction", "auto"], "--layer-fraction, --no-mask-tuning are COMP options"),
])
def test_comp_only_flags_with_another_method_are_refused(model_dir, tmp_path, flags, named, capsys, no_loading):
    rc, err = run_cli(["prune", "--model", model_dir, "--method", "flap", *flags, "--output", tmp_path / "o"], capsys)
    assert rc == 1
    assert named in err and "method 'flap'" in err


@pytest.mark.parametrize("option,message", [
    ("batch_size=2.5", "pruning method 'comp': batch_size must be an integer, got 2.5"),
    ("batch_size=0", "pruning method 'comp': batch_size must be an integer >= 1, got 0"),
    ("mask_tuning=3", "pruning method 'comp': mask_tuning must be true or false, got 3"),
    ("head_sparsity=1", "head_sparsity must be a number in [0.0, 1.0), got 1"),
    ("neuron_metric=energi", "unknown neuron criterion 'energi'; known:"),
])
def test_comp_option_values_are_checked_before_loading(model_dir, tmp_path, option, message, capsys, no_loading):
    rc, err = run_cli(["prune", "--model", model_dir, "-o", option, "--output", tmp_path / "o"], capsys)
    assert rc == 1
    assert message in err


def test_prune_seq_len_beyond_the_context_is_refused_before_loading(model_dir, tmp_path, capsys, no_loading):
    t0 = time.perf_counter()
    rc, err = run_cli(["prune", "--model", model_dir, "--seq-len", 100000, "--output", tmp_path / "o"], capsys)
    assert rc == 1 and time.perf_counter() - t0 < 5
    assert "--seq-len=100000 exceeds the context" in err and "max_position_embeddings=256" in err


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1", "nan"])
def test_prune_ratio_outside_the_open_unit_interval_is_refused(model_dir, tmp_path, ratio, capsys, no_loading):
    rc, err = run_cli(["prune", "--model", model_dir, "--ratio", ratio, "--output", tmp_path / "o"], capsys)
    assert rc == 1
    assert f"--ratio must be a number in (0.0, 1.0), got {ratio}" in err


def test_prune_unknown_calibration_corpus_is_refused_before_loading(model_dir, tmp_path, capsys, no_loading):
    rc, err = run_cli(["prune", "--model", model_dir, "--calibration", "c5", "--output", tmp_path / "o"], capsys)
    assert rc == 1
    assert "unknown dataset 'c5'" in err and "c4" in err


def test_prune_unknown_method_is_refused_before_loading(model_dir, tmp_path, capsys, no_loading):
    rc, err = run_cli(["prune", "--model", model_dir, "--method", "flapp", "--output", tmp_path / "o"], capsys)
    assert rc == 1
    assert "unknown pruning method 'flapp'; known: comp, flap, llm_pruner, magnitude, shortgpt, sleb, wanda_sp" in err


@pytest.mark.parametrize("cmd", [["prune", "--output", "o", "--calibration", "text:{missing}"],
                                 ["eval", "--tasks", "text:{missing}"]])
def test_a_missing_text_corpus_is_refused_before_loading(model_dir, tmp_path, cmd, capsys, no_loading):
    missing = tmp_path / "nope.txt"
    rc, err = run_cli([cmd[0], "--model", model_dir, *(a.format(missing=missing) for a in cmd[1:])], capsys)
    assert rc == 1
    assert f"text file not found: {missing}" in err


@pytest.mark.parametrize("cmd", [["prune", "--output", "o"], ["eval", "--tasks", "piqa"]])
def test_a_missing_data_dir_is_refused_before_loading(model_dir, tmp_path, cmd, capsys, no_loading):
    rc, err = run_cli([cmd[0], "--model", model_dir, *cmd[1:], "--data-dir", tmp_path / "nodata"], capsys)
    assert rc == 1
    assert f"--data-dir {tmp_path / 'nodata'}: no such directory" in err


def test_valid_peer_options_still_prune(model_dir, corpus, tmp_path, capsys):
    """The checks accept what is right: typed -o values reach the method and the model is pruned."""
    out = tmp_path / "o"
    rc, err = run_cli(["prune", "--model", model_dir, "--method", "flap", "--ratio", "0.2", "--calibration",
                       f"text:{corpus}", "--nsamples", 2, "--seq-len", 16, "-o", "batch_size=1",
                       "-o", "bias_compensation=false", "--output", out], capsys)
    assert rc == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["options"] == {"batch_size": "1", "bias_compensation": "False"}
    pruned = fedprune.load_model(out)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in fedprune.load_model(model_dir).parameters())
    assert all(layer.mlp.down_proj.bias is None for layer in pruned.model.layers)  # bias_compensation=false arrived


# ---- paths and damaged files --------------------------------------------------------------

@pytest.mark.parametrize("spec", ["./models/smol-pruned", "/tmp/fedprune-no-such-dir/xyz", "~/no-such-model-dir",
                                  "runs/a/b", "pruned.safetensors", "missing.gguf"])
def test_a_missing_local_path_is_reported_at_once_not_tried_on_the_hub(spec, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="model path not found") as info:
        fedprune.load_model(spec)
    assert time.perf_counter() - t0 < 2
    assert "hub" in str(info.value) and "never looked up" in str(info.value)


def test_a_typo_under_an_existing_folder_is_a_missing_path_with_a_suggestion(model_dir, monkeypatch, capsys):
    monkeypatch.chdir(model_dir.parent.parent)
    spec = f"{model_dir.parent.name}/tinny"  # one slash, like a hub id, but its folder is here
    rc, err = run_cli(["info", "--model", spec], capsys)
    assert rc == 1
    assert f"model path not found: {spec}" in err and f"did you mean {model_dir.parent.name}/tiny?" in err


def test_a_pruned_checkpoint_without_plan_json_says_so(pruned_dir, tmp_path, capsys):
    broken = tmp_path / "noplan"
    shutil.copytree(pruned_dir, broken)
    (broken / "plan.json").unlink()
    rc, err = run_cli(["info", "--model", broken], capsys)
    assert rc == 1
    assert "do not match its config.json" in err and "plan.json" in err and "is missing" in err
    assert "mlp.gate_proj.weight (48, 64) vs (96, 64)" in err


def test_weights_lacking_layers_the_config_describes_are_refused_not_randomly_filled(tmp_path, tok):
    """transformers would load this with layers 2-3 randomly initialised (a warning only)."""
    from fedprune.adapters import get_adapter

    m = tiny_model("llama", vocab_size=len(tok))
    get_adapter(m).remove_layers([1, 2])
    d = fedprune.save_model(m, tmp_path / "short", tokenizer=tok)
    (d / "plan.json").unlink()
    assert fedprune.load_model(d).config.num_hidden_layers == 2  # the config says 2 layers: consistent, loads
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match=r"18 tensors config.json expects are absent .*plan.json .* is missing"):
        fedprune.load_model(d)


def test_a_checkpoint_without_tokenizer_files_names_the_directory(pruned_dir, tmp_path, corpus, capsys):
    broken = tmp_path / "notok"
    shutil.copytree(pruned_dir, broken)
    for f in broken.iterdir():
        if f.name.startswith(("tokenizer.json", "vocab", "merges")):
            f.unlink()
    assert (broken / "tokenizer_config.json").exists()  # what made transformers talk about sentencepiece
    with pytest.raises(FileNotFoundError, match=f"the tokenizer files are missing in {broken}"):
        fedprune.load_tokenizer(broken)


def test_a_malformed_config_json_names_file_and_line(model_dir, tmp_path, capsys, no_loading):
    broken = tmp_path / "badcfg"
    shutil.copytree(model_dir, broken)
    text = (broken / "config.json").read_text()
    (broken / "config.json").write_text(text[: len(text) // 2])
    rc, err = run_cli(["eval", "--model", broken, "--tasks", "piqa"], capsys)
    assert rc == 1
    assert f"malformed model config {broken / 'config.json'}, line " in err and "truncated" in err


def test_a_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  name: tiny-llama\nfederation:\n  rounds: 2\n  strategy: [fedit\n")
    rc, err = run_cli(["federate", "--config", cfg, "--output", tmp_path / "run"], capsys)
    assert rc == 1
    assert f"YAML syntax error in {cfg}, line 6" in err
    rc, err = run_cli(["federate", "--config", CONFIGS / "fedit.yaml", "lora.rank=[8", "--output", tmp_path / "run"],
                      capsys)
    assert rc == 1 and "override 'lora.rank=[8': the value is not valid YAML" in err


def test_a_truncated_jsonl_task_file_names_file_and_line(tmp_path):
    from fedprune.data import load_examples

    d = tmp_path / "data" / "boolq"
    d.mkdir(parents=True)
    rec = json.dumps({"question": "is it", "passage": "it is", "label": True})
    (d / "val.jsonl").write_text(f"{rec}\n{rec}\n{rec[:25]}")
    with pytest.raises(ValueError, match=rf"malformed data file {d / 'val.jsonl'}, line 3 column \d+"):
        load_examples("boolq", tmp_path / "data")
    (d / "val.jsonl").write_text(f"{rec}\n{rec}\n")
    assert len(load_examples("boolq", tmp_path / "data")) == 2


def test_a_truncated_calibration_and_dolly_file_name_file_and_line(tmp_path, tok):
    from fedprune.data import calibration_samples, dolly_client

    (tmp_path / "c4-sample").mkdir()
    doc = json.dumps({"prefix": "a b c ", "gold_completion": "d e f"})
    (tmp_path / "c4-sample" / "c4.jsonl").write_text(f"{doc}\n{doc[:10]}\n")
    with pytest.raises(ValueError, match=r"c4\.jsonl, line 2 column"):
        calibration_samples(tok, "c4", nsamples=1, seq_len=4, data_dir=tmp_path)
    (tmp_path / "dolly-15k-shepherd-10clients").mkdir()
    (tmp_path / "dolly-15k-shepherd-10clients" / "local_training_0.json").write_text('[{"instruction": "x",\n "cont')
    with pytest.raises(ValueError, match=r"local_training_0\.json, line 2 column"):
        dolly_client(0, tmp_path)


@pytest.mark.parametrize("kw,message", [({"nsamples": 0}, "nsamples must be an integer >= 1, got 0"),
                                        ({"seq_len": 1}, "seq_len must be an integer >= 2, got 1")])
def test_calibration_sizes_are_checked(tok, corpus, kw, message):
    from fedprune.data import calibration_samples

    with pytest.raises(ValueError, match=message):
        calibration_samples(tok, f"text:{corpus}", **{"nsamples": 2, "seq_len": 8, **kw})


# ---- federated config: integers stay integers, every numeric field has a range ----------------

def test_rounds_2_5_is_refused_and_2_0_is_2(tmp_path, capsys):
    from fedprune.federated.config import load_config

    rc, err = run_cli(["federate", "--config", CONFIGS / "fedit.yaml", "federation.rounds=2.5",
                       "--output", tmp_path / "run"], capsys)
    assert rc == 1 and "federation.rounds must be an integer, got 2.5" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    cfg = load_config(CONFIGS / "fedit.yaml", ["federation.rounds=2.0", "train.lr=1e-4", "lora.alpha=16"])
    assert cfg.federation.rounds == 2 and type(cfg.federation.rounds) is int
    assert cfg.train.lr == 1e-4 and type(cfg.lora.alpha) is float


BAD_CONFIG = [
    ("federation.rounds=0", "federation.rounds must be an integer >= 1, got 0"),
    ("federation.clients_per_round=1.5", "federation.clients_per_round must be an integer, got 1.5"),
    ("federation.seed=-1", "federation.seed must be an integer >= 0, got -1"),
    ("federation.ranks=[4, 2.5]", "federation.ranks[1] must be an integer, got 2.5"),
    ("federation.deadline_s=-1", "federation.deadline_s must be a number >= 0.0, got -1"),
    ("federation.max_update_norm=0", "federation.max_update_norm must be a number > 0.0, got 0"),
    ("federation.dropout=1", "federation.dropout must be true or false, got 1"),
    ("data.num_clients=2.5", "data.num_clients must be an integer, got 2.5"),
    ("data.max_examples_per_client=-1", "data.max_examples_per_client must be an integer >= 0, got -1"),
    ("data.alpha=0", "data.alpha must be a number > 0.0, got 0"),
    ("train.local_steps=0", "train.local_steps must be >= 1, got 0"),
    ("train.grad_accum=1.5", "train.grad_accum must be an integer, got 1.5"),
    ("train.seq_len=4", "train.seq_len must be >= 8, got 4"),
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
    ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0, got -1.0"),
    ("train.loss_chunk_tokens=0", "train.loss_chunk_tokens must be >= 1, got 0"),
    ("lora.rank=0", "lora.rank must be >= 1, got 0"),
    ("lora.rank=true", "lora.rank must be an integer, got True"),
    ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
    ("lora.dropout=.nan", "lora.dropout must be a number, got nan"),
    ("eval.every=0", "eval.every must be >= 1, got 0"),
    ("eval.loss_examples=-1", "eval.loss_examples must be >= 0, got -1"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens must be >= 1, got 0"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
]


@pytest.mark.parametrize("override,message", BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_federated_config_values_name_section_key_value_and_range(override, message):
    from fedprune.federated.config import load_config

    with pytest.raises(ValueError) as info:
        load_config(CONFIGS / "fedit.yaml", [override])
    assert message in str(info.value)


@pytest.mark.parametrize("config,options,message", [
    ("fedit.yaml", "{interval: 3}", "unknown option 'interval' for federation.strategy 'fedit' (federation.options); "
                                    "known: none (it takes no options)"),
    ("fedspine.yaml", "{intervall: 3}", "unknown option 'intervall' for federation.strategy 'fedspine'"),
    ("fedpruner.yaml", "{temprature: 1}", "known: activation_slack, calib_examples, fixed_overhead_mb, objective, "
                                          "reuse_stats, stats_tokens, temperature"),
    ("fedspine.yaml", "{interval: 2.5}", "federation.options.interval must be an integer, got 2.5"),
    ("fedspine.yaml", "{p_range: [0.1, high]}", "federation.options.p_range[1] must be a number, got 'high'"),
])
def test_strategy_options_are_checked_by_name_and_type(config, options, message):
    from fedprune.federated.config import load_config

    with pytest.raises(ValueError) as info:
        load_config(CONFIGS / config, [f"federation.options={options}"])
    assert message in str(info.value)
    if "unknown" in message and "fedspine" in message:
        assert "known: chooser," in str(info.value) and "interval" in str(info.value)


def test_the_shipped_configs_still_load():
    from fedprune.federated.config import load_config

    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.federation.rounds >= 1, path


# ---- the coercion rules themselves ----------------------------------------------------------

def test_coerce_keeps_integers_integers():
    from typing import Sequence

    from fedprune.options import coerce

    assert coerce("x", 3.0, int) == 3 and type(coerce("x", 3.0, int)) is int
    assert coerce("x", "7", int) == 7 and coerce("x", "1e-3", float) == 1e-3
    assert coerce("x", 2, float) == 2.0 and type(coerce("x", 2, float)) is float
    assert coerce("x", "auto", float | str) == "auto" and coerce("x", 0, float | str) == 0.0
    assert coerce("x", None, int | None) is None and coerce("x", "false", bool) is False
    assert coerce("x", [1, 2.0], tuple[int, ...]) == (1, 2)
    assert coerce("x", [0.1, 1], Sequence[float]) == [0.1, 1.0]
    for value, hint, msg in [(2.5, int, "x must be an integer, got 2.5"), (True, int, "x must be an integer, got True"),
                             (1, bool, "x must be true or false, got 1"), (None, int, "x must be an integer, got null"),
                             ("2.5", int, "x must be an integer, got '2.5'"), ([1, "a"], list[int], r"x\[1\] must be")]:
        with pytest.raises(ValueError, match=msg):
            coerce("x", value, hint)
