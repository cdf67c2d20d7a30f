"""The op registry: every op is its torch-geometric layer at width c -> c, fed a graph prepared once."""

from __future__ import annotations

import pytest
import torch
import torch_geometric.nn.conv.appnp as pyg_appnp
import torch_geometric.nn.conv.eg_conv as pyg_eg_conv
import torch_geometric.nn.conv.gcn2_conv as pyg_gcn2_conv
import torch_geometric.nn.conv.gcn_conv as pyg_gcn_conv
from torch import Tensor
from torch_geometric.nn import APPNP, ChebConv, EGConv, GATConv, GATv2Conv, GCN2Conv, GCNConv, SAGEConv, SGConv
from torch_geometric.utils import add_self_loops, coalesce, remove_self_loops, to_undirected

import gnnspec
import gnnspec.ops as ops
from gnnspec.ir import OP_SIGNATURES, Op
from gnnspec.memory.measure import LiveStorageTracker
from gnnspec.ops import (
    GRAPH_FORMS,
    GraphCache,
    call_conv,
    graph_form,
    make_appnp,
    make_conv,
    make_gcn2,
    make_sgc,
    op_impl,
    prepared_bytes,
    register_op,
)

N, E = 12, 40
BUILTIN = ["gcn", "sage", "gat", "gatv2", "gen", "gin", "graphconv", "transformer", "egc", "cheb"]


def _op(name: str, **args) -> Op:
    sig = OP_SIGNATURES[name]
    return Op(name=name, args=tuple((p.name, args.get(p.name, p.default)) for p in sig.params))


