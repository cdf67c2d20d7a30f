"""Deep equilibrium stages: fixed-point solvers, implicit backward and the unrolled reference.

A ``deq`` stage (SPEC.md section 2) returns the equilibrium ``z*`` of one layer,
``z* = f(z*, x)`` with ``f(z, x) = conv(act(norm(z))) + x``. Two plans compute it (section 4):

* ``implicit``: the forward solves for ``z*`` without autograd, then applies ``f`` once more with
  autograd. The backward uses the implicit function theorem: for an incoming gradient ``v`` it
  solves the adjoint fixed point ``u = v + J_f(z*)^T u`` and sends ``u`` back through that one
  saved application of ``f``. Memory is one application of ``f`` plus the solver's fixed-size
  history, independent of the number of iterations.
* ``unroll`` (``store`` is a synonym): plain autograd through every iteration of
  ``z_{k+1} = f(z_k, x)``. It is the reference the implicit gradients are tested against.

Both plans update normalisation running statistics exactly once per forward in training mode,
from the batch statistics of the (converged) last application, so they leave the same module
state (SPEC.md section 3).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gnnspec.lower.recompute import preserved_running_stats, refuse_second_order

__all__ = ["SOLVERS", "MODES", "SolverInfo", "solve", "DEQFixedPoint", "NotConvergedWarning"]


class NotConvergedWarning(RuntimeWarning):
    """A deq stage's solve stopped at ``max_iter`` above ``tol``: its output is not the fixed
    point, and (under ``implicit``) its gradients are not the gradients of the fixed point."""

SOLVERS = ("anderson", "fixed_point", "broyden")
MODES = ("implicit", "unroll", "store")

# Anderson acceleration (Walker & Ni 2011, as in the DEQ tutorial of Kolter, Duvenaud & Johnson).
ANDERSON_MEMORY = 5
ANDERSON_BETA = 1.0
ANDERSON_LAMBDA = 1e-4
# Limited-memory Broyden (Bai, Kolter & Koltun 2019): at most this many rank-one updates.
BROYDEN_MEMORY = 30


@dataclass(frozen=True)
class SolverInfo:
    """Outcome of one :func:`solve`.

    ``iterations`` counts evaluations of ``g``; ``residual`` is the relative residual
    ``||g(z) - z|| / ||g(z)||`` of the returned ``z``; ``converged`` is ``residual < tol``.
    """

    iterations: int
    residual: float
    converged: bool


def _relative_residual(gz: Tensor, z: Tensor) -> float:
    diff = torch.linalg.vector_norm(gz - z).item()
    scale = torch.linalg.vector_norm(gz).item()
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0.0 else math.inf


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # The solvers' history and mixing need more precision than bf16/fp16 offer; g itself still
    # runs in whatever precision the caller's autocast picks.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _Tracker:
    """Keeps the iterate with the lowest residual seen and decides when to stop."""

    def __init__(self, tol: float) -> None:
        self.tol = tol
        self.best: Tensor | None = None
        self.best_residual = math.inf
        self.evaluations = 0

    def record(self, z: Tensor, gz: Tensor) -> bool:
        self.evaluations += 1
        residual = _relative_residual(gz, z)
        if residual < self.best_residual or self.best is None:
            self.best, self.best_residual = z.clone(), residual
        return residual < self.tol or residual == 0.0

    def info(self) -> SolverInfo:
        return SolverInfo(self.evaluations, self.best_residual, self.best_residual < self.tol)


def _fixed_point(g: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float) -> _Tracker:
    tracker = _Tracker(tol)
    z = z0
    for _ in range(max_iter):
        gz = g(z)
        if tracker.record(z, gz):
            break
        z = gz
    return tracker


def _anderson(g: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float) -> _Tracker:
    """Type-II Anderson acceleration on z flattened to one vector (a global solve over all nodes).

    With ``G_i = g(x_i) - x_i`` over the last ``n <= m`` iterates, ``alpha`` minimises
    ``||sum_i alpha_i G_i||^2 + lam ||alpha||^2`` subject to ``sum_i alpha_i = 1``, and
    ``x_next = beta sum_i alpha_i g(x_i) + (1 - beta) sum_i alpha_i x_i``.
    """
    tracker = _Tracker(tol)
    m, size = ANDERSON_MEMORY, z0.numel()
    # History of g(x_i) and of G_i = g(x_i) - x_i; x_i itself is F_i - G_i when beta != 1.
    F = z0.new_zeros(m, size)
    G = z0.new_zeros(m, size)
    eye = torch.eye(m, dtype=torch.float64, device=z0.device)
    x = z0.reshape(-1)
    for k in range(max_iter):
        fx = g(x.view_as(z0)).reshape(-1)
        if tracker.record(x, fx):
            break
        slot = k % m
        F[slot] = fx
        torch.sub(fx, x, out=G[slot])
        n = min(k + 1, m)
        if n == 1:
            x = fx
            continue
        # The n x n system is solved in float64; lam is relative to the largest squared residual
        # so the regularisation stays small at any scale: an absolute lam would dominate G G^T
        # near convergence (||G||^2 << lam) and stall a tight tolerance.
        gram = (G[:n] @ G[:n].transpose(0, 1)).double()
        scale = gram.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny)
        gram = gram + ANDERSON_LAMBDA * scale * eye[:n, :n]
        weights = torch.linalg.solve(gram, torch.ones(n, 1, dtype=torch.float64, device=z0.device))
        alpha = (weights / weights.sum()).to(F.dtype).reshape(1, n)
        x = (alpha @ F[:n]).reshape(-1)
        if ANDERSON_BETA != 1.0:
            x = x - (1.0 - ANDERSON_BETA) * (alpha @ G[:n]).reshape(-1)
    return tracker


def _residual(gx: Tensor, x: Tensor) -> Tensor:
    """``g(x) - x`` written into ``g(x)``'s storage (no new vector), unless ``g`` returned ``x``."""
    return gx.sub_(x) if gx.data_ptr() != x.data_ptr() else gx - x


