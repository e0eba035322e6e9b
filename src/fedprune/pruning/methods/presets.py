"""``-o preset=...``: the peers' structure rules and calibration sizes, the project's or their
official code's.

``project`` (the default) is the project's version of a peer: every method hits the requested
ratio of *all* parameters, so peers are compared at equal size. ``official`` follows the
peer's own repository (structure rules and the calibration sizes its scripts use), so a
comparison with COMP is against a peer as strong as its authors ran it; its achieved ratio
can differ from the request and is reported as measured, never rebalanced.

A method's options class takes ``preset`` and says its official calibration sizes in
``OFFICIAL_CALIBRATION``; :func:`calibration_sizes` fills in what the user did not give.
"""
from __future__ import annotations

from typing import Any

PRESETS = ("project", "official")
"""known preset names"""

DEFAULT_CALIBRATION = {"nsamples": 128, "seq_len": 512}
"""calibration sizes when neither the user nor a preset gives them"""


def check_preset(preset: Any) -> str:
    """``preset`` if known; otherwise a ValueError naming it and the known ones."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not known; known presets: {', '.join(PRESETS)}")
    return preset


def preset_calibration(options: Any) -> dict[str, int]:
    """The calibration sizes ``options``' preset asks for (``{}``: none, the defaults apply)."""
    if getattr(options, "preset", "project") == "official":
        return dict(getattr(type(options), "OFFICIAL_CALIBRATION", {}))
    return {}


def calibration_sizes(options: Any, nsamples: int | None, seq_len: int | None) -> tuple[int, int]:
    """``(nsamples, seq_len)``: what the user gave, else the preset's, else 128 / 512."""
    sizes = {**DEFAULT_CALIBRATION, **preset_calibration(options)}
    return (sizes["nsamples"] if nsamples is None else nsamples,
            sizes["seq_len"] if seq_len is None else seq_len)
