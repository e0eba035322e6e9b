"""A pruned model written layer by layer, resumable after an interruption (``--weight-offload cpu|disk``).

While a streamed prune runs, its output is built in ``.NAME.partial`` next to the output ``NAME``:

- ``layer-SSSSS.safetensors``: decoder layer ``SSSSS`` of the source model (its index in the input's
  files), pruned, its tensors named by its position in the pruned model (``model.layers.P...``);
  each written atomically (a temporary file renamed into place);
- ``state-<name>.pt``: what a method computed before its layer loop (Block Influence, activation
  moments): saved so a resumed run need not compute it again;
- ``progress.json``: the run's arguments, and for every finished layer its position, its report
  entry and its plan (kept heads and channels), rewritten atomically after each layer.

At the end the embeddings/norm/head (``model-rest.safetensors``), ``model.safetensors.index.json``,
``config.json``, ``plan.json`` and the tokenizer are added, the progress and state files removed,
and the directory is swapped in at ``NAME`` in one rename (:func:`fedprune.atomic.swap_directory`,
under the output lock, with the output rules of :mod:`fedprune.outputs`).

An interrupted run (an exception, SIGTERM, SIGKILL, a power cut) leaves ``.NAME.partial``; the same
``prune`` with the same arguments resumes it: the finished layers are not pruned again. The
calibration streams entering the next layer are *recomputed* by running the layers before it (the
finished ones from their saved, pruned weights; for COMP's dense stream, the original ones), which
costs one forward pass over those layers instead of storing ``N x L x d`` states per stream and layer.
Other arguments are refused, naming each difference; delete ``.NAME.partial`` to start afresh.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .. import atomic

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
PROGRESS_FORMAT = "fedprune-stream-progress/1"
INDEX_FILE = "model.safetensors.index.json"
REST_FILE = "model-rest.safetensors"


def partial_dir(output: str | os.PathLike) -> Path:
    """Where the streamed prune of ``output`` is built: the sibling ``.NAME.partial``."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