def _usable_denominator(denom: Tensor) -> bool:
    """Whether a Broyden update's denominator can be divided by (a function of its own so that
    the dry run, whose fake tensors have no values, can answer it)."""
    return bool(denom != 0 and torch.isfinite(denom))


def _broyden(g: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int, tol: float) -> _Tracker:
    """Limited-memory "good" Broyden on the residual ``R(x) = g(x) - x``, as in the DEQ papers.

    The inverse Jacobian of ``R`` is approximated by ``B = -I + sum_i u_i v_i^T`` (at most
    ``BROYDEN_MEMORY`` rank-one pairs, restarted from ``-I`` when full), the step is
    ``dx = -B R(x)`` with unit step length, and each step applies
    ``B += (dx - B dR) (dx^T B) / (dx^T B dR)``.
    """
    tracker = _Tracker(tol)
    memory, size = min(BROYDEN_MEMORY, max(max_iter, 1)), z0.numel()
    U = z0.new_zeros(memory, size)
    V = z0.new_zeros(memory, size)
    used = 0

    # Each product allocates one vector; every name is dropped once dead, so that while ``g`` runs
    # only the residual, the step, the new iterate and the tracker's best are alive besides U, V
    # (memory: gnnspec.memory.deq counts these).
    def b_mv(y: Tensor) -> Tensor:  # B y = -y + U^T (V y)
        return (U[:used].transpose(0, 1) @ (V[:used] @ y)).sub_(y) if used else -y

    def b_rmv(y: Tensor) -> Tensor:  # B^T y = -y + V^T (U y)
        return (V[:used].transpose(0, 1) @ (U[:used] @ y)).sub_(y) if used else -y

    x = z0.reshape(-1)
    r = g(x.view_as(z0)).reshape(-1)  # g(x), then the residual in its place
    if tracker.record(x, r) or max_iter <= 1:
        return tracker
    r = _residual(r, x)
    for _ in range(1, max_iter):
        dx = b_mv(r).neg_()
        x_new = x + dx
        del x
        r_new = g(x_new.view_as(z0)).reshape(-1)
        if tracker.record(x_new, r_new):
            break
        r_new = _residual(r_new, x_new)
        dr = r_new - r
        del r
        vt = b_rmv(dx)
        denom = torch.dot(vt, dr)
        if _usable_denominator(denom):
            u = dx - b_mv(dr)
            u.div_(denom)
            if used == memory:
                # Restart from B = -I when the memory is full: dropping only the oldest pair (a
                # ring buffer) leaves an inconsistent B that stalls on rotating, slowly
                # contracting maps, where a restart still converges.
                used = 0
            U[used], V[used] = u, vt
            used += 1
            del u
        del dr, vt, dx
        x, r = x_new, r_new
        del x_new, r_new
    return tracker


