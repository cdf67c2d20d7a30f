"""Property tests of the spec language (SPEC.md sections 1 and 2), with hypothesis.

(a) Valid specs are generated from the vocabulary of the IR (every stage of ``STAGE_MODELS`` with
    the fields of its model, every op of ``OP_SIGNATURES`` with its parameters), with values in
    range and respecting the semantic rules, in a random layout (spacing, comments, continuation
    lines, ``>>`` at line start, bare expression or ``model:`` entry, CRLF) or in the YAML form.
    For each: ``parse(format(s)) == s``, ``format`` is idempotent on the IR and on the text (with
    comments kept), and the formatted text means the same spec.
(b) Random text and mutations of valid specs give a ``Spec`` or a ``SpecError`` whose position lies
    inside the text, never another exception.

Deterministic: every test runs ``derandomize=True`` (no example database), about 200 examples.
"""

from __future__ import annotations

import re
import string
import typing

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gnnspec
from gnnspec import ir
from gnnspec.errors import SHOWN_LINE
from gnnspec.format import format_spec

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ------------------------------------------------------------------------------------ vocabulary


def _literals(model: type, field: str) -> tuple[str, ...]:
    """The Literal choices of a field of an IR model (e.g. ``act`` -> relu, gelu, ...)."""
    out: list[str] = []

    def walk(annotation):
        origin = typing.get_origin(annotation)
        if origin is typing.Literal:
            out.extend(typing.get_args(annotation))
        else:
            for arg in typing.get_args(annotation):
                walk(arg)

    walk(model.model_fields[field].annotation)
    return tuple(out)


STAGES = dict(ir.STAGE_MODELS)
STACKS = set(ir.STACK_KINDS)
ACTS = _literals(ir.Stack, "act")
NORMS = _literals(ir.Stack, "norm")
JKS = _literals(ir.Plain, "jk")
SOLVERS = _literals(ir.Deq, "solver")
DTYPES = _literals(ir.Spec, "dtype")
OPTIMIZERS = _literals(ir.Train, "optimizer")
LOSSES = _literals(ir.Train, "loss")
BUILTIN_OPS = {name: sig for name, sig in ir.OP_SIGNATURES.items() if sig.builtin}
WIDTHS = (16, 24, 32, 48, 64, 80, 96, 120, 128, 240)
KEYWORDS = {"true", "false", "auto", "none"}

# Every field the generator knows how to fill; test_generator_covers_the_vocabulary keeps this
# list honest when the IR grows.
KNOWN_FIELDS = {
    "op", "depth", "hidden", "norm", "act", "dropout", "tie", "plan", "weight_decay", "jk", "groups",
    "alpha", "theta", "solver", "max_iter", "tol", "k", "dim", "bias", "dims", "p", "fn", "type", "project",
}


def stage_fields(kind: str) -> list[str]:
    return [f for f in STAGES[kind].model_fields if f not in ("kind", "spans")]


def test_generator_covers_the_vocabulary():
    missing = {(kind, f) for kind in STAGES for f in stage_fields(kind) if f not in KNOWN_FIELDS}
    assert not missing, f"the spec generator does not know these stage arguments: {sorted(missing)}"
    assert {"heads", "aggr", "t", "learn_t", "bases", "k"} >= {
        p.name for sig in BUILTIN_OPS.values() for p in sig.params
    }


# ------------------------------------------------------------------------------------ values
# A value is a list of tokens; the layout decides what goes between them.

Tokens = list[str]


def _int_text(n: int, underscores: bool) -> str:
    if underscores and n >= 1000:
        return f"{n:_}"
    return str(n)


@st.composite
def int_text(draw, lo: int, hi: int) -> str:
    n = draw(st.integers(lo, hi))
    return _int_text(n, draw(st.booleans()))


