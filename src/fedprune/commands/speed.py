"""``fedprune speed``: prefill/decode tokens per second, peak memory and parameter bytes."""
from __future__ import annotations

import argparse

from ..models.device import DTYPE_CHOICES, device_option
from ..options import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="known name, HF directory, .gguf file or hub id")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens for the prefill measurement")
    p.add_argument("--gen-len", type=positive_int, default=64,
                   help="tokens generated one by one for the decode measurement")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per step")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs (the median is reported) after one warm-up")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    p.add_argument("--device", default="cpu", type=device_option(),
                   help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--output", default=None, help="write the results JSON here (atomically)")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .. import atomic, load_model, load_tokenizer
    from ..evaluate import speed

    from ..models.loading import check_context, load_model_config

    # prompt and generated tokens must fit the context: checked on the config, before the weights load
    check_context(load_model_config(args.model), args.prompt_len + args.gen_len, "--prompt-len + --gen-len",
                  str(args.model))
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    result = {"model": str(args.model),
              **speed(model, load_tokenizer(args.model), prompt_len=args.prompt_len, gen_len=args.gen_len,
                      batch=args.batch, repeats=args.repeats)}
    t = Table(title=f"{args.model} on {result['device']} ({result['dtype']}, batch {result['batch']})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row(f"prefill tokens/s ({args.prompt_len}-token prompt)", f"{result['prefill_tokens_per_s']:.1f}")
    t.add_row(f"decode tokens/s ({args.gen_len} tokens)", f"{result['decode_tokens_per_s']:.2f}")
    t.add_row(f"peak memory MiB ({result['memory_kind']})", f"{result['peak_memory_bytes'] / 2**20:.1f}")
    t.add_row("parameter MiB", f"{result['parameter_bytes'] / 2**20:.1f}")
    t.add_row("parameters (M)", f"{result['parameters'] / 1e6:.2f}")
    Console().print(t)
    if args.output:
        atomic.write_json(args.output, result)
    return 0