def _graph(seed: int = 0, channels: int = 8, loops: bool = True) -> tuple[Tensor, Tensor]:
    """Random directed graph in float64; with ``loops`` it keeps a few self-loops and duplicates."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, channels, generator=gen, dtype=torch.float64)
    edge_index = torch.randint(0, N, (2, E), generator=gen)
    if not loops:
        edge_index, _ = remove_self_loops(coalesce(edge_index, num_nodes=N))
    return x, edge_index


def _prepare(edge_index: Tensor, cache: GraphCache | None = None, forms=tuple(GRAPH_FORMS)):
    cache = cache or GraphCache()
    return cache.prepare(edge_index, num_nodes=N, dtype=torch.float64, forms=forms)


@pytest.fixture
def user_ops():
    """Removes the ops a test registers from both registries."""
    names: list[str] = []
    yield names
    for name in names:
        OP_SIGNATURES.pop(name, None)
        ops._IMPLS.pop(name, None)


# ---------------------------------------------------------------------------- built-in ops

VARIANTS = [_op(name) for name in BUILTIN] + [
    _op("sage", aggr="max"),
    _op("gen", learn_t=True),
    _op("gen", aggr="powermean"),
    _op("gat", heads=2),
    _op("cheb", k=3),
]


@pytest.mark.parametrize("channels", [8, 16, 32])
@pytest.mark.parametrize("op", VARIANTS, ids=lambda op: f"{op.name}{dict(op.args)}")
def test_every_op_maps_width_to_width_and_trains_every_parameter(op: Op, channels: int):
    torch.manual_seed(0)
    x, edge_index = _graph(channels=channels)
    conv = make_conv(op, channels).double()
    graph = _prepare(edge_index, forms=[graph_form(op.name)])
    out = call_conv(conv, op.name, x, graph)
    assert out.shape == (N, channels)
    assert out.dtype == torch.float64
    (out * torch.randn_like(out)).sum().backward()
    params = dict(conv.named_parameters())
    assert params
    for name, param in params.items():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", BUILTIN)
def test_every_op_can_change_the_width_for_dense_stacks(name: str):
    x, edge_index = _graph(channels=12)
    conv = make_conv(_op(name), 8, in_channels=12).double()
    out = call_conv(conv, name, x, _prepare(edge_index, forms=[graph_form(name)]))
    assert out.shape == (N, 8)


def test_each_op_is_its_torch_geometric_layer():
    layers = {
        "gcn": "GCNConv", "sage": "SAGEConv", "gat": "GATConv", "gatv2": "GATv2Conv",
        "gen": "GENConv", "gin": "GINConv", "graphconv": "GraphConv",
        "transformer": "TransformerConv", "egc": "EGConv", "cheb": "ChebConv",
    }
    for name, layer in layers.items():
        conv = make_conv(_op(name), 16)
        assert layer in [cls.__name__ for cls in type(conv).__mro__], name
        assert type(conv).__module__.startswith(("torch_geometric", "gnnspec.ops"))


def test_gin_mlp_is_linear_relu_linear_at_width():
    mlp = make_conv(_op("gin"), 16).nn
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"]
    assert [tuple(m.weight.shape) for m in (mlp[0], mlp[2])] == [(16, 16), (16, 16)]


@pytest.mark.parametrize(
    "name, shapes",
    [
        ("gat", {"lin.weight": (8, 8), "att_src": (1, 2, 4), "att_dst": (1, 2, 4), "bias": (8,)}),
        ("gatv2", {"lin_l.weight": (8, 8), "lin_r.weight": (8, 8), "att": (1, 2, 4), "bias": (8,)}),
        ("transformer", {f"lin_{k}.weight": (8, 8) for k in ("query", "key", "value", "skip")}),
        ("egc", {"bases_lin.weight": (4 * 4, 8), "comb_lin.weight": (2 * 4, 8), "bias": (8,)}),
    ],
)
def test_heads_split_the_width(name: str, shapes: dict[str, tuple[int, ...]]):
    conv = make_conv(_op(name, heads=2), 8)
    params = {k: tuple(p.shape) for k, p in conv.named_parameters()}
    assert {k: params[k] for k in shapes} == shapes
    assert getattr(conv, "heads", getattr(conv, "num_heads", None)) == 2


def test_heads_that_do_not_divide_the_width_are_an_error():
    with pytest.raises(ValueError, match="3 heads of op 'gat' do not divide the width 8"):
        make_conv(_op("gat", heads=3), 8)


# ---------------------------------------------------------------------------- prepared graphs


def _same_weights(ours, stock):
    stock.load_state_dict(ours.state_dict())
    return stock.double()


@pytest.mark.parametrize(
    "op, stock",
    [
        (_op("gcn"), lambda c: GCNConv(c, c, normalize=True)),
        (_op("gat", heads=2), lambda c: GATConv(c, c // 2, heads=2)),
        (_op("gatv2", heads=2), lambda c: GATv2Conv(c, c // 2, heads=2)),
        (_op("egc", heads=2, bases=3), lambda c: EGConv(c, c, num_heads=2, num_bases=3)),
        (_op("cheb", k=3), lambda c: ChebConv(c, c, K=3)),
    ],
    ids=lambda v: v.name if isinstance(v, Op) else "",
)
def test_prepared_graph_gives_the_stock_layer_on_the_raw_graph(op: Op, stock):
    torch.manual_seed(0)
    x, edge_index = _graph(channels=8)  # with self-loops and duplicate edges
    conv = make_conv(op, 8).double()
    reference = _same_weights(conv, stock(8))
    out = call_conv(conv, op.name, x, _prepare(edge_index, forms=[graph_form(op.name)]))
    torch.testing.assert_close(out, reference(x, edge_index), rtol=0, atol=1e-10)


def test_stage_convs_give_the_stock_layers_on_the_raw_graph():
    torch.manual_seed(0)
    x, edge_index = _graph(channels=8)
    x_0 = torch.randn_like(x)
    graph = _prepare(edge_index, forms=[graph_form("gcn2")])
    gcn2 = make_gcn2(8, alpha=0.1, theta=0.5, layer=3).double()
    stock = _same_weights(gcn2, GCN2Conv(8, alpha=0.1, theta=0.5, layer=3))
    out = call_conv(gcn2, "gcn2", x, graph, x_0=x_0)
    torch.testing.assert_close(out, stock(x, x_0, edge_index), rtol=0, atol=1e-10)
    appnp = make_appnp(k=5, alpha=0.2)
    out = call_conv(appnp, "appnp", x, graph)
    torch.testing.assert_close(out, APPNP(K=5, alpha=0.2)(x, edge_index), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="gcn2 needs x_0"):
        call_conv(gcn2, "gcn2", x, graph)


def _dense_gcn_adjacency(edge_index: Tensor) -> Tensor:
    """D^-1/2 (A + I) D^-1/2 with A[target, source] = 1, built without torch_geometric."""
    adj = torch.zeros(N, N, dtype=torch.float64)
    adj[edge_index[1], edge_index[0]] = 1.0
    adj += torch.eye(N, dtype=torch.float64)
    d = adj.sum(dim=1).rsqrt()
    return d[:, None] * adj * d[None, :]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sgc_is_the_kth_power_of_the_normalised_adjacency(k: int):
    x, edge_index = _graph(channels=8, loops=False)  # directed, no duplicates
    out = call_conv(make_sgc(k), "sgc", x, _prepare(edge_index, forms=[graph_form("sgc")]))
    assert not list(make_sgc(k).parameters())
    dense = torch.linalg.matrix_power(_dense_gcn_adjacency(edge_index), k) @ x
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-12)
    sgconv = SGConv(8, 8, K=k, bias=False).double()
    with torch.no_grad():
        sgconv.lin.weight.copy_(torch.eye(8))
    torch.testing.assert_close(out, sgconv(x, edge_index), rtol=0, atol=1e-12)


def _count_gcn_norm(monkeypatch) -> list[int]:
    """Counts GraphCache's gcn_norm calls and fails if any layer computes gcn_norm itself."""
    calls = [0]
    real = ops.gcn_norm

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("a layer computed gcn_norm itself")

    monkeypatch.setattr(ops, "gcn_norm", counting)
    for module in (pyg_gcn_conv, pyg_eg_conv, pyg_gcn2_conv, pyg_appnp):
        monkeypatch.setattr(module, "gcn_norm", forbidden)
    return calls


def test_cache_computes_gcn_norm_once_per_graph(monkeypatch):
    calls = _count_gcn_norm(monkeypatch)
    x, edge_index = _graph(channels=8)
    layers = [("gcn", make_conv(_op("gcn"), 8)) for _ in range(3)]
    layers += [("egc", make_conv(_op("egc", heads=2), 8))]
    layers += [("appnp", make_appnp(3, 0.1)), ("sgc", make_sgc(2))]
    layers = [(name, conv.double()) for name, conv in layers]
    gcn2 = make_gcn2(8, 0.1, 0.5, 1).double()
    cache = GraphCache()

    def forward(edge_index: Tensor) -> Tensor:
        forms = {graph_form(name) for name, _ in layers}
        graph = cache.prepare(edge_index, num_nodes=N, dtype=torch.float64, forms=forms)
        h = x
        for name, conv in layers:
            h = call_conv(conv, name, h, graph)
        return call_conv(gcn2, "gcn2", h, graph, x_0=x)

    with pytest.raises(AssertionError, match="computed gcn_norm itself"):
        GCNConv(8, 8).double()(x, edge_index)  # the stock layer would, so the patch is in effect
    first = forward(edge_index)
    forward(edge_index).sum().backward()
    assert calls[0] == 1

    other = edge_index.flip(0).contiguous()
    forward(other)
    assert calls[0] == 2 and cache.graph.edge_index is other  # only the latest graph is kept
    torch.testing.assert_close(forward(edge_index), first)
    assert calls[0] == 3

    edge_index[0, 0] = (edge_index[0, 0] + 1) % N  # same storage, new contents
    forward(edge_index)
    assert calls[0] == 4


