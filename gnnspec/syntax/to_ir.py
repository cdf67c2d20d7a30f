"""CST -> IR: resolve every name against the vocabulary and type every value.

The vocabulary is the IR itself: a stage's arguments are the fields of its model, their types
and defaults are the fields' annotations and defaults, ops come from ``OP_SIGNATURES``. Unknown
names of any kind get "did you mean"; each error points at the offending text.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel

from gnnspec import ir
from gnnspec.errors import SpecError, did_you_mean
from gnnspec.ir import OP_SIGNATURES, PLAN_MODELS, SPEC_KEYS, STAGE_MODELS, Span, Spans
from gnnspec.syntax.cst import Arg, Atom, Call, Entry, Kwargs, ListNode, Node, Pipeline

# Fields whose integer value is a byte count, written as a size (`16GiB`).
_SIZE_FIELDS = {(ir.Auto, "budget")}
# Fields where `auto` means "chosen for you" (stored as None).
_AUTO_AS_NONE = {(ir.Checkpoint, "segments"), (ir.Linear, "dim")}
_NO_JK = {
    "rev": "a reversible stack keeps no layer outputs for jumping knowledge",
    "deq": "a deep equilibrium stage has one fixed point, not a sequence of layers",
}


def error_at(span: Span | None, message: str, hint: str | None = None) -> SpecError:
    if span is None:
        return SpecError(message, hint=hint)
    end = span.end_column if span.end_line == span.line else None
    return SpecError(message, line=span.line, column=span.column, end_column=end, hint=hint)


def describe(node: Node) -> str:
    """A node as a message names it: its text in backticks, or what it is."""
    if isinstance(node, Atom):
        return f"`{node.text}`"
    if isinstance(node, Call):
        return f"`{node.name}(...)`"
    if isinstance(node, ListNode):
        return "a list"
    if isinstance(node, Pipeline):
        return "a pipeline"
    return "a `name=value` list"


# ---------------------------------------------------------------------------- field types


def _leaves(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaves(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg)]
    return [annotation]


def _field_kind(model: type[BaseModel], name: str) -> dict[str, Any]:
    leaves = _leaves(model.model_fields[name].annotation)
    kind: dict[str, Any] = {"none": type(None) in leaves, "choices": ()}
    for leaf in leaves:
        if typing.get_origin(leaf) is Literal:
            kind["choices"] += typing.get_args(leaf)
        elif leaf is ir.Store:
            kind["type"] = "plan"
        elif leaf is ir.Op:
            kind["type"] = "op"
        elif typing.get_origin(leaf) is tuple:
            kind["type"] = "ints"
        elif leaf in (bool, int, float, str) and "type" not in kind:
            kind["type"] = leaf.__name__
    if (model, name) in _SIZE_FIELDS:
        kind["type"] = "size"
    if (model, name) in _AUTO_AS_NONE:
        kind["auto_none"] = True
    kind.setdefault("type", "enum")
    return kind


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "`true` or `false`",
    "str": "a name",
    "ints": "a list of integers such as [64, 32]",
    "size": "a size such as 16GiB or 500MB",
    "op": "an op such as gcn or gat(heads=4)",
    "plan": "a plan such as store or checkpoint(segments=4)",
}


_TYPE_EXAMPLES = {  # the hint of a value of the wrong type
    "int": "write a whole number such as 8",
    "float": "write a number such as 0.5",
    "bool": "write `true` or `false`",
    "ints": "write whole numbers in brackets such as [64, 32]",
    "size": "write a number and a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB",
    "str": "write a name of letters, digits and `_`",
}


def convert_value(node: Node, kind: dict[str, Any], label: str) -> Any:
    """The typed value of ``node`` for a field of the given kind; `SpecError` when it does not fit."""
    span = node.span
    if isinstance(node, Atom) and node.type == "none" and kind["none"] and "none" not in kind["choices"]:
        return None
    if isinstance(node, Atom) and node.type == "auto" and kind.get("auto_none"):
        return None
    wanted = kind["type"]
    if wanted == "plan":
        return convert_plan(node)
    if wanted == "op":
        return convert_op(node)
    if kind["choices"] and isinstance(node, Atom) and node.type in ("name", "none", "auto", "string"):
        if node.value in kind["choices"]:
            return node.value
        if wanted == "enum":
            raise error_at(
                span,
                f"unknown value `{node.text}` for `{label}`",
                did_you_mean(str(node.value), [str(c) for c in kind["choices"]]),
            )
    if isinstance(node, Atom):
        value = node.value
        if wanted == "int" and node.type == "int":
            return value
        if wanted == "float" and node.type in ("int", "float"):
            if not math.isfinite(float(value)):
                raise error_at(span, f"`{label}` must be a finite number, got `{node.text}`",
                               "write a number such as 0.5; inf and nan are not values")
            return float(value)
        if wanted == "bool" and node.type == "bool":
            return value
        if wanted == "str" and node.type in ("name", "string"):
            return value
        if wanted == "size" and node.type in ("size", "int"):
            if value is None:
                raise error_at(span, f"`{node.text}` is not a whole number of bytes",
                               "write a whole number of bytes, or a smaller unit: e.g. 1500MB for 1.5GB, "
                               "1536MiB for 1.5GiB")
            return value
    if wanted == "ints" and isinstance(node, ListNode):
        items: list[int] = []
        for item in node.items:
            if not (isinstance(item, Atom) and item.type == "int"):
                raise error_at(item.span, f"`{label}` must be {_TYPE_WORDS['ints']}, got {describe(item)}",
                               "every item is a whole number")
            items.append(item.value)
        return tuple(items)
    expected = _TYPE_WORDS.get(wanted, "one of " + ", ".join(map(str, kind["choices"])))
    if kind["choices"] and wanted != "enum":
        expected += " or " + " / ".join(f"`{c}`" for c in kind["choices"])
    if kind.get("auto_none"):
        expected += " or `auto`"
    elif kind["none"]:
        expected += " or `none`"
    hint = _TYPE_EXAMPLES.get(wanted)
    if wanted == "int" and isinstance(node, Atom) and node.type == "float":
        hint = f"`{label}` counts something: write a whole number"
    raise error_at(span, f"`{label}` must be {expected}, got {describe(node)}", hint)


def convert_arguments(
    model: type[BaseModel], owner: str, args: tuple[Arg, ...], *, skip: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], dict[str, Span]]:
    """Typed field values and their spans for ``name=value`` arguments of ``owner``."""
    fields = [f for f in model.model_fields if f not in ("kind", "spans") and f not in skip]
    positional = getattr(model, "positional", None)
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    for arg in args:
        name = arg.name
        if name is None:
            if positional is None:
                raise error_at(
                    arg.span,
                    f"`{owner}` takes no positional argument",
                    "write `name=value`; valid: " + ", ".join(fields),
                )
            if positional in values:
                raise error_at(
                    arg.span,
                    f"`{owner}` takes one positional argument",
                    f"write `{owner}({describe(args[0].value).strip('`')})`",
                )
            name = positional
        if name not in fields:
            hint = _NO_JK.get(owner) if name == "jk" else None
            raise error_at(
                arg.name_span or arg.span,
                f"`{owner}` has no argument `{name}`",
                hint or did_you_mean(name, fields),
            )
        if name in values:
            first = spans[name]
            raise error_at(
                arg.name_span or arg.span,
                f"argument `{name}` given twice",
                f"it was first given at line {first.line}, column {first.column}",
            )
        label = owner if arg.name is None else name
        values[name] = convert_value(arg.value, _field_kind(model, name), label)
        spans[name] = arg.value.span
        if isinstance(arg.value, ListNode):
            spans.update({f"{name}.{i}": item.span for i, item in enumerate(arg.value.items)})
    return values, spans


# ---------------------------------------------------------------------------- ops, plans, stages


def _callee(node: Node, what: str) -> tuple[str, tuple[Arg, ...], Span, Span]:
    if isinstance(node, Call):
        return node.name, node.args, node.span, node.name_span
    if isinstance(node, Atom) and node.type in ("name", "auto", "none"):
        return node.text, (), node.span, node.span
    raise error_at(node.span, f"expected {what}, got {describe(node)}",
                   "a name, or a name with `name=value` arguments in parentheses; no quotes")


def convert_op(node: Node) -> ir.Op:
    name, args, span, name_span = _callee(node, "an op such as gcn or gat(heads=4)")
    sig = OP_SIGNATURES.get(name)
    if sig is None:
        raise error_at(name_span, f"unknown op `{name}`", did_you_mean(name, OP_SIGNATURES))
    given: dict[str, Any] = {}
    spans: dict[str, Span] = {"": span, "name": name_span}
    known = [p.name for p in sig.params]
    for arg in args:
        if arg.name is None:
            raise error_at(arg.span, f"op `{name}` takes no positional argument", "write `name=value`")
        param = sig.param(arg.name)
        if param is None:
            hint = did_you_mean(arg.name, known) if known else f"`{name}` takes no arguments"
            raise error_at(arg.name_span, f"op `{name}` has no argument `{arg.name}`", hint)
        if arg.name in given:
            first = spans[arg.name]
            raise error_at(
                arg.name_span,
                f"argument `{arg.name}` given twice",
                f"it was first given at line {first.line}, column {first.column}",
            )
        kind = {"type": "enum" if param.type == "enum" else param.type, "none": False, "choices": param.choices}
        given[arg.name] = convert_value(arg.value, kind, arg.name)
        spans[arg.name] = arg.value.span
    values = tuple((p.name, given.get(p.name, p.default)) for p in sig.params)
    return ir.Op(name=name, args=values, spans=Spans(spans))


def convert_plan(node: Node) -> Any:
    name, args, span, name_span = _callee(node, "a plan such as store or checkpoint(segments=4)")
    model = PLAN_MODELS.get(name)
    if model is None:
        raise error_at(name_span, f"unknown plan `{name}`", did_you_mean(name, PLAN_MODELS))
    values, spans = convert_arguments(model, name, args)
    return model(kind=name, spans=Spans({"": span, "name": name_span, **spans}), **values)


def convert_stage(node: Node) -> Any:
    if isinstance(node, Pipeline):
        raise error_at(node.span, "expected one stage, got a pipeline")
    name, args, span, name_span = _callee(node, "a stage such as linear or rev(depth=4)")
    model = STAGE_MODELS.get(name)
    if model is None:
        hint = did_you_mean(name, STAGE_MODELS)
        if name in OP_SIGNATURES:
            hint = f"`{name}` is an op: use it inside a stack, e.g. `plain(op={name}, depth=2)`"
        raise error_at(name_span, f"unknown stage `{name}`", hint)
    values, spans = convert_arguments(model, name, args)
    return model(kind=name, spans=Spans({"": span, "name": name_span, **spans}), **values)


def convert_pipeline(node: Node) -> tuple[Any, ...]:
    items = node.items if isinstance(node, Pipeline) else (node,)
    return tuple(convert_stage(item) for item in items)


# ---------------------------------------------------------------------------- spec


def _mapping_args(node: Node, key: str) -> tuple[Arg, ...]:
    if isinstance(node, Kwargs):
        return node.args
    if isinstance(node, Call) and node.name == key:
        return node.args
    example = "nodes=1000, edges=5000" if key == "graph" else "optimizer=adam, lr=0.01"
    raise error_at(node.span, f"`{key}` must be a list of `name=value` settings", f"e.g. `{key}: {example}`")


def _convert_entry(key: str, node: Node) -> Any:
    field = SPEC_KEYS[key]
    if key == "model":
        return convert_pipeline(node)
    if key in ("graph", "train"):
        model = ir.Graph if key == "graph" else ir.Train
        values, spans = convert_arguments(model, key, _mapping_args(node, key))
        missing = [f for f in ("nodes", "edges") if key == "graph" and f not in values]
        if missing:
            raise error_at(
                node.span,
                f"`graph` needs `nodes` and `edges` (missing: {', '.join(missing)})",
                "e.g. `graph: nodes=2708, edges=10556`",
            )
        return model(spans=Spans({"": node.span, **spans}), **values)
    if isinstance(node, Kwargs):
        raise error_at(node.span, f"`{key}` takes one value, not a `name=value` list",
                       "only `graph` and `train` take a list of settings")
    return convert_value(node, _field_kind(ir.Spec, field), key)


def spec_from_entries(entries: tuple[Entry, ...], *, default_name: str = "model") -> ir.Spec:
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    for entry in entries:
        if entry.key not in SPEC_KEYS:
            raise error_at(entry.key_span, f"unknown key `{entry.key}`", did_you_mean(entry.key, SPEC_KEYS))
        if entry.key in spans:
            first = spans["key:" + entry.key]
            raise error_at(
                entry.key_span,
                f"key `{entry.key}` given twice",
                f"it was first given on line {first.line}",
            )
        values[SPEC_KEYS[entry.key]] = _convert_entry(entry.key, entry.value)
        spans[entry.key] = entry.value.span
        spans["key:" + entry.key] = entry.key_span
    if "model" not in values:
        first = entries[0].key_span if entries else None
        raise error_at(
            Span(first.line, 1, first.line, 1) if first else None,
            "missing key `model`",
            "every spec needs `model: <pipeline>`, e.g. `model: linear >> rev(depth=8) >> linear`",
        )
    values.setdefault("name", default_name)
    return ir.Spec(spans=Spans(spans), **values)


def spec_from_expression(node: Node, *, default_name: str = "model") -> ir.Spec:
    if isinstance(node, Kwargs):
        raise error_at(node.span, "expected a pipeline, got a `name=value` list")
    return ir.Spec(model=convert_pipeline(node), name=default_name, spans=Spans({"model": node.span}))
