"""Stage modules: each IR stage as an ``nn.Module`` called as ``stage(x, graph)``.

A stage's modules (and so its parameter names, shapes and initial values for a seed) depend only
on the stage, never on its plan; the plan only decides how ``forward`` runs (SPEC.md section 4):

* ``store``: plain autograd;
* ``checkpoint(k)``: the stack's layers in ``k`` checkpointed segments (:mod:`.checkpoint`);
* ``reversible`` (``rev``): inputs reconstructed from outputs in backward (:mod:`.reversible`);
* ``implicit`` / ``unroll`` (``deq``): implicit-function or unrolled backward (:mod:`.deq`).
"""

from __future__ import annotations

import math
from functools import partial
import torch
from torch import Tensor, nn

from gnnspec import ir
from gnnspec.lower.checkpoint import run_segments, segment_bounds
from gnnspec.lower.deq import DEQFixedPoint
from gnnspec.lower.layers import ConvLayer, make_act, make_norm
from gnnspec.lower.recompute import SharedDropout
from gnnspec.lower.reversible import ReversibleStack
from gnnspec.lower.widths import ResolvedStage
from gnnspec.ops import PreparedGraph, call_conv, graph_form, make_appnp, make_sgc


class Stage(nn.Module):
    """Base of every stage module: ``forward(x, graph)``; ``kind``, ``plan`` and ``weight_decay``
    (None: the spec's ``train.weight_decay``) describe it."""

    def __init__(self, kind: str, plan: str = "store", weight_decay: float | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.plan = plan
        self.weight_decay = weight_decay

    def graph_forms(self) -> set[str]:
        """The prepared graph forms this stage's convolutions read."""
        return set()

    @property
    def plan_text(self) -> str:
        """The plan as a spec writes it, ``checkpoint(segments=k)`` with the segments it runs."""
        segments = getattr(self, "segments", None)
        return f"checkpoint(segments={segments})" if self.plan == "checkpoint" and segments is not None else self.plan

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, plan={self.plan!r}"


class Module(Stage):
    """A stage that is a plain module of the features: linear, mlp, dropout, act, norm."""

    def __init__(self, kind: str, module: nn.Module) -> None:
        super().__init__(kind)
        self.module = module

    def forward(self, x: Tensor, graph: PreparedGraph) -> Tensor:
        return self.module(x)


def make_mlp(stage: ir.Mlp, in_width: int, hidden: int) -> nn.Sequential:
    dims = stage.dims or (hidden,)
    parts: list[nn.Module] = []
    width = in_width
    for i, dim in enumerate(dims):
        parts.append(nn.Linear(width, dim))
        if i < len(dims) - 1:
            parts += [make_norm(stage.norm, dim), make_act(stage.act), nn.Dropout(stage.dropout)]
        width = dim
    return nn.Sequential(*parts)


class Propagation(Stage):
    """``appnp`` / ``sgc``: weight-free propagation with the GCN-normalised adjacency."""

    def __init__(self, stage: ir.Appnp | ir.Sgc) -> None:
        super().__init__(stage.kind)
        self.prop = make_appnp(stage.k, stage.alpha) if isinstance(stage, ir.Appnp) else make_sgc(stage.k)

    def graph_forms(self) -> set[str]:
        return {graph_form(self.kind)}

    def forward(self, x: Tensor, graph: PreparedGraph) -> Tensor:
        return call_conv(self.prop, self.kind, x, graph)


def _layers(build, depth: int, tie: bool) -> tuple[nn.ModuleList, tuple[int, ...]]:
    """``depth`` layers, or one shared by all when tied; returns the modules and the layer->module table."""
    if tie:
        return nn.ModuleList([build(0)]), (0,) * depth
    return nn.ModuleList([build(i) for i in range(depth)]), tuple(range(depth))


def _segments(plan: ir.Checkpoint | None, depth: int) -> int:
    """The segments a stack of ``depth`` runs (:func:`~gnnspec.lower.checkpoint.segment_bounds`
    makes at most one per layer, so more are reported as ``depth``)."""
    if plan is None or plan.segments is None:
        return ir.default_segments(depth)
    return max(1, min(plan.segments, depth))


class LayerStack(Stage):
    """``plain``, ``res``, ``res+``, ``dense`` and ``gcnii`` stacks, with jumping knowledge.

    ``jk``: ``none``/``last`` return the last layer's output, ``cat`` the concatenation of every
    layer's output, ``max`` their elementwise maximum. ``gcnii`` layers also read ``x0``, the stage's
    input, and ``beta_l = log(theta / l + 1)`` for layer ``l`` (so tied GCNII layers share weights
    but not ``beta``).
    """

    def __init__(self, resolved: ResolvedStage, hidden: int, plan: ir.Plan) -> None:
        stage: ir.Stack = resolved.stage
        super().__init__(stage.kind, plan.kind, stage.weight_decay)
        self.depth = stage.depth
        self.jk = getattr(stage, "jk", "none")
        self.out_width = resolved.out_width
        self.op_name = "gcn2" if stage.kind == "gcnii" else stage.op.name
        self.form = graph_form("gcn2" if stage.kind == "gcnii" else stage.op)
        self.segments = _segments(plan if isinstance(plan, ir.Checkpoint) else None, stage.depth)
        widths = [hidden * (i + 1) if stage.kind == "dense" else hidden for i in range(stage.depth)]
        widths[0] = resolved.in_width  # a plain stack with project=false starts at the input width
        self.layers, self.table = _layers(
            lambda i: ConvLayer(stage.kind, stage, hidden, in_channels=widths[i], layer=i + 1), stage.depth, stage.tie
        )

    def graph_forms(self) -> set[str]:
        return {self.form}

    def _step(self, index: int, state: tuple[Tensor, ...], graph: PreparedGraph) -> tuple[Tensor, ...]:
        x, x0, acc = state
        layer = self.layers[self.table[index]]
        if self.kind == "gcnii":
            layer.conv.beta = math.log(layer.theta / (index + 1) + 1)
        x = layer(x, graph, x0)
        if self.jk == "cat":
            acc = torch.cat([acc, x], dim=-1)
        elif self.jk == "max":
            acc = torch.maximum(acc, x)
        return x, x0, acc

    def forward(self, x: Tensor, graph: PreparedGraph) -> Tensor:
        if self.jk == "max":  # every layer outputs the stage's output width, which may differ from x's
            acc = x.new_full((x.shape[0], self.out_width), -math.inf)
        else:
            acc = x.new_empty(x.shape[0], 0) if self.jk == "cat" else x[:, :0]
        state = (x, x, acc)
        steps = [partial(self._step, i) for i in range(self.depth)]
        if self.plan == "checkpoint":
            modules = [self.layers[i] for i in self.table]
            state = run_segments(steps, state, graph, segments=self.segments, modules=modules)
        else:
            for step in steps:
                state = step(state, graph)
        x, _, acc = state
        return acc if self.jk in ("cat", "max") else x


class RevStack(Stage):
    """``rev``: grouped reversible residual stack (RevGNN) over ``groups`` channel groups.

    One dropout mask ``[N, hidden]`` is drawn per forward; group ``i`` of every layer uses its
    ``i``-th channel slice (RevGNN's shared dropout), and recomputations reuse it.
    """

    def __init__(self, resolved: ResolvedStage, hidden: int, plan: ir.Plan) -> None:
        stage: ir.Rev = resolved.stage
        super().__init__("rev", plan.kind, stage.weight_decay)
        width = hidden // stage.groups
        self.op_name = stage.op.name
        self.form = graph_form(stage.op)
        self.segments = _segments(plan if isinstance(plan, ir.Checkpoint) else None, stage.depth)
        self.dropout = SharedDropout(stage.dropout)
        build = lambda: [ConvLayer("rev", stage, width, group=i) for i in range(stage.groups)]  # noqa: E731
        first = build()
        blocks = [first if stage.tie else (first if i == 0 else build()) for i in range(stage.depth)]
        self.stack = ReversibleStack(blocks, reversible=plan.kind == "reversible")

    def graph_forms(self) -> set[str]:
        return {self.form}

    def forward(self, x: Tensor, graph: PreparedGraph) -> Tensor:
        mask = self.dropout.draw(x)
        stack = self.stack
        if self.plan != "checkpoint":
            return stack(x, graph, mask)
        if not (torch.is_grad_enabled() and any(f.training for f in stack.functions)):
            return stack.forward_groups(x, (graph, mask))  # what run_segments would run plainly
        # one step a segment, each a stack of its own layers (group lists inside, one tensor
        # between segments); the tied functions of a segment are listed once per layer
        bounds = segment_bounds(stack.depth, self.segments)
        steps = [partial(lambda layers, h, g, m: stack.forward_groups(h, (g, m), layers=layers), range(lo, hi))
                 for lo, hi in bounds]
        modules = [nn.ModuleList([stack.functions[i] for layer in stack.table[lo:hi] for i in layer])
                   for lo, hi in bounds]
        return run_segments(steps, x, graph, mask, segments=len(steps), modules=modules)


class DeqFunction(nn.Module):
    """``f(z, x) = L_d(...L_1(z)) + x`` with ``L = conv(mask * act(norm(.)))`` (``depth`` layers, usually 1)."""

    def __init__(self, stage: ir.Deq, hidden: int) -> None:
        super().__init__()
        self.layers, self.table = _layers(lambda i: ConvLayer("deq", stage, hidden), stage.depth, stage.tie)

    def forward(self, z: Tensor, x: Tensor, graph: PreparedGraph, mask: Tensor | None) -> Tensor:
        for index in self.table:
            z = self.layers[index](z, graph, mask)
        return z + x


class DeqStage(Stage):
    """``deq``: the fixed point ``z* = f(z*, x)``; ``implicit`` or ``unroll`` backward (``store`` is
    ``unroll``; so is ``checkpoint``: the solve is one step, whose one segment is a stack's last,
    run plainly by :func:`run_segments`; ``implicit`` is the plan whose memory does not grow with
    the iterations)."""

    def __init__(self, resolved: ResolvedStage, hidden: int, plan: ir.Plan) -> None:
        stage: ir.Deq = resolved.stage
        super().__init__("deq", plan.kind, stage.weight_decay)
        self.op_name = stage.op.name
        self.form = graph_form(stage.op)
        self.dropout = SharedDropout(stage.dropout)
        mode = "implicit" if plan.kind == "implicit" else "unroll"
        self.solver = DEQFixedPoint(
            DeqFunction(stage, hidden), solver=stage.solver, max_iter=stage.max_iter, tol=stage.tol, mode=mode
        )

    def graph_forms(self) -> set[str]:
        return {self.form}

    def forward(self, x: Tensor, graph: PreparedGraph) -> Tensor:
        mask = self.dropout.draw(x)
        if self.plan == "checkpoint":
            return run_segments([self.solver.forward], x, graph, mask, segments=1, modules=[self.solver])
        return self.solver(x, graph, mask)


def build_stage(resolved: ResolvedStage, hidden: int, plan: ir.Plan) -> Stage:
    """The module of one resolved stage under ``plan`` (already valid for it)."""
    stage = resolved.stage
    if isinstance(stage, ir.Rev):
        return RevStack(resolved, hidden, plan)
    if isinstance(stage, ir.Deq):
        return DeqStage(resolved, hidden, plan)
    if isinstance(stage, ir.Stack):
        return LayerStack(resolved, hidden, plan)
    if isinstance(stage, (ir.Appnp, ir.Sgc)):
        return Propagation(stage)
    if isinstance(stage, ir.Linear):
        return Module("linear", nn.Linear(resolved.in_width, resolved.out_width, bias=stage.bias))
    if isinstance(stage, ir.Mlp):
        return Module("mlp", make_mlp(stage, resolved.in_width, hidden))
    if isinstance(stage, ir.Dropout):
        return Module("dropout", nn.Dropout(stage.p))
    if isinstance(stage, ir.Act):
        return Module("act", make_act(stage.fn))
    if isinstance(stage, ir.Norm):
        return Module("norm", make_norm(stage.type, resolved.in_width))
    raise TypeError(f"no lowering for stage {stage.kind!r}")

