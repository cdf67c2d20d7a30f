"""Per-stage plan choice under a memory budget (SPEC.md section 4, ``auto``).

For each stack the candidates are the plans valid for it (``store``, ``checkpoint``,
``reversible`` for ``rev``, ``implicit``/``unroll`` for ``deq``); other stages run ``store``. Every
combination (or, beyond :data:`MAX_COMBINATIONS`, every uniform one and the one with every stack
on its leanest plan) is estimated with
:mod:`gnnspec.memory.estimate`, and the planner picks the assignment with the least estimated
relative time whose peak fits the budget, the smaller peak breaking ties. A ``checkpoint`` stage
gets the fewest segments that make the assignment fit (fewest segments: the largest segments, so
the fewest segment inputs kept).

Relative time (a model, not a measurement): a training step is a forward and a backward of about
two forwards, so ``store`` costs 3 forwards of a stage; ``checkpoint`` and ``reversible`` add one
forward of the stage (4); ``deq`` costs its iterations: ``unroll`` 3 per iteration, ``implicit``
one per forward iteration plus a vector-Jacobian product (2) per backward iteration.

``auto`` without a budget uses the free memory of the CUDA device when there is one, else picks
``store``. When nothing fits, :class:`NoFit` says what the leanest plan needs and what would make
it fit.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Sequence

from gnnspec import ir
from gnnspec.errors import SpecError
from gnnspec.memory.segments import PeakBySegments, fitted_peak, lowest_peak_segments

MAX_COMBINATIONS = 64
# plans by the memory they usually save, most first: beyond MAX_COMBINATIONS one assignment puts
# every stack on the first of its plans in this order
_LEAN_ORDER = ("reversible", "implicit", "checkpoint", "store", "unroll")


class MissingGraphSize(ValueError):
    """``auto`` has a budget to plan for but no graph size (nodes and edges) to plan on."""


class NoFit(Exception):
    """No plan assignment fits the budget (the command line exits 3 with this message)."""

    def __init__(self, budget_bytes: int, leanest: Any, suggestions: list[str], spec_name: str = "model") -> None:
        from gnnspec.memory.estimate import format_bytes

        self.budget_bytes = budget_bytes
        self.leanest = leanest  # the PlanEstimate with the smallest peak
        self.needed_bytes = int(leanest.peak_bytes)
        self.suggestions = suggestions
        self.estimate = None  # the Estimate, when raised by estimate_with_planner
        lines = [
            f"nothing fits the budget of {format_bytes(budget_bytes)}: the leanest plan "
            f"({leanest.name}) needs {format_bytes(leanest.peak_bytes)} "
            f"({format_bytes(leanest.peak_bytes - budget_bytes)} more)"
        ]
        if suggestions:
            lines.append("what would make it fit:")
            lines += [f"  - {s}" for s in suggestions]
        super().__init__("\n".join(lines))

    @property
    def message(self) -> str:
        return str(self)


def _candidates(model, stage) -> list[ir.Plan]:
    kinds = stage.valid_plans()
    out: list[ir.Plan] = []
    for k in kinds:
        if k == "store":
            out.append(model.stage_plan(stage, ir.Store(kind="store")))  # a deq's is unroll
        elif k == "checkpoint":
            out.append(ir.Checkpoint(kind="checkpoint", segments=stage.default_segments()))
        elif k == "unroll":
            continue  # `store` already is unroll for deq
        else:
            out.append(ir.PLAN_MODELS[k](kind=k))
    return out


def candidate_assignments(model, fixed=None) -> list[list[ir.Plan]]:
    """The plan assignments to estimate: ``fixed`` (a plan, or one per stage or per stack) if given; else, per
    stage, its own ``plan=``, the spec's plan, or (``auto``) every valid plan."""
    if fixed is not None:
        return [model.assignment(fixed)]
    per_stage: list[list[ir.Plan]] = []
    for st in model.stages:
        own = getattr(st.stage, "plan", None)
        chosen = own if own is not None else model.spec.plan
        if chosen.kind != "auto":
            per_stage.append([model.stage_plan(st, chosen)])
        elif st.is_stack:
            per_stage.append(_candidates(model, st))
        else:
            per_stage.append([ir.Store(kind="store")])
    total = 1
    for c in per_stage:
        total *= len(c)
    if total <= MAX_COMBINATIONS:
        combos = [list(c) for c in itertools.product(*per_stage)]
    else:
        kinds = sorted({p.kind for c in per_stage for p in c})
        combos = [[next((p for p in c if p.kind == k), c[0]) for c in per_stage] for k in kinds]
        # and every stack on its leanest plan, which no uniform assignment is where stacks differ
        # (rev stacks reversible, a deq implicit): without it, nothing fit a budget that this fits
        combos.append([min(c, key=lambda p: _LEAN_ORDER.index(p.kind)) for c in per_stage])
        unique = {repr(a): a for a in combos}  # a kind a stack lacks falls back to its first plan
        combos = list(unique.values())
    # store first: the baseline of relative time, and the first choice when it fits
    combos.sort(key=lambda a: sum(p.kind != "store" and p.kind != "unroll" for p in a))
    return combos


