"""The spec language as a user writes it: values, layout, the three surface forms (SPEC.md 1-2)."""

from __future__ import annotations

import pytest

import gnnspec
from gnnspec import ir


def model_of(text: str, **kw) -> tuple:
    return gnnspec.parse(text, **kw).model


@pytest.mark.parametrize(
    "text, field, expected",
    [
        ("rev(depth=1001)", "depth", 1001),
        ("rev(depth=1_001)", "depth", 1001),
        ("rev(dropout=0.1)", "dropout", 0.1),
        ("rev(dropout=0)", "dropout", 0.0),
        ("deq(tol=1e-3)", "tol", 1e-3),
        ("deq(tol=2.5E-6)", "tol", 2.5e-6),
        ("rev(tie=true)", "tie", True),
        ("rev(tie=false)", "tie", False),
        ("rev(norm=none)", "norm", "none"),
        ("rev(hidden=none)", "hidden", None),
        ("rev(weight_decay=5e-4)", "weight_decay", 5e-4),
        ("mlp(dims=[15, 10])", "dims", (15, 10)),
        ("mlp(dims=[15, 10,])", "dims", (15, 10)),
        ("mlp(dims=[])", "dims", ()),
        ("linear(dim=auto)", "dim", None),
    ],
)
def test_values_are_typed(text, field, expected):
    (stage,) = model_of(text)
    value = getattr(stage, field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "size, expected",
    [("16GiB", 16 * 2**30), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("500MB", 500 * 10**6),
     ("1.5GiB", 3 * 2**29), ("100B", 100), ("4KiB", 4096), ("2TB", 2 * 10**12), ("12345", 12345)],
)
def test_sizes_in_binary_and_decimal_units(size, expected):
    spec = gnnspec.parse(f"model: rev\nplan: auto(budget={size})")
    assert spec.plan == ir.Auto(kind="auto", budget=expected)


def test_keywords_do_not_swallow_identifiers():
    spec = gnnspec.parse("name: true_x\nmodel: rev")
    assert spec.name == "true_x"
    assert gnnspec.parse("name: autograd\nmodel: rev").name == "autograd"
    assert gnnspec.parse("name: none_left\nmodel: rev").name == "none_left"


def test_positional_argument_of_dropout_act_norm():
    stages = model_of("dropout(0.3) >> act(gelu) >> norm(layer) >> dropout(p=0.2) >> act(fn=tanh)")
    assert [s.kind for s in stages] == ["dropout", "act", "norm", "dropout", "act"]
    assert stages[0].p == 0.3 and stages[1].fn == "gelu" and stages[2].type == "layer"
    assert stages[3].p == 0.2 and stages[4].fn == "tanh"


def test_a_name_alone_takes_every_default():
    (stage,) = model_of("rev")
    assert stage == ir.Rev(kind="rev")
    assert (stage.groups, stage.depth, stage.op.name, stage.norm, stage.act, stage.dropout) == (2, 2, "gcn", "none", "relu", 0.0)


def test_res_plus_is_a_stage_name():
    assert model_of("res+(op=gcn, depth=28)")[0].kind == "res+"
    assert model_of("res(op=gcn, depth=28)")[0].kind == "res"


def test_op_arguments_are_filled_with_defaults_so_equal_ops_compare_equal():
    assert model_of("rev(op=gat)") == model_of("rev(op=gat(heads=4))")
    op = model_of("res+(op=gen(aggr=softmax, learn_t=true))")[0].op
    assert op.name == "gen" and op.arg("learn_t") is True and op.arg("t") == 1.0


def test_bare_expression_equals_model_key():
    assert gnnspec.parse("linear >> rev(depth=3) >> linear") == gnnspec.parse("model: linear >> rev(depth=3) >> linear")


