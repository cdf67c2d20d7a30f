"""Lowering: every stage and plan builds a model whose outputs and gradients equal `store`'s
(SPEC.md sections 2-4), in float64 with dropout and batch norm on."""

from __future__ import annotations

import math

import pytest
import torch

import gnnspec
from gnnspec.lower.widths import resolve_widths
from gnnspec.memory.measure import measure_step_peak

N, IN, OUT, HIDDEN = 40, 6, 3, 8
PLANS = {
    "plain": ["checkpoint(segments=2)", "checkpoint(segments=1)"],
    "res": ["checkpoint(segments=2)"],
    "res+": ["checkpoint(segments=3)"],
    "dense": ["checkpoint(segments=2)"],
    "gcnii": ["checkpoint(segments=2)"],
    "rev": ["reversible", "checkpoint(segments=2)"],
    "deq": ["implicit", "unroll", "checkpoint"],
}
OPS = ["gcn", "sage", "gat(heads=2)", "gen", "gin"]


def graph(seed: int = 0, n: int = N, e: int = 160):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    y = torch.randint(0, OUT, (n,), generator=g)
    return x, edge_index, y


def stack_text(kind: str, op: str, *, norm: str = "batch", dropout: float = 0.2, tie: bool = False, depth: int = 3) -> str:
    extra = ", max_iter=300, tol=1e-12" if kind == "deq" else ""
    depth_arg = "" if kind == "deq" else f", depth={depth}"
    op_arg = "" if kind == "gcnii" else f"op={op}, "
    tie_arg = ", tie=true" if tie else ""
    return f"hidden: {HIDDEN}\nmodel: linear >> {kind}({op_arg}norm={norm}, dropout={dropout}{depth_arg}{tie_arg}{extra}) >> linear"


def build(text: str, plan: str, seed: int = 0):
    torch.manual_seed(seed)
    model = gnnspec.build(text, IN, OUT, plan=plan).double()
    if "deq(" in text:  # a contraction, so the fixed point exists and every solver finds it
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".solver." in name and p.dim() > 1:
                    p.mul_(0.3 / max(1.0, torch.linalg.matrix_norm(p, 2).item()))
    return model


