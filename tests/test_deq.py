"""DEQ stages: the solvers find the same equilibrium, implicit gradients equal unrolled ones."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch_geometric.nn import GCNConv
from torch_geometric.nn.norm import BatchNorm

import warnings

from gnnspec.lower.deq import SOLVERS, DEQFixedPoint, NotConvergedWarning, SolverInfo, solve

N, D, E = 24, 8, 96
TOL, MAX_ITER = 1e-10, 1000
RTOL = 1e-6


def _graph(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=dtype)
    edge_index = torch.randint(0, N, (2, E), generator=gen)
    return x, edge_index


class Layer(nn.Module):
    """``f(z, x) = conv(relu(norm(z))) + x`` with ``W = contraction * Q``, ``Q`` orthogonal.

    GCN's normalised adjacency has spectral norm 1 and relu is 1-Lipschitz, so without a norm
    ``f`` is a contraction with factor ``contraction``.
    """

    def __init__(self, contraction: float, norm: bool = True) -> None:
        super().__init__()
        self.norm = BatchNorm(D) if norm else nn.Identity()
        self.conv = GCNConv(D, D)
        gen = torch.Generator().manual_seed(1)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
        with torch.no_grad():
            self.conv.lin.weight.copy_(contraction * q)
            self.conv.bias.copy_(0.1 * torch.randn(D, generator=gen))

    def forward(self, z: Tensor, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.conv(F.relu(self.norm(z)), edge_index) + x


def _layer(contraction: float = 0.5, norm: bool = True, dtype=torch.float64) -> Layer:
    return Layer(contraction, norm).to(dtype).train()


def _step(deq: DEQFixedPoint, x: Tensor, edge_index: Tensor):
    """Forward and backward of a weighted-sum loss; returns (z, x grad, param grads)."""
    xs = x.clone().requires_grad_()
    z = deq(xs, edge_index)
    weight = torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z)
    (z * weight).sum().backward()
    return z.detach(), xs.grad.clone(), {n: p.grad.clone() for n, p in deq.named_parameters()}


def _running_stats(module: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def _relative_residual(f: nn.Module, z: Tensor, x: Tensor, edge_index: Tensor) -> float:
    with torch.no_grad():
        fz = f(z, x, edge_index)
    return float((fz - z).norm() / fz.norm())


@pytest.mark.parametrize("norm", [False, True])
def test_every_solver_finds_the_same_equilibrium(norm: bool) -> None:
    x, edge_index = _graph()
    f = _layer(0.7, norm=norm)
    found = {}
    for solver in SOLVERS:
        z, info = solve(lambda z: f(z, x, edge_index), torch.zeros_like(x), solver=solver,
                        max_iter=MAX_ITER, tol=TOL)
        assert isinstance(info, SolverInfo) and info.converged, (solver, info)
        assert info.residual < TOL and 1 < info.iterations < MAX_ITER
        assert _relative_residual(f, z, x, edge_index) == pytest.approx(info.residual, rel=1e-3)
        found[solver] = z
    for solver in SOLVERS:
        torch.testing.assert_close(found[solver], found["fixed_point"], rtol=1e-8, atol=1e-9)


def test_solve_stops_at_max_iter_and_reports_not_converged() -> None:
    x, edge_index = _graph()
    f = _layer(0.97, norm=False)
    for solver in SOLVERS:
        _, info = solve(lambda z: f(z, x, edge_index), torch.zeros_like(x), solver=solver,
                        max_iter=4, tol=TOL)
        assert info.iterations == 4 and not info.converged and info.residual > TOL


@pytest.mark.parametrize("mode", ["implicit", "unroll"])
def test_a_solve_stopped_at_max_iter_warns_once_per_stage(mode: str) -> None:
    x, edge_index = _graph()
    deq = DEQFixedPoint(_layer(0.97, norm=False), max_iter=4, tol=TOL, mode=mode)
    with pytest.warns(NotConvergedWarning) as caught:
        _step(deq, x, edge_index)
    messages = [str(w.message) for w in caught if issubclass(w.category, NotConvergedWarning)]
    assert messages[0].startswith("deq: the forward solve did not converge: relative residual")
    assert "after 4 iterations (tol 1e-10)" in messages[0] and "raise max_iter" in messages[0]
    assert ("gradients are inexact" in messages[0]) == (mode == "implicit")
    if mode == "implicit":  # the adjoint solve stops at max_iter too
        assert any(m.startswith("deq: the adjoint (backward) solve did not converge") for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotConvergedWarning)
        _step(deq, x, edge_index)  # once per stage: a training loop is not flooded


def test_a_tolerance_below_the_dtype_resolution_is_named_in_the_warning() -> None:
    x, edge_index = _graph(torch.float32)
    deq = DEQFixedPoint(_layer(0.5, norm=False, dtype=torch.float32), max_iter=200, tol=1e-12, mode="implicit")
    with pytest.warns(NotConvergedWarning, match=r"tol is below what float32 resolves \(eps 1\.2e-07\)"):
        _step(deq, x, edge_index)


def test_a_converged_solve_does_not_warn() -> None:
    x, edge_index = _graph()
    deq = DEQFixedPoint(_layer(0.5, norm=False), max_iter=MAX_ITER, tol=TOL, mode="implicit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotConvergedWarning)
        _step(deq, x, edge_index)
    assert deq.forward_info.converged and deq.backward_info.converged


def test_anderson_beats_fixed_point_on_a_slow_contraction() -> None:
    x, edge_index = _graph()
    f = _layer(0.95, norm=False)
    with torch.no_grad():
        # W = 0.95 I with the adjacency's eigenvalue 1: the error along the top eigenvector
        # shrinks by only 0.95 per plain iteration.
        f.conv.lin.weight.copy_(0.95 * torch.eye(D))
    iterations = {}
    for solver in ("fixed_point", "anderson"):
        _, info = solve(lambda z: f(z, x, edge_index), torch.zeros_like(x), solver=solver,
                        max_iter=MAX_ITER, tol=TOL)
        assert info.converged
        iterations[solver] = info.iterations
    assert iterations["anderson"] < 0.5 * iterations["fixed_point"], iterations


@pytest.mark.parametrize("solver", SOLVERS)
def test_implicit_gradients_and_running_stats_equal_unroll(solver: str) -> None:
    x, edge_index = _graph()
    f = _layer(0.5, norm=True)
    unroll = DEQFixedPoint(copy.deepcopy(f), solver=solver, max_iter=MAX_ITER, tol=TOL,
                           mode="unroll")
    implicit = DEQFixedPoint(copy.deepcopy(f), solver=solver, max_iter=MAX_ITER, tol=TOL,
                             mode="implicit")
    ref_z, ref_gx, ref_grads = _step(unroll, x, edge_index)
    z, gx, grads = _step(implicit, x, edge_index)

    assert implicit.forward_info.converged and implicit.backward_info.converged
    torch.testing.assert_close(z, ref_z, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gx, ref_gx, rtol=RTOL, atol=1e-9)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4  # norm weight/bias, conv W/b
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=RTOL, atol=1e-9, msg=name)

    stats, ref_stats = _running_stats(implicit), _running_stats(unroll)
    assert stats.keys() == ref_stats.keys() and stats
    for key in stats:
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-8, atol=1e-9, msg=key)
    assert int(implicit.f.norm.module.num_batches_tracked) == 1
    assert int(unroll.f.norm.module.num_batches_tracked) == 1


def test_store_is_unroll_and_state_dicts_match_across_plans() -> None:
    x, edge_index = _graph()
    f = _layer(0.5)
    models = {mode: DEQFixedPoint(copy.deepcopy(f), max_iter=MAX_ITER, tol=TOL, mode=mode)
              for mode in ("store", "unroll", "implicit")}
    keys = {mode: list(m.state_dict()) for mode, m in models.items()}
    assert keys["store"] == keys["unroll"] == keys["implicit"]
    z_store, gx_store, _ = _step(models["store"], x, edge_index)
    z_unroll, gx_unroll, _ = _step(models["unroll"], x, edge_index)
    assert torch.equal(z_store, z_unroll) and torch.equal(gx_store, gx_unroll)


def test_no_grad_solves_and_updates_running_stats_once() -> None:
    x, edge_index = _graph()
    deq = DEQFixedPoint(_layer(0.5), max_iter=MAX_ITER, tol=TOL)
    with torch.no_grad():
        z = deq(x, edge_index)
    assert not z.requires_grad
    assert int(deq.f.norm.module.num_batches_tracked) == 1
    assert _relative_residual(deq.f, z, x, edge_index) < 1e-8

    deq.eval()
    before = _running_stats(deq)
    with torch.no_grad():
        z_eval = deq(x, edge_index)
    assert all(torch.equal(before[k], v) for k, v in _running_stats(deq).items())
    assert _relative_residual(deq.f, z_eval, x, edge_index) < 1e-8


def test_eval_mode_with_grad_still_gives_implicit_gradients() -> None:
    x, edge_index = _graph()
    f = _layer(0.5)
    with torch.no_grad():
        f(torch.randn_like(x), x, edge_index)  # non-trivial running statistics
    f.eval()
    unroll = DEQFixedPoint(copy.deepcopy(f), max_iter=MAX_ITER, tol=TOL, mode="unroll").eval()
    implicit = DEQFixedPoint(copy.deepcopy(f), max_iter=MAX_ITER, tol=TOL).eval()
    _, ref_gx, ref_grads = _step(unroll, x, edge_index)
    _, gx, grads = _step(implicit, x, edge_index)
    torch.testing.assert_close(gx, ref_gx, rtol=RTOL, atol=1e-9)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=RTOL, atol=1e-9, msg=name)


def test_implicit_output_may_be_modified_in_place() -> None:
    x, edge_index = _graph()
    f = _layer(0.5)
    grads = []
    for in_place in (False, True):
        deq = DEQFixedPoint(copy.deepcopy(f), max_iter=MAX_ITER, tol=TOL)
        xs = x.clone().requires_grad_()
        z = deq(xs, edge_index)
        z = z.mul_(3.0) if in_place else z * 3.0
        z.pow(2).sum().backward()
        grads.append(xs.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0.0)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created under the mode and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)

        def release(_: object, key: int = key, size: int = size) -> None:
            self.current -= size
            self.live.pop(key, None)

        self.live[key] = weakref.ref(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self._track(leaf)
        return out


def _peak_step_bytes(mode: str, solver: str, max_iter: int) -> tuple[int, int]:
    x, edge_index = _graph()
    deq = DEQFixedPoint(_layer(0.97, norm=True), solver=solver, max_iter=max_iter, tol=0.0,
                        mode=mode)
    with LiveBytes() as counter:
        _step(deq, x, edge_index)
    return counter.peak, deq.forward_info.iterations


@pytest.mark.parametrize("solver", SOLVERS)
def test_implicit_memory_is_independent_of_iterations(solver: str) -> None:
    # Both above the Broyden memory, whose buffers are sized min(memory, max_iter).
    short, short_iters = _peak_step_bytes("implicit", solver, 32)
    long, long_iters = _peak_step_bytes("implicit", solver, 80)
    assert long_iters > short_iters
    assert long == short


@pytest.mark.parametrize("solver, history, working", [("fixed_point", 0, 4), ("anderson", 10, 5), ("broyden", 40, 8)])
def test_a_solver_keeps_its_history_and_a_few_iterates(solver: str, history: int, working: int) -> None:
    """Peak bytes of a solve above its input, in iterates ``Z``, with a ``g`` that makes one
    temporary: the history plus a fixed working set. Broyden's had been 14 iterates (every dead
    name held until reassigned), 16% more of a DEQ step's peak; the estimate counts 8."""
    from gnnspec.memory.measure import LiveStorageTracker

    n = 50_000
    scale, shift = torch.randn(n) * 0.05, torch.randn(n)
    z0 = torch.zeros(n)
    tracker = LiveStorageTracker()
    tracker.track_existing([z0, scale, shift])
    with tracker:
        solve(lambda z: z * scale + shift, z0, solver=solver, max_iter=20, tol=1e-30)
    iterates, rest = divmod(tracker.peak_bytes - tracker.baseline_bytes, n * 4)
    assert iterates == history + working and rest < 1000  # scalars, Anderson's small matrices


