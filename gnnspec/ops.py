"""The op registry: op name -> torch-geometric layer at width ``channels -> channels``.

The lowering (``gnnspec.lower``) and the memory estimator read this one table; neither imports
torch_geometric itself. Every built-in op is the torch-geometric layer of that name, never a
reimplementation::

    op           layer (c = channels)                                                graph form
    gcn          GCNConv(c, c, normalize=False), as CsrGCNConv                       gcn_csr
    sage         SAGEConv(c, c, aggr=aggr); as CsrSAGEConv for aggr=mean             mean_csr (mean), raw
    gat          GATConv(c, c // heads, heads, concat=True, add_self_loops=False),   self_loops
                 as CsrGATConv
    gatv2        GATv2Conv(c, c // heads, heads, concat=True, add_self_loops=False)  self_loops
    gen          GENConv(c, c, aggr=aggr, t=t, learn_t=learn_t)                      raw
    gin          GINConv(Linear(c, c) -> ReLU -> Linear(c, c))                       raw
    graphconv    GraphConv(c, c)                                                     raw
    transformer  TransformerConv(c, c // heads, heads, concat=True)                  raw
    egc          EGConv(c, c, ["symnorm"], num_heads=heads, num_bases=bases)         gcn_norm
    cheb         ChebConv(c, c, K=k, normalization="sym"), as PreparedChebConv       cheb_norm

Other constructor arguments keep torch-geometric's defaults; notably ``GENConv``'s MLP is
``c -> 2c -> c`` with batch norm, and ``GINConv`` has ``eps = 0`` fixed (GIN-0).

Weight-free and stage-specific convolutions used by the ``appnp``, ``sgc`` and ``gcnii`` stages are
built here too (:func:`make_appnp`, :func:`make_sgc`, :func:`make_gcn2`); they take the
``gcn_csr`` form.

**Sparse propagation.** Where a layer's propagation is a product with a fixed matrix (``gcn``,
``gcn2``, ``appnp``, ``sgc``: ``A_hat x``; ``sage`` with ``aggr=mean``: the mean over in-neighbours)
it runs as a sparse-dense product with a :class:`CsrAdjacency` prepared once per graph, instead of
gathering an ``E x D`` message tensor and scattering it back (2-5x faster on CPU, and no ``E x D``
temporaries). The layers are torch-geometric's, subclassed (:class:`CsrPropagation`): weights,
bias, state dict and formula are theirs; only the kernel behind ``propagate`` is replaced.

**Graph preparation.** Self-loops and normalisation coefficients depend only on the graph, so they
are computed once per graph by a :class:`GraphCache`, not once per layer: the convolutions are
built with ``normalize=False`` / ``add_self_loops=False`` where the layer allows it and called
through :func:`call_conv` with the prepared tensors. A convolution built here therefore computes
its documented function only when called through :func:`call_conv`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import threading
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch_geometric.nn import (
    APPNP,
    ChebConv,
    EGConv,
    GATConv,
    GATv2Conv,
    GCN2Conv,
    GCNConv,
    GENConv,
    GINConv,
    GraphConv,
    SAGEConv,
    TransformerConv,
)
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch._subclasses.fake_tensor import FakeTensor, is_fake
from torch.utils._mode_utils import no_dispatch
from torch_geometric.utils import add_self_loops, degree, remove_self_loops, to_torch_csr_tensor

from gnnspec import ir
from gnnspec.ir import OP_SIGNATURES, Op, OpParam, OpSignature, register_op_signature

__all__ = [
    "GRAPH_FORMS",
    "CsrAdjacency",
    "CsrAPPNP",
    "CsrGCN2Conv",
    "CsrGATConv",
    "CsrGCNConv",
    "CsrPropagation",
    "CsrSAGEConv",
    "GraphCache",
    "OpImpl",
    "PreparedChebConv",
    "PreparedGraph",
    "TargetSortedEdges",
    "call_conv",
    "graph_form",
    "make_appnp",
    "make_conv",
    "make_gcn2",
    "make_sgc",
    "op_impl",
    "prepared_bytes",
    "register_op",
]

# ---------------------------------------------------------------------------- prepared graphs

GRAPH_FORMS: dict[str, str] = {
    "raw": "the edge_index as given: conv(x, edge_index)",
    "gcn_norm": (
        "gcn_norm(edge_index): remaining self-loops added, edge weights D^-1/2 (A + I) D^-1/2 (degree "
        "over targets): conv(x, edge_index, edge_weight)"
    ),
    "self_loops": (
        "self-loops removed then one added per node, as GATConv(add_self_loops=True) does, the "
        "columns sorted by target node (stable), with the row pointers of that order and of the "
        "source order (TargetSortedEdges): "
        "conv(x, edge_index)"
    ),
    "cheb_norm": (
        "ChebConv's scaled Laplacian 2 L_sym / lambda_max - I (lambda_max = 2): "
        "conv(x, edge_index, edge_weight)"
    ),
    "gcn_csr": (
        "D^-1/2 (A + I) D^-1/2 as in gcn_norm, as a CsrAdjacency (row = target node; nnz = E + N "
        "for a graph without self-loops): conv(x, adjacency)"
    ),
    "mean_csr": (
        "the mean over in-neighbours: M[i, j] = (number of edges j -> i) / in-degree(i), zero rows "
        "for nodes without in-edges, as a CsrAdjacency (nnz = E): conv(x, adjacency)"
    ),
}
"""The graph forms a convolution can take, each with its meaning and calling convention."""


# Forms held as a CsrAdjacency: form -> (field of PreparedGraph, nnz for a graph of E edges and
# N nodes without self-loops).
_CSR_FORMS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "gcn_csr": ("gcn_adjacency", lambda n, e: e + n),
    "mean_csr": ("mean_adjacency", lambda n, e: e),
}


@contextlib.contextmanager
def _quiet_sparse_csr():
    # torch warns once per process that CSR support is "beta" and that invariant checks are
    # off; neither says anything to a gnnspec user
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
        yield


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # torch's CPU sparse-dense kernels have no float16/bfloat16: such values are kept in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class CsrAdjacency:
    r"""A fixed ``N x N`` matrix ``A`` (row ``i`` = target node ``i``) stored as CSR twice: ``A``
    and ``A^T``.

    :meth:`matmul` is ``A @ x`` (``[N, D] -> [N, D]``) as an autograd function whose backward is
    ``A^T @ grad`` with the stored ``A^T`` (torch's own backward of a sparse product sorts and
    transposes ``A`` on every call). ``A``'s values never require grad. Both matrices are stored
    even when ``A`` is symmetric, so the size is a function of ``N`` and ``nnz`` alone
    (:meth:`nbytes_for`): per matrix ``crow_indices [N + 1]`` and ``col_indices [nnz]`` (int32
    where ``N + 1`` and ``nnz`` fit, :func:`graph_index_dtype`: torch's MKL sparse kernels take
    int32 and convert int64 indices on every product) and ``values [nnz]`` in ``dtype`` (float32 for half-precision dtypes, which torch's CPU sparse
    kernels lack; the product is then computed in float32).

    The holder is deliberately not a tensor: under ``FakeTensorMode`` (dry run, calibration) a
    CSR tensor can neither be built nor converted (and a fake CSR has ``nnz = 0``). A holder built
    from fake components (:meth:`placeholder`) has no matrices, and its product returns an
    uninitialised ``[N, D]`` tensor: the bytes the real product allocates, since ``torch.mm`` with
    a CSR operand allocates only its output.
    """

    def __init__(self, parts: tuple[Tensor, Tensor, Tensor], transpose_parts: tuple[Tensor, Tensor, Tensor],
                 num_nodes: int, dtype: torch.dtype) -> None:
        self.parts = parts  # (crow_indices, col_indices, values) of A; kept so the bytes can be seen
        self.transpose_parts = transpose_parts  # the same of A^T
        self.num_nodes = int(num_nodes)
        self.dtype = dtype  # the dtype a product with a tensor of this dtype comes out in
        self.is_fake = isinstance(parts[2], FakeTensor)
        self._matrices: tuple[Tensor, Tensor] | None = None
        if not self.is_fake:
            size = (self.num_nodes, self.num_nodes)
            with _quiet_sparse_csr():
                self._matrices = (torch.sparse_csr_tensor(*parts, size=size),
                                  torch.sparse_csr_tensor(*transpose_parts, size=size))

    @classmethod
    def from_edges(cls, edge_index: Tensor, weight: Tensor, num_nodes: int, dtype: torch.dtype) -> "CsrAdjacency":
        """``A[i, j] = sum of weight[k] over the edges k = (j -> i)`` of ``edge_index [2, E]``."""
        size = (num_nodes, num_nodes)
        weight = weight.to(_compute_dtype(dtype))
        with _quiet_sparse_csr():
            by_target = to_torch_csr_tensor(edge_index.flip(0), weight, size=size)
            by_source = to_torch_csr_tensor(edge_index, weight, size=size)
        # copies: a component may be a view into a larger storage (a row of a sorted [2, E] index)
        index = graph_index_dtype(num_nodes, by_target.values().numel())
        parts = [(m.crow_indices().to(index, copy=True), m.col_indices().to(index, copy=True), m.values().clone())
                 for m in (by_target, by_source)]
        return cls(parts[0], parts[1], num_nodes, dtype)

    @classmethod
    def placeholder(cls, num_nodes: int, nnz: int, dtype: torch.dtype) -> "CsrAdjacency":
        """Uninitialised components of the sizes :meth:`from_edges` gives for ``nnz`` entries; under
        ``FakeTensorMode`` a holder with no matrices whose products only allocate their outputs."""
        index = graph_index_dtype(num_nodes, nnz)

        def parts() -> tuple[Tensor, Tensor, Tensor]:
            return (torch.empty(num_nodes + 1, dtype=index), torch.empty(nnz, dtype=index),
                    torch.empty(nnz, dtype=_compute_dtype(dtype)))

        return cls(parts(), parts(), num_nodes, dtype)

    @staticmethod
    def nbytes_for(num_nodes: int, nnz: int, value_bytes: int) -> int:
        """Bytes of both matrices for ``nnz`` entries, values of ``value_bytes`` (the dtype's size)."""
        value_bytes = max(value_bytes, 4)  # half-precision values are kept in float32
        index_bytes = graph_index_dtype(num_nodes, nnz).itemsize
        return 2 * ((num_nodes + 1) * index_bytes + nnz * (index_bytes + value_bytes))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.parts, *self.transpose_parts))

    def t(self) -> "CsrAdjacency":
        """``A^T``, sharing this holder's storage."""
        out = copy.copy(self)
        out.parts, out.transpose_parts = self.transpose_parts, self.parts
        if self._matrices is not None:
            out._matrices = self._matrices[::-1]
        return out

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``A @ x`` (``+ bias``, broadcast over rows) for ``x [N, D]``, ``bias [D]``, in
        ``promote_types(x.dtype, dtype)`` (and ``bias.dtype``); differentiable in ``x`` and ``bias``.

        The bias is added by the product itself (``addmm``): one ``[N, D]`` output instead of a
        product and a sum, and no zero-fill of the output."""
        return _CsrMatmul.apply(x, self, bias)

    def add_matmul_(self, out: Tensor, x: Tensor) -> Tensor:
        """``out += A @ x`` in place and return ``out`` (``out, x [N, D]``); differentiable in
        ``out`` and ``x``. ``out`` must be the caller's own temporary (an op's output that no
        backward saves): its old value is gone afterwards.

        With ``out`` in the product's compute dtype the sparse kernel accumulates into it and
        allocates nothing; otherwise (half precision under autocast) the product is made in the
        compute dtype, as :meth:`matmul`'s, and added."""
        return _CsrAddMatmul.apply(out, x, self)

    def _add_product_(self, out: Tensor, x: Tensor, alpha: int = 1) -> Tensor:
        """``out += alpha * A @ x`` in place (``alpha`` 1 or -1: exact in any dtype)."""
        compute = self.parts[2].dtype
        if out.dtype != compute:
            return out.add_(self._product(x), alpha=alpha)
        if self._matrices is not None and not isinstance(x, FakeTensor):
            with _without_autocast(x):
                out.addmm_(self._matrices[0], _cast(x, compute), alpha=alpha)
        return out

    def _product(self, x: Tensor, bias: Tensor | None = None, alpha: int = 1) -> Tensor:
        """``alpha * A @ x (+ bias)``; ``alpha`` (1 or -1) only without a bias."""
        out_dtype = x.dtype if x.dtype == self.dtype else torch.promote_types(x.dtype, self.dtype)
        compute = self.parts[2].dtype
        x = _cast(x, compute)
        if bias is not None and bias.dtype != out_dtype:
            out_dtype = torch.promote_types(out_dtype, bias.dtype)
        if self._matrices is None or isinstance(x, FakeTensor):
            out = x.new_empty(self.num_nodes, x.shape[-1])
        else:
            with _without_autocast(x):
                if bias is None:
                    # beta=0: out's uninitialised values are not read. torch.mm(A, x) gives the same
                    # values, but zero-fills a buffer and copies it into its output (1.6x the time).
                    out = x.new_empty(self.num_nodes, x.shape[-1]).addmm_(self._matrices[0], x, beta=0, alpha=alpha)
                else:  # the broadcast bias is read in place (a stride-0 view), not copied
                    out = torch.addmm(_cast(bias, compute).expand(self.num_nodes, x.shape[-1]), self._matrices[0], x)
        return _cast(out, out_dtype)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # ``t.to(dtype)`` without the dispatch of a no-op cast (these run several times a layer)
    return t if t.dtype == dtype else t.to(dtype)