def train_step(model, x, edge_index, y, seed: int = 1):
    """One training step; returns the output, the parameter gradients and the state after the step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.manual_seed(seed)
    out = model(x, edge_index)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_step(text: str, plan: str):
    x, edge_index, y = graph()
    x_before = x.clone()
    ref_out, ref_grads, ref_state = train_step(build(text, "store"), x, edge_index, y)
    out, grads, state = train_step(build(text, plan), x, edge_index, y)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-9)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-9, msg=name)
    assert state.keys() == ref_state.keys()
    for name in ref_state:  # parameters after the step and running statistics of every norm
        torch.testing.assert_close(state[name], ref_state[name], rtol=1e-6, atol=1e-9, msg=name)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("kind", list(PLANS))
@pytest.mark.parametrize("op", OPS)
def test_every_plan_equals_store(kind, op):
    if kind == "gcnii" and op != "gcn":
        pytest.skip("gcnii has its own convolution")
    norm = "none" if kind == "deq" else "batch"
    text = stack_text(kind, op, norm=norm)
    for plan in PLANS[kind]:
        assert_same_step(text, plan)


@pytest.mark.parametrize("kind", [k for k in PLANS if k != "dense"])
def test_every_plan_equals_store_with_tied_weights(kind):
    text = stack_text(kind, "gcn", norm="none" if kind == "deq" else "batch", tie=True)
    for plan in PLANS[kind]:
        assert_same_step(text, plan)


@pytest.mark.parametrize("plan", ["implicit", "unroll"])
def test_deq_updates_batch_norm_statistics_once(plan):
    text = stack_text("deq", "gcn", norm="batch", dropout=0.0)
    x, edge_index, y = graph()
    model = build(text, plan)
    train_step(model, x, edge_index, y)
    tracked = [v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == 1 for t in tracked)


@pytest.mark.parametrize("kind, jk", [("plain", "cat"), ("plain", "max"), ("res", "last"), ("gcnii", "cat")])
def test_jumping_knowledge_under_checkpoint(kind, jk):
    op = "" if kind == "gcnii" else "op=sage, "
    text = f"hidden: {HIDDEN}\nmodel: {kind}({op}depth=4, jk={jk}, dropout=0.3, norm=batch) >> linear"
    assert_same_step(text, "checkpoint(segments=2)")


@pytest.mark.parametrize("text", ["dense(op=gcn, depth=1, jk=max)", "plain(op=sage, depth=3, jk=max, project=false)"])
def test_jk_max_over_layers_wider_or_narrower_than_the_stage_input(text):
    # dense's layer outputs are wider than its input; project=false starts at the input width
    assert_same_step(f"hidden: {HIDDEN}\nmodel: {text} >> linear", "checkpoint(segments=2)")


def test_tie_makes_parameter_count_independent_of_depth():
    def count(depth, kind):
        op = "" if kind == "gcnii" else "op=gat(heads=2), "
        model = gnnspec.build(f"hidden: {HIDDEN}\nmodel: {kind}({op}depth={depth}, tie=true, norm=batch)", IN, OUT)
        return sum(p.numel() for p in model.parameters()), len(model.state_dict())

    for kind in ("plain", "res", "res+", "rev", "gcnii"):
        assert count(2, kind) == count(17, kind)
    untied = gnnspec.build(f"hidden: {HIDDEN}\nmodel: res(op=gcn, depth=17)", IN, OUT)
    assert sum(p.numel() for p in untied.parameters()) > count(17, "res")[0]


@pytest.mark.parametrize("kind", list(PLANS))
def test_state_dict_and_initial_weights_are_the_same_under_every_plan(kind):
    text = stack_text(kind, "gcn")
    reference = build(text, "store").state_dict()
    for plan in PLANS[kind]:
        state = build(text, plan).state_dict()
        assert list(state) == list(reference)
        assert all(torch.equal(state[k], reference[k]) for k in reference)
        build(text, plan).load_state_dict(reference)


@pytest.mark.parametrize("kind", list(PLANS))
def test_eval_no_grad_and_repeated_calls(kind):
    text = stack_text(kind, "gcn", norm="none" if kind == "deq" else "batch")
    x, edge_index, y = graph()
    for plan in ["store", *PLANS[kind]]:
        model = build(text, plan)
        train_step(model, x, edge_index, y)
        model.eval()
        first = model(x, edge_index)
        second = model(x, edge_index)
        with torch.no_grad():
            third = model(x, edge_index)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first.detach(), third, rtol=1e-9, atol=1e-12)
        first.sum().backward()  # eval mode with grad still differentiates
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["rev", "res+", "deq"])
def test_stage_input_and_output_are_readable_after_backward(kind):
    text = stack_text(kind, "gcn", norm="none" if kind == "deq" else "batch")
    x, edge_index, y = graph()
    plan = {"rev": "reversible", "res+": "checkpoint(segments=2)", "deq": "implicit"}[kind]
    model = build(text, plan)
    seen = {}

    def keep(module, inputs, output):
        seen["input"], seen["output"] = inputs[0], output
        seen["input_copy"], seen["output_copy"] = inputs[0].detach().clone(), output.detach().clone()

    model.stages[1].register_forward_hook(keep)
    out = model(x, edge_index)
    view = seen["input"][:, :2]
    torch.nn.functional.cross_entropy(out, y).backward()
    assert seen["input"].untyped_storage().nbytes() > 0 and seen["output"].untyped_storage().nbytes() > 0
    torch.testing.assert_close(seen["input"].detach(), seen["input_copy"], rtol=0, atol=0)
    torch.testing.assert_close(seen["output"].detach(), seen["output_copy"], rtol=0, atol=0)
    assert float(view.sum()) == float(seen["input_copy"][:, :2].sum())


@pytest.mark.parametrize("kind", list(PLANS))
def test_bfloat16_autocast_runs_every_plan(kind):
    text = stack_text(kind, "gcn", norm="layer", dropout=0.1)
    x, edge_index, y = graph()
    x = x.float()
    for plan in ["store", *PLANS[kind]]:
        torch.manual_seed(0)
        model = gnnspec.build(text, IN, OUT, plan=plan)
        before = torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, edge_index)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        assert torch.is_autocast_enabled("cpu") == before
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_widths_insert_projections_and_take_data_widths():
    spec = gnnspec.parse("hidden: 32\nmodel: rev(depth=2) >> dense(op=gcn, depth=2, hidden=16) >> mlp(dims=[10, 5])")
    resolved = resolve_widths(spec, 7, 3)
    assert [(r.stage.kind, r.in_width, r.out_width, r.inserted) for r in resolved] == [
        ("linear", 7, 32, True), ("rev", 32, 32, False),
        ("linear", 32, 16, True), ("dense", 16, 48, False),
        ("mlp", 48, 5, False), ("linear", 5, 3, True),
    ]
    with pytest.raises(gnnspec.SpecError, match="`in` is `auto`"):
        resolve_widths(spec, None, 3)
    fixed = gnnspec.parse("in: 5\nmodel: rev")
    with pytest.raises(gnnspec.SpecError, match="says `in: 5` but the data has 7"):
        resolve_widths(fixed, 7, 3)


def test_build_takes_auto_widths_from_the_specs_graph_as_estimate_does():
    # build raised "`in` is `auto` and no data gives it" where estimate and compile used the graph
    text = "graph: nodes=20, edges=60, features=5, classes=3\nhidden: 8\nmodel: res(op=gcn, depth=2)"
    model = gnnspec.build(text)
    x, edge_index = torch.randn(20, 5), torch.randint(0, 20, (2, 60))
    assert model(x, edge_index).shape == (20, 3)
    assert gnnspec.build(text, 7, 2)(torch.randn(20, 7), edge_index).shape == (20, 2)  # given widths win
    est = gnnspec.estimate(text, nodes=20, edges=60)
    assert est.chosen_plan.peak_bytes > 0


@pytest.mark.parametrize("in_channels, out_channels, bad", [(0, 3, "in_channels"), (-1, 3, "in_channels"),
                                                            (8, 2.5, "out_channels"), (True, 3, "in_channels")])
def test_build_rejects_widths_that_are_not_positive_integers(in_channels, out_channels, bad):
    with pytest.raises(ValueError, match=f"{bad} must be a positive integer, got {'2.5' if bad == 'out_channels' else ''}"):
        gnnspec.build("res+(op=gcn, depth=2)", in_channels, out_channels)


def test_build_refuses_a_stack_deeper_than_it_can_make_at_the_depth(capsys):
    """Building a 10**23-layer stack had hung; the estimator still answers at that depth."""
    from gnnspec.cli import main

    text = "in: 8\nout: 4\nmodel: linear\n  >> rev(depth=100000000000000000000000, op=gcn)\n"
    with pytest.raises(gnnspec.SpecError, match="a stack of depth 100,000,000,000,000,000,000,000 is deeper than "
                                                 "gnnspec builds \\(1,000,000 layers at most\\)") as err:
        gnnspec.build(text)
    assert (err.value.line, err.value.column) == (4, 16)  # under the number
    assert main(["compile", "--expr", text]) == 2
    assert "<expr>:4:16: a stack of depth" in capsys.readouterr().err
    assert gnnspec.estimate(text, nodes=100, edges=500, plan="reversible").plans[0].peak_bytes > 10**23


def test_plain_without_projection_starts_at_the_input_width():
    """`project=false`: no linear in front; the first convolution maps the input width itself, as
    torch-geometric's GAT model does, with the same parameter shapes."""
    from torch_geometric.nn import GATConv

    text = "plain(op=gat(heads=8), depth=2, hidden=64, project=false) >> plain(op=gat(heads=1), hidden=7, depth=1, project=false, act=none)"
    resolved = resolve_widths(gnnspec.parse(text), 1433, 7)
    assert [(r.stage.kind, r.in_width, r.out_width, r.inserted) for r in resolved] == [
        ("plain", 1433, 64, False), ("plain", 64, 7, False)]
    model = gnnspec.build(text, 1433, 7)
    convs = [m for m in model.modules() if isinstance(m, GATConv)]
    assert [(c.in_channels, c.out_channels, c.heads) for c in convs] == [(1433, 8, 8), (64, 8, 8), (64, 7, 1)]
    torch.manual_seed(0)
    reference = GATConv(1433, 8, heads=8, add_self_loops=False)
    assert [p.shape for p in convs[0].parameters()] == [p.shape for p in reference.parameters()]
    x, edge_index = torch.randn(30, 1433), torch.randint(0, 30, (2, 90))
    assert model(x, edge_index).shape == (30, 7)
    projected = resolve_widths(gnnspec.parse("plain(op=gat(heads=8), depth=2, hidden=64)"), 1433, 7)
    assert [r.stage.kind for r in projected] == ["linear", "plain", "linear"]