_SOLVER_FUNCTIONS = {"anderson": _anderson, "fixed_point": _fixed_point, "broyden": _broyden}


def solve(
    g: Callable[[Tensor], Tensor], z0: Tensor, *, solver: str, max_iter: int, tol: float
) -> tuple[Tensor, SolverInfo]:
    """Find ``z`` with ``z = g(z)``, starting from ``z0``; no autograd graph is recorded.

    ``solver`` is ``"anderson"`` (Anderson acceleration, memory 5, mixing 1.0, relative Tikhonov
    1e-4), ``"fixed_point"`` (``z <- g(z)``) or ``"broyden"`` (limited-memory Broyden). All of
    ``z`` is one vector: the solve is global over every node and channel. Iteration stops when the
    relative residual ``||g(z) - z|| / ||g(z)||`` falls below ``tol`` or after ``max_iter``
    evaluations of ``g``. Returns the iterate with the lowest residual seen (in ``z0``'s dtype and
    shape) and its :class:`SolverInfo`. Extra memory is a fixed number of copies of ``z``,
    independent of ``max_iter``.
    """
    if solver not in _SOLVER_FUNCTIONS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    work = _work_dtype(z0.dtype)
    device_type = z0.device.type
    autocast = torch.is_autocast_enabled(device_type)
    autocast_dtype = torch.get_autocast_dtype(device_type)

    def g_work(z: Tensor) -> Tensor:
        if not autocast:
            return g(z.to(z0.dtype)).to(work)
        with torch.autocast(device_type, dtype=autocast_dtype):  # g runs as the caller's code does
            return g(z.to(z0.dtype)).to(work)

    # The solver's own products run in the working dtype: under autocast they had rounded every
    # iterate to bfloat16 (Anderson stalled at 1.8e-3) and mixed dtypes (Broyden's dot raised).
    with torch.no_grad(), torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        tracker = _SOLVER_FUNCTIONS[solver](g_work, z0.detach().to(work), max_iter, tol)
    assert tracker.best is not None
    return tracker.best.view(z0.shape).to(z0.dtype), tracker.info()