def test_spec_example_from_the_contract():
    text = """# RevGNN-Deep (Li et al., ICML 2021, Table 1): 1001 layers, 80 channels
name:   revgnn_deep
in:     8
out:    112
hidden: 80
model:  linear
        >> rev(groups=2, depth=1001, op=gen(aggr=softmax, learn_t=true), norm=layer, dropout=0.1)
        >> linear
graph:  nodes=132534, edges=39561252
plan:   auto(budget=16GiB)
train:  optimizer=adam, lr=0.001
"""
    spec = gnnspec.parse(text)
    assert (spec.name, spec.in_, spec.out, spec.hidden) == ("revgnn_deep", 8, 112, 80)
    assert [s.kind for s in spec.model] == ["linear", "rev", "linear"]
    rev = spec.model[1]
    assert (rev.groups, rev.depth, rev.norm, rev.dropout) == (2, 1001, "layer", 0.1)
    assert spec.graph == ir.Graph(nodes=132534, edges=39561252)
    assert spec.plan.budget == 16 * 2**30
    assert spec.train.optimizer == "adam" and spec.train.lr == 0.001


@pytest.mark.parametrize(
    "text",
    [
        "model: linear\n  >> rev\n  >> linear\n",
        "model: linear\n>> rev\n>> linear\n",
        "model:\n    linear >> rev >> linear",
        "model: linear >>\n  rev >> linear",
        "# header\n\nmodel: linear   # trailing\n  # inside\n  >> rev\n\n\n>> linear\n# footer\n",
        "model: linear >> rev(\n    depth=2,\n) >> linear",
        "\n\nmodel: linear >> rev >> linear\n\n\n",
        "model: linear >> rev >> linear\r\n",
        "linear\n>> rev\n>> linear",
    ],
)
def test_layout_does_not_change_meaning(text):
    assert gnnspec.parse(text) == gnnspec.parse("model: linear >> rev >> linear")


def test_defaults_of_the_keys():
    spec = gnnspec.parse("model: rev")
    assert (spec.name, spec.in_, spec.out, spec.hidden, spec.dtype, spec.seed) == ("model", "auto", "auto", 64, "float32", 0)
    assert spec.plan == ir.Auto(kind="auto") and spec.graph is None
    assert spec.train == ir.Train(optimizer="adam", lr=0.01, weight_decay=0.0, epochs=200, patience=None, loss="ce")


def test_name_defaults_to_the_file_stem(tmp_path):
    path = tmp_path / "my_model.gnn"
    path.write_text("model: rev\n")
    assert gnnspec.load(path).name == "my_model"
    path.write_text("name: other\nmodel: rev\n")
    assert gnnspec.load(path).name == "other"


def test_yaml_form_equals_gnn_form():
    gnn = gnnspec.parse(
        "name: m\nin: 8\nmodel: linear >> rev(depth=4, op=gat(heads=2)) >> linear\n"
        "graph: nodes=100, edges=500\nplan: checkpoint(segments=2)\ntrain: lr=0.001, epochs=5"
    )
    yaml_text = """
name: m
in: 8
model: linear >> rev(depth=4, op=gat(heads=2)) >> linear
graph:
  nodes: 100
  edges: 500
plan: checkpoint(segments=2)
train: {lr: 1.0e-3, epochs: 5}
"""
    assert gnnspec.parse(yaml_text, form="yaml") == gnn
    listed = "name: m\nin: 8\nmodel:\n  - linear\n  - rev(depth=4, op=gat(heads=2))\n  - linear\n" \
             "graph: nodes=100, edges=500\nplan: checkpoint(segments=2)\ntrain: lr=0.001, epochs=5\n"
    assert gnnspec.parse(listed, form="yaml") == gnn


def test_yaml_string_errors_point_into_the_yaml_file():
    text = "name: m\nmodel: linear >> rev(op=gatt) >> linear\n"
    with pytest.raises(gnnspec.SpecError) as info:
        gnnspec.parse(text, form="yaml")
    assert (info.value.line, info.value.column) == (2, 25)
    assert "did you mean `gat`" in info.value.hint
    block = "name: m\nmodel: |\n  linear\n  >> rev(depth=0)\n"
    with pytest.raises(gnnspec.SpecError) as info:
        gnnspec.parse(block, form="yaml")
    assert (info.value.line, info.value.column) == (4, 16)


