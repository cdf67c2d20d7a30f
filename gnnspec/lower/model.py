"""IR + plans -> the model: ``GNNModel(x, edge_index) -> [N, out]`` (SPEC.md sections 2-4 and 7).

``build_model`` resolves widths, picks each stage's plan and builds the stage modules in order, so
the same spec and seed give the same parameters under every plan.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from gnnspec import ir
from gnnspec.errors import NoParameters, SpecError
from gnnspec.lower.stages import Stage, build_stage
from gnnspec.lower.widths import ResolvedStage, resolve_widths
from gnnspec.ops import GraphCache

PlanLike = ir.Plan | str


class GNNModel(nn.Module):
    """The model of a spec: its stages in order, and a cache of the prepared graph.

    ``forward(x, edge_index)`` prepares the graph once (self-loops, normalisation: see
    :class:`gnnspec.ops.GraphCache`) and runs every stage on it.
    """

    def __init__(self, spec: ir.Spec, resolved: Sequence[ResolvedStage], stages: Sequence[Stage]) -> None:
        super().__init__()
        self.spec = spec
        self.resolved = tuple(resolved)
        self.stages = nn.ModuleList(stages)
        self.graph_cache = GraphCache()
        self.forms = frozenset(set().union(*(s.graph_forms() for s in stages)) | {"raw"})

    @property
    def plans(self) -> tuple[str, ...]:
        return tuple(stage.plan for stage in self.stages)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        graph = self.graph_cache.prepare(edge_index, num_nodes=x.size(0), dtype=x.dtype, forms=self.forms)
        for stage in self.stages:
            x = stage(x, graph)
        return x

    def summary(self, plan: str) -> dict[str, Any]:
        """What ``gnnspec compile --json`` prints: name, parameter count, plan, and per resolved stage
        its kind, plan, depth (1 for single operations) and parameter count (shared ones once)."""
        stages = []
        for resolved, stage in zip(self.resolved, self.stages):
            stages.append(
                {
                    "kind": stage.kind,
                    "plan": stage.plan_text,
                    "depth": getattr(resolved.stage, "depth", 1),
                    "parameters": _count(stage.parameters()),
                    "in": resolved.in_width,
                    "out": resolved.out_width,
                    "inserted": resolved.inserted,
                }
            )
        return {"name": self.spec.name, "parameters": _count(self.parameters()), "plan": plan, "stages": stages}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: each stage's parameters with its ``weight_decay`` (default:
        ``weight_decay``), stages with equal decay merged, in stage order."""
        groups: dict[float, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for stage in self.stages:
            decay = weight_decay if stage.weight_decay is None else stage.weight_decay
            for p in stage.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    groups.setdefault(decay, []).append(p)
        return [{"params": params, "weight_decay": decay} for decay, params in groups.items()]

    def make_optimizer(self, settings: ir.Train, name: str | None = None):
        """The optimizer of ``settings`` (or ``name``: adam, adamw, sgd) over
        :meth:`parameter_groups` with ``settings.weight_decay`` as the default decay."""
        import torch

        name = name or settings.optimizer
        groups = self.parameter_groups(settings.weight_decay)
        if not groups:  # torch's optimizers raise "got an empty parameter list"
            raise NoParameters(
                f"{self.spec.name} has no parameters to train (appnp and sgc stages only propagate); "
                "add a stage with weights, such as linear"
            )
        if name == "adam":
            return torch.optim.Adam(groups, lr=settings.lr)
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=settings.lr)
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)


def _count(parameters) -> int:
    return sum(p.numel() for p in {id(p): p for p in parameters}.values())


MAX_BUILT_DEPTH = 10**6
"""The deepest stack :func:`build_model` makes. Every layer is a module call per forward (and,
untied, its own modules), so a deeper stack would take hours per step or hang while being built;
the estimator answers at any depth."""


def _check_buildable(stage: ir.Stage) -> None:
    if isinstance(stage, ir.Stack) and stage.depth > MAX_BUILT_DEPTH:
        span = stage.spans.exact("depth") or stage.span()
        where = {} if span is None else {
            "line": span.line, "column": span.column,
            "end_column": span.end_column if span.end_line == span.line else None}
        raise SpecError(
            f"a stack of depth {stage.depth:,} is deeper than gnnspec builds ({MAX_BUILT_DEPTH:,} layers at most)",
            **where,
            hint="`estimate-mem` answers at any depth; for a weight-tied model of unbounded depth use `deq`",
        )


def build_model(
    spec: ir.Spec,
    in_channels: int | None,
    out_channels: int | None,
    plan: ir.Plan | Sequence[ir.Plan] | None = None,
) -> GNNModel:
    """The model of ``spec``. ``plan``: one plan for every stage (where valid), one per resolved
    stage or one per stack, or None for the spec's plans (a stage's own ``plan=`` over the spec-level ``plan``)."""
    for stage in spec.model:
        _check_buildable(stage)
    resolved = resolve_widths(spec, in_channels, out_channels)
    if plan is not None:
        plans = ir.runnable_plans([r.stage for r in resolved], plan)
    else:
        plans = [ir.runnable_plan(r.stage, getattr(r.stage, "plan", None) or spec.plan) for r in resolved]
    stages = [build_stage(r, _hidden(spec, r), p) for r, p in zip(resolved, plans)]
    return GNNModel(spec, resolved, stages)


def _hidden(spec: ir.Spec, resolved: ResolvedStage) -> int:
    stage = resolved.stage
    if isinstance(stage, ir.Stack) and stage.hidden is not None:
        return stage.hidden
    return spec.hidden