def test_linear_in_last_place_maps_to_out():
    model = gnnspec.build("hidden: 16\nmodel: rev >> linear", 5, 4)
    assert [s.kind for s in model.stages] == ["linear", "rev", "linear"]
    x, edge_index, _ = graph()
    assert model(x.float()[:, :5], edge_index).shape == (N, 4)


def test_weight_decay_becomes_parameter_groups():
    model = gnnspec.build("hidden: 8\nmodel: linear >> gcnii(depth=3, weight_decay=0.01) >> linear", IN, OUT)
    groups = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in model.parameter_groups(5e-4)}
    conv_params = sum(p.numel() for p in model.stages[1].parameters())
    assert groups[0.01] == conv_params
    assert groups[5e-4] == sum(p.numel() for p in model.parameters()) - conv_params


def test_spec_dtype_sets_parameter_dtype():
    model = gnnspec.build("dtype: float64\nmodel: rev(depth=2)", 4, 2)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_plan_text_errors_are_spec_errors():
    with pytest.raises(gnnspec.SpecError, match="unknown plan `reversable`"):
        gnnspec.build("rev", 4, 2, plan="reversable")


# ---------------------------------------------------------------------------- memory


def step_peak(text: str, plan: str, n: int = 1000, e: int = 5000, **kw) -> int:
    x, edge_index, _ = graph(n=n, e=e)
    x = x.float()
    y = torch.randint(0, OUT, (n,))
    torch.manual_seed(0)
    model = gnnspec.build(text, IN, OUT, plan=plan)
    return measure_step_peak(model, x, edge_index, y, torch.optim.Adam(model.parameters()))


