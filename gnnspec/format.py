"""IR -> canonical `.gnn` text, the exact inverse of the parser.

Contract: ``parse(format(s)) == s`` for every valid spec, and ``format`` is idempotent
(``format(parse(format(s))) == format(s)``). Canonical means: keys in SPEC.md order, values
aligned, only values that differ from their defaults, the positional form of ``dropout``, ``act``
and ``norm``, sizes in the largest exact unit, and pipelines longer than :data:`LINE_WIDTH` broken
one stage per line with ``>>`` leading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from gnnspec import ir

LINE_WIDTH = 100
# binary units first: on a tie in quotient the binary one is written
_UNITS = tuple(sorted(((u, b) for u, b in ir.SIZE_UNITS.items() if u != "B"), key=lambda ub: (not ub[0].endswith("iB"), -ub[1])))
# Stack arguments first in this order, then the rest in field order.
_LEADING_ARGS = ("op", "depth", "groups", "hidden")


def format_size(n: int) -> str:
    """``n`` bytes in the unit that divides it exactly with the smallest quotient (binary on ties)."""
    exact = [(n // scale, unit) for unit, scale in _UNITS if n >= scale and n % scale == 0]
    quotient, unit = min(exact, key=lambda q: q[0], default=(n, "B"))
    return f"{quotient}{unit}"


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
    if ir.SPEC_NAME.match(text) and text not in ("true", "false"):
        return text
    return quote_string(text)


def quote_string(text: str) -> str:
    r"""A string literal the grammar reads back as ``text``: ``\\``, ``\"``, ``\n``, ``\t``,
    ``\r``, and ``\uXXXX`` (``\UXXXXXXXX`` beyond the 16-bit plane) for other characters that are
    not printable."""
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif not char.isprintable():
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


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


@dataclass(frozen=True)
class SourceComment:
    line: int
    text: str
    standalone: bool


@dataclass(frozen=True)
class SourceEntry:
    key: str
    start_line: int
    end_line: int


@dataclass
class Layout:
    """Comments and blank lines to keep around each entry: ``""`` in ``leading`` is a blank line."""

    leading: dict[str, list[str]] = field(default_factory=dict)
    trailing: dict[str, list[str]] = field(default_factory=dict)
    blank_before: set[str] = field(default_factory=set)
    footer: list[str] = field(default_factory=list)


def attach_comments(comments: list[SourceComment], entries: list[SourceEntry], blanks: set[int]) -> Layout:
    """Attach each comment to its entry: trailing ones to the entry on their line, standalone ones
    to the entry they precede (or sit inside), the rest to the footer. Runs of blank lines that
    separate items become one blank line."""
    layout = Layout()
    entries = sorted(entries, key=lambda e: e.start_line)
    for comment in comments:
        # the innermost entry holding the line: a mapping's setting before the mapping
        holding = [e for e in entries if e.start_line <= comment.line <= e.end_line]
        inside = min(holding, key=lambda e: e.end_line - e.start_line) if holding else None
        if not comment.standalone and inside is not None:
            layout.trailing.setdefault(inside.key, []).append(comment.text)
            continue
        # a standalone comment goes with what follows it: inside an entry, its next setting (a YAML
        # mapping's), else the entry itself; between entries, the next one
        if inside is not None:
            owner = next((e for e in entries if e.start_line > comment.line and e.end_line <= inside.end_line), inside)
        else:
            owner = next((e for e in entries if e.start_line > comment.line), None)
        lines = layout.leading.setdefault(owner.key, []) if owner else layout.footer
        if comment.line - 1 in blanks:
            lines.append("")
        lines.append(comment.text)
    for entry in entries:
        if entry.start_line - 1 in blanks:
            layout.blank_before.add(entry.key)
    return layout


def _entry_text(key: str, value: Any, width: int) -> str:
    if key == "model":
        return format_pipeline(value, width)
    if key == "graph":
        return format_settings(value, always=("nodes", "edges"))
    if key == "train":
        return format_settings(value)
    if key == "plan":
        return format_node(value)
    if key == "name" and value in ir.SPEC_WORDS:
        return f'"{value}"'
    return format_scalar(value)


def _yaml_entry(key: str, value: Any) -> str:
    if key in ("graph", "train"):
        always = ("nodes", "edges") if key == "graph" else ()
        default = type(value).model_construct()
        data = {
            name: _yaml_scalar(getattr(value, name))
            for name in type(value).model_fields
            if name != "spans" and (name in always or getattr(value, name) != getattr(default, name, None))
        }
        payload: Any = data
    elif isinstance(value, int) and not isinstance(value, bool):
        payload = value
    elif key == "model":
        payload = " >> ".join(format_node(stage) for stage in value)
    else:
        payload = _entry_text(key, value, LINE_WIDTH)
    return yaml.safe_dump({key: payload}, sort_keys=False, width=10**9, default_flow_style=False).rstrip("\n")


def _with_setting_comments(text: str, key: str, layout: Layout) -> str:
    """A YAML ``graph``/``train`` mapping's lines with each setting's comments (``key.name`` in
    ``layout``) before and after its line; those of settings not printed (at their defaults) go to
    the mapping's own line."""
    lines = text.split("\n")
    printed = set()
    for i in range(len(lines) - 1, 0, -1):
        name = lines[i].strip().split(":", 1)[0]
        printed.add(name)
        trailing = layout.trailing.get(f"{key}.{name}")
        if trailing:
            lines[i] += "  " + " ".join(trailing)
        lines[i:i] = ["  " + c if c else c for c in layout.leading.get(f"{key}.{name}", [])]
    unprinted = _taken_setting_comments(layout, key, printed)
    if unprinted:
        layout.trailing.setdefault(key, []).extend(unprinted)
    return "\n".join(lines)


