"""Federated LoRA fine-tuning on heterogeneous (simulated or real) devices, by role:

- :mod:`.strategies`   the ``Strategy`` contract and the registered strategies (one module per family)
- :mod:`.runtime`      the in-process simulator and the Flower app, the server steps they share,
                       update validation and the run directory's state
- :mod:`.local`        the device side: task/result and the one local LoRA training loop

Library pieces both use (and ``fedspine/`` / ``fedpruner/`` too):

- :mod:`.aggregators`  pure aggregation maths (FedIT, HetLoRA, FlexLoRA, FLoRA, count-based);
  :mod:`.robust` weight capping, clipping, median / trimmed mean
- :mod:`.lora`         one frozen base shared by all clients, LoRA states swapped in and out
- :mod:`.submodel`     layer subsets and head/channel masks without copying the model
- :mod:`.devices`      device profiles, fleets, simulated time; :mod:`.cost` FLOPs and bytes
- :mod:`.partition`    Dolly-15k partitions, prompts, completion-only labels
- :mod:`.config`       the run configuration; :mod:`.evaluation` held-out loss, Rouge-L, zero-shot;
  :mod:`.report` plots and tables of a run

Heavy modules are not imported here; import them directly.
"""
from __future__ import annotations

__all__ = ["strategies", "runtime", "local", "aggregators", "robust", "lora", "submodel", "devices", "cost", "partition",
           "config", "evaluation", "report"]