def test_reversible_peak_is_flat_in_depth():
    text = "hidden: 32\nmodel: rev(op=gcn, depth={}, tie=true, norm=layer, dropout=0.1)"
    shallow = step_peak(text.format(4), "reversible")
    deep = step_peak(text.format(64), "reversible")
    assert deep <= shallow * 1.05
    assert step_peak(text.format(64), "store") > 4 * deep


def test_implicit_peak_is_independent_of_iterations():
    text = "hidden: 32\nmodel: deq(op=gcn, max_iter={}, tol=1e-30, solver=fixed_point)"
    few = step_peak(text.format(5), "implicit")
    many = step_peak(text.format(40), "implicit")
    assert many == few
    assert step_peak(text.format(40), "unroll") > 2 * many


@pytest.mark.parametrize("depth", [16, 36])
def test_checkpoint_peak_is_below_store(depth):
    text = f"hidden: 32\nmodel: res+(op=sage, depth={depth}, norm=batch, dropout=0.1)"
    segments = round(math.sqrt(depth))
    assert step_peak(text, f"checkpoint(segments={segments})") < 0.6 * step_peak(text, "store")


def test_reversible_refuses_an_output_modified_in_place_and_a_second_backward():
    x, edge_index, y = graph()
    model = build(stack_text("rev", "gcn"), "reversible")
    stack = model.stages[1]
    h = model.stages[0](x, model.graph_cache.prepare(edge_index, num_nodes=N, dtype=x.dtype, forms=model.forms))
    graph_ = model.graph_cache.graph
    out = stack(h, graph_)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
    out = stack(h, graph_)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward once per forward"):
        out.sum().backward()


@pytest.mark.parametrize("kind", [k for k in PLANS if k != "deq"] + ["deq"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_activation_in_place_on_the_norm_output_changes_no_value_or_gradient(kind, norm):
    """A stack layer's relu overwrites its layer/batch norm's output (gnnspec.ir.act_in_place),
    and so does its dropout before the relu, or the shared mask of rev/deq (gnnspec.ir.drop_in_place;
    not in gcnii, which drops its input):
    under every plan, the step equals, bit for bit, the same model computing drop(relu(norm(x)))
    out of place."""
    text = stack_text(kind, "gcn", norm=norm)
    x, edge_index, y = graph()
    for plan in ["store"] + PLANS[kind]:
        model = build(text, plan)
        relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
        assert relus and all(m.inplace for m in relus), plan
        layers = [m for m in model.modules() if hasattr(m, "fused_relu_dropout")]
        assert layers and all(m.fused_relu_dropout == (kind != "gcnii") for m in layers), plan
        reference = build(text, plan)
        for m in reference.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
            if hasattr(m, "fused_relu_dropout"):
                m.fused_relu_dropout = False
        out, grads, state = train_step(model, x, edge_index, y)
        ref_out, ref_grads, ref_state = train_step(reference, x, edge_index, y)
        assert torch.equal(out, ref_out), plan
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), (plan, name)
        for name in state:
            assert torch.equal(state[name], ref_state[name]), (plan, name)


def test_activation_stays_out_of_place_where_the_norm_keeps_its_output():
    for norm, act in [("graph", "relu"), ("instance", "relu"), ("none", "relu"), ("layer", "gelu")]:
        model = gnnspec.build(f"plain(op=gcn, depth=2, norm={norm}, act={act})", IN, OUT)
        acts = [m for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.GELU))]
        assert acts and not any(getattr(m, "inplace", False) for m in acts), (norm, act)