def _without_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off around a CSR product (it would cast the CSR operand to a dtype its kernel
    lacks); nothing to enter when it is off already."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class _CsrMatmul(torch.autograd.Function):
    """``y = A @ x (+ b)``; ``dL/dx = A^T @ dL/dy`` with the stored transpose (itself
    differentiable), ``dL/db = sum over rows of dL/dy``. Saves no tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, adjacency: CsrAdjacency, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.adjacency, ctx.x_dtype = adjacency, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        mark_tensor_inputs(ctx, x, adjacency, bias)
        return adjacency._product(x, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_x = grad_bias = None
        needs = gradients_used(ctx)
        if needs[0]:
            grad_x = ctx.adjacency.t().matmul(grad).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and needs[2]:
            grad_bias = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias


class _CsrAddMatmul(torch.autograd.Function):
    """``out <- out + A @ x`` in place; ``dL/dout_old = dL/dout``, ``dL/dx = A^T @ dL/dout``.
    Saves no tensor."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, adjacency: CsrAdjacency) -> Tensor:  # type: ignore[override]
        ctx.adjacency, ctx.x_dtype = adjacency, x.dtype
        ctx.mark_dirty(out)
        return adjacency._add_product_(out, x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = ctx.adjacency.t().matmul(grad).to(ctx.x_dtype)
        return grad, grad_x, None


class _PropagatedLinear(torch.autograd.Function):
    r"""``out = r + A (x W^T) + x R^T + b`` (residual ``r``, root weight ``R`` and bias ``b``
    optional), or with ``subtract`` ``out = r - (A (x W^T) + x R^T + b)``, one autograd node for
    the products of :class:`CsrGCNConv` (no ``R``) and :class:`CsrSAGEConv`, with the kernels of
    their unfused order (``addmm``/``mm``, then the sparse product: added into the root term in
    place, or with the bias into a fresh output).
    With a residual (a ``res+`` layer's ``x + conv(h)``) the output starts as ``r + b``, the root
    product and the sparse product accumulate into it in place: one fresh ``[N, C]`` tensor where
    the conv's output and the sum were two. Saves ``x`` alone (the weights are held on the node:
    parameters, alive anyway). Backward, with ``h = A^T g``: ``dL/dx = g R + h W`` (one
    ``[N, C_in]`` tensor, accumulated in place), ``dL/dW = h^T x``, ``dL/dR = g^T x``,
    ``dL/db = sum_rows g``, ``dL/dr = g``. The unfused order runs three to five nodes and saves
    two to five tensors; a checkpoint's hooks here pack and unpack one. ``x``, ``r``, the weights
    and ``A`` share one dtype (no autocast).

    ``subtract`` (with ``r``) is the reversible stack's reconstruction ``x_i = y_i - f(u)``
    computed inside the products: ``r - b``, then the products accumulated with ``alpha = -1``,
    where ``f``'s own output and the difference were two fresh tensors. Its backward negates
    ``g`` inside the products (``-A^T g`` by the sparse product's ``alpha``), not in a pass of its
    own: the same values as the backward of ``r - f``, since negation is exact."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, root_weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                adjacency: CsrAdjacency, residual: Tensor | None = None, subtract: bool = False) -> Tensor:
        neighbours = torch.mm(x, weight.t())
        sign = -1 if subtract else 1
        if residual is not None:
            if bias is None:
                out = residual.clone(memory_format=torch.contiguous_format)
            else:
                out = torch.sub(residual, bias) if subtract else torch.add(residual, bias)
            if root_weight is not None:
                out.addmm_(x, root_weight.t(), alpha=sign)
            out = adjacency._add_product_(out, neighbours, alpha=sign)
        elif root_weight is None:
            out = adjacency._product(neighbours, bias)
        else:
            root = torch.mm(x, root_weight.t()) if bias is None else torch.addmm(bias, x, root_weight.t())
            out = adjacency._add_product_(root, neighbours)
        ctx.save_for_backward(x)
        ctx.weights, ctx.adjacency, ctx.has_bias = (weight, root_weight), adjacency, bias is not None
        ctx.sign = sign
        mark_tensor_inputs(ctx, x, weight, root_weight, bias, adjacency, residual, subtract)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        weight, root_weight = ctx.weights
        needs = gradients_used(ctx)
        sign = ctx.sign
        propagated = ctx.adjacency.t()._product(grad, alpha=sign)  # sign A^T g
        grad_x = grad_w = grad_root = grad_b = None
        if needs[0]:
            if root_weight is None:
                grad_x = torch.mm(propagated, weight)
            elif sign < 0:
                grad_x = torch.mm(propagated, weight).addmm_(grad, root_weight, alpha=-1)
            else:
                grad_x = torch.mm(grad, root_weight).addmm_(propagated, weight)
        if needs[1]:
            grad_w = torch.mm(propagated.t(), x)
        if root_weight is not None and needs[2]:
            grad_root = torch.mm(grad.t(), x)
            if sign < 0:
                grad_root.neg_()
        if ctx.has_bias and needs[3]:
            grad_b = grad.sum(0)
            if sign < 0:
                grad_b.neg_()
        grads = (grad_x, grad_w, grad_root, grad_b, None)
        if len(ctx.needs_input_grad) > 5:
            grads = grads + (grad if needs[5] else None, None)
        return grads


def _fusable_product(x: Any, adjacency: Any, *modules: nn.Module) -> bool:
    """Whether :class:`_PropagatedLinear` computes a CSR layer's products on ``x`` as its unfused
    order would: a 2-D tensor and a :class:`CsrAdjacency` of its dtype, no autocast (whose casts
    the node does not make), no hooks on the linear submodules it reads the weights of."""
    if not (isinstance(adjacency, CsrAdjacency) and isinstance(x, Tensor) and x.dim() == 2
            and adjacency.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type)):
        return False
    return not has_forward_hooks(*modules)


def _fusable_residual(residual: Tensor | None, x: Tensor, out_channels: int) -> bool:
    """Whether :class:`_PropagatedLinear` can start its output from ``residual``: one ``[N, out]``
    tensor of ``x``'s dtype and device (anything else is added after the product, broadcast as
    ``residual + out`` would be)."""
    return (isinstance(residual, Tensor) and residual.shape == (x.shape[0], out_channels)
            and residual.dtype == x.dtype and residual.device == x.device)


def _plus(residual: Tensor | None, out: Tensor, subtract: bool = False) -> Tensor:
    """``out``, ``residual + out``, or with ``subtract`` ``residual - out``."""
    if residual is None:
        return out
    return residual - out if subtract else residual + out


def _propagated_linear(x: Tensor, weight: Tensor, root_weight: Tensor | None, bias: Tensor | None,
                       adjacency: CsrAdjacency, residual: Tensor | None, out_channels: int,
                       subtract: bool = False) -> Tensor:
    """``residual + A (x W^T) + x R^T + b`` (``residual - (...)`` with ``subtract``) by
    :class:`_PropagatedLinear`, the residual inside the node where :func:`_fusable_residual`
    allows it, else added (subtracted) after it."""
    # In half precision the sparse product runs in float32 and is added back in a cast copy: into
    # the residual's sum that copy would be alive beside it (one [N, C] more than the unfused sum)
    if _fusable_residual(residual, x, out_channels) and adjacency.parts[2].dtype == x.dtype:
        return _PropagatedLinear.apply(x, weight, root_weight, bias, adjacency, residual, subtract)
    return _plus(residual, _PropagatedLinear.apply(x, weight, root_weight, bias, adjacency), subtract)


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether calling any of ``modules`` would run a forward (pre-)hook: one of its own, or a
    global one (``register_module_forward_hook``). A fused function that reads their parameters
    instead of calling them computes the same only when none would run."""
    if not modules:
        return False
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def mark_tensor_inputs(ctx: Any, *inputs: Any) -> None:
    """Records which of a custom autograd Function's forward inputs are tensors, for
    :func:`gradients_used` (the node's edges cover the tensor inputs only)."""
    ctx.tensor_inputs = tuple(isinstance(a, Tensor) for a in inputs)


