"""The `.yaml` / `.yml` surface form: a YAML mapping with the keys of a `.gnn` file.

Loaded with PyYAML's safe composer so every value keeps its position. String values are parsed
with the expression grammar (rule ``value``) and their positions mapped back into the YAML file;
numbers and booleans become literals; ``graph`` and ``train`` may be YAML mappings; ``model``
may be a list of stages. The result is the same CST a `.gnn` file gives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from gnnspec.errors import SpecError
from gnnspec.ir import Span
from gnnspec.syntax.cst import Arg, Atom, Entry, Kwargs, ListNode, Node, Pipeline
from gnnspec.syntax.parser import MAX_NESTING, check_text, parse_cst

_TAG = "tag:yaml.org,2002:"
# What YAML may put between two characters of a scalar's value: folding, quotes, block headers.
_SKIPPABLE = " \t\r\n\"'|>-+"


def entries_from_yaml(text: str) -> tuple[Entry, ...] | Node:
    """The CST of a YAML spec (entries, or one node when the document is a bare string)."""
    check_text(text)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        raise _yaml_error(err) from None
    except yaml.YAMLError as err:
        raise SpecError(f"invalid YAML: {err}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise SpecError(
            "YAML nested too deeply to read",
            hint=f"a spec nests at most {MAX_NESTING} levels; write the model as a pipeline string",
        ) from None
    if root is None:
        raise SpecError("empty spec", hint="write `model: <pipeline>` as a YAML mapping")
    if isinstance(root, yaml.ScalarNode) and root.tag == _TAG + "str":
        return _value(root, text)
    if not isinstance(root, yaml.MappingNode):
        raise SpecError(
            "a YAML spec must be a mapping of keys such as `model`",
            hint="e.g. `model: linear >> rev(depth=4)` on its own line",
            line=root.start_mark.line + 1,
            column=root.start_mark.column + 1,
        )
    entries = []
    for key, value in root.value:
        key_span = _span(key)
        if not (isinstance(key, yaml.ScalarNode) and key.tag == _TAG + "str"):
            raise SpecError(
                "keys are names such as `model`",
                hint="valid keys: name, in, out, hidden, model, graph, plan, train, dtype, seed",
                line=key_span.line,
                column=key_span.column,
            )
        entries.append(Entry(key.value, _value(value, text, key=key.value), _span(value), key_span))
    return tuple(entries)


def _yaml_error(err: yaml.MarkedYAMLError) -> SpecError:
    problem = err.problem or err.context or "invalid YAML"
    mark = err.problem_mark or err.context_mark
    hint = "the YAML form is a mapping such as `model: linear >> rev(depth=8)`"
    if "end of stream" in problem and err.context and err.context_mark:
        # An unclosed quote or bracket: where it opened says more than where the text ended.
        problem = f"{err.context.removeprefix('while scanning ')} that is never closed"
        mark = err.context_mark
        hint = "close the quote or bracket on the same value"
    elif "'\\t'" in problem:
        hint = "YAML indents with spaces, not tabs"
    return SpecError(
        f"invalid YAML: {problem}",
        line=mark.line + 1 if mark else 1,
        column=mark.column + 1 if mark else 1,
        hint=hint,
    )


def _span(node: yaml.Node) -> Span:
    start, end = node.start_mark, node.end_mark
    return Span(start.line + 1, start.column + 1, end.line + 1, end.column + 1)


def _value(node: yaml.Node, text: str, key: str | None = None) -> Node:
    span = _span(node)
    if isinstance(node, yaml.MappingNode):
        args = []
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise SpecError("setting names are plain names", line=span.line, column=span.column)
            args.append(Arg(str(k.value), _value(v, text, key=str(k.value)), _span(v), _span(k)))
        return Kwargs(tuple(args), span)
    if isinstance(node, yaml.SequenceNode):
        items = tuple(_value(item, text) for item in node.value)
        if key == "model" and not items:
            raise SpecError("`model` needs at least one stage", line=span.line, column=span.column,
                            hint="e.g. `model: linear >> rev(depth=8) >> linear`")
        if key == "model":
            flat = tuple(s for item in items for s in (item.items if isinstance(item, Pipeline) else (item,)))
            return flat[0] if len(flat) == 1 else Pipeline(flat, span)
        return ListNode(items, span)
    tag = node.tag[len(_TAG):] if node.tag.startswith(_TAG) else node.tag
    if tag == "null" and node.value.strip():  # `null` or `~` written out: YAML's none, as `none`
        return Atom("none", None, node.value, span)
    if tag == "null" or (tag == "str" and not node.value.strip()):
        raise SpecError(
            f"`{key or 'value'}` has no value",
            line=span.line,
            column=span.column,
            hint="give it a value or leave the key out",
        )
    if tag == "str" and key == "name":
        return _name_scalar(node, text, span)
    if tag == "str":
        return _parse_scalar(node, text)
    value = _construct(node, tag, span, key or "value")
    kind = {bool: "bool", int: "int", float: "float"}[type(value)]
    return Atom(kind, value, node.value, span)


def _name_scalar(node: yaml.ScalarNode, text: str, span: Span) -> Node:
    """A ``name`` is a name or a quoted string as in a `.gnn` file, else (the schema says a
    string) the YAML string itself: ``name: 'my model'``."""
    try:
        parsed = _parse_scalar(node, text)
    except SpecError:
        parsed = None
    # a name must be the whole scalar: in `name: "gcn # v2"` the `.gnn` reading stops at a comment
    if isinstance(parsed, Atom) and (parsed.type == "string" or (parsed.type == "name" and parsed.value == node.value)):
        return parsed
    return Atom("string", node.value, node.value, span)


def _construct(node: yaml.ScalarNode, tag: str, span: Span, label: str) -> bool | int | float:
    """The value of a YAML scalar tagged (or resolved as) bool, int or float."""
    if tag not in ("bool", "int", "float"):
        raise SpecError(f"unsupported YAML tag `{node.tag}`", line=span.line, column=span.column,
                        hint="values are plain YAML scalars, mappings or lists")
    try:
        value = yaml.SafeLoader("").construct_object(node)
    except (ValueError, TypeError, IndexError, yaml.YAMLError):  # whatever PyYAML raises on bad text
        value = None
    if type(value) is not {"bool": bool, "int": int, "float": float}[tag]:
        words = {"bool": "`true` or `false`", "int": "an integer", "float": "a number"}[tag]
        raise SpecError(
            f"`{label}` must be {words}, got `{node.value}` (YAML tag `!!{tag}`)", line=span.line, column=span.column,
            hint=f"remove the `!!{tag}` tag, or give a value it fits"
        )
    return value


def _parse_scalar(node: yaml.ScalarNode, text: str) -> Node:
    """Parse a YAML string with the expression grammar; positions point into the YAML file."""
    offsets = None
    start = _past_properties(text, node.start_mark.index)
    if node.style in ('"', "'"):
        offsets = _quoted_offsets(node.value, text, start, node.style)
    if offsets is None:
        offsets = _align(node.value, text, start)
    try:
        cst = parse_cst(node.value, rule="value")
    except SpecError as err:
        line, column = _file_position(node.value, err.line, err.column, offsets, text)
        err.line, err.column = line, column
        err.end_column = None
        raise
    return _relocate(cst, lambda span: _map_span(span, node.value, offsets, text))


def _past_properties(text: str, i: int) -> int:
    """The index of a scalar's first character, from where its node starts (``i``): past an anchor
    (``&m``) and a tag (``!!str``, ``!local``, ``!<tag:...>``) written before it, and the spaces,
    line breaks and comments after them. A node's start mark is at its first property."""
    while i < len(text) and text[i] in "&!":
        if text.startswith("!<", i):
            close = text.find(">", i)
            i = len(text) if close < 0 else close + 1
        else:
            while i < len(text) and not text[i].isspace():
                i += 1
        while i < len(text) and (text[i].isspace() or text[i] == "#"):
            if text[i] == "#":
                while i < len(text) and text[i] not in _BREAKS:
                    i += 1
            else:
                i += 1
    return i