def _taken_setting_comments(layout: Layout, key: str, printed: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The comments (leading, then trailing) of each setting ``key.name`` of ``layout`` whose name
    is not in ``printed``, taken out of ``layout``."""
    prefix = f"{key}."
    settings = dict.fromkeys(k for k in (*layout.leading, *layout.trailing)
                             if k.startswith(prefix) and k[len(prefix):] not in printed)
    return [c for k in settings for c in (*layout.leading.pop(k, []), *layout.trailing.pop(k, [])) if c]


def _yaml_scalar(value: Any) -> Any:
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float)):
        return value
    return format_scalar(value)


def _keeps_name(spec: ir.Spec) -> bool:
    """Whether the text keeps ``name:``: where it was written (a file's name otherwise defaults to
    its stem, so even ``name: model`` matters) or differs from the default ``model``."""
    return spec.name != "model" or spec.spans.exact("name") is not None


def format_spec(spec: ir.Spec, layout: Layout | None = None, *, style: str = "gnn") -> str:
    """The canonical text of ``spec`` (``style`` "gnn" or "yaml"), ending with a newline.

    With a ``layout`` (from the source text), comments and separating blank lines are kept.
    """
    layout = layout or Layout()
    values: dict[str, Any] = {}
    defaults = ir.Spec.model_construct()
    for key, attr in ir.SPEC_KEYS.items():
        value = getattr(spec, attr)
        if key == "model" or value != getattr(defaults, attr, None) or (key == "name" and _keeps_name(spec)):
            values[key] = value
    width = max(len(k) for k in values) + 2
    lines: list[str] = []
    pending: list[str] = []
    for key in ir.SPEC_KEYS:
        pending += layout.leading.get(key, [])
        if key not in values:  # its comments, and those of its settings, go on with the next key
            pending += layout.trailing.get(key, []) + _taken_setting_comments(layout, key)
            continue
        lines += pending
        pending = []
        if key in layout.blank_before:
            lines.append("")
        if style == "yaml":
            text = _with_setting_comments(_yaml_entry(key, values[key]), key, layout)
        else:
            text = f"{key + ':':<{width}}{_entry_text(key, values[key], width)}"
        if layout.trailing.get(key):
            # on the key's own line in YAML (a mapping's settings follow it), after the value in .gnn
            head, newline, rest = text.partition("\n") if style == "yaml" else (text, "", "")
            text = head + "  " + " ".join(layout.trailing[key]) + newline + rest
        lines += text.split("\n")
    lines += pending + layout.footer
    return "\n".join(_collapse_blank_lines(lines)) + "\n"


def _collapse_blank_lines(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return out
