"""Text -> CST with the Lark grammar; Lark's errors become `SpecError` in the user's words.

The grammar is read from the installed package (``gnnspec/grammars/gnnspec.lark``, put there by
the wheel build) or, in a source checkout, from ``grammars/gnnspec.lark``. Lark's terminal names
never reach the user: :data:`TERMINAL_WORDS` says what each one is.
"""

from __future__ import annotations

import re

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from gnnspec.errors import SpecError
from gnnspec.syntax.cst import Entry, Node, ToCST

TERMINAL_WORDS: dict[str, str] = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "SIZE": "a size",
    "STRING": "a string",
    "TRUE": "`true`",
    "FALSE": "`false`",
    "AUTO": "`auto`",
    "NONE": "`none`",
    "_CHAIN": "`>>`",
    "_COLON": "`:`",
    "_COMMA": "a comma",
    "_EQUALS": "`=`",
    "_LPAR": "`(`",
    "_RPAR": "`)`",
    "_LSQB": "`[`",
    "_RSQB": "`]`",
    "_SEP": "a new entry on the next line",
    "$END": "the end of the spec",
}
_VALUE_STARTS = {"NAME", "INT", "FLOAT", "SIZE", "STRING", "TRUE", "FALSE", "AUTO", "NONE", "_LSQB"}
_MAX_TEXT = 1_000_000


def grammar_text() -> str:
    packaged = resources.files("gnnspec").joinpath("grammars/gnnspec.lark")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "grammars" / "gnnspec.lark").read_text("utf-8")


@lru_cache(maxsize=1)
def lark_parser() -> Lark:
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        strict=True,
        maybe_placeholders=False,
        start=["start", "value"],
    )


MAX_NESTING = 64


def check_text(text: str) -> None:
    """Reject what no surface form accepts: oversized text and NUL bytes (binary files)."""
    if len(text) > _MAX_TEXT:
        raise SpecError(f"spec is too long ({len(text)} characters; at most {_MAX_TEXT})",
                        hint="a spec is a few lines; is this the right file?")
    if "\x00" in text:
        line, column = _position_of(text, text.index("\x00"))
        raise SpecError(
            "binary data (a NUL byte) in the spec",
            line=line,
            column=column,
            hint="a spec is text: a .gnn, .yaml or .yml file",
        )


def parse_cst(text: str, *, rule: str = "start") -> tuple[Entry, ...] | Node:
    """Entries of a ``.gnn`` file or the node of a bare expression (``rule="value"``: one value,
    as a YAML string holds). Raises `SpecError`."""
    check_text(text)
    if not _has_content(text):
        raise SpecError(
            "empty spec",
            hint="write `model: <pipeline>` or a bare expression such as `rev(depth=8, op=gcn)`",
        )
    _check_nesting(text)
    try:
        tree = lark_parser().parse(text, start=rule)
    except UnexpectedInput as err:
        raise _spec_error(err, text) from None
    try:
        return ToCST().transform(tree)
    except VisitError as err:  # a SpecError raised while building the CST (a number too long)
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise


def _check_nesting(text: str) -> None:
    """Brackets nested deeper than :data:`MAX_NESTING` (no spec needs that; the tree transform
    would run out of stack); brackets in strings and comments are text, not nesting."""
    depth = 0
    for number, line in enumerate(text.split("\n"), start=1):
        for index, char in code_characters(line):
            if char in "([":
                depth += 1
                if depth > MAX_NESTING:
                    raise SpecError(
                        f"brackets nested more than {MAX_NESTING} levels deep", line=number, column=index + 1,
                        hint="a spec nests calls and lists a few levels deep"
                    )
            elif char in ")]":
                depth = max(depth - 1, 0)


def code_characters(line: str) -> Iterator[tuple[int, str]]:
    """``(index, character)`` of one line of a `.gnn` text outside its string literals (their
    quotes included), up to its comment: the ``#`` that starts one is the last yielded."""
    quote: str | None = None
    escaped = False
    for index, char in enumerate(line):
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        else:
            yield index, char
            if char == "#":
                return


