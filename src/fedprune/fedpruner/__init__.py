"""FedPruner's algorithmic cores: layer similarity (CKA), contiguous partitions, importance-aware
layer / sub-block selection, the device memory model and K-layer submodel execution."""
from __future__ import annotations