def given_segments(model, fixed=None) -> list[bool]:
    """Per stage, whether the user gave its checkpoint segment count (``checkpoint(segments=k)``
    in ``fixed``, else in the stage's own ``plan=``, else in the spec's plan): the planner keeps
    such a count and re-plans only the counts it chose itself."""
    if fixed is not None:
        plans = ir.runnable_plans([st.stage for st in model.stages], fixed)
    else:
        plans = [getattr(st.stage, "plan", None) or model.spec.plan for st in model.stages]
    return [p.kind == "checkpoint" and p.segments is not None for p in plans]


def choose(estimates: list, budget_bytes: int | None, model, given: Sequence[bool] = ()) -> Any:
    """The estimate to run: with a budget, the fastest that fits (each checkpoint assignment
    re-planned, in ``estimates``, with the fewest segments that fit, except where ``given``
    (:func:`given_segments`) says the user set the count); without, the fastest (all-``store``,
    or the fixed assignment). None when nothing fits."""
    if not estimates:
        return None
    if budget_bytes is None:
        return estimates[0] if len(estimates) == 1 else min(estimates, key=lambda e: (e.relative_time, e.peak_bytes))
    # a checkpoint assignment runs with the fewest segments that fit (or, when no count fits,
    # the count with the lowest peak): it replaces the default count in the list
    for i, e in enumerate(list(estimates)):
        if not any(s.startswith("checkpoint") for s in e.stages):
            continue
        found = _fewest_segments(model, e, budget_bytes, given)
        if found is None or found.stages == e.stages:
            continue
        if any(x.stages == found.stages for x in estimates):
            estimates.remove(e)
        else:
            estimates[estimates.index(e)] = found
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda e: (round(e.relative_time, 6), e.peak_bytes))


def _plans_of(model, stages_text: Sequence[str]) -> list[ir.Plan]:
    from gnnspec.syntax import parse_plan

    return [model.stage_plan(st, parse_plan(t)) for st, t in zip(model.stages, stages_text)]


def _fewest_segments(model, estimate, budget_bytes: int, given: Sequence[bool] = ()):
    """The assignment with each checkpoint stage at the fewest segments that fit (stages searched
    one after the other, the others at their current counts), or, where no count fits, at the
    count with the lowest peak; a stage whose count the user gave (``given[i]``) keeps it.

    The peak of ``k`` segments of an ``L``-step stack is close to ``a + b k + c ceil(L / k)`` (the
    segment inputs kept, plus one segment's activations), so three exact estimates fit ``a, b, c``;
    the model proposes the count, and exact estimates confirm it and its neighbour (a search over
    the powers of two and a bisection take over if the model misses)."""
    from gnnspec.memory.estimate import plan_estimate

    plans = _plans_of(model, estimate.stages)
    for i, (st, p) in enumerate(zip(model.stages, plans)):
        if p.kind != "checkpoint" or (i < len(given) and given[i]):
            continue
        steps = st.steps()

        def exact(k: int, i: int = i) -> int:
            trial = list(plans)
            trial[i] = ir.Checkpoint(kind="checkpoint", segments=k)
            return model.estimate(trial)[0]

        peak = PeakBySegments(exact)
        if p.segments:
            peak.known[min(p.segments, steps)] = estimate.peak_bytes
        plans[i] = ir.Checkpoint(kind="checkpoint", segments=_segments_for(peak, steps, budget_bytes))
    return plan_estimate(model, plans, budget_bytes)