FLOAT_TEXTS = {
    # (lo, hi, inclusive hi) -> texts
    "unit_open": ("0", "0.0", "0.1", "0.25", "0.5", "0.75", "0.9", "0.999", "1e-1", "5e-2", "2.5e-1"),
    "unit_closed": ("0", "0.0", "0.1", "0.5", "1", "1.0", "0.05", "1e-2"),
    "positive": ("1", "0.5", "1.0", "2.5", "1e-3", "5e-4", "1e-05", "0.01", "3.0", "1e2", "1.5e-6"),
    "nonneg": ("0", "0.0", "5e-4", "0.01", "1e-5", "0.1", "1"),
}


def floats(kind: str):
    return st.sampled_from(FLOAT_TEXTS[kind])


def enum(choices):
    return st.sampled_from(tuple(choices))


@st.composite
def op_tokens(draw, width: int, kinds=None) -> Tokens:
    name = draw(enum(kinds or sorted(BUILTIN_OPS)))
    sig = BUILTIN_OPS[name]
    args: list[Tokens] = []
    for param in sig.params:
        default_heads_fit = param.name != sig.heads or width % int(param.default) == 0
        if default_heads_fit and not draw(st.booleans()):
            continue
        if param.name == sig.heads:
            divisors = [d for d in range(1, min(width, 16) + 1) if width % d == 0]
            value = str(draw(enum(divisors)))
        elif param.type == "enum":
            value = draw(enum(param.choices))
        elif param.type == "bool":
            value = draw(enum(("true", "false")))
        elif param.type == "int":
            value = draw(int_text(max(1, int(param.minimum or 1)), 8))
        else:
            value = draw(floats("positive"))
        args.append([param.name, "=", value])
    if not args and draw(st.booleans()):
        return [name]
    return _call(name, draw(st.permutations(args)) if args else [])


def _call(name: str, args: list[Tokens], trailing_comma: bool = False) -> Tokens:
    out = [name, "("]
    for i, arg in enumerate(args):
        if i:
            out.append(",")
        out += arg
    if trailing_comma and args:
        out.append(",")
    return out + [")"]


@st.composite
def plan_tokens(draw, stage_kind: str | None, model_kinds: set[str] | None = None) -> Tokens:
    """A plan valid for a stage (``stage_kind``) or for the whole spec (``model_kinds``)."""
    options = ["store"]
    kinds = {stage_kind} if stage_kind else (model_kinds or set())
    if kinds & STACKS:
        options.append("checkpoint")
    if "rev" in kinds:
        options.append("reversible")
    if "deq" in kinds:
        options += ["implicit", "unroll"]
    if stage_kind is None:
        options.append("auto")
    kind = draw(enum(options))
    if kind == "checkpoint" and draw(st.booleans()):
        return _call("checkpoint", [["segments", "=", draw(st.one_of(int_text(1, 64), st.just("auto")))]])
    if kind == "auto" and draw(st.booleans()):
        return _call("auto", [["budget", "=", draw(size_text())]])
    return [kind]


@st.composite
def size_text(draw) -> str:
    number = draw(st.sampled_from(("1", "2", "16", "512", "1_024", "1.5", "80", "0.5", "100")))
    unit = draw(st.sampled_from(("KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB")))
    return number + unit


