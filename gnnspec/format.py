"""IR -> canonical `.gnn` text, the exact inverse of the parser.

Contract: ``parse(format(s)) == s`` for every valid spec, and ``format`` is idempotent
(``format(parse(format(s))) == format(s)``). Canonical means: keys in SPEC.md order, values
aligned, only values that differ from their defaults, the positional form of ``dropout``, ``act``
and ``norm``, sizes in the largest exact unit, and pipelines longer than :data:`LINE_WIDTH` broken
one stage per line with ``>>`` leading.
"""

from __future__ import annotations

import re
from typing import Any

from gnnspec import ir

LINE_WIDTH = 100
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEYWORDS = {"true", "false", "auto", "none"}
_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
          ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
# Stack arguments first in this order, then the rest in field order.
_LEADING_ARGS = ("op", "depth", "groups", "hidden")


def format_size(n: int) -> str:
    for unit, scale in _UNITS:
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def format_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_scalar(v) for v in value) + "]"
    text = str(value)
    if _IDENTIFIER.match(text) and text not in ("true", "false"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _call(name: str, args: list[str]) -> str:
    return f"{name}({', '.join(args)})" if args else name


def format_op(op: ir.Op) -> str:
    sig = ir.OP_SIGNATURES.get(op.name)
    defaults = {p.name: p.default for p in sig.params} if sig else {}
    args = [f"{k}={format_scalar(v)}" for k, v in op.args if k not in defaults or defaults[k] != v]
    return _call(op.name, args)


def _field_value(node: ir.IRModel, name: str, value: Any) -> str:
    if isinstance(value, ir.Op):
        return format_op(value)
    if isinstance(value, ir.IRModel):
        return format_node(value)
    if isinstance(node, ir.Auto) and name == "budget":
        return format_size(value)
    if value is None:
        return "auto" if isinstance(node, (ir.Checkpoint, ir.Linear)) else "none"
    return format_scalar(value)


def _changed_fields(node: ir.IRModel) -> list[str]:
    fields = [f for f in type(node).model_fields if f not in ("kind", "spans")]
    fields.sort(key=lambda f: _LEADING_ARGS.index(f) if f in _LEADING_ARGS else len(_LEADING_ARGS))
    default = _default_of(type(node))
    return [f for f in fields if getattr(node, f) != getattr(default, f, object())]


def _default_of(model: type[ir.IRModel]) -> ir.IRModel | None:
    fields = model.model_fields
    if "kind" not in fields:
        return None
    kind = fields["kind"].annotation.__args__[0]
    return model(kind=kind)


def format_node(node: ir.IRModel) -> str:
    """A stage or plan: ``name`` alone, or ``name(arg=value, ...)`` with non-default arguments."""
    positional = getattr(type(node), "positional", None)
    args = []
    for name in _changed_fields(node):
        value = _field_value(node, name, getattr(node, name))
        args.append(value if name == positional else f"{name}={value}")
    return _call(node.kind, args)


def format_settings(node: ir.IRModel, always: tuple[str, ...] = ()) -> str:
    """``graph`` / ``train`` as a bare ``name=value, ...`` list (non-default settings only)."""
    default = type(node).model_construct()
    parts = []
    for name in type(node).model_fields:
        if name == "spans":
            continue
        value = getattr(node, name)
        if name in always or value != getattr(default, name, None):
            parts.append(f"{name}={_field_value(node, name, value)}")
    return ", ".join(parts)


def format_pipeline(stages: tuple[Any, ...], indent: int) -> str:
    parts = [format_node(s) for s in stages]
    line = " >> ".join(parts)
    if indent + len(line) <= LINE_WIDTH:
        return line
    return ("\n" + " " * indent + ">> ").join(parts)


def format_spec(spec: ir.Spec) -> str:
    """The canonical `.gnn` text of ``spec``, ending with a newline."""
    values: dict[str, Any] = {}
    defaults = ir.Spec.model_construct()
    for key, field in ir.SPEC_KEYS.items():
        value = getattr(spec, field)
        if key == "model" or value != getattr(defaults, field, None) or (key == "name" and value != "model"):
            values[key] = value
    width = max(len(k) for k in values) + 2
    lines = []
    for key, value in values.items():
        if key == "model":
            text = format_pipeline(value, width)
        elif key == "graph":
            text = format_settings(value, always=("nodes", "edges"))
        elif key == "train":
            text = format_settings(value)
        elif key == "plan":
            text = format_node(value)
        elif key == "name" and value in _KEYWORDS:
            text = f'"{value}"'
        else:
            text = format_scalar(value)
        lines.append(f"{key + ':':<{width}}{text}")
    return "\n".join(lines) + "\n"
