"""Decoder weights streamed one layer at a time (``--weight-offload cpu|disk``), for models larger than memory.

``load_model(spec, weight_offload="disk"|"cpu")`` returns a *skeleton*: the model built from its
config on the meta device (no memory), with the embeddings, final norm, LM head and rotary tables
materialised on the requested device and dtype, and a :class:`LayerStore` attached
(``model._fedprune_weights``) that knows where every decoder layer's weights are:

``disk``  memory-mapped from the model directory's safetensors files (``safe_open``); a layer's
          tensors are read when it is materialised and dropped when it is released, so host
          memory holds about one layer (plus what the caller keeps, e.g. calibration streams).
``cpu``   every layer read into host memory once, at load; the current one is copied to the device.
``none``  not this module: ``load_model`` loads the whole model as before.

Either way each decoder module is on the meta device except while a caller has it materialised
(:meth:`LayerStore.load` .. :meth:`LayerStore.release`, or :meth:`LayerStore.finish` once a pruner
is done with it); the meta placeholders keep the current shapes, so parameter counts and budgets
work without the weights. A finished (pruned) layer is written to the output checkpoint
(:mod:`fedprune.models.stream_checkpoint`) or, without one, kept in host memory; loading it again
gives the pruned version, and :meth:`LayerStore.twin` gives a separate copy of the original one.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_OFFLOAD_CHOICES = ("none", "cpu", "disk")


def check_weight_offload(value: str | None, option: str = "weight_offload") -> str:
    """``value`` if it is one of :data:`WEIGHT_OFFLOAD_CHOICES` (``None`` means ``none``), else a ValueError."""
    if value is None:
        return "none"
    if value not in WEIGHT_OFFLOAD_CHOICES:
        raise ValueError(f"{option} must be one of {', '.join(WEIGHT_OFFLOAD_CHOICES)}, got {value!r}")
    return value


# ---- the files --------------------------------------------------------------------------------
class WeightFiles:
    """The tensors of a directory's ``*.safetensors`` files, by name; only the headers are read here.

    ``prefix`` (the model's ``base_model_prefix``, e.g. ``model``): a checkpoint of the bare base
    model stores names without it, which transformers maps; :meth:`key` does the same.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = ""):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.files = sorted(self.directory.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"weight offload streams the weights from safetensors files, and {self.directory} "
                                    "has none (.bin weights or a hub id cannot be streamed: convert or download "
                                    "the model to a local safetensors directory first)")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for k in fh.keys():
                        self.where[k] = f
                        self.shapes[k] = tuple(fh.get_slice(k).get_shape())
            except Exception as exc:
                raise ValueError(f"corrupt weights file {f}: {exc}") from None
        self._prefix = prefix + "." if prefix else ""

    def key(self, name: str) -> str | None:
        """The stored name of the model's tensor ``name``, or None when the files lack it."""
        if name in self.where:
            return name
        p = self._prefix
        if p and name.startswith(p) and name[len(p):] in self.where:
            return name[len(p):]
        if p and p + name in self.where:
            return p + name
        return None

    def read(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        """``{local name: tensor}`` for ``{local name: stored name}``: memory-mapped CPU tensors in the
        stored dtype (each file is opened for this read only, so its pages leave the process with them)."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for local, stored in names.items():
            by_file.setdefault(self.where[stored], []).append((local, stored))
        out = {}
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for local, stored in items:
                    out[local] = fh.get_tensor(stored)
        return out

    def fingerprint(self) -> str:
        """A digest of every file's name, size and header (which names, shapes, dtypes and offsets): a resumed
        prune refuses weights that changed, without reading them."""
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(f.name.encode() + f.stat().st_size.to_bytes(8, "little") + fh.read(n))
        return h.hexdigest()


# ---- putting tensors into modules -------------------------------------------------------------
def _set_tensor(root: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put ``t`` at ``name`` (a parameter, or a buffer) of ``root``; a parameter slot that holds None
    (a bias the architecture lacks, added by pruning) takes it as a parameter."""
    path, _, leaf = name.rpartition(".")
    mod = root.get_submodule(path) if path else root
    if leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)


