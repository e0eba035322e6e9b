"""Devices and dtypes: ``--device cpu|cuda|cuda:N|auto`` on every command that loads a model,
float16 next to float32/bfloat16, and pruning statistics kept in float64 whatever the weights' dtype.

The CUDA tests run only where ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import json

import pytest
import torch

import fedprune
from fedprune.cli import main
from fedprune.models.device import parse_device_spec, resolve_device
from fedprune.models.tiny import tiny_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 8


def calib(n=8, L=24, seed=0):
    return torch.randint(3, 128, (n, L), generator=torch.Generator().manual_seed(seed))


# ---- resolve_device ---------------------------------------------------------------------------

def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("spec", ["gpu", "cpu:0", "cuda:x", "cuda0", "", "mps"])
def test_resolve_device_refuses_unknown_specs_naming_the_choices(spec):
    with pytest.raises(ValueError, match=r"--device .*unknown device; choose cpu, cuda, cuda:N .* or auto"):
        resolve_device(spec)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_refused_clearly(spec):
    with pytest.raises(ValueError) as exc:
        resolve_device(spec)
    assert str(exc.value) == (f"--device {spec}: no CUDA device is available on this machine "
                              "(torch.cuda.is_available() is False)")
    with pytest.raises(ValueError, match=r"^model\.device cuda"):
        resolve_device("cuda", "model.device")


def test_parse_device_spec_checks_text_only():
    assert parse_device_spec("cuda:2") == ("cuda", 2)  # a config may name the GPU of another machine
    assert parse_device_spec("auto") == ("auto", None)


@needs_cuda
def test_resolve_device_cuda_index_beyond_the_devices_is_refused():
    n = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=rf"this machine has {n} CUDA device"):
        resolve_device(f"cuda:{n}")


# ---- dtypes -----------------------------------------------------------------------------------

def test_load_model_accepts_float16_and_auto(model_dir):
    m = fedprune.load_model(model_dir, dtype="float16", device="auto")
    assert next(m.parameters()).dtype == torch.float16
    assert next(m.parameters()).device.type == ("cuda" if CUDA else "cpu")


def test_load_model_refuses_cuda_before_loading_when_absent(model_dir):
    if CUDA:
        pytest.skip("CUDA is present")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        fedprune.load_model(model_dir, device="cuda")


def test_federated_config_takes_float16_and_a_device():
    from fedprune.federated.config import ModelSettings

    s = ModelSettings(name="tiny-llama", tokenizer="tiny-bpe", dtype="float16", device="auto")
    assert (s.dtype, s.device) == ("float16", "auto")
    assert ModelSettings().device == "cpu"
    with pytest.raises(ValueError, match=r"model\.dtype must be one of float32, bfloat16, float16, got 'int8'"):
        ModelSettings(dtype="int8")
    with pytest.raises(ValueError, match=r"model\.device must be cpu, cuda, cuda:N .* or auto, got 'gpu'"):
        ModelSettings(device="gpu")


def test_simulator_loads_the_base_in_the_configured_dtype_and_device():
    from fedprune.federated.config import FederatedConfig
    from fedprune.federated.runtime.simulation import load_base

    cfg = FederatedConfig.from_dict({"model": {"name": "tiny-llama", "tokenizer": "tiny-bpe",
                                               "dtype": "bfloat16", "device": "auto"},
                                     "data": {"num_clients": 3, "partition": "iid", "max_examples_per_client": 4}})
    model, _ = load_base(cfg)
    p = next(model.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == ("cuda" if CUDA else "cpu")


# ---- pruning a bfloat16 model: statistics in float64 ----------------------------------------

def test_bfloat16_model_prunes_with_comp_to_the_ratio_with_float64_statistics(monkeypatch):
    from fedprune.pruning import stats

    seen = []
    real = stats.GramAccumulator.add_channels

    def spy(self, h, W, e):
        seen.append((h.dtype, self.G.dtype))
        return real(self, h, W, e)

    monkeypatch.setattr(stats.GramAccumulator, "add_channels", spy)
    m = tiny_model("llama", num_hidden_layers=6, intermediate_size=192).to(torch.bfloat16)
    res = fedprune.prune(m, "comp", 0.3, calib_ids=calib(), layer_fraction=0.25, head_sparsity=None)
    assert abs(res.achieved_ratio - 0.3) <= 0.005
    assert seen and all(h == torch.bfloat16 and g == torch.float64 for h, g in seen)
    assert next(m.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = m(input_ids=calib(2)).logits
    assert torch.isfinite(logits.float()).all()


def test_low_precision_gram_is_accumulated_in_float64():
    """Summing a bfloat16 Gram in bfloat16 loses the small terms; the accumulator must not."""
    from fedprune.pruning.stats import GramAccumulator

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(4096, 4, generator=g) + 100.0)
    acc = GramAccumulator(4)
    W = torch.eye(4)
    for chunk in h.split(256):
        acc.add_channels(chunk.to(torch.bfloat16), W.to(torch.bfloat16), torch.zeros(len(chunk), 4))
    exact = (h.to(torch.bfloat16).double().T @ h.to(torch.bfloat16).double())
    torch.testing.assert_close(acc.G, exact, rtol=1e-12, atol=0)


# ---- the command line ---------------------------------------------------------------------------

def test_prune_cli_runs_on_cpu_in_bfloat16(model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(model_dir), "--device", "cpu", "--dtype", "bfloat16", "--ratio", "0.2",
               "--calibration", f"text:{corpus}", "--nsamples", "4", "--seq-len", "32", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[:printed.rindex("}") + 1])
    assert abs(summary["achieved_ratio"] - 0.2) <= 0.01
    assert (out / "config.json").exists()


@pytest.mark.parametrize("cmd", [["prune", "--output", "x"], ["export", "--output", "x.gguf"],
                                 ["generate", "--prompt", "hi"], ["eval"], ["speed"]])
def test_device_flag_is_checked_as_the_command_line_parses(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--device", "gpu"])
    assert exc.value.code == 2
    assert "argument --device: --device 'gpu': unknown device" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["prune", "--output", "x"], ["eval"], ["speed"], ["info"], ["generate", "--prompt", "x"]])
def test_float16_is_a_dtype_choice_everywhere(cmd):
    from fedprune.cli import build_parser

    args = build_parser().parse_args([*cmd, "--dtype", "float16"])
    assert args.dtype == "float16"


def test_generate_refuses_cuda_for_a_gguf_file():
    from fedprune.deploy.generation import open_backend

    with pytest.raises(ValueError, match=r"--device cuda: a \.gguf file runs on llama\.cpp on the CPU"):
        open_backend("model.gguf", device="cuda")


def test_generate_cli_on_cpu(model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "It was", "--max-new-tokens", "3",
               "--device", "cpu", "--dtype", "float16" if not CUDA else "float32"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("It was")


# ---- CUDA ------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_comp_prunes_a_low_precision_model_on_cuda(dtype):
    m = tiny_model("llama", num_hidden_layers=6, intermediate_size=192).to("cuda", dtype)
    res = fedprune.prune(m, "comp", 0.3, calib_ids=calib(), layer_fraction=0.25, head_sparsity=None)
    assert abs(res.achieved_ratio - 0.3) <= 0.005
    with torch.no_grad():
        logits = m(input_ids=calib(2).cuda()).logits
    assert logits.device.type == "cuda" and torch.isfinite(logits.float()).all()


@needs_cuda
def test_prune_cli_on_cuda(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    rc = main(["prune", "--model", str(model_dir), "--device", "cuda", "--ratio", "0.2",
               "--calibration", f"text:{corpus}", "--nsamples", "4", "--seq-len", "32",
               "--output", str(tmp_path / "pruned")])
    assert rc == 0
