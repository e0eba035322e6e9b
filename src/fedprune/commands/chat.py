"""``fedprune chat``: a minimal chat REPL for instruct models (chat template applied); EOF (Ctrl-D) exits."""
from __future__ import annotations

import argparse
import sys

from ..options import nonnegative_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model directory, known name, or a .gguf file (llama.cpp)")
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy")
    p.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads")


def run(args) -> int:
    from ..deploy.generation import open_backend

    backend = open_backend(args.model, n_threads=args.threads)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        line = line.strip()
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = backend.chat(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})
    return 0