def gradients_used(ctx: Any) -> tuple[bool, ...]:
    """Per forward input of the custom autograd Function whose backward is running (``ctx``, its
    inputs marked by :func:`mark_tensor_inputs`): whether this backward pass uses the input's
    gradient. ``ctx.needs_input_grad`` only says which inputs required grad at the forward; an
    ``autograd.grad`` or ``backward(inputs=...)`` that does not reach an input (the implicit deq's
    adjoint iterations take gradients with respect to ``z`` alone) never runs that input's node,
    and torch's own nodes then skip its gradient, so a Function need not compute it either: the
    deq's adjoint had computed and dropped the weight gradients of gcn and sage in every iteration.
    """
    # Inside every_gradient_used its caller vouches for needs_input_grad; compiled autograd traces
    # the node and cannot ask the engine.
    if _every_gradient_used.passes or torch.compiler.is_compiling():
        return tuple(ctx.needs_input_grad)
    edges = iter(ctx.next_functions)
    used = []
    for needed, is_tensor in zip(ctx.needs_input_grad, ctx.tensor_inputs):
        node = next(edges)[0] if is_tensor else None
        used.append(needed and node is not None and _engine_runs(node))
    return tuple(used)


class _EveryGradientUsed:
    """How many backward passes, now running, take the gradient of every input that requires one
    (see :func:`every_gradient_used`); a lock, as the engine runs a device's nodes on a thread of
    its own."""

    def __init__(self) -> None:
        self.passes = 0
        self.lock = threading.Lock()

    def add(self, change: int) -> None:
        with self.lock:
            self.passes += change


_every_gradient_used = _EveryGradientUsed()


@contextlib.contextmanager
def every_gradient_used():
    """Within it, :func:`gradients_used` answers ``ctx.needs_input_grad`` without asking the engine.

    For a backward pass its caller knows uses the gradient of every input that requires one (the
    reversible stack's ``autograd.grad`` with respect to a group function's input and all of its
    parameters). The engine's answer for a leaf that ``autograd.grad`` returns the gradient of is
    a raised exception, ~10 us each: four per gcn layer, 8 ms of a 260 ms reversible step at depth
    64. Process-wide, not per thread: a pass that runs meanwhile elsewhere computes gradients its
    engine then drops, as torch's own Functions do, and gets the same values."""
    _every_gradient_used.add(1)
    try:
        yield
    finally:
        _every_gradient_used.add(-1)


def _engine_runs(node: Any) -> bool:
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # a leaf that autograd.grad returns the gradient of: used
        return True


@dataclass(frozen=True)
class TargetSortedEdges:
    """An ``edge_index [2, E]`` whose columns are sorted by target node (stably), with what a CSR
    product by it and by its transpose needs: ``ptr [N + 1]`` (the edges into node ``i`` are
    columns ``ptr[i]:ptr[i + 1]``), ``source [E]`` (``edge_index[0]``, the column indices of that
    CSR), ``source_order [E]`` (the columns in source order, stably), ``source_ptr [N + 1]`` (the
    same pointer over that order) and ``target_by_source [E]`` (``edge_index[1][source_order]``).
    The five are int32 where ``N + 1`` and ``E`` fit (:func:`graph_index_dtype`): torch's CPU
    sparse kernels (MKL) take int32 indices and convert int64 ones on every call. The
    ``self_loops`` form as :class:`CsrGATConv` takes it."""

    edge_index: Tensor
    ptr: Tensor
    source: Tensor
    source_order: Tensor
    source_ptr: Tensor
    target_by_source: Tensor

    @classmethod
    def from_edges(cls, edge_index: Tensor, num_nodes: int) -> "TargetSortedEdges":
        """``edge_index``'s columns sorted by target, and the rest of the holder."""
        edge_index = edge_index[:, torch.argsort(edge_index[1], stable=True)]
        source, target = edge_index
        dtype = graph_index_dtype(num_nodes, source.numel())
        int32 = dtype == torch.int32
        source_order = torch.argsort(source, stable=True)
        return cls(
            edge_index=edge_index,
            ptr=torch._convert_indices_from_coo_to_csr(target, num_nodes, out_int32=int32),
            source=source.to(dtype),
            source_order=source_order.to(dtype),
            source_ptr=torch._convert_indices_from_coo_to_csr(source[source_order], num_nodes, out_int32=int32),
            target_by_source=target[source_order].to(dtype),
        )

    @classmethod
    def placeholder(cls, edge_index: Tensor, num_nodes: int) -> "TargetSortedEdges":
        """Uninitialised tensors of the sizes :meth:`from_edges` gives, around ``edge_index``."""
        columns = edge_index.size(1)
        dtype = graph_index_dtype(num_nodes, columns)
        return cls(edge_index, torch.empty(num_nodes + 1, dtype=dtype), torch.empty(columns, dtype=dtype),
                   torch.empty(columns, dtype=dtype), torch.empty(num_nodes + 1, dtype=dtype),
                   torch.empty(columns, dtype=dtype))

    @property
    def index_tensors(self) -> list[Tensor]:
        """The tensors held beside ``edge_index``."""
        return [self.ptr, self.source, self.source_order, self.source_ptr, self.target_by_source]

    @property
    def num_nodes(self) -> int:
        return self.ptr.numel() - 1


def graph_index_dtype(num_nodes: int, num_edges: int) -> torch.dtype:
    """The index dtype of :class:`TargetSortedEdges` and :class:`CsrAdjacency`: int32 where
    ``N + 1`` and ``E`` (or ``nnz``) fit (:func:`_flat_index_dtype`'s rule)."""
    return _flat_index_dtype(max(num_nodes + 1, num_edges))


