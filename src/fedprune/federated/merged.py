"""A federated run's global model as a plain model: the base with the run's global LoRA merged.

``fedprune eval --lora RUN_DIR`` and ``fedprune export --lora RUN_DIR`` both call
:func:`load_merged_run`, so what is evaluated is what is exported. The merged weights are the
ones the server evaluates every round (``federated.evaluation``): ``W = W0 + base_delta +
eval_delta`` of the run's last checkpoint, ``eval_delta`` as the run's strategy defines it
(FedIT: ``scaling * B @ A``; FLoRA: the stacked product; ...). The base is the run's
``model.name`` (a pruned checkpoint directory included: its plan stays attached, so the merged
model saves and exports like the pruned one), with no LoRA modules left in it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch


def run_global_delta(run_dir: str | os.PathLike, model_config=None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(delta, info)``: the dense update ``base_delta + eval_delta`` of the run's last checkpoint,
    keyed like ``SharedBaseModel.modules`` (``layers.{i}.{module path}``), and
    ``{"run_dir", "round", "strategy", "config"}``. ``model_config`` (the base's) binds the strategy;
    when None the run's base model config is read."""
    from .evaluation import merged_delta
    from .runtime.run_state import CHECKPOINT, load_plain, stored_config
    from .runtime.server import build_strategy
    from .strategies import GlobalModel

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(f"--lora {run_dir}: no {CHECKPOINT} there (not a federated run directory, or the "
                                "run has not finished its first round)")
    cfg = stored_config(run_dir)
    state = load_plain(run_dir / CHECKPOINT, f"the run checkpoint {run_dir / CHECKPOINT}")
    if model_config is None:
        from ..models.loading import load_model_config

        model_config = None if cfg.model.name == "tiny-llama" else load_model_config(cfg.model.name)
    strategy = build_strategy(cfg, model_config)
    global_ = GlobalModel(state["tensors"], state["base_delta"], state["meta"])
    delta = merged_delta(global_.base_delta, strategy.eval_delta(global_))
    info = {"run_dir": str(run_dir), "round": int(state["round"]), "strategy": cfg.federation.strategy,
            "config": cfg}
    return delta, info


def apply_delta(model, delta: Mapping[str, torch.Tensor]) -> None:
    """``W += delta[key]`` in place for every ``layers.{i}.{module path}`` key of ``delta``."""
    from ..adapters import get_adapter

    layers = get_adapter(model).layers
    with torch.no_grad():
        for key, d in delta.items():
            _, i, path = key.split(".", 2)
            weight = layers[int(i)].get_submodule(path).weight
            if tuple(d.shape) != tuple(weight.shape):
                raise ValueError(f"the run's update for {key} has shape {tuple(d.shape)}, but the base model's weight "
                                 f"is {tuple(weight.shape)}: the run was trained on another base model")
            weight.add_(d.to(weight.dtype).to(weight.device))


def load_merged_run(run_dir: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer, info)``: the run's base model (``model.name`` / ``model.tokenizer`` of its
    config) with its global LoRA merged into the weights; ``info`` as in :func:`run_global_delta`."""
    from .runtime.run_state import stored_config
    from .runtime.simulation import load_base

    cfg = stored_config(Path(run_dir))
    cfg.model.dtype = dtype
    cfg.model.device = "cpu"  # merged on the CPU (where the stored delta is), then moved to ``device``
    model, tokenizer = load_base(cfg)
    delta, info = run_global_delta(run_dir, model.config)
    apply_delta(model, delta)
    from ..models.device import resolve_device

    model.to(resolve_device(device))
    model.eval()
    model._fedprune_spec = f"{cfg.model.name}+lora:{run_dir}"
    return model, tokenizer, info
