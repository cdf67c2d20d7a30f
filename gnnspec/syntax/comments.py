"""Where the comments and blank lines of a spec file are, so the formatter can keep them.

A comment is ``#`` to the end of the line, outside a string. It is *standalone* when nothing but
blanks precede it on its line, else *trailing*. Entry line ranges come from the parse, so each
comment can be attached to the entry it belongs to (:func:`gnnspec.format.attach_comments`).
"""

from __future__ import annotations

from gnnspec.format import Layout, SourceComment, SourceEntry, attach_comments
from gnnspec.syntax.cst import Entry
from gnnspec.syntax.parser import parse_cst
from gnnspec.syntax.yaml_front import entries_from_yaml


def scan_comments(text: str, *, yaml: bool = False) -> list[SourceComment]:
    """Every comment of ``text`` in order (for YAML, only standalone ones: YAML owns the rest)."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        quote, escaped = None, False
        for i, ch in enumerate(line):
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
            elif ch in "\"'" and not yaml:
                quote = ch
            elif ch == "#":
                standalone = not line[:i].strip()
                if standalone or not yaml:
                    found.append(SourceComment(number, line[i:].rstrip(), standalone))
                break
    return found


def blank_lines(text: str) -> set[int]:
    return {n for n, line in enumerate(text.splitlines(), start=1) if not line.strip()}


def gnn_entries(text: str) -> list[SourceEntry]:
    """Key and line range of each entry of a `.gnn` text (one entry "model" for a bare expression)."""
    cst = parse_cst(text)
    if isinstance(cst, tuple):
        return [SourceEntry(e.key, e.key_span.line, e.value.span.end_line) for e in cst if isinstance(e, Entry)]
    return [SourceEntry("model", cst.span.line, cst.span.end_line)]


def yaml_entries(text: str) -> list[SourceEntry]:
    """Key and line range of each top-level entry of a YAML spec."""
    cst = entries_from_yaml(text)
    if isinstance(cst, tuple):
        return [SourceEntry(e.key, e.key_span.line, e.span.end_line) for e in cst]
    return [SourceEntry("model", cst.span.line, cst.span.end_line)]


def source_layout(text: str, *, form: str) -> Layout:
    """The comments and blank lines of a spec text, attached to its entries."""
    yaml = form == "yaml"
    entries = yaml_entries(text) if yaml else gnn_entries(text)
    return attach_comments(scan_comments(text, yaml=yaml), [_trimmed(e, text) for e in entries], blank_lines(text))


def _trimmed(entry: SourceEntry, text: str) -> SourceEntry:
    """The entry without the blank and comment-only lines its node's span may end with
    (a YAML block node ends where the next token starts)."""
    lines = text.splitlines()
    end = min(entry.end_line, len(lines))
    while end > entry.start_line and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return SourceEntry(entry.key, entry.start_line, end)

