"""The formatter: canonical text, exact inverse of the parser, comments kept (SPEC.md section 1)."""

from __future__ import annotations

import pytest

import gnnspec
from gnnspec.format import LINE_WIDTH, format_size

EXPRESSIONS = [
    "rev(groups=2, depth=1001, op=gat, tie=true)",
    "linear >> res+(op=gen(aggr=softmax, t=0.5, learn_t=true), depth=112, norm=layer, dropout=0.1) >> linear",
    "mlp(dims=[64, 32], act=gelu, dropout=0.5, norm=batch) >> appnp(k=5, alpha=0.2)",
    "dropout(0.6) >> gcnii(depth=64, alpha=0.1, theta=0.5, weight_decay=0.01) >> dropout(0.6) >> linear(dim=7, bias=false)",
    "deq(op=sage(aggr=max), solver=broyden, max_iter=30, tol=1e-6, plan=implicit) >> sgc(k=3)",
    "plain(op=cheb(k=3), depth=3, jk=cat) >> dense(op=graphconv, depth=3) >> norm(instance) >> act(prelu)",
    "res(op=egc(heads=4, bases=2), depth=28, plan=checkpoint(segments=4), hidden=128)",
    "plain(op=transformer(heads=2), hidden=none) >> linear(dim=auto)",
]


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_parse_format_round_trip(text):
    spec = gnnspec.parse(text)
    canonical = gnnspec.format(spec)
    assert gnnspec.parse(canonical) == spec
    assert gnnspec.format(gnnspec.parse(canonical)) == canonical


def test_canonical_text_of_a_full_spec():
    spec = gnnspec.parse(
        "seed: 3\ntrain: lr=0.005, optimizer=adam, patience=100\nplan: auto(budget=17179869184)\n"
        "model: linear >> rev(depth=4, groups=2, dropout=0.0) >> linear\nname: demo\nhidden: 80\nin: 8\n"
        "graph: edges=10, nodes=5\ndtype: bfloat16"
    )
    assert gnnspec.format(spec) == (
        "name:   demo\n"
        "in:     8\n"
        "hidden: 80\n"
        "model:  linear >> rev(depth=4) >> linear\n"
        "graph:  nodes=5, edges=10\n"
        "dtype:  bfloat16\n"
        "plan:   auto(budget=16GiB)\n"
        "train:  lr=0.005, patience=100\n"
        "seed:   3\n"
    )


def test_long_pipelines_break_one_stage_per_line():
    stage = "res+(op=gen(aggr=softmax, learn_t=true), depth=112, norm=layer, dropout=0.1, hidden=256)"
    text = gnnspec.format(f"linear >> {stage} >> {stage} >> linear")
    lines = text.splitlines()
    assert lines[0] == "model: linear"
    assert all(line.startswith("       >> ") for line in lines[1:])
    assert all(len(line) <= LINE_WIDTH for line in lines if "res+" not in line)
    assert gnnspec.format(text) == text


def test_comments_and_blank_lines_are_kept():
    text = (
        "# ResGCN-28 (Li et al., ICCV 2019)\n\n"
        "hidden: 128   # channels\n"
        "model: linear\n"
        "       # the deep part\n"
        "       >> res(depth=28)\n"
        "# footer\n"
    )
    assert gnnspec.format(text) == (
        "# ResGCN-28 (Li et al., ICCV 2019)\n\n"
        "hidden: 128  # channels\n"
        "# the deep part\n"
        "model:  linear >> res(depth=28)\n"
        "# footer\n"
    )


def test_yaml_text_formats_as_yaml_and_keeps_meaning():
    text = "# header\nmodel: 'linear >> rev(depth=4)'\ngraph: {nodes: 10, edges: 20}\ntrain:\n  lr: 0.001\n"
    out = gnnspec.format(text, form="yaml")
    assert out == "# header\nmodel: linear >> rev(depth=4)\ngraph:\n  nodes: 10\n  edges: 20\ntrain:\n  lr: 0.001\n"
    assert gnnspec.parse(out, form="yaml") == gnnspec.parse(text, form="yaml")
    assert gnnspec.format(out, form="yaml") == out


def test_yaml_comments_stay_with_the_settings_of_a_mapping():
    """A comment on or above a `graph`/`train` setting had moved to the mapping's last line (the
    wrong key) or above the mapping."""
    text = ("model: linear\ngraph:  # the graph\n  nodes: 100   # the nodes\n  edges: 500\n"
            "train:\n  # a slow rate\n  lr: 0.005\n  epochs: 200  # the default, dropped\n")
    out = gnnspec.format(text, form="yaml")
    assert out == ("model: linear\ngraph:  # the graph\n  nodes: 100  # the nodes\n  edges: 500\n"
                   "train:  # the default, dropped\n  # a slow rate\n  lr: 0.005\n")
    assert gnnspec.parse(out, form="yaml") == gnnspec.parse(text, form="yaml")
    assert gnnspec.format(out, form="yaml") == out


def test_yaml_comments_of_a_mapping_left_out_at_its_defaults_are_kept():
    """A `train:` whose every setting is at its default is not printed; its settings' comments had
    gone with it (`fmt --write` deleted them from the file)."""
    text = "model: plain\ntrain:  # training\n  # a comment\n  lr: 0.01  # keep\nseed: 3\n"
    out = gnnspec.format(text, form="yaml")
    assert out == "model: plain\n# training\n# a comment\n# keep\nseed: 3\n"
    assert gnnspec.format(out, form="yaml") == out


@pytest.mark.parametrize(
    "n, text", [(16 * 2**30, "16GiB"), (8 * 10**9, "8GB"), (512 * 2**20, "512MiB"), (1000, "1KB"), (1024, "1KiB"), (7, "7B")]
)
def test_sizes_use_the_largest_exact_unit(n, text):
    assert format_size(n) == text


def test_keyword_names_are_quoted():
    spec = gnnspec.parse('name: "true"\nmodel: rev')
    assert spec.name == "true"
    assert gnnspec.parse(gnnspec.format(spec)) == spec