@pytest.mark.parametrize("text, where", [
    ('model: "rev(op=\\x67at, depth=2) >> rev(op=gatt)"\n', (1, 43)),  # \x67 is g: 4 characters for 1
    ('model: "rev(op=gat,\\tdepth=2) >> rev(op=gatt)"\n', (1, 41)),
    ('model: "rev(op=gat, \\\n     depth=2)\n\n   >> rev(op=gatt)"\n', (4, 14)),  # escaped and folded breaks
    ("model: 'rev(act=''relu'', op=gatt)'\n", (1, 30)),  # '' is one quote
    ("model: 'rev(act=''relu'')\r\n  >> rev(op=gatt)'\n", (2, 13)),
])
def test_yaml_errors_point_at_the_character_in_quoted_strings_with_escapes(text, where):
    """The column had been off by the escapes' extra characters (1:16, under `\\x67at`, for the first)."""
    with pytest.raises(gnnspec.SpecError) as info:
        gnnspec.parse(text, form="yaml")
    assert (info.value.line, info.value.column) == where
    line = text.replace("\r\n", "\n").split("\n")[where[0] - 1]
    assert line[where[1] - 1:].startswith("gatt")


def test_yaml_null_and_free_text_names_are_read_as_the_schema_describes_them():
    """The schema gives `patience` as integer or null and `name` as a string; `patience: null` had
    been "has no value" and `name: 'my model'` a syntax error."""
    spec = gnnspec.parse("name: 'my model'\nmodel: linear\ntrain:\n  patience: null\n", form="yaml")
    assert spec.name == "my model" and spec.train.patience is None
    assert gnnspec.parse(gnnspec.format(spec), form="gnn") == spec
    assert gnnspec.parse("name: '\"x y\"'\nmodel: linear\n", form="yaml").name == "x y"  # the .gnn quoting
    with pytest.raises(gnnspec.SpecError, match="`hidden` has no value"):
        gnnspec.parse("model: linear\nhidden:\n", form="yaml")


def test_spans_are_kept_but_do_not_take_part_in_equality():
    a = gnnspec.parse("model: rev(depth=3)")
    b = gnnspec.parse("\n\nmodel:     rev(\n   depth=3)")
    assert a == b
    assert a.model[0].span("depth").line == 1 and b.model[0].span("depth").line == 4
    assert hash(a.model[0].spans) == hash(b.model[0].spans)


def test_ir_is_frozen_and_uses_tuples():
    spec = gnnspec.parse("linear >> mlp(dims=[4, 2])")
    assert isinstance(spec.model, tuple) and isinstance(spec.model[1].dims, tuple)
    with pytest.raises(Exception):
        spec.hidden = 3  # type: ignore[misc]


def test_ir_json_round_trip_and_kind_discriminator():
    spec = gnnspec.parse("linear >> rev(depth=3, plan=reversible) >> deq(plan=implicit) >> sgc")
    data = spec.model_dump(mode="json")
    assert [s["kind"] for s in data["model"]] == ["linear", "rev", "deq", "sgc"]
    assert data["in"] == "auto" and "spans" not in data["model"][0]
    assert ir.Spec.model_validate(data) == spec
    with pytest.raises(Exception):
        ir.Spec.model_validate({"model": [{"depth": 3}]})  # `kind` is required


def test_schema_describes_the_yaml_form():
    import json

    from gnnspec.schema import yaml_form_schema

    schema = yaml_form_schema()
    json.dumps(schema)
    assert schema["required"] == ["model"]
    assert {"model", "in", "out", "hidden", "graph", "plan", "train", "dtype", "seed", "name"} <= set(schema["properties"])
    assert set(ir.STAGE_MODELS) <= {d["properties"]["kind"]["const"] for d in schema["$defs"].values() if "kind" in d.get("properties", {}) and "const" in d["properties"]["kind"]}