@dataclass(frozen=True)
class PreparedGraph:
    """One graph in every form its convolutions need (see :data:`GRAPH_FORMS`).

    ``edge_index`` is the raw input; the other fields are ``None`` unless their form was prepared.
    Nothing here requires grad.
    """

    edge_index: Tensor
    num_nodes: int
    gcn_edge_index: Tensor | None = None
    gcn_edge_weight: Tensor | None = None
    loop_edge_index: Tensor | None = None
    loop_sorted: TargetSortedEdges | None = None
    cheb_edge_index: Tensor | None = None
    cheb_edge_weight: Tensor | None = None
    gcn_adjacency: CsrAdjacency | None = None
    mean_adjacency: CsrAdjacency | None = None

    @property
    def forms(self) -> frozenset[str]:
        """The forms this graph holds."""
        have = {"raw"}
        if self.gcn_edge_index is not None:
            have.add("gcn_norm")
        if self.loop_edge_index is not None:
            have.add("self_loops")
        if self.cheb_edge_index is not None:
            have.add("cheb_norm")
        have.update(form for form, (name, _) in _CSR_FORMS.items() if getattr(self, name) is not None)
        return frozenset(have)

    def tensors(self, form: str) -> tuple[Tensor | CsrAdjacency, ...]:
        """The graph arguments a convolution of ``form`` is called with, after ``x``."""
        if form in _CSR_FORMS:  # the per-layer call of CSR ops: no set of forms built
            held = getattr(self, _CSR_FORMS[form][0])
            if held is not None:
                return (held,)
        if form not in GRAPH_FORMS:
            raise ValueError(f"unknown graph form {form!r}; known: {', '.join(GRAPH_FORMS)}")
        if form not in self.forms:
            raise ValueError(
                f"graph form {form!r} was not prepared; pass it in `forms` to GraphCache.prepare"
            )
        if form == "raw":
            return (self.edge_index,)
        if form == "gcn_norm":
            return (self.gcn_edge_index, self.gcn_edge_weight)
        if form == "self_loops":
            return (self.loop_edge_index,)
        return (self.cheb_edge_index, self.cheb_edge_weight)

    def prepared_tensors(self) -> list[Tensor]:
        """Every tensor held beyond the raw ``edge_index`` (the CSR matrices by their components)."""
        out = [self.gcn_edge_index, self.gcn_edge_weight, self.loop_edge_index, self.cheb_edge_index,
               self.cheb_edge_weight]
        if self.loop_sorted is not None:
            out += self.loop_sorted.index_tensors
        for name, _ in _CSR_FORMS.values():
            adjacency = getattr(self, name)
            if adjacency is not None:
                out += [*adjacency.parts, *adjacency.transpose_parts]
        return [t for t in out if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the raw ``edge_index`` (the self-loops, coefficients and matrices)."""
        return sum(t.numel() * t.element_size() for t in self.prepared_tensors())

    @classmethod
    def placeholder(cls, edge_index: Tensor, num_nodes: int, forms: Iterable[str], dtype: torch.dtype) -> "PreparedGraph":
        """``edge_index [2, E]`` with uninitialised tensors of the sizes :class:`GraphCache` prepares for a
        graph of ``E`` edges without self-loops, in each of ``forms``. Under ``FakeTensorMode`` (the
        dry run and the calibration) nothing is allocated; see :meth:`CsrAdjacency.placeholder`."""
        n, e = int(num_nodes), edge_index.size(1)
        forms = set(forms)
        kw: dict[str, object] = {}
        if "gcn_norm" in forms:
            kw.update(gcn_edge_index=torch.empty(2, e + n, dtype=torch.long),
                      gcn_edge_weight=torch.empty(e + n, dtype=dtype))
        if "self_loops" in forms:
            loops = torch.empty(2, e + n, dtype=torch.long)
            kw.update(loop_edge_index=loops, loop_sorted=TargetSortedEdges.placeholder(loops, n))
        if "cheb_norm" in forms:
            kw.update(cheb_edge_index=torch.empty(2, e + n, dtype=torch.long),
                      cheb_edge_weight=torch.empty(e + n, dtype=dtype))
        for form in forms & set(_CSR_FORMS):
            name, nnz = _CSR_FORMS[form]
            kw[name] = CsrAdjacency.placeholder(n, nnz(n, e), dtype)
        return cls(edge_index=edge_index, num_nodes=n, **kw)


def keeps_self_loops(form: str) -> bool:
    """Whether graph ``form`` keeps the input's self-loops as edges (``raw``; ``mean_csr``, whose
    mean counts them): the other forms remove them and add one per node, or drop them."""
    return form in ("raw", "mean_csr")


def prepared_bytes(forms: Iterable[str], num_nodes: int, num_edges: int, value_bytes: int) -> int:
    """Analytic size of :attr:`PreparedGraph.nbytes` for a graph of ``num_edges`` edges.

    An edge-index form has at most ``num_edges + num_nodes`` columns (the edges plus one self-loop
    per node; fewer when the input already has self-loops): an index ``[2, E + N]`` and, for the
    weighted forms, a weight ``[E + N]`` of the feature dtype; ``self_loops`` also keeps two row
    pointers ``[N + 1]`` and three indices ``[E + N]``, int32 where they fit (:class:`TargetSortedEdges`). A CSR form holds two matrices of
    ``nnz`` entries (:meth:`CsrAdjacency.nbytes_for`; ``nnz = E + N`` for ``gcn_csr``, ``E`` for
    ``mean_csr``). Exact for a graph without self-loops or duplicate edges.
    """
    columns = num_edges + num_nodes
    total = 0
    for form in set(forms) - {"raw"}:
        if form not in GRAPH_FORMS:
            raise ValueError(f"unknown graph form {form!r}")
        if form in _CSR_FORMS:
            nnz = _CSR_FORMS[form][1](num_nodes, num_edges)
            total += CsrAdjacency.nbytes_for(num_nodes, nnz, value_bytes)
            continue
        total += 2 * columns * 8  # an int64 edge_index, as torch-geometric takes it
        if form == "self_loops":  # TargetSortedEdges: two pointers and three indices
            total += (2 * (num_nodes + 1) + 3 * columns) * graph_index_dtype(num_nodes, columns).itemsize
        if form in ("gcn_norm", "cheb_norm"):
            total += columns * value_bytes
    return total


def _cheb_laplacian(edge_index: Tensor, num_nodes: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # ChebConv's own normalisation, called unbound: it reads nothing of the instance.
    return ChebConv.__norm__(
        None, edge_index, num_nodes, None, "sym", lambda_max=None, dtype=dtype, batch=None
    )


def plain_tensor(t: Tensor) -> Tensor:
    """``t`` as a plain ``torch.Tensor``: torch-geometric's ``EdgeIndex`` (a wrapper subclass that
    holds its data inside, which ``data_ptr``, numpy and ops outside its dispatch cannot reach)
    unwrapped without a copy; any other tensor as it is."""
    as_tensor = getattr(t, "as_tensor", None)
    return as_tensor() if type(t) is not Tensor and callable(as_tensor) else t


def _long_indices(edge_index: Tensor) -> Tensor:
    """``edge_index`` (``[2, E]``, integers) as int64, copied only if it holds another integer dtype.

    torch-geometric's message passing expects int64 indices: with int32 ones torch's ``scatter``
    backward accumulates into the wrong rows while the forward output stays equal. ValueError for
    anything that is not an integer ``[2, E]`` tensor."""
    if edge_index.dim() != 2 or edge_index.size(0) != 2 or edge_index.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"edge_index must be an integer tensor of shape [2, E], got {edge_index.dtype} "
            f"of shape {list(edge_index.shape)}"
        )
    return edge_index.long()


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_node_range(edge_index: Tensor, num_nodes: int) -> None:
    """IndexError, as torch-geometric's message passing raises, unless every index of
    ``edge_index`` lies in ``[0, num_nodes)``: a CSR product would read outside ``x`` instead.
    Once per prepared graph, outside any dispatch mode (a tracker sees no temporary); a fake or
    meta ``edge_index`` (dry run, calibration) has no values to check."""
    if edge_index.numel() == 0 or is_fake(edge_index) or edge_index.device.type == "meta":
        return
    with no_dispatch():
        low, high = (int(v) for v in torch.aminmax(edge_index))
    if low < 0 or high >= num_nodes:
        bad = low if low < 0 else high
        raise IndexError(
            f"edge_index holds node index {bad}, outside [0, {num_nodes}) for {num_nodes} nodes: "
            f"every index must point to a row of the node feature matrix"
        )


class GraphCache:
    """Prepares a graph's forms once and reuses them while the same ``edge_index`` comes back.

    A model holds one ``GraphCache`` and calls :meth:`prepare` once per forward, before its layers;
    every layer then reads the same :class:`PreparedGraph`. Without it, each of ``depth`` layers
    would add self-loops and compute ``gcn_norm`` itself: ``depth`` times the work, and under a
    checkpointed or reversible plan again during recomputation, with each copy a temporary of size
    ``E + N``.

    The cache key is the identity of ``edge_index`` (``data_ptr``, ``_version``, shape, strides,
    dtype, device), ``num_nodes``, the feature dtype of the weights and whether inference mode is
    on; the cache holds a reference to ``edge_index``, so its storage cannot be freed and reused by
    another tensor while it is cached, and an in-place change bumps ``_version``. An inference
    tensor has no ``_version``: its graph is prepared on every call. An integer ``edge_index``
    other than int64 is copied to int64 for the raw form (torch's ``scatter`` backward gives wrong
    gradients with int32 indices: measured 1.66 off for ``gin``), an extra ``2 E`` int64 held with
    the graph that the estimator, which assumes int64 input, does not count. Only the latest
    graph is kept: memory stays bounded by one graph's prepared tensors. Those tensors live across
    training steps like the features and ``edge_index`` themselves, so the memory estimator counts
    them as input data (SPEC section 5: "anything the model caches across steps counts as input
    data"), once, not per layer; :func:`prepared_bytes` gives their size.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._graph: PreparedGraph | None = None
        self._source: Tensor | None = None

    def __reduce__(self) -> tuple:
        # A copy (copy.copy, copy.deepcopy(model), pickling) starts empty: the key names the
        # original ``edge_index`` by address, which the copy would not keep alive, and torch cannot
        # deep-copy the CSR matrices. The copy prepares the graph again on its first forward.
        return (GraphCache, ())

    @property
    def graph(self) -> PreparedGraph | None:
        """The graph prepared last, if any."""
        return self._graph

    def clear(self) -> None:
        """Forget the cached graph."""
        self._key = None
        self._graph = None
        self._source = None

    def prepare(
        self,
        edge_index: Tensor,
        *,
        num_nodes: int,
        dtype: torch.dtype,
        forms: Iterable[str] = ("raw",),
    ) -> PreparedGraph:
        """``edge_index`` (``[2, E]``, ``N = num_nodes``) in each of ``forms``, weights in ``dtype``.

        Forms already prepared for the same key are reused; missing ones are added; a new key
        replaces the cached graph.
        """
        forms = frozenset(forms)
        edge_index = plain_tensor(edge_index)
        unknown = forms - set(GRAPH_FORMS)
        if unknown:
            raise ValueError(f"unknown graph form {sorted(unknown)[0]!r}; known: {', '.join(GRAPH_FORMS)}")
        key = self._key_of(edge_index, num_nodes, dtype)
        graph = self._graph if key is not None and key == self._key else None
        if graph is None:
            graph = PreparedGraph(edge_index=_long_indices(edge_index), num_nodes=int(num_nodes))
            _check_node_range(graph.edge_index, graph.num_nodes)
        missing = forms - graph.forms
        if missing:
            graph = self._add_forms(graph, missing, dtype)
        # ``_source`` keeps the caller's tensor alive while its key is cached (the prepared graph
        # may hold a converted copy instead), so no other tensor can reuse its address
        self._key, self._graph, self._source = key, graph, edge_index
        return graph

    @staticmethod
    def _key_of(edge_index: Tensor, num_nodes: int, dtype: torch.dtype) -> tuple | None:
        # An inference tensor carries no version counter, so an in-place edit of it cannot be
        # seen: its graph is prepared again on every call (None: never reused).
        if edge_index.is_inference():
            return None
        return (
            edge_index.data_ptr(),
            edge_index._version,
            tuple(edge_index.shape),
            edge_index.stride(),
            edge_index.dtype,
            edge_index.device,
            int(num_nodes),
            dtype,
            torch.is_inference_mode_enabled(),
        )

    @staticmethod
    def _add_forms(graph: PreparedGraph, forms: frozenset[str], dtype: torch.dtype) -> PreparedGraph:
        ei, n = graph.edge_index, graph.num_nodes
        new: dict[str, object] = {}
        with torch.no_grad():
            if forms & {"gcn_norm", "gcn_csr"}:
                # one gcn_norm serves both forms
                gcn = (graph.gcn_edge_index, graph.gcn_edge_weight) if "gcn_norm" in graph.forms else gcn_norm(
                    ei, None, n, improved=False, add_self_loops=True, flow="source_to_target", dtype=dtype
                )
                if "gcn_norm" in forms:
                    new["gcn_edge_index"], new["gcn_edge_weight"] = gcn
                if "gcn_csr" in forms:
                    new["gcn_adjacency"] = CsrAdjacency.from_edges(*gcn, n, dtype)
            if "mean_csr" in forms:
                in_degree = degree(ei[1], n, dtype=_compute_dtype(dtype))
                new["mean_adjacency"] = CsrAdjacency.from_edges(ei, in_degree.reciprocal()[ei[1]], n, dtype)
            if "self_loops" in forms:
                loops, _ = remove_self_loops(ei)
                looped, _ = add_self_loops(loops, num_nodes=n)
                new["loop_sorted"] = TargetSortedEdges.from_edges(looped, n)
                new["loop_edge_index"] = new["loop_sorted"].edge_index
            if "cheb_norm" in forms:
                new["cheb_edge_index"], new["cheb_edge_weight"] = _cheb_laplacian(ei, n, dtype)
        return replace(graph, **new)


# ---------------------------------------------------------------------------- layers


class PreparedChebConv(ChebConv):
    r"""``ChebConv`` whose scaled Laplacian is computed once by :class:`GraphCache`.

    ``out = sum_{k<K} T_k(L_hat) x W_k + b`` with ``T_0 = I``, ``T_1 = L_hat``,
    ``T_k = 2 L_hat T_{k-1} - T_{k-2}`` and ``L_hat = 2 L_sym / lambda_max - I``, as ``ChebConv``
    with ``normalization="sym"``. ``ChebConv`` recomputes ``L_hat`` in every call; here the
    ``edge_index``/``edge_weight`` passed in must already be ``L_hat`` (the ``cheb_norm`` form),
    and the rest of ``ChebConv.forward`` runs unchanged. Parameters and state dict are
    ``ChebConv``'s.
    """

    def __norm__(
        self, edge_index, num_nodes, edge_weight, normalization, lambda_max=None, dtype=None, batch=None
    ):
        if edge_weight is None:
            raise ValueError("PreparedChebConv takes the cheb_norm graph form; call it through call_conv")
        return edge_index, edge_weight


class CsrPropagation:
    """Mixin for a torch-geometric ``MessagePassing`` layer whose propagation is a product with a
    fixed matrix: called with a :class:`CsrAdjacency` ``A`` in place of ``edge_index``,
    ``propagate`` returns ``A @ x`` (``x[0]`` for a bipartite pair) by :meth:`CsrAdjacency.matmul`;
    the layer's ``forward`` (weights, bias, the rest of its formula) runs unchanged, except
    :class:`CsrGCNConv`'s, which adds its bias inside the product. With an ``edge_index`` it is
    the stock layer. ``graph_form`` names the form the layer takes."""

    graph_form: str

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # torch-geometric replaces a layer's `propagate` with a generated one unless the class
        # itself defines it, so each subclass gets the mixin's in its own namespace.
        cls.propagate = CsrPropagation.propagate

    def propagate(self, edge_index, size=None, **kwargs):
        if not isinstance(edge_index, CsrAdjacency):
            return super().propagate(edge_index, size=size, **kwargs)
        if kwargs.get("edge_weight") is not None:
            raise ValueError(f"{type(self).__name__}: the edge weights belong in the CsrAdjacency")
        x = kwargs["x"]
        return edge_index.matmul(x[0] if isinstance(x, tuple) else x)


class CsrGCNConv(CsrPropagation, GCNConv):
    r"""``GCNConv``: ``out = A_hat (x W) + b``, ``A_hat = D^-1/2 (A + I) D^-1/2`` from the ``gcn_csr`` form.

    With a :class:`CsrAdjacency` the bias is added by the sparse product itself
    (:meth:`CsrAdjacency.matmul`), where ``GCNConv.forward`` adds it in a pass of its own: the
    same formula, one ``[N, C]`` pass and temporary fewer (a gcn stack's step ~9% faster at 5,000
    nodes and hidden 64 on CPU). Both products are one autograd node (:class:`_PropagatedLinear`)
    unless autocast is on or ``lin`` has hooks."""

    graph_form = "gcn_csr"

    def forward(self, x: Tensor, edge_index: Any, edge_weight: Tensor | None = None,
                residual: Tensor | None = None, subtract: bool = False) -> Tensor:
        """``residual + conv(x)`` where ``residual`` is given, ``residual - conv(x)`` with
        ``subtract`` (see :func:`call_conv`)."""
        if not isinstance(edge_index, CsrAdjacency) or self.normalize or isinstance(x, (tuple, list)):
            return _plus(residual, super().forward(x, edge_index, edge_weight), subtract)
        if edge_weight is not None:
            raise ValueError("CsrGCNConv: the edge weights belong in the CsrAdjacency")
        if not _fusable_product(x, edge_index, self.lin) or self.lin.bias is not None:
            return _plus(residual, edge_index.matmul(self.lin(x), bias=self.bias), subtract)
        return _propagated_linear(x, self.lin.weight, None, self.bias, edge_index, residual, self.out_channels,
                                  subtract)


class CsrGCN2Conv(CsrPropagation, GCN2Conv):
    r"""``GCN2Conv`` propagating with ``A_hat`` from the ``gcn_csr`` form (see :func:`make_gcn2`)."""

    graph_form = "gcn_csr"


class CsrAPPNP(CsrPropagation, APPNP):
    r"""``APPNP`` propagating with ``A_hat`` from the ``gcn_csr`` form (see :func:`make_appnp`)."""

    graph_form = "gcn_csr"


class CsrSAGEConv(CsrPropagation, SAGEConv):
    r"""``SAGEConv`` with ``aggr="mean"``: ``out = lin_l(M x) + lin_r(x)``, ``M`` the mean over
    in-neighbours from the ``mean_csr`` form (zero for a node without in-edges, as torch-geometric).

    With a :class:`CsrAdjacency` it computes the same formula in another order,
    ``out = M (x W_l^T) + (x W_r^T + b_l)``: the root term first, then the neighbour term's product
    accumulated into it in place (:meth:`CsrAdjacency.add_matmul_`). Nothing but ``x`` is saved
    for backward (``lin_l``'s input ``M x`` was an ``[N, C]`` tensor a layer), no sum of two
    ``[N, C]`` terms is made, and a layer's forward is ~30% faster (5,000 nodes, hidden 64, CPU).
    The weight gradient ``dL/dW_l = (M^T g)^T x`` equals ``g^T (M x)``. The three products are one
    autograd node (:class:`_PropagatedLinear`) unless autocast is on. ``lin_l``/``lin_r`` are
    read as parameters, so hooks on those submodules do not run on this path."""

    graph_form = "mean_csr"

    def forward(self, x: Any, edge_index: Any, size: Any = None, residual: Tensor | None = None,
                subtract: bool = False) -> Tensor:
        """``residual + conv(x)`` where ``residual`` is given, ``residual - conv(x)`` with
        ``subtract`` (see :func:`call_conv`)."""
        if (not isinstance(edge_index, CsrAdjacency) or isinstance(x, (tuple, list)) or size is not None
                or self.project or self.normalize or not self.root_weight):
            return _plus(residual, super().forward(x, edge_index, size), subtract)
        if not _fusable_product(x, edge_index):
            out = F.linear(x, self.lin_r.weight, self.lin_l.bias)
            return _plus(residual, edge_index.add_matmul_(out, F.linear(x, self.lin_l.weight)), subtract)
        return _propagated_linear(x, self.lin_l.weight, self.lin_r.weight, self.lin_l.bias, edge_index, residual,
                                  self.out_channels, subtract)


class _SortedAggregation(torch.autograd.Function):
    r"""``out[i, h] = sum over the edges e = (j -> i) of alpha[e, h] * x[j, h]`` for edges sorted by
    target (:class:`TargetSortedEdges`): one CSR product per head with ``alpha[:, h]`` as values.
    ``x [N, H, C]``, ``alpha [E, H]``.

    Backward, with ``g = dL/dout``, per head: ``dL/dalpha[e] = g[i] . x[j]`` for ``e = (j -> i)``
    (a sampled dense-dense product on the sparsity of ``A``) and ``dL/dx = A^T g`` (a CSR product
    by the transpose, from the source order kept with the graph). Saves ``alpha`` and ``x`` (``x`` is
    kept by the attention logits anyway), not the ``E x H x C`` messages torch-geometric's message
    passing saves, and makes no ``E x H x C`` temporaries.

    Every product writes into a head-major buffer allocated before the loop over heads, so the
    allocations are the same for any number of heads (the memory calibration needs that), and
    under fake tensors (dry run, calibration) only those buffers are made: what the real path
    allocates.
    """

    @staticmethod
    def forward(ctx, alpha: Tensor, x: Tensor, edges: TargetSortedEdges) -> Tensor:  # type: ignore[override]
        ctx.edges = edges
        ctx.save_for_backward(alpha, x)
        values = _head_major(alpha)
        out = x.new_empty(x.size(1), edges.num_nodes, x.size(2))
        if not isinstance(x, FakeTensor):
            with _quiet_sparse_csr():
                for h in range(x.size(1)):
                    torch.mm(_by_target(edges, values[h], x.size(0)), x[:, h], out=out[h])
        return _swapped_copy(out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        alpha, x = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): the products below record no graph
            return (*_aggregation_backward_recorded(ctx.edges, alpha, x, grad), None)
        edges, heads, real = ctx.edges, x.size(1), not isinstance(x, FakeTensor)
        grad_alpha = grad_x = None
        with _quiet_sparse_csr():
            if ctx.needs_input_grad[0]:
                by_head = alpha.new_zeros(alpha.t().shape)  # zeros: beta = 0 still reads the values
                for h in range(heads if real else 0):
                    sampled = _by_target(edges, by_head[h], x.size(0))
                    torch.sparse.sampled_addmm(sampled, grad[:, h], x[:, h].t(), beta=0.0, out=sampled)
                grad_alpha = by_head.t()
            if ctx.needs_input_grad[1]:
                values = _gather_columns(_head_major(alpha), edges.source_order)
                by_head = x.new_empty(heads, x.size(0), x.size(2))
                for h in range(heads if real else 0):
                    torch.mm(_by_source(edges, values[h], grad.size(0)), grad[:, h], out=by_head[h])
                grad_x = _swapped_copy(by_head)
        return grad_alpha, grad_x, None


def _head_major(alpha: Tensor) -> Tensor:
    """``alpha [E, H]`` as ``[H, E]`` rows; :class:`CsrGATConv` computes it head-major, so this
    is a view (no allocation, for any number of heads)."""
    return alpha.t().contiguous()


class _EdgeSoftmax(torch.autograd.Function):
    r"""``GATConv``'s attention coefficients, head-major ``[H, E]``, from ``alpha_src``,
    ``alpha_dst [N, H]``: for the edge ``e = (j -> i)`` and head ``h``::

        z[h, e]     = alpha_src[j, h] + alpha_dst[i, h]
        l[h, e]     = leaky_relu(z[h, e], slope)
        alpha[h, e] = exp(l[h, e] - s) / sum over the edges e' into i of exp(l[h, e'] - s)

    which is torch-geometric's ``softmax(l, index, ptr)`` (it shifts by the per-node maximum and
    adds ``1e-16`` to the denominator, which is at least 1 there: the two agree to 1e-16 relative).
    The shift is one bound per head, ``s = leaky_relu(max_j alpha_src[j, h] + max_i alpha_dst[i, h])``,
    which no logit exceeds (leaky ReLU is monotone for ``slope >= 0``), instead of a segment
    maximum over the edges. Where a node's denominator comes out below ``sqrt(tiny)`` of the dtype
    (its logits lie so far below the bound that their exponentials would lose precision) the call
    is redone with the per-node maximum. (The memory calibration records the first path and int32
    indices, ``N * H < 2**31``; the redo adds two ``E x H`` temporaries to the forward's peak.)

    Gathers use flat indices into the node-major ``[N, H]`` tensors (a 1-D ``index_select``, 3-4x
    faster on CPU than gathering along the second dimension), built per call, so nothing
    ``E x H``-sized is kept with the graph. Backward, with ``g = dL/dalpha``::

        dl = alpha * (g - segment_sum(alpha * g)[target])
        dz = dl where z > 0, slope * dl elsewhere
        dL/dalpha_dst = segment_sum(dz),  dL/dalpha_src = sum of dz over each source

    It saves ``alpha`` (the aggregation keeps it anyway) and the sign of ``z`` (one byte per edge and
    head), not the logits, exponentials and gathered denominators autograd would keep.
    """

    @staticmethod
    def forward(ctx, alpha_src: Tensor, alpha_dst: Tensor, edges: TargetSortedEdges, slope: float) -> Tensor:  # type: ignore[override]
        alpha_src, alpha_dst = alpha_src.contiguous(), alpha_dst.contiguous()  # no copy from GATConv
        source_index, target_index = _flat_edge_indices(edges, alpha_src.size(1))
        z = _edge_sums(alpha_src, alpha_dst, source_index, target_index)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        positive = z > 0 if needs_grad else None
        alpha = F.leaky_relu_(z, slope)
        del z  # alpha is z (in place): under one name the fallback below frees it
        total = None
        if slope >= 0 and alpha_src.size(0) > 0:  # leaky ReLU is monotone: no logit exceeds the bound
            bound = F.leaky_relu(alpha_src.amax(0) + alpha_dst.amax(0), slope)
            total = _segment_sums(alpha.sub_(bound.unsqueeze(1)).exp_(), edges)
            if not isinstance(total, FakeTensor) and bool((total < _tiny_sqrt(total.dtype)).any()):
                # the fallback holds no more than the path it replaces (which the estimate counts,
                # its calibration never taking this branch): the first try's tensors go first
                total = alpha = None
                alpha = F.leaky_relu_(_edge_sums(alpha_src, alpha_dst, source_index, target_index), slope)
        if total is None:  # shifted by each node's maximum, as torch-geometric's softmax
            peak = torch._segment_reduce(alpha, "amax", offsets=_offsets(edges, alpha.size(0)), axis=1)
            shift = _gather_node_major(_swapped_copy(peak), target_index)
            del peak
            total = _segment_sums(alpha.sub_(shift).exp_(), edges)
            del shift
        alpha.div_(_gather_node_major(_swapped_copy(total), target_index))
        if needs_grad:
            ctx.edges, ctx.slope = edges, slope
            ctx.save_for_backward(alpha, positive)
        return alpha

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        alpha, positive = ctx.saved_tensors
        edges, heads = ctx.edges, alpha.size(0)
        if torch.is_grad_enabled():  # backward(create_graph=True): the formula above in recorded ops
            return (*_edge_softmax_backward_recorded(edges, alpha, positive, ctx.slope, grad), None, None)
        source_index, target_index = _flat_edge_indices(edges, heads)
        dz = alpha * grad.contiguous()
        weighted = _segment_sums(dz, edges)
        dz.addcmul_(alpha, _gather_node_major(_swapped_copy(weighted), target_index), value=-1)
        dz.mul_(torch.where(positive, dz.new_ones(()), dz.new_full((), ctx.slope)))  # leaky ReLU's
        grad_src = grad_dst = None
        if ctx.needs_input_grad[0]:
            num_nodes = edges.num_nodes
            grad_src = dz.new_zeros(num_nodes * heads).index_add_(0, source_index, dz.view(-1))
            grad_src = grad_src.view(num_nodes, heads)
        if ctx.needs_input_grad[1]:
            grad_dst = _swapped_copy(_segment_sums(dz, edges))
        return grad_src, grad_dst, None, None


def _aggregation_backward_recorded(edges: TargetSortedEdges, alpha: Tensor, x: Tensor,
                                   grad: Tensor) -> tuple[Tensor, Tensor]:
    """:class:`_SortedAggregation`'s gradients ``(dL/dalpha, dL/dx)`` in ops autograd records, for a
    backward with ``create_graph=True`` (its CSR products write into ``out=`` buffers, which
    record no graph). A function of its own: new locals in the backward would change the order in
    which its frame releases tensors, which the memory calibration records."""
    source, target = edges.edge_index
    grad_alpha = (grad.index_select(0, target) * x.index_select(0, source)).sum(-1)
    return grad_alpha, torch.zeros_like(x).index_add(0, source, alpha.unsqueeze(-1) * grad.index_select(0, target))


def _edge_softmax_backward_recorded(edges: TargetSortedEdges, alpha: Tensor, positive: Tensor, slope: float,
                                    grad: Tensor) -> tuple[Tensor, Tensor]:
    """:class:`_EdgeSoftmax`'s gradients ``(dL/dalpha_src, dL/dalpha_dst)``, its backward's formula in
    ops autograd records (see :func:`_aggregation_backward_recorded`)."""
    source, target = edges.edge_index
    zeros = alpha.new_zeros(alpha.size(0), edges.num_nodes)
    dz = alpha * grad
    dz = (dz - alpha * zeros.index_add(1, target, dz).index_select(1, target)) \
        * torch.where(positive, 1.0, slope).to(dz.dtype)
    return zeros.index_add(1, source, dz).t(), zeros.index_add(1, target, dz).t()


def _flat_edge_indices(edges: TargetSortedEdges, heads: int) -> tuple[Tensor, Tensor]:
    """``[H * E]`` positions, head-major, of each edge's source and target rows in a flattened
    node-major ``[N, H]`` tensor: ``node[e] * H + h`` (int32 where that fits, halving the bytes)."""
    dtype = _flat_index_dtype(edges.num_nodes * heads)
    column = torch.arange(heads, dtype=dtype, device=edges.ptr.device).unsqueeze(1)
    return tuple(  # type: ignore[return-value]
        (nodes.to(dtype) * heads).unsqueeze(0).add(column).view(-1) for nodes in edges.edge_index
    )


def _flat_index_dtype(numel: int) -> torch.dtype:
    """int32 for flat positions into ``numel`` elements where they fit (half the bytes of int64)."""
    return torch.int32 if numel < 2**31 else torch.long


def _gather_node_major(values: Tensor, index: Tensor) -> Tensor:
    """Contiguous ``values [N, H]`` gathered at flat ``index`` from :func:`_flat_edge_indices`,
    as ``[H, E]``."""
    return values.view(-1).index_select(0, index).view(values.size(1), -1)


def _gather_columns(values: Tensor, index: Tensor) -> Tensor:
    """``values[:, index]`` of a contiguous head-major ``values [H, M]``, through flat positions
    ``h * M + index`` (a 1-D ``index_select``, as :func:`_gather_node_major`, for the same reason)."""
    heads, columns = values.shape
    dtype = _flat_index_dtype(values.numel())
    rows = torch.arange(heads, dtype=dtype, device=index.device).mul_(columns).unsqueeze(1)
    flat = index.to(dtype).unsqueeze(0).add(rows).view(-1)
    return values.view(-1).index_select(0, flat).view(heads, -1)


def _edge_sums(alpha_src: Tensor, alpha_dst: Tensor, source_index: Tensor, target_index: Tensor) -> Tensor:
    """``alpha_src[source] + alpha_dst[target]`` per edge, ``[H, E]``."""
    return _gather_node_major(alpha_src, source_index).add_(_gather_node_major(alpha_dst, target_index))


def _offsets(edges: TargetSortedEdges, heads: int) -> Tensor:
    return edges.ptr.expand(heads, -1)


def _segment_sums(values: Tensor, edges: TargetSortedEdges) -> Tensor:
    """``[H, N]``: the sum of head-major ``values [H, E]`` over the edges into each node.

    In float32/float64, per head the row sums of the CSR matrix with ``values[h]`` on the graph's
    sparsity (a product with a ones vector: 2x faster than ``segment_reduce`` on CPU); other dtypes,
    which the sparse kernels lack, take ``segment_reduce``. Under fake tensors only the two
    allocations of the product path are made."""
    if values.dtype not in (torch.float32, torch.float64):
        return torch.segment_reduce(values, "sum", offsets=_offsets(edges, values.size(0)), axis=1)
    num_nodes = edges.num_nodes
    ones = values.new_ones(num_nodes)
    out = values.new_empty(values.size(0), num_nodes)
    if not isinstance(values, FakeTensor):
        with _quiet_sparse_csr():
            for h in range(values.size(0)):
                torch.mv(_by_target(edges, values[h], num_nodes), ones, out=out[h])
    return out


@functools.lru_cache(maxsize=None)
def _tiny_sqrt(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).tiny)