@st.composite
def stage_tokens(draw, kind: str, spec_hidden: int) -> Tokens:
    """A stage of ``kind`` with a random subset of its arguments, valid under the semantic rules."""
    fields = stage_fields(kind)
    chosen = [f for f in fields if draw(st.integers(0, 2)) == 0]
    hidden = spec_hidden
    if "hidden" in chosen:
        hidden = draw(enum(WIDTHS))
    groups = 2
    if kind == "rev":
        options = [g for g in range(2, 9) if hidden % g == 0]
        groups = draw(enum(options))
        if groups != 2 and "groups" not in chosen:
            chosen.append("groups")
    width = hidden // groups if kind == "rev" else hidden
    tie = "tie" in chosen and draw(st.booleans())
    args: list[Tokens] = []
    first: Tokens | None = None
    for f in chosen:
        if f == "op":
            value = draw(op_tokens(width, ["gcn"] if kind == "gcnii" else None))
        elif f == "depth":
            value = [draw(int_text(1, 1 if kind == "dense" and tie else 1200))]
        elif f == "hidden":
            value = [str(hidden)]
        elif f == "groups":
            value = [str(groups)]
        elif f in ("norm", "type"):
            value = [draw(enum(NORMS))]
        elif f in ("act", "fn"):
            value = [draw(enum(ACTS))]
        elif f in ("dropout", "p"):
            value = [draw(floats("unit_open"))]
        elif f == "tie":
            value = ["true" if tie else "false"]
        elif f == "plan":
            value = draw(plan_tokens(kind))
        elif f == "weight_decay":
            value = [draw(st.one_of(floats("nonneg"), st.just("none")))]
        elif f == "jk":  # a dense stack's layers differ in width: jk=cat|max are refused there
            value = [draw(enum(JKS if kind != "dense" else ("none", "last")))]
        elif f == "alpha":
            value = [draw(floats("unit_closed"))]
        elif f in ("theta", "tol"):
            value = [draw(floats("positive"))]
        elif f == "solver":
            value = [draw(enum(SOLVERS))]
        elif f in ("max_iter", "k"):
            value = [draw(int_text(1, 100))]
        elif f == "dim":
            value = [draw(st.one_of(int_text(1, 4096), st.sampled_from(("auto", "none"))))]
        elif f == "bias":
            value = [draw(enum(("true", "false")))]
        elif f == "project":  # project=false cannot be tied
            value = ["true"] if tie else [draw(enum(("true", "false")))]
        elif f == "dims":
            items = draw(st.lists(int_text(1, 512), max_size=4))
            value = ["["] + [t for i, item in enumerate(items) for t in ([","] if i else []) + [item]]
            value += ([","] if items and draw(st.booleans()) else []) + ["]"]
        else:  # pragma: no cover - test_generator_covers_the_vocabulary fails first
            raise AssertionError(f"no generator for {kind}.{f}")
        if f == getattr(STAGES[kind], "positional", None) and draw(st.booleans()):
            first = value  # `dropout(0.5)`: the one positional argument, written first
        else:
            args.append([f, "="] + value)
    if kind == "dense" and tie and "depth" not in chosen:
        args.append(["depth", "=", "1"])
    args = ([first] if first else []) + draw(st.permutations(args))
    if not args and draw(st.booleans()):
        return [kind]
    return _call(kind, args, trailing_comma=draw(st.integers(0, 5)) == 0)


@st.composite
def model_tokens(draw, spec_hidden: int) -> tuple[Tokens, set[str]]:
    kinds = draw(st.lists(enum(sorted(STAGES)), min_size=1, max_size=4))
    tokens: Tokens = []
    for i, kind in enumerate(kinds):
        if i:
            tokens.append(">>")
        tokens += draw(stage_tokens(kind, spec_hidden))
    return tokens, set(kinds)


@st.composite
def entry_values(draw) -> dict[str, Tokens]:
    """Values (as tokens) for ``model`` and a random subset of the other keys."""
    hidden = draw(enum(WIDTHS))
    model, kinds = draw(model_tokens(hidden))
    entries: dict[str, Tokens] = {"model": model}
    if draw(st.booleans()) or hidden != 64:
        entries["hidden"] = [str(hidden)]
    for key in ("name", "in", "out", "seed", "dtype", "plan", "train", "graph"):
        if draw(st.integers(0, 2)):
            continue
        if key == "name":
            entries[key] = [draw(name_text())]
        elif key in ("in", "out"):
            entries[key] = [draw(st.one_of(int_text(1, 100_000), st.just("auto")))]
        elif key == "seed":
            entries[key] = [draw(int_text(0, 2**31))]
        elif key == "dtype":
            entries[key] = [draw(enum(DTYPES))]
        elif key == "plan":
            entries[key] = draw(plan_tokens(None, kinds))
        elif key == "train":
            entries[key] = draw(settings_tokens(TRAIN_SETTINGS, required=()))
        elif key == "graph":
            entries[key] = draw(settings_tokens(GRAPH_SETTINGS, required=("nodes", "edges")))
    graph = entries.get("graph", [])
    for i in range(0, len(graph), 4):  # a graph's features/classes agree with a given in/out (check.py)
        given = {"features": entries.get("in"), "classes": entries.get("out")}.get(graph[i])
        if given is not None and given[0] != "auto" and graph[i + 2] != "none":
            graph[i + 2] = given[0]
    return entries