def test_a_leading_byte_order_mark_is_not_part_of_the_text():
    assert gnnspec.parse("\ufeffmodel: linear") == gnnspec.parse("model: linear")


def test_check_takes_spec_text_as_build_and_estimate_do():
    import gnnspec

    assert gnnspec.check("rev(depth=2)") == gnnspec.parse("rev(depth=2)")
    with pytest.raises(gnnspec.SpecError, match="did you mean `gat`"):
        gnnspec.check("rev(op=gatt)")
    with pytest.raises(TypeError, match="check\\(\\) takes a gnnspec.Spec or spec text, got NoneType"):
        gnnspec.check(None)


@pytest.mark.parametrize("call, error, message", [
    (lambda g: g.parse(None), TypeError, "spec text must be a str, got NoneType"),
    (lambda g: g.parse(b"rev"), TypeError, "spec text must be a str, got bytes"),
    (lambda g: g.parse("rev", form="xml"), ValueError, "unknown spec form 'xml'; valid: gnn, yaml"),
    (lambda g: g.format("rev", form="json"), ValueError, "unknown spec form 'json'; valid: gnn, yaml"),
    (lambda g: g.format(None), TypeError, "format\\(\\) takes a gnnspec.Spec or spec text, got NoneType"),
    (lambda g: g.load(None), TypeError, "load\\(\\) takes a path \\(str or pathlib.Path\\), got NoneType"),
    (lambda g: g.build(None, 8, 4), TypeError, "build\\(\\) takes a gnnspec.Spec or spec text, got NoneType"),
    (lambda g: g.build("rev", 8, 4, plan=123), TypeError, "a plan is its name .* got int"),
    (lambda g: g.build("rev", 8, 4, plan=["reversible", 2]), TypeError, "a plan is its name .* got int"),
    (lambda g: g.build("rev", 8, 4, plan="auto", nodes=10, edges=10, device="tpu"), ValueError,
     "unknown device 'tpu'; valid: cpu, cuda"),
    (lambda g: g.estimate(3.5, nodes=10, edges=10), TypeError, "estimate\\(\\) takes a gnnspec.Spec or spec text, got float"),
    (lambda g: g.register_op(123, lambda c: None), TypeError, "an op name is a str, got int"),
    (lambda g: g.register_op("op5", lambda c: None, params=5), TypeError, "params of op 'op5' maps .* got int"),
    (lambda g: g.parse("rev", filename=None), TypeError, "filename .* must be a str, got NoneType"),
    (lambda g: g.format("rev", filename=3), TypeError, "filename .* must be a str, got int"),
])
def test_the_api_refuses_arguments_of_the_wrong_kind_with_a_message(call, error, message):
    """Each of these had raised an AttributeError (or, for ``form``/``device``, was accepted)."""
    import gnnspec

    with pytest.raises(error, match=message):
        call(gnnspec)


def test_an_error_on_a_very_long_line_shows_a_window_around_the_column():
    import gnnspec

    text = "model: linear" + " >> linear" * 8000 + " >> rev(op=gatt)"
    with pytest.raises(gnnspec.SpecError) as err:
        gnnspec.parse(text)
    _, source, caret, _ = str(err.value).splitlines()
    assert source.startswith("  ...") and source.endswith("rev(op=gatt)") and len(source) <= 170
    assert source[caret.index("^"):][:4] == "gatt" and caret.strip() == "^^^^"


def test_an_upper_case_yaml_suffix_is_read_as_yaml(tmp_path):
    import gnnspec

    path = tmp_path / "m.YML"
    path.write_text("model: linear >> rev(depth=2)\nhidden: 8\n")
    assert gnnspec.load(path).hidden == 8