@pytest.mark.parametrize("kind", ["plain", "res+"])
def test_relu_of_dropout_keeps_two_fewer_tensors_per_layer(kind):
    """The measured step peak of a layer-norm/relu/dropout stack is at least two [N, hidden]
    tensors per layer below the out-of-place formula's (relu's output and the float noise are
    not kept: measured 15.1 and 16.0 tensors fewer over 8 layers)."""
    n, depth, hidden = 500, 8, 32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, IN, generator=gen, dtype=torch.float64)
    edge_index = torch.randint(0, n, (2, 3000), generator=gen)
    y = torch.randint(0, OUT, (n,), generator=gen)
    text = f"{kind}(op=gcn, depth={depth}, hidden={hidden}, norm=layer, dropout=0.3)"
    peaks = []
    for fused in (True, False):
        model = build(text, "store")
        if not fused:
            for m in model.modules():
                if isinstance(m, torch.nn.ReLU):
                    m.inplace = False
                if hasattr(m, "fused_relu_dropout"):
                    m.fused_relu_dropout = False
        peaks.append(measure_step_peak(model, x, edge_index, y, torch.optim.Adam(model.parameters())))
    assert peaks[1] - peaks[0] >= 2 * (depth - 1) * n * hidden * 8, peaks


def _backward_nodes(out: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kind", ["plain", "res+", "rev"])
def test_layer_norm_relu_dropout_is_one_node_unless_a_hook_or_autocast_needs_the_module(kind):
    """A layer norm followed by relu and dropout (or rev's shared mask) runs as one autograd node
    that saves four tensors instead of two nodes saving seven (fewer for a checkpoint's hooks to
    pack and unpack); with a forward hook on the norm, the hook sees the norm's output as before,
    and the step's values and gradients are the same bit for bit either way."""
    text = stack_text(kind, "sage", norm="layer")
    x, edge_index, y = graph()
    model = build(text, "store")
    model.train()
    assert "_LayerNormReluOfDroppedBackward" in _backward_nodes(model(x, edge_index))
    out, grads, _ = train_step(model, x, edge_index, y)

    hooked = build(text, "store")
    seen = []
    for m in hooked.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_hook(lambda mod, inp, res: seen.append(res.detach().clone()))
    hooked.train()
    assert "_LayerNormReluOfDroppedBackward" not in _backward_nodes(hooked(x, edge_index))
    assert seen and seen[0].shape[-1] > 0 and (seen[0] < 0).any()  # the norm's output, before relu
    ref_out, ref_grads, _ = train_step(hooked, x, edge_index, y)
    assert torch.equal(out, ref_out)
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_LayerNormReluOfDroppedBackward" not in _backward_nodes(build(text, "store").float()(x.float(), edge_index))


@pytest.mark.parametrize("op, unfused", [("sage(aggr=mean)", "_CsrAddMatmulBackward"), ("gcn", "_CsrMatmulBackward")])
def test_csr_layer_products_are_one_node(op, unfused):
    """gcn and sage (mean) on the CSR form run their products as one autograd node
    (`_PropagatedLinearBackward`, saving only the input), not the mm/addmm/transpose nodes of the
    unfused order; a forward hook on gcn's `lin` brings the unfused order back (the hook runs), and
    the step's values and gradients agree (tests/test_ops.py checks both orders against
    torch-geometric's own layers)."""
    x, edge_index, y = graph()
    text = f"plain(op={op}, depth=2, norm=layer, dropout=0.2)"
    model = build(text, "store")
    model.train()
    nodes = _backward_nodes(model(x, edge_index))
    assert "_PropagatedLinearBackward" in nodes and unfused not in nodes
    out, grads, _ = train_step(model, x, edge_index, y)
    assert all(g.abs().sum() > 0 for g in grads.values())
    if op != "gcn":
        return
    hooked = build(text, "store")
    calls = []
    for m in hooked.modules():
        if type(m).__name__ == "CsrGCNConv":
            m.lin.register_forward_hook(lambda *args: calls.append(1))
    hooked.train()
    assert unfused in _backward_nodes(hooked(x, edge_index)) and calls
    lins = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inp, res: lins.append(mod) if isinstance(mod, torch.nn.Linear) else None)
    try:  # a global hook too: the fused node would skip lin's call
        assert unfused in _backward_nodes(build(text, "store").train()(x, edge_index)) and lins
    finally:
        handle.remove()
    ref_out, ref_grads, _ = train_step(hooked, x, edge_index, y)
    assert torch.allclose(out, ref_out, rtol=1e-12, atol=0)
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14), name


