"""Cross-checks against torch-geometric peers (float64, small random graphs).

Each test builds a gnnspec model, builds the torch-geometric model that the stage claims to be
(``DeepGCNLayer`` stacks for ``res+``, ``GroupAddRev`` stacks for ``rev``, the ``gcn2_cora.py``
example's ``Net`` for ``gcnii``), copies the gnnspec weights into the peer, and compares the
output, the input gradient, every parameter gradient and the normalisation running statistics to
1e-6 relative. A baseline checks that every valid plan of each gnnspec model gives the same
outputs, gradients and state as ``store`` (SPEC.md sections 3-4).

The peers call the torch-geometric layers in their ordinary form (``GCNConv``/``GCN2Conv`` with
``normalize=True`` on the raw ``edge_index``), while gnnspec prepares the GCN normalisation once
and calls the layers with ``normalize=False``; the comparison covers that difference too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close
from torch_geometric.nn import DeepGCNLayer, GCN2Conv, GCNConv, GENConv, GroupAddRev, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.nn.norm import BatchNorm

import gnnspec

RTOL, ATOL = 1e-6, 1e-9
N, E = 64, 256


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny: intra-op threads only add contention (several-fold on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _graph(channels: int, seed: int = 0, n: int = N, e: int = E) -> tuple[Tensor, Tensor]:
    """Random features and a random directed multigraph (self-loops and duplicates allowed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    return x, edge_index


def _weight(shape: tuple[int, ...], seed: int = 7) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _text(model: str, hidden: int) -> str:
    return f"hidden: {hidden}\ndtype: float64\nmodel: {model}"


def _build(text: str, in_channels: int, out_channels: int, plan: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = gnnspec.build(text, in_channels=in_channels, out_channels=out_channels, plan=plan)
    assert next(model.parameters()).dtype == torch.float64
    return model


def _copy_pairs(src: nn.Module, dst: nn.Module, prefix: str) -> list[tuple[str, Tensor, Tensor]]:
    """Copy ``src``'s parameters and buffers into ``dst`` (same names and shapes required) and
    return the (name, src tensor, dst tensor) pairs, parameters first."""
    pairs = []
    for kind in ("named_parameters", "named_buffers"):
        a, b = list(getattr(src, kind)()), list(getattr(dst, kind)())
        assert [n for n, _ in a] == [n for n, _ in b], (prefix, kind, [n for n, _ in a], [n for n, _ in b])
        for (name, ta), (_, tb) in zip(a, b):
            assert ta.shape == tb.shape, (prefix, name)
            with torch.no_grad():
                tb.copy_(ta)
            pairs.append((f"{prefix}.{name}", ta, tb))
    return pairs


def _check_all_paired(model: nn.Module, pairs) -> None:
    paired = {id(a) for _, a, _ in pairs}
    missing = [n for n, p in model.named_parameters() if id(p) not in paired]
    assert not missing, f"gnnspec parameters without a peer: {missing}"


def _run(model: nn.Module, x: Tensor, edge_index: Tensor, weight: Tensor, seed: int = 1, post=None):
    """One forward and backward of ``sum(out * weight)``; returns (out, grad of x)."""
    for p in model.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x, edge_index)
    if post is not None:
        out = post(out)
    value = out.detach().clone()  # GroupAddRev(disable=False) frees its output's storage in backward
    (out * weight).sum().backward()
    return value, x.grad


def _assert_grads(pairs) -> None:
    for name, a, b in pairs:
        if isinstance(a, nn.Parameter):
            assert a.grad is not None and b.grad is not None, name
            assert_close(a.grad, b.grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad of {name}: {m}")
        else:
            assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"buffer {name}: {m}")


def _compare_models(ref: nn.Module, other: nn.Module, x, edge_index, weight, seed: int = 1) -> None:
    """Same outputs, input/parameter gradients and buffers after one forward/backward."""
    out_a, gx_a = _run(ref, x, edge_index, weight, seed)
    out_b, gx_b = _run(other, x, edge_index, weight, seed)
    assert_close(out_a, out_b, rtol=RTOL, atol=ATOL)
    assert_close(gx_a, gx_b, rtol=RTOL, atol=ATOL)
    pa, pb = dict(ref.named_parameters()), dict(other.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert_close(pa[name].grad, pb[name].grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad of {name}: {m}")
    ba, bb = dict(ref.named_buffers()), dict(other.named_buffers())
    assert ba.keys() == bb.keys()
    for name in ba:
        assert_close(ba[name], bb[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"buffer {name}: {m}")


# ---------------------------------------------------------------------------- 1. res+ vs DeepGCNLayer

RESP_HIDDEN = 16
RESP_GEN_LEARN_T = "gen(aggr=softmax, t=0.5, learn_t=true)"
# The peer GENConv for each gnnspec gen op (torch-geometric's defaults otherwise: 2-layer MLP with
# batch norm, no message norm).
RESP_GEN_ARGS = {
    "gen": dict(aggr="softmax", t=1.0, learn_t=False),
    RESP_GEN_LEARN_T: dict(aggr="softmax", t=0.5, learn_t=True),
}


class DeepGCNStack(nn.Module):
    def __init__(self, layers: list[DeepGCNLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, edge_index)
        return x


def _resp_peer(model: nn.Module, op: str, norm: str, dropout: float):
    (stage,) = model.stages
    assert stage.kind == "res+"
    layers, pairs = [], []
    for i, g in enumerate(stage.layers):
        c = RESP_HIDDEN
        conv = GCNConv(c, c) if op == "gcn" else GENConv(c, c, **RESP_GEN_ARGS[op])
        nrm = BatchNorm(c) if norm == "batch" else nn.LayerNorm(c, elementwise_affine=True)
        conv, nrm = conv.double(), nrm.double()
        pairs += _copy_pairs(g.conv, conv, f"layers.{i}.conv")
        pairs += _copy_pairs(g.norm.norm, nrm, f"layers.{i}.norm")
        layers.append(DeepGCNLayer(conv, nrm, nn.ReLU(), block="res+", dropout=dropout))
    _check_all_paired(model, pairs)
    return DeepGCNStack(layers), pairs


@pytest.mark.parametrize("plan", ["store", "checkpoint(segments=2)"])
@pytest.mark.parametrize(
    "op,norm", [("gcn", "batch"), ("gcn", "layer"), ("gen", "batch"), ("gen", "layer"), (RESP_GEN_LEARN_T, "layer")]
)
def test_resplus_equals_deepgcn_layers(op: str, norm: str, plan: str) -> None:
    text = _text(f"res+(op={op}, depth=3, norm={norm}, dropout=0.0)", RESP_HIDDEN)
    model = _build(text, RESP_HIDDEN, RESP_HIDDEN, plan)
    peer, pairs = _resp_peer(model, op, norm, 0.0)
    x, edge_index = _graph(RESP_HIDDEN)
    weight = _weight((N, RESP_HIDDEN))

    model.train(), peer.train()
    out, gx = _run(model, x, edge_index, weight)
    out_p, gx_p = _run(peer, x, edge_index, weight)
    assert_close(out, out_p, rtol=RTOL, atol=ATOL)
    assert_close(gx, gx_p, rtol=RTOL, atol=ATOL)
    _assert_grads(pairs)  # parameter gradients, then running stats after one training forward

    # One SGD step on both, then the eval-mode function (which reads the running statistics).
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(peer.parameters(), lr=0.1)):
        opt.step()
    model.eval(), peer.eval()
    with torch.no_grad():
        assert_close(model(x, edge_index), peer(x, edge_index), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("plan", ["store", "checkpoint(segments=2)"])
def test_resplus_equals_deepgcn_layers_with_dropout(plan: str) -> None:
    """Train mode with dropout 0.3: both draw ``F.dropout`` masks in the same order (norm -> act ->
    dropout -> conv per layer), so the same seed gives the same masks."""
    text = _text("res+(op=gcn, depth=3, norm=batch, dropout=0.3)", RESP_HIDDEN)
    model = _build(text, RESP_HIDDEN, RESP_HIDDEN, plan)
    peer, pairs = _resp_peer(model, "gcn", "batch", 0.3)
    x, edge_index = _graph(RESP_HIDDEN, seed=3)
    weight = _weight((N, RESP_HIDDEN))
    model.train(), peer.train()
    out, gx = _run(model, x, edge_index, weight, seed=11)
    out_p, gx_p = _run(peer, x, edge_index, weight, seed=11)
    assert_close(out, out_p, rtol=RTOL, atol=ATOL)
    assert_close(gx, gx_p, rtol=RTOL, atol=ATOL)
    _assert_grads(pairs)


# ---------------------------------------------------------------------------- 2. rev vs GroupAddRev


class RevBlock(nn.Module):
    """The group function of PyG's ``examples/rev_gnn.py`` (``GNNBlock``): norm -> relu -> mask -> conv."""

    def __init__(self, op: str, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=True)
        self.conv = GCNConv(width, width) if op == "gcn" else SAGEConv(width, width)

    def forward(self, x: Tensor, edge_index: Tensor, dropout_mask: Tensor | None = None) -> Tensor:
        x = self.norm(x).relu()
        if self.training and dropout_mask is not None:
            x = x * dropout_mask
        return self.conv(x, edge_index)


class RevPeer(nn.Module):
    """A stack of ``GroupAddRev``; ``mask`` (set before the call) is passed to every layer."""

    def __init__(self, layers: list[GroupAddRev]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.mask: Tensor | None = None

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = x.clone()  # GroupAddRev(disable=False) frees its input's storage
        for layer in self.layers:
            x = layer(x, edge_index, self.mask) if self.mask is not None else layer(x, edge_index)
        return x


def _rev_peer(model: nn.Module, op: str, width: int, disable: bool):
    (stage,) = model.stages
    assert stage.kind == "rev"
    stack = stage.stack
    blocks, pairs = [], []
    for k, f in enumerate(stack.functions):
        block = RevBlock(op, width).double()
        pairs += _copy_pairs(f.norm.norm, block.norm, f"functions.{k}.norm")
        pairs += _copy_pairs(f.conv, block.conv, f"functions.{k}.conv")
        blocks.append(block)
    _check_all_paired(model, pairs)
    layers = [GroupAddRev(nn.ModuleList([blocks[i] for i in layer]), disable=disable) for layer in stack.table]
    return RevPeer(layers), pairs


REV_CASES = [
    # (groups, op, tie, hidden)
    (2, "gcn", False, 16),
    (3, "sage", False, 24),
    (2, "gcn", True, 16),
    (3, "sage", True, 24),
]


def _rev_text(groups, op, tie, hidden, dropout=0.0):
    tie_arg = ", tie=true" if tie else ""
    return _text(f"rev(groups={groups}, depth=3, op={op}, norm=layer, dropout={dropout}{tie_arg})", hidden)


def _capture_mask(model: nn.Module) -> list:
    """Record the shared dropout mask the rev stage draws in each forward."""
    dropout = model.stages[0].dropout
    drawn: list = []
    original = dropout.draw

    def draw(x):
        mask = original(x)
        drawn.append(mask)
        return mask

    dropout.draw = draw
    return drawn


@pytest.mark.parametrize("plan", ["store", "reversible"])
@pytest.mark.parametrize("groups,op,tie,hidden", REV_CASES)
def test_rev_equals_group_add_rev(groups, op, tie, hidden, plan) -> None:
    """Against ``GroupAddRev(disable=True)`` (plain autograd) and ``GroupAddRev(disable=False)``
    (PyG's ``InvertibleFunction``): outputs, input and parameter gradients, eval outputs."""
    model = _build(_rev_text(groups, op, tie, hidden), hidden, hidden, plan)
    assert model.stages[0].stack.depth == 3 and model.stages[0].stack.groups == groups
    x, edge_index = _graph(hidden, seed=groups)
    weight = _weight((N, hidden))
    model.train()
    out, gx = _run(model, x, edge_index, weight)
    model.eval()
    with torch.no_grad():
        out_eval = model(x, edge_index)
    for disable in (True, False):
        peer, pairs = _rev_peer(model, op, hidden // groups, disable)
        peer.train()
        out_p, gx_p = _run(peer, x, edge_index, weight)
        assert_close(out, out_p, rtol=RTOL, atol=ATOL)
        assert_close(gx, gx_p, rtol=RTOL, atol=ATOL)
        _assert_grads(pairs)
        peer.eval()
        with torch.no_grad():
            assert_close(out_eval, peer(x, edge_index), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("plan", ["store", "reversible", "checkpoint(segments=2)"])
@pytest.mark.parametrize("groups,op,tie,hidden", [REV_CASES[0], REV_CASES[1]])
def test_rev_with_shared_mask_equals_group_add_rev(groups, op, tie, hidden, plan) -> None:
    """Train mode, dropout 0.3: the peer gets gnnspec's mask (``[N, hidden/groups]``, so
    ``GroupAddRev`` hands it whole to every group function) and must match exactly."""
    model = _build(_rev_text(groups, op, tie, hidden, dropout=0.3), hidden, hidden, plan)
    drawn = _capture_mask(model)
    x, edge_index = _graph(hidden, seed=5)
    weight = _weight((N, hidden))
    model.train()
    out, gx = _run(model, x, edge_index, weight, seed=4)
    (mask,) = drawn
    assert mask is not None and mask.shape == (N, hidden)
    assert (mask == 0).any() and (mask != 0).any()
    for disable in (True, False):
        peer, pairs = _rev_peer(model, op, hidden // groups, disable)
        peer.mask = mask
        peer.train()
        out_p, gx_p = _run(peer, x, edge_index, weight, seed=4)
        assert_close(out, out_p, rtol=RTOL, atol=ATOL)
        assert_close(gx, gx_p, rtol=RTOL, atol=ATOL)
        _assert_grads(pairs)


def test_rev_dropout_masks_are_independent_across_groups_as_in_revgnn() -> None:
    hidden, groups, p = 16, 2, 0.5
    text = _text(f"rev(groups={groups}, depth=1, op=gcn, norm=layer, act=none, dropout={p})", hidden)
    model = _build(text, hidden, hidden, "store")
    seen: list[Tensor] = []
    for f in model.stages[0].stack.functions:  # the conv input is mask * norm(x): zeros only where masked
        f.conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach() == 0))
    x, edge_index = _graph(hidden, seed=9)
    model.train()
    torch.manual_seed(0)
    model(x, edge_index)
    dropped_0, dropped_1 = seen
    # Two independent Bernoulli(0.5) masks of 64 x 8 entries agree in about half the places.
    agreement = (dropped_0 == dropped_1).double().mean().item()
    assert agreement < 0.75, f"the groups' masks agree in {agreement:.0%} of entries"


# ---------------------------------------------------------------------------- 3. gcnii vs gcn2_cora.py


class GCN2Net(nn.Module):
    """``Net`` of pyg-team/pytorch_geometric ``examples/gcn2_cora.py``; ``normalize=True`` takes the
    raw ``edge_index`` (the example instead applies ``T.GCNNorm()`` to the data and builds
    ``normalize=False``: ``normalize=False`` here reproduces that with a precomputed ``gcn_norm``)."""

    def __init__(self, in_channels, hidden_channels, out_channels, num_layers, alpha, theta,
                 shared_weights=True, dropout=0.0, normalize=True):
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(in_channels, hidden_channels), nn.Linear(hidden_channels, out_channels)])
        self.convs = nn.ModuleList(
            GCN2Conv(hidden_channels, alpha, theta, layer + 1, shared_weights, normalize=normalize)
            for layer in range(num_layers)
        )
        self.dropout = dropout
        self.normalize = normalize

    def forward(self, x, edge_index):
        edge_weight = None
        if not self.normalize:  # T.GCNNorm()
            edge_index, edge_weight = gcn_norm(edge_index, None, x.size(0), add_self_loops=True, dtype=x.dtype)
        x = F.dropout(x, self.dropout, training=self.training)
        x = x_0 = self.lins[0](x).relu()
        for conv in self.convs:
            x = F.dropout(x, self.dropout, training=self.training)
            x = conv(x, x_0, edge_index, edge_weight)
            x = x.relu()
        x = F.dropout(x, self.dropout, training=self.training)
        x = self.lins[1](x)
        return x.log_softmax(dim=-1)


GCNII_IN, GCNII_OUT, GCNII_HIDDEN, GCNII_DEPTH = 8, 3, 16, 4


def _gcnii_text(dropout: float) -> str:
    return _text(
        f"dropout({dropout}) >> linear >> act >> gcnii(depth={GCNII_DEPTH}, alpha=0.1, theta=0.5, dropout={dropout})"
        f" >> dropout({dropout}) >> linear",
        GCNII_HIDDEN,
    )


def _gcnii_peer(model: nn.Module, dropout: float, normalize: bool):
    kinds = [s.kind for s in model.stages]
    assert kinds == ["dropout", "linear", "act", "gcnii", "dropout", "linear"], kinds
    net = GCN2Net(GCNII_IN, GCNII_HIDDEN, GCNII_OUT, GCNII_DEPTH, 0.1, 0.5, True, dropout, normalize).double()
    pairs = _copy_pairs(model.stages[1].module, net.lins[0], "lins.0")
    pairs += _copy_pairs(model.stages[5].module, net.lins[1], "lins.1")
    for i, layer in enumerate(model.stages[3].layers):
        pairs += _copy_pairs(layer.conv, net.convs[i], f"convs.{i}")
        assert net.convs[i].beta == pytest.approx(math.log(0.5 / (i + 1) + 1))
    _check_all_paired(model, pairs)
    return net, pairs


def _log_softmax(out: Tensor) -> Tensor:
    return out.log_softmax(dim=-1)


@pytest.mark.parametrize("mode,dropout", [("train", 0.0), ("eval", 0.6), ("train", 0.6)])
@pytest.mark.parametrize("plan", ["store", "checkpoint(segments=2)"])
def test_gcnii_equals_gcn2_cora_net(plan: str, mode: str, dropout: float) -> None:
    """Against the example's ``Net`` with ``GCN2Conv(normalize=True)`` on the raw graph and with
    the example's own ``T.GCNNorm()`` + ``normalize=False``. ``train`` with dropout 0.6 compares
    under the same seed: gnnspec's dropout stages and the gcnii layers' dropout call ``F.dropout``
    in the example's order on tensors of the same shapes, so they consume the RNG identically and
    draw equal masks."""
    model = _build(_gcnii_text(dropout), GCNII_IN, GCNII_OUT, plan)
    x, edge_index = _graph(GCNII_IN, seed=2)
    weight = _weight((N, GCNII_OUT))
    model.train(mode == "train")
    out, gx = _run(model, x, edge_index, weight, seed=5, post=_log_softmax)
    for normalize in (True, False):
        net, pairs = _gcnii_peer(model, dropout, normalize)
        net.train(mode == "train")
        out_p, gx_p = _run(net, x, edge_index, weight, seed=5)
        assert_close(out, out_p, rtol=RTOL, atol=ATOL)
        assert_close(gx, gx_p, rtol=RTOL, atol=ATOL)
        _assert_grads(pairs)


# ---------------------------------------------------------------------------- every plan equals store

PLAN_CASES = {
    "res+_gcn_batch": (
        _text("res+(op=gcn, depth=3, norm=batch, dropout=0.3)", 16), 16, 16,
        ["checkpoint(segments=1)", "checkpoint(segments=2)", "checkpoint(segments=3)"],
    ),
    "res+_gen_layer": (
        _text("res+(op=gen, depth=3, norm=layer, dropout=0.0)", 16), 16, 16, ["checkpoint(segments=2)"],
    ),
    "rev_gcn_g2": (
        _rev_text(2, "gcn", False, 16, dropout=0.3), 16, 16, ["reversible", "checkpoint(segments=2)"],
    ),
    "rev_sage_g3_tie": (
        _rev_text(3, "sage", True, 24, dropout=0.3), 24, 24, ["reversible", "checkpoint(segments=2)"],
    ),
    "gcnii": (_gcnii_text(0.6), GCNII_IN, GCNII_OUT, ["checkpoint(segments=2)", "checkpoint(segments=4)"]),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_every_plan_equals_store(case: str) -> None:
    text, cin, cout, plans = PLAN_CASES[case]
    store = _build(text, cin, cout, "store")
    x, edge_index = _graph(cin, seed=6)
    weight = _weight((N, cout))
    reference = {k: v.clone() for k, v in store.state_dict().items()}
    store.train()
    for plan in plans:
        other = _build(text, cin, cout, plan)  # same seed -> same initial weights (SPEC.md section 4)
        assert other.state_dict().keys() == reference.keys()
        for k, v in other.state_dict().items():
            assert_close(v, reference[k], rtol=0, atol=0, msg=lambda m: f"{plan}: initial {k}: {m}")
        store.load_state_dict(reference)
        other.train()
        _compare_models(store, other, x, edge_index, weight, seed=3)
