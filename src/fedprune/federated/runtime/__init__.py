"""The runtimes that drive a strategy: the in-process simulator and the Flower app.

- :mod:`.simulation`  the in-process runtime (one shared base model, checkpoints, resume, faults)
- :mod:`.flower_app`  the same strategies on Flower (``ServerApp`` / ``ClientApp``)
- :mod:`.server`      what both do on the server: build and bind the strategy, plan a round,
                      aggregate it (``robust.aggregate_round``), the per-client seeds
- :mod:`.validation`  malformed client updates rejected before aggregation
- :mod:`.run_state`   a run directory's checkpoint, read safely, and what a resume may change

Heavy modules are not imported here (``flower_app`` needs flwr); import them directly.
"""