def test_cache_adds_missing_forms_and_keeps_prepared_ones(monkeypatch):
    calls = _count_gcn_norm(monkeypatch)
    _, edge_index = _graph()
    cache = GraphCache()
    first = cache.prepare(edge_index, num_nodes=N, dtype=torch.float64, forms=["gcn_norm"])
    second = cache.prepare(edge_index, num_nodes=N, dtype=torch.float64, forms=["self_loops", "cheb_norm"])
    assert calls[0] == 1
    assert second.forms == {"raw", "gcn_norm", "self_loops", "cheb_norm"}
    assert second.gcn_edge_weight is first.gcn_edge_weight
    cache.prepare(edge_index, num_nodes=N, dtype=torch.float32, forms=["gcn_norm"])
    assert calls[0] == 2  # weights in another dtype
    with pytest.raises(ValueError, match="graph form 'gcn_csr' was not prepared"):
        raw = GraphCache().prepare(edge_index, num_nodes=N, dtype=torch.float32)
        call_conv(make_conv(_op("gcn"), 8), "gcn", torch.zeros(N, 8), raw)


def test_graph_prepared_in_inference_mode_is_not_reused_for_training():
    x, edge_index = _graph(channels=8)
    conv = make_conv(_op("gcn"), 8).double()
    cache = GraphCache()
    with torch.inference_mode():
        cache.prepare(edge_index, num_nodes=N, dtype=torch.float64, forms=[graph_form("gcn")])
    graph = cache.prepare(edge_index, num_nodes=N, dtype=torch.float64, forms=[graph_form("gcn")])
    call_conv(conv, "gcn", x, graph).sum().backward()
    assert conv.lin.weight.grad is not None