# ---------------------------------------------------------------------------- review fixes


@pytest.mark.parametrize("text, column", [
    ("model: plain(depth=" + "1" * 5000 + ")", 20),
    ("model: linear\nplan: auto(budget=" + "9" * 4300 + "GiB)", 19),
    ("model: plain(dropout=0." + "1" * 200 + ")", 22),
])
def test_a_number_too_long_for_any_setting_is_a_located_error(text, column):
    # was lark's VisitError from int() ("Exceeds the limit (4300 digits)"): exit 1 on the command line
    with pytest.raises(gnnspec.SpecError, match="digits, longer than any setting takes") as err:
        gnnspec.parse(text)
    assert err.value.column == column and "at most 100 digits" in err.value.hint


def test_fmt_keeps_a_written_name_even_when_it_is_model(tmp_path):
    # `name: model` was dropped, so the formatted file took its stem as the name
    path = tmp_path / "foo.gnn"
    path.write_text("name: model\nmodel: linear\n")
    spec = gnnspec.load(str(path))
    assert spec.name == "model"
    formatted = gnnspec.format(path.read_text())
    again = tmp_path / "bar.gnn"
    again.write_text(formatted)
    assert gnnspec.load(str(again)).name == "model"
    assert gnnspec.format("model: linear\n") == "model: linear\n"  # an unwritten name stays unwritten


def test_a_yaml_name_is_the_whole_string_even_with_a_hash(tmp_path):
    # `name: "gcn # v2"` was read as the name `gcn` and a comment
    path = tmp_path / "n.yaml"
    path.write_text('name: "gcn # v2"\nmodel: linear\n')
    spec = gnnspec.load(str(path))
    assert spec.name == "gcn # v2"
    again = tmp_path / "m.yaml"
    again.write_text(gnnspec.format(path.read_text()))
    assert gnnspec.load(str(again)).name == "gcn # v2"


@pytest.mark.parametrize("hidden, bad", [(35, "groups=1"), (7, "groups=1"), (2147483647, "hidden=2147483648")])
def test_the_groups_hint_names_a_valid_fix_and_answers_fast(hidden, bad):
    # the hint said "try groups=1" (groups must be >= 2) and, for a large hidden, took seconds to
    # minutes to find it (a loop over every number up to hidden)
    import time

    start = time.process_time()
    with pytest.raises(gnnspec.SpecError, match="is not divisible by `groups`") as err:
        gnnspec.parse(f"hidden: {hidden}\nmodel: rev(groups=2)")
    assert time.process_time() - start < 1.0
    assert bad not in err.value.hint and "try " in err.value.hint
    suggestion = err.value.hint.split("try ")[1].split(" or ")
    for fix in suggestion:
        key, value = fix.split("=")
        groups, width = (int(value), hidden) if key == "groups" else (2, int(value))
        assert groups >= 2 and width % groups == 0 and width <= ir.MAX_WIDTH


@pytest.mark.parametrize("char", ["\U000F0000", "\U000E0001", "\u200b"])
def test_a_non_printable_character_beyond_16_bits_survives_formatting(char):
    # written as \uf0000 (five hex digits), read back as \uf000 and "0"
    spec = gnnspec.parse(f'name: "x{char}"\nmodel: linear')
    assert gnnspec.parse(gnnspec.format(spec)) == spec and gnnspec.parse(gnnspec.format(spec)).name == f"x{char}"


@pytest.mark.parametrize("text, position", [
    ("# a\x0cb\nmodel: rev(depth=4", (2, 19)),
    ('name: "a\u2028b"\nmodel: rev(depth=4', (2, 19)),
    ("# a\x0cb\nmodel: rev(\ndepth=2)", (2, 12)),
])
def test_positions_count_only_newlines_as_line_breaks(text, position):
    # a form feed or U+2028 earlier in the file put the error on a line that does not exist
    with pytest.raises(gnnspec.SpecError) as err:
        gnnspec.parse(text)
    assert (err.value.line, err.value.column) == position


