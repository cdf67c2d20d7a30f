"""Semantic rules of SPEC.md section 2, checked on the IR before anything is built.

Each rule is a small function ``rule(spec) -> Iterator[SpecError]`` that points at the offending
value's span; :data:`RULES` is the table, run in order by :func:`violations`. Names were already
resolved by the parser (unknown names, repeated arguments), so these rules are about values.
"""

from __future__ import annotations

from typing import Callable, Iterator

from gnnspec import ir
from gnnspec.errors import SpecError
from gnnspec.ir import PLAN_VALID_FOR, Span

Rule = Callable[[ir.Spec], Iterator[SpecError]]

_WIDTH = "a width is a number of channels"
# What a number means, the hint of an error that finds it out of range.
_MEANING = {
    "depth": "the number of layers of the stack",
    "segments": "the number of checkpointed segments (`checkpoint` alone takes round(sqrt(depth)))",
    "budget": "the memory the plan may use, such as `16GiB`",
    "hidden": _WIDTH, "dim": _WIDTH, "in": _WIDTH, "out": _WIDTH,
    "seed": "a seed is a whole number from 0 to 2**63 - 1",
    "k": "the number of propagation steps",
    "alpha": "the weight of the stage's input in each step, e.g. 0.1",
    "theta": "GCNII's identity-mapping strength, e.g. 0.5",
    "max_iter": "the most iterations a solve takes",
    "tol": "the relative residual at which a solve stops, e.g. 1e-4",
    "weight_decay": "0 disables it; e.g. 5e-4",
    "lr": "the learning rate, e.g. 0.01",
    "momentum": "SGD's momentum, e.g. 0.9; 0 disables it",
    "epochs": "the number of training epochs", "patience": "epochs without improvement before stopping",
    "nodes": "the graph's size", "edges": "the graph's size",
    "features": "the number of input features", "classes": "the number of classes",
}


def _out_of_range(span: Span | None, name: str, words: str, value: object) -> SpecError:
    """``name`` must be ``words``; the hint says what the number means."""
    return _error(span, f"`{name}` must be {words}, got {value}", _MEANING.get(name))


def _op_range_hint(param: ir.OpParam) -> str:
    default = f"its default is {param.default}" if param.default is not None else ""
    if param.type == "float":
        return default or f"a number above {param.minimum:g}"
    return f"write `{param.name}={param.minimum:g}` or more" + (f" ({default})" if default else "")


def _error(span: Span | None, message: str, hint: str | None = None) -> SpecError:
    if span is None:
        return SpecError(message, hint=hint)
    end = span.end_column if span.end_line == span.line else None
    return SpecError(message, line=span.line, column=span.column, end_column=end, hint=hint)


def _stacks(spec: ir.Spec) -> Iterator[ir.Stack]:
    return (s for s in spec.model if isinstance(s, ir.Stack))


def stack_width(spec: ir.Spec, stage: ir.Stack) -> int:
    """The width a stack's convolutions run at: its ``hidden``, divided by ``groups`` for ``rev``."""
    hidden = stage.hidden if stage.hidden is not None else spec.hidden
    return hidden // stage.groups if isinstance(stage, ir.Rev) else hidden


# ---------------------------------------------------------------------------- rules


def positive_widths(spec: ir.Spec) -> Iterator[SpecError]:
    """Every width in ``[1, MAX_WIDTH]``."""
    for key, field in (("in", "in_"), ("out", "out"), ("hidden", "hidden")):
        value = getattr(spec, field)
        if isinstance(value, int) and (bound := _width_range(value)):
            yield _out_of_range(spec.span(key), key, bound, value)
    for stage in spec.model:
        for name in ("hidden", "dim"):
            value = getattr(stage, name, None)
            if isinstance(value, int) and (bound := _width_range(value)):
                yield _out_of_range(stage.span(name), name, bound, value)
        if isinstance(stage, ir.Mlp):
            for index, value in enumerate(stage.dims):
                if bound := _width_range(value):
                    span = stage.spans.exact(f"dims.{index}") or stage.span("dims")
                    yield _error(span, f"widths in `dims` must be {bound}, got {value}", _MEANING["dim"])