def _to_meta(module: nn.Module) -> None:
    """Every parameter and buffer of ``module`` replaced by a meta tensor of the same shape and dtype."""
    for mod in module.modules():
        for k, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                  requires_grad=False)
        for k, b in mod._buffers.items():
            if b is not None and not b.is_meta:
                mod._buffers[k] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def _has_weights(module: nn.Module) -> bool:
    return any(not t.is_meta for t in [*module.parameters(), *module.buffers()])


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


class LayerStore:
    """Where a skeleton's decoder layers live, and their materialisation one at a time (module docstring).

    Layers are known by module identity (their position in the model at load is their *source
    index*: the name their weights have in the files), so a layer removed from the model by a
    pruner can still be materialised, e.g. to advance a dense calibration stream through it.
    """

    def __init__(self, model: nn.Module, files: WeightFiles, mode: str, device: torch.device, dtype: torch.dtype):
        from ..adapters import get_adapter

        if mode not in ("cpu", "disk"):
            raise ValueError(f"a layer store streams with weight_offload 'cpu' or 'disk', not {mode!r}")
        self.model, self.files, self.mode, self.device, self.dtype = model, files, mode, device, dtype
        adapter = get_adapter(model)
        self.layers: list[nn.Module] = list(adapter.layers)  # strong references keep the ids valid
        self._src = {id(layer): i for i, layer in enumerate(self.layers)}
        self.prefix = next(name for name, m in model.named_modules() if m is adapter.layers)
        self._pristine = [copy.deepcopy(layer) for layer in self.layers]  # meta: no memory
        self._source_names = [self._stored_names(i, layer) for i, layer in enumerate(self.layers)]
        self._depth: dict[int, int] = {}
        self._ram: dict[int, dict[str, torch.Tensor]] = {}
        self._done: dict[int, dict[str, Any]] = {}  # finished layers, without a checkpoint
        self.checkpoint = None  # a stream_checkpoint.StreamCheckpoint, attached by begin()
        self.finished_hooks: list = []
        if mode == "cpu":
            for i in range(len(self.layers)):  # every layer in host memory, in the model's dtype
                self._ram[i] = {k: t.to(dtype=dtype, copy=True) if t.is_floating_point() else t.clone()
                                for k, t in self._read_source(i).items()}

    # ---- names and sources ----------------------------------------------------------------
    def _stored_names(self, i: int, layer: nn.Module) -> dict[str, str]:
        names, missing, wrong = {}, [], []
        for local, t in layer.state_dict(keep_vars=True).items():
            full = f"{self.prefix}.{i}.{local}"
            stored = self.files.key(full)
            if stored is None:
                missing.append(full)
            elif self.files.shapes[stored] != tuple(t.shape):
                wrong.append(f"{full} {self.files.shapes[stored]} vs {tuple(t.shape)}")
            names[local] = stored
        if missing or wrong:
            what = ([f"{len(missing)} tensors are absent (e.g. {missing[0]})"] if missing else []) + \
                   ([f"{len(wrong)} have other shapes than the model's config says (e.g. {wrong[0]})"] if wrong else [])
            raise ValueError(f"the weights in {self.files.directory} do not match the model built from its config: "
                             f"{'; '.join(what)}")
        return names

    def source_index(self, layer: nn.Module) -> int:
        try:
            return self._src[id(layer)]
        except KeyError:
            raise ValueError("this module is not one of the streamed model's decoder layers") from None

    def _read_source(self, i: int) -> dict[str, torch.Tensor]:
        return self.files.read(self._source_names[i])

    def _source(self, i: int) -> dict[str, torch.Tensor]:
        return self._ram[i] if i in self._ram else self._read_source(i)

    def is_finished(self, layer: nn.Module) -> bool:
        i = self.source_index(layer)
        return i in self._done or (self.checkpoint is not None and i in self.checkpoint.finished)

    def _finished_tensors(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._done:
            return self._done[i]["tensors"]
        return self.checkpoint.layer_tensors(i, self.prefix)

    # ---- materialise / release ---------------------------------------------------------------
    def _assign(self, layer: nn.Module, tensors: dict[str, torch.Tensor], copy_: bool,
                device: torch.device | None = None) -> None:
        """Put ``tensors`` (local names) into ``layer`` on the device (or ``device``) and dtype, and bring
        the module attributes that follow the shapes (features, head counts, FFN width) in step."""
        from ..adapters import get_adapter

        ad = get_adapter(self.model)
        for name, t in tensors.items():
            if t.is_floating_point() and not t.is_meta:
                t = t.to(device=device or self.device, dtype=self.dtype, copy=copy_)
            _set_tensor(layer, name, t)
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                mod.out_features, mod.in_features = mod.weight.shape
        ad._set_head_counts(layer, ad.num_heads(layer), ad.num_kv_heads(layer))
        ad._set_ffn_width(layer, ad.intermediate_size(layer))

    def load(self, layer: nn.Module) -> nn.Module:
        """Materialise ``layer`` (its pruned version once finished) on the device; nested loads count."""
        i = self.source_index(layer)
        if self._depth.get(i, 0) == 0:
            tensors = self._finished_tensors(i) if self.is_finished(layer) else self._source(i)
            # a copy whenever the tensors would otherwise be the store's own (cpu mode, the CPU
            # device, same dtype): surgery and mask tuning change the layer in place
            self._assign(layer, tensors, copy_=self.mode == "cpu" or i in self._done)
            left = [n for n, t in layer.state_dict(keep_vars=True).items() if t.is_meta]
            if left:
                raise ValueError(f"decoder layer {i}: {left[:3]} are not in the weights (non-persistent buffers "
                                 "of a decoder layer cannot be streamed)")
        self._depth[i] = self._depth.get(i, 0) + 1
        return layer

    def release(self, layer: nn.Module) -> None:
        """Back to the meta device (the weights stay where the store keeps them). A layer whose shapes a
        pruner changed must be :meth:`finish` ed instead: released, the change would be lost."""
        i = self.source_index(layer)
        depth = self._depth.get(i, 0)
        if depth == 0:
            return
        self._depth[i] = depth - 1
        if depth > 1:
            return
        if not self.is_finished(layer):
            expected = {k: self.files.shapes[s] for k, s in self._source_names[i].items()}
            if _shapes(layer) != expected:
                raise RuntimeError(f"decoder layer {i} was pruned but released unfinished: its changes would be "
                                   "lost (a streaming pruner must finish every layer it changes)")
        _to_meta(layer)

    def twin(self, layer: nn.Module) -> nn.Module:
        """A separate module holding ``layer``'s original (unpruned) weights on the device (dropped by the caller)."""
        i = self.source_index(layer)
        twin = copy.deepcopy(self._pristine[i])
        self._assign(twin, self._source(i), copy_=self.mode == "cpu")
        return twin

    def finish(self, layer: nn.Module, position: int, entry: dict[str, Any] | None = None,
               plan: dict[str, Any] | None = None) -> None:
        """``layer`` (materialised, at ``position`` in the pruned model) is final: write it to the
        checkpoint (or keep it in host memory without one) and release it."""
        i = self.source_index(layer)
        if self._depth.get(i, 0) == 0:
            raise RuntimeError(f"decoder layer {i} is finished without being loaded")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        if self.checkpoint is not None:
            self.checkpoint.write_layer(i, position, {f"{self.prefix}.{position}.{k}": v for k, v in tensors.items()},
                                        entry, plan)
        else:
            self._done[i] = {"tensors": tensors, "position": position, "entry": entry, "plan": plan}
        self._ram.pop(i, None)  # cpu mode: the original is not needed again in this process
        for hook in list(self.finished_hooks):  # ``hook(source index, position)``, the layer still loaded
            hook(i, position)
        self._depth[i] = 1
        self.release(layer)

    def resumed(self, layer: nn.Module) -> dict[str, Any] | None:
        """For a layer a previous, interrupted run finished: its record (``position``, ``entry``, ``plan``),
        with the meta placeholders set to the saved shapes; None for any other layer."""
        i = self.source_index(layer)
        if self.checkpoint is None or i not in self.checkpoint.finished:
            return None
        shapes = self.checkpoint.layer_shapes(i, self.prefix)
        self._assign(layer, {k: torch.empty(s, dtype=self.dtype, device="meta") for k, s in shapes.items()},
                     copy_=False)
        return self.checkpoint.finished[i]

    def loaded(self) -> list[int]:
        """Source indices of the decoder layers materialised now."""
        return [i for i, layer in enumerate(self.layers) if _has_weights(layer)]

    def materialise_finished(self, layers: list[nn.Module]) -> None:
        """Without a checkpoint, at the end: every layer of ``layers`` loaded for good (the pruned
        model, whole, in memory; on the CPU in ``cpu`` mode)."""
        for layer in layers:
            i = self.source_index(layer)
            tensors = self._finished_tensors(i) if self.is_finished(layer) else self._source(i)
            self._assign(layer, tensors, copy_=False, device=torch.device("cpu") if self.mode == "cpu" else None)
        self._done.clear()
        self._ram.clear()


# ---- the skeleton -----------------------------------------------------------------------------
def _materialise_rest(model: nn.Module, store: LayerStore, config) -> None:
    """Embeddings, norms, head (from the files) and non-persistent buffers (rebuilt) outside the layers."""
    prefix = store.prefix + "."
    names, missing = {}, []
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out_emb = model.get_output_embeddings()
    head_names = {n for n, p in model.named_parameters(remove_duplicate=False)
                  if out_emb is not None and p is out_emb.weight}
    for name in model.state_dict(keep_vars=True):
        if name.startswith(prefix):
            continue
        stored = store.files.key(name)
        if stored is None:
            if not (tied and name in head_names):
                missing.append(name)
            continue
        names[name] = stored
    state = model.state_dict(keep_vars=True)
    wrong = [f"{n} {store.files.shapes[s]} vs {tuple(state[n].shape)}" for n, s in names.items()
             if store.files.shapes[s] != tuple(state[n].shape)]
    if missing or wrong:
        what = ([f"they lack {missing[:3]}"] if missing else []) + \
               ([f"{len(wrong)} tensors have other shapes than its config says (e.g. {wrong[0]})"] if wrong else [])
        raise ValueError(f"the weights in {store.files.directory} do not match the model built from its config: "
                         f"{'; '.join(what)}")
    for name, t in store.files.read(names).items():
        if t.is_floating_point():  # no copy when none is needed: a memory-mapped tensor is resident only
            t = t.to(device=store.device, dtype=store.dtype)  # where it is read (embedding rows in use)
        _set_tensor(model, name, t)
    if tied:
        model.tie_weights()
    for mname, mod in model.named_modules():
        if mname.startswith(prefix) or mname == store.prefix:
            continue
        if any(b is not None and b.is_meta for b in mod._buffers.values()):
            if hasattr(mod, "rope_init_fn") or "rotary" in mname:  # computed on the CPU, as from_pretrained does
                fresh = type(mod)(config=config)
                for bname, buf in fresh.named_buffers(recurse=False):
                    mod._buffers[bname] = buf.to(store.device)
            else:
                raise ValueError(f"cannot stream a model whose module {mname} has buffers that are not in its weights")


def load_streamed(where: Path, dtype: torch.dtype, device: torch.device, mode: str, spec: str):
    """The skeleton of the model in directory ``where`` with its :class:`LayerStore` (module docstring).

    A fedprune checkpoint (``plan.json``) is rebuilt to its planned shapes first, on the meta device.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ..adapters import ADAPTERS, PrunePlan, get_adapter
    from .checkpoint import PLAN_FILE
    from .loading import load_model_config, read_json_file

    config = load_model_config(where)
    if config.model_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {config.model_type!r} in {spec}; supported: "
                         f"{', '.join(ADAPTERS.names())}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (where / PLAN_FILE).exists():
        record = read_json_file(where / PLAN_FILE, "plan file")
        try:
            plan = PrunePlan.from_dict(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"corrupt plan file {where / PLAN_FILE}: {type(exc).__name__}: {exc}") from exc
        if record.get("hf_loadable"):
            model._fedprune_plan = plan
        else:
            get_adapter(model).apply_plan_shapes(plan)
    get_adapter(model)  # attaches the plan
    if (where / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(where)
    files = WeightFiles(where, getattr(model, "base_model_prefix", ""))
    store = LayerStore(model, files, mode, device, dtype)
    _materialise_rest(model, store, config)
    model.eval()
    model._fedprune_weights = store
    model._fedprune_spec = spec
    log.info("streaming %d decoder layers of %s (%s offload)", len(store.layers), where, mode)
    return model


def weight_store(model) -> LayerStore | None:
    """The :class:`LayerStore` of a streamed model, None for a model loaded whole."""
    return getattr(model, "_fedprune_weights", None)


__all__ = ["WEIGHT_OFFLOAD_CHOICES", "check_weight_offload", "WeightFiles", "LayerStore", "load_streamed",
           "weight_store"]
