"""``fedprune info``: what a model is, to the adapters."""
from __future__ import annotations

import argparse

from ..models.device import DTYPE_CHOICES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="known name, HF directory, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)


def model_info(model) -> dict:
    from ..adapters import get_adapter

    ad = get_adapter(model)
    return {
        "model_type": model.config.model_type,
        "adapter": type(ad).__name__,
        "num_layers": ad.num_layers,
        "hidden_size": ad.hidden_size,
        "head_dim": ad.head_dim,
        "parameters": ad.num_parameters(),
        "layers": [
            {"heads": ad.num_heads(l), "kv_heads": ad.num_kv_heads(l), "ffn": ad.intermediate_size(l)}
            for l in ad.layers
        ],
    }


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .. import load_model

    info = model_info(load_model(args.model, dtype=args.dtype))
    t = Table(title=f"{args.model}: {info['model_type']} via {info['adapter']}, {info['parameters']/1e6:.1f}M parameters")
    for col in ("layer", "heads", "kv heads", "ffn width"):
        t.add_column(col, justify="right")
    for i, l in enumerate(info["layers"]):
        t.add_row(str(i), str(l["heads"]), str(l["kv_heads"]), str(l["ffn"]))
    Console().print(t)
    return 0