class _BlockGradient(torch.autograd.Function):
    """Identity whose backward sends nothing to its input.

    The saved application ``f(z*)`` needs ``z*`` to require grad so that the adjoint solve can
    take vector-Jacobian products with respect to it, but ``z*`` is a solver output and its
    gradient must not reach (or accumulate on) anything.
    """

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        # A view costs no memory (z* stays alive as the graph's leaf either way); it only forbids
        # f to modify its input in place, which f = conv(act(norm(z))) + x never does.
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> None:
        return None


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity on ``f(z*)`` whose backward swaps the gradient ``v`` for the adjoint ``u``.

    ``u = v + J_f(z*)^T u`` is solved with the forward's solver; each iteration is one
    vector-Jacobian product through the saved application of ``f`` (``autograd.grad`` from the
    application's gradient edge, with ``retain_graph``), after which the engine carries ``u``
    through that same application to ``x`` and to ``f``'s parameters.
    """

    @staticmethod
    def forward(
        ctx, fz: Tensor, z_in: Tensor, fz_edge: GradientEdge, owner: "DEQFixedPoint"
    ) -> Tensor:
        ctx.save_for_backward(z_in)
        ctx.fz_edge, ctx.fz_dtype, ctx.owner = fz_edge, fz.dtype, owner
        # Holding f(z*) by its gradient edge instead of saving it lets the output be a clone
        # that replaces it in memory, and that the caller may modify in place (a view returned
        # by a custom Function may not be).
        return fz.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        refuse_second_order("implicit")
        (z_in,) = ctx.saved_tensors
        owner: DEQFixedPoint = ctx.owner

        def adjoint_map(u: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(
                ctx.fz_edge, z_in, u.to(ctx.fz_dtype), retain_graph=True
            )
            return vjp.to(grad.dtype) + grad

        u, info = solve(
            adjoint_map, grad, solver=owner.solver, max_iter=owner.max_iter, tol=owner.tol
        )
        owner.backward_info = info
        owner._warn_if_not_converged(info, "adjoint (backward)", grad.dtype)
        return u, None, None, None


class DEQFixedPoint(nn.Module):
    """Deep equilibrium layer: returns ``z*`` with ``z* = f(z*, x, *args)``, starting at ``z = 0``.

    ``f(z, x, *args)`` is a module holding one layer's weights (SPEC.md: ``f(z, x) =
    conv(act(norm(z))) + x``); ``args`` are non-differentiable inputs such as ``edge_index`` or a
    shared dropout mask. Its parameters live under ``f``, so the state dict is the same for every
    plan.

    ``mode``:

    * ``"implicit"``: solve without autograd and without touching running statistics, then one
      application ``z = f(z*, x, *args)`` with autograd (the only update of running statistics);
      its backward solves ``u = v + J_f(z*)^T u`` with the same solver (see
      :class:`_ImplicitAdjoint`). Saved memory: one application of ``f``.
    * ``"unroll"`` / ``"store"``: plain fixed-point iteration ``z_{k+1} = f(z_k, x, *args)`` with
      autograd through every application, under the same stopping rule. Plain iteration is used
      rather than ``solver`` because its unrolled graph is the textbook gradient of the iteration
      (differentiating through Anderson's mixing weights or Broyden's updates gives a different,
      solver-dependent graph). The returned value is one final application to the last iterate,
      the only one that updates running statistics.
    * with grad disabled (any mode): solve with ``solver``, then one application of ``f``, so
      inference gives the same value and module-state effect under every plan.

    After a forward, ``forward_info`` holds the :class:`SolverInfo` of the forward solve; after a
    backward in implicit mode, ``backward_info`` holds that of the adjoint solve.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: str = "anderson",
        max_iter: int = 50,
        tol: float = 1e-4,
        mode: str = "implicit",
    ) -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
        if mode not in MODES:
            raise ValueError(f"unknown DEQ mode {mode!r}; expected one of {', '.join(MODES)}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        self.f = f
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.mode = mode
        self.forward_info: SolverInfo | None = None
        self.backward_info: SolverInfo | None = None
        self._warned: set[str] = set()

    def _warn_if_not_converged(self, info: SolverInfo, which: str, dtype: torch.dtype) -> None:
        """Warn once per stage and solve (forward, adjoint): every later step would repeat it."""
        if info.converged or which in self._warned:
            return
        self._warned.add(which)
        eps = torch.finfo(dtype).eps
        advice = (f"tol is below what {str(dtype).removeprefix('torch.')} resolves (eps {eps:.1e}): loosen it"
                  if info.residual < 100 * eps else
                  "raise max_iter, loosen tol, or make f contract (norm=layer, smaller weights)")
        warnings.warn(
            f"deq: the {which} solve did not converge: relative residual {info.residual:.2e} after "
            f"{info.iterations} iterations (tol {self.tol:g}), so the output is not the fixed point"
            + (" and the gradients are inexact" if self.mode == "implicit" else "")
            + f"; {advice}. Warned once per stage.",
            NotConvergedWarning,
            stacklevel=2,
        )

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        z0 = torch.zeros_like(x)
        if torch.is_grad_enabled() and self.mode in ("unroll", "store"):
            return self._unroll(z0, x, args)
        with torch.no_grad(), preserved_running_stats(self.f):
            z_star, self.forward_info = solve(
                lambda z: self.f(z, x, *args),
                z0,
                solver=self.solver,
                max_iter=self.max_iter,
                tol=self.tol,
            )
        self._warn_if_not_converged(self.forward_info, "forward", z_star.dtype)
        if not torch.is_grad_enabled():
            return self.f(z_star, x, *args)
        z_in = _BlockGradient.apply(z_star.requires_grad_())
        fz = self.f(z_in, x, *args)
        return _ImplicitAdjoint.apply(fz, z_in, get_gradient_edge(fz), self)

    def _unroll(self, z: Tensor, x: Tensor, args: tuple[Tensor, ...]) -> Tensor:
        evaluations, residual = 0, math.inf
        for _ in range(self.max_iter):
            with preserved_running_stats(self.f):
                fz = self.f(z, x, *args)
            evaluations += 1
            residual = _relative_residual(fz.detach(), z.detach())
            if residual < self.tol or residual == 0.0:
                break
            z = fz
        self.forward_info = SolverInfo(evaluations, residual, residual < self.tol)
        self._warn_if_not_converged(self.forward_info, "forward", z.dtype)
        # Re-applying f to the accepted iterate costs one application but is the only way to have
        # exactly one running-statistics update without knowing in advance which iteration is last.
        return self.f(z, x, *args)

    def extra_repr(self) -> str:
        return f"solver={self.solver}, max_iter={self.max_iter}, tol={self.tol}, mode={self.mode}"
