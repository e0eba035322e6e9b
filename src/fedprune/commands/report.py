"""``fedprune report RUN_DIR``: markdown summary and plots of a federated run."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `fedprune federate`")


def run(args) -> int:
    from ..federated.report import write_report

    path = write_report(args.run_dir)
    print(path.read_text())
    print(f"written: {path} and plots next to it")
    return 0
