"""The single operations a stage is made of: normalisation, activation, one layer of each stack.

Each stack layer is an ``nn.Module`` whose ``forward`` is the formula of SPEC.md section 2 for its
stack kind; the stack modules (:mod:`gnnspec.lower.stages`) only sequence them under a plan.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn.norm import BatchNorm, GraphNorm, InstanceNorm

from gnnspec import ir
from gnnspec.lower.dropout_tape import dropout, dropout_noise, noise_scale
from gnnspec.lower.recompute import SharedDropout
from gnnspec.ops import (
    PreparedGraph, call_conv, gradients_used, has_forward_hooks, make_conv, make_gcn2, mark_tensor_inputs,
    subtracts_in_product,
)


class NodeNorm(nn.Module):
    """A normalisation called as ``norm(x)`` on ``[N, C]`` node features.

    ``batch``: BatchNorm over nodes; ``layer``: LayerNorm per node (as DeeperGCN and RevGNN use
    ``torch.nn.LayerNorm``); ``graph``: GraphNorm; ``instance``: InstanceNorm over the graph.
    """

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "batch":
            self.norm = BatchNorm(channels)
        elif kind == "layer":
            self.norm = nn.LayerNorm(channels, elementwise_affine=True)
        elif kind == "graph":
            self.norm = GraphNorm(channels)
        elif kind == "instance":
            self.norm = InstanceNorm(channels, affine=True)
        else:
            raise ValueError(f"unknown norm {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


def make_norm(kind: str, channels: int) -> nn.Module:
    return nn.Identity() if kind == "none" else NodeNorm(kind, channels)


_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "tanh": nn.Tanh,
    "none": nn.Identity,
}


def make_act(kind: str) -> nn.Module:
    return _ACTIVATIONS[kind]()


class _ReluOfDropped(torch.autograd.Function):
    """``y = relu(z * noise)`` in place on ``z``, for a dropout noise of zeros and ``scale``.

    Saves ``y`` alone, not the noise: ``y > 0`` exactly where ``noise = scale`` and ``z > 0``, so
    ``dL/dz = dL/dy * scale`` there and 0 elsewhere, the values ``F.dropout`` then ``relu`` give
    (up to the sign of zeros). ``scale`` is a 0-dim tensor of ``z``'s dtype holding the noise's
    nonzero value, so the product rounds as ``dL/dy * noise`` does."""

    @staticmethod
    def forward(ctx, z: Tensor, noise: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        z.mul_(noise).relu_()
        ctx.mark_dirty(z)
        ctx.save_for_backward(z, scale)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, scale = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0).mul_(scale), None, None


def relu_of_dropout(z: Tensor, p: float, training: bool) -> Tensor:
    """``relu(dropout(z, p))`` in place on ``z``, which must be a fresh tensor no backward keeps (a
    layer/batch norm's output, :func:`gnnspec.ir.drop_in_place`). The same draws as ``F.dropout``
    (recorded on and replayed from a checkpoint's tape), and ``relu(y) * m == relu(y * m)`` for a
    mask ``m >= 0``, so this is ``dropout(relu(z))`` bit for bit. It keeps one tensor for the
    backward, ``y``, which the next layer's product keeps anyway, where ``dropout(relu(z))`` keeps
    three (relu's output, the noise, the product)."""
    if not training or p == 0.0:
        return z.relu_()
    return relu_of_masked(z, dropout_noise(z, p), p)


def relu_of_masked(z: Tensor, noise: Tensor, p: float) -> Tensor:
    """``relu(z) * noise`` as ``relu(z * noise)`` in place on ``z`` (a fresh tensor no backward
    keeps), for a given dropout noise of zeros and ``1 / (1 - p)`` (a draw of ``dropout_noise``,
    or the stage's shared mask of ``rev``/``deq``), keeping only the result for the backward."""
    return _ReluOfDropped.apply(z, noise, _noise_scale(z, p))


def _noise_scale(like: Tensor, p: float) -> Tensor:
    return noise_scale(like.dtype, like.device, 1.0 - p)


class _LayerNormReluOfDropped(torch.autograd.Function):
    """``y = relu(layer_norm(x; w, b, eps) * noise)``, ``noise`` of zeros and ``scale``: a
    ``LayerNorm`` and :class:`_ReluOfDropped` as one autograd node, with the same kernels
    (``native_layer_norm`` and its backward) and so the same values and gradients bit for bit.

    Saves ``x``, the row statistics and ``y``, the tensors the two nodes save; ``w``, ``b`` and
    ``scale`` are held on the node instead of saved (parameters, alive anyway), so a checkpoint's
    hooks pack and unpack four tensors where the two nodes had seven, and the backward runs one
    node instead of two."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, noise: Tensor,  # type: ignore[override]
                scale: Tensor, eps: float) -> Tensor:
        y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        y.mul_(noise).relu_()
        ctx.save_for_backward(x, mean, rstd, y)
        ctx.weight, ctx.bias, ctx.scale = weight, bias, scale
        mark_tensor_inputs(ctx, x, weight, bias, noise, scale, eps)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, mean, rstd, y = ctx.saved_tensors
        grad_z = torch.ops.aten.threshold_backward(grad, y, 0).mul_(ctx.scale)
        needs = gradients_used(ctx)
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_z, x, [x.shape[-1]], mean, rstd, ctx.weight, ctx.bias, [needs[0], needs[1], needs[2]])
        return grad_x, grad_w, grad_b, None, None, None


def _fusable_layer_norm(norm: nn.Module, x: Tensor) -> nn.LayerNorm | None:
    """``norm``'s ``LayerNorm`` where :class:`_LayerNormReluOfDropped` computes ``norm(x)`` and what
    follows as the module would: no hooks to call on the modules, no autocast (whose casts the
    node does not make), a contiguous ``x`` over one normalised dimension."""
    if not (isinstance(norm, NodeNorm) and norm.kind == "layer") or torch.is_autocast_enabled(x.device.type):
        return None
    ln = norm.norm
    if has_forward_hooks(norm, ln) or not x.is_contiguous() or len(ln.normalized_shape) != 1:
        return None
    return ln


def norm_relu_of_masked(norm: nn.Module, x: Tensor, noise: Tensor, p: float) -> Tensor:
    """``relu_of_masked(norm(x), noise, p)``; for a layer norm as one autograd node
    (:class:`_LayerNormReluOfDropped`), the same values and gradients."""
    ln = _fusable_layer_norm(norm, x)
    if ln is None:
        return relu_of_masked(norm(x), noise, p)
    return _layer_norm_relu_of_masked(ln, x, noise, p)


def norm_relu_of_dropout(norm: nn.Module, x: Tensor, p: float, training: bool) -> Tensor:
    """``relu_of_dropout(norm(x), p, training)``: the same draws (from the tape where one records or
    replays), and for a layer norm in training one autograd node (:func:`norm_relu_of_masked`)."""
    ln = _fusable_layer_norm(norm, x) if training and p > 0.0 else None
    if ln is None:
        return relu_of_dropout(norm(x), p, training)
    return _layer_norm_relu_of_masked(ln, x, dropout_noise(x, p), p)


def _layer_norm_relu_of_masked(ln: nn.LayerNorm, x: Tensor, noise: Tensor, p: float) -> Tensor:
    return _LayerNormReluOfDropped.apply(x, ln.weight, ln.bias, noise, _noise_scale(x, p), ln.eps)


class ConvLayer(nn.Module):
    """One layer of a stack: its convolution, normalisation and activation; ``dropout`` probability.

    ``kind`` picks the formula (``conv``, ``norm``, ``act``, ``drop`` as named in SPEC.md):

    * ``plain``: ``drop(act(norm(conv(x))))``
    * ``res``:   ``drop(act(norm(conv(x)))) + x``
    * ``res+``:  ``x + conv(drop(act(norm(x))))``
    * ``dense``: ``cat(x, drop(act(norm(conv(x)))))``
    * ``gcnii``: ``drop(act(norm(gcn2(x, x0))))`` with GCNII's initial residual and identity map
    * ``rev``:   ``conv(mask_i * act(norm(x)))``, group function ``f_i``; ``mask_i`` is group ``i``'s
      slice of the stage's ``[N, hidden]`` mask, shared by every layer (RevGNN's shared dropout, see
      :class:`gnnspec.lower.recompute.SharedDropout`); ``residual + f_i`` or ``residual - f_i``
      where given (:attr:`adds_residual`)
    * ``deq``:   ``conv(mask * act(norm(z)))``, one application inside ``f(z, x)``
    """

    def __init__(
        self, kind: str, stage: ir.Stack, channels: int, in_channels: int | None = None, layer: int = 1, group: int = 0
    ):
        super().__init__()
        self.kind = kind
        self.group = group
        self.op_name = "gcn2" if kind == "gcnii" else stage.op.name
        self.dropout = stage.dropout
        pre = kind in ("res+", "rev", "deq")
        norm_width = (in_channels or channels) if pre else channels
        self.norm = make_norm(stage.norm, norm_width)
        self.act = make_act(stage.act)
        if ir.act_in_place(stage.norm, stage.act):
            self.act.inplace = True  # on the norm's fresh output, which its backward does not keep
        self.fused_relu_dropout = ir.drop_in_place(kind, stage.norm, stage.act, stage.dropout)
        if kind == "gcnii":
            self.theta = stage.theta
            self.conv = make_gcn2(channels, stage.alpha, stage.theta, layer)
        else:
            self.conv = make_conv(stage.op, channels, in_channels=in_channels)

    def _conv(self, x: Tensor, graph: PreparedGraph, x0: Tensor | None = None, residual: Tensor | None = None,
              subtract: bool = False) -> Tensor:
        return call_conv(self.conv, self.op_name, x, graph, x_0=x0, residual=residual, subtract=subtract)

    @property
    def adds_residual(self) -> bool:
        """Whether ``forward(x, graph, mask, residual=r)`` returns ``r + f(x)`` (and with
        ``subtract=True`` ``r - f(x)``), the skip term added inside the convolution
        (:func:`gnnspec.ops.call_conv`): a ``rev`` group function, for
        :class:`~gnnspec.lower.reversible.ReversibleStack`."""
        return self.kind == "rev"

    def subtracts_residual(self, x: Tensor) -> bool:
        """Whether ``forward(x, ..., residual=r, subtract=True)`` computes ``r - f(x)`` inside the
        convolution's products (:func:`gnnspec.ops.subtracts_in_product`; the norm and activation
        before it keep ``x``'s dtype), not as a difference after it."""
        return self.kind == "rev" and subtracts_in_product(self.conv, x)

    def _drop(self, x: Tensor) -> Tensor:
        return dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def _norm_hooked(self) -> bool:
        """Whether a forward hook may hold the norm's output (then nothing writes into it)."""
        return has_forward_hooks(self.norm, getattr(self.norm, "norm", self.norm))

    def _fuses_relu(self) -> bool:
        """Whether the relu and dropout run fused (:func:`gnnspec.ir.drop_in_place`): not where a
        forward hook on ``act`` must see the relu module called, or one on the norm its output."""
        return self.fused_relu_dropout and not has_forward_hooks(self.act) and not self._norm_hooked()

    def _act(self, y: Tensor) -> Tensor:
        """``act(y)`` on the norm's output ``y``: in place where :func:`gnnspec.ir.act_in_place`
        allows, except where a hook on the norm may hold ``y``."""
        if getattr(self.act, "inplace", False) and self._norm_hooked():
            self.act.inplace = False
            try:
                return self.act(y)
            finally:
                self.act.inplace = True
        return self.act(y)

    def _norm_act_drop(self, x: Tensor) -> Tensor:
        """``drop(act(norm(x)))``; by :func:`relu_of_dropout` in place on the norm's output where
        :meth:`_fuses_relu`."""
        if self._fuses_relu():
            return norm_relu_of_dropout(self.norm, x, self.dropout, self.training)
        return self._drop(self._act(self.norm(x)))

    def forward(self, x: Tensor, graph: PreparedGraph, extra: Tensor | None = None, residual: Tensor | None = None,
                subtract: bool = False) -> Tensor:
        kind = self.kind
        if residual is not None and not self.adds_residual:
            raise ValueError(f"a {kind} layer takes no residual (only a rev group function does)")
        if kind == "plain":
            return self._norm_act_drop(self._conv(x, graph))
        if kind == "res":
            return self._norm_act_drop(self._conv(x, graph)) + x
        if kind == "res+":
            return self._conv(self._norm_act_drop(x), graph, residual=x)  # x + conv(...)
        if kind == "dense":
            return torch.cat([x, self._norm_act_drop(self._conv(x, graph))], dim=-1)
        if kind == "gcnii":
            return self._act(self.norm(self._conv(self._drop(x), graph, x0=extra)))
        # rev / deq: the dropout mask comes from the stage, shared by its layers and recomputations
        if extra is not None and kind == "rev":
            width = x.shape[-1]
            extra = extra[:, self.group * width : (self.group + 1) * width]
        if extra is not None and self._fuses_relu():
            return self._conv(norm_relu_of_masked(self.norm, x, extra, self.dropout), graph, residual=residual,
                              subtract=subtract)
        return self._conv(SharedDropout.apply_mask(self._act(self.norm(x)), extra), graph, residual=residual,
                          subtract=subtract)

