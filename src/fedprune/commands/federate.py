"""``fedprune federate``: federated LoRA fine-tuning, in-process (the default runtime).

    fedprune federate --config configs/federated/fedit.yaml train.local_steps=5 --output runs/fedit
    fedprune federate --resume runs/fedit            # continue after an interruption
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
    from ..federated.simulation import run_federated

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume:
        run_dir = Path(args.resume)
        if args.output and Path(args.output) != run_dir:
            raise ValueError("--resume continues a run in place; drop --output or give the same directory")
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} not found: {run_dir} is not a fedprune run directory")
        # overrides may extend a run (federation.rounds=10); the resolved config is rewritten
        cfg = load_config(cfg_path, args.overrides)
        from .. import atomic
        from ..federated.config import dump_config

        atomic.write_text(cfg_path, dump_config(cfg))
        run_federated(cfg, run_dir, resume=True)
    else:
        if not args.config and not args.overrides:
            raise ValueError("give --config configs/federated/<name>.yaml (and/or overrides), or --resume RUN_DIR")
        if not args.output:
            raise ValueError("give --output RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        run_federated(cfg, args.output)
    print(f"run directory: {args.resume or args.output}  (summarise with: fedprune report {args.resume or args.output})")
    return 0