def _align(value: str, text: str, start: int) -> list[int]:
    """For each character of a scalar's value, its index in the file text.

    YAML folds line breaks and indentation into spaces and drops quotes; matching the value's
    characters in order against the source text recovers where each one came from.
    """
    offsets = []
    j = start
    for ch in value:
        k = j
        while k < len(text) and text[k] != ch and text[k] in _SKIPPABLE:
            k += 1
        offsets.append(min(k, len(text)))
        j = k + 1 if k < len(text) and text[k] == ch else k
    offsets.append(min(j, len(text)))
    return offsets


_BREAKS = "\r\n\x85\u2028\u2029"


def _quoted_offsets(value: str, text: str, start: int, quote: str) -> list[int] | None:
    """For each character of a quoted scalar's value, its index in the file text, decoding the
    scalar as PyYAML's scanner does (escapes such as ``\\x67`` or ``''``, folded line breaks); an
    escape is placed at its backslash. None when the decoding does not give ``value``."""
    chars: list[str] = []
    offsets: list[int] = []
    i = start + 1
    n = len(text)
    while i < n and text[i] != quote or (quote == "'" and text[i:i + 2] == "''"):
        ch = text[i]
        if quote == "'" and text[i:i + 2] == "''":
            chars.append("'"), offsets.append(i)
            i += 2
        elif quote == '"' and ch == "\\" and i + 1 < n:
            code = text[i + 1]
            if code in yaml.scanner.Scanner.ESCAPE_REPLACEMENTS:
                chars.append(yaml.scanner.Scanner.ESCAPE_REPLACEMENTS[code]), offsets.append(i)
                i += 2
            elif code in yaml.scanner.Scanner.ESCAPE_CODES:
                width = yaml.scanner.Scanner.ESCAPE_CODES[code]
                try:
                    chars.append(chr(int(text[i + 2:i + 2 + width], 16))), offsets.append(i)
                except ValueError:
                    return None
                i += 2 + width
            elif code in _BREAKS:  # an escaped line break joins with no space; empty lines stay breaks
                i = _past_break(text, i + 1)
                while True:
                    while i < n and text[i] in " \t":
                        i += 1
                    if i >= n or text[i] not in _BREAKS:
                        break
                    chars.append("\n"), offsets.append(i)
                    i = _past_break(text, i)
            else:
                return None
        elif ch in " \t" + _BREAKS:
            j = i
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] in _BREAKS:  # trailing blanks and line breaks fold
                breaks, first = 0, j
                while j < n and text[j] in " \t" + _BREAKS:
                    if text[j] in _BREAKS:
                        breaks += 1
                        j = _past_break(text, j)
                    else:
                        j += 1
                folded = " " if breaks == 1 else "\n" * (breaks - 1)
                chars.extend(folded), offsets.extend([first] * len(folded))
                i = j
            else:
                chars.extend(text[i:j]), offsets.extend(range(i, j))
                i = j
        else:
            chars.append(ch), offsets.append(i)
            i += 1
    if "".join(chars) != value:
        return None
    return offsets + [i]