@st.composite
def name_text(draw) -> str:
    ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True).filter(lambda s: s not in KEYWORDS)
    quoted = st.text(string.ascii_letters + string.digits + " _-.:#/'", max_size=12).map(lambda s: f'"{s}"')
    return draw(st.one_of(ident, quoted, st.sampled_from(['"auto"', '"none"', '"true"', '"res+"'])))


TRAIN_SETTINGS = {
    "optimizer": lambda: enum(OPTIMIZERS),
    "lr": lambda: floats("positive"),
    "weight_decay": lambda: floats("nonneg"),
    "momentum": lambda: floats("unit_open"),
    "epochs": lambda: int_text(1, 5000),
    "patience": lambda: st.one_of(int_text(1, 500), st.just("none")),
    "loss": lambda: enum(LOSSES),
}
GRAPH_SETTINGS = {
    "nodes": lambda: int_text(1, 10**9),
    "edges": lambda: int_text(0, 10**10),
    "features": lambda: st.one_of(int_text(1, 4096), st.just("none")),
    "classes": lambda: st.one_of(int_text(1, 512), st.just("none")),
}


@st.composite
def settings_tokens(draw, table, required) -> Tokens:
    names = [n for n in table if n in required or draw(st.booleans())]
    if not names:
        names = [draw(enum(list(table)))]
    names = draw(st.permutations(names))
    tokens: Tokens = []
    for i, name in enumerate(names):
        tokens += ([","] if i else []) + [name, "=", draw(table[name]())]
    return tokens


# ------------------------------------------------------------------------------------ layout

COMMENTS = ("#", "# a comment", "#no space", "# (unbalanced [ brackets", "# quotes ' and \"", "# ünïcödé ✓",
            "# key: value >> rev(depth=2)")


@st.composite
def gap(draw, before: str, after: str, breaks: bool) -> str:
    """What goes between two tokens of a value: spaces, or a line break that continues the value."""
    if breaks and draw(st.integers(0, 5)) == 0:
        text = " " * draw(st.integers(0, 2))
        if draw(st.booleans()):
            text += draw(enum(COMMENTS))
        text += "\n"
        for _ in range(draw(st.integers(0, 2))):
            text += draw(st.sampled_from(("", "   ", "  " + COMMENTS[1], COMMENTS[2]))) + "\n"
        unindented_ok = after in (">>", ")", "]")
        indent = draw(st.sampled_from(("", " ", "  ", "        ", "\t") if unindented_ok else (" ", "    ", "\t", " \t")))
        return text + indent
    if after in ("(", ")", ",", "]") or before in ("(", "["):
        return draw(st.sampled_from(("", "", "", " ")))
    return draw(st.sampled_from(("", " ", " ", "  ")))


@st.composite
def render_value(draw, tokens: Tokens, breaks: bool) -> str:
    out = tokens[0]
    for before, after in zip(tokens, tokens[1:]):
        out += draw(gap(before, after, breaks)) + after
    return out


