"""What an options dataclass says about its fields, for ``--help``: name, type, default, doc.

The doc of a field is the string literal right after it (an attribute docstring, as
``CompOptions`` writes them) or else the comment at the end of its line, read from the class's
source, so the help text is the code's own and cannot drift from it. Fields of base classes
are documented where they are declared.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import tokenize
from dataclasses import dataclass
from io import StringIO
from typing import Any


@dataclass(frozen=True)
class FieldDoc:
    name: str
    type: str
    default: Any
    doc: str


def _source_docs(cls: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(StringIO(src).readline) if tok.type == tokenize.COMMENT}
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
        elif stmt.end_lineno in comments:
            docs[stmt.target.id] = comments[stmt.end_lineno]
    return docs


def field_docs(cls: type) -> list[FieldDoc]:
    """Every init field of dataclass ``cls``, in declaration order, with its type, default and doc."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a subclass's doc of a redeclared field wins
        if dataclasses.is_dataclass(base):
            docs.update(_source_docs(base))
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(FieldDoc(f.name, type_name, default, docs.get(f.name, "")))
    return out


def describe_options(cls: type, indent: str = "    ", width: int = 100) -> str:
    """Lines ``name (type, default X): doc`` for ``--help`` (``takes no options`` when empty)."""
    fields = field_docs(cls)
    if not fields:
        return indent + "(takes no options)"
    lines = []
    for f in fields:
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        head = f"{f.name} ({f.type}, {default})"
        lines.append(textwrap.fill(f"{head}: {f.doc}" if f.doc else head, width=width, initial_indent=indent,
                                   subsequent_indent=indent + "    "))
    return "\n".join(lines)
