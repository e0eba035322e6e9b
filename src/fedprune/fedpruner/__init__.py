"""FedPruner's algorithmic cores: layer similarity (CKA), contiguous partitions, importance-aware
layer / sub-block selection, the device memory model and K-layer submodel execution.
Pure functions; the federated runtime composes them."""
from __future__ import annotations

from .cka import cka_matrix, layer_outputs, linear_cka
from .memory import (MemoryBreakdown, ModelShape, TrainSetup, block_costs, layer_activation_bytes,
                     max_layers_for_budget, saved_tensor_bytes, training_memory)
from .partition import contiguous_partition, partition_score, segment_score
from .selection import (LAYER_IMPORTANCE, block_units, blocks_to_skip, cosine_importance, device_layer_plan,
                        layer_io, model_loss_closure, select_blocks, select_layers, selection_probs,
                        skip_loss_importance)
from .submodel import only_layers, skip_blocks

__all__ = [
    "cka_matrix", "layer_outputs", "linear_cka", "MemoryBreakdown", "ModelShape", "TrainSetup", "block_costs",
    "layer_activation_bytes", "max_layers_for_budget", "saved_tensor_bytes", "training_memory",
    "contiguous_partition", "partition_score", "segment_score", "LAYER_IMPORTANCE", "block_units",
    "blocks_to_skip", "cosine_importance", "device_layer_plan", "layer_io", "model_loss_closure",
    "select_blocks", "select_layers", "selection_probs", "skip_loss_importance", "only_layers", "skip_blocks",
]
