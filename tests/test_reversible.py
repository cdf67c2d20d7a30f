"""ReversibleStack: the reversible plan computes the store plan's function, gradients and module
state, recomputes each layer once, and leaves every tensor the caller can see intact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv, GCNConv, SAGEConv
from torch_geometric.nn.models import GroupAddRev
from torch_geometric.nn.norm import BatchNorm

from gnnspec.lower.recompute import SharedDropout
from gnnspec.lower.reversible import ReversibleStack

N, D, E, P = 20, 24, 80, 0.3
RTOL, ATOL = 1e-6, 1e-12


def _conv(kind: str, width: int) -> nn.Module:
    if kind == "gcn":
        return GCNConv(width, width)
    if kind == "sage":
        return SAGEConv(width, width)
    return GATConv(width, width // 2, heads=2)


class Block(nn.Module):
    """The rev stage's group function: ``conv(drop(relu(norm(x))))`` with a shared mask."""

    def __init__(self, kind: str, width: int) -> None:
        super().__init__()
        self.norm = BatchNorm(width)
        self.conv = _conv(kind, width)

    def forward(self, x: Tensor, edge_index: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.conv(SharedDropout.apply_mask(F.relu(self.norm(x)), mask), edge_index)


def _blocks(depth: int, groups: int, kind: str = "gcn", tie: bool = False) -> list[list[nn.Module]]:
    torch.manual_seed(0)
    width = D // groups
    if tie:
        layer = [Block(kind, width) for _ in range(groups)]
        return [layer] * depth
    return [[Block(kind, width) for _ in range(groups)] for _ in range(depth)]


def _pair(depth: int, groups: int, kind: str = "gcn", tie: bool = False):
    store = ReversibleStack(_blocks(depth, groups, kind, tie), reversible=False).double()
    rev = copy.deepcopy(store)
    rev.reversible = True
    return store, rev


def _data(groups: int, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    edge_index = torch.randint(0, N, (2, E), generator=gen)
    torch.manual_seed(seed)
    mask = SharedDropout(P).draw(x[:, : D // groups])
    weight = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return x, edge_index, mask, weight


def _step(model: nn.Module, x: Tensor, *args: Tensor, weight: Tensor, calls: int = 1):
    """Forward (``calls`` times, chained) and backward of ``sum(out * weight)``."""
    x = x.clone().requires_grad_()
    out = x
    for _ in range(calls):
        out = model(out, *args)
    (out * weight).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["gcn", "sage", "gat"])
@pytest.mark.parametrize("groups", [2, 3, 4])
@pytest.mark.parametrize("depth", [1, 2, 3, 8])
@pytest.mark.parametrize("tie", [False, True])
def test_reversible_equals_store(depth: int, groups: int, kind: str, tie: bool) -> None:
    store, rev = _pair(depth, groups, kind, tie)
    x, edge_index, mask, weight = _data(groups)
    expected = _step(store, x, edge_index, mask, weight=weight)
    actual = _step(rev, x, edge_index, mask, weight=weight)
    for e, a in zip(expected, actual):
        _assert_same(a, e)
    # the running statistics (and num_batches_tracked) were updated once per forward, not again
    assert actual[3]["functions.0.norm.module.num_batches_tracked"].item() == (depth if tie else 1)


def test_a_parameter_shared_by_distinct_functions_and_a_frozen_one_get_store_gradients() -> None:
    """Each group function's parameters are looked up once per forward: a parameter two distinct
    modules share gets the sum of both uses, a frozen one gets none, as under store."""
    torch.manual_seed(0)
    shared = nn.Parameter(torch.randn(D // 2, D // 2, dtype=torch.float64))
    frozen = nn.Linear(D // 2, D // 2, dtype=torch.float64).requires_grad_(False)

    class Uses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = shared
            self.frozen = frozen
            self.lin = nn.Linear(D // 2, D // 2, dtype=torch.float64)

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(self.lin(x) @ self.weight + self.frozen(x))

    store = ReversibleStack([[Uses(), Uses()], [Uses(), Uses()]], reversible=False)
    rev = copy.deepcopy(store)
    rev.reversible = True
    x, _, _, weight = _data(2)
    expected, actual = _step(store, x, weight=weight), _step(rev, x, weight=weight)
    for e, a in zip(expected[:2], actual[:2]):
        _assert_same(a, e)
    assert expected[2].keys() == actual[2].keys()
    for name, grad in expected[2].items():
        if grad is None:
            assert actual[2][name] is None, name
        else:
            _assert_same(actual[2][name], grad)
    assert actual[2]["functions.0.weight"] is not None


@pytest.mark.parametrize("groups", [2, 3])
def test_equals_pyg_group_add_rev(groups: int) -> None:
    store, rev = _pair(3, groups)
    layers = [[store.functions[i] for i in row] for row in store.table]
    x, edge_index, mask, weight = _data(groups)
    pyg_out = x.clone().requires_grad_()
    out = pyg_out
    for layer in layers:
        out = GroupAddRev(nn.ModuleList(layer), disable=True)(out, edge_index, mask)
    (out * weight).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in store.named_parameters()}
    store.zero_grad(set_to_none=True)

    actual = _step(rev, x, edge_index, mask, weight=weight)
    _assert_same(actual[0], out.detach())
    _assert_same(actual[1], pyg_out.grad)
    for name, grad in actual[2].items():
        _assert_same(grad, expected_grads[name])


class CallCounter(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width, dtype=torch.float64)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("reversible, per_layer", [(False, 1), (True, 2)])
def test_backward_recomputes_each_function_once(reversible: bool, per_layer: int) -> None:
    depth, groups = 5, 3
    fs = [CallCounter(D // groups) for _ in range(groups)]
    stack = ReversibleStack([fs] * depth, reversible=reversible)
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    stack(x).sum().backward()
    assert [f.calls for f in fs] == [per_layer * depth] * groups


def test_tied_weights_are_stored_once() -> None:
    shallow = ReversibleStack(_blocks(1, 2, tie=True), reversible=True)
    deep = ReversibleStack(_blocks(16, 2, tie=True), reversible=True)
    assert shallow.state_dict().keys() == deep.state_dict().keys()
    assert sum(p.numel() for p in deep.parameters()) == sum(p.numel() for p in shallow.parameters())
    untied = ReversibleStack(_blocks(3, 2), reversible=True)
    assert len(list(untied.parameters())) == 3 * len(list(shallow.parameters()))


def test_caller_tensors_are_never_freed_or_overwritten() -> None:
    _, rev = _pair(4, 2)
    x, edge_index, mask, weight = _data(2)
    base = torch.cat([x, x], dim=-1).requires_grad_()
    view = base[:, :D]  # a non-contiguous view: its storage is the caller's `base`
    base_before = base.detach().clone()
    storage_bytes = base.untyped_storage().nbytes()

    out = rev(view, edge_index, mask)
    out_view = out[:5]
    out_before = out.detach().clone()
    (out * weight).sum().backward()

    assert base.untyped_storage().nbytes() == storage_bytes
    assert torch.equal(base.detach(), base_before)
    assert torch.equal(out.detach(), out_before)
    assert torch.equal(out_view.detach(), out_before[:5])
    assert torch.equal(edge_index, _data(2)[1]) and torch.equal(mask, _data(2)[2])
    assert base.grad is not None and torch.count_nonzero(base.grad[:, D:]) == 0


class _FailsWithGrad(nn.Module):
    """A group function whose recomputation in backward (the only call with grad enabled) raises."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = BatchNorm(width)
        self.lin = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(F.relu(self.norm(x)))
        if torch.is_grad_enabled():
            raise RuntimeError("boom")
        return out


def test_a_recomputation_that_raises_leaves_every_module_as_it_was() -> None:
    torch.manual_seed(0)
    rev = ReversibleStack([[_FailsWithGrad(4), _FailsWithGrad(4)] for _ in range(2)], reversible=True)
    params = {name: p for name, p in rev.named_parameters()}
    out = rev(torch.randn(6, 8, requires_grad=True))
    buffers = {name: b.clone() for name, b in rev.named_buffers()}
    rev.eval()  # the recomputation runs in the forward's (training) mode, then must restore eval

    with pytest.raises(RuntimeError, match="boom"):
        out.sum().backward()

    assert all(p is params[name] for name, p in rev.named_parameters())
    # no module is left holding a leaf alias (a plain tensor) in a parameter slot
    assert all(isinstance(p, nn.Parameter) for m in rev.modules() for p in m._parameters.values() if p is not None)
    assert not any(m.training for m in rev.modules())
    assert all(torch.equal(b, buffers[name]) for name, b in rev.named_buffers())


def test_eval_and_no_grad_run_the_plain_forward() -> None:
    store, rev = _pair(3, 2)
    x, edge_index, mask, _ = _data(2)
    with torch.no_grad():
        expected = store(x, edge_index, mask)
        first, second = rev(x, edge_index, mask), rev(x, edge_index, mask)
    assert torch.equal(first, second)
    _assert_same(first, expected)

    store.eval()
    rev.eval()
    store.load_state_dict(rev.state_dict())  # rev's running statistics saw one more forward
    first, second = rev(x, edge_index), rev(x, edge_index)
    assert torch.equal(first, second) and first.grad_fn is not None
    _assert_same(first, store(x, edge_index))
    assert x.untyped_storage().nbytes() == x.numel() * x.element_size()


def test_input_without_grad() -> None:
    store, rev = _pair(3, 3)
    x, edge_index, mask, weight = _data(3)
    for model in (store, rev):
        (model(x, edge_index, mask) * weight).sum().backward()
    assert x.grad is None
    for (name, p), q in zip(store.named_parameters(), rev.parameters()):
        _assert_same(q.grad, p.grad)


def test_two_forwards_before_one_backward() -> None:
    store, rev = _pair(3, 2, tie=True)
    x, edge_index, mask, weight = _data(2)
    expected = _step(store, x, edge_index, mask, weight=weight, calls=2)
    actual = _step(rev, x, edge_index, mask, weight=weight, calls=2)
    for e, a in zip(expected, actual):
        _assert_same(a, e)

    # two independent calls summed: each backward uses its own saved output
    store.zero_grad()
    rev.zero_grad()
    for model in (store, rev):
        (model(x, edge_index, mask) * weight + model(2 * x, edge_index, mask)).sum().backward()
    for p, q in zip(store.parameters(), rev.parameters()):
        _assert_same(q.grad, p.grad)


class AutocastSpy(nn.Module):
    """Records the autocast state it runs under."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return self.lin(x)


def test_autocast_state_is_replayed_in_backward() -> None:
    depth, groups = 3, 2
    torch.manual_seed(0)
    spies = [AutocastSpy(D // groups) for _ in range(groups)]
    stack = ReversibleStack([spies] * depth, reversible=True)
    x = torch.randn(N, D, requires_grad=True)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack(x)
    out.float().pow(2).sum().backward()
    assert not torch.is_autocast_enabled("cpu")
    assert all(s.seen == [(True, torch.bfloat16)] * (2 * depth) for s in spies)
    grads = [x.grad] + [p.grad for p in stack.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    # forward without autocast, backward inside it: the recomputation follows the forward
    for s in spies:
        s.seen.clear()
    out = stack(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.sum().backward()
        assert torch.is_autocast_enabled("cpu")
    assert all(s.seen[depth:] == [(False, torch.bfloat16)] * depth for s in spies)


def test_autocast_bfloat16_with_graph_conv() -> None:
    stack = ReversibleStack(_blocks(4, 2, tie=True), reversible=True)
    x, edge_index, mask, _ = _data(2)
    x, mask = x.float().requires_grad_(), mask.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = stack(x, edge_index, mask).float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stack.parameters())


def test_invalid_stacks_are_rejected() -> None:
    with pytest.raises(ValueError, match="groups"):
        ReversibleStack([[nn.Identity()]], reversible=True)
    with pytest.raises(ValueError, match="depth"):
        ReversibleStack([], reversible=True)
    stack = ReversibleStack([[nn.Identity(), nn.Identity(), nn.Identity()]], reversible=True)
    with pytest.raises(ValueError, match="equal groups"):
        stack(torch.randn(2, 4))
    with pytest.raises(ValueError, match="no gradient"):
        _, rev = _pair(1, 2)
        x, edge_index, _, _ = _data(2)
        rev(x, edge_index, torch.ones(N, D // 2, dtype=torch.float64, requires_grad=True))


class _CountingCalls(torch.overrides.TorchFunctionMode):
    """Counts the calls of one torch function while active."""

    def __init__(self, func) -> None:
        super().__init__()
        self.func, self.count = func, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is self.func
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("groups", [2, 3])
def test_store_and_each_checkpoint_segment_pass_groups_as_a_list(groups):
    """``store`` runs the stack as the reversible forward does, in eval, under no_grad and in
    training with autograd: no concatenation and split a layer. With two groups that split hands
    group 0 a strided view (its own input group); in the list only the stack's first split does.
    A checkpointed segment (a single tensor in, one out) splits at its start and concatenates at
    its end, with the same outputs."""
    import gnnspec

    torch.manual_seed(0)
    spec = f"rev(op=gcn, depth=3, groups={groups}, norm=layer, dropout=0.3, hidden={4 * groups})"
    model = gnnspec.build(spec, in_channels=5, out_channels=2, plan="store").double()
    stack = next(m for m in model.modules() if isinstance(m, ReversibleStack))
    seen: list[bool] = []
    for f in stack.functions:
        f.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, 20, (2, 60), generator=g)
    model.eval()
    listed = [groups != 2] + [True] * (3 * groups - 1)
    with torch.no_grad():
        out = model(x, edge_index)
    assert seen == listed
    seen.clear()
    with torch.enable_grad():
        assert torch.equal(model(x, edge_index), out)
    assert seen == listed
    model.train()
    seen.clear()
    torch.manual_seed(2)
    with _CountingCalls(torch.cat) as cats:
        trained = model(x, edge_index)
    assert seen == listed and cats.count == 1  # one concatenation at the end, none per layer
    torch.manual_seed(2)
    with torch.no_grad():
        assert torch.equal(model(x, edge_index), trained)
    torch.manual_seed(0)
    segmented = gnnspec.build(spec, in_channels=5, out_channels=2, plan="checkpoint(segments=2)").double()
    for f in next(m for m in segmented.modules() if isinstance(m, ReversibleStack)).functions:
        f.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        segmented.eval()(x, edge_index)  # prepares the graph (whose self-loops are concatenated)
    segmented.train()
    seen.clear()
    torch.manual_seed(2)
    with _CountingCalls(torch.cat) as cats:
        out = segmented(x, edge_index)  # layers 0-1, then 2; the first is recomputed in backward
    assert seen == ([False, True, True, True, False, True] if groups == 2 else [True] * (3 * groups))
    assert cats.count == 2  # one a segment
    assert torch.equal(out, trained)  # layer norm rounds both layouts alike


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_eval_outputs_of_every_plan_agree_bit_for_bit(norm):
    """Eval (and no_grad) forwards of a rev stack run one path under every plan, checkpoint
    included: batch norm rounds a strided input differently from a contiguous one, so the layer
    loop and the list path differ in the last bits (2.7e-15 in float64)."""
    import gnnspec

    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, 30, (2, 90), generator=g)
    spec = f"rev(op=sage, depth=3, groups=2, norm={norm}, dropout=0.2, hidden=8)"
    outs = {}
    state = None
    for plan in ("store", "checkpoint(segments=2)", "reversible"):
        torch.manual_seed(0)
        model = gnnspec.build(spec, in_channels=6, out_channels=3, plan=plan).double()
        if state is None:
            torch.manual_seed(1)
            model(x, edge_index)  # running statistics of one training forward
            state = model.state_dict()
        model.load_state_dict(state)
        model.eval()
        outs[plan] = model(x, edge_index)
        with torch.no_grad():
            assert torch.equal(model(x, edge_index), outs[plan])
    for plan, out in outs.items():
        assert torch.equal(out, outs["store"]), plan


@pytest.mark.parametrize("op", ["gcn", "sage"])
def test_a_reconstruction_inside_the_product_holds_one_group_tensor_less(op, monkeypatch):
    """gcn and sage group functions reconstruct ``x_i = y_i - f(u)`` inside their products
    (``ConvLayer.subtracts_residual``): the reversible step's peak is one ``[N, hidden/groups]``
    tensor below subtracting each function's output from its group (what other ops do; the
    estimate's ``:sub`` skeleton follows), with the same gradients."""
    import gnnspec
    from gnnspec.lower.layers import ConvLayer
    from gnnspec.memory.estimate import estimate_spec
    from gnnspec.memory.measure import measure_step_peak

    nodes, edges, hidden = 300, 1500, 32
    spec = f"rev(op={op}, depth=4, groups=2, norm=layer, dropout=0.1, hidden={hidden})"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(nodes, 6, generator=g)
    source = torch.randint(0, nodes, (edges,), generator=g)
    edge_index = torch.stack([source, (source + torch.randint(1, nodes, (edges,), generator=g)) % nodes])
    y = torch.randint(0, 3, (nodes,), generator=g)

    def run() -> tuple[int, list[Tensor]]:
        torch.manual_seed(0)
        model = gnnspec.build(spec, in_channels=6, out_channels=3, plan="reversible")
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
        peak = measure_step_peak(model, x, edge_index, y, optimizer)
        return peak, [p.grad.clone() for p in model.parameters()]

    fused, fused_grads = run()
    monkeypatch.setattr(ConvLayer, "subtracts_residual", lambda self, u: False)
    separate, separate_grads = run()
    assert separate - fused == nodes * (hidden // 2) * 4
    for a, b in zip(fused_grads, separate_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    monkeypatch.undo()
    estimate = estimate_spec(spec, nodes=nodes, edges=edges, in_channels=6, out_channels=3, plan="reversible")
    assert abs(estimate.plans[0].peak_bytes - fused) <= 0.001 * fused, (estimate.plans[0].peak_bytes, fused)


class _CountingAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts op outputs of a given number of bytes (fresh tensors, not views) while active."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes, self.count = nbytes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (isinstance(out, Tensor) and out.layout == torch.strided and out._base is None
                and out.untyped_storage().nbytes() == self.nbytes):
            self.count += not any(isinstance(a, Tensor) and a.layout == torch.strided and
                                  a.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                                  for a in args)  # not written in place
        return out


@pytest.mark.parametrize("op", ["gcn", "sage", "gat"])
def test_the_skip_term_is_added_inside_each_group_function(op, monkeypatch):
    """``y_i = x_i + f_i(u)`` starts from ``x_i`` inside ``f_i``'s product (gcn, sage) or is added
    into its aggregation's output (gat): a forward makes no ``[N, hidden/groups]`` tensor for the
    sum beside ``f_i``'s output, one fewer a group function than adding after ``f_i``, with the
    same output."""
    import gnnspec
    from gnnspec.lower.layers import ConvLayer

    nodes, hidden, depth, groups = 50, 16, 3, 2
    spec = f"rev(op={op}, depth={depth}, groups={groups}, norm=layer, dropout=0, hidden={hidden})"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(nodes, 6, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, nodes, (2, 200), generator=g)

    def forward() -> tuple[int, Tensor]:
        torch.manual_seed(0)
        model = gnnspec.build(spec, in_channels=6, out_channels=3, plan="store").double().eval()
        with torch.no_grad():
            model(x, edge_index)  # prepares the graph
            with _CountingAllocations(nodes * (hidden // groups) * 8) as counted:
                out = model(x, edge_index)
        return counted.count, out

    inside, out = forward()
    monkeypatch.setattr(ConvLayer, "adds_residual", property(lambda self: False))
    after, expected = forward()
    assert after - inside == depth * groups
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["gcn", "gat"])
def test_a_hook_on_a_group_function_sees_and_replaces_its_own_output(op):
    """A forward hook on a group function sees ``f(u)``, not the sum the stack would otherwise take
    inside ``f``, and whatever it returns is ``f``'s output in the forward and in the reversible
    reconstruction alike: ``reversible`` equals ``store`` (it had rebuilt ``hook(y - f)`` in place of
    ``x``, gradients off by 50-1700%)."""
    import gnnspec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, 40, (2, 160), generator=g)
    spec = f"rev(op={op}, depth=2, groups=2, norm=none, hidden=8)"
    results = {}
    for plan in ("store", "reversible"):
        torch.manual_seed(0)
        model = gnnspec.build(spec, 6, 3, plan=plan).double()
        stack = next(m for m in model.modules() if isinstance(m, ReversibleStack))
        seen = []

        def hook(module, args, out):
            with torch.no_grad():
                seen.append(torch.equal(out, module.forward(*args)))  # f(u) itself, computed again
            return out * 1.5

        for f in stack.functions:
            f.register_forward_hook(hook)
        out = model(x, edge_index)
        out.square().sum().backward()
        results[plan] = [out.detach()] + [p.grad for p in model.parameters()]
        assert seen and all(seen)
    for a, b in zip(results["store"], results["reversible"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _AddingBlock(Block):
    """A group function that adds the skip term itself (``adds_residual``) but has no
    ``subtracts_residual``: the reversible stack reconstructs by subtracting its output."""

    adds_residual = True

    def forward(self, x: Tensor, edge_index: Tensor, mask: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
        out = super().forward(x, edge_index, mask)
        return out if residual is None else residual + out


def test_a_function_that_only_adds_the_skip_term_is_reconstructed_by_the_stack():
    torch.manual_seed(0)
    blocks = [[_AddingBlock("gcn", D // 2) for _ in range(2)] for _ in range(3)]
    store = ReversibleStack(blocks, reversible=False).double()
    rev = copy.deepcopy(store)
    rev.reversible = True
    assert rev.adds_residual == (True,) * 6
    x, edge_index, mask, weight = _data(2)
    _assert_same(_step(store, x, edge_index, mask, weight=weight), _step(rev, x, edge_index, mask, weight=weight))