def _swapped_copy(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` with its first two dimensions swapped (node-major <-> head-major)."""
    # clone, not contiguous(): a copy for one head too, where the swap is already contiguous, so
    # the allocations do not depend on the number of heads (the memory calibration needs that)
    return t.transpose(0, 1).clone(memory_format=torch.contiguous_format)


def _by_target(edges: TargetSortedEdges, values: Tensor, num_sources: int) -> Tensor:
    """The ``N x num_sources`` CSR matrix with ``values`` at ``(target, source)`` of each edge."""
    return torch.sparse_csr_tensor(edges.ptr, edges.source, values,
                                   size=(edges.num_nodes, num_sources))


def _by_source(edges: TargetSortedEdges, values: Tensor, num_targets: int) -> Tensor:
    """The transpose of :func:`_by_target`: ``N x num_targets``, ``values`` (in source order) at
    ``(source, target)`` of each edge."""
    return torch.sparse_csr_tensor(edges.source_ptr, edges.target_by_source, values,
                                   size=(edges.source_ptr.numel() - 1, num_targets))


class CsrGATConv(GATConv):
    r"""``GATConv`` (``concat=True``) that, called with a :class:`TargetSortedEdges` graph, computes
    the attention softmax as segment reductions over the row pointer and the aggregation as CSR
    products, without ``E x heads x C`` message tensors.

    The formula is torch-geometric's: ``e_ij = leaky_relu(a_src . W x_j + a_dst . W x_i)``,
    ``alpha_ij = softmax over the edges into i``, attention dropout, ``out_i = sum_j alpha_ij W x_j + b``
    per head. Weights, bias and state dict are ``GATConv``'s, and so is ``forward`` but for the two
    attention scores, computed by one product (:meth:`forward`); the edge
    update is ``GATConv.edge_update``'s formula (leaky ReLU, torch-geometric's segment softmax over
    the row pointer, attention dropout drawn edge-major as the stock layer draws it) computed
    head-major, ``[H, E]``, which is the layout the aggregation, :class:`_SortedAggregation`, takes
    its CSR values in (the ``E x heads x C`` messages are never made).
    With a plain ``edge_index``, edge features or half-precision features (torch's CPU CSR product
    has no half kernels) it is the stock layer.
    """

    graph_form = "self_loops"

    def forward(self, x, edge_index, edge_attr=None, size=None, return_attention_weights=None, residual=None):
        r"""``GATConv.forward`` (``residual + GATConv.forward`` where ``residual`` is given, see
        :func:`call_conv`); on the sorted path (a tensor ``x`` in float32/float64 outside
        autocast, one shared projection, no residual projection, edge features or attention
        weights returned) both attention scores come from one product ``[a_src | a_dst] = (W x) M``
        with ``M [H C, 2 H]`` block-diagonal in ``att_src``/``att_dst`` (:func:`_score_matrix`), the
        value of ``((W x).view(N, H, C) * att).sum(-1)``: one GEMM and, in backward, two, instead
        of two broadcast products and sums, and their ``[N, H, C]`` temporaries in each direction;
        the bias and ``residual`` are added in place to the aggregation's output, which no backward
        keeps (the same values as the sums: IEEE addition commutes), not into fresh tensors."""
        # getattr: `res` (a residual projection) is newer than some torch-geometric releases we accept
        plain_layer = getattr(self, "lin", None) is not None and getattr(self, "res", None) is None
        if not (isinstance(x, Tensor) and plain_layer and return_attention_weights is None
                and not torch.is_autocast_enabled(x.device.type) and self._sorted(edge_index, x, edge_attr)):
            return _plus(residual, super().forward(x, edge_index, edge_attr=edge_attr, size=size,
                                                   return_attention_weights=return_attention_weights))
        heads, channels = self.heads, self.out_channels
        projected = self.lin(x)
        scores = projected @ _score_matrix(self.att_src, self.att_dst)
        alpha = self.edge_updater(edge_index, alpha=(scores[:, :heads], scores[:, heads:]), size=size)
        nodes = projected.view(-1, heads, channels)
        out = self.propagate(edge_index, x=(nodes, nodes), alpha=alpha, size=size)
        if not self.concat:
            out = out.mean(dim=1)
            return _plus(residual, out if self.bias is None else out.add_(self.bias))
        # in place on the [N, H, C] output itself: on its [N, H C] view autograd would rewrite
        # the graph to copy slices (a gradient clone more in backward)
        if self.bias is not None:
            out.add_(self.bias.view(heads, channels))
        if _fusable_residual(residual, x, heads * channels):  # a strided group of a rev stack too
            out.add_(residual.unflatten(-1, (heads, channels)))
            residual = None
        return _plus(residual, out.view(-1, heads * channels))

    @staticmethod
    def _sorted(edge_index: object, like: Tensor, edge_attr: object = None) -> bool:
        return (
            isinstance(edge_index, TargetSortedEdges)
            and edge_attr is None
            and like.dtype in (torch.float32, torch.float64)
        )

    def edge_updater(self, edge_index, alpha, edge_attr=None, size=None):
        alpha_src, alpha_dst = alpha
        if not (self._sorted(edge_index, alpha_src, edge_attr) and alpha_dst is not None):
            if isinstance(edge_index, TargetSortedEdges):
                edge_index = edge_index.edge_index
            return super().edge_updater(edge_index, alpha=alpha, edge_attr=edge_attr, size=size)
        alpha = _EdgeSoftmax.apply(alpha_src, alpha_dst, edge_index, self.negative_slope)
        if self.training and self.dropout > 0:
            # drawn edge-major, as the stock layer draws its mask
            dropped = F.dropout(alpha.t().contiguous(), p=self.dropout, training=True)
            alpha = dropped.t().contiguous()
        return alpha.t()

    def propagate(self, edge_index, size=None, **kwargs):
        x_src, alpha = kwargs["x"][0], kwargs["alpha"]
        if not self._sorted(edge_index, x_src):
            if isinstance(edge_index, TargetSortedEdges):
                edge_index = edge_index.edge_index
            return super().propagate(edge_index, size=size, **kwargs)
        with torch.autocast(x_src.device.type, enabled=False):
            return _SortedAggregation.apply(alpha, x_src, edge_index)


def _score_matrix(att_src: Tensor, att_dst: Tensor) -> Tensor:
    """``M [H C, 2 H]`` with ``M[h C + c, h] = att_src[0, h, c]``, ``M[h C + c, H + h] =
    att_dst[0, h, c]`` and zeros elsewhere, so that ``(W x) M`` holds both heads' scores."""
    _, heads, channels = att_src.shape
    # diag_embed, not a product with an identity: its backward takes a diagonal, while a
    # broadcast product's reduces (or, at one head, does not): allocations the same for any H
    both = torch.stack([att_src[0].t(), att_dst[0].t()], dim=1)  # [C, 2, H]
    return torch.diag_embed(both, dim1=0, dim2=3).view(heads * channels, 2 * heads)


def _call_gat(conv: nn.Module, x: Tensor, graph: PreparedGraph, residual: Tensor | None = None) -> Tensor:
    (edge_index,) = graph.tensors("self_loops")
    if isinstance(conv, CsrGATConv):
        return conv(x, graph.loop_sorted, residual=residual)
    return _plus(residual, conv(x, edge_index))


# Built-in factories: `make(channels, *, in_channels, **args)`, a conv [N, in_channels] -> [N, channels].


def _make_gcn(channels: int, *, in_channels: int) -> nn.Module:
    return CsrGCNConv(in_channels, channels, normalize=False, cached=False)


def _make_sage(channels: int, aggr: str, *, in_channels: int) -> nn.Module:
    if aggr == "mean":
        return CsrSAGEConv(in_channels, channels, aggr=aggr)
    return SAGEConv(in_channels, channels, aggr=aggr)


def _sage_form(aggr: str, **_: object) -> str:
    return "mean_csr" if aggr == "mean" else "raw"


def _make_gat(channels: int, heads: int, *, in_channels: int) -> nn.Module:
    return CsrGATConv(in_channels, channels // heads, heads=heads, concat=True, add_self_loops=False)


def _make_gatv2(channels: int, heads: int, *, in_channels: int) -> nn.Module:
    return GATv2Conv(in_channels, channels // heads, heads=heads, concat=True, add_self_loops=False)


def _make_gen(channels: int, aggr: str, t: float, learn_t: bool, *, in_channels: int) -> nn.Module:
    # `t`/`learn_t` parameterise only the softmax aggregation; GENConv ignores them otherwise.
    return GENConv(in_channels, channels, aggr=aggr, t=t, learn_t=learn_t)


def _make_gin(channels: int, *, in_channels: int) -> nn.Module:
    mlp = nn.Sequential(nn.Linear(in_channels, channels), nn.ReLU(), nn.Linear(channels, channels))
    return GINConv(mlp)


def _make_graphconv(channels: int, *, in_channels: int) -> nn.Module:
    return GraphConv(in_channels, channels)


def _make_transformer(channels: int, heads: int, *, in_channels: int) -> nn.Module:
    return TransformerConv(in_channels, channels // heads, heads=heads, concat=True)


def _make_egc(channels: int, heads: int, bases: int, *, in_channels: int) -> nn.Module:
    return EGConv(
        in_channels, channels, aggregators=["symnorm"], num_heads=heads, num_bases=bases, cached=False
    )


def _make_cheb(channels: int, k: int, *, in_channels: int) -> nn.Module:
    return PreparedChebConv(in_channels, channels, K=k, normalization="sym")


def make_gcn2(
    channels: int, alpha: float, theta: float, layer: int, shared_weights: bool = True
) -> nn.Module:
    r"""``GCN2Conv`` for the ``gcnii`` stage (layer ``layer``, 1-based), taking the ``gcn_csr`` form.

    ``out = ((1 - alpha) A_hat x + alpha x_0) ((1 - beta) I + beta W)`` with
    ``beta = log(theta / layer + 1)`` and ``A_hat = D^-1/2 (A + I) D^-1/2``. Call it as
    ``call_conv(conv, "gcn2", x, graph, x_0=x_0)``.
    """
    return CsrGCN2Conv(
        channels, alpha, theta=theta, layer=layer, shared_weights=shared_weights,
        cached=False, add_self_loops=False, normalize=False,
    )


def make_appnp(k: int, alpha: float) -> nn.Module:
    r"""``APPNP``: ``x^0 = x``, ``x^{t+1} = (1 - alpha) A_hat x^t + alpha x``, ``k`` steps; no weights.

    ``A_hat = D^-1/2 (A + I) D^-1/2`` comes from the ``gcn_csr`` form; call it as
    ``call_conv(conv, "appnp", x, graph)``.
    """
    return CsrAPPNP(K=k, alpha=alpha, cached=False, add_self_loops=False, normalize=False)


def make_sgc(k: int) -> nn.Module:
    r"""SGC's propagation without its linear layer: ``A_hat^k x``, ``A_hat = D^-1/2 (A + I) D^-1/2``.

    This is ``APPNP`` with ``alpha = 0``: its recurrence ``x^{t+1} = (1 - alpha) A_hat x^t +
    alpha x`` becomes ``x^{t+1} = A_hat x^t``. It equals ``SGConv``'s propagation (``SGConv`` with an
    identity weight and no bias) and ``k`` dense products with ``A_hat``; ``tests/test_ops.py``
    checks both. Call it as ``call_conv(conv, "sgc", x, graph)``.
    """
    return CsrAPPNP(K=k, alpha=0.0, cached=False, add_self_loops=False, normalize=False)


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class OpImpl:
    """How an op is built and called.

    ``make(channels, **args)`` returns a convolution mapping ``[N, channels] -> [N, channels]``
    (built-in ops, and user factories that accept it, also take ``in_channels=`` for
    ``[N, in_channels] -> [N, channels]``); ``graph`` names the prepared form it takes
    (:data:`GRAPH_FORMS`), and ``graph_of(**args)``, when given, the form for those arguments
    (``sage``: ``mean_csr`` for ``aggr=mean``, else ``raw``); a convolution that is a
    :class:`CsrPropagation` takes its own ``graph_form``. ``call(conv, x, graph)``, when given,
    replaces the calling convention of the form, ``conv(x, *graph.tensors(form))``.
    """

    name: str
    make: Callable[..., nn.Module]
    graph: str = "raw"
    call: Callable[[nn.Module, Tensor, PreparedGraph], Tensor] | None = field(default=None, compare=False)
    graph_of: Callable[..., str] | None = field(default=None, compare=False)


def _call_egc(conv: nn.Module, x: Tensor, graph: PreparedGraph) -> Tensor:
    # EGConv's forward takes no edge weight: it uses the normalisation held in its cache slot when
    # that slot is filled. The slot is emptied afterwards so the module holds no graph between
    # calls and a direct call computes gcn_norm as usual.
    edge_index, edge_weight = graph.tensors("gcn_norm")
    conv._cached_edge_index = (edge_index, edge_weight)
    try:
        return conv(x, edge_index)
    finally:
        conv._cached_edge_index = None


_IMPLS: dict[str, OpImpl] = {
    impl.name: impl
    for impl in (
        OpImpl("gcn", _make_gcn, "gcn_csr"),
        OpImpl("sage", _make_sage, "raw", graph_of=_sage_form),
        OpImpl("gat", _make_gat, "self_loops", call=_call_gat),
        OpImpl("gatv2", _make_gatv2, "self_loops"),
        OpImpl("gen", _make_gen, "raw"),
        OpImpl("gin", _make_gin, "raw"),
        OpImpl("graphconv", _make_graphconv, "raw"),
        OpImpl("transformer", _make_transformer, "raw"),
        OpImpl("egc", _make_egc, "gcn_norm", call=_call_egc),
        OpImpl("cheb", _make_cheb, "cheb_norm"),
    )
}
_BUILTIN_OPS = frozenset(_IMPLS)

# Convolutions of the appnp, sgc and gcnii stages: not ops a spec can name, but called the same way.
_STAGE_CONVS: dict[str, str] = {"gcn2": "gcn_csr", "appnp": "gcn_csr", "sgc": "gcn_csr"}


def op_impl(name: str) -> OpImpl:
    """The registered implementation of op ``name`` (built-in or from :func:`register_op`)."""
    try:
        return _IMPLS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known: {', '.join(sorted(_IMPLS))}") from None


def graph_form(op: str | Op) -> str:
    """The graph form that ``op`` (an :class:`~gnnspec.ir.Op`, or an op name with its default
    arguments) or a stage convolution (``gcn2``, ``appnp``, ``sgc``) takes."""
    name = op if isinstance(op, str) else op.name
    if name in _STAGE_CONVS:
        return _STAGE_CONVS[name]
    impl = op_impl(name)
    if impl.graph_of is None:
        return impl.graph
    return impl.graph_of(**_op_args(Op(name=name) if isinstance(op, str) else op))


def _op_args(op: Op) -> dict[str, object]:
    """Every argument of ``op``'s signature: the given ones, the others at their defaults."""
    sig = OP_SIGNATURES.get(op.name)
    if sig is None:
        raise KeyError(f"op {op.name!r} has an implementation but no signature")
    given = dict(op.args)
    unknown = [k for k in given if sig.param(k) is None]
    if unknown:
        known = ", ".join(p.name for p in sig.params) or "none"
        raise ValueError(f"op {op.name!r} has no argument {unknown[0]!r} (arguments: {known})")
    return {p.name: given.get(p.name, p.default) for p in sig.params}


def make_conv(op: Op, channels: int, *, in_channels: int | None = None) -> nn.Module:
    """The convolution of ``op`` from width ``in_channels`` (default ``channels``) to ``channels``.

    Weights are float32. ``op.args`` must be arguments of the op's signature (missing ones take
    their defaults); an op with heads needs ``channels % heads == 0``. A user op can change the
    width (``dense`` stacks) only if its factory takes an ``in_channels`` keyword. Call the result
    through :func:`call_conv`.
    """
    impl = op_impl(op.name)
    args = _op_args(op)
    sig = OP_SIGNATURES[op.name]
    if sig.heads is not None:
        heads = int(args[sig.heads])
        if heads < 1 or channels % heads:
            raise ValueError(f"{heads} heads of op {op.name!r} do not divide the width {channels}")
    in_channels = channels if in_channels is None else in_channels
    if op.name in _BUILTIN_OPS:
        return impl.make(channels, in_channels=in_channels, **args)
    if in_channels == channels:
        return impl.make(channels, **args)
    if not _takes_keyword(impl.make, "in_channels"):
        raise ValueError(
            f"op {op.name!r} cannot map width {in_channels} to {channels}: its factory takes no "
            "`in_channels` keyword"
        )
    return impl.make(channels, in_channels=in_channels, **args)


def _takes_keyword(factory: Callable[..., object], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def subtracts_in_product(conv: nn.Module, x: Tensor) -> bool:
    """Whether ``call_conv(conv, ..., x, residual=r, subtract=True)`` computes ``r - conv(x)``
    inside the convolution's products (:class:`_PropagatedLinear`), not as a difference of its
    output: the CSR gcn and sage layers on float32/float64 features outside autocast, no forward
    hook on the layer (:func:`subtracting_op` is the same rule for the estimator)."""
    return (isinstance(conv, _RESIDUAL_IN_PRODUCT) and x.dtype in _FULL_PRECISION
            and not torch.is_autocast_enabled(x.device.type) and not has_forward_hooks(conv))


def subtracting_op(op: Op, value_bytes: int) -> bool:
    """:func:`subtracts_in_product` for the layer ``make_conv(op)`` builds, on features of
    ``value_bytes`` bytes each: a built-in op whose layer propagates by a CSR form (gcn; sage with
    ``aggr=mean``) in float32/float64. In half precision the sparse product runs in float32 and
    the difference is taken after it."""
    return value_bytes >= 4 and op.name in _BUILTIN_OPS and graph_form(op) in _SUBTRACTING_FORMS


def call_conv(
    conv: nn.Module, op_name: str, x: Tensor, graph: PreparedGraph, *, x_0: Tensor | None = None,
    residual: Tensor | None = None, subtract: bool = False,
) -> Tensor:
    """``conv`` (built for ``op_name``) applied to ``x [N, c]`` on ``graph``; returns ``[N, c]``.

    ``graph`` must hold the form ``conv`` takes (:func:`graph_form` of the op it was built for).
    ``x_0`` is the initial representation that ``gcn2`` (GCNII) needs, and only it. With
    ``residual``, returns ``residual + conv(x)`` (a ``res+`` layer, a ``rev`` group's
    ``x_i + f_i``): the CSR gcn and sage layers add it inside their product
    (:class:`_PropagatedLinear`, one ``[N, c]`` pass and tensor fewer), gat into its aggregation's
    output, unless a forward hook on ``conv`` must see the convolution's own output. With
    ``subtract`` as well, returns ``residual - conv(x)`` (the reversible stack's reconstruction),
    inside the product where :func:`subtracts_in_product`, else as a difference after it.
    """
    if subtract:
        if not isinstance(residual, Tensor):
            raise ValueError("subtract needs the residual to subtract from")
        if subtracts_in_product(conv, x):
            return conv(x, *graph.tensors(conv.graph_form), residual=residual, subtract=True)
        return residual - call_conv(conv, op_name, x, graph, x_0=x_0)
    if residual is not None:
        if isinstance(conv, _RESIDUAL_IN_PRODUCT) and not has_forward_hooks(conv):
            return conv(x, *graph.tensors(conv.graph_form), residual=residual)
        if isinstance(conv, CsrGATConv) and not has_forward_hooks(conv):
            return _call_gat(conv, x, graph, residual=residual)
        return residual + call_conv(conv, op_name, x, graph, x_0=x_0)
    if isinstance(conv, CsrPropagation):
        form = conv.graph_form
    else:
        form = _STAGE_CONVS.get(op_name) or op_impl(op_name).graph
    if op_name == "gcn2":
        if x_0 is None:
            raise ValueError("gcn2 needs x_0, the gcnii stage's input")
        return conv(x, x_0, *graph.tensors(form))
    if x_0 is not None:
        raise ValueError(f"x_0 is only for gcn2, not {op_name!r}")
    if op_name in _STAGE_CONVS:
        return conv(x, *graph.tensors(form))
    impl = op_impl(op_name)
    if impl.call is not None:
        return impl.call(conv, x, graph)
    return conv(x, *graph.tensors(form))


# the layers that take a residual into their products (call_conv), added or subtracted
_RESIDUAL_IN_PRODUCT = (CsrGCNConv, CsrSAGEConv)
_SUBTRACTING_FORMS = frozenset(conv.graph_form for conv in _RESIDUAL_IN_PRODUCT)
_FULL_PRECISION = (torch.float32, torch.float64)

# Keywords the lowering passes to a factory itself: ``factory(channels, in_channels=w, **args)``.
_FACTORY_KEYWORDS = frozenset({"channels", "in_channels"})


def _check_spec_name(what: str, name: str) -> None:
    if not ir.SPEC_NAME.match(name) or name in ir.SPEC_WORDS:
        raise ValueError(
            f"{what} {name!r} must be a name a spec can write: ASCII letters, digits and '_', not "
            f"starting with a digit, and not one of {', '.join(sorted(ir.SPEC_WORDS))}"
        )


def _infer_param(name: str, value: object) -> OpParam:
    if not isinstance(name, str):
        raise TypeError(f"a parameter name is a str, got {type(name).__name__}")
    _check_spec_name("parameter name", name)
    if name in _FACTORY_KEYWORDS:
        raise ValueError(f"parameter name {name!r} is reserved: the factory receives it from the model's widths")
    if isinstance(value, OpParam):
        if value.name != name:
            raise ValueError(f"parameter {name!r} is given an OpParam named {value.name!r}")
        return _checked_default(value)
    if isinstance(value, bool):
        return OpParam(name, "bool", value)
    if isinstance(value, int):
        return OpParam(name, "int", value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"default of parameter {name!r} must be finite, got {value}")
        return OpParam(name, "float", value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
        return OpParam(name, "enum", value[0], tuple(value))
    raise TypeError(
        f"default of parameter {name!r} must be a bool, int, float, a non-empty tuple of strings "
        f"(an enumeration, the first its default) or an OpParam; got {value!r}"
    )


def _checked_default(param: OpParam) -> OpParam:
    """``param`` if a spec that omits it is valid: its default within its minimum and choices."""
    if param.minimum is not None and param.type in ("int", "float") and param.default < param.minimum:
        raise ValueError(f"default {param.default!r} of parameter {param.name!r} is below its minimum {param.minimum!r}")
    if param.type == "enum" and param.default not in param.choices:
        raise ValueError(f"default {param.default!r} of parameter {param.name!r} is not one of {list(param.choices)}")
    return param


def _check_factory_takes(name: str, factory: Callable[..., nn.Module], params: Iterable[OpParam]) -> None:
    """A ValueError naming the op when ``factory(channels, **defaults)`` cannot bind (a factory
    whose signature Python cannot read is taken on trust)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(1, **{p.name: p.default for p in params})
    except TypeError as err:
        call = ", ".join(["channels", *(f"{p.name}=..." for p in params)])
        raise ValueError(f"factory of op {name!r} cannot be called as factory({call}): {err}") from None


def register_op(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    params: dict[str, object] | None = None,
    heads: str | None = None,
    graph: str = "raw",
) -> None:
    """Make ``name`` an op that specs can name: ``op=name(arg=value, ...)``.

    ``factory(channels, **args)`` must return a module mapping ``[N, channels] -> [N, channels]``
    (``factory(channels, in_channels=w, **args)``: ``[N, w] -> [N, channels]``, if it takes that
    keyword; ``dense`` stacks need it),
    called as ``conv(x, edge_index)`` for ``graph="raw"`` (or per :data:`GRAPH_FORMS` for another
    form). ``params`` maps each argument to its default, whose type sets the argument's type:
    ``bool``, ``int``, ``float``, or a tuple of strings for an enumeration (first is the default);
    an :class:`~gnnspec.ir.OpParam` gives full control. ``heads`` names the int argument that splits
    the width, so specs are checked for ``hidden % heads == 0``. Registering a user op's name again
    replaces it; built-in names cannot be replaced.
    """
    if not isinstance(name, str):
        raise TypeError(f"an op name is a str, got {type(name).__name__}")
    if name in _BUILTIN_OPS or name in _STAGE_CONVS:
        raise ValueError(f"{name!r} is a built-in op or convolution and cannot be replaced")
    _check_spec_name("op name", name)
    if not callable(factory):
        raise TypeError(f"factory for op {name!r} is not callable")
    if graph not in GRAPH_FORMS:
        raise ValueError(f"unknown graph form {graph!r}; known: {', '.join(GRAPH_FORMS)}")
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params of op {name!r} maps each argument's name to its default (a dict), "
                        f"got {type(params).__name__}")
    op_params = tuple(_infer_param(k, v) for k, v in (params or {}).items())
    _check_factory_takes(name, factory, op_params)
    signature = OpSignature(name, op_params, heads=heads, builtin=False)
    if heads is not None:
        head_param = signature.param(heads)
        if head_param is None or head_param.type != "int":
            raise ValueError(f"heads={heads!r} must name an int parameter of op {name!r}")
        if head_param.minimum is None:
            op_params = tuple(_checked_default(replace(p, minimum=1)) if p.name == heads else p for p in op_params)
            signature = OpSignature(name, op_params, heads=heads, builtin=False)
    register_op_signature(signature)
    _IMPLS[name] = OpImpl(name, factory, graph)