@st.composite
def gnn_text(draw) -> str:
    """A valid `.gnn` text: a bare expression or `key: value` entries, in a random layout."""
    entries = draw(entry_values())
    breaks = draw(st.booleans())
    head = ""
    for _ in range(draw(st.integers(0, 2))):
        head += draw(st.sampled_from(COMMENTS + ("",))) + "\n"
    if len(entries) == 1 and draw(st.booleans()):
        body = draw(render_value(entries["model"], breaks))
    else:
        keys = draw(st.permutations(list(entries)))
        lines = []
        for key in keys:
            sep = draw(st.sampled_from((": ", ":", " : ", ":    ", ":\t")))
            value = draw(render_value(entries[key], breaks))
            if breaks and draw(st.integers(0, 6)) == 0:
                sep = ":\n" + draw(st.sampled_from(("  ", "    ", "\t")))  # the value on the next line
            line = key + sep + value
            if draw(st.integers(0, 3)) == 0:
                line += draw(st.sampled_from(("  ", " ", "\t"))) + draw(enum(COMMENTS))
            lines.append(line)
            for _ in range(draw(st.integers(0, 1))):
                lines.append(draw(st.sampled_from(("", "   ", COMMENTS[1], "  " + COMMENTS[3]))))
        body = "\n".join(lines)
    text = head + body + draw(st.sampled_from(("", "\n", "\n\n", "\n# the end\n", "  \n", " # trailing")))
    if draw(st.integers(0, 5)) == 0:
        text = text.replace("\n", "\r\n")
    return text


YAML_WORDS = {"yes", "no", "on", "off", "null", "y", "n", "true", "false", "~"}


def _yaml_plain_ok(value: str) -> bool:
    return not re.search(r"^[\[\]{}>|*&!%@`'\"#,?:-]|: | #|\s$|^\s", value) and "\n" not in value


@st.composite
def yaml_text(draw) -> str:
    """A valid YAML spec: string values in plain, quoted or folded style, mappings for graph/train."""
    entries = draw(entry_values())
    keys = draw(st.permutations(list(entries)))
    lines = []
    if draw(st.booleans()):
        lines.append(draw(enum(COMMENTS)))
    for key in keys:
        tokens = entries[key]
        value = draw(render_value(tokens, breaks=False))
        if key in ("graph", "train") and draw(st.booleans()):
            pairs = []
            i = 0
            while i < len(tokens):
                pairs.append((tokens[i], tokens[i + 2]))
                i += 4
            if draw(st.booleans()):
                lines.append(f"{key}: {{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}")
            else:
                lines.append(f"{key}:")
                lines += [f"  {k}: {v}" for k, v in pairs]
            continue
        if key in ("hidden", "seed", "in", "out") and tokens[0].isdigit():
            lines.append(f"{key}: {tokens[0]}")  # a YAML int
            continue
        if key == "name":
            value = tokens[0]
            if value.startswith('"'):
                lines.append(f"{key}: '" + value.replace("'", "''") + "'")  # a YAML string holding a quoted name
                continue
        if key == "model" and ">>" in tokens and draw(st.integers(0, 2)) == 0:
            stages, current = [], []
            for t in tokens + [">>"]:
                if t == ">>":
                    stages.append(draw(render_value(current, breaks=False)))
                    current = []
                else:
                    current.append(t)
            lines.append("model:")
            lines += [f"  - {s}" if _yaml_plain_ok(s) else f"  - '{s}'" for s in stages]
            continue
        style = draw(st.sampled_from(("plain", "double", "single", "folded", "literal")))
        if style == "plain" and _yaml_plain_ok(value):
            lines.append(f"{key}: {value}" + (draw(st.sampled_from(("", "  # comment")))))
        elif style == "double" and '"' not in value and "\\" not in value:
            lines.append(f'{key}: "{value}"')
        elif style == "folded" or style == "literal":
            # folded: line breaks between tokens become spaces; literal: break only before `>>`
            parts = re.split(r"\s*>>\s*", value) if style == "literal" else value.split()
            joiner = ">> " if style == "literal" else ""
            lines.append(f"{key}: " + (">" if style == "folded" else "|"))
            lines += ["  " + (joiner if i and style == "literal" else "") + p for i, p in enumerate(parts)]
        else:
            lines.append(f"{key}: '" + value.replace("'", "''") + "'")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ (a) valid specs


