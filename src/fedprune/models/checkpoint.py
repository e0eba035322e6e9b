"""Pruned checkpoints: safetensors weights + config + tokenizer + ``plan.json``.

A pruned model whose kept layers all have the same shape is also a plain Hugging Face
checkpoint (its config says the pruned sizes). One whose layers differ (per-layer head
counts or FFN widths) is rebuilt from the plan: the full-size architecture is built from
the config, shrunk to the planned shapes, then the weights are loaded. Either way
``load_model(dir)`` gives identical logits. The directory is written atomically, under a
lock, and never replaces what is already at the path unless asked to (see
:mod:`fedprune.outputs`).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .. import atomic
from ..adapters import PrunePlan, get_adapter

PLAN_FILE = "plan.json"


def _uniform_sizes(plan: PrunePlan):
    """The (heads, KV heads, FFN width) every kept layer shares, or None. A layer given a bias
    its architecture lacks (FLAP) is not expressible in the config either: None."""
    if any(lp.added_biases for lp in plan.layers):
        return None
    shapes = {(len(lp.q_heads), len(lp.kv_heads), len(lp.ffn_channels)) for lp in plan.layers}
    return shapes.pop() if len(shapes) == 1 else None


def _valid(config) -> bool:
    """Whether transformers accepts ``config`` (it validates a config when saving and loading it)."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    except Exception:
        return False
    return True


def checkpoint_config(model, extra: dict | None = None):
    """``(config, record)``: a copy of the config with the pruned sizes when every kept layer shares
    them (``record["hf_loadable"]``: plain ``from_pretrained`` loads the directory then), and the
    ``plan.json`` record (the plan, updated with ``extra``)."""
    adapter = get_adapter(model)
    plan = adapter.plan
    config = copy.deepcopy(model.config)
    uniform = _uniform_sizes(plan)
    if uniform is not None:
        # Every kept layer has the same shape: say so in the config, so plain
        # ``AutoModelForCausalLM.from_pretrained`` can load the directory too.
        if not adapter.write_uniform_sizes(config, *uniform) or not _valid(config):
            # the config cannot say it (e.g. OPT with fewer heads, or heads that do not divide the
            # hidden size, which transformers refuses in a config): the checkpoint needs the plan
            uniform, config = None, copy.deepcopy(model.config)
    record = plan.to_dict()
    record["hf_loadable"] = uniform is not None
    if extra:
        record.update(extra)
    return config, record


def save_model(model, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None,
               overwrite: bool = False) -> Path:
    """Save ``model`` (pruned or not) to ``directory`` atomically; returns the path.

    An existing file or non-empty directory at ``directory`` (a previous model included) is
    replaced only with ``overwrite=True``; the current directory, its parents and home
    directories never are (:func:`fedprune.outputs.check_model_output`).
    """
    from ..outputs import check_model_output, model_output_lock

    directory = Path(directory)
    config, record = checkpoint_config(model, extra)
    uniform = record["hf_loadable"]  # the config copy says the pruned sizes
    with model_output_lock(directory), atomic.atomic_directory(check_model_output(directory, overwrite)) as tmp:
        original = model.config
        model.config = config if uniform else original
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config = original
        if not uniform:
            original.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / PLAN_FILE, record)
    return directory


def load_checkpoint(directory: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by :func:`save_model` from its config, plan and weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import read_json_file

    directory = Path(directory)
    record = read_json_file(directory / PLAN_FILE, "plan file")
    read_json_file(directory / "config.json", "model config")  # a syntax error names its line
    try:
        plan = PrunePlan.from_dict(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"corrupt plan file {directory / PLAN_FILE}: {type(exc).__name__}: {exc}") from exc
    if record.get("hf_loadable"):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        model._fedprune_plan = plan
        return model
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    adapter.apply_plan_shapes(plan)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as exc:
            raise ValueError(f"corrupt weights file {f}: {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(f"weights in {directory} do not match its plan: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    _materialise_buffers(model, config, dtype)
    model._fedprune_plan = plan
    return model.to(dtype)


def _materialise_buffers(model, config, dtype):
    """Non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them."""
    for name, mod in model.named_modules():
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            if hasattr(mod, "rope_init_fn") or "rotary" in name:
                fresh = type(mod)(config=config)
                for bname, buf in fresh.named_buffers(recurse=False):
                    setattr(mod, bname, buf) if bname not in mod._buffers else mod._buffers.__setitem__(bname, buf)
            else:
                for bname, buf in list(mod._buffers.items()):
                    if buf is not None and buf.is_meta:
                        mod._buffers[bname] = torch.zeros(buf.shape, dtype=buf.dtype)