def _segments_for(at: PeakBySegments, steps: int, budget_bytes: int) -> int:
    """The fewest segments ``k`` in ``1..steps`` with ``at(k) <= budget_bytes``, else the ``k`` with
    the lowest peak (:func:`lowest_peak_segments`). The peak is taken to fall, then rise, with
    ``k``, with jags (how ``steps`` divides into ``k`` segments sets the last one's length): where
    the fitted search finds no count that fits, the lowest-peak search checks, and a bisection
    below its count finds the fewest that fit; so a budget at the lowest peak of any count fits."""
    found = _fewest_fitting(at, steps, budget_bytes)
    if at(found) <= budget_bytes:
        return found
    lowest = lowest_peak_segments(at, steps)
    if at(lowest) > budget_bytes:
        return lowest
    fewest = _bisect_fitting(at, 1, lowest, budget_bytes)
    return fewest if at(fewest) <= budget_bytes else lowest


def _fewest_fitting(at: PeakBySegments, steps: int, budget_bytes: int) -> int:
    """:func:`_segments_for` from the fitted model and a walk, which may miss a jag that fits."""
    if steps <= 4:
        fitting = [k for k in range(1, steps + 1) if at(k) <= budget_bytes]
        return fitting[0] if fitting else at.lowest()
    samples = sorted({2, max(2, round(math.sqrt(steps))), steps})
    guess = _modelled_segments([(k, at(k)) for k in samples], steps, budget_bytes)
    if guess is not None:
        k, fits = guess
        if fits and at(k) <= budget_bytes and (k == 1 or at(k - 1) > budget_bytes):
            return k
        neighbours = [j for j in (k - 1, k + 1) if 1 <= j <= steps]
        if not fits and at(k) > budget_bytes and all(at(j) >= at(k) for j in neighbours):
            return at.lowest()  # a low point above the budget: no count fits
    return _walk_segments(at, steps, budget_bytes)


def _modelled_segments(samples: list[tuple[int, int]], steps: int, budget_bytes: int) -> tuple[int, bool] | None:
    """From exact peaks at three counts, :func:`fitted_peak` searched: the fewest ``k`` it says
    fits (and True), else its lowest point (and False). None when singular."""
    model = fitted_peak(samples, steps)
    if model is None:
        return None
    fewest = model.fewest_within(budget_bytes)
    return (fewest, True) if fewest is not None else (model.lowest(), False)


def _walk_segments(at: PeakBySegments, steps: int, budget_bytes: int) -> int:
    """Up the powers of two to the first count that fits (or to where the peak rises), then a
    bisection down to the fewest that fit."""
    grid = [2**j for j in range(0, 32) if 2**j < steps] + [steps]
    previous = None
    for k in grid:
        if at(k) <= budget_bytes or (previous is not None and at(k) > at(previous)):
            break
        previous = k
    if at(k) > budget_bytes:
        return at.lowest()
    return _bisect_fitting(at, previous + 1 if previous is not None else 1, k, budget_bytes)


def _bisect_fitting(at: PeakBySegments, lo: int, hi: int, budget_bytes: int) -> int:
    """The fewest count in ``lo..hi`` with ``at(k) <= budget_bytes``, bisecting as if the peak
    fell monotonically over the range (``at(hi)`` fits; a jag may make the answer not fit)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid) <= budget_bytes:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---------------------------------------------------------------------------- the public entry


def default_budget() -> int | None:
    """Free memory of the current CUDA device, or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return int(free)
    except Exception:  # pragma: no cover - no usable CUDA
        return None
    return None


