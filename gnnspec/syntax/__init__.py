"""Text -> IR: the `.gnn` grammar, the YAML front and bare expressions (SPEC.md section 1).

``parse_text`` turns text into a :class:`gnnspec.ir.Spec` (names resolved, values typed) and
``read_spec_file`` reads a path or standard input; both raise `SpecError` located in the file.
Semantic rules (:mod:`gnnspec.check`) run after this.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from gnnspec.errors import SpecError
from gnnspec.ir import Spec
from gnnspec.syntax.parser import parse_cst
from gnnspec.syntax.to_ir import convert_plan, spec_from_entries, spec_from_expression
from gnnspec.syntax.yaml_front import entries_from_yaml

YAML_SUFFIXES = (".yaml", ".yml")


def is_yaml_name(filename: str) -> bool:
    """Whether ``filename`` names a YAML spec (its suffix, in any case: ``x.YAML``)."""
    return filename.lower().endswith(YAML_SUFFIXES)


SPEC_FORMS = ("gnn", "yaml")


STDIN_NAME = "<stdin>"


def spec_form(form: str | None, filename: str, text: str | None = None) -> str:
    """``form`` ("gnn" or "yaml"), or when None the one ``filename``'s suffix names. Standard
    input has no name: its ``text`` is YAML when it is not `.gnn` syntax but is a YAML mapping."""
    if not isinstance(filename, str):
        raise TypeError(f"filename (the name errors show) must be a str, got {type(filename).__name__}")
    if form is None:
        if filename == STDIN_NAME and text is not None:
            return "yaml" if _yaml_not_gnn(text) else "gnn"
        return "yaml" if is_yaml_name(filename) else "gnn"
    if form not in SPEC_FORMS:
        raise ValueError(f"unknown spec form {form!r}; valid: {', '.join(SPEC_FORMS)}")
    return form


def _yaml_not_gnn(text: str) -> bool:
    """Whether standard input's ``text`` is YAML: not `.gnn` syntax, and a YAML mapping or, where
    YAML cannot read it either, written in YAML's block structure (so the error shown is YAML's)."""
    import yaml

    try:
        parse_cst(text.removeprefix("\ufeff"))
        return False
    except SpecError:
        pass
    try:
        return isinstance(yaml.compose(text, Loader=yaml.SafeLoader), yaml.MappingNode)
    except yaml.YAMLError:
        return _YAML_BLOCK_LINE.search(text) is not None


# A line `.gnn` never has: an indented `key:` (a nested mapping) or a document marker.
_YAML_BLOCK_LINE = re.compile(r"^(?:[ \t]+[A-Za-z_][\w-]*[ \t]*:(?:[ \t]|$)|---)", re.M)


def parse_text(text: str, *, filename: str = "<spec>", form: str | None = None, name: str | None = None) -> Spec:
    """The IR of ``text``; ``form`` is "gnn", "yaml" or None (from ``filename``'s suffix, or for
    standard input from the text: :func:`spec_form`)."""
    if not isinstance(text, str):
        raise TypeError(f"spec text must be a str, got {type(text).__name__}")
    form = spec_form(form, filename, text)
    default_name = name or "model"
    if text.startswith("\ufeff"):  # a byte order mark is not part of the text
        text = text[1:]
    try:
        cst = entries_from_yaml(text) if form == "yaml" else parse_cst(text)
        if isinstance(cst, tuple):
            return spec_from_entries(cst, default_name=default_name)
        return spec_from_expression(cst, default_name=default_name)
    except SpecError as err:
        raise err.located(filename, text) from None


def parse_plan(text: str):
    """A plan written as in a spec, e.g. ``"checkpoint(segments=4)"``; `SpecError` otherwise."""
    if not text.strip():
        raise SpecError("empty plan", hint="write a plan: store, checkpoint(segments=K), reversible, implicit, "
                        "unroll or auto(budget=SIZE)").located("<plan>", text)
    try:
        return convert_plan(parse_cst(text, rule="value"))
    except SpecError as err:
        raise err.located("<plan>", text) from None


def decode_spec_bytes(data: bytes, filename: str) -> str:
    """UTF-8 text of a spec file; `SpecError` at the first byte that is not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        head = data[: err.start]
        line = head.count(b"\n") + 1
        column = err.start - (head.rfind(b"\n") + 1) + 1
        raise SpecError(
            f"not UTF-8 text (byte 0x{data[err.start]:02x})",
            line=line,
            column=column,
            hint="a spec is a UTF-8 text file (.gnn, .yaml or .yml)",
            filename=filename,
        ) from None
    text = text[1:] if text.startswith("\ufeff") else text
    if "\r" in text and "\n" not in text:
        # classic Mac OS line ends: lines for the parser and for error positions alike (the whole
        # file had been one line, "the line ends before the value does")
        text = text.replace("\r", "\n")
    return text


MAX_SPEC_BYTES = 16 * 2**20
"""The largest spec file read: a spec is a few lines; this bounds reading a device such as
``/dev/zero`` or a wrong file given by mistake."""


def _read_bounded(stream, shown: str) -> bytes:
    data = stream.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{shown} is larger than {MAX_SPEC_BYTES // 2**20} MiB, too large for a spec file",
                        filename=shown, hint="give the path of a .gnn or .yaml spec")
    return data


def read_spec_file(path: str | Path) -> tuple[str, str]:
    """(text, display name) of a spec file, or of standard input when ``path`` is "-"; at most
    :data:`MAX_SPEC_BYTES`."""
    if str(path) == "-":
        if sys.stdin is None:  # started with standard input closed
            raise SpecError(f"cannot read {STDIN_NAME}: standard input is closed", filename=STDIN_NAME,
                            hint="give the path of a .gnn or .yaml spec, or pipe one in")
        return decode_spec_bytes(_read_bounded(sys.stdin.buffer, STDIN_NAME), STDIN_NAME), STDIN_NAME
    if not str(path):
        raise SpecError("an empty file name", filename="<empty path>", hint="give the path of a .gnn or .yaml spec")
    p = Path(path)
    try:
        with p.open("rb") as stream:
            data = _read_bounded(stream, str(path))
    except FileNotFoundError:
        raise SpecError(f"no such file: {path}", filename=str(path), hint="give the path of a .gnn or .yaml spec") from None
    except IsADirectoryError:
        raise SpecError(f"{path} is a directory, not a spec file", filename=str(path)) from None
    except OSError as err:
        raise SpecError(f"cannot read {path}: {err.strerror}", filename=str(path)) from None
    return decode_spec_bytes(data, str(path)), str(path)


def load_spec_file(path: str | Path) -> Spec:
    """The IR of the spec file at ``path`` (name defaults to the file's stem)."""
    text, shown = read_spec_file(path)
    stem = Path(path).stem if str(path) != "-" else None
    return parse_text(text, filename=shown, name=stem)
