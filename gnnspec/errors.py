"""`SpecError`, the one error a user gets for bad input, and the "did you mean" suggestion.

Rendered (``str(error)``) as::

    specs/model.gnn:3:15: unknown op `gatt`
      model: rev(op=gatt, depth=4)
                    ^^^^
    hint: did you mean `gat`? (valid: gcn, sage, gat, ...)

A leaf module: every layer (syntax, check, lowering, command line) may raise it.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class SpecError(Exception):
    """An invalid spec or argument, with its position (1-based line and column) and a hint."""

    def __init__(
        self,
        message: str,
        *,
        line: int = 1,
        column: int = 1,
        end_column: int | None = None,
        hint: str | None = None,
        filename: str = "<spec>",
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        self.end_column = end_column
        self.hint = hint
        self.filename = filename
        self.source = source

    def located(self, filename: str, source: str | None) -> "SpecError":
        """The same error, attributed to ``filename`` whose text is ``source``."""
        self.filename = filename
        if source is not None:
            self.source = source
        return self

    @property
    def source_line(self) -> str | None:
        if self.source is None:
            return None
        # Positions count "\n" only, so lines are split on it alone (not on form feeds or U+2028).
        lines = self.source.split("\n")
        return lines[self.line - 1].rstrip("\r") if 0 < self.line <= len(lines) else ""

    def render(self) -> str:
        parts = [f"{self.filename}:{self.line}:{self.column}: {self.message}"]
        line = self.source_line
        if line is not None:
            shown = "".join(c if c.isprintable() else " " for c in line.expandtabs(1))
            width = 1
            if self.end_column is not None and self.end_column > self.column:
                width = min(self.end_column, len(shown) + 1) - self.column
            column = self.column
            if len(shown) > SHOWN_LINE:  # a window around the column, not a megabyte of line
                start = max(0, min(column - 1 - SHOWN_LINE // 2, len(shown) - SHOWN_LINE))
                before = "..." if start > 0 else ""
                after = "..." if start + SHOWN_LINE < len(shown) else ""
                shown = before + shown[start : start + SHOWN_LINE] + after
                column = column - start + len(before)
                width = min(width, len(shown) - len(after) - column + 1)
            parts.append("  " + shown)
            parts.append("  " + " " * (column - 1) + "^" * max(width, 1))
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()


# The longest source line an error shows whole; longer ones are cut to this many characters.
SHOWN_LINE = 160


def nearest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name``: the same name ignoring case, ``_``, ``-`` and ``+`` spelled
    ``plus`` (``res_plus`` -> ``res+``), else the closest by difflib ratio (>= 0.6)."""
    known = list(known)

    def fold(text: str) -> str:
        return text.lower().replace("+", "plus").replace("_", "").replace("-", "")

    folded = {fold(k): k for k in known}
    key = fold(name)
    if key in folded:
        return folded[key]
    matches = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not matches:
        matches = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, known: Iterable[str], *, list_up_to: int = 16) -> str | None:
    """A hint naming the nearest known name and, when the list is short, all valid names."""
    known = list(known)
    guess = nearest(name, known)
    parts = []
    if guess is not None:
        parts.append(f"did you mean `{guess}`?")
    if known and len(known) <= list_up_to:
        parts.append("valid: " + ", ".join(known))
    return " ".join(parts) if parts else None


class NoParameters(ValueError):
    """A model without trainable parameters asked for an optimizer: nothing to train."""