def resolve_budget(spec: ir.Spec, budget: int | str | None = None, *, auto: ir.Auto | None = None,
                   device: str | None = None, device_memory: bool = True) -> tuple[int | None, str | None]:
    """The budget ``auto`` plans for, and the device it is for: ``budget`` if given, else the
    ``auto`` plan's own (``auto``'s, else the spec's ``plan``'s when it is ``auto``), else (with
    ``device_memory``, unless ``device`` is ``cpu``) the free memory of the CUDA device, which
    makes the device ``cuda``; None when there is none."""
    from gnnspec.memory.estimate import device_kind, parse_size

    device = None if device is None else device_kind(device)
    budget_bytes = parse_size(budget)
    for plan in (auto, spec.plan):
        if budget_bytes is None and isinstance(plan, ir.Auto):
            budget_bytes = plan.budget
    if budget_bytes is None and device_memory and device in (None, "cuda"):
        budget_bytes = default_budget()
        if budget_bytes is not None:
            device = "cuda"
    return budget_bytes, device


def plan_spec(spec: ir.Spec | str, *, nodes: int, edges: int, budget: int | str | None = None,
              in_channels: int | None = None, out_channels: int | None = None, dtype: str | None = None,
              optimizer: str | None = None, device: str | None = None, self_loops: int = 0) -> list[ir.Plan]:
    """The plan per resolved stage that ``build(plan="auto")`` runs: the fastest assignment whose
    estimated peak fits ``budget`` (default: the spec's ``auto(budget=...)``, else free CUDA
    memory, else every stack ``store``). ``self_loops`` as :func:`gnnspec.estimate`. Raises
    :class:`NoFit` when nothing fits."""
    est = estimate_with_planner(spec, nodes=nodes, edges=edges, budget=budget, in_channels=in_channels,
                                out_channels=out_channels, dtype=dtype, optimizer=optimizer, device=device,
                                self_loops=self_loops)
    return est.chosen_assignment


def estimate_with_planner(spec, *, nodes, edges, budget=None, plan=None, in_channels=None, out_channels=None,
                          dtype=None, optimizer=None, device=None, self_loops=0):
    """:func:`gnnspec.memory.estimate.estimate_spec` with ``auto``'s default budget, raising
    :class:`NoFit` when a budget is set and nothing fits."""
    from gnnspec.memory.estimate import estimate_spec

    if isinstance(spec, str):
        import gnnspec

        spec = gnnspec.parse(spec)
    plan = requested_plan(spec, plan)
    # `auto` (or `auto(budget=...)`) asked for by name is the planner, as no plan is
    auto = plan if isinstance(plan, ir.Auto) else None
    if auto is not None:
        plan = None
    budget_bytes, device = resolve_budget(spec, budget, auto=auto, device=device, device_memory=plan is None)
    est = estimate_spec(spec, nodes=nodes, edges=edges, in_channels=in_channels, out_channels=out_channels,
                        budget=budget_bytes, plan=plan, dtype=dtype, optimizer=optimizer, device=device or "cpu",
                        self_loops=self_loops)
    if budget_bytes is not None and est.chosen is None:
        err = no_fit(spec, est, nodes=nodes, edges=edges, in_channels=in_channels, out_channels=out_channels,
                     dtype=dtype, optimizer=optimizer, device=device or "cpu", self_loops=self_loops)
        err.estimate = est  # the table of every plan, for the command line to print
        raise err
    return est