class _CountFresh(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops whose result is a ``[N, hidden]`` tensor on a storage of its own (not one of
    their inputs', as an in-place op's or a view's is)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor) and a.layout == torch.strided]
            ptr = out.untyped_storage().data_ptr()
            self.count += all(a.untyped_storage().data_ptr() != ptr for a in inputs)
        return out


@pytest.mark.parametrize("op", ["gcn", "sage(aggr=mean)", "gat(heads=2)"])
def test_res_plus_adds_the_residual_inside_the_conv(op):
    """A `res+` layer's `x + conv(h)`: gcn and sage start their product's output from `x + b` (one
    autograd node, no separate sum), gat adds the bias and `x` in place to its aggregation's output:
    one fresh `[N, hidden]` tensor fewer per layer. With a forward hook on the conv, the hook sees the
    convolution's own output and the sum is made after it, and the step's values and gradients
    agree with the fused ones (gat's bit for bit: the same additions, commuted)."""
    x, edge_index, y = graph()
    text = f"res+(op={op}, depth=2, norm=layer, dropout=0.2, hidden=8)"

    def model_with_biases():
        model = build(text, "store")
        with torch.no_grad():  # torch-geometric initialises these biases to zero
            for name, p in model.named_parameters():
                if name.endswith("conv.bias") or name.endswith("lin_l.bias"):
                    p.copy_(torch.linspace(-1, 1, p.numel(), dtype=p.dtype))
        return model.train()

    fused, hooked = model_with_biases(), model_with_biases()
    convs, layers = [], []
    for layer in hooked.stages[1].layers:
        layer.conv.register_forward_hook(lambda mod, inp, res: convs.append(res))
        layer.register_forward_hook(lambda mod, inp, res: layers.append((inp[0], res)))
    fused_nodes, hooked_nodes = _backward_nodes(fused(x, edge_index)), _backward_nodes(hooked(x, edge_index))
    # the hook got conv(h) alone, and the layer's output is its input plus that
    assert len(convs) == len(layers) == 2
    for conv_out, (layer_in, layer_out) in zip(convs, layers):
        assert torch.equal(layer_out, layer_in + conv_out)
    if op != "gat(heads=2)":
        assert "_PropagatedLinearBackward" in fused_nodes and "AddBackward0" not in fused_nodes
        assert "AddBackward0" in hooked_nodes
    with _CountFresh((x.shape[0], 8)) as fused_fresh:
        fused(x, edge_index)
    with _CountFresh((x.shape[0], 8)) as hooked_fresh:
        hooked(x, edge_index)
    assert fused_fresh.count == hooked_fresh.count - 2  # one [N, hidden] tensor fewer per layer
    out, grads, _ = train_step(fused, x, edge_index, y)
    ref_out, ref_grads, _ = train_step(hooked, x, edge_index, y)
    exact = op == "gat(heads=2)"
    assert torch.allclose(out, ref_out, rtol=0 if exact else 1e-12, atol=0)
    rtol, atol = (0, 0) if exact else (1e-10, 1e-14)
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=rtol, atol=atol), name


@pytest.mark.parametrize("kind", ["plain", "res+", "rev"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_a_forward_hook_on_the_activation_sees_it_called_and_changes_the_output(kind, norm):
    # relu and dropout ran fused, so a hook on `act` was never called (0 of 2 calls) and a hook
    # that replaces the activation's output changed nothing.
    text = stack_text(kind, "gcn", norm=norm)
    x, edge_index, _ = graph()
    for plan in ["store", *PLANS[kind]]:
        outputs = []
        for hooked in (False, True):
            model = build(text, plan).train()
            acts = [m.act for m in model.modules() if isinstance(getattr(m, "act", None), torch.nn.ReLU)]
            calls = []
            if hooked:
                for act in acts:
                    act.register_forward_hook(lambda mod, inp, out: calls.append(1) or torch.zeros_like(out))
            torch.manual_seed(1)
            outputs.append(model(x, edge_index))
            assert len(calls) == (len(acts) if hooked else 0) and acts, plan
        assert not torch.equal(outputs[0], outputs[1]), plan


def test_a_constant_made_under_inference_mode_does_not_break_later_training():
    # The cached dropout scale was an inference tensor when first made under inference mode;
    # every later training step then failed: "Inference tensors cannot be saved for backward".
    text = stack_text("res+", "gcn", norm="layer", dropout=0.37)
    x, edge_index, y = graph()
    with torch.inference_mode():
        build(text, "store").train()(x, edge_index)  # Monte-Carlo dropout at inference
    for plan in ["store", "checkpoint(segments=2)"]:
        assert_same_step(text, plan)
    assert_same_step(stack_text("rev", "gcn", norm="layer", dropout=0.37), "reversible")


@pytest.mark.parametrize("kind, plan, norm", [
    ("rev", "reversible", "batch"), ("rev", "reversible", "layer"),
    ("res+", "checkpoint(segments=2)", "batch"), ("res+", "checkpoint(segments=2)", "layer"),
    ("rev", "checkpoint(segments=2)", "batch"), ("gcnii", "checkpoint(segments=2)", "batch"),
])
def test_backward_after_switching_to_eval_recomputes_in_the_forward_mode(kind, plan, norm):
    # reversible recomputed each group function in eval mode (batch norm on running statistics):
    # gradients were 0.35-7.4 off in relative norm, with equal outputs; checkpoint's recomputation
    # saved other tensors than its forward, and torch's checkpoint raised CheckpointError
    text = stack_text(kind, "gcn", norm=norm)
    x, edge_index, y = graph()
    results = []
    for plan in ["store", plan]:
        model = build(text, plan)
        model.train()
        torch.manual_seed(1)
        out = model(x, edge_index)
        model.eval()  # an evaluation helper that leaves the model in eval mode
        torch.nn.functional.cross_entropy(out, y).backward()
        assert not any(m.training for m in model.modules())  # the mode is the caller's again
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-9)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("kind", ["plain", "res+", "rev", "gcnii"])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_hook_on_the_norm_keeps_the_output_the_norm_returned(kind, norm):
    # relu (and dropout) ran in place on the norm's output, so a hook holding it saw it changed
    # afterwards (a minimum of 0.0 where the norm had returned -2.46)
    text = stack_text(kind, "gcn", norm=norm, dropout=0.3)
    x, edge_index, y = graph()
    outputs = {}
    for plan in ["store", "checkpoint(segments=2)"] + (["reversible"] if kind == "rev" else []):
        model = build(text, plan).train()
        stack = model.stages[1]
        first = (stack.stack.functions if kind == "rev" else stack.layers)[0]
        seen = []
        first.norm.register_forward_hook(lambda mod, args, out: seen.append((out, out.detach().clone())))
        torch.manual_seed(1)
        out = model(x, edge_index)
        torch.nn.functional.cross_entropy(out, y).backward()
        assert seen and all(torch.equal(held, copy) for held, copy in seen) and seen[0][1].min() < 0
        outputs[plan] = (out.detach(), [p.grad for p in model.parameters()])
    reference = outputs.pop("store")
    for out, grads in outputs.values():
        torch.testing.assert_close(out, reference[0], rtol=1e-6, atol=1e-9)
        for got, want in zip(grads, reference[1]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind, plan", [("rev", "reversible"), ("rev", "checkpoint(segments=2)"),
                                        ("res+", "checkpoint(segments=2)"), ("deq", "implicit")])
def test_functional_call_gets_the_gradients_of_the_tensors_it_passes(kind, plan):
    # torch.func.functional_call swaps its tensors in for the forward and the module's own back on
    # return: reversible recomputed with the module's own, so the tensors passed got zero
    # gradients; checkpoint took them at the module's values (0.09-0.15 off)
    from torch.func import functional_call

    text = stack_text(kind, "gcn", norm="layer", dropout=0.3)
    x, edge_index, y = graph()
    grads = []
    for p in ["store", plan]:
        model = build(text, p).train()
        params = {name: (1.1 * t).detach().requires_grad_() for name, t in model.named_parameters()}
        torch.manual_seed(1)
        out = functional_call(model, params, (x, edge_index))
        grads.append(torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), list(params.values())))
    for reference, got in zip(*grads):
        assert got.abs().max() > 0 or reference.abs().max() == 0
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind, plan", [("rev", "reversible"), ("deq", "implicit")])
def test_second_order_gradients_are_refused_where_the_backward_recomputes(kind, plan):
    # create_graph=True returned None for most parameters' second-order gradients, silently.
    text = stack_text(kind, "gcn", norm="none", dropout=0.0)
    x, edge_index, y = graph()
    x = x.clone().requires_grad_()
    model = build(text, plan).train()
    loss = torch.nn.functional.cross_entropy(model(x, edge_index), y)
    with pytest.raises(RuntimeError, match=f"second-order gradients .* not supported under the `{plan}` plan"):
        torch.autograd.grad(loss, x, create_graph=True)
    # first-order gradients are unaffected, and store/checkpoint differentiate twice
    (first,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x, edge_index), y), x)
    for other in ["store", "checkpoint(segments=2)"]:
        reference = build(text, other).train()
        (gx,) = torch.autograd.grad(torch.nn.functional.cross_entropy(reference(x, edge_index), y), x, create_graph=True)
        torch.testing.assert_close(gx.detach(), first, rtol=1e-6, atol=1e-9)
        (gx ** 2).sum().backward()
        assert all(p.grad is not None for p in reference.parameters() if p.requires_grad)