def _past_break(text: str, i: int) -> int:
    """The index after the line break at ``i`` (``\\r\\n`` is one)."""
    return i + 2 if text[i:i + 2] == "\r\n" else i + 1


def _value_index(value: str, line: int, column: int) -> int:
    lines = value.split("\n")
    return sum(len(l) + 1 for l in lines[: line - 1]) + column - 1


def _file_position(value: str, line: int, column: int, offsets: list[int], text: str) -> tuple[int, int]:
    index = min(max(_value_index(value, line, column), 0), len(offsets) - 1)
    pos = offsets[index]
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _map_span(span: Span, value: str, offsets: list[int], text: str) -> Span:
    line, column = _file_position(value, span.line, span.column, offsets, text)
    end_line, end_column = _file_position(value, span.end_line, span.end_column, offsets, text)
    return Span(line, column, end_line, end_column)


def _relocate(node: Any, move) -> Any:
    """A copy of a CST node with every span passed through ``move``."""
    if isinstance(node, tuple):
        return tuple(_relocate(n, move) for n in node)
    if not dataclasses.is_dataclass(node):
        return node
    changes = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, Span):
            changes[f.name] = move(value)
        elif isinstance(value, tuple) or dataclasses.is_dataclass(value):
            changes[f.name] = _relocate(value, move)
    return dataclasses.replace(node, **changes)