def _round_trip(spec: gnnspec.Spec) -> None:
    text = gnnspec.format(spec)
    again = gnnspec.parse(text)
    assert again == spec, f"parse(format(s)) != s\n--- format(s):\n{text}"
    assert gnnspec.format(again) == text, "format is not idempotent"


@FUZZ
@given(gnn_text())
@example("rev(groups=2, depth=1001, op=gat, tie=true)")
@example("model: linear\n        >> rev(groups=2, depth=1001, op=gen(aggr=softmax, learn_t=true), norm=layer, "
         "dropout=0.1)\n        >> linear\nplan:   auto(budget=16GiB)\n")
def test_gnn_round_trip(text):
    spec = gnnspec.parse(text)
    _round_trip(spec)
    formatted = gnnspec.format(text)  # comments kept
    assert gnnspec.parse(formatted) == spec, f"format(text) changed the spec\n--- formatted:\n{formatted}"
    assert gnnspec.format(formatted) == formatted, f"format(text) is not idempotent\n--- once:\n{formatted}"


@FUZZ
@given(yaml_text())
def test_yaml_round_trip(text):
    spec = gnnspec.parse(text, form="yaml")
    _round_trip(spec)
    formatted = gnnspec.format(text, form="yaml")
    assert gnnspec.parse(formatted, form="yaml") == spec, f"YAML format changed the spec\n--- formatted:\n{formatted}"
    assert gnnspec.format(formatted, form="yaml") == formatted, f"YAML format not idempotent\n--- once:\n{formatted}"


@FUZZ
@given(gnn_text())
def test_gnn_and_yaml_forms_agree(text):
    """A spec written out in the YAML style by the formatter reads back as the same spec."""
    spec = gnnspec.parse(text)
    as_yaml = format_spec(spec, style="yaml")
    assert gnnspec.parse(as_yaml, form="yaml") == spec, f"--- YAML:\n{as_yaml}"


# ------------------------------------------------------------------------------------ (b) robustness

NASTY = (
    list("()[]=,:>#\"'+-._ \t\n\r")
    + ["\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u00a0", "\u2028", "\u2029", "\ufeff", "\ud7ff",
       "é", "ß", "λ", "中", "\U0001f600", "\u0301", "\u202e"]
    + [">>", "\n  ", "\n>>", "model:", "rev(", "depth=", "1e309", "1_", "GiB", "true", "none", "auto", "res+"]
)


# Characters that str.splitlines() and YAML treat as line breaks but the grammar does not.
_OTHER_BREAKS = re.compile("\r(?!\n)|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _outcome_ok(text: str, form: str) -> None:
    try:
        result = gnnspec.parse(text, form=form)
    except gnnspec.SpecError as err:
        lines = text.splitlines()
        assert isinstance(err.line, int) and isinstance(err.column, int)
        assert 1 <= err.line <= len(lines) + 1, (err.line, len(lines), str(err))
        assert err.column >= 1, (err.column, str(err))
        physical = text.split("\n")
        if err.line <= len(physical) and not _OTHER_BREAKS.search(text):
            assert err.column <= len(physical[err.line - 1]) + 1, (err.column, str(err))
        rendered = str(err)  # rendering never fails either
        assert rendered.startswith(f"<spec>:{err.line}:{err.column}: ")
        for word in ("_COMMA", "RPAR", "__ANON", "$END", "_SEP", "Token("):
            assert word not in rendered, rendered
    else:
        assert isinstance(result, gnnspec.Spec)


@st.composite
def mutated(draw, source):
    text = draw(source)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(("delete", "insert", "replace", "swap", "truncate", "duplicate")))
        i = draw(st.integers(0, len(text)))
        if how == "delete" and text:
            j = draw(st.integers(i, min(len(text), i + 3)))
            text = text[:i] + text[j:]
        elif how == "insert":
            text = text[:i] + draw(st.one_of(st.sampled_from(NASTY), st.characters())) + text[i:]
        elif how == "replace" and i < len(text):
            text = text[:i] + draw(st.one_of(st.sampled_from(NASTY), st.characters())) + text[i + 1:]
        elif how == "swap":
            tokens = re.findall(r"\w+\+?|>>|\s+|.", text, flags=re.S)
            if len(tokens) >= 2:
                a = draw(st.integers(0, len(tokens) - 1))
                b = draw(st.integers(0, len(tokens) - 1))
                tokens[a], tokens[b] = tokens[b], tokens[a]
                text = "".join(tokens)
        elif how == "truncate":
            text = text[:i]
        elif how == "duplicate":
            j = draw(st.integers(i, len(text)))
            text = text[:j] + text[i:j] + text[j:]
    return text


