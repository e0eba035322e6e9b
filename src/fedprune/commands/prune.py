"""``fedprune prune``: post-training structured pruning of a model, saved as a reloadable checkpoint."""
from __future__ import annotations

import argparse

import json

from ..models.device import DTYPE_CHOICES, device_option
from ..options import fraction_or_auto, int_at_least, nonnegative_int, positive_int, require_number


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def methods_help() -> str:
    """Every registered method with its one-line summary and its options (type, default, doc),
    read from the registry and the options dataclasses: the ``--help`` epilog."""
    from ..option_docs import describe_options
    from ..pruning.methods import METHODS

    lines = ["methods and their options (-o KEY=VALUE):"]
    for name, m in METHODS.items():
        lines += ["", f"  {name}: {m.summary}", describe_options(m.options)]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..pruning.criteria.neuron import NEURON_CRITERIA
    from ..pruning.methods import METHODS

    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the epilog's layout
    p.epilog = methods_help()
    p.add_argument("--model", default="smollm2-135m", help="known name, HF directory, .gguf file or hub id")
    # choices from the registry, shown in the metavar; a wrong name is refused by the registry
    # before loading (with the known names), like an unknown -o key
    p.add_argument("--method", default="comp", metavar="{" + ",".join(METHODS.names()) + "}",
                   help="pruning method (listed with their options below; default comp)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of all parameters to remove, in (0, 1)")
    p.add_argument("--calibration", default="c4", help="calibration corpus (c4, wikitext2, ...)")
    p.add_argument("--nsamples", type=positive_int, default=None,
                   help="calibration samples (default: the method's -o preset's, else 128)")
    p.add_argument("--seq-len", type=int_at_least(2), default=None,
                   help="tokens per calibration sample (2 .. the model's context; default: the preset's, else 512)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--data-dir", default=None, help="benchmark data directory (default: $FEDPRUNE_DATA or ../shared/data)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                   help="weights' dtype (statistics accumulate in float32 or float64 whatever it is)")
    p.add_argument("--device", default="cpu", type=device_option(),
                   help="cpu, cuda, cuda:N or auto (CUDA when available): where the model prunes")
    p.add_argument("--weight-offload", default="none", choices=["none", "cpu", "disk"],
                   help="stream the decoder layers one at a time (models larger than memory): 'disk' memory-maps "
                        "them from the safetensors files, 'cpu' holds them in host memory; only the current layer "
                        "is on --device. The output is written layer by layer and a rerun with the same arguments "
                        "resumes an interrupted prune. comp, wanda_sp, flap, shortgpt, magnitude (not COMP's "
                        "layer_metric=sleb or layer_fraction=auto). Distinct from COMP's -o offload= (hidden states)")
    p.add_argument("--layer-fraction", type=fraction_or_auto, default=None,
                   help="COMP: share of the budget removed as whole layers, in [0, 1], or 'auto'")
    p.add_argument("--neuron-metric", default=None, metavar="{" + ",".join(NEURON_CRITERIA.names()) + "}",
                   help="COMP: neuron criterion (default energy)")
    p.add_argument("--no-mask-tuning", action="store_true", help="COMP: skip mask tuning")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (see the list below), e.g. -o head_sparsity=0 -o batch_size=4")
    p.add_argument("--output", required=True, help="directory for the pruned model (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what is at --output (never the current directory, its parents or a home)")


COMP_FLAGS = {"layer_fraction": "--layer-fraction", "neuron_metric": "--neuron-metric",
              "no_mask_tuning": "--no-mask-tuning"}


def options_from_args(args) -> dict:
    """The method options given by the flags and ``-o KEY=VALUE`` (COMP's flags only with COMP)."""
    given = [flag for attr, flag in COMP_FLAGS.items() if getattr(args, attr) not in (None, False)]
    if given and args.method.lower() != "comp":
        raise ValueError(f"{', '.join(given)} {'is a COMP option' if len(given) == 1 else 'are COMP options'}; "
                         f"method {args.method!r} does not take {'it' if len(given) == 1 else 'them'} "
                         "(use -o KEY=VALUE for its own options)")
    opts = {}
    if args.layer_fraction is not None:
        opts["layer_fraction"] = args.layer_fraction
    if args.neuron_metric:
        opts["neuron_metric"] = args.neuron_metric
    if args.no_mask_tuning:
        opts["mask_tuning"] = False
    for item in args.option:
        if "=" not in item:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        opts[k.replace("-", "_")] = _value(v)
    return opts


def check_before_loading(args) -> dict:
    """Everything that can be checked without the weights, so a typo fails in a second, not after
    the model and calibration data load: the method and its options (unknown keys named, with
    the known ones), the calibration corpus, and --seq-len against the context in the model's config."""
    from ..data import get_dataset, is_text_dataset
    from ..data.calibration import calibration_corpus
    from ..data.catalog import check_data_dir
    from ..data.text import text_file
    from ..models.loading import check_context, load_model_config
    from ..pruning import method_options

    require_number("--ratio", args.ratio, 0.0, 1.0, low_open=True, high_open=True)
    opts = options_from_args(args)
    from ..pruning.methods import calibration_sizes

    method_opts = method_options(args.method, opts)
    from ..pruning.methods import METHODS
    from ..pruning.streamed import check_streamable

    check_streamable(args.method, METHODS.get(args.method), method_opts, getattr(args, "weight_offload", "none"))
    args.nsamples, args.seq_len = calibration_sizes(method_opts, args.nsamples, args.seq_len)
    check_data_dir(args.data_dir)
    corpus = calibration_corpus(args.calibration, args.data_dir)
    if corpus.startswith("text:"):
        text_file(corpus)
    elif not is_text_dataset(corpus):
        get_dataset(corpus)  # unknown name: KeyError with the known ones
        raise ValueError(f"--calibration {args.calibration!r} is not a text corpus (e.g. c4, wikitext2, ptb, text:PATH)")
    config = load_model_config(args.model)
    check_context(config, args.seq_len, "--seq-len", str(args.model))
    multiple = getattr(method_opts, "width_multiple", 1)
    if multiple > 1:  # larger than the FFN width: refused before the weights load
        from ..adapters.shape import ModelShape
        from ..pruning.width import check_width

        check_width(multiple, ModelShape.from_config(config).intermediate, str(args.model))
    return opts


def run(args) -> int:
    from .. import load_model, load_tokenizer
    from ..outputs import check_model_output, model_output_lock
    from ..pruning import prune

    opts = check_before_loading(args)  # options, corpus and --seq-len: before loading anything
    check_model_output(args.output, args.overwrite)  # before loading anything
    with model_output_lock(args.output):  # a second prune into the same output fails now, naming this one
        offload = getattr(args, "weight_offload", "none")
        model = load_model(args.model, dtype=args.dtype, device=args.device, weight_offload=offload)
        tok = load_tokenizer(args.model)
        res = prune(model, args.method, args.ratio, tokenizer=tok, calibration=args.calibration,
                    nsamples=args.nsamples, seq_len=args.seq_len, seed=args.seed, data_dir=args.data_dir,
                    output=args.output, overwrite=args.overwrite, weight_offload=offload, **opts)
    s = res.summary()
    print(json.dumps({k: s[k] for k in ("method", "ratio", "achieved_ratio", "params_before", "params_after",
                                         "wall_time_s", "peak_rss_bytes")}, indent=2))
    print(f"saved to {args.output}")
    return 0