def test_unrolled_memory_grows_with_iterations() -> None:
    """The byte counter of the test above does see saved activations."""
    short, _ = _peak_step_bytes("unroll", "fixed_point", 10)
    long, _ = _peak_step_bytes("unroll", "fixed_point", 40)
    implicit, _ = _peak_step_bytes("implicit", "fixed_point", 40)
    assert long > short + 25 * N * D * 8
    assert implicit < short


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
@pytest.mark.parametrize("mode", ["implicit", "unroll"])
def test_bfloat16_autocast_forward_backward(mode: str, solver: str) -> None:
    # The solvers' own products ran under autocast: Broyden's dot of a bfloat16 and a float32
    # vector raised, and Anderson, its iterates rounded to bfloat16, did not reach tol=1e-3 in 200
    # iterations where float32 took 14
    x, edge_index = _graph(torch.float32)
    deq = DEQFixedPoint(_layer(0.5, dtype=torch.float32), solver=solver, max_iter=30, tol=1e-3, mode=mode)
    before = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    xs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(xs, edge_index)
        loss = z.float().pow(2).mean()
    loss.backward()
    assert (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")) == before
    assert torch.isfinite(z).all() and torch.isfinite(xs.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in deq.parameters())
    assert int(deq.f.norm.module.num_batches_tracked) == 1
    assert deq.forward_info.converged


def test_invalid_configuration_is_rejected() -> None:
    f = _layer()
    with pytest.raises(ValueError, match="unknown solver"):
        DEQFixedPoint(f, solver="newton")
    with pytest.raises(ValueError, match="unknown DEQ mode"):
        DEQFixedPoint(f, mode="reversible")
    with pytest.raises(ValueError, match="unknown solver"):
        solve(lambda z: z, torch.zeros(2), solver="newton", max_iter=3, tol=1e-3)