def test_an_inference_tensor_edited_in_place_is_prepared_again():
    # inference tensors have no version counter: an in-place edit is invisible to the cache key
    torch.manual_seed(0)
    x = torch.randn(N, 6)
    text = "hidden: 8\nmodel: plain(op=gcn, depth=2)"
    model, fresh = gnnspec.build(text, 6, 3).eval(), gnnspec.build(text, 6, 3).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        edge_index = torch.randint(0, N, (2, E))
        model(x, edge_index)
        edge_index[0, : E // 2] = (edge_index[0, : E // 2] + 7) % N
        torch.testing.assert_close(model(x, edge_index), fresh(x, edge_index.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("op", BUILTIN)
def test_int32_edge_index_gives_the_gradients_of_int64(op):
    # torch's scatter backward with int32 indices accumulates into wrong rows; the raw form is int64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, dtype=torch.float64, generator=g)
    edge_index = torch.randint(0, N, (2, E), generator=g)
    grads = []
    for dtype in (torch.int64, torch.int32):
        torch.manual_seed(0)
        model = gnnspec.build(f"hidden: 8\nmodel: plain(op={op}, depth=2, norm=none, dropout=0)", 6, 3).double()
        (model(x, edge_index.to(dtype)) ** 2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["float", "one row", "transposed", "bool"])
def test_an_edge_index_that_is_not_integer_2_by_e_is_a_value_error(bad):
    _, edge_index = _graph()
    wrong = {"float": edge_index.float(), "one row": edge_index[0], "transposed": edge_index[:, :5].t(),
             "bool": edge_index.bool()}[bad]
    with pytest.raises(ValueError, match=r"edge_index must be an integer tensor of shape \[2, E\]"):
        gnnspec.build("plain(op=gcn, depth=1)", 4, 3)(torch.randn(N, 4), wrong)


def test_prepared_bytes_matches_the_prepared_tensors():
    _, edge_index = _graph(loops=False)
    graph = _prepare(edge_index)
    assert graph.nbytes == prepared_bytes(GRAPH_FORMS, N, edge_index.size(1), value_bytes=8)
    assert prepared_bytes(["raw"], N, edge_index.size(1), value_bytes=8) == 0


# ---------------------------------------------------------------------------- cached-CSR propagation


def _csr_test_graph(undirected: bool) -> Tensor:
    """Directed: random edges among nodes 0..8 (9..11 isolated, some nodes without in-edges).
    Undirected: the same, symmetrised."""
    gen = torch.Generator().manual_seed(3)
    edge_index = torch.randint(0, 9, (2, 30), generator=gen)
    edge_index, _ = remove_self_loops(coalesce(edge_index, num_nodes=N))
    return to_undirected(edge_index, num_nodes=N) if undirected else edge_index


def _csr_cases():
    """(name, our conv, the stock layer, call on a prepared graph, call of the stock layer)."""
    def ours(name, conv):
        return lambda x, x_0, graph: call_conv(conv, name, x, graph, x_0=x_0 if name == "gcn2" else None)

    gcn = make_conv(_op("gcn"), 8)
    sage = make_conv(_op("sage"), 8)
    gcn2 = make_gcn2(8, alpha=0.1, theta=0.5, layer=2)
    appnp, sgc = make_appnp(k=3, alpha=0.2), make_sgc(k=2)
    sgconv = SGConv(8, 8, K=2).double()
    return [
        ("gcn", gcn.double(), ours("gcn", gcn), _same_weights(gcn, GCNConv(8, 8, normalize=True)),
         lambda m, x, x_0, ei: m(x, ei)),
        ("sage", sage.double(), ours("sage", sage), _same_weights(sage, SAGEConv(8, 8, aggr="mean")),
         lambda m, x, x_0, ei: m(x, ei)),
        ("gcn2", gcn2.double(), ours("gcn2", gcn2), _same_weights(gcn2, GCN2Conv(8, alpha=0.1, theta=0.5, layer=2)),
         lambda m, x, x_0, ei: m(x, x_0, ei)),
        ("appnp", appnp, ours("appnp", appnp), APPNP(K=3, alpha=0.2), lambda m, x, x_0, ei: m(x, ei)),
        # SGConv = its linear layer after sgc's propagation: compare through SGConv's own weights
        ("sgc", sgconv, lambda x, x_0, graph: sgconv.lin(call_conv(sgc, "sgc", x, graph)), SGConv(8, 8, K=2).double(),
         lambda m, x, x_0, ei: m(x, ei)),
    ]


@pytest.mark.parametrize("undirected", [False, True], ids=["directed", "undirected"])
def test_csr_propagation_gives_the_stock_layers_outputs_and_every_gradient(undirected: bool):
    torch.manual_seed(0)
    edge_index = _csr_test_graph(undirected)
    for name, module, call, stock, stock_call in _csr_cases():
        stock.load_state_dict(module.state_dict())
        x, x_0 = torch.randn(N, 8, dtype=torch.float64), torch.randn(N, 8, dtype=torch.float64)
        graph = _prepare(edge_index, forms=[graph_form(_op(name) if name in ("gcn", "sage") else name)])
        inputs = [(x.clone().requires_grad_(), x_0.clone().requires_grad_()) for _ in range(2)]
        outs = [call(*inputs[0], graph), stock_call(stock, *inputs[1], edge_index)]
        grad = torch.randn_like(outs[0])
        for out in outs:
            (out * grad).sum().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10, msg=name)
        for ours, theirs in zip(inputs[0], inputs[1]):
            if theirs.grad is not None or ours.grad is not None:
                torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-10, msg=name)
        params = dict(stock.named_parameters())
        for key, param in module.named_parameters():
            torch.testing.assert_close(param.grad, params[key].grad, rtol=0, atol=1e-10, msg=f"{name} {key}")


def test_csr_sage_keeps_only_its_output_alive_after_forward():
    """``M (x W_l^T) + (x W_r^T + b)``: the neighbour term is accumulated into the root term in
    place and nothing new is saved for backward (the stock order keeps ``lin_l``'s input ``M x``,
    a second ``[N, C]`` tensor)."""
    graph = _prepare(_csr_test_graph(False), forms=["mean_csr"])
    conv = make_conv(_op("sage"), 8).double()
    x = torch.randn(N, 8, dtype=torch.float64, requires_grad=True)
    with LiveStorageTracker() as tracker:
        out = call_conv(conv, "sage", x, graph)
        alive, peak = tracker.current_bytes, tracker.peak_bytes
    assert alive == out.numel() * 8
    assert peak == 2 * out.numel() * 8  # the root term and the neighbour term's product, nothing more


def test_csr_sage_under_bfloat16_autocast_matches_float32():
    torch.manual_seed(0)
    edge_index = _csr_test_graph(True)
    graph = GraphCache().prepare(edge_index, num_nodes=N, dtype=torch.float32, forms=["mean_csr"])
    conv = make_conv(_op("sage"), 8)
    stock = SAGEConv(8, 8, aggr="mean")
    stock.load_state_dict(conv.state_dict())
    x = torch.randn(N, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_conv(conv, "sage", x, graph)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), stock(x, edge_index), rtol=0, atol=5e-2)
    out.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in conv.parameters())


def test_csr_layers_keep_the_stock_state_dict():
    stock = {
        "gcn": GCNConv(8, 8), "sage": SAGEConv(8, 8), "gcn2": GCN2Conv(8, alpha=0.1),
        "appnp": APPNP(K=2, alpha=0.1),
    }
    ours = {"gcn": make_conv(_op("gcn"), 8), "sage": make_conv(_op("sage"), 8), "gcn2": make_gcn2(8, 0.1, 0.5, 1),
            "appnp": make_appnp(2, 0.1)}
    for name, conv in ours.items():
        assert isinstance(conv, ops.CsrPropagation), name
        assert {k: v.shape for k, v in conv.state_dict().items()} == {
            k: v.shape for k, v in stock[name].state_dict().items()}, name
    assert not isinstance(make_conv(_op("sage", aggr="max"), 8), ops.CsrPropagation)
    assert graph_form(_op("sage", aggr="max")) == "raw" and graph_form(_op("sage")) == "mean_csr"


def test_csr_matrices_are_built_once_per_graph_and_reused(monkeypatch):
    built: list[int] = []
    real = ops.CsrAdjacency.from_edges.__func__

    def counting(cls, *args, **kwargs):
        built.append(1)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(ops.CsrAdjacency, "from_edges", classmethod(counting))
    model = gnnspec.build("plain(op=gcn, depth=2) >> res(op=sage, depth=2) >> appnp(k=2)", in_channels=8, out_channels=3)
    x, edge_index = _graph(channels=8)
    model(x.float(), edge_index).sum().backward()
    first = model.graph_cache.graph
    model(x.float(), edge_index).sum().backward()
    assert len(built) == 2  # gcn_csr and mean_csr, once each
    assert model.graph_cache.graph.gcn_adjacency is first.gcn_adjacency
    assert model.graph_cache.graph.mean_adjacency is first.mean_adjacency


