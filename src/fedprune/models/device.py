"""Where a model runs: ``--device cpu|cuda|cuda:N|auto`` (and ``model.device`` in federated configs).

One parser for every command, so a typo or a CUDA request on a machine without CUDA fails the same
way, before any weights load, and names the option, the value and what is allowed. ``auto`` picks
the first CUDA device when there is one, else the CPU.
"""
from __future__ import annotations

import re

import torch

DEVICE_CHOICES = "cpu, cuda, cuda:N (N = 0, 1, ...) or auto"
DTYPE_CHOICES = ["float32", "bfloat16", "float16"]
"""the ``--dtype`` choices of every command (float16 and bfloat16 halve the weights' memory)"""

_SPEC = re.compile(r"^(cpu|auto|cuda)(?::(\d+))?$")


def parse_device_spec(spec: str | torch.device, option: str = "--device") -> tuple[str, int | None]:
    """``(kind, index)`` of ``spec`` (kind cpu, cuda or auto), checking the text only, not the
    machine: a federated config names the device of the machine it will run on."""
    text = str(spec).strip().lower()
    m = _SPEC.match(text)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"{option} {spec!r}: unknown device; choose {DEVICE_CHOICES}")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def resolve_device(spec: str | torch.device | None = "cpu", option: str = "--device") -> torch.device:
    """The ``torch.device`` for ``spec`` (``None`` means the CPU).

    Refused, naming ``option``: an unknown spec, ``cuda`` when ``torch.cuda.is_available()`` is
    False, and ``cuda:N`` beyond the devices present.
    """
    if spec is None:
        return torch.device("cpu")
    kind, index = parse_device_spec(spec, option)
    text = str(spec).strip().lower()
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{option} {text}: no CUDA device is available on this machine "
                         "(torch.cuda.is_available() is False)")
    if index is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{option} {text}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                         f"(cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)


def device_option(option: str = "--device"):
    """An argparse ``type`` that resolves the device as the command line is parsed (so an error
    is an argparse usage error naming the option) but keeps the text the user wrote."""
    import argparse

    def parse(value: str) -> str:
        try:
            resolve_device(value, option)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    parse.__name__ = "device"
    return parse