class _Counted(torch.nn.Module):
    """``lin(x) * (1 + calls / 10)``, ``calls`` a buffer its training forward first adds one to
    (in place, or by assigning a new tensor): a forward that reads state it changes."""

    def __init__(self, channels: int, assign: bool = False) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(channels, channels)
        self.register_buffer("calls", torch.zeros(()))
        self.assign = assign

    def forward(self, x, edge_index):
        if self.training:
            if self.assign:
                self.calls = self.calls + 1
            else:
                self.calls.add_(1)
        return self.lin(x) * (1 + 0.1 * self.calls)


class _SpectralGraphConv(torch.nn.Module):
    """torch-geometric's ``GraphConv`` with ``spectral_norm`` on its neighbour weight: every training
    forward takes one power-iteration step on the parametrization's ``_u``/``_v`` buffers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from torch_geometric.nn import GraphConv

        self.conv = GraphConv(channels, channels)
        torch.nn.utils.parametrizations.spectral_norm(self.conv.lin_rel)

    def forward(self, x, edge_index):
        return self.conv(x, edge_index)


class _Twin(torch.nn.Module):
    """Two submodules holding one buffer: the first counts its training forwards in place, the
    second's value scales the output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.counter, self.reader = torch.nn.Module(), torch.nn.Module()
        calls = torch.zeros(())
        self.counter.register_buffer("calls", calls)
        self.reader.register_buffer("calls", calls)
        self.lin = torch.nn.Linear(channels, channels)

    def forward(self, x, edge_index):
        if self.training:
            self.counter.calls.add_(1)
        return self.lin(x) * (1 + 0.1 * self.reader.calls)