@FUZZ
@given(mutated(gnn_text()))
def test_mutated_gnn_text(text):
    _outcome_ok(text, "gnn")
    _outcome_ok(text, "yaml")


@FUZZ
@given(mutated(yaml_text()))
def test_mutated_yaml_text(text):
    _outcome_ok(text, "yaml")
    _outcome_ok(text, "gnn")


@FUZZ
@given(st.one_of(st.text(max_size=80), st.lists(st.sampled_from(NASTY), max_size=30).map("".join),
                 st.binary(max_size=60).map(lambda b: b.decode("utf-8", errors="replace"))))
def test_random_text(text):
    _outcome_ok(text, "gnn")
    _outcome_ok(text, "yaml")


@FUZZ
@given(mutated(gnn_text()))
def test_error_shows_the_line_it_points_at(text):
    """The caret display quotes the line the position is on (lines end at \\n only; characters a
    terminal would not show are shown as spaces)."""
    try:
        gnnspec.parse(text)
    except gnnspec.SpecError as err:
        lines = text.split("\n")
        if err.line <= len(lines):
            shown = lines[err.line - 1].rstrip("\r").expandtabs(1)
            shown = "".join(c if c.isprintable() else " " for c in shown)
            if len(shown) <= SHOWN_LINE:
                assert "\n  " + shown + "\n" in str(err) + "\n", str(err)
            else:  # a window of the line around the column
                window, n = str(err).split("\n")[1][2:], SHOWN_LINE
                assert any(window == ("..." if i else "") + shown[i : i + n] + ("..." if i + n < len(shown) else "")
                           for i in range(len(shown) - n + 1)), str(err)


# ------------------------------------------------------------------------------------ regressions
# Counterexamples the properties above found once, kept as plain tests.


@pytest.mark.parametrize("name", ["my model", "a-b", "x:y", "", "03", "auto", "none", "true"])
def test_yaml_format_quotes_names(name):
    source = "name: '" + format_scalar_for_test(name).replace("'", "''") + "'\nmodel: linear\n"
    spec = gnnspec.parse(source, form="yaml")
    assert spec.name == name
    formatted = gnnspec.format(source, form="yaml")
    assert gnnspec.parse(formatted, form="yaml") == spec, formatted


def format_scalar_for_test(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_format_escapes_line_breaks_in_names():
    spec = gnnspec.parse('name: "a\\nb"\nmodel: linear')
    assert spec.name == "a\nb"
    assert gnnspec.parse(gnnspec.format(spec)) == spec


def test_yaml_format_keeps_trailing_comments():
    formatted = gnnspec.format("model: linear  # the model\nseed: 3  # lucky\n", form="yaml")
    assert "# the model" in formatted and "# lucky" in formatted, formatted


def test_yaml_format_keeps_comment_after_block_mapping():
    text = "model: linear\ngraph:\n  nodes: 1\n  edges: 2\n# about the seed\nseed: 1\n"
    formatted = gnnspec.format(text, form="yaml")
    assert formatted.index("# about the seed") > formatted.index("edges"), formatted
    assert gnnspec.format(formatted, form="yaml") == formatted