def _canonical(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples as lists, tensors as numbers), so that a saved and a
    fresh record compare equal."""
    return json.loads(json.dumps(obj, default=atomic._json_default))


def differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: saved vs now`` for every argument that differs (nested dicts by dotted key)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} (interrupted run) vs {b!r} (now)")
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic.atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


class StreamCheckpoint:
    """The partial output of one streamed prune (module docstring). ``arguments``: JSON-able record of
    everything the result depends on; a partial directory of other arguments is refused."""

    def __init__(self, output: str | os.PathLike, arguments: dict[str, Any]):
        from .loading import read_json_file

        self.output = Path(output)
        self.dir = partial_dir(self.output)
        self.arguments = _canonical(arguments)
        self.finished: dict[int, dict[str, Any]] = {}
        self.state: list[str] = []
        self.resumed = False
        progress = self.dir / PROGRESS_FILE
        if progress.exists():
            rec = read_json_file(progress, "progress file")
            if rec.get("format") != PROGRESS_FORMAT:
                raise ValueError(f"{progress}: unknown format {rec.get('format')!r}; delete {self.dir} to start afresh")
            diff = differences(rec.get("arguments", {}), self.arguments)
            if diff:
                raise ValueError(f"{self.dir} holds an interrupted prune into {self.output} with other arguments: "
                                 + "; ".join(diff) + f". Rerun with the same arguments to resume it, or delete "
                                 f"{self.dir} to start afresh")
            self.finished = {int(k): v for k, v in rec["finished"].items()}
            self.state = list(rec.get("state", []))
            self.resumed = True
            if self.finished:
                log.warning("resuming the interrupted prune in %s: %d decoder layers already pruned (the last: "
                            "source layer %d)", self.dir, len(self.finished), rec.get("last_finished_layer"))
        else:
            if self.dir.exists():  # interrupted before its first record: nothing to resume
                log.warning("removing %s: an interrupted prune left it before finishing any layer", self.dir)
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self._write_progress(None)

    # ---- progress ------------------------------------------------------------------------------
    def _write_progress(self, last: int | None) -> None:
        atomic.write_json(self.dir / PROGRESS_FILE, {
            "format": PROGRESS_FORMAT, "output": str(self.output), "arguments": self.arguments,
            "last_finished_layer": last, "state": self.state,
            "finished": {str(k): v for k, v in sorted(self.finished.items())}})

    @staticmethod
    def layer_file(source_index: int) -> str:
        return f"layer-{source_index:05d}.safetensors"

    def write_layer(self, source_index: int, position: int, tensors: dict[str, torch.Tensor],
                    entry: dict[str, Any] | None, plan: dict[str, Any] | None) -> None:
        """Write a finished layer (``tensors`` with their full names) and record it in the progress file."""
        name = self.layer_file(source_index)
        _save_tensors(tensors, self.dir / name)
        self.finished[source_index] = _canonical({"position": position, "entry": entry, "plan": plan, "file": name})
        self._write_progress(source_index)

    def _layer_prefix(self, source_index: int, layers_prefix: str) -> str:
        return f"{layers_prefix}.{self.finished[source_index]['position']}."

    def layer_tensors(self, source_index: int, layers_prefix: str) -> dict[str, torch.Tensor]:
        """A finished layer's tensors by local name (memory-mapped from its file)."""
        from safetensors import safe_open

        p = self._layer_prefix(source_index, layers_prefix)
        with safe_open(str(self.dir / self.layer_file(source_index)), framework="pt") as fh:
            return {k[len(p):]: fh.get_tensor(k) for k in fh.keys()}

    def layer_shapes(self, source_index: int, layers_prefix: str) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        p = self._layer_prefix(source_index, layers_prefix)
        with safe_open(str(self.dir / self.layer_file(source_index)), framework="pt") as fh:
            return {k[len(p):]: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}

    def saved_state(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, saved as ``state-<name>.pt`` the first time; a resumed run loads it instead."""
        path = self.dir / f"state-{name}.pt"
        if name in self.state and path.exists():
            return torch.load(path, weights_only=True)
        value = compute()
        with atomic.atomic_file(path) as tmp:
            torch.save(value, tmp)
        self.state.append(name)
        self._write_progress(max(self.finished) if self.finished else None)
        return value

    # ---- the end -------------------------------------------------------------------------------
    def finalize(self, model, layers_prefix: str, tokenizer=None, extra: dict | None = None,
                 overwrite: bool = False) -> Path:
        """Complete the checkpoint (module docstring) and swap it in at the output; every decoder layer of
        ``model`` must be finished, at its position."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        from ..adapters import get_adapter
        from ..outputs import check_model_output
        from .checkpoint import PLAN_FILE, checkpoint_config
        from .streaming import weight_store

        store = weight_store(model)
        adapter = get_adapter(model)
        weight_map: dict[str, str] = {}
        total = 0
        kept = set()
        for pos, layer in enumerate(adapter.layers):
            src = store.source_index(layer)
            rec = self.finished.get(src)
            if rec is None or rec["position"] != pos:
                raise RuntimeError(f"decoder layer {pos} (source layer {src}) was not written at its position "
                                   f"({'unfinished' if rec is None else 'written at ' + str(rec['position'])})")
            kept.add(src)
            from safetensors import safe_open

            with safe_open(str(self.dir / rec["file"]), framework="pt") as fh:
                for k in fh.keys():
                    weight_map[k] = rec["file"]
                    sl = fh.get_slice(k)
                    total += _nbytes(sl.get_shape(), sl.get_dtype())
        for src in set(self.finished) - kept:  # finished, then removed: not part of the model
            (self.dir / self.finished[src]["file"]).unlink(missing_ok=True)
        prefix = layers_prefix + "."
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
        rest = remove_tied_weights_from_state_dict(rest, model)
        rest = {k: v.detach().to("cpu").contiguous() for k, v in rest.items()}
        _save_tensors(rest, self.dir / REST_FILE)
        for k, v in rest.items():
            weight_map[k] = REST_FILE
            total += v.numel() * v.element_size()
        atomic.write_json(self.dir / INDEX_FILE, {"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))})
        config, record = checkpoint_config(model, extra)
        if not record["hf_loadable"]:
            config = model.config
        config.dtype = str(model.dtype).split(".")[1]  # what save_pretrained writes
        config.architectures = [type(model).__name__]
        config.save_pretrained(self.dir)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.dir)
        atomic.write_json(self.dir / PLAN_FILE, record)
        target = check_model_output(self.output, overwrite)  # refused: the partial output stays resumable
        for name in self.state:
            (self.dir / f"state-{name}.pt").unlink(missing_ok=True)
        (self.dir / PROGRESS_FILE).unlink()
        atomic.swap_directory(self.dir, target)
        return self.output


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(shape, dtype: str) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * _DTYPE_BYTES.get(dtype, 4)


__all__ = ["StreamCheckpoint", "partial_dir", "differences", "PROGRESS_FILE", "INDEX_FILE", "REST_FILE"]