@pytest.fixture
def stateful_ops():
    from gnnspec import ops

    gnnspec.register_op("counted", _Counted, params={"assign": False})
    gnnspec.register_op("spectral", _SpectralGraphConv)
    gnnspec.register_op("twin", _Twin)
    yield
    for name in ("counted", "spectral", "twin"):
        ops.OP_SIGNATURES.pop(name, None)
        ops._IMPLS.pop(name, None)


@pytest.mark.parametrize("kind, plan", [("res+", "checkpoint(segments=2)"), ("plain", "checkpoint(segments=3)"),
                                        ("rev", "reversible"), ("rev", "checkpoint(segments=2)")])
@pytest.mark.parametrize("op", ["counted", "counted(assign=true)", "spectral"])
@pytest.mark.parametrize("tie", [False, True])
def test_a_recomputation_starts_from_the_buffers_the_forward_started_from(stateful_ops, kind, plan, op, tie):
    # torch's checkpoint and the reversible backward recomputed from the buffers as the forward had
    # left them: spectral_norm took a second power-iteration step (gradients 1e-4 to 1e-2 off),
    # a counter was counted twice; outputs, gradients and buffers after the step now equal store's
    assert_same_step(stack_text(kind, op, norm="layer", dropout=0.2, tie=tie, depth=4), plan)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("plan", ["checkpoint(segments=2)", "reversible"])
def test_a_hook_on_a_parameter_runs_once_per_backward(plan, tie):
    # reversible took each recomputed function's parameter gradients with torch.autograd.grad on
    # the parameters themselves, which ran their hooks there too: a hook doubling the gradient ran
    # 2 times untied (4 tied) and the gradient came out 2x store's
    text = stack_text("rev", "gcn", norm="layer", dropout=0.2, tie=tie)
    x, edge_index, y = graph()
    results = []
    for p in ["store", plan]:
        model = build(text, p).train()
        weight = model.stages[1].stack.functions[0].conv.lin.weight
        calls = []
        weight.register_hook(lambda g: (calls.append(1), g * 2)[1])
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(model(x, edge_index), y).backward()
        results.append((len(calls), weight.grad.clone()))
    (ref_calls, ref_grad), (calls, grad) = results
    assert ref_calls == calls == 1
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind, plan", [("res+", "checkpoint(segments=2)"), ("rev", "reversible")])
def test_a_buffer_two_modules_hold_stays_one_tensor_in_the_recomputation(stateful_ops, kind, plan):
    # each module had been given its own copy of the buffer's value before the forward: the
    # recomputation counted in one copy and read the other (gradients off); float32, as `double()`
    # would give each module a converted buffer of its own
    x, edge_index, y = graph()
    results = []
    for p in ["store", plan]:
        torch.manual_seed(0)
        model = gnnspec.build(stack_text(kind, "twin", norm="layer", depth=4), IN, OUT, plan=p)
        twin = next(m for m in model.modules() if isinstance(m, _Twin))
        assert twin.counter.calls is twin.reader.calls
        results.append(train_step(model, x.float(), edge_index, y))
    (_, ref_grads, ref_state), (_, grads, state) = results
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in ref_state:
        torch.testing.assert_close(state[name], ref_state[name], rtol=1e-5, atol=1e-7, msg=name)
