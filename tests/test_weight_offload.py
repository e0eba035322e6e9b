"""Weight offload (``weight_offload="cpu"|"disk"``): decoder layers streamed one at a time.

Streamed prunes must give the same pruned weights, bit for bit, and the same plan as the whole
model in memory; only one decoder layer may hold weights at any time; an interrupted prune resumes
from its last finished layer to the same result, and refuses other arguments by name.
"""
import json

import pytest
import torch

import fedprune
from fedprune.adapters import get_adapter
from fedprune.models.stream_checkpoint import PROGRESS_FILE, partial_dir
from fedprune.models.streaming import weight_store
from fedprune.models.tiny import tiny_model
from fedprune.pruning import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

STREAMED = ["comp", "wanda_sp", "flap", "shortgpt", "magnitude"]
RATIO = 0.25


def calib(n=8, L=24, seed=0):
    return torch.randint(3, 128, (n, L), generator=torch.Generator().manual_seed(seed))


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny LLaMA and OPT of 6 layers saved as model directories."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for arch in ("llama", "opt"):
        width = {"ffn_dim": 192} if arch == "opt" else {"intermediate_size": 192}
        out[arch] = root / arch
        fedprune.save_model(tiny_model(arch, num_hidden_layers=6, **width), out[arch])
    return out


@pytest.fixture(scope="module")
def references(sources, tmp_path_factory):
    """Whole-model prunes (weight_offload none), one per (arch, method): (output dir, pruned model)."""
    root = tmp_path_factory.mktemp("references")
    cache = {}

    def get(arch, method, dtype="float32", **options):
        key = (arch, method, dtype, tuple(sorted(options.items())))
        if key not in cache:
            out = root / "-".join(map(str, [arch, method, dtype, len(cache)]))
            model = fedprune.load_model(sources[arch], dtype=dtype)
            fedprune.prune(model, method, RATIO, calib_ids=calib(), output=out, **options)
            cache[key] = (out, model)
        return cache[key]

    return get


def plan(directory):
    return json.loads((directory / "plan.json").read_text())