def test_csr_propagation_in_half_precision_and_under_autocast():
    # torch's CPU sparse kernels lack bfloat16: the values are kept in float32, outputs follow
    # type promotion as the edge-index messages (x_j * edge_weight) do
    x, edge_index = _graph(channels=8)
    conv = make_conv(_op("gcn"), 8)
    graph = GraphCache().prepare(edge_index, num_nodes=N, dtype=torch.float32, forms=["gcn_csr"])
    reference = call_conv(conv, "gcn", x.float(), graph)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_conv(conv, "gcn", x.float(), graph)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    half = GraphCache().prepare(edge_index, num_nodes=N, dtype=torch.bfloat16, forms=["gcn_csr"])
    assert half.gcn_adjacency.parts[2].dtype == torch.float32
    assert half.nbytes == graph.nbytes
    xb = x.bfloat16().requires_grad_()
    out = call_conv(conv.bfloat16(), "gcn", xb, half)
    out.float().sum().backward()
    assert out.dtype == xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------- gat without autograd


def test_self_loop_form_is_sorted_by_target_with_its_row_pointer():
    _, edge_index = _graph(channels=8)  # with self-loops and duplicate edges
    graph = _prepare(edge_index, forms=["self_loops"])
    source, target = graph.loop_edge_index
    assert bool((target[1:] >= target[:-1]).all())
    counts = torch.bincount(target, minlength=N)
    holder = graph.loop_sorted
    assert holder.edge_index is graph.loop_edge_index
    assert holder.ptr.tolist() == [0, *counts.cumsum(0).tolist()]
    order = holder.source_order
    assert bool((source[order][1:] >= source[order][:-1]).all())
    assert torch.equal(holder.target_by_source, target[order])
    assert holder.source_ptr.tolist() == [0, *torch.bincount(source, minlength=N).cumsum(0).tolist()]
    expected, _ = add_self_loops(remove_self_loops(edge_index)[0], num_nodes=N)
    assert sorted(zip(*expected.tolist())) == sorted(zip(source.tolist(), target.tolist()))


