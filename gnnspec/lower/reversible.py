"""Grouped reversible residual stack (RevGNN, Li et al., "Graph Neural Networks with 1000 Layers",
ICML 2021), with a backward pass whose memory does not depend on depth."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.graph import _engine_run_backward
from torch.utils._mode_utils import no_dispatch

from gnnspec.lower.recompute import (
    BuffersBefore, ModuleRecord, module_record, recomputed_as_recorded, refuse_second_order,
)
from gnnspec.ops import every_gradient_used, has_forward_hooks


class ReversibleStack(nn.Module):
    r"""``depth`` grouped reversible residual layers, run in sequence.

    Layer ``l`` splits its input along the last dimension into ``C`` equal groups
    ``x_0 .. x_{C-1}`` and computes, with ``f_i = blocks[l][i]``::

        y_{-1} = x_1 + ... + x_{C-1}
        y_i    = f_i(y_{i-1}, *args) + x_i        for i = 0 .. C-1
        output = cat(y_0, .., y_{C-1})

    which is torch-geometric's ``GroupAddRev``: with the same modules the output equals a stack of
    ``GroupAddRev`` layers. The layer is invertible: ``x_i = y_i - f_i(y_{i-1})`` for
    ``i = C-1 .. 0``, where ``y_{-1}`` is rebuilt from the recovered ``x_1 .. x_{C-1}``.

    Contract for each ``f``: ``f(x_group, *args)`` returns a tensor of ``x_group``'s shape, does not
    modify its inputs in place, and is deterministic given its inputs (randomness such as dropout
    comes in through ``args``, e.g. a mask from ``SharedDropout.draw``); a reversible forward in
    which the default generator of the input's device advanced raises a RuntimeError. ``args`` are passed
    unchanged to every ``f`` and receive no gradient. An ``f`` whose ``adds_residual`` is true
    (a ``rev`` :class:`~gnnspec.lower.layers.ConvLayer`) also takes the skip term:
    ``f(u, *args, residual=x_i)`` returns ``x_i + f(u)``, with the gradients of that sum; the
    stack then adds ``x_i`` inside ``f``'s product (one ``[N, C/G]`` pass and tensor fewer a
    function). If it also has ``subtracts_residual(u)`` and that is true,
    ``f(u, *args, residual=y_i, subtract=True)`` returns ``y_i - f(u)`` (the reconstruction,
    inside ``f``'s products too); otherwise the stack subtracts ``f``'s output. An ``f`` with a
    forward hook is always called plainly, so that the hook sees (and may replace) ``f(u)``
    itself, in the forward and in the reconstruction alike. A module may appear in several layers (tied
    weights); it is stored once, so ``parameters()`` and the state dict do not depend on depth.

    The stack never frees, resizes or writes into a tensor its caller can see (its input, its
    output, ``args``), unlike ``GroupAddRev``, which frees its input's storage.

    ``reversible=False`` runs plain autograd (every layer's activations are saved), the groups
    passed from layer to layer as a list and concatenated once (:meth:`forward_groups`).
    ``reversible=True`` in training mode with grad enabled runs the whole stack as one autograd
    function that saves only the stack's output and, in backward, reconstructs each layer's input
    from its output while computing its gradients, recomputing every ``f`` once (about one extra
    forward of the stack). Gradients equal the plain stack's up to rounding. In eval mode or under
    ``torch.no_grad()`` both settings run the plain forward of :meth:`forward_groups`, and so
    does each segment of a checkpointed stack (over its range of layers: a segment's input and
    output are single tensors).
    """

    def __init__(self, blocks: Sequence[Sequence[nn.Module]], reversible: bool) -> None:
        super().__init__()
        layers = [list(layer) for layer in blocks]
        if not layers:
            raise ValueError("a reversible stack needs depth >= 1")
        groups = len(layers[0])
        if groups < 2 or any(len(layer) != groups for layer in layers):
            raise ValueError(
                f"every layer of a reversible stack needs the same number of groups >= 2, "
                f"got {[len(layer) for layer in layers]}"
            )
        unique: list[nn.Module] = []
        position: dict[int, int] = {}
        for layer in layers:
            for f in layer:
                if id(f) not in position:
                    position[id(f)] = len(unique)
                    unique.append(f)
        self.functions = nn.ModuleList(unique)
        # per function: whether it adds the skip term itself (plain data, fixed by its kind)
        self.adds_residual = tuple(bool(getattr(f, "adds_residual", False)) for f in unique)
        # layer -> group -> index into `functions`; plain data, so not part of the state dict.
        self.table: tuple[tuple[int, ...], ...] = tuple(
            tuple(position[id(f)] for f in layer) for layer in layers
        )
        self.reversible = reversible

    @property
    def depth(self) -> int:
        return len(self.table)

    @property
    def groups(self) -> int:
        return len(self.table[0])

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        if x.size(-1) % self.groups != 0:
            raise ValueError(
                f"{x.size(-1)} channels cannot be split into {self.groups} equal groups"
            )
        if self.reversible and self.training and torch.is_grad_enabled():
            if any(isinstance(a, Tensor) and a.requires_grad for a in args):
                raise ValueError("arguments of a reversible stack receive no gradient; detach them")
            params, states = self._function_states()
            return _ReversibleStackFunction.apply(self, states, len(args), x, *args, *params)
        return self.forward_groups(x, args)

    def forward_groups(
        self, x: Tensor, args: Sequence[Any],
        buffers: tuple[list[BuffersBefore], Sequence["_FunctionState"]] | None = None,
        layers: range | None = None,
    ) -> Tensor:
        """The output of the stack's ``layers`` (default all), the groups passed from layer to
        layer as a list and concatenated once: no concatenation and split a layer, whose split
        hands the first group function a strided view (which a layer norm copies, and whose save
        keeps the whole concatenation alive). Under plain autograd (``store``) that is 0.85x the
        step time of a layer-by-layer loop at depth 64 (gcn, sage; 0.96x gat) and one
        ``[N, hidden/groups]`` tensor less saved per layer after the first; the forward of the
        reversible plan and each segment of a checkpointed stack run it too. The same values as
        a layer-by-layer loop up to rounding: bit-identical with layer norm or none, while batch
        norm rounds a strided input differently (2.7e-15 in float64). Every plan's eval and
        ``no_grad`` forward runs it, so their outputs agree bit for bit. ``buffers`` as
        :meth:`_layer_groups`."""
        groups = x.chunk(self.groups, dim=-1)
        for number in range(len(self.table)) if layers is None else layers:
            groups = self._layer_groups(self.table[number], groups, args, buffers)
        return torch.cat(groups, dim=-1)

    def _function_states(self) -> tuple[list[Tensor], list["_FunctionState"]]:
        """Every trainable parameter of the stack once, and per function in ``functions`` what its
        recomputation in backward needs. Looked up once per forward: the backward recomputes
        ``depth * groups`` functions and must not walk each one's module tree again."""
        params: list[Tensor] = []
        position: dict[int, int] = {}
        states = []
        for f in self.functions:
            record = module_record(f)
            # each trainable parameter once, from the record's walk (f.parameters() walks again)
            own = list({id(p): p for _, _, p in record.parameters if p.requires_grad}.values())
            for p in own:
                if id(p) not in position:
                    position[id(p)] = len(params)
                    params.append(p)
            states.append(_FunctionState(own, [position[id(p)] for p in own], record))
        return params, states

    def _layer_groups(
        self, layer: tuple[int, ...], xs: Sequence[Tensor], args: Sequence[Any],
        buffers: tuple[list[BuffersBefore], Sequence["_FunctionState"]] | None = None,
    ) -> list[Tensor]:
        """The output groups ``y_0 .. y_{C-1}`` of one layer from its input groups; with
        ``buffers``, each call's :class:`BuffersBefore` of its function's stateful buffers appended
        to the list (in call order)."""
        y = _sum(xs[1:])
        ys = []
        for i, index in enumerate(layer):
            if buffers is None:
                y = self._plus(index, y, args, xs[i])
            else:
                before = BuffersBefore(buffers[1][index].record.stateful)
                y = self._plus(index, y, args, xs[i])
                buffers[0].append(before.settle())
            ys.append(y)
        return ys

    def _plus(self, index: int, u: Tensor, args: Sequence[Any], residual: Tensor) -> Tensor:
        """``residual + f(u)`` for ``f = functions[index]``, the sum inside ``f`` where it adds it
        (not under a forward hook, which must see ``f(u)``)."""
        f = self.functions[index]
        if self.adds_residual[index] and not has_forward_hooks(f):
            return f(u, *args, residual=residual)
        return f(u, *args) + residual

    def extra_repr(self) -> str:
        return f"depth={self.depth}, groups={self.groups}, reversible={self.reversible}"


class _FunctionState(NamedTuple):
    """One group function's trainable parameters, their positions among the stack's parameter
    inputs, and its :class:`~gnnspec.lower.recompute.ModuleRecord` at the forward: the training
    modes and parameters its recomputation runs with, the running statistics that recomputation
    must leave unchanged, and the other buffers a call may change."""

    params: list[Tensor]
    positions: list[int]
    record: ModuleRecord


def _rng_state(device: torch.device) -> Tensor:
    """The state of the default generator that draws for tensors on ``device``."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _rng_advanced(before: Tensor, device: torch.device) -> bool:
    """Whether the generator of ``device`` moved since its state was ``before``. Compared outside
    any dispatch mode: under a dry run's fake tensors (or a tracker) the states stay real tensors."""
    with no_dispatch():
        return not torch.equal(_rng_state(device), before)


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    # Left to right, so the forward and its reconstruction round identically.
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


class _ReversibleStackFunction(torch.autograd.Function):
    """The whole stack as one autograd node; everything a call needs lives in its ``ctx``.

    The output is kept on ``ctx`` (a detached alias, not ``save_for_backward``) and dropped as soon
    as backward starts, so the only full-width tensors alive in backward are the current layer's
    groups and their gradients. An in-place change of the output between forward and backward is
    detected through its version counter, as ``save_for_backward`` would.
    """

    @staticmethod
    def forward(
        ctx: Any,
        stack: ReversibleStack,
        states: list[_FunctionState],
        num_args: int,
        x: Tensor,
        *rest: Tensor,
    ) -> Tensor:
        args, params = rest[:num_args], rest[num_args:]
        device_type = x.device.type
        ctx.stack, ctx.states, ctx.num_params = stack, states, len(params)
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        # Nothing is saved, so the layers pass group lists on and the output is concatenated once
        # (the plain stack in training concatenates every layer's output: see forward).
        rng_before = _rng_state(x.device)
        # Per call, the values of the buffers it changed (spectral_norm's vectors): its
        # recomputation starts from them. Only where a function has buffers other than norms'.
        ctx.buffers_before = [] if any(state.record.stateful for state in states) else None
        buffers = None if ctx.buffers_before is None else (ctx.buffers_before, states)
        with torch.no_grad():
            x = stack.forward_groups(x, args, buffers)
        if _rng_advanced(rng_before, x.device):
            # backward would recompute each f with other random numbers: wrong gradients
            raise RuntimeError(
                "a group function of a reversible stack drew random numbers in training mode; "
                "the reversible plan recomputes every function in backward and needs them "
                "deterministic (pass randomness in as an argument, as the stack's dropout mask is), "
                "or run this stack under `checkpoint`, which replays the random state"
            )
        # Tensors go through save_for_backward; other arguments (a prepared graph) stay on ctx.
        ctx.tensor_positions = [k for k, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.other_args = [None if isinstance(a, Tensor) else a for a in args]
        ctx.save_for_backward(*(args[k] for k in ctx.tensor_positions))
        ctx.output = [x.detach()]
        ctx.output_version = x._version
        return x

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        refuse_second_order("reversible")
        if not ctx.output:
            raise RuntimeError(
                "a reversible stack runs backward once per forward (retain_graph is not supported)"
            )
        y = ctx.output.pop()
        if y._version != ctx.output_version:
            raise RuntimeError(
                "the output of a reversible stack was modified in place before backward; "
                "its input cannot be reconstructed (clone it before modifying it)"
            )
        args = list(ctx.other_args)
        for k, tensor in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[k] = tensor
        param_grads: list[Tensor | None] = [None] * ctx.num_params
        ctx.functions = list(ctx.stack.functions)  # a ModuleList's indexing costs ~1 us a call
        groups = ctx.stack.groups
        ys, grad_ys = list(y.chunk(groups, dim=-1)), list(grad_output.chunk(groups, dim=-1))
        del y
        for number in reversed(range(len(ctx.stack.table))):
            ys, grad_ys = _layer_backward(ctx, number, ys, grad_ys, args, param_grads)
        grad_x = torch.cat(grad_ys, dim=-1) if ctx.needs_input_grad[3] else None
        return (None, None, None, grad_x, *([None] * len(args)), *param_grads)


def _layer_backward(
    ctx: Any,
    number: int,
    ys: list[Tensor],
    grad_ys: list[Tensor],
    args: Sequence[Any],
    param_grads: list[Tensor | None],
) -> tuple[list[Tensor], list[Tensor]]:
    """Layer ``number``'s input groups and their gradients from its output groups and their
    gradients, adding the gradients of the layer's parameters into ``param_grads``.

    Group lists are carried between layers instead of concatenated tensors, and each piece is
    dropped from the lists once used, so no full-width copy is made per layer. Never writes into
    the given tensors: they may be the caller's.
    """
    layer = ctx.stack.table[number]
    adds = ctx.stack.adds_residual
    groups = len(layer)
    xs: list[Tensor | None] = [None] * groups
    grad_xs: list[Tensor | None] = [None] * groups
    grad_from_next: Tensor | None = None  # d loss / d y_i through f_{i+1}, negated if next_negated
    next_negated = False
    for i in reversed(range(groups)):
        if grad_from_next is None:
            grad = grad_ys[i]
        else:
            grad = grad_ys[i] - grad_from_next if next_negated else grad_ys[i] + grad_from_next
        grad_ys[i] = grad_from_next = None
        f, state = ctx.functions[layer[i]], ctx.states[layer[i]]
        f_input = (ys[i - 1] if i > 0 else _sum(xs[1:])).detach().requires_grad_()
        subtract = adds[layer[i]] and _subtracts(f, f_input)
        # The gradients are taken before the running statistics are restored: batch norm saved them
        # for backward, so the restore must not come between the recomputation and its backward.
        changed = [] if ctx.buffers_before is None else ctx.buffers_before[number * groups + i].changed
        with recomputed_as_recorded(state.record, changed) as leaves:
            with torch.enable_grad(), _forward_autocast(ctx.autocast):
                if subtract:  # root = y_i - f(u) = x_i, computed inside f's products
                    root = f(f_input, *args, residual=ys[i], subtract=True)
                    xs[i] = root.detach()
                else:
                    root = f(f_input, *args)
                    xs[i] = ys[i] - root.detach()
            ys[i] = None
            _prefetch(grad)
            # y_i = f(u) + x_i, so d loss / d f(u) = d loss / d y_i, cast to f's output dtype as the
            # plain stack's add hands it on (bfloat16 under autocast). Through root = y_i - f(u) the
            # engine returns minus f's gradients: negated below (the input's by subtracting it).
            with every_gradient_used():  # f's input and all its parameters
                grad_input, *grads = _gradients(
                    root, [f_input, *(leaves[id(p)] for p in state.params)], grad.to(root.dtype))
            del root, f_input
        if subtract and grads:
            # in place: f's parameter gradients are its nodes' fresh outputs (root's node hands
            # the incoming gradient on to the residual alone, which is no input here)
            torch._foreach_neg_(grads)
        grad_xs[i] = grad
        del grad
        for k, g in zip(state.positions, grads):
            param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
        # a tied layer's gradients are in the sums now: not kept alive through the next function
        grads = g = None
        if i > 0:
            grad_from_next, next_negated = grad_input, subtract
        else:  # y_{-1} = x_1 + ... + x_{C-1}
            for j in range(1, groups):
                grad_xs[j] = grad_xs[j] - grad_input if subtract else grad_xs[j] + grad_input
    return xs, grad_xs


def _subtracts(f: nn.Module, u: Tensor) -> bool:
    """Whether ``f`` (which adds the skip term itself) reconstructs ``y_i - f(u)`` inside its
    products: it says so for ``u``, and no forward hook must see ``f(u)`` (as in the forward,
    where such an ``f`` is called plainly)."""
    says = getattr(f, "subtracts_residual", None)
    return says is not None and not has_forward_hooks(f) and bool(says(u))


def _forward_autocast(state: tuple[str, bool, torch.dtype]) -> contextlib.AbstractContextManager:
    """The autocast state ``(device type, enabled, dtype)`` of the forward, for its recomputation:
    nothing to enter where autocast is off now as it was then (the common case; constructing and
    entering ``torch.autocast`` costs ~3 us, 2 * depth times a step)."""
    device_type, enabled, dtype = state
    if not enabled and not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _gradients(output: Tensor, inputs: list[Tensor], grad: Tensor) -> list[Tensor]:
    """``torch.autograd.grad(output, inputs, grad, allow_unused=True, materialize_grads=True)``
    through the engine entry point that ``autograd.grad`` itself calls, without its Python checks
    of arguments this caller makes itself (one output, ``grad`` of its shape and dtype): those
    cost ~40 us a call, about 5 ms of a depth-64 step. An input ``output`` does not depend on gets
    zeros, as with ``materialize_grads``. (``_engine_run_backward`` is torch's own, private; it has
    the same arguments from torch 2.3 to 2.13.)"""
    result = _engine_run_backward((output,), (grad,), False, False, tuple(inputs), True, accumulate_grad=False)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, result)]


def _prefetch(t: Tensor) -> None:
    """Read ``t`` once, in order, so that it is in the CPU's cache when the backward of ``f`` starts:
    that backward's sparse product (``A^T @ grad`` of a CSR-propagating conv) gathers its rows at
    random, and ``grad``, made before the recomputation of ``f`` ran, is by then out of the core's
    L2 cache. A sum (8 us for a 5000 x 32 float32 tensor) took that product from 423 to 312 us and
    the reversible step 3-8% faster at depth 64 (gcn, sage; paired rounds in one process). Only for
    real CPU tensors: on a GPU, or under the fake tensors of a dry run, there is nothing to gain."""
    if t.device.type == "cpu" and not isinstance(t, FakeTensor):
        t.sum()
