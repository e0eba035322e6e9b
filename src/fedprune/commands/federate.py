"""``fedprune federate``: federated LoRA fine-tuning, in-process (the default runtime).

    fedprune federate --config configs/federated/fedit.yaml train.local_steps=5 --output runs/fedit
    fedprune federate --resume runs/fedit            # continue after an interruption
    fedprune federate --resume runs/fedit federation.rounds=10   # extend it (rounds and eval.* may change)

One process at a time writes a run directory (a second one is refused, naming the first).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..options import nonnegative_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/federated/*.yaml); not needed with --resume")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="config overrides, e.g. federation.rounds=5 lora.rank=16")
    p.add_argument("--output", help="run directory (config, checkpoint, metrics.jsonl, clients.jsonl)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch intra-op threads (0 = torch default)")


def run(args) -> int:
    import torch

    from ..federated.config import load_config
    from ..federated.runtime.run_state import check_resume
    from ..federated.runtime.simulation import run_federated
    from ..outputs import check_run_output, check_run_to_resume, run_lock

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume:
        run_dir = Path(args.resume)
        if args.output and Path(args.output) != run_dir:
            raise ValueError("--resume continues a run in place; drop --output or give the same directory")
        check_run_to_resume(run_dir)
        with run_lock(run_dir):
            # overrides may extend a run (federation.rounds=10) or change eval.*; anything else is refused,
            # and the checkpoint is validated, before the model is loaded or anything is written
            cfg = load_config(run_dir / "config.yaml", args.overrides)
            check_resume(run_dir, cfg)
            run_federated(cfg, run_dir, resume=True)
    else:
        if not args.config and not args.overrides:
            raise ValueError("give --config configs/federated/<name>.yaml (and/or overrides), or --resume RUN_DIR")
        if not args.output:
            raise ValueError("give --output RUN_DIR")
        check_run_output(args.output)  # a new run needs a missing or empty directory: fail before loading
        cfg = load_config(args.config, args.overrides)
        Path(args.output).mkdir(parents=True, exist_ok=True)
        with run_lock(args.output):
            run_federated(cfg, args.output)
    print(f"run directory: {args.resume or args.output}  (summarise with: fedprune report {args.resume or args.output})")
    return 0