def assert_same_checkpoint(a, b):
    """Same tensors bit for bit, same plan (layers, shapes, layer report) and config."""
    ma, mb = fedprune.load_model(a), fedprune.load_model(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    pa, pb = plan(a), plan(b)
    for key in ("layers", "kept_layers", "hf_loadable", "orig_num_layers"):
        assert pa[key] == pb[key], key
    assert pa["pruning"].get("layer_report") == pb["pruning"].get("layer_report")
    assert pa["pruning"]["params_after"] == pb["pruning"]["params_after"]
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def one_layer_at_a_time(model, seen: list):
    """Hooks asserting that at most one decoder layer holds weights whenever a layer runs or is finished."""
    store = weight_store(model)

    def check(*_):
        loaded = store.loaded()
        assert len(loaded) <= 1, f"decoder layers {loaded} hold weights at once"
        seen.append(len(loaded))

    for layer in store.layers:
        layer.register_forward_pre_hook(check)
    store.finished_hooks.append(check)


@pytest.mark.parametrize("mode", ["disk", "cpu"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", STREAMED)
def test_streamed_prune_equals_the_whole_model_bit_for_bit(method, arch, mode, sources, references, tmp_path):
    ref_dir, ref_model = references(arch, method)
    model = fedprune.load_model(sources[arch], weight_offload=mode)
    store = weight_store(model)
    assert store.loaded() == [] and all(p.is_meta for layer in store.layers for p in layer.parameters())
    seen = []
    one_layer_at_a_time(model, seen)
    res = fedprune.prune(model, method, RATIO, calib_ids=calib(), output=tmp_path / "out")
    assert seen and max(seen) == 1  # hooks ran, with exactly the current layer materialised
    assert store.loaded() == []
    assert res.params_after == get_adapter(ref_model).num_parameters()
    assert_same_checkpoint(ref_dir, tmp_path / "out")
    assert not partial_dir(tmp_path / "out").exists()
    # the streamed output reloads with the logits of the model pruned in memory
    ids = calib(2, 16, seed=1)
    assert torch.equal(logits(fedprune.load_model(tmp_path / "out"), ids), logits(ref_model, ids))


@pytest.mark.parametrize("method", ["comp", "shortgpt"])
def test_streamed_prune_without_output_returns_the_pruned_model(method, sources, references):
    _, ref_model = references("llama", method)
    model = fedprune.load_model(sources["llama"], weight_offload="disk")
    res = fedprune.prune(model, method, RATIO, calib_ids=calib())
    ids = calib(2, 16, seed=1)
    assert torch.equal(logits(res.model, ids), logits(ref_model, ids))


def test_bfloat16_streamed_prune_meets_the_ratio_with_float64_statistics(sources, references, tmp_path):
    ref_dir, _ = references("llama", "comp", "bfloat16")
    model = fedprune.load_model(sources["llama"], dtype="bfloat16", weight_offload="disk")
    res = fedprune.prune(model, "comp", RATIO, calib_ids=calib(), output=tmp_path / "out")
    tol = METHODS.get("comp").tolerance(res.params_before, 0)
    assert abs(res.achieved_ratio - RATIO) <= tol
    assert all(isinstance(b, float) for b in res.report["block_influence"])  # accumulated in float64
    assert all(torch.isfinite(torch.tensor(e["ffn_mask"]["err_after"])) for e in res.report["layers"])
    assert next(fedprune.load_model(tmp_path / "out", dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert_same_checkpoint(ref_dir, tmp_path / "out")


class Interrupt(Exception):
    pass


def interrupt_after(model, k: int):
    """Raise once ``k`` decoder layers are finished (written) in this run."""
    done = []

    def hook(src, pos):
        done.append(src)
        if len(done) == k:
            raise Interrupt(f"after source layer {src}")

    weight_store(model).finished_hooks.append(hook)


@pytest.mark.parametrize("method,mode,options", [
    ("comp", "disk", {"n_layers": 1}),  # a removed layer: the dense stream passes through it on resume
    ("comp", "cpu", {"mask_bias": True, "head_sparsity": None}),  # heads pruned, biases added
    ("flap", "disk", {}),
    ("shortgpt", "disk", {}),
])
def test_interrupted_prune_resumes_to_the_same_result(method, mode, options, sources, references, tmp_path):
    ref_dir, _ = references("llama", method, **options)
    out = tmp_path / "out"
    model = fedprune.load_model(sources["llama"], weight_offload=mode)
    interrupt_after(model, 2)
    with pytest.raises(Interrupt):
        fedprune.prune(model, method, RATIO, calib_ids=calib(), output=out, **options)
    assert not out.exists()
    progress = json.loads((partial_dir(out) / PROGRESS_FILE).read_text())
    first = sorted(int(k) for k in progress["finished"])
    assert len(first) == 2 and progress["last_finished_layer"] == first[-1]
    model = fedprune.load_model(sources["llama"], weight_offload=mode)
    again = []
    weight_store(model).finished_hooks.append(lambda src, pos: again.append(src))
    fedprune.prune(model, method, RATIO, calib_ids=calib(), output=out, **options)
    assert again and not set(again) & set(first)  # the finished layers were not pruned again
    assert_same_checkpoint(ref_dir, out)
    assert not partial_dir(out).exists()


def test_resume_refuses_other_arguments_naming_them(sources, tmp_path):
    out = tmp_path / "out"
    model = fedprune.load_model(sources["llama"], weight_offload="disk")
    interrupt_after(model, 1)
    with pytest.raises(Interrupt):
        fedprune.prune(model, "comp", RATIO, calib_ids=calib(), output=out)
    for kwargs, named in (({"ratio": 0.3}, "ratio: 0.25 (interrupted run) vs 0.3 (now)"),
                          ({"damp": 0.1}, "options.damp: 0.01 (interrupted run) vs 0.1 (now)"),
                          ({"calib_ids": calib(seed=5)}, "calibration_ids")):
        model = fedprune.load_model(sources["llama"], weight_offload="disk")
        kw = {"ratio": RATIO, "calib_ids": calib(), **kwargs}
        with pytest.raises(ValueError, match="other arguments") as exc:
            fedprune.prune(model, "comp", kw.pop("ratio"), output=out, **kw)
        assert named in str(exc.value) and str(partial_dir(out)) in str(exc.value)
    model = fedprune.load_model(sources["llama"], dtype="bfloat16", weight_offload="disk")
    with pytest.raises(ValueError, match="dtype: 'float32' .* vs 'bfloat16'"):
        fedprune.prune(model, "comp", RATIO, calib_ids=calib(), output=out)
    assert (partial_dir(out) / PROGRESS_FILE).exists()  # refused: still resumable


@pytest.mark.parametrize("method,options,why", [
    ("llm_pruner", {}, "needs gradients"),
    ("sleb", {}, "calibration loss"),
    ("comp", {"layer_metric": "sleb"}, "layer_metric='sleb'"),
    ("comp", {"layer_fraction": "auto"}, "layer_fraction='auto'"),
])
def test_whole_model_methods_refuse_weight_offload_before_loading(method, options, why, tmp_path):
    missing = tmp_path / "no-such-model"  # nothing is loaded: the refusal comes first
    with pytest.raises(ValueError, match=f"method '{method}' cannot stream its weights.*{why}"):
        fedprune.prune(str(missing), method, RATIO, calib_ids=calib(), weight_offload="disk", **options)


def test_weight_offload_must_match_how_the_model_was_loaded(sources):
    whole = fedprune.load_model(sources["llama"])
    with pytest.raises(ValueError, match="loaded with weight_offload='none'"):
        fedprune.prune(whole, "magnitude", RATIO, weight_offload="disk")
    with pytest.raises(ValueError, match="weight_offload must be one of none, cpu, disk"):
        fedprune.load_model(sources["llama"], weight_offload="gpu")


def test_streamed_output_follows_the_output_rules(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    model = fedprune.load_model(sources["llama"], weight_offload="disk")
    with pytest.raises(ValueError, match="not empty"):
        fedprune.prune(model, "magnitude", RATIO, calib_ids=calib(), output=out)
    assert not partial_dir(out).exists() and (out / "keep.txt").read_text() == "user file"
    fedprune.prune(model, "magnitude", RATIO, calib_ids=calib(), output=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_prune_cli_weight_offload_disk_matches_none(sources, tmp_path, monkeypatch):
    import fedprune.pruning as P
    from fedprune.cli import main

    monkeypatch.setattr(P, "get_calibration", lambda tok, corpus, n, L, seed, data_dir=None: calib(n, L))
    monkeypatch.setattr(fedprune, "load_tokenizer", lambda spec: None)
    args = ["prune", "--model", str(sources["llama"]), "--ratio", "0.25", "--nsamples", "4", "--seq-len", "16"]
    assert main(args + ["--output", str(tmp_path / "none")]) == 0
    assert main(args + ["--weight-offload", "disk", "--output", str(tmp_path / "disk")]) == 0
    assert_same_checkpoint(tmp_path / "none", tmp_path / "disk")
    assert main(args + ["--method", "sleb", "--weight-offload", "disk", "--output", str(tmp_path / "x")]) == 1


def test_hidden_stream_reads_batches_onto_the_layers_device():
    """A stream spilled to disk hands batches to the device the layers run on (CUDA in a streamed prune):
    here the meta device stands in for it."""
    from fedprune.pruning.activations import HiddenStream

    with HiddenStream(3, 4, 5, 2, offload="disk", device="meta") as s:
        s.write(0, torch.ones(2, 4, 5))
        s.write(1, torch.ones(1, 4, 5))
        assert s.read(0).device.type == "meta"
        c = s.clone()
        assert c.device == torch.device("meta") and torch.equal(c.read(1, raw=True), torch.ones(1, 4, 5))
    with HiddenStream(3, 4, 5, 2, offload="disk") as s:
        s.write(1, torch.ones(1, 4, 5))
        assert s.read(1).device.type == "cpu"


def test_a_pruned_checkpoint_streams_too(references, tmp_path):
    """A FLAP output (per-layer widths, added biases: rebuilt from its plan on the meta device) pruned again."""
    src, _ = references("llama", "flap")
    fedprune.prune(fedprune.load_model(src), "magnitude", 0.1, calib_ids=calib(), output=tmp_path / "none")
    fedprune.prune(fedprune.load_model(src, weight_offload="disk"), "magnitude", 0.1, calib_ids=calib(),
                   output=tmp_path / "disk")
    assert_same_checkpoint(tmp_path / "none", tmp_path / "disk")


def test_weights_that_do_not_match_the_config_are_refused(sources, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sources["llama"], bad)
    (bad / "plan.json").unlink()
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not match the model built from its config.*\(192, 64\) vs \(100, 64\)"):
        fedprune.load_model(bad, weight_offload="disk")


@pytest.mark.parametrize("mode", ["none", "disk"])
def test_uniform_heads_that_do_not_divide_the_hidden_size_save_with_the_plan(mode, tmp_path):
    """8 heads of 8 dims in a 64-wide model, 6 kept in every layer: transformers refuses a config saying
    6 heads (64 % 6 != 0), so the checkpoint is rebuilt from its plan instead."""
    src = tmp_path / "src"
    fedprune.save_model(tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8), src)
    model = fedprune.load_model(src, weight_offload=mode)
    res = fedprune.prune(model, "wanda_sp", 0.3, calib_ids=calib(), output=tmp_path / "out", preset="official")
    assert all(e["heads_kept"] == 6 for e in res.report["layers"])
    assert plan(tmp_path / "out")["hf_loadable"] is False
    ids = calib(2, 16, seed=1)
    again = fedprune.load_model(tmp_path / "out")
    assert get_adapter(again).num_heads(get_adapter(again).layers[0]) == 6
    ref = fedprune.load_model(src)
    fedprune.prune(ref, "wanda_sp", 0.3, calib_ids=calib(), preset="official")
    assert torch.equal(logits(again, ids), logits(ref, ids))
