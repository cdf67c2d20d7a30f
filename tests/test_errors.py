"""The error catalogue: every way a spec can be wrong, and exactly what the user is told.

Each row is ``(id, text, form, line, column, message, hint)``: ``gnnspec.parse(text, form=form)``
must raise `gnnspec.SpecError` at exactly ``line``:``column`` (1-based), with ``message`` a
substring of ``err.message`` and ``hint`` a substring of ``err.hint`` (``None``: the row does not
constrain the hint). Every rendering (``str(err)``) must start with ``<spec>:LINE:COL:``, quote the
offending source line with a caret under the column, and never leak a Lark terminal name.

Rows marked ``xfail(strict=True)`` are known bugs or poor messages in gnnspec: the row states what
gnnspec *should* say; the reason says what it says today. Fixing the bug turns the row into an
XPASS, which fails the run until the mark is removed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gnnspec
from gnnspec import SpecError
from gnnspec.errors import SHOWN_LINE


def bug(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


def row(id_, text, form, line, column, message, hint=None, marks=()):
    return pytest.param(text, form, line, column, message, hint, id=id_, marks=marks)


DEEP = 300  # nesting depth of the deep-nesting rows

CATALOGUE = [
    # ---------------------------------------------------------------- syntax
    row("missing-rparen-at-end", "model: rev(depth=4", "gnn", 1, 19,
        "unexpected end of the spec; expected a comma or `)`", "every `(` needs a matching `)`"),
    row("missing-rparen-before-next-entry", "model: linear >> rev(depth=4\nseed: 1", "gnn", 1, 29,
        "unexpected end of line; expected a comma or `)`", "every `(` needs a matching `)`"),
    row("missing-rparen-bare-expression", "rev(depth=4, op=gat(heads=2)", "gnn", 1, 29,
        "expected a comma or `)`", "matching `)`"),
    row("missing-rsqb-at-end", "model: mlp(dims=[1, 2", "gnn", 1, 22,
        "expected a comma or `]`", "every `[` needs a matching `]`"),
    row("missing-rsqb-closed-by-rparen", "model: mlp(dims=[1, 2)", "gnn", 1, 22,
        "unexpected `)`; expected a comma or `]`"),
    row("stray-dollar", "model: rev(depth=4) $", "gnn", 1, 21, "unexpected character `$`"),
    row("stray-at-sign-at-start", "@model: linear", "gnn", 1, 1, "unexpected character `@`"),
    row("stray-semicolon-in-call", "model: rev(depth=4; op=gcn)", "gnn", 1, 19, "unexpected character `;`"),
    row("dash-in-name", "model: linear >> res-plus", "gnn", 1, 21, "unexpected character `-`",
        "names are letters, digits and `_`"),
    row("colon-inside-call", "model: rev(depth: 4)", "gnn", 1, 17, "unexpected `:`",
        "arguments are written `name=value`"),
    row("colon-inside-op-call", "model: rev(op=gat(heads: 2))", "gnn", 1, 24, "unexpected `:`",
        "arguments are written `name=value`"),
    row("continuation-not-indented-inside-call", "model: rev(\ndepth=2)", "gnn", 1, 12,
        "expected a value or `)`", "a value continues on lines that are indented or start with `>>`"),
    row("continuation-not-indented-next-stage", "model: linear\nrev(depth=2)", "gnn", 2, 4,
        "unexpected `(`; expected `:`", "a value continues on lines that are indented or start with `>>`"),
    row("continuation-not-indented-bare-stage", "model: linear\nrev", "gnn", 2, 4,
        "expected `:`", "a value continues on lines that are indented or start with `>>`"),
    row("single-gt-instead-of-chain", "model: linear > rev", "gnn", 1, 15, "unexpected character `>`",
        "stages are joined by `>>`"),
    row("dangling-chain-at-end", "model: linear >>", "gnn", 1, 17, "unexpected end of the spec; expected a value"),
    row("dangling-chain-before-next-entry", "model: linear >>\nseed: 1", "gnn", 1, 17,
        "unexpected end of line; expected a value"),
    row("dangling-chain-bare-expression", "linear >> rev >>  ", "gnn", 1, 17, "expected a value"),
    row("double-chain", "model: linear >> >> rev", "gnn", 1, 18, "unexpected `>>`; expected a value"),
    row("unterminated-double-quoted-string", 'name: "abc\nmodel: linear', "gnn", 1, 7,
        'unexpected character `"`', "a string ends on the line where it starts"),
    row("unterminated-single-quoted-string", "model: linear\nname: 'abc", "gnn", 2, 7,
        "unexpected character `'`", "a string ends on the line where it starts"),
    row("bare-kwargs-for-model", "model: depth=4, op=gcn", "gnn", 1, 8, "got a `name=value` list"),
    row("bare-kwargs-expression", "depth=4, op=gcn", "gnn", 1, 6, "unexpected `=`",
        "`name=value` arguments go inside a call's parentheses"),
    row("comma-between-stages", "model: linear, rev", "gnn", 1, 14, "unexpected `,`",
        "only `graph` and `train` take a bare `name=value, ...` list"),
    row("missing-comma-between-arguments", "model: rev(depth=4 op=gcn)", "gnn", 1, 20,
        "unexpected name `op`; expected `>>`, a comma or `)`", "comma"),
    row("equals-after-key", "hidden = 64\nmodel: linear", "gnn", 1, 8, "unexpected `=`", "`:`"),
    row("missing-colon-after-key", "model linear", "gnn", 1, 7, "unexpected name `linear`", "followed by `:`"),
    row("key-without-value", "model:", "gnn", 1, 7, "unexpected end of the spec; expected a value"),
    row("key-without-value-then-entry", "model:\nseed: 1", "gnn", 1, 7, "expected a value"),
    row("colon-alone", ":", "gnn", 1, 1, "unexpected `:`", "`key: value` entries start at column 0"),
    row("call-of-a-call", "model: rev(op=gat(heads=2)(x))", "gnn", 1, 27, "unexpected `(`"),
    row("space-inside-res-plus", "model: res +(depth=2)", "gnn", 1, 12, "unexpected character `+`"),
    row("closing-paren-at-column-0", "model: linear\n)", "gnn", 2, 1, "unexpected `)`"),
    row("entry-indented-after-entry", "model: linear\nseed: 1\n  hidden: 3", "gnn", 3, 3, "unexpected name `hidden`",
        "entries start at column 0"),
    row("size-unit-wrong-case", "model: linear\nplan: auto(budget=16Gib)", "gnn", 2, 21, "`Gib`", "GiB"),
    row("size-unit-lower-case", "model: linear\nplan: auto(budget=16gb)", "gnn", 2, 21, "`gb`", "GB"),
    row("invisible-control-character", "model: linear\x1b", "gnn", 1, 14, "U+001B"),
    row("byte-order-mark-in-middle", "model: linear\n\ufeffseed: 1", "gnn", 2, 1, "U+FEFF"),
    # ---------------------------------------------------------------- unknown names, "did you mean"
    row("unknown-key", "modle: linear", "gnn", 1, 1, "unknown key `modle`", "did you mean `model`?"),
    row("unknown-key-after-model", "model: linear\nhiden: 8", "gnn", 2, 1, "unknown key `hiden`",
        "did you mean `hidden`?"),
    row("unknown-stage", "model: linaer", "gnn", 1, 8, "unknown stage `linaer`", "did you mean `linear`?"),
    row("unknown-stage-in-pipeline", "model: linear >> revv(depth=2)", "gnn", 1, 18, "unknown stage `revv`",
        "did you mean `rev`?"),
    row("res-plus-spelled-out", "model: res_plus(depth=2)", "gnn", 1, 8, "unknown stage `res_plus`",
        "did you mean `res+`?"),
    row("op-used-as-stage", "model: gat", "gnn", 1, 8, "unknown stage `gat`", "`gat` is an op"),
    row("unknown-op", "model: rev(op=gatt)", "gnn", 1, 15, "unknown op `gatt`", "did you mean `gat`?"),
    row("unknown-op-call", "model: plain(op=sagee(aggr=max))", "gnn", 1, 17, "unknown op `sagee`",
        "did you mean `sage`?"),
    row("unknown-stage-argument", "model: rev(dpeth=4)", "gnn", 1, 12, "`rev` has no argument `dpeth`",
        "did you mean `depth`?"),
    row("unknown-stage-argument-linear", "model: linear(dims=4)", "gnn", 1, 15,
        "`linear` has no argument `dims`", "did you mean `dim`?"),
    row("unknown-op-argument", "model: rev(op=gat(haeds=2))", "gnn", 1, 19, "op `gat` has no argument `haeds`",
        "did you mean `heads`?"),
    row("op-takes-no-arguments", "model: plain(op=gcn(heads=2))", "gnn", 1, 21, "op `gcn` has no argument `heads`",
        "`gcn` takes no arguments"),
    row("unknown-act", "model: rev(act=reluu)", "gnn", 1, 16, "unknown value `reluu` for `act`",
        "did you mean `relu`?"),
    row("unknown-act-positional", "model: act(relux)", "gnn", 1, 12, "unknown value `relux` for `act`",
        "did you mean `relu`?"),
    row("unknown-norm", "model: rev(norm=layr)", "gnn", 1, 17, "unknown value `layr` for `norm`",
        "did you mean `layer`?"),
    row("unknown-norm-positional", "model: norm(layerr)", "gnn", 1, 13, "unknown value `layerr`",
        "did you mean `layer`?"),
    row("unknown-aggr-sage", "model: plain(op=sage(aggr=maen))", "gnn", 1, 27, "unknown value `maen` for `aggr`",
        "did you mean `mean`?"),
    row("unknown-aggr-gen", "model: res+(op=gen(aggr=softmx))", "gnn", 1, 25,
        "unknown value `softmx` for `aggr`", "did you mean `softmax`?"),
    row("unknown-jk", "model: plain(jk=lst)", "gnn", 1, 17, "unknown value `lst` for `jk`", "did you mean `last`?"),
    row("unknown-solver", "model: deq(solver=andersen)", "gnn", 1, 19, "unknown value `andersen` for `solver`",
        "did you mean `anderson`?"),
    row("unknown-dtype", "model: linear\ndtype: float33", "gnn", 2, 8, "unknown value `float33` for `dtype`",
        "did you mean `float32`?"),
    row("unknown-dtype-bf16", "model: linear\ndtype: bf16", "gnn", 2, 8, "unknown value `bf16` for `dtype`",
        "valid: float32, bfloat16, float16, float64"),
    row("unknown-optimizer", "model: linear\ntrain: optimizer=adamm", "gnn", 2, 18,
        "unknown value `adamm` for `optimizer`", "did you mean `adam`?"),
    row("unknown-loss", "model: linear\ntrain: loss=cee", "gnn", 2, 13, "unknown value `cee` for `loss`",
        "did you mean `ce`?"),
    row("unknown-plan", "model: linear\nplan: chekpoint", "gnn", 2, 7, "unknown plan `chekpoint`",
        "did you mean `checkpoint`?"),
    row("unknown-stage-plan", "model: rev(plan=reversable)", "gnn", 1, 17, "unknown plan `reversable`",
        "did you mean `reversible`?"),
    row("unknown-plan-argument", "model: plain(plan=checkpoint(segmnts=4))", "gnn", 1, 30,
        "`checkpoint` has no argument `segmnts`", "did you mean `segments`?"),
    row("unknown-train-setting", "model: linear\ntrain: lrr=0.1", "gnn", 2, 8, "`train` has no argument `lrr`",
        "did you mean `lr`?"),
    row("unknown-graph-setting", "model: linear\ngraph: nodes=1, edgs=2", "gnn", 2, 17,
        "`graph` has no argument `edgs`", "did you mean `edges`?"),
    # ---------------------------------------------------------------- semantic rules (SPEC.md section 2)
    row("rev-groups-1", "model: rev(groups=1)", "gnn", 1, 19, "`groups` must be at least 2, got 1"),
    row("rev-groups-0", "model: rev(groups=0, depth=4)", "gnn", 1, 19, "`groups` must be at least 2, got 0"),
    row("rev-hidden-not-divisible-spec-hidden", "hidden: 64\nmodel: rev(groups=3)", "gnn", 2, 19,
        "`hidden` (64) is not divisible by `groups` (3)", "try groups=4"),
    row("rev-hidden-not-divisible-stage-hidden", "model: rev(groups=3, hidden=64)", "gnn", 1, 19,
        "`hidden` (64) is not divisible by `groups` (3)"),
    row("rev-stage-hidden-odd-default-groups", "model: rev(hidden=63)", "gnn", 1, 19,
        "`hidden` (63) is not divisible by `groups` (2)"),
    row("heads-do-not-divide-width", "model: plain(op=gat(heads=5))", "gnn", 1, 27,
        "5 attention heads do not divide the width 64", "try heads=4"),
    row("heads-do-not-divide-stage-hidden", "model: res+(op=transformer(heads=3), hidden=128)", "gnn", 1, 34,
        "3 attention heads do not divide the width 128"),
    row("heads-do-not-divide-rev-group-width", "model: rev(op=gat(heads=3), groups=2)", "gnn", 1, 25,
        "3 attention heads do not divide the width hidden/groups = 32", "try heads=4"),
    row("heads-divide-hidden-but-not-group-width", "model: rev(op=gatv2(heads=64))", "gnn", 1, 27,
        "64 attention heads do not divide the width hidden/groups = 32"),
    row("default-heads-do-not-divide-rev-group-width", "hidden: 24\nmodel: rev(op=transformer, groups=4)", "gnn",
        2, 15, "4 attention heads do not divide the width hidden/groups = 6", "try heads=3"),
    row("depth-0", "model: plain(depth=0)", "gnn", 1, 20, "`depth` must be at least 1, got 0"),
    row("depth-negative", "model: res(op=gcn, depth=-1)", "gnn", 1, 26, "`depth` must be at least 1, got -1"),
    row("dropout-1", "model: plain(dropout=1.0)", "gnn", 1, 22, "dropout must be in [0, 1), got 1.0",
        "probability"),
    row("dropout-negative", "model: plain(dropout=-0.1)", "gnn", 1, 22, "dropout must be in [0, 1), got -0.1"),
    row("dropout-stage-positional", "model: linear >> dropout(1.5)", "gnn", 1, 26, "dropout must be in [0, 1)"),
    row("dropout-mlp", "model: mlp(dropout=1)", "gnn", 1, 20, "dropout must be in [0, 1)"),
    row("in-zero", "in: 0\nmodel: linear", "gnn", 1, 5, "`in` must be positive, got 0"),
    row("out-negative", "out: -3\nmodel: linear", "gnn", 1, 6, "`out` must be positive, got -3"),
    row("hidden-zero", "hidden: 0\nmodel: linear", "gnn", 1, 9, "`hidden` must be positive, got 0"),
    row("stage-hidden-zero", "model: plain(hidden=0)", "gnn", 1, 21, "`hidden` must be positive, got 0"),
    row("linear-dim-zero", "model: linear(dim=0)", "gnn", 1, 19, "`dim` must be positive, got 0"),
    row("mlp-dims-zero", "model: mlp(dims=[4, 0])", "gnn", 1, 21, "widths in `dims` must be positive, got 0"),
    row("stage-argument-twice", "model: plain(depth=2, depth=3)", "gnn", 1, 23, "argument `depth` given twice",
        "first given at line 1, column 20"),
    row("op-argument-twice", "model: plain(op=gat(heads=2, heads=2))", "gnn", 1, 30, "argument `heads` given twice"),
    row("positional-and-keyword", "model: dropout(0.5, p=0.2)", "gnn", 1, 21, "argument `p` given twice"),
    row("two-positionals", "model: dropout(0.5, 0.2)", "gnn", 1, 21, "one positional argument"),
    row("positional-not-allowed", "model: plain(op=gcn, 4)", "gnn", 1, 22, "`plain` takes no positional argument",
        "write `name=value`"),
    row("op-positional-not-allowed", "model: plain(op=gat(2))", "gnn", 1, 21, "op `gat` takes no positional argument"),
    row("key-twice", "model: linear\nseed: 1\nseed: 2", "gnn", 3, 1, "key `seed` given twice",
        "first given on line 2"),
    row("model-key-twice", "model: linear\nmodel: rev", "gnn", 2, 1, "key `model` given twice"),
    row("missing-model", "seed: 1\nhidden: 8", "gnn", 1, 1, "missing key `model`", "model: <pipeline>"),
    row("plan-reversible-on-plain", "model: plain(plan=reversible)", "gnn", 1, 19,
        "plan `reversible` is not valid for `plain`", "valid here: store, checkpoint"),
    row("plan-implicit-on-rev", "model: rev(plan=implicit)", "gnn", 1, 17, "plan `implicit` is not valid for `rev`",
        "valid here: store, checkpoint, reversible"),
    row("plan-reversible-on-deq", "model: deq(plan=reversible)", "gnn", 1, 17,
        "plan `reversible` is not valid for `deq`", "implicit, unroll"),
    row("plan-auto-on-stage", "model: plain(plan=auto)", "gnn", 1, 19, "`auto` chooses plans for the whole spec"),
    row("plan-on-linear", "model: linear(plan=store)", "gnn", 1, 15, "`linear` has no argument `plan`"),
    row("spec-plan-reversible-without-rev", "model: linear >> plain\nplan: reversible", "gnn", 2, 7,
        "plan `reversible` applies to `rev` stages; this model has none"),
    row("spec-plan-unroll-without-deq", "model: rev\nplan: unroll", "gnn", 2, 7,
        "plan `unroll` applies to `deq` stages; this model has none"),
    row("spec-plan-checkpoint-without-stack", "model: linear >> mlp\nplan: checkpoint", "gnn", 2, 7,
        "plan `checkpoint` applies to", "use `store` or `auto`"),
    row("jk-on-rev", "model: rev(jk=cat)", "gnn", 1, 12, "`rev` has no argument `jk`",
        "keeps no layer outputs for jumping knowledge"),
    row("jk-on-deq", "model: deq(jk=last)", "gnn", 1, 12, "`deq` has no argument `jk`", "one fixed point"),
    row("gcnii-with-gat", "model: gcnii(op=gat)", "gnn", 1, 17, "`op=gat` is not supported", "leave `op` out"),
    row("dense-tie", "model: dense(tie=true, depth=3)", "gnn", 1, 18, "`tie` cannot share weights in a `dense` stack"),
    row("dense-jk-cat", "model: dense(jk=cat, depth=3)", "gnn", 1, 17, "`jk=cat` is not defined on a `dense` stack",
        "use `jk=last`"),
    row("dense-jk-max", "model: dense(depth=2, jk=max)", "gnn", 1, 26, "`jk=max` is not defined on a `dense` stack"),
    row("plain-tie-unprojected", "model: plain(project=false, tie=true, depth=3)", "gnn", 1, 33,
        "`tie` cannot share weights with `project=false`", "drop one of them"),
    row("gen-t-zero", "model: plain(op=gen(t=0))", "gnn", 1, 23, "`t` of `gen` must be above 0"),
    row("cheb-k-zero", "model: plain(op=cheb(k=0))", "gnn", 1, 24, "`k` of `cheb` must be at least 1"),
    row("appnp-alpha", "model: appnp(alpha=2)", "gnn", 1, 20, "`alpha` must be in [0, 1]"),
    row("deq-tol-zero", "model: deq(tol=0)", "gnn", 1, 16, "`tol` must be positive"),
    row("segments-zero", "model: plain(plan=checkpoint(segments=0))", "gnn", 1, 39, "`segments` must be at least 1"),
    row("train-lr-zero", "model: linear\ntrain: lr=0", "gnn", 2, 11, "`lr` must be positive"),
    row("train-momentum-1", "model: linear\ntrain: momentum=1", "gnn", 2, 17, "`momentum` must be in [0, 1)"),
    row("train-epochs-zero", "model: linear\ntrain: optimizer=sgd, epochs=0", "gnn", 2, 30, "`epochs` must be at least 1"),
    row("seed-negative", "model: linear\nseed: -1", "gnn", 2, 7, "`seed` must be at least 0"),
    row("graph-nodes-zero", "model: linear\ngraph: nodes=0, edges=1", "gnn", 2, 14, "`nodes` must be at least 1"),
    row("graph-missing-edges", "model: linear\ngraph: nodes=5", "gnn", 2, 8, "`graph` needs `nodes` and `edges`",
        "graph: nodes="),
    # ---------------------------------------------------------------- wrong value types, sizes
    row("float-for-depth", "model: plain(depth=2.5)", "gnn", 1, 20, "`depth` must be an integer, got `2.5`",
        "write a whole number"),
    row("whole-float-for-depth", "model: plain(depth=2.0)", "gnn", 1, 20, "`depth` must be an integer"),
    row("string-for-bool", 'model: plain(tie="true")', "gnn", 1, 18, "`tie` must be `true` or `false`"),
    row("name-for-bool", "model: linear(bias=yes)", "gnn", 1, 20, "`bias` must be `true` or `false`, got `yes`"),
    row("list-for-int", "model: plain(depth=[1, 2])", "gnn", 1, 20, "`depth` must be an integer, got a list"),
    row("float-in-int-list", "model: mlp(dims=[64, 1.5])", "gnn", 1, 22, "`dims` must be a list of integers"),
    row("int-for-int-list", "model: mlp(dims=4)", "gnn", 1, 17, "`dims` must be a list of integers"),
    row("bool-for-float", "model: plain(dropout=true)", "gnn", 1, 22, "`dropout` must be a number, got `true`"),
    row("string-for-float", 'model: plain(dropout="0.1")', "gnn", 1, 22, "`dropout` must be a number"),
    row("float-for-hidden", "hidden: 1.5\nmodel: linear", "gnn", 1, 9, "`hidden` must be an integer, got `1.5`",
        "write a whole number"),
    row("auto-for-hidden", "hidden: auto\nmodel: linear", "gnn", 1, 9, "`hidden` must be an integer, got `auto`"),
    row("size-for-in", "in: 8GiB\nmodel: linear", "gnn", 1, 5, "`in` must be an integer or `auto`"),
    row("bool-for-seed", "seed: true\nmodel: linear", "gnn", 1, 7, "`seed` must be an integer, got `true`"),
    row("number-for-name", "name: 5\nmodel: linear", "gnn", 1, 7, "`name` must be a name, got `5`"),
    row("number-for-op", "model: plain(op=5)", "gnn", 1, 17, "expected an op such as gcn"),
    row("list-for-op", "model: plain(op=[gcn])", "gnn", 1, 17, "expected an op such as gcn"),
    row("number-for-graph", "model: linear\ngraph: 5", "gnn", 2, 8, "`graph` must be a list of `name=value` settings",
        "graph: nodes=1000, edges=5000"),
    row("float-for-edges", "model: linear\ngraph: nodes=5, edges=5.5", "gnn", 2, 23, "`edges` must be an integer"),
    row("kwargs-for-seed", "model: linear\nseed: a=1, b=2", "gnn", 2, 7, "`seed` takes one value"),
    row("number-for-stage", "model: 5", "gnn", 1, 8, "expected a stage such as linear or rev(depth=4), got `5`"),
    row("string-for-stage", 'model: "rev"', "gnn", 1, 8, "expected a stage"),
    row("list-for-stage", "model: linear >> [rev]", "gnn", 1, 18, "expected a stage"),
    row("float-for-budget", "model: linear\nplan: auto(budget=1.5)", "gnn", 2, 19, "`budget` must be a size"),
    row("name-for-budget", "model: linear\nplan: auto(budget=lots)", "gnn", 2, 19, "`budget` must be a size"),
    row("fractional-bytes", "model: linear\nplan: auto(budget=1.5B)", "gnn", 2, 19, "`1.5B` is not a whole number of bytes"),
    row("zero-budget", "model: linear\nplan: auto(budget=0B)", "gnn", 2, 19, "`budget` must be positive"),
    row("size-for-dim", "model: linear(dim=16GiB)", "gnn", 1, 19, "`dim` must be an integer or `auto`"),
    row("infinite-float", "model: linear\ntrain: lr=1e999", "gnn", 2, 11, "`lr` must be a finite number"),
    row("spec-too-long", "model: linear" + " " * 1_000_001, "gnn", 1, 1, "spec is too long"),
    row("deep-nesting-of-calls", "model: " + "rev(op=" * DEEP + "gcn" + ")" * DEEP, "gnn", 1, 459,
        "brackets nested more than 64 levels deep"),
    row("deep-nesting-of-lists", "model: mlp(dims=" + "[" * DEEP + "]" * DEEP + ")", "gnn", 1, 80,
        "brackets nested more than 64 levels deep"),
    # ---------------------------------------------------------------- YAML
    row("yaml-bad-indentation", "model: linear\n  hidden: 4\n hidden: 5", "yaml", 2, 9,
        "invalid YAML: mapping values are not allowed here"),
    row("yaml-tab-indentation", "model: linear\n\thidden: 4", "yaml", 2, 1, "invalid YAML", "tab"),
    row("yaml-tab-in-value-position", "model: linear\ngraph:\n\tnodes: 1", "yaml", 3, 1,
        "found character '\\t' that cannot start any token"),
    row("yaml-unclosed-double-quote", 'model: "linear\nhidden: 4', "yaml", 1, 8, "quoted"),
    row("yaml-unclosed-flow-mapping", "model: linear\ntrain: {lr: 0.1\nseed: 1", "yaml", 3, 5, "invalid YAML"),
    row("yaml-string-syntax-error", "name: x\nmodel: linear >> rev(depth=4", "yaml", 2, 29,
        "expected a comma or `)`", "matching `)`"),
    row("yaml-string-stray-character", "model: linear >> rev(depth=4 $)", "yaml", 1, 30, "unexpected character `$`"),
    row("yaml-quoted-string-unknown-argument", 'name: x\nmodel: "linear >> rev(dpeth=4)"', "yaml", 2, 23,
        "`rev` has no argument `dpeth`", "did you mean `depth`?"),
    row("yaml-single-quoted-unknown-op", "model: 'rev(op=gatt)'", "yaml", 1, 16, "unknown op `gatt`"),
    row("yaml-folded-string-unknown-argument", "name: x\nmodel: >\n  linear >>\n  rev(dpeth=4)", "yaml", 4, 7,
        "`rev` has no argument `dpeth`"),
    row("yaml-folded-string-syntax-error", "model: >\n  linear >>\n  rev(depth=4 $)", "yaml", 3, 15,
        "unexpected character `$`"),
    row("yaml-literal-string-unknown-argument", "model: |\n  linear\n  >> rev(dpeth=1)\n", "yaml", 3, 10,
        "`rev` has no argument `dpeth`"),
    row("yaml-list-item-unknown-argument", "model:\n  - linear\n  - rev(dpeth=2)", "yaml", 3, 9,
        "`rev` has no argument `dpeth`"),
    row("yaml-flow-list-unknown-stage", "model: [linear, revv]", "yaml", 1, 17, "unknown stage `revv`"),
    row("yaml-escape-in-double-quotes", 'model: "linear >> rev(\\x41=1)"', "yaml", 1, 23, "`rev` has no argument `A`"),
    row("yaml-mapping-value-unknown-setting", "model: linear\ngraph:\n  nodes: 1\n  edgs: 2", "yaml", 4, 3,
        "`graph` has no argument `edgs`", "did you mean `edges`?"),
    row("yaml-mapping-value-wrong-type", "model: linear\ntrain:\n  lr: fast", "yaml", 3, 7, "`lr` must be a number"),
    row("yaml-unknown-key", "model: linear\nmodle: x", "yaml", 2, 1, "unknown key `modle`", "did you mean `model`?"),
    row("yaml-key-twice", "model: linear\nmodel: rev", "yaml", 2, 1, "key `model` given twice"),
    row("yaml-setting-twice", "model: linear\ntrain: {lr: 0.1, lr: 0.2}", "yaml", 2, 18, "argument `lr` given twice"),
    row("yaml-float-for-int", "model: linear\nhidden: 1.5", "yaml", 2, 9, "`hidden` must be an integer"),
    row("yaml-list-for-int", "model: linear\nhidden: [1]", "yaml", 2, 9, "`hidden` must be an integer"),
    row("yaml-null-value", "model: linear\nhidden:", "yaml", 2, 8, "`hidden` has no value", "leave the key out"),
    row("yaml-semantic-rule", "hidden: 64\nmodel: rev(groups=3)", "yaml", 2, 19, "is not divisible by `groups` (3)"),
    row("yaml-list-instead-of-mapping", "- model: linear\n- hidden: 4", "yaml", 1, 1,
        "a YAML spec must be a mapping"),
    row("yaml-scalar-document", "42", "yaml", 1, 1, "a YAML spec must be a mapping"),
    row("yaml-list-for-graph", "model: linear\ngraph:\n  - 1\n  - 2", "yaml", 3, 3, "`graph` must be"),
    row("yaml-non-string-key", "model: linear\n1: 2", "yaml", 2, 1, "keys are names"),
    row("yaml-two-documents", "model: linear\n---\nmodel: rev", "yaml", 2, 1, "invalid YAML"),
    row("yaml-empty-model-list", "model: []", "yaml", 1, 8, "stage"),
    row("yaml-empty-model-string", "model: ''", "yaml", 1, 8, "`model` has no value"),
    row("yaml-int-tag-on-word", "model: linear\nseed: !!int x", "yaml", 2, 7, "`seed` must be an integer"),
    row("yaml-int-tag-on-float", "model: linear\nhidden: !!int 1.5", "yaml", 2, 9, "`hidden` must be an integer"),
    row("yaml-float-tag-on-word", "model: linear\nname: !!float x", "yaml", 2, 7, "`name`"),
    row("yaml-nul-byte", "model: linear\nseed: 1\x00", "yaml", 2, 8, "NUL"),
    row("size-with-a-space", "model: linear\nplan: auto(budget=16 GiB)", "gnn", 2, 22, "unexpected name `GiB`",
        "a size is written without a space: `16GiB`"),
    # a tagged or anchored scalar: the caret at the error in the text, not at the tag (col 8)
    row("yaml-str-tag-unknown-op", "model: !!str linear >> rev(op=gatt)", "yaml", 1, 31, "unknown op `gatt`"),
    row("yaml-anchor-unknown-op", "model: &m linear >> rev(op=gatt)", "yaml", 1, 28, "unknown op `gatt`"),
    row("yaml-anchor-tag-comment-unknown-op", "model: &m !!str # the model\n  rev(op=gatt)", "yaml", 2, 10,
        "unknown op `gatt`"),
    row("yaml-verbatim-tag-quoted-unknown-op", 'model: !<tag:yaml.org,2002:str> "rev(op=gatt)"', "yaml", 1, 41,
        "unknown op `gatt`"),
    # ---------------------------------------------------------------- empty, comments only, binary
    row("empty", "", "gnn", 1, 1, "empty spec", "model: <pipeline>"),
    row("blank-lines-only", "   \n\n\t\n", "gnn", 1, 1, "empty spec"),
    row("comments-only", "# only a comment\n# another one\n", "gnn", 1, 1, "empty spec"),
    row("empty-yaml", "", "yaml", 1, 1, "empty spec"),
    row("comments-only-yaml", "# nothing here\n", "yaml", 1, 1, "empty spec"),
    row("nul-byte", "model: linear\x00", "gnn", 1, 14, "binary data (a NUL byte)", "a spec is text"),
    row("nul-byte-second-line", "model: linear\nseed: 1\x00\x01\x02", "gnn", 2, 8, "binary data (a NUL byte)"),
    # ---------------------------------------------------------------- rendering
    row("form-feed-shifts-the-quoted-line", 'name: "a\x0cb"\nseed: x\nmodel: linear', "gnn", 2, 7,
        "`seed` must be an integer"),
    row("line-separator-shifts-the-quoted-line", 'name: "a\u2028b"\nseed: x\nmodel: linear', "gnn", 2, 7,
        "`seed` must be an integer"),
]

# Lark's names for terminals and rules: none may reach a user.
LARK_NAMES = re.compile(
    r"_COMMA|_COLON|_EQUALS|_CHAIN|_LPAR|_RPAR|_LSQB|_RSQB|_SEP|\bRPAR\b|\bLPAR\b|__ANON|\$END|"
    r"\bCONTINUATION\b|\bTRAILING\b|\bWHITESPACE\b|Token\(|\bNAME\b|\bINT\b|\bFLOAT\b|\bSIZE\b|\bSTRING\b"
)


def quoted_line(text: str, line: int) -> str:
    """The source line as the error display shows it: lines end at \\n only, tabs are one column,
    and characters a terminal would not show (or would obey) are shown as spaces."""
    lines = text.split("\n")
    shown = lines[line - 1].rstrip("\r").expandtabs(1) if line <= len(lines) else ""
    return "".join(c if c.isprintable() else " " for c in shown)


def check_rendering(err: SpecError, text: str) -> None:
    rendered = str(err)
    assert rendered.startswith(f"<spec>:{err.line}:{err.column}: "), rendered
    shown = rendered.split("\n")
    source = quoted_line(text, err.line)
    if len(source) > SHOWN_LINE:  # a window of the line, the caret under the same character
        quoted = next(line for line in shown[1:] if line.startswith("  ") and line.strip("  ^") != "")
        window = quoted[2:]
        caret = shown[shown.index(quoted) + 1]
        at = caret.index("^") - 2
        assert len(window) <= SHOWN_LINE + 6 and window.strip(".") in source, rendered[:500]
        assert window[at] == source[err.column - 1], f"caret under {window[at]!r}, not {source[err.column - 1]!r}"
    else:
        assert "  " + source in shown, f"the source line {source!r} is not quoted:\n{rendered}"
        caret = shown[shown.index("  " + source) + 1]
        assert re.fullmatch(r"  " + " " * (err.column - 1) + r"\^+", caret), f"bad caret line {caret!r}:\n{rendered}"
    assert not LARK_NAMES.search(err.message), err.message
    assert not LARK_NAMES.search(err.hint or ""), err.hint


@pytest.mark.parametrize("text, form, line, column, message, hint", CATALOGUE)
def test_error_catalogue(text, form, line, column, message, hint):
    with pytest.raises(SpecError) as info:
        gnnspec.parse(text, form=form)
    err = info.value
    assert (err.line, err.column) == (line, column), f"at {err.line}:{err.column}, expected {line}:{column}\n{err}"
    assert message in err.message, f"message {err.message!r} lacks {message!r}"
    if hint is not None:
        assert err.hint is not None and hint in err.hint, f"hint {err.hint!r} lacks {hint!r}"
    assert isinstance(err.hint, (str, type(None)))
    check_rendering(err, text)


@pytest.mark.parametrize("text, form", [p.values[:2] for p in CATALOGUE if not p.marks])
def test_every_catalogued_error_has_a_hint(text, form):
    """The contract's error has a hint line; 18 rows had none (a stage given as a number, sizes
    that are not whole bytes, YAML tags, a too-long spec, ...), and range and type errors such as
    `deq(depth=0)` or `gat(heads=true)` had none either."""
    with pytest.raises(SpecError) as info:
        gnnspec.parse(text, form=form)
    assert info.value.hint and "hint: " in str(info.value)


@pytest.mark.parametrize("text, hint", [
    ("deq(depth=0)", "the number of layers of the stack"),
    ("plain(op=gat(heads=0))", "write `heads=1` or more (its default is 4)"),
    ("plain(op=gat(heads=true))", "write a whole number such as 8"),
    ("plain(dropout=.5)", "write 0.5, not .5"),
    ("plain(dropout=50%)", "not a percentage"),
    ("linear >>", "write the next stage after it"),
    (">> linear", "a pipeline starts with a stage"),
    ("res +", "`res+` is one name: no space before `+`"),
    ("model: rev\nplan: checkpoint(segments=0)", "`checkpoint` alone takes round(sqrt(depth))"),
])
def test_range_type_and_syntax_errors_say_what_to_write(text, hint):
    with pytest.raises(SpecError) as info:
        gnnspec.parse(text)
    assert hint in (info.value.hint or "")


def test_catalogue_is_large_and_unique():
    ids = [p.id for p in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 45


def test_errors_name_the_file():
    with pytest.raises(SpecError) as info:
        gnnspec.parse("model: rev(dpeth=2)", filename="specs/deep.gnn")
    assert str(info.value).startswith("specs/deep.gnn:1:12: ")


# ---------------------------------------------------------------- no Lark name in any syntax error

VALID = (
    "# RevGNN\nname: revgnn\nhidden: 80\n"
    "model: linear\n  >> rev(groups=2, depth=1001, op=gen(aggr=softmax), dropout=0.1)\n  >> mlp(dims=[15, 10])\n"
    "graph: nodes=132534, edges=39561252\nplan: auto(budget=16GiB)\n"
)


def _every_edit(text: str):
    for i in range(len(text) + 1):
        yield text[:i] + text[i + 1:]  # a deletion
        for ch in "()[]=,:>\n":
            yield text[:i] + ch + text[i:]  # an insertion


def test_no_lark_name_in_any_single_edit():
    seen = 0
    for text in _every_edit(VALID):
        try:
            gnnspec.parse(text)
        except SpecError as err:
            seen += 1
            assert not LARK_NAMES.search(err.message), (text, err.message)
            assert not LARK_NAMES.search(err.hint or ""), (text, err.hint)
    assert seen > 1000


# ---------------------------------------------------------------- the command line, end to end

CLI = [sys.executable, "-m", "gnnspec.cli"]


def run_cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GNNSPEC_DEBUG"}
    return subprocess.run(CLI + list(args), input=stdin, capture_output=True, timeout=120, cwd=cwd, env=env)


def assert_invalid(result: subprocess.CompletedProcess, *needles: str) -> str:
    out = result.stdout.decode("utf-8", "replace")
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, out + err
    assert "internal error" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not on stderr:\n{err}"
    return err


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "binary.gnn").write_bytes(b"model: linear\x00\x01\x02\xff\xfe")
    (tmp_path / "nul.gnn").write_bytes(b"model: linear\nseed: 1\x00\n")
    (tmp_path / "latin1.gnn").write_bytes("model: linear\nname: caf\u00e9\n".encode("latin-1"))
    (tmp_path / "empty.gnn").write_bytes(b"")
    (tmp_path / "comments.gnn").write_text("# nothing but a comment\n", encoding="utf-8")
    (tmp_path / "typo.yaml").write_text("name: x\nmodel: >\n  linear >>\n  rev(dpeth=4)\n", encoding="utf-8")
    (tmp_path / "adir").mkdir()
    return tmp_path


@pytest.mark.parametrize("command", ["check", "fmt"])
def test_cli_binary_file(spec_dir, command):
    assert_invalid(run_cli(command, str(spec_dir / "binary.gnn")), "binary.gnn:1:17:", "not UTF-8", "0xff")


def test_cli_nul_byte_position(spec_dir):
    err = assert_invalid(run_cli("check", str(spec_dir / "nul.gnn")), "nul.gnn:2:8:", "NUL")
    assert "^" in err


@pytest.mark.parametrize("command", ["check", "fmt"])
def test_cli_non_utf8_file(spec_dir, command):
    assert_invalid(run_cli(command, str(spec_dir / "latin1.gnn")), "latin1.gnn:2:10:", "not UTF-8", "0xe9")


@pytest.mark.parametrize("name", ["empty.gnn", "comments.gnn"])
def test_cli_empty_file(spec_dir, name):
    assert_invalid(run_cli("check", str(spec_dir / name)), f"{name}:1:1:", "empty spec")


@pytest.mark.parametrize("command", ["check", "fmt"])
def test_cli_directory(spec_dir, command):
    assert_invalid(run_cli(command, str(spec_dir / "adir")), "is a directory")


@pytest.mark.parametrize("command", ["check", "fmt"])
def test_cli_missing_file(spec_dir, command):
    assert_invalid(run_cli(command, str(spec_dir / "missing.gnn")), "no such file")


def test_cli_expr_error():
    err = assert_invalid(run_cli("check", "--expr", "rev(dpeth=2)"), "<expr>:1:5:", "did you mean `depth`?")
    assert "  rev(dpeth=2)\n      ^^^^^\n" in err


def test_cli_yaml_error_points_into_the_file(spec_dir):
    err = assert_invalid(run_cli("check", str(spec_dir / "typo.yaml")), "typo.yaml:4:7:", "`rev` has no argument")
    assert "    rev(dpeth=4)\n" in err


def test_cli_stdin_error():
    assert_invalid(run_cli("check", "-", stdin=b"model: linear >> rev(depth=4"), "<stdin>:1:29:")


def test_cli_stdin_binary():
    assert_invalid(run_cli("check", "-", stdin=bytes(range(256))), "<stdin>:2:118:", "0x80")


def test_cli_several_files_report_each(spec_dir):
    err = assert_invalid(run_cli("check", str(spec_dir / "empty.gnn"), str(spec_dir / "typo.yaml")))
    assert "empty.gnn:1:1:" in err and "typo.yaml:4:7:" in err


def test_cli_deep_nesting(tmp_path):
    path = tmp_path / "deep.gnn"
    path.write_text("model: " + "rev(op=" * DEEP + "gcn" + ")" * DEEP + "\n", encoding="utf-8")
    assert_invalid(run_cli("check", str(path)), "deep.gnn:1:")


def test_cli_empty_yaml_model(tmp_path):
    path = tmp_path / "empty_model.yaml"
    path.write_text("model: []\n", encoding="utf-8")
    assert_invalid(run_cli("check", str(path)), "empty_model.yaml:1:")