def _gat_pair(heads: int):
    conv = make_conv(_op("gat", heads=heads), 8).double()
    return conv, _same_weights(conv, GATConv(8, 8 // heads, heads=heads))


def _refuse_messages(monkeypatch) -> None:
    def message(*_args, **_kwargs):
        raise AssertionError("E x heads x C messages built")

    monkeypatch.setattr(GATConv, "message", message)


def _grads(out: Tensor, grad: Tensor, x: Tensor, conv) -> list[Tensor]:
    return list(torch.autograd.grad(out, [x, *conv.parameters()], grad))


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_gat_on_sorted_edges_is_the_stock_layer_without_per_edge_messages(heads: int, monkeypatch):
    torch.manual_seed(0)
    x, edge_index = _graph(channels=8)  # with self-loops and duplicate edges
    conv, stock = _gat_pair(heads)
    graph = _prepare(edge_index, forms=["self_loops"])
    xg = x.clone().requires_grad_()
    expected = {mode: stock.train(mode)(xg, edge_index) for mode in (True, False)}
    grad = torch.randn_like(expected[True])
    expected_grads = _grads(expected[True], grad, xg, stock)
    _refuse_messages(monkeypatch)
    for mode in (True, False):
        conv.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(call_conv(conv, "gat", x, graph), expected[mode].detach(), rtol=0, atol=1e-12)
        with torch.inference_mode():
            torch.testing.assert_close(call_conv(conv, "gat", x, graph), expected[mode].detach(), rtol=0, atol=1e-12)
    out = call_conv(conv.train(), "gat", xg, graph)
    torch.testing.assert_close(out, expected[True], rtol=0, atol=1e-12)
    names = ["x", *(name for name, _ in conv.named_parameters())]
    for name, ours, theirs in zip(names, _grads(out, grad, xg, conv), expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("heads", [1, 2])
def test_gat_on_sorted_edges_differentiates_twice_as_the_stock_layer(heads: int):
    # A gradient penalty through gat raised "sparse_sampled_addmm(): functions with out=...
    # arguments don't support automatic differentiation", under store and checkpoint.
    torch.manual_seed(0)
    x, edge_index = _graph(channels=8)
    conv, stock = _gat_pair(heads)
    graph = _prepare(edge_index, forms=["self_loops"])
    results = []
    for layer, run in ((conv, lambda xg: call_conv(conv, "gat", xg, graph)), (stock, lambda xg: stock(xg, edge_index))):
        xg = x.clone().requires_grad_()
        layer.train().zero_grad()
        (gx,) = torch.autograd.grad(run(xg).tanh().sum(), xg, create_graph=True)
        penalty = (gx ** 2).sum()
        penalty.backward()
        results.append([penalty.detach(), xg.grad, *(p.grad for p in layer.parameters())])
    names = ["penalty", "x", *(name for name, _ in conv.named_parameters())]
    for name, ours, theirs in zip(names, *results):
        assert theirs.abs().max() > 0, name
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-8 * theirs.abs().max(), msg=name)
    # and the second derivatives themselves, by finite differences
    assert torch.autograd.gradgradcheck(lambda xg: call_conv(conv, "gat", xg, graph).tanh(), x.clone().requires_grad_())


def test_gat_attention_dropout_draws_the_stock_layers_masks(monkeypatch):
    # the stock layer given the same sorted edge order makes the same draws, mask for mask
    x, edge_index = _graph(channels=8)
    graph = _prepare(edge_index, forms=["self_loops"])
    conv = make_conv(_op("gat", heads=2), 8).double()
    conv.dropout = 0.5
    stock = _same_weights(conv, GATConv(8, 4, heads=2, dropout=0.5, add_self_loops=False))
    xg = x.clone().requires_grad_()
    torch.manual_seed(1)
    expected = stock(xg, graph.loop_edge_index)
    grad = torch.randn_like(expected)
    expected_grads = _grads(expected, grad, xg, stock)
    _refuse_messages(monkeypatch)
    torch.manual_seed(1)
    out = call_conv(conv, "gat", xg, graph)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for ours, theirs in zip(_grads(out, grad, xg, conv), expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["logits far below the bound", "negative slope", "float32"])
def test_gat_softmax_off_the_fast_path_is_the_stock_layer(case: str, monkeypatch):
    # The fused softmax shifts by one bound per head. Attention scores spread over 1e4 put some
    # nodes' logits so far below it that exp underflows to 0: their 0/0 would be NaN without the
    # per-node maximum it falls back to. A negative slope makes leaky ReLU non-monotone (no bound).
    torch.manual_seed(0)
    x, edge_index = _graph(channels=8)
    conv, stock = _gat_pair(2)
    dtype = torch.float32 if case == "float32" else torch.float64
    conv, stock, x = conv.to(dtype), stock.to(dtype), x.to(dtype)
    if case == "negative slope":  # (float32: the fast path, in single precision)
        conv.negative_slope = stock.negative_slope = -0.5
    elif case == "logits far below the bound":
        with torch.no_grad():
            for module in (conv, stock):
                module.att_dst.mul_(1e4)
    graph = GraphCache().prepare(edge_index, num_nodes=N, dtype=dtype, forms=["self_loops"])
    xg = x.clone().requires_grad_()
    expected = stock(xg, edge_index)
    grad = torch.randn_like(expected)
    expected_grads = _grads(expected, grad, xg, stock)
    _refuse_messages(monkeypatch)
    out = call_conv(conv, "gat", xg, graph)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    assert bool(out.isfinite().all())
    torch.testing.assert_close(out, expected, **tol)
    for ours, theirs in zip(_grads(out, grad, xg, conv), expected_grads):
        torch.testing.assert_close(ours, theirs, **tol)


def test_gat_in_half_precision_runs_the_stock_kernels():
    # torch's CPU CSR product has no bfloat16 kernel
    x, edge_index = _graph(channels=8)
    conv, stock = _gat_pair(2)
    graph = GraphCache().prepare(edge_index, num_nodes=N, dtype=torch.bfloat16, forms=["self_loops"])
    out = call_conv(conv.bfloat16(), "gat", x.bfloat16(), graph)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), stock(x, edge_index), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------- user ops


class Scale(torch.nn.Module):
    def __init__(self, channels: int, scale: float = 1.0, mode: str = "sum") -> None:
        super().__init__()
        self.scale, self.mode = scale, mode
        self.lin = torch.nn.Linear(channels, channels)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        out = torch.zeros_like(x).index_add_(0, edge_index[1], x[edge_index[0]])
        return self.scale * self.lin(out)


def test_register_op_makes_specs_name_it_and_make_conv_build_it(user_ops):
    user_ops.append("myop")
    register_op("myop", Scale, params={"scale": 1.0, "mode": ("sum", "mean")})
    spec = gnnspec.parse("plain(op=myop(scale=2.0), depth=2)")
    op = spec.model[0].op
    assert op.args == (("scale", 2.0), ("mode", "sum"))
    sig = OP_SIGNATURES["myop"]
    assert [(p.type, p.default, p.choices) for p in sig.params] == [
        ("float", 1.0, ()),
        ("enum", "sum", ("sum", "mean")),
    ]
    assert not sig.builtin and op_impl("myop").graph == "raw"
    conv = make_conv(op, 8).double()
    assert isinstance(conv, Scale) and conv.scale == 2.0
    x, edge_index = _graph(channels=8)
    assert call_conv(conv, "myop", x, _prepare(edge_index, forms=["raw"])).shape == (N, 8)
    assert "op=myop(scale=2.0)" in gnnspec.format(spec)


def test_user_op_changes_the_width_only_if_its_factory_takes_in_channels(user_ops):
    user_ops.extend(["fixed", "widening"])
    register_op("fixed", Scale)

    def widening(channels: int, in_channels: int | None = None) -> torch.nn.Module:
        return torch.nn.Linear(in_channels or channels, channels)

    register_op("widening", widening)
    assert make_conv(Op(name="widening"), 8, in_channels=12).weight.shape == (8, 12)
    assert isinstance(make_conv(Op(name="fixed"), 8, in_channels=8), Scale)
    with pytest.raises(ValueError, match="cannot map width 12 to 8"):
        make_conv(Op(name="fixed"), 8, in_channels=12)


def test_unknown_argument_of_a_user_op_is_an_error(user_ops):
    user_ops.append("myop")
    register_op("myop", Scale, params={"scale": 1.0})
    with pytest.raises(gnnspec.SpecError, match="op `myop` has no argument `scal`"):
        gnnspec.parse("plain(op=myop(scal=2.0), depth=2)")
    with pytest.raises(ValueError, match="op 'myop' has no argument 'scal'"):
        make_conv(Op(name="myop", args=(("scal", 2.0),)), 8)


def test_register_op_with_heads_is_checked_against_the_width(user_ops):
    user_ops.append("headed")
    def factory(channels: int, heads: int) -> GATConv:
        return GATConv(channels, channels // heads, heads=heads)

    register_op("headed", factory, params={"heads": 2}, heads="heads")
    assert OP_SIGNATURES["headed"].param("heads").minimum == 1
    with pytest.raises(gnnspec.SpecError, match="3 attention heads do not divide"):
        gnnspec.parse("plain(op=headed(heads=3), depth=2, hidden=8)")
    with pytest.raises(ValueError, match="must name an int parameter"):
        register_op("headed", Scale, params={"scale": 1.0}, heads="scale")


def test_register_op_rejects_builtin_names_and_untyped_defaults(user_ops):
    user_ops.append("strop")
    with pytest.raises(ValueError, match="built-in"):
        register_op("gcn", Scale)
    with pytest.raises(ValueError, match="built-in"):
        register_op("sgc", Scale)
    with pytest.raises(TypeError, match="tuple of strings"):
        register_op("strop", Scale, params={"mode": "sum"})
    with pytest.raises(ValueError, match="unknown graph form"):
        register_op("strop", Scale, graph="dense")
    assert "strop" not in OP_SIGNATURES


@pytest.mark.parametrize("op", ["gcn", "sage", "gat(heads=2)", "gin"])
@pytest.mark.parametrize("bad", [N, N + 1000, -1])
def test_an_edge_index_outside_the_nodes_is_an_index_error(op, bad):
    # sage's mean CSR product read outside x for a source index >= N (its output changed between
    # identical calls, and a large index crashed the process); PyG's layers raise IndexError.
    x, edge_index = _graph()
    model = gnnspec.build(f"plain(op={op}, depth=2, hidden=8)", in_channels=8, out_channels=3).double()
    for row in (0, 1):
        broken = edge_index.clone()
        broken[row, 3] = bad
        with pytest.raises(IndexError, match=f"node index {bad}, outside \\[0, {N}\\) for {N} nodes"):
            model(x, broken)
    model(x, edge_index)  # the valid graph still runs


@pytest.mark.parametrize("op", ["gcn", "sage", "gat(heads=2)", "cheb"])
def test_a_copied_model_prepares_its_graph_again(op, tmp_path):
    # The CSR matrices could not be deep-copied (NotImplementedError after one forward), and a
    # copy's cache named the original edge_index by address, which a new graph could then reuse.
    import copy

    x, edge_index = _graph()
    model = gnnspec.build(f"plain(op={op}, depth=2, hidden=8)", in_channels=8, out_channels=3).double().eval()
    expected = model(x, edge_index)
    assert model.graph_cache.graph is not None
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (clone, loaded):
        assert other.graph_cache.graph is None
        torch.testing.assert_close(other(x, edge_index), expected, rtol=0, atol=0)
        other_x, other_edges = _graph(seed=1)
        torch.testing.assert_close(other(other_x, other_edges), model(other_x, other_edges), rtol=0, atol=0)


@pytest.mark.parametrize("register, message", [
    (lambda: register_op("true", Scale), "op name 'true' must be a name a spec can write"),
    (lambda: register_op("g\u010bn", Scale), "must be a name a spec can write"),
    (lambda: register_op("u1", Scale, params={"a b": 1}), "parameter name 'a b' must be a name"),
    (lambda: register_op("u1", Scale, params={"channels": 4}), "parameter name 'channels' is reserved"),
    (lambda: register_op("u1", Scale, params={"in_channels": 4}), "parameter name 'in_channels' is reserved"),
    (lambda: register_op("u1", lambda channels, heads: Scale(channels), params={"heads": 0}, heads="heads"),
     "default 0 of parameter 'heads' is below its minimum 1"),
    (lambda: register_op("u1", lambda channels: Scale(channels), params={"k": 2}),
     r"factory of op 'u1' cannot be called as factory\(channels, k=...\)"),
])
def test_register_op_refuses_what_no_spec_could_build(user_ops, register, message):
    # Each of these was accepted and failed later, at parse or build time, with an unrelated
    # SpecError or a TypeError that did not name the op.
    user_ops.append("u1")
    with pytest.raises(ValueError, match=message):
        register()
    assert "u1" not in OP_SIGNATURES and "true" not in OP_SIGNATURES


@pytest.mark.parametrize("plan", ["store", "checkpoint"])
def test_gat_on_a_graph_of_no_nodes_returns_no_rows_as_the_stock_layer(plan: str):
    # the softmax's bound took a maximum over zero nodes: "amax(): Expected reduction dim 0 to have
    # non-zero size", where GATConv returns a [0, C] tensor
    assert GATConv(4, 4)(torch.randn(0, 4), torch.empty(2, 0, dtype=torch.long)).shape == (0, 4)
    x = torch.randn(0, 4, requires_grad=True)
    out = gnnspec.build("plain(op=gat, depth=2)", 4, 3, plan=plan)(x, torch.empty(2, 0, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0, 3) and x.grad.shape == (0, 4)


def test_fused_nodes_run_under_compiled_autograd():
    """gcn/sage's fused products and the layer-norm block ask the engine which input gradients a
    backward uses; compiled autograd traces the nodes instead, so there they take every gradient
    that needs_input_grad names (asking the engine raised inside Dynamo's trace)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(123)
    edge_index = torch.randint(0, 40, (2, 160), generator=g)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = gnnspec.build("res+(op=sage, depth=2, norm=layer, dropout=0.2, hidden=16) >> plain(op=gcn, norm=layer)",
                              in_channels=8, out_channels=4, plan="store").double()
        torch.manual_seed(1)
        loss = model(x, edge_index).pow(2).sum()
        if compiled:
            torch._dynamo.reset()
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
        else:
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, traced in zip(*grads):
        torch.testing.assert_close(traced, eager, rtol=1e-10, atol=0)


def test_reversible_backward_does_not_ask_the_engine(monkeypatch):
    """The reversible stack's backward takes the gradient of each group function's input and of all
    its parameters, so its fused nodes take needs_input_grad as it is (ops.every_gradient_used):
    asking the engine about a leaf that autograd.grad captures raises inside torch (~10 us each,
    5% of a gcn reversible step at depth 64). A store model's autograd.grad with respect to its
    parameters still asks, and the flag is down again after the reversible backward, also when
    it raised."""
    calls = []
    ask = torch._C._will_engine_execute_node

    def counted(node):
        calls.append(node)
        return ask(node)

    monkeypatch.setattr(torch._C, "_will_engine_execute_node", counted)
    g = torch.Generator().manual_seed(5)
    edge_index = torch.randint(0, 30, (2, 120), generator=g)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    for op in ("gcn", "sage"):
        spec = f"rev(op={op}, depth=3, groups=2, norm=layer, dropout=0.2, hidden=16)"
        grads = {}
        for plan in ("reversible", "store"):
            torch.manual_seed(0)
            model = gnnspec.build(spec, in_channels=8, out_channels=4, plan=plan).double()
            torch.manual_seed(1)
            loss = model(x, edge_index).pow(2).sum()
            calls.clear()
            grads[plan] = torch.autograd.grad(loss, list(model.parameters()))
            assert (len(calls) == 0) == (plan == "reversible"), (op, plan, len(calls))
            assert ops._every_gradient_used.passes == 0
        for a, b in zip(grads["reversible"], grads["store"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError), ops.every_gradient_used():
        assert ops._every_gradient_used.passes == 1
        raise ValueError
    assert ops._every_gradient_used.passes == 0


def _residual_case(name: str, hooked: bool):
    x, edge_index = _graph(channels=8)
    op = _op(name, heads=2) if name == "gat" else _op(name)
    graph = _prepare(edge_index, forms=[graph_form(op)])
    torch.manual_seed(0)
    conv = make_conv(op, 8).double()
    if hooked:  # the hook must see the layer's own output: the residual is taken after it
        conv.register_forward_hook(lambda module, args, out: None)
    residual = torch.randn(N, 8, dtype=torch.float64)
    return conv, op.name, x, graph, residual


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("subtract", [False, True])
@pytest.mark.parametrize("name", ["gcn", "sage", "gat", "gin"])
def test_call_conv_adds_or_subtracts_a_residual_with_the_gradients_of_the_expression(name, subtract, hooked):
    """``call_conv(..., residual=r)`` is ``r + conv(x)`` and with ``subtract`` ``r - conv(x)`` (a
    rev group's sum and its reconstruction), in value and in the gradients of ``x``, ``r`` and
    every parameter: whether the CSR product starts from ``r`` (gcn, sage; gat adds it to its
    aggregation) or, under a forward hook, the sum is taken after the layer. ``r`` is unchanged."""
    conv, name, x, graph, residual = _residual_case(name, hooked)
    params = [p for p in conv.parameters() if p.requires_grad]
    before = residual.clone()
    results = []
    for fused in (True, False):
        xs, rs = x.clone().requires_grad_(), residual.clone().requires_grad_()
        if fused:
            out = call_conv(conv, name, xs, graph, residual=rs, subtract=subtract)
        else:
            conv_out = call_conv(conv, name, xs, graph)
            out = rs - conv_out if subtract else rs + conv_out
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        grads = torch.autograd.grad((out * weights).sum(), [xs, rs, *params])
        results.append((out.detach(), grads))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert torch.equal(residual, before)


def test_subtract_needs_a_residual():
    conv, name, x, graph, _ = _residual_case("gcn", hooked=False)
    with pytest.raises(ValueError, match="residual to subtract from"):
        call_conv(conv, name, x, graph, subtract=True)


@pytest.mark.parametrize("op", [_op(name) for name in BUILTIN] + [_op("sage", aggr="max"), _op("gat", heads=2)])
def test_the_estimator_and_the_layers_agree_on_which_subtract_inside_their_products(op):
    """``subtracting_op`` (read by the estimator, which picks the reversible backward's skeleton by
    it) says of an op what ``subtracts_in_product`` says of the layer ``make_conv`` builds: gcn
    and sage with ``aggr=mean`` in float32/float64, nothing in half precision."""
    conv = make_conv(op, 8)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.empty(3, 8, dtype=dtype)
        assert ops.subtracting_op(op, x.element_size()) == ops.subtracts_in_product(conv, x)
    assert ops.subtracting_op(op, 4) == (op.name == "gcn" or (op.name == "sage" and dict(op.args)["aggr"] == "mean"))


def test_gat_softmax_fallback_holds_no_more_than_the_fast_path():
    """Where exp underflows under the shared bound (attention logits spread far apart, as in a deep
    tied stack without norm) the softmax starts again from a per-node maximum. The estimate counts
    the fast path (its calibration, on fake tensors, never takes the fallback), so the fallback
    must not hold more: it had kept the first try's ``[H, E]`` logits and the ``[H, N]`` maxima
    alive to its end (1.7% over the estimate of a depth-6 tied gat stack)."""
    torch.manual_seed(0)
    x, edge_index = _graph(channels=8)
    conv, _ = _gat_pair(2)
    graph = GraphCache().prepare(edge_index, num_nodes=N, dtype=torch.float64, forms=["self_loops"])
    peaks = []
    for scale in (1.0, 1e4):  # 1e4: the fallback (test_gat_softmax_off_the_fast_path_is_the_stock_layer)
        with torch.no_grad():
            conv.att_dst.mul_(scale)
        xg = x.clone().requires_grad_()
        with LiveStorageTracker() as tracker:
            out = call_conv(conv, "gat", xg, graph)
        assert bool(out.isfinite().all())
        peaks.append(tracker.peak_bytes)
    assert peaks[1] <= peaks[0], peaks