def no_fit(spec: ir.Spec, est, *, nodes: int, edges: int, in_channels=None, out_channels=None, dtype=None,
           optimizer=None, device="cpu", self_loops: int = 0) -> NoFit:
    """The :class:`NoFit` for an estimate where nothing fits, with what would make it fit."""
    from gnnspec.memory.estimate import estimate_spec, format_bytes

    budget = est.budget_bytes
    leanest = min(est.plans, key=lambda p: p.peak_bytes)

    def fits(candidate: ir.Spec, **kw) -> Any:
        try:
            e = estimate_spec(candidate, nodes=kw.get("nodes", nodes), edges=kw.get("edges", edges),
                              in_channels=in_channels, out_channels=out_channels, budget=budget,
                              dtype=kw.get("dtype", dtype), optimizer=optimizer, device=device,
                              self_loops=kw.get("self_loops", self_loops))
        except Exception:
            return None
        return e.chosen_plan

    suggestions: list[str] = []
    # fewer channels: the largest hidden width (a multiple of 8, keeping groups and heads valid) that fits
    stacks = [s for s in spec.model if isinstance(s, ir.Stack)]
    if stacks:
        hidden = spec.hidden
        step = 8
        for s in stacks:
            div = getattr(s, "groups", 1) * (s.op.heads or 1)
            step = max(step, div)
        best = None
        lo, hi = 1, hidden // step - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            cand = _with_hidden(spec, mid * step)
            if cand is not None and fits(cand):
                best, lo = mid * step, mid + 1
            else:
                hi = mid - 1
        if best:
            suggestions.append(f"fewer channels: hidden {hidden} -> {best}")
    # more groups for reversible stacks
    revs = [i for i, s in enumerate(spec.model) if isinstance(s, ir.Rev)]
    if revs:
        for groups in (3, 4, 8, 16):
            cand = _with_groups(spec, revs, groups)
            if cand is None:
                continue
            p = fits(cand)
            if p is not None:
                suggestions.append(f"more groups: rev(groups={groups}) ({p.name}, {format_bytes(p.peak_bytes)})")
                break
    if (dtype or spec.dtype) in ("float32", "float64"):
        p = fits(spec, dtype="bfloat16")
        if p is not None:
            suggestions.append(f"dtype bfloat16 ({p.name}, {format_bytes(p.peak_bytes)})")
    # a smaller graph, nodes and edges scaled together
    lo, hi, best = 0.0, 1.0, None
    for _ in range(12):
        mid = (lo + hi) / 2
        n, e = max(1, int(nodes * mid)), max(1, int(edges * mid))
        if fits(spec, nodes=n, edges=e, self_loops=min(e, int(self_loops * mid))):
            best, lo = (n, e), mid
        else:
            hi = mid
    if best:
        suggestions.append(f"a smaller graph: at most {best[0]:,} nodes and {best[1]:,} edges (same density)")
    return NoFit(budget, leanest, suggestions, spec.name)