def _width_range(value: int) -> str:
    """The bound a width breaks, in words, or "" for a width in ``[1, MAX_WIDTH]``."""
    return "positive" if value < 1 else "at most 2**31 - 1" if value > ir.MAX_WIDTH else ""


def depth_at_least_one(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in _stacks(spec):
        if stage.depth < 1:
            yield _out_of_range(stage.span("depth"), "depth", "at least 1", stage.depth)


def dropout_in_range(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in spec.model:
        name = "p" if isinstance(stage, ir.Dropout) else "dropout"
        value = getattr(stage, name, None)
        if value is not None and not 0.0 <= value < 1.0:
            yield _error(
                stage.span(name),
                f"dropout must be in [0, 1), got {value}",
                "it is the probability of zeroing a value; 0 disables dropout",
            )


def rev_groups(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in spec.model:
        if not isinstance(stage, ir.Rev):
            continue
        hidden = stage.hidden if stage.hidden is not None else spec.hidden
        if stage.groups < 2:
            yield _error(
                stage.span("groups"),
                f"`groups` must be at least 2, got {stage.groups}",
                "a reversible stack splits the channels into groups that update each other",
            )
        elif hidden % stage.groups:
            yield _error(
                stage.spans.exact("groups") or stage.spans.exact("hidden") or spec.spans.exact("hidden") or stage.span(),
                f"`hidden` ({hidden}) is not divisible by `groups` ({stage.groups})",
                f"each group is hidden/groups channels wide; {_try_divisor('groups', hidden, stage.groups, 2, 'hidden')}",
            )


def heads_divide_width(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in _stacks(spec):
        heads = stage.op.heads
        if heads is None or heads < 1:
            continue
        if isinstance(stage, ir.Rev) and (stage.groups < 2 or (stage.hidden or spec.hidden) % stage.groups):
            continue  # reported by rev_groups
        width = stack_width(spec, stage)
        if width % heads:
            where = f"width hidden/groups = {width}" if isinstance(stage, ir.Rev) else f"width {width}"
            yield _error(
                stage.op.span("heads"),
                f"{heads} attention heads do not divide the {where}",
                f"heads split the width; try heads={_divisor_near(width, heads, 1) or 1}",
            )


def op_argument_ranges(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in _stacks(spec):
        sig = ir.OP_SIGNATURES.get(stage.op.name)
        for param in sig.params if sig else ():
            value = stage.op.arg(param.name)
            if param.minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                too_small = value <= param.minimum if param.type == "float" else value < param.minimum
                if too_small:
                    words = f"{'above' if param.type == 'float' else 'at least'} {param.minimum:g}"
                    yield _error(
                        stage.op.span(param.name),
                        f"`{param.name}` of `{stage.op.name}` must be {words}, got {value}",
                        _op_range_hint(param),
                    )


def stage_number_ranges(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in spec.model:
        checks: list[tuple[str, bool, str]] = []
        if isinstance(stage, (ir.Appnp, ir.Sgc)):
            checks.append(("k", stage.k >= 1, "at least 1"))
        if isinstance(stage, (ir.Appnp, ir.Gcnii)):
            checks.append(("alpha", 0.0 <= stage.alpha <= 1.0, "in [0, 1]"))
        if isinstance(stage, ir.Gcnii):
            checks.append(("theta", stage.theta > 0.0, "positive"))
        if isinstance(stage, ir.Deq):
            checks.append(("max_iter", stage.max_iter >= 1, "at least 1"))
            checks.append(("tol", stage.tol > 0.0, "positive"))
        if isinstance(stage, ir.Stack) and stage.weight_decay is not None:
            checks.append(("weight_decay", stage.weight_decay >= 0.0, "at least 0"))
        for name, ok, words in checks:
            if not ok:
                yield _out_of_range(stage.span(name), name, words, getattr(stage, name))


def tie_needs_equal_widths(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in spec.model:
        if isinstance(stage, ir.Dense) and stage.tie and stage.depth > 1:
            yield _error(
                stage.span("tie"),
                "`tie` cannot share weights in a `dense` stack",
                "each layer of a dense stack sees a wider input, so its weights differ in shape",
            )
        if isinstance(stage, ir.Plain) and stage.tie and stage.depth > 1 and not stage.project:
            yield _error(
                stage.span("tie"),
                "`tie` cannot share weights with `project=false`",
                "the first layer takes the input width, so its weights differ in shape; drop one of them",
            )


def dense_jk_over_equal_widths(spec: ir.Spec) -> Iterator[SpecError]:
    """``jk=cat|max`` combine the layers' outputs; a ``dense`` stack's differ in width (layer ``i``
    outputs ``hidden * (i + 1)`` columns), and its output already concatenates them all."""
    for stage in spec.model:
        if isinstance(stage, ir.Dense) and stage.jk in ("cat", "max") and stage.depth > 1:
            yield _error(
                stage.span("jk"),
                f"`jk={stage.jk}` is not defined on a `dense` stack",
                "a dense stack's layers output growing widths, and its output already concatenates "
                "the input and every layer's features; use `jk=last` or leave `jk` out",
            )


def gcnii_uses_gcn(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in spec.model:
        if isinstance(stage, ir.Gcnii) and stage.op.name != "gcn":
            yield _error(
                stage.op.span("name"),
                f"`gcnii` propagates with the GCN normalisation; `op={stage.op.name}` is not supported",
                "leave `op` out (it is `gcn`), or use `res+(op=...)` for another op",
            )


def plans_fit_stages(spec: ir.Spec) -> Iterator[SpecError]:
    for stage in spec.model:
        plan = getattr(stage, "plan", None)
        if plan is not None:
            yield from _stage_plan_errors(stage, plan)
    yield from _plan_without_stage(spec, spec.plan, spec.span("plan"))


def _stage_plan_errors(stage: ir.Stage, plan: ir.Plan) -> Iterator[SpecError]:
    """``plan`` given for ``stage`` alone: ``auto`` is not a stage's plan, and the plan must be
    valid for the stage's kind."""
    if plan.kind == "auto":
        yield _error(
            plan.span("name"),
            "`auto` chooses plans for the whole spec; it is not a stage's plan",
            "write `plan: auto(budget=...)` at the top level",
        )
        return
    valid = PLAN_VALID_FOR[plan.kind]
    if valid is not None and stage.kind not in valid:
        yield _error(
            plan.span("name"),
            f"plan `{plan.kind}` is not valid for `{stage.kind}`",
            f"`{plan.kind}` applies to {', '.join(f'`{k}`' for k in valid)}; valid here: "
            + ", ".join(k for k, v in PLAN_VALID_FOR.items() if v is None or stage.kind in v),
        )


def _plan_without_stage(spec: ir.Spec, plan: ir.Plan, span: Span | None) -> Iterator[SpecError]:
    """``plan`` given for the whole model when no stage of it can run that plan."""
    valid = PLAN_VALID_FOR.get(plan.kind)
    if valid is not None and not any(s.kind in valid for s in spec.model):
        kinds = {s.kind for s in spec.model}
        usable = ["store", "auto"] + [k for k, v in PLAN_VALID_FOR.items() if v is not None and kinds & set(v)]
        yield _error(
            span,
            f"plan `{plan.kind}` applies to {', '.join(f'`{k}`' for k in valid)} stages; this model has none",
            "use " + " or ".join(f"`{k}`" for k in usable),
        )


def plan_arguments(spec: ir.Spec) -> Iterator[SpecError]:
    plans = [spec.plan] + [getattr(s, "plan", None) for s in spec.model]
    for plan in plans:
        if plan is not None:
            yield from plan_argument_errors(plan)


def plan_argument_errors(plan: ir.Plan) -> Iterator[SpecError]:
    """``plan``'s arguments out of range: ``segments`` below 1, a ``budget`` that is not positive."""
    if isinstance(plan, ir.Checkpoint) and plan.segments is not None and plan.segments < 1:
        yield _out_of_range(plan.span("segments"), "segments", "at least 1", plan.segments)
    if isinstance(plan, ir.Auto) and plan.budget is not None and plan.budget < 1:
        yield _out_of_range(plan.span("budget"), "budget", "positive", plan.budget)


def requested_plan_errors(spec: ir.Spec, plan: ir.Plan, stage: ir.Stage | None = None) -> list[SpecError]:
    """What is wrong with a plan requested from outside the spec (``build(plan=...)``,
    ``estimate(plan=...)``, ``--plan``), with spans in the plan's own text (SPEC.md section 2, as
    for a plan in a spec): an argument out of range; for one plan for the whole model
    (``stage`` None), no stage that can run it (the stages it does not apply to run ``store``);
    for a plan given for one ``stage`` (a list with one plan per stack), not valid for it."""
    errors = list(plan_argument_errors(plan))
    if stage is None:
        errors += _plan_without_stage(spec, plan, plan.span("name"))
    else:
        errors += _stage_plan_errors(stage, plan)
    return errors


def graph_and_training(spec: ir.Spec) -> Iterator[SpecError]:
    graph, train = spec.graph, spec.train
    checks: list[tuple[ir.IRModel, str, bool, str]] = []
    if graph is not None:
        checks += [(graph, "nodes", graph.nodes >= 1, "at least 1"), (graph, "edges", graph.edges >= 0, "at least 0")]
        for name in ("features", "classes"):
            value = getattr(graph, name)
            checks.append((graph, name, value is None or value >= 1, "at least 1"))
    checks += [
        (train, "lr", train.lr > 0.0, "positive"),
        (train, "weight_decay", train.weight_decay >= 0.0, "at least 0"),
        (train, "momentum", 0.0 <= train.momentum < 1.0, "in [0, 1)"),
        (train, "epochs", train.epochs >= 1, "at least 1"),
        (train, "patience", train.patience is None or train.patience >= 1, "at least 1"),
    ]
    for node, name, ok, words in checks:
        if not ok:
            yield _out_of_range(node.span(name), name, words, getattr(node, name))
    if spec.seed < 0:
        yield _out_of_range(spec.span("seed"), "seed", "at least 0", spec.seed)
    elif spec.seed > ir.MAX_SEED:
        yield _out_of_range(spec.span("seed"), "seed", "at most 2**63 - 1", spec.seed)


def graph_widths_agree(spec: ir.Spec) -> Iterator[SpecError]:
    """``in``/``out`` against the ``graph:``'s ``features``/``classes``: `compile` and
    `estimate-mem` take the graph as the data and refuse a contradiction, so `check` does too."""
    graph = spec.graph
    if graph is None:
        return
    for key, field, declared, name in (("in", "in_", graph.features, "features"), ("out", "out", graph.classes, "classes")):
        value = getattr(spec, field)
        if isinstance(value, int) and declared is not None and value != declared:
            yield _error(spec.span(key), f"`{key}: {value}` but `graph:` says {name}={declared}",
                         f"give one of them, or set `{key}: auto` to take it from the graph")


RULES: tuple[Rule, ...] = (
    positive_widths,
    graph_widths_agree,
    depth_at_least_one,
    dropout_in_range,
    rev_groups,
    heads_divide_width,
    op_argument_ranges,
    stage_number_ranges,
    tie_needs_equal_widths,
    dense_jk_over_equal_widths,
    gcnii_uses_gcn,
    plans_fit_stages,
    plan_arguments,
    graph_and_training,
)


def violations(spec: ir.Spec) -> list[SpecError]:
    """Every rule's errors, in the order of :data:`RULES`."""
    return [error for rule in RULES for error in rule(spec)]


def _divisor_near(n: int, k: int, lowest: int) -> int | None:
    """The divisor of ``n`` in ``[lowest, n]`` nearest ``k`` (the larger on a tie), searched within
    64 of ``k`` (a hint, not a factorisation: ``n`` may be a large prime); None if none is there."""
    for distance in range(65):
        for candidate in (k + distance, k - distance) if distance else (k,):
            if lowest <= candidate <= n and n % candidate == 0:
                return candidate
    return None


def _try_divisor(name: str, n: int, k: int, lowest: int, width: str) -> str:
    """``try name=d`` for a divisor ``d`` of ``n`` near ``k``, and ``width`` at a multiple of ``k``."""
    near = _divisor_near(n, k, lowest)
    nearest = round(n / k) * k
    multiple = f"{width}={max(k, nearest - k if nearest > ir.MAX_WIDTH else nearest)}"
    return f"try {name}={near} or {multiple}" if near is not None else f"try {multiple}"