def shown_char(char: str) -> str:
    """A character as a message shows it: itself if visible, else its code point (``U+001B``)."""
    return char if char.isprintable() and char != "\ufeff" else f"U+{ord(char):04X}"


def _has_content(text: str) -> bool:
    return any(line.split("#", 1)[0].strip() for line in text.splitlines())


def _position_of(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _expected_words(expected: set[str]) -> str:
    names = set(expected)
    words = []
    if len(names & _VALUE_STARTS) >= 5:
        words.append("a value")
        names -= _VALUE_STARTS
    order = list(TERMINAL_WORDS)
    for name in sorted(names, key=lambda n: order.index(n) if n in order else len(order)):
        if name in TERMINAL_WORDS:
            words.append(TERMINAL_WORDS[name])
    if not words:
        return "something else"
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _describe_token(token) -> str:
    kind = token.type
    if kind == "$END":
        return "end of the spec"
    if kind == "_SEP":
        return "end of line"
    if kind in ("NAME", "INT", "FLOAT", "SIZE", "STRING"):
        return f"{TERMINAL_WORDS[kind].split(' ', 1)[1]} `{token}`"
    return f"`{token}`"


_GENERAL_HINT = "a spec is `key: value` lines such as `model: linear >> rev(depth=4, op=gcn)`, or one such pipeline"


_SIZE_UNITS = ("b", "kb", "mb", "gb", "tb", "kib", "mib", "gib", "tib")


def _spaced_size(line_text: str, column: int) -> str | None:
    """``16GiB`` where the line has a number, spaces, then a size unit at ``column`` (``16 GiB``)."""
    unit = re.match(r"[A-Za-z]+", line_text[column - 1:])
    number = re.search(r"(\d+(?:\.\d+)?)[ \t]+$", line_text[: column - 1])
    if unit and number and unit.group(0).lower() in _SIZE_UNITS:
        return number.group(1) + unit.group(0)
    return None


def _hint(unexpected: str, expected: set[str], line_text: str, column: int, after: str) -> str | None:
    starts_line = not line_text[: column - 1].strip()
    if unexpected == "$END" and line_text.rstrip().endswith(">>"):
        return "`>>` joins two stages: write the next stage after it, e.g. `>> linear`"
    if unexpected == "_CHAIN" and starts_line and not line_text.startswith((" ", "\t")):
        return "a pipeline starts with a stage, e.g. `linear >> rev(depth=4)`; a line that continues a value is indented"
    if unexpected == "_COLON" and "_RPAR" in expected:
        return "arguments are written `name=value`"
    if unexpected == "_COLON":
        return "`key: value` entries start at column 0, one per line; arguments are written `name=value`"
    if unexpected in ("$END", "_SEP") and "_RPAR" in expected:
        return "every `(` needs a matching `)`; a value continues on lines that are indented or start with `>>`"
    if unexpected in ("$END", "_SEP") and "_RSQB" in expected:
        return "every `[` needs a matching `]`"
    if unexpected in ("_LPAR", "$END", "_SEP", "_CHAIN") and "_COLON" in expected:
        return (
            "a line at column 0 starts a new `key: value` entry; "
            "a value continues on lines that are indented or start with `>>`"
        )
    if unexpected == "NAME" and after[:1].isdigit():
        return "sizes are a number and a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (as written here)"
    spaced = _spaced_size(line_text, column) if unexpected == "NAME" else None
    if spaced:
        return f"a size is written without a space: `{spaced}`"
    if unexpected == "NAME" and starts_line and column > 1 and line_text[column - 1 :].split(":", 1)[0].strip().isidentifier():
        return "`key: value` entries start at column 0; an indented line continues the value above"
    if unexpected in ("NAME", "INT", "FLOAT", "SIZE", "STRING") and "_COMMA" in expected and "_RPAR" in expected:
        return "arguments are separated by commas: `rev(depth=4, op=gcn)`"
    if unexpected in ("NAME", "_LPAR") and "_CHAIN" in expected:
        return "stages are joined by `>>`; a key is followed by `:`"
    if unexpected == "_EQUALS" and "_COLON" in expected:
        return (
            "a key is followed by `:`, as in `hidden: 64`; "
            "`name=value` arguments go inside a call's parentheses, e.g. `rev(depth=4)`"
        )
    if unexpected == "_EQUALS":
        return "`name=value` arguments go inside a call's parentheses, e.g. `rev(depth=4)`"
    if unexpected == "_COMMA" and "_SEP" in expected:
        return "only `graph` and `train` take a bare `name=value, ...` list; elsewhere use a call"
    return None


def _spec_error(err: UnexpectedInput, text: str) -> SpecError:
    if isinstance(err, UnexpectedCharacters):
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        if char in "\r\n":
            return _line_break_error(err, text)
        expected = set(err.allowed or ())
        message = f"unexpected character `{shown_char(char)}`"
        if expected:
            message += f"; expected {_expected_words(expected)}"
        hint = None
        if char == ">":
            hint = "stages are joined by `>>`"
        elif char == "-":
            hint = "names are letters, digits and `_`; `>>` joins stages"
        elif char in "'\"":
            hint = "a string ends on the line where it starts"
        elif char == "\ufeff":
            hint = "a byte order mark belongs only at the very start of a file"
        elif not char.isprintable():
            hint = "remove the invisible control character"
        elif char == "." and text[err.pos_in_stream + 1:err.pos_in_stream + 2].isdigit():
            hint = "a number starts with a digit: write 0.5, not .5"
        elif char == "%":
            hint = "write a fraction as a number such as 0.5, not a percentage"
        elif char == "+" and text[:err.pos_in_stream].rstrip().endswith("res"):
            hint = "`res+` is one name: no space before `+`"
        return SpecError(message, line=err.line, column=err.column, hint=hint or _GENERAL_HINT)
    if isinstance(err, UnexpectedToken):
        token = err.token
        expected = set(err.accepts or err.expected or ())
        if token.type == "$END":
            line, column = _end_position(text)
            end = None
            before = ""
        else:
            line, column = token.line, token.column
            end = token.end_column if token.end_line == token.line else None
            before = text[: token.start_pos][-1:]
        lines = text.split("\n")
        line_text = lines[line - 1] if 0 < line <= len(lines) else ""
        return SpecError(
            f"unexpected {_describe_token(token)}; expected {_expected_words(expected)}",
            line=line,
            column=column,
            end_column=end,
            hint=_hint(token.type, expected, line_text, column, before) or _GENERAL_HINT,
        )
    if isinstance(err, UnexpectedEOF):
        line, column = _end_position(text)
        return SpecError(
            f"unexpected end of the spec; expected {_expected_words(set(err.expected or ()))}",
            line=line,
            column=column,
            hint=_GENERAL_HINT,
        )
    return SpecError(str(err), line=getattr(err, "line", 1), column=getattr(err, "column", 1))


def _line_break_error(err: UnexpectedCharacters, text: str) -> SpecError:
    """A line break where the value cannot end: point at the end of the unfinished line."""
    line = err.line
    lines = _lines(text)
    column = len(lines[line - 1]) + 1 if line - 1 < len(lines) else 1
    expected = set(err.allowed or ())
    return SpecError(
        f"the line ends before the value does; expected {_expected_words(expected)}",
        line=line,
        column=column,
        hint="a value continues on lines that are indented or start with `>>`",
    )


def _end_position(text: str) -> tuple[int, int]:
    lines = _lines(text.rstrip())
    return len(lines), len(lines[-1]) + 1


def _lines(text: str) -> list[str]:
    """``text``'s lines as positions count them: split on "\n" alone (lark counts no other line
    break: a form feed or U+2028 stays inside its line), a line's closing "\r" dropped."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
