"""Post-training structured pruning: COMP and its peers, behind one ``prune`` call.

A method (``methods/<name>.py``) is ``run(adapter, calib_ids, ratio, options) -> report``; it
prunes ``adapter.model`` in place and is registered by name with its options dataclass in
:data:`METHODS` (``methods/__init__.py``). Scoring (``criteria``), surgery (the adapters),
recovery (``mask_tuning``, ``bias_compensation``) and orchestration (``methods``) are kept apart.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch

from ..adapters import get_adapter
from ..memory_usage import peak_rss_bytes
from ..models.streaming import weight_store
from . import streamed
from .activations import release_free_memory
from . import width
from .budget import check_ratio
from .methods import METHODS, calibration_sizes

log = logging.getLogger(__name__)

@dataclass
class PruneResult:
    model: Any
    method: str
    ratio: float
    achieved_ratio: float
    params_before: int
    params_after: int
    wall_time_s: float
    peak_rss_bytes: int
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "report")}
        d["report"] = self.report
        return d


def available_methods() -> list[str]:
    return METHODS.names()


def method_options(method: str, options: dict[str, Any]) -> Any:
    """``options`` as ``method``'s options dataclass; an unknown method or option key, or a
    value out of range, raises naming it (and the known ones), before anything is loaded."""
    from ..options import build_options

    return build_options(METHODS.get(method).options, options, f"pruning method {method!r}")


def get_calibration(tokenizer, corpus: str, nsamples: int, seq_len: int, seed: int, data_dir=None) -> torch.Tensor:
    from ..data import calibration_samples

    if tokenizer is None:
        raise ValueError("prune() needs calib_ids or a tokenizer to draw calibration samples")
    return calibration_samples(tokenizer, corpus=corpus, nsamples=nsamples, seq_len=seq_len, seed=seed,
                               data_dir=data_dir)


def prune(model, method: str = "comp", ratio: float = 0.2, *, tokenizer=None, calibration: str = "c4",
          nsamples: int | None = None, seq_len: int | None = None, seed: int = 0, calib_ids: torch.Tensor | None = None,
          data_dir: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
          overwrite: bool = False, weight_offload: str | None = None, **options) -> PruneResult:
    """Prune ``model`` in place with ``method`` to remove ``ratio`` of its parameters.

    Calibration: ``calib_ids`` (``[N, L]`` token ids) if given, else ``nsamples`` windows of
    ``seq_len`` tokens drawn with ``seed`` from ``calibration`` (needs ``tokenizer``); left
    ``None``, they are the method's preset's (``preset="official"``) or else 128 and 512.
    ``options`` go to the method (e.g. ``layer_fraction=0.25, neuron_metric="rescale_obs"`` for COMP).
    If ``output`` is given, the pruned model (and tokenizer) is saved there with its plan; the
    output is checked (and locked against a concurrent writer) before any pruning, and what is
    already there is replaced only with ``overwrite=True`` (rules: :mod:`fedprune.outputs`).

    ``weight_offload`` (``none``, ``cpu``, ``disk``; default: as ``model`` was loaded): stream the
    decoder weights one layer at a time (:mod:`.streamed`); ``model`` is then a model loaded with
    ``load_model(spec, weight_offload=...)`` or a model spec (loaded so, in float32 on the CPU). The
    pruned model is written layer by layer into ``output``, and the same call after an
    interruption resumes from the last finished layer (:mod:`fedprune.models.stream_checkpoint`);
    the returned model's decoder layers are then on the meta device (``load_model(output)`` gives
    the pruned model). Without ``output`` the pruned layers are kept in host memory and the
    returned model holds them.
    """
    ratio = check_ratio(ratio)
    fn = METHODS.get(method)
    opts = method_options(method, options)
    weight_offload = _weight_offload(model, weight_offload)
    streamed.check_streamable(method, fn, opts, weight_offload)  # before loading anything
    if output is None:
        return _prune(_loaded(model, weight_offload), method, fn, opts, ratio, tokenizer, calibration, nsamples,
                      seq_len, seed, calib_ids, data_dir, None, False, options)
    from ..outputs import check_model_output, model_output_lock

    check_model_output(output, overwrite)  # a refused output costs no calibration or pruning
    with model_output_lock(output):
        return _prune(_loaded(model, weight_offload), method, fn, opts, ratio, tokenizer, calibration, nsamples,
                      seq_len, seed, calib_ids, data_dir, output, overwrite, options)


def _weight_offload(model, asked: str | None) -> str:
    """The weight offload of this prune: ``asked``, which must agree with how ``model`` was loaded."""
    from ..models.streaming import check_weight_offload, weight_store

    if isinstance(model, (str, os.PathLike)):
        return check_weight_offload(asked)
    store = weight_store(model)
    loaded = store.mode if store is not None else "none"
    if asked is not None and check_weight_offload(asked) != loaded:
        how = f"load_model(spec, weight_offload={asked!r})" if asked != "none" else "load_model(spec)"
        raise ValueError(f"weight_offload={asked!r}, but the model was loaded with weight_offload={loaded!r}: "
                         f"pass a model from {how}, or the model spec itself")
    return loaded


def _loaded(model, weight_offload: str):
    if isinstance(model, (str, os.PathLike)):
        from ..models.loading import load_model

        return load_model(model, weight_offload=weight_offload)
    return model


def _prune(model, method, fn, opts, ratio, tokenizer, calibration, nsamples, seq_len, seed, calib_ids, data_dir,
           output, overwrite, options) -> PruneResult:
    nsamples, seq_len = calibration_sizes(opts, nsamples, seq_len)
    adapter = get_adapter(model)
    multiple = getattr(opts, width.OPTION, 1)
    if multiple > 1:
        width.check_model(adapter, multiple)  # before calibration: no width a multiple of it
    if calib_ids is None:
        from ..models.loading import check_context

        check_context(model.config, seq_len, "seq_len")
        calib_ids = get_calibration(tokenizer, calibration, nsamples, seq_len, seed, data_dir)
    stream = weight_store(model)
    if stream is not None:  # the resumable partial output (resumed if one of these arguments is there)
        streamed.begin(model, output, streamed.run_arguments(model, method, ratio, opts, calibration, calib_ids,
                                                             seed, stream.mode))
    release_free_memory()  # tokenizing the corpus leaves freed heap behind: not the pruner's memory
    torch.manual_seed(seed)
    before = adapter.num_parameters()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    report = fn.run(adapter, calib_ids, ratio, opts)
    model.train(was_training)
    wall = time.perf_counter() - t0
    after = adapter.num_parameters()
    widths = None
    if multiple > 1:
        widths = width.width_report(adapter, multiple)
        width.warn_unmet(widths, adapter.head_dim)
        if isinstance(report, dict):
            report[width.OPTION] = widths
    achieved = 1.0 - after / before
    peak = peak_rss_bytes()
    log.info("%s: removed %.2f%% of parameters (asked %.2f%%) in %.1fs", method, 100 * achieved, 100 * ratio, wall)
    result = PruneResult(model, method, ratio, achieved, before, after, wall, peak, report)
    if output is None and stream is not None:
        streamed.end(model, None)  # the pruned layers into the model
    if output is not None:
        from ..models import save_model

        extra = {"pruning": {**{k: v for k, v in result.summary().items() if k != "report"},
                             # per-layer units kept and mask-tuning errors (COMP), when reported
                             **({"layer_report": report["layers"]} if isinstance(report, dict)
                                and "layers" in report else {}),
                             # width_multiple: its value and every kept layer's widths
                             **({width.OPTION: widths} if widths is not None else {})},
                 "calibration": {"corpus": calibration,
                                 "nsamples": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1]),
                                 "seed": seed}, "options": {k: str(v) for k, v in options.items()}}
        save = partial(streamed.end, model) if stream is not None else partial(save_model, model)
        save(output, tokenizer=tokenizer, overwrite=overwrite, extra=extra)
    return result


__all__ = ["METHODS", "PruneResult", "prune", "available_methods", "method_options"]
