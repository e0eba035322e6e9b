"""``fedprune export``: a (pruned) model directory to a GGUF file for llama.cpp.

``--lora RUN_DIR`` exports a federated run's global model instead: its base model (``model.name``
of the run's config, a pruned checkpoint included) with the run's global LoRA merged into the
weights (``fedprune.federated.merged``, the same merge ``fedprune eval --lora`` evaluates).

``--outtype``: f32, f16, bf16, q8_0 are written directly; q6_k, q5_k_m, q4_k_m, q4_0 by llama.cpp's
own quantizer (needs the ``deploy`` extra). The printed report says how many bits each weight takes
and which weight matrices fell back to another type (``fedprune.deploy.gguf_export.wanted_types``).

``--verify N`` then loads the file in llama.cpp and reports top-1 agreement of the next-token
predictions with the PyTorch model on N WikiText-2 tokens, and the perplexity of both on the first
``--verify-ppl-windows`` WikiText-2 windows of ``--verify-seq-len`` tokens (0 windows: skipped).
"""
from __future__ import annotations

import argparse

from ..deploy.gguf_export import OUTTYPES
from ..models.device import device_option
from ..options import int_at_least, nonnegative_int, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (pruned checkpoints included) or known name")
    p.add_argument("--lora", metavar="RUN_DIR", default=None,
                   help="export a federated run's global model: its base (model.name of RUN_DIR/config.yaml) with the "
                        "run's global LoRA merged (instead of --model)")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    p.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                   help="type of the 2-D weights: f32, f16, bf16, q8_0 written directly; q6_k, q5_k_m, q4_k_m, "
                        "q4_0 by llama.cpp's quantizer (llama-cpp-python, the deploy extra)")
    p.add_argument("--output", required=True, help="GGUF file to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name (default: detected from the tokenizer, e.g. gpt-2, smollm)")
    p.add_argument("--device", default="cpu", type=device_option(),
                   help="cpu, cuda, cuda:N or auto (CUDA when available): where the LoRA merges and --verify's "
                        "PyTorch logits are computed (the weights are written from CPU copies)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="llama.cpp threads for quantizing and --verify (default: all cores)")
    p.add_argument("--verify", type=nonnegative_int, default=0, metavar="N",
                   help="then compare next-token logits with llama.cpp on N tokens of WikiText-2 (top-1 agreement; "
                        "needs llama-cpp-python)")
    p.add_argument("--verify-ppl-windows", type=nonnegative_int, default=8, metavar="W",
                   help="with --verify: also the WikiText-2 perplexity of PyTorch and of llama.cpp on the first W "
                        "windows (0: skip)")
    p.add_argument("--verify-seq-len", type=int_at_least(2), default=256, metavar="L",
                   help="with --verify: tokens per perplexity window")


def ppl_windows(model, tokenizer, count: int, seq_len: int) -> list[list[int]]:
    """The first ``count`` non-overlapping WikiText-2 windows of ``seq_len`` tokens (fedprune.evaluate's)."""
    from ..data import load_text
    from ..evaluate.perplexity import tokenize_text, windows
    from ..models.loading import check_context

    check_context(model.config, seq_len, "--verify-seq-len")
    return windows(tokenize_text(tokenizer, load_text("wikitext2")), seq_len, count).tolist()


def run(args) -> int:
    import json

    from ..deploy import export_gguf
    from ..outputs import check_file_output, model_output_lock

    if args.lora and args.model:
        raise ValueError("give --model or --lora RUN_DIR (which exports the run's own base model), not both")
    if not args.lora and not args.model:
        raise ValueError("give --model MODEL_DIR, or --lora RUN_DIR to export a federated run's merged model")
    out = check_file_output(args.output, args.overwrite, what="--output")  # before any work
    if args.verify:
        from ..deploy.llamacpp import require_llama_cpp

        require_llama_cpp("--verify (running the file in llama.cpp)")
    model = tok = None
    if args.lora:
        from ..federated.merged import load_merged_run

        model, tok, info = load_merged_run(args.lora, device=args.device)
    with model_output_lock(out):
        report = export_gguf(model if model is not None else args.model, args.output, args.outtype, tokenizer=tok,
                             tokenizer_pre=args.tokenizer_pre, n_threads=args.threads)
    if args.lora:
        report["lora"] = {"run_dir": info["run_dir"], "round": info["round"], "strategy": info["strategy"]}
    print(json.dumps(report, indent=2))
    if args.verify:
        from .. import load_model, load_tokenizer
        from ..deploy import verify_gguf
        from ..evaluate.speed import prompt_ids

        if model is None:
            model, tok = load_model(args.model, device=args.device), load_tokenizer(args.model)
        ids = prompt_ids(model, tok, args.verify, 1)[0].tolist()
        wins = ppl_windows(model, tok, args.verify_ppl_windows, args.verify_seq_len) if args.verify_ppl_windows else None
        check = verify_gguf(model, args.output, ids, tokenizer=tok, text=tok.decode(ids), n_threads=args.threads,
                            ppl_windows=wins)
        check = {"outtype": args.outtype, **check}
        if wins is not None:
            check["ppl_seq_len"] = args.verify_seq_len
        print(json.dumps(check, indent=2))
    return 0
