"""Validation at the edge: argparse types, typed option dataclasses and range checks.

Everything a user types (a CLI flag, a ``-o key=value`` method option, a YAML config key)
is checked here before any model is loaded, and a refusal names the option, the value
and what is allowed. A 2.5 where an integer is expected is refused rather than rounded,
and an unknown option is refused by name with the known ones listed, instead of being
swallowed or surfacing as a ``TypeError`` after minutes of work.

This module imports nothing heavy (no torch), so ``fedprune --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Callable, Iterable, Mapping

# ---- range checks (used by dataclass __post_init__ and by library entry points) --------


def require_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer{_int_range(minimum, maximum)}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer{_int_range(minimum, maximum)}, got {value}")
    return value


def require_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within the interval, else a ValueError naming ``name``.

    ``low_open``/``high_open``: the bound itself is excluded (``(0, 1)`` for a ratio).
    """
    rng = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number{rng}, got {value!r}")
    v = float(value)
    bad = math.isnan(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        raise ValueError(f"{name} must be a number{rng}, got {value}")
    return v


def _int_range(minimum, maximum) -> str:
    return _interval(minimum, maximum, False, False)


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


# ---- argparse types ------------------------------------------------------------------
# argparse prefixes an ArgumentTypeError with "argument --flag:", so the message names
# the option; it exits with status 2 before the command runs.


def int_at_least(minimum: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (``what`` says why, e.g. 'tokens')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{what}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float within the interval (open ends excluded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a number{_interval(low, high, low_open, high_open)}, got {text!r}") from None
        try:
            return require_number("", value, low, high, low_open, high_open)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).lstrip()) from None

    parse.__name__ = "number"
    return parse


nonnegative_float = float_in(0.0)


def fraction_or_auto(text: str) -> float | str:
    """An argparse type: ``auto`` or a number in [0, 1] (COMP's --layer-fraction)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number in [0, 1], got {value}")
    return value


# ---- typed values from YAML / key=value strings ----------------------------------------


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the annotated type ``hint``, or a ValueError naming ``name``.

    Strings read from the command line or YAML (``"1e-9"``, ``"true"``, ``"5"``) become numbers
    and booleans; an int is accepted where a float is expected, and an integral float (2.0)
    where an int is, but 2.5 where an int is expected is refused, as is a number where a
    bool is expected, and NaN anywhere. Unknown or unresolvable hints leave the value as it is.
    """
    choices = _union_members(hint)
    if choices is None:
        return value
    if value is None:
        if type(None) in choices:
            return None
        raise ValueError(f"{name} must be {_describe(choices)}, got null")
    # exact type matches first ("auto" stays a str for float | str), then conversions
    ordered = [t for t in choices if _is_instance(value, t)] + [t for t in choices if not _is_instance(value, t)]
    for t in ordered:
        try:
            return _convert(name, value, t)
        except _Mismatch:
            continue
    raise ValueError(f"{name} must be {_describe(choices)}, got {value!r}")


class _Mismatch(ValueError):
    """``value`` is not of (and does not convert to) one member of a union: try the next."""


def _union_members(hint: Any) -> tuple | None:
    if hint is Any or hint is None or isinstance(hint, str):
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def _base(t: Any) -> Any:
    return typing.get_origin(t) or t


def _is_sequence(b: Any) -> bool:
    import collections.abc

    return b in (list, tuple, typing.Sequence, collections.abc.Sequence)


def _is_instance(value: Any, t: Any) -> bool:
    b = _base(t)
    if b is bool:
        return isinstance(value, bool)
    if b is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if b is float:
        return isinstance(value, float)
    if _is_sequence(b):
        return isinstance(value, (list, tuple))
    return isinstance(b, type) and isinstance(value, b)


def _number(value: Any) -> int | float:
    """An int or float from a number or a numeric string; bools and others raise _Mismatch."""
    if isinstance(value, bool):
        raise _Mismatch()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                raise _Mismatch() from None
    raise _Mismatch()


def _convert(name: str, value: Any, t: Any) -> Any:
    b = _base(t)
    if b is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _Mismatch()
    if b is int:
        v = _number(value)
        if isinstance(v, float):
            if not v.is_integer():
                raise _Mismatch()
            v = int(v)
        return v
    if b is float:
        v = float(_number(value))
        if math.isnan(v):
            raise _Mismatch()
        return v
    if _is_sequence(b):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch()
        args = typing.get_args(t)
        item = args[0] if args and (b is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else None
        # an element of the wrong type is a plain ValueError naming name[i]: it is not retried
        items = [coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)] if item is not None else list(value)
        return tuple(items) if b is tuple else items
    if isinstance(b, type) and not isinstance(value, b):
        raise _Mismatch()
    return value


def _describe(choices: tuple) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a mapping"}
    names = []
    for t in choices:
        if t is type(None):
            continue
        b = _base(t)
        names.append(words.get(b, "a list" if _is_sequence(b) else getattr(b, "__name__", str(b))))
    s = " or ".join(dict.fromkeys(names))
    return s + (" (or null)" if type(None) in choices else "")


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that does not resolve: leave those values unconverted
        return {}


# ---- option dicts -> dataclasses / keyword arguments --------------------------------


def refuse_unknown(options: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise a ValueError naming every key of ``options`` not in ``known``, and listing ``known``."""
    known = sorted(known)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(known) if known else "none (it takes no options)"
        s = "s" if len(unknown) > 1 else ""
        raise ValueError(f"unknown option{s} {', '.join(map(repr, unknown))} for {what}; known: {listed}")


def build_options(cls: type, options: Mapping[str, Any], what: str, prefix: str = "") -> Any:
    """``cls(**options)`` for an options dataclass, unknown keys refused and values coerced.

    what: says whose options these are (``"pruning method 'comp'"``), for the unknown-key
    error; prefix: prepended to a field's name in value errors (``"federation."``).
    """
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    refuse_unknown(options, fields, what)
    hints = _hints(cls)
    try:
        values = {k: coerce(prefix + k, v, hints.get(k)) for k, v in options.items()}
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}" if not prefix else str(exc)) from None


__all__ = [
    "require_int", "require_number", "int_at_least", "positive_int", "nonnegative_int", "float_in",
    "nonnegative_float", "fraction_or_auto", "coerce", "refuse_unknown", "build_options",
]
