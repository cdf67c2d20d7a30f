"""Where the comments and blank lines of a spec file are, so the formatter can keep them.

A comment is ``#`` to the end of the line, outside a string. It is *standalone* when nothing but
blanks precede it on its line, else *trailing*. Entry line ranges come from the parse, so each
comment can be attached to the entry it belongs to (:func:`gnnspec.format.attach_comments`).
"""

from __future__ import annotations

import yaml

from gnnspec.format import Layout, SourceComment, SourceEntry, attach_comments
from gnnspec.syntax.cst import Entry, Kwargs
from gnnspec.syntax.parser import code_characters, parse_cst
from gnnspec.syntax.yaml_front import entries_from_yaml


def scan_comments(text: str) -> list[SourceComment]:
    """Every comment of a `.gnn` text in order: ``#`` outside a string literal."""
    found = []
    for number, line in enumerate(text.split("\n"), start=1):
        for i, ch in code_characters(line):
            if ch == "#":
                found.append(SourceComment(number, line[i:].rstrip(), not line[:i].strip()))
    return found


def scan_yaml_comments(text: str) -> list[SourceComment]:
    """Every comment of a YAML text: ``#`` at a line's start or after a blank, outside every scalar."""
    scalars = []
    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            scalars.append((node.start_mark.index, node.end_mark.index))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
    found = []
    offset = 0
    for number, line in enumerate(text.split("\n"), start=1):
        for i, ch in enumerate(line):
            if ch == "#" and (i == 0 or line[i - 1] in " \t"):
                index = offset + i
                if not any(start <= index < end for start, end in scalars):
                    found.append(SourceComment(number, line[i:].rstrip(), not line[:i].strip()))
                    break
        offset += len(line) + 1
    return found


def blank_lines(text: str) -> set[int]:
    return {n for n, line in enumerate(text.split("\n"), start=1) if not line.strip()}


def gnn_entries(text: str) -> list[SourceEntry]:
    """Key and line range of each entry of a `.gnn` text (one entry "model" for a bare expression)."""
    cst = parse_cst(text)
    if isinstance(cst, tuple):
        return [SourceEntry(e.key, e.key_span.line, e.value.span.end_line) for e in cst if isinstance(e, Entry)]
    return [SourceEntry("model", cst.span.line, cst.span.end_line)]


def yaml_entries(text: str) -> list[SourceEntry]:
    """Key and line range of each top-level entry of a YAML spec, and of each setting of a
    ``graph``/``train`` mapping (key ``graph.nodes``), which the YAML form prints one per line."""
    cst = entries_from_yaml(text)
    if not isinstance(cst, tuple):
        return [SourceEntry("model", cst.span.line, cst.span.end_line)]
    # A block node ends where the next token starts: column 1 of a later line.
    out = [SourceEntry(e.key, e.key_span.line, e.span.end_line - (e.span.end_column == 1 and e.span.end_line > e.span.line))
           for e in cst]
    for e in cst:
        if e.key in ("graph", "train") and isinstance(e.value, Kwargs):
            out += [SourceEntry(f"{e.key}.{a.name}", (a.name_span or a.span).line, a.span.end_line)
                    for a in e.value.args if a.name is not None]
    return out


def source_layout(text: str, *, form: str) -> Layout:
    """The comments and blank lines of a spec text, attached to its entries."""
    if form == "yaml":
        entries, comments = yaml_entries(text), scan_yaml_comments(text)
    else:
        entries, comments = gnn_entries(text), scan_comments(text)
    return attach_comments(comments, [_trimmed(e, text) for e in entries], blank_lines(text))


def _trimmed(entry: SourceEntry, text: str) -> SourceEntry:
    """The entry without the blank and comment-only lines its node's span may end with
    (a YAML block node ends where the next token starts)."""
    lines = text.split("\n")
    end = min(entry.end_line, len(lines))
    while end > entry.start_line and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return SourceEntry(entry.key, entry.start_line, end)

