"""The concrete syntax tree: what the text says, with positions, before names are resolved.

The Lark grammar (grammars/gnnspec.lark) yields these nodes through :class:`ToCST`; the YAML front
builds the same nodes from YAML scalars and mappings, so both surface forms share one path to the
IR (:mod:`gnnspec.syntax.to_ir`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from lark import Token, Transformer, v_args

from gnnspec.errors import SpecError
from gnnspec.ir import Span, size_bytes


@dataclass(frozen=True)
class Atom:
    """A literal or a bare name. ``type`` is int, float, size, string, bool, auto, none or name."""

    type: str
    value: object
    text: str
    span: Span


@dataclass(frozen=True)
class ListNode:
    items: tuple["Node", ...]
    span: Span


@dataclass(frozen=True)
class Arg:
    """``name=value``, or a positional value (``name`` is None)."""

    name: str | None
    value: "Node"
    span: Span
    name_span: Span | None = None


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Arg, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Pipeline:
    """Two or more elements joined by ``>>`` (a single element is never wrapped)."""

    items: tuple["Node", ...]
    span: Span


@dataclass(frozen=True)
class Kwargs:
    """A bare argument list, as in ``graph: nodes=10, edges=20``."""

    args: tuple[Arg, ...]
    span: Span


@dataclass(frozen=True)
class Entry:
    key: str
    value: "Node"
    span: Span
    key_span: Span


Node = Union[Atom, ListNode, Call, Pipeline, Kwargs]


def token_span(token: Token) -> Span:
    return Span(token.line, token.column, token.end_line, token.end_column)


def meta_span(meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class ToCST(Transformer):
    """Lark parse tree -> CST nodes."""

    def start(self, meta, children):
        return children[0]

    value = start

    def entries(self, meta, children):
        return tuple(children)

    def entry(self, meta, children):
        key, value = children
        return Entry(str(key), value, meta_span(meta), token_span(key))

    def kwargs(self, meta, children):
        return Kwargs(tuple(children), meta_span(meta))

    def pipeline(self, meta, children):
        if len(children) == 1:
            return children[0]
        return Pipeline(tuple(children), meta_span(meta))

    def call(self, meta, children):
        name, *args = children
        args = tuple(a for a in args if a is not None)
        return Call(str(name), args, meta_span(meta), token_span(name))

    def kwarg(self, meta, children):
        name, value = children
        return Arg(str(name), value, meta_span(meta), token_span(name))

    def positional(self, meta, children):
        return Arg(None, children[0], meta_span(meta))

    def list(self, meta, children):
        return ListNode(tuple(c for c in children if c is not None), meta_span(meta))

    def atom(self, meta, children):
        token: Token = children[0]
        text = str(token)
        kind = token.type
        span = token_span(token)
        if kind in ("INT", "FLOAT", "SIZE"):
            _check_number_length(text, span)
        if kind == "INT":
            return Atom("int", int(text.replace("_", "")), text, span)
        if kind == "FLOAT":
            return Atom("float", float(text.replace("_", "")), text, span)
        if kind == "SIZE":
            return Atom("size", size_bytes(text), text, span)
        if kind == "STRING":
            return Atom("string", _unquote(text), text, span)
        if kind in ("TRUE", "FALSE"):
            return Atom("bool", kind == "TRUE", text, span)
        if kind == "AUTO":
            return Atom("auto", "auto", text, span)
        if kind == "NONE":
            return Atom("none", "none", text, span)
        return Atom("name", text, text, span)


MAX_NUMBER_DIGITS = 100
"""The most digits a number literal may have: far beyond any setting's range (a seed has at most
19), and below Python's 4300-digit limit on converting integers to and from text."""


def _check_number_length(text: str, span: Span) -> None:
    digits = sum(c.isdigit() for c in text)
    if digits > MAX_NUMBER_DIGITS:
        raise SpecError(
            f"a number of {digits:,} digits, longer than any setting takes", line=span.line, column=span.column,
            end_column=span.end_column if span.end_line == span.line else None,
            hint=f"numbers in a spec have at most {MAX_NUMBER_DIGITS} digits",
        )


def _unquote(text: str) -> str:
    r"""The value of a string literal: ``\n``, ``\t``, ``\r``, ``\uXXXX``, ``\UXXXXXXXX``; any other
    escaped character stands for itself."""
    body = text[1:-1]
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            digits = {"u": 4, "U": 8}.get(nxt, 0)
            code = body[i + 2 : i + 2 + digits]
            if digits and len(code) == digits and all(c in "0123456789abcdefABCDEF" for c in code) and int(code, 16) <= 0x10FFFF:
                out.append(chr(int(code, 16)))
                i += 2 + digits
                continue
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