def _with_hidden(spec: ir.Spec, hidden: int) -> ir.Spec | None:
    model = []
    for s in spec.model:
        if isinstance(s, ir.Stack) and s.hidden is not None:
            s = s.model_copy(update={"hidden": max(1, s.hidden * hidden // spec.hidden)})
        model.append(s)
    try:
        cand = spec.model_copy(update={"hidden": hidden, "model": tuple(model)})
        import gnnspec

        return gnnspec.check(cand)
    except Exception:
        return None


def _with_groups(spec: ir.Spec, indices: list[int], groups: int) -> ir.Spec | None:
    model = list(spec.model)
    for i in indices:
        model[i] = model[i].model_copy(update={"groups": groups})
    try:
        cand = spec.model_copy(update={"model": tuple(model)})
        import gnnspec

        return gnnspec.check(cand)
    except Exception:
        return None


# ---------------------------------------------------------------------------- plans for build


def split_plan_name(text: str) -> list[str]:
    """The plans of an assignment's name (:attr:`Estimate.chosen`): ``"reversible"`` is one plan,
    ``"checkpoint(segments=4), reversible"`` one per stack, in order."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def requested_plan(spec: ir.Spec, plan: Any) -> Any:
    """A plan given to ``build`` or ``estimate`` (``--plan`` on the command line) as IR, checked
    against ``spec`` (:func:`gnnspec.check.requested_plan_errors`): a plan or its text, or a list
    of either, one per resolved stage or one per stack. A planner's name such as
    ``"checkpoint(segments=4), reversible"`` is one plan per stack.

    Raises the first error as a `SpecError` located in the plan's text (``<plan>``), as a syntax
    error in it is. None and an ``Estimate`` pass through.
    """
    from gnnspec.check import plan_argument_errors, requested_plan_errors

    stacks = [stage for stage in spec.model if isinstance(stage, ir.Stack)]
    if isinstance(plan, str):
        texts = split_plan_name(plan)
        if len(texts) > 1:
            if len(texts) != len(stacks):
                raise SpecError(
                    f"{len(texts)} plans given for a model with {len(stacks)} stack{'s' * (len(stacks) != 1)}",
                    end_column=len(plan) + 1,
                    hint=f"give one plan for the whole model, or {len(stacks)} separated by commas "
                         "(one per stack, in order)",
                ).located("<plan>", plan)
            return _checked_plans_in_text(spec, plan, texts, stacks)
        plan = texts[0]
    if not isinstance(plan, (list, tuple)):
        return _checked_plan(plan, lambda p: requested_plan_errors(spec, p))
    if len(plan) == len(stacks):
        return [_checked_plan(p, lambda q, s=stack: requested_plan_errors(spec, q, s)) for p, stack in zip(plan, stacks)]
    # one per resolved stage, as the planner gives them: those include inserted stages the spec
    # does not list, so only the arguments are checked here
    return [_checked_plan(p, plan_argument_errors) for p in plan]


def _checked_plans_in_text(spec: ir.Spec, text: str, items: list[str], stacks: list[ir.Stack]) -> list[ir.Plan]:
    """One plan per stack from ``text``'s comma-separated ``items``; an error in an item is
    located in the whole text, under the item."""
    from gnnspec.check import requested_plan_errors

    plans, start = [], 0
    for item, stack in zip(items, stacks):
        start = text.index(item, start)
        try:
            plans.append(_checked_plan(item, lambda p, s=stack: requested_plan_errors(spec, p, s)))
        except SpecError as err:
            if err.line == 1:
                err.column += start
                err.end_column = None if err.end_column is None else err.end_column + start
            raise err.located("<plan>", text) from None
        start += len(item)
        start = text.find(",", start) + 1  # past the comma, where an empty next item is
    return plans


def _checked_plan(plan: Any, errors_of: Callable[[ir.Plan], Iterable[SpecError]]) -> Any:
    """``plan`` (IR or text) as IR; the first of ``errors_of(plan)`` raised, located in its text."""
    from gnnspec.memory.estimate import Estimate
    from gnnspec.syntax import parse_plan

    if plan is None or isinstance(plan, Estimate):
        return plan
    if not isinstance(plan, (str, *ir.PLAN_MODELS.values())):
        raise TypeError(
            f"a plan is its name (\"reversible\", \"checkpoint(segments=4)\"), a gnnspec plan, a list of "
            f"those (one per stack or per stage), or an Estimate; got {type(plan).__name__}"
        )
    text = plan if isinstance(plan, str) else None
    parsed = parse_plan(text) if text is not None else plan
    for error in errors_of(parsed):
        raise error.located("<plan>", text)
    return parsed


def plans_for_build(spec: ir.Spec, plan: Any = None, *, nodes: int | None = None, edges: int | None = None,
                    budget: int | str | None = None, in_channels: int | None = None,
                    out_channels: int | None = None, device: str | None = None, self_loops: int = 0) -> Any:
    """What ``build`` runs: ``plan`` as given, unless it (or, with no ``plan``, the spec) is
    ``auto``. Then the planner chooses per stage on a graph of ``nodes``/``edges`` (default: the
    spec's ``graph:``; ``self_loops`` of its edges are self-loops) under ``budget`` (default:
    ``auto``'s own, else free CUDA memory); with no budget at all every stage runs ``store``
    (returns None). Raises :class:`NoFit` when nothing
    fits, :class:`MissingGraphSize` when a budget applies but the graph size is unknown."""
    from gnnspec.memory.estimate import Estimate

    if isinstance(plan, Estimate):
        return plan.chosen_assignment
    plan = requested_plan(spec, plan)
    auto = plan if isinstance(plan, ir.Auto) else spec.plan if plan is None and isinstance(spec.plan, ir.Auto) else None
    if auto is None:
        return plan
    budget_bytes, device = resolve_budget(spec, budget, auto=auto, device=device)
    if budget_bytes is None:
        return None  # no budget: `auto` runs `store`
    if nodes is None or edges is None:
        if spec.graph is None:
            raise MissingGraphSize(
                f"plan auto with a budget of {budget_bytes:,} bytes needs the graph's size: give nodes= and "
                "edges= (--nodes/--edges on the command line), or declare `graph: nodes=..., edges=...`"
            )
        nodes, edges = spec.graph.nodes, spec.graph.edges
    planned = spec.model_copy(update={"plan": ir.Auto(kind="auto", budget=budget_bytes)})
    return plan_spec(planned, nodes=nodes, edges=edges, budget=budget_bytes, in_channels=in_channels,
                     out_channels=out_channels, device=device, self_loops=self_loops)