@pytest.mark.parametrize("text", ["# " + "(" * 70 + "\nmodel: linear", 'name: "' + "[" * 70 + '"\nmodel: linear',
                                  "# (((\n" * 30 + "model: linear"])
def test_brackets_in_comments_and_strings_are_not_nesting(text):
    assert gnnspec.parse(text).model[0].kind == "linear"  # was "brackets nested more than 64 levels deep"


def test_a_fractional_byte_count_hint_does_decimal_units_right():
    with pytest.raises(gnnspec.SpecError, match="not a whole number of bytes") as err:
        gnnspec.parse("model: linear\nplan: auto(budget=1.5B)")
    assert "1500MB for 1.5GB" in err.value.hint and "1536MB" not in err.value.hint


@pytest.mark.parametrize("text, position, message", [
    ("in: 8\nout: 3\nmodel: rev\ngraph: nodes=100, edges=300, features=16", (1, 5), "`in: 8` but `graph:` says features=16"),
    ("out: 3\nmodel: rev\ngraph: nodes=100, edges=300, classes=5", (1, 6), "`out: 3` but `graph:` says classes=5"),
])
def test_check_refuses_widths_the_graph_contradicts(text, position, message):
    # `check` said ok while `compile` and `estimate-mem` refused the same file
    with pytest.raises(gnnspec.SpecError, match=message.replace("(", r"\(")) as err:
        gnnspec.parse(text)
    assert (err.value.line, err.value.column) == position
    assert gnnspec.parse("in: 16\nmodel: rev\ngraph: nodes=100, edges=300, features=16").in_ == 16


def test_the_schema_takes_what_the_yaml_reader_takes():
    """The schema had offered the IR's mappings (stage and plan objects, `graph: null`,
    `model: []`), which the YAML reader refuses, and refused `lr: 1e-3` and `patience: none`
    (strings to PyYAML), which it reads."""
    from gnnspec.schema import yaml_form_schema

    props = yaml_form_schema()["properties"]
    assert props["model"]["anyOf"][1] == {"type": "array", "items": {"type": "string"}, "minItems": 1}
    assert props["plan"]["type"] == "string" and "anyOf" not in props["plan"]
    graph, train = props["graph"]["anyOf"][0], props["train"]["anyOf"][0]
    assert {"type": "null"} not in props["graph"]["anyOf"]
    assert {"type": "string", "description": "a value in the gnnspec expression language"} in train["properties"]["lr"]["anyOf"]
    assert "enum" in train["properties"]["optimizer"] and "anyOf" not in train["properties"]["optimizer"]
    assert "anyOf" in graph["properties"]["nodes"]
    assert "enum" in props["dtype"]


@pytest.mark.parametrize("text, valid", [
    ("model: [{kind: rev, depth: 4}]", False), ("model: linear\nplan: {kind: checkpoint, segments: 4}", False),
    ("model: linear\ngraph:", False), ("model: []", False), ("model: linear\ntrain: {lr: 1e-3, patience: none}", True),
    ("model: linear\ngraph: {nodes: '10', edges: 20}", True), ("model: [linear, rev]", True),
    ("model: linear\ntrain: {optimizer: adamm}", False), ("model: linear\ndtype: float33", False),
])
def test_the_schema_and_the_yaml_reader_agree(text, valid, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")  # not a dependency: checked where it is installed
    import yaml

    from gnnspec.schema import yaml_form_schema

    by_schema = jsonschema.Draft202012Validator(yaml_form_schema()).is_valid(yaml.safe_load(text))
    path = tmp_path / "s.yaml"
    path.write_text(text + "\n")
    try:
        gnnspec.load(str(path))
        by_reader = True
    except gnnspec.SpecError:
        by_reader = False
    assert by_schema == by_reader == valid
