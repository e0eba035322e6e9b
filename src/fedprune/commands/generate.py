"""``fedprune generate``: stream a continuation of a prompt (PyTorch, or llama.cpp for a .gguf file)."""
from __future__ import annotations

import argparse

from ..models.device import DTYPE_CHOICES, device_option
from ..options import nonnegative_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model directory, known name, or a .gguf file (llama.cpp)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy")
    p.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads")
    p.add_argument("--device", default="cpu", type=device_option(),
                   help="PyTorch models: cpu, cuda, cuda:N or auto (CUDA when available); a .gguf file runs on "
                        "llama.cpp's CPU build")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="PyTorch models: the weights' dtype")


def run(args) -> int:
    from ..deploy.generation import open_backend

    backend = open_backend(args.model, n_threads=args.threads, device=args.device, dtype=args.dtype)
    print(args.prompt, end="", flush=True)
    backend.complete(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print()
    return 0
