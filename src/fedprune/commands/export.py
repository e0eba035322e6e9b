"""``fedprune export``: a (pruned) model directory to a GGUF file for llama.cpp."""
from __future__ import annotations

import argparse

from ..options import nonnegative_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (pruned checkpoints included) or known name")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    p.add_argument("--outtype", default="f16", choices=["f16", "q8_0", "f32"], help="type of the 2-D weights")
    p.add_argument("--output", required=True, help="GGUF file to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name (default: detected from the tokenizer, e.g. gpt-2, smollm)")
    p.add_argument("--verify", type=nonnegative_int, default=0, metavar="N",
                   help="then compare next-token logits with llama.cpp on N tokens of WikiText-2 (needs llama-cpp-python)")


def run(args) -> int:
    import json

    from ..deploy import export_gguf
    from ..outputs import check_file_output, output_lock

    out = check_file_output(args.output, args.overwrite, what="--output")  # before any work
    with output_lock(out.with_name(f".{out.name}.lock"), f"the GGUF file {out}"):
        report = export_gguf(args.model, args.output, args.outtype, tokenizer_pre=args.tokenizer_pre)
    print(json.dumps(report, indent=2))
    if args.verify:
        from .. import load_model, load_tokenizer
        from ..deploy import verify_gguf
        from ..evaluate.speed import prompt_ids

        model, tok = load_model(args.model), load_tokenizer(args.model)
        ids = prompt_ids(model, tok, args.verify, 1)[0].tolist()
        check = verify_gguf(model, args.output, ids, tokenizer=tok, text=tok.decode(ids))
        print(json.dumps(check, indent=2))
    return 0
