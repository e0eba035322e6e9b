"""Federated LoRA fine-tuning on heterogeneous (simulated or real) devices.

- :mod:`.aggregators`  pure aggregation maths (FedIT, HetLoRA, FlexLoRA, FLoRA, count-based)
- :mod:`.strategies`   the ``Strategy`` protocol and the registered strategies
- :mod:`.local`        per-client task/result and the local LoRA training loop (rank, layers, masks)
- :mod:`.lora`         one frozen base shared by all clients, LoRA states swapped in and out
- :mod:`.submodel`     layer subsets and head/channel masks without copying the model
- :mod:`.devices`      device profiles, fleets, simulated time; :mod:`.cost` FLOPs and bytes
- :mod:`.partition`    Dolly-15k partitions, prompts, completion-only labels
- :mod:`.simulation`   the in-process runtime (checkpoints, resume, faults)
- :mod:`.flower_app`   the same strategies on Flower (``ServerApp`` / ``ClientApp``)

Heavy modules are not imported here; import them directly.
"""
from __future__ import annotations

__all__ = ["aggregators", "strategies", "local", "lora", "submodel", "devices", "cost", "partition", "simulation",
           "evaluation", "config", "validation", "report", "flower_app"]
