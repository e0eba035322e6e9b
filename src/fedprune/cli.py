"""The ``fedprune`` command line.

Each subcommand is a thin module in ``fedprune.commands`` exposing ``add_arguments(parser)``
and ``run(args)``; ``run`` calls the same public Python function users import, so the CLI
and the API cannot drift apart. Modules are imported only when their command runs, so
``fedprune --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from .extras import MissingExtraError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("fedprune.commands.info", "show a model's architecture, adapter and parameter count"),
    "eval": ("fedprune.commands.eval", "perplexity and zero-shot accuracy (lm-evaluation-harness conventions)"),
    "speed": ("fedprune.commands.speed", "prefill/decode tokens per second and peak memory"),
    "prune": ("fedprune.commands.prune", "post-training structured pruning (COMP and peers)"),
    "federate": ("fedprune.commands.federate", "federated LoRA fine-tuning (FedIT, HetLoRA, FlexLoRA, FLoRA, FedSpine, FedPruner)"),
    "report": ("fedprune.commands.report", "markdown summary and plots of a federated run"),
    "export": ("fedprune.commands.export", "export a (pruned) model to GGUF for llama.cpp"),
    "generate": ("fedprune.commands.generate", "generate text with a model (PyTorch or GGUF)"),
    "chat": ("fedprune.commands.chat", "chat with an instruct model"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, help_)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(mod).add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        rc = importlib.import_module(args._module).run(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, MissingExtraError) as exc:
        # Errors raised by fedprune name the problem (a missing extra: which one to install); show them
        # without a traceback.
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"fedprune {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
