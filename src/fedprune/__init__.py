"""fedprune: make LLMs fit on resource-constrained devices.

Post-training structured pruning (COMP and its peers) and federated LoRA fine-tuning with
pruning (FedSpine, FedPruner), on Hugging Face models.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .models import load_model, load_tokenizer, save_model

__all__ = ["load_model", "load_tokenizer", "save_model", "__version__"]


def __getattr__(name):
    # Heavy entry points are imported lazily so ``import fedprune`` stays quick.
    if name == "prune":
        from .pruning import prune

        return prune
    if name == "evaluate":
        import importlib

        return importlib.import_module(".evaluate", __name__)
    raise AttributeError(name)
