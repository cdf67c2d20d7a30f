"""The analytic memory estimate of one training step, per execution plan (SPEC.md section 5).

    est = estimate_spec(spec, nodes=132534, edges=39561252, budget="16GiB")
    est.chosen                 # "reversible"
    est.to_json()              # what `gnnspec estimate-mem --json` prints

Nothing here runs a model. The step is replayed as a timeline of storage allocations and releases
(:mod:`gnnspec.memory.timeline`), assembled from calibrated pieces (:mod:`gnnspec.memory.pieces`):

* each stack layer is the chain of its units (conv, norm, act, dropout; in the order of its
  formula), inside the layer's skeleton where it has one (the residual add of ``res``/``res+``,
  ``dense``'s concatenation, ``rev``'s group split, ``deq``'s ``+ x``);
* a stage under ``store`` is the chain of its layers; under ``checkpoint(k)`` each segment runs
  without saving, keeps its input and its dropout tape (one bit per mask element, on CPU), and in
  backward recomputes its layers with saving before their backward; under ``reversible`` the
  forward runs without saving and the backward replays the calibrated inverse of each layer; ``deq`` stages are the solver's buffers and ``f``'s
  applications (``implicit``) or every iteration chained (``unroll``, assuming ``max_iter``);
* the model is the chain of its stages on ``x`` (which needs no gradient), then the
  cross-entropy loss, the backward, and the optimizer step (one parameter at a time on CPU, as
  torch does, or the ``foreach`` kernels on CUDA).

Before the step live: parameters and buffers, optimizer state, ``x`` (spec dtype),
``edge_index`` (int64), labels (int64), the prepared graph (:func:`gnnspec.ops.prepared_bytes`:
``E + N`` columns per edge-index form, two CSR matrices of ``E + N`` or ``E`` entries per CSR
form; exact for a graph without duplicate edges whose self-loops, if any, are counted by
``self_loops``: ``estimate-mem --data`` counts them, forms and ops that add a self-loop to every
node replace them, the others keep them as edges). Stacks of repeated layers are
composed from three layers, the middle one repeated in closed form, so a 1001-layer stack costs
what a 3-layer one does.
"""

from __future__ import annotations

import numbers
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence, get_args

from gnnspec import ir
from gnnspec.memory import pieces
from gnnspec.memory.pieces import (
    buffer_bytes, draws_dropout, instantiate, norm_act_key, param_bytes, rev_back_key,
)
from gnnspec.memory.timeline import Program, chain, new_sid, peak, resolve, substitute, summarize

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to this

# ---------------------------------------------------------------------------- results


@dataclass
class PlanEstimate:
    """The estimated peak of one plan assignment (one plan per resolved stage)."""

    name: str
    stages: list[str]
    peak_bytes: int
    fits: bool | None
    relative_time: float
    breakdown: dict[str, int]
    phase: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stages": list(self.stages),
            "peak_bytes": int(self.peak_bytes),
            "fits": bool(self.fits) if self.fits is not None else True,
            "relative_time": round(float(self.relative_time), 4),
            "breakdown": {k: int(self.breakdown.get(k, 0)) for k in BREAKDOWN_KEYS},
        }


BREAKDOWN_KEYS = ("parameters", "gradients", "optimizer", "inputs", "activations", "temporaries")


@dataclass
class Estimate:
    """Every candidate plan assignment of a spec on a graph, and the one chosen under the budget."""

    spec: str
    nodes: int
    edges: int
    dtype: str
    budget_bytes: int | None
    plans: list[PlanEstimate]
    chosen: str | None
    device: str = "cpu"
    stage_kinds: list[str] = field(default_factory=list)

    @property
    def chosen_plan(self) -> PlanEstimate | None:
        return next((p for p in self.plans if p.name == self.chosen), None)

    @property
    def chosen_assignment(self) -> list[ir.Plan] | None:
        """The chosen plan per resolved stage, as IR plans (for ``build``)."""
        from gnnspec.syntax import parse_plan

        p = self.chosen_plan
        return None if p is None else [parse_plan(t) for t in p.stages]

    def plan(self, name: str) -> PlanEstimate:
        for p in self.plans:
            if p.name == name:
                return p
        raise KeyError(f"no plan {name!r}; estimated: {', '.join(p.name for p in self.plans)}")

    def to_json(self) -> dict[str, Any]:
        """The object ``gnnspec estimate-mem --json`` prints (SPEC.md section 6)."""
        return {
            "spec": self.spec,
            "graph": {"nodes": int(self.nodes), "edges": int(self.edges)},
            "dtype": self.dtype,
            "budget_bytes": None if self.budget_bytes is None else int(self.budget_bytes),
            "plans": [p.to_json() for p in self.plans],
            "chosen": self.chosen,
        }

    def __rich__(self):
        from rich.table import Table

        budget = "no budget" if self.budget_bytes is None else f"budget {format_bytes(self.budget_bytes)}"
        table = Table(
            title=f"{self.spec}: N={self.nodes:,}, E={self.edges:,}, {self.dtype}, {budget}",
            caption="* chosen: the fastest plan whose estimated peak fits",
        )
        for column in ("", "plan", "peak", "params", "grads", "optim", "inputs", "activ.", "temp.", "time", "fits"):
            # a long plan (one per stack) wraps at its commas; the numbers are never cut
            table.add_column(column, justify="left" if column in ("", "plan") else "right", no_wrap=column != "plan")
        for p in self.plans:
            b = p.breakdown
            table.add_row(
                "*" if p.name == self.chosen else "",
                p.name,
                format_bytes(p.peak_bytes),
                *(format_bytes(b.get(k, 0)) for k in BREAKDOWN_KEYS),
                f"{p.relative_time:.2f}x",
                "yes" if p.fits or p.fits is None else "no",
                style="bold" if p.name == self.chosen else None,
            )
        return table


def format_bytes(n: int | float) -> str:
    """``n`` bytes in the largest binary unit below it, up to TiB (beyond 10**6 TiB in
    scientific notation, so a table column stays narrow)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    if unit == "B":
        return f"{n:.0f} B"
    return f"{n:.3g} {unit}" if abs(n) >= 10**6 else f"{n:.2f} {unit}"


_SIZE_TEXT = re.compile(r"([0-9]+(?:_[0-9]+)*(?:\.[0-9]+)?)([A-Za-z]*)")


def parse_size(value: int | str | None) -> int | None:
    """Bytes of a budget: a positive int, or a size written as in a spec (``16GiB``, ``500MB``,
    ``1_000B``, a plain number of bytes; units :data:`gnnspec.ir.SIZE_UNITS`, case as written).
    ``ValueError`` (with a hint) for anything else."""
    from gnnspec.errors import nearest

    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number: int | None = value
    else:
        text = str(value).strip()
        match = _SIZE_TEXT.fullmatch(text)
        unit = match.group(2) if match else ""
        if match is None or (unit and unit not in ir.SIZE_UNITS):
            guess = nearest(unit, list(ir.SIZE_UNITS)) if unit else None
            raise ValueError(f"`{text}` is not a size: write a number and a unit ({', '.join(ir.SIZE_UNITS)}), "
                             f"e.g. 16GiB" + (f"; did you mean `{guess}`?" if guess else ""))
        number = ir.size_bytes(match.group(1) + (unit or "B"))
        if number is None:
            raise ValueError(f"`{text}` is not a whole number of bytes")
    if number < 1:
        raise ValueError(f"a budget must be positive, got {value}")
    return int(number)


# ---------------------------------------------------------------------------- shapes and units


@dataclass(frozen=True)
class Graph:
    nodes: int
    edges: int
    s: int  # element size of the spec dtype
    device: str = "cpu"
    loops: int = 0  # edges that are self-loops

    @property
    def prepared_edges(self) -> int:
        """The edge count the prepared forms and the ops' pieces are calibrated in: edges other
        than self-loops (the forms that add a self-loop to every node replace the given ones)."""
        return self.edges - self.loops

    def edges_for(self, form: str) -> int:
        """The edge count of an op on graph ``form``, or of that prepared form: every edge where
        the form keeps the given self-loops as edges (:func:`gnnspec.ops.keeps_self_loops`), else
        :attr:`prepared_edges`."""
        from gnnspec.ops import keeps_self_loops

        return self.edges if keeps_self_loops(form) else self.prepared_edges


class Unit:
    """One calibrated piece at a shape."""

    __slots__ = ("key", "shape")

    def __init__(self, key: str, **shape: int) -> None:
        self.key = key
        self.shape = shape

    @property
    def has_params(self) -> bool:
        return bool(pieces.entry(self.key)["params"])

    def params(self) -> list[int]:
        return param_bytes(self.key, self.shape)

    def buffers(self) -> list[int]:
        return buffer_bytes(self.key, self.shape)


def _variant(unit: Unit, mode: str, grad_in: bool, accum: bool) -> tuple[str, bool]:
    """The recorded variant of ``unit`` and whether its output requires grad."""
    if mode == "o":
        return "o", False
    if grad_in:
        return ("ga" if accum and unit.has_params and pieces.has_variant(unit.key, "ga") else "g"), True
    if unit.has_params:
        return ("na" if accum and pieces.has_variant(unit.key, "na") else "n"), True
    return "o", False


def unit_program(unit: Unit, variant: str, extras: dict[str, int] | None = None) -> Program:
    prog, _ = instantiate(unit.key, variant, unit.shape)
    if extras:
        prog = prog.bind(**extras)
    return prog


def chain_units(units: Sequence[Unit], mode: str, grad_in: bool, accum: bool,
                extras: dict[str, int] | None = None, held: int | None = None,
                holds: dict[int, int] | None = None) -> tuple[Program, bool]:
    """The chain of ``units`` (``held``, ``holds`` as :func:`chain`); returns it and whether its
    output requires grad."""
    programs = []
    for u in units:
        variant, grad_in = _variant(u, mode, grad_in, accum)
        programs.append(unit_program(u, variant, extras))
    return chain(programs, held=held, holds=holds), grad_in


def in_skeleton(key: str, shape: dict[str, int], mode: str, grad_in: bool, inner_units: Sequence[Unit],
                accum: bool, extras: dict[str, int] | None = None, n_holes: int = 1,
                inner_shape_units: Sequence[Sequence[Unit]] | None = None,
                skeleton_params: bool = False, holds: dict[int, int] | None = None) -> tuple[Program, bool]:
    """A skeleton with each hole filled by the chain of ``inner_units`` (``holds`` as
    :func:`~gnnspec.memory.timeline.chain`). ``skeleton_params``: the skeleton holds a convolution
    (its parameters make everything after it require grad)."""
    groups = inner_shape_units or [inner_units] * n_holes
    inner: dict[int, Program] = {}
    if skeleton_params and mode != "o":
        sk_variant = ("ga" if accum else "g") if grad_in else ("na" if accum else "n")
        prog, _ = chain_units(groups[0], mode, True, accum, extras)
        sk, holes = instantiate(key, sk_variant, shape)
        fwd, bwd = substitute(sk.fwd, sk.bwd, holes, {0: prog})
        return Program(fwd, bwd, dict(sk.roles)), True
    if skeleton_params:
        prog, _ = chain_units(groups[0], mode, False, accum, extras)
        sk, holes = instantiate(key, "o", shape)
        fwd, bwd = substitute(sk.fwd, sk.bwd, holes, {0: prog})
        return Program(fwd, bwd, dict(sk.roles)), False
    grad_out = grad_in
    # the holes of a skeleton see their input's requires-grad as the skeleton does: the first
    # hole gets the skeleton's input, later ones a tensor that depends on an earlier hole
    for k, units in enumerate(groups):
        prog, g = chain_units(units, mode, grad_in if k == 0 else (grad_in or grad_out), accum, extras, holds=holds)
        grad_out = grad_out or g
        inner[k] = prog
    variant = "o" if mode == "o" else ("g" if grad_in else "n")
    if not grad_in and not grad_out:
        variant = "o"
    sk, holes = instantiate(key, variant, shape)
    fwd, bwd = substitute(sk.fwd, sk.bwd, holes, inner)
    return Program(fwd, bwd, dict(sk.roles)), grad_out or grad_in


# ---------------------------------------------------------------------------- stages


def plan_text(plan: ir.Plan) -> str:
    if isinstance(plan, ir.Checkpoint):
        return "checkpoint" if plan.segments is None else f"checkpoint(segments={plan.segments})"
    if isinstance(plan, ir.Auto):
        return "auto"
    return plan.kind


class StageModel:
    """One resolved stage: its candidate plans, parameters, programs and time per plan."""

    def __init__(self, resolved, spec: ir.Spec, graph: Graph, index: int) -> None:
        from gnnspec.lower.widths import stack_hidden

        self.resolved = resolved
        self.stage = resolved.stage
        self.kind = self.stage.kind
        self.graph = graph
        self.index = index
        self.hidden = stack_hidden(spec, self.stage) if isinstance(self.stage, ir.Stack) else spec.hidden
        self.is_stack = isinstance(self.stage, ir.Stack)
        self.jk = getattr(self.stage, "jk", "none")  # jumping knowledge: none for stages without it
        self.row = graph.nodes * self.hidden * graph.s  # bytes of one [N, hidden] tensor
        # a layer's output, which jk combines: [N, hidden], except in a dense stack (jk only at
        # depth 1 there), whose layer outputs its input beside the conv's
        self.jk_width = self.resolved.out_width if self.kind == "dense" else self.hidden
        self.jk_row = graph.nodes * self.jk_width * graph.s

    # -- plans

    def valid_plans(self) -> list[str]:
        if not self.is_stack:
            return ["store"]
        if self.kind == "rev":
            return ["store", "checkpoint", "reversible"]
        if self.kind == "deq":
            return ["store", "checkpoint", "implicit", "unroll"]
        return ["store", "checkpoint"]

    def default_segments(self) -> int:
        return ir.default_segments(self.steps())

    def steps(self) -> int:
        return 1 if self.kind == "deq" else self.stage.depth

    # -- the pieces of a layer

    def _conv_unit(self, width: int, in_width: int | None = None) -> Unit:
        from gnnspec.memory.pieces import op_key

        op = self.stage.op
        key = op_key(op.name, dict(op.args))
        g = self.graph
        from gnnspec.ops import graph_form

        shape = {"N": g.nodes, "E": g.edges_for(graph_form(op)), "O": width, "s": g.s}
        _calibrated(key, op, shape)
        heads = op.heads
        if heads is not None:
            shape.update(H=heads, C=width // heads)
        if in_width is not None and in_width != width:
            key += ":wide"
            shape["I"] = in_width
        return Unit(key, **shape)

    def _glue(self, width: int) -> tuple[list[Unit], list[Unit], list[Unit]]:
        """(norm, act, dropout) units at ``width`` (identities left out); the dropout list is empty
        where the dropout (the shared mask of rev/deq) runs inside the norm's unit."""
        st, g = self.stage, self.graph
        drop = [Unit(dropout_key(g), N=g.nodes, D=width, s=g.s)] if st.dropout > 0 else []
        if ir.act_in_place(st.norm, st.act):  # one unit: the activation (and dropout) write the norm's output
            fused = ir.drop_in_place(self.kind, st.norm, st.act, st.dropout)
            between = ("mask" if self.kind in ("rev", "deq") else "drop") if fused else None
            unit = Unit(norm_act_key(st.norm, st.act, between), N=g.nodes, D=width, s=g.s)
            return [unit], [], [] if fused else drop
        norm = [Unit(f"norm:{st.norm}", N=g.nodes, D=width, s=g.s)] if st.norm != "none" else []
        act = [Unit(f"act:{st.act}", N=g.nodes, D=width, s=g.s)] if st.act != "none" else []
        return norm, act, drop

    def layer_units(self, layer: int = 0) -> list[Unit]:
        """The units of layer ``layer`` (0-based), in the order they run (inside the hole, for
        kinds with a skeleton)."""
        kind, h, g = self.kind, self.hidden, self.graph
        if kind in ("rev", "deq"):
            w = h // self.stage.groups if kind == "rev" else h
            norm, act, drop = self._glue(w)
            mask = [Unit("mask", N=g.nodes, D=w, s=g.s)] if drop else []  # the stage's, in place of dropout
            return (norm + act + mask + [self._conv_unit(w)]) * (1 if kind == "rev" else self.stage.depth)
        if kind == "gcnii":
            norm, act, drop = self._glue(h)
            return drop + [Unit("op:gcn2", N=g.nodes, E=g.prepared_edges, D=h, s=g.s)] + norm + act
        in_width = h * (layer + 1) if kind == "dense" else h
        if layer == 0:
            in_width = self.resolved.in_width  # plain(project=false) starts at the input width
        norm_width = in_width if kind == "res+" else h
        norm, act, drop = self._glue(norm_width)
        if kind == "res+":
            return norm + act + drop + [self._conv_unit(h)]
        return [self._conv_unit(h, in_width)] + norm + act + drop

    def layer_program(self, layer: int, mode: str, grad_in: bool, accum: bool,
                      extras: dict[str, int] | None = None) -> tuple[Program, bool]:
        """One layer (``_step`` of the stack) as a program with roles X, Y, GY, GX."""
        kind, g, h = self.kind, self.graph, self.hidden
        units = self.layer_units(layer)
        if kind == "plain":  # drop(act(norm(conv(x)))) as ConvLayer._norm_act_drop(conv(x))
            return chain_units(units, mode, grad_in, accum, extras, held=1)
        if kind == "gcnii":
            return chain_units(units, mode, grad_in, accum, extras)
        if kind in ("res", "dense") and len(units) > 1:
            # the convolution inside the skeleton, the units after it as the hole
            conv = units[0]
            return in_skeleton(f"skel:{kind}:{conv.key}", conv.shape, mode, grad_in, units[1:], accum,
                               skeleton_params=True)
        if kind in ("res", "res+"):
            return in_skeleton(f"skel:{kind}", {"N": g.nodes, "D": h, "s": g.s}, mode, grad_in, units, accum)
        if kind == "dense":
            return in_skeleton("skel:dense", {"N": g.nodes, "I": h * (layer + 1), "O": h, "s": g.s}, mode,
                               grad_in, units, accum)
        raise ValueError(kind)  # rev: _rev_groups_chain

    # -- parameters

    def params(self) -> Counter[int]:
        """The stage's parameter tensors as ``{bytes: count}`` (shared ones once). A multiset, not a
        list, so that a stack of ``depth`` identical layers costs one entry, whatever ``depth``."""
        return self._tensors("params")

    def buffers(self) -> Counter[int]:
        return self._tensors("buffers")

    def _tensors(self, what: str) -> Counter[int]:
        kind, st, g = self.kind, self.stage, self.graph
        s = g.s
        get = (lambda u: u.params()) if what == "params" else (lambda u: u.buffers())  # noqa: E731

        def of(units: Sequence[Unit], times: int = 1) -> Counter[int]:
            return Counter({b: n * times for b, n in Counter(b for u in units for b in get(u)).items()})

        if kind == "linear":
            if what == "buffers":
                return Counter()
            r = self.resolved
            return Counter([r.out_width * r.in_width * s] + ([r.out_width * s] if st.bias else []))
        if kind == "mlp":
            return of(self._mlp_units())
        if kind == "norm":
            return of([Unit(f"norm:{st.type}", N=g.nodes, D=self.resolved.in_width, s=s)] if st.type != "none" else [])
        if kind == "act":
            return of([Unit(f"act:{st.fn}", N=g.nodes, D=self.resolved.in_width, s=s)] if st.fn != "none" else [])
        if not self.is_stack:
            return Counter()
        layers = 1 if st.tie else st.depth
        if kind == "deq":
            per_layer = len(self.layer_units()) // st.depth
            return of(self.layer_units()[:per_layer], layers)
        if kind == "rev":
            return of(self.layer_units(0), st.groups * layers)
        if kind == "dense":  # every layer's input is wider than the last one's
            return sum((of(self.layer_units(layer)) for layer in range(layers)), Counter())
        # layer 0 may start at the stage's input width (plain(project=false)); the rest are alike
        return of(self.layer_units(0)) + of(self.layer_units(1), layers - 1)

    def _mlp_units(self) -> list[Unit]:
        st, g, r = self.stage, self.graph, self.resolved
        dims = st.dims or (self.hidden,)
        units: list[Unit] = []
        width = r.in_width
        for i, dim in enumerate(dims):
            units.append(Unit("linear", N=g.nodes, I=width, O=dim, s=g.s))
            if i < len(dims) - 1:
                if st.norm != "none":
                    units.append(Unit(f"norm:{st.norm}", N=g.nodes, D=dim, s=g.s))
                if st.act != "none":
                    units.append(Unit(f"act:{st.act}", N=g.nodes, D=dim, s=g.s))
                units.append(Unit(dropout_key(g), N=g.nodes, D=dim, s=g.s) if st.dropout > 0 else None)
            width = dim
        return [u for u in units if u is not None]

    # -- programs

    def program(self, plan: ir.Plan, grad_in: bool) -> tuple[Program, bool]:
        """The stage under ``plan``: a program with roles X, Y, GY (and GX when its input needs a
        gradient), and whether its output requires grad."""
        kind, st, g = self.kind, self.stage, self.graph
        mode = "g"
        if kind == "linear":
            r = self.resolved
            u = Unit("linear" if st.bias else "linear:nobias", N=g.nodes, I=r.in_width, O=r.out_width, s=g.s)
            return chain_units([u], mode, grad_in, False)
        if kind == "mlp":
            return chain_units(self._mlp_units(), mode, grad_in, False)
        if kind in ("norm", "act", "dropout"):
            width = self.resolved.in_width
            key = {"norm": f"norm:{getattr(st, 'type', '')}", "act": f"act:{getattr(st, 'fn', '')}", "dropout": dropout_key(g)}[kind]
            if (kind == "norm" and st.type == "none") or (kind == "act" and st.fn == "none") or (kind == "dropout" and st.p == 0):
                return _identity(), grad_in
            return chain_units([Unit(key, N=g.nodes, D=width, s=g.s)], mode, grad_in, False)
        if kind in ("appnp", "sgc"):
            k = st.k
            return chain_units([Unit(f"{kind}:{k}", N=g.nodes, E=g.prepared_edges, D=self.resolved.in_width, s=g.s)],
                               mode, grad_in, False)
        if kind == "deq":
            return self._deq_program(plan, grad_in)
        if plan.kind == "checkpoint":
            return self._checkpoint_program(plan.segments or self.default_segments(), grad_in)
        if plan.kind == "reversible":
            return self._reversible_program(grad_in)
        return self._stack_program(grad_in)

    def _stage_extras(self, fwd: list[tuple]) -> dict[str, int]:
        """Storages a stack makes once per forward and its layers share: the dropout mask of
        ``rev``/``deq`` (drawn at the stage's start)."""
        extras: dict[str, int] = {}
        if self.kind in ("rev", "deq") and self.stage.dropout > 0:
            width = self.hidden  # rev: one full-width mask, each group function reads its slice
            m = new_sid()
            fwd.append(("a", m, _alloc(self.graph, self.graph.nodes * width * self.graph.s), None))
            extras["M"] = m
        return extras

    def _layers_chain(self, count: int, mode: str, grad_in: bool, extras: dict[str, int],
                      first_layer: int = 0) -> tuple[Program, bool]:
        """Cached :meth:`_build_layers_chain`: a checkpoint plan composes the same segment many
        times; a reuse gets fresh storage ids."""
        if self.kind == "dense":
            return self._build_layers_chain(count, mode, grad_in, extras, first_layer)
        key = (count, mode, grad_in, first_layer == 0, first_layer + count == self.steps(), tuple(sorted(extras)),
               first_layer if self.jk == "cat" else None)  # jk=cat: widths grow
        cache = self.__dict__.setdefault("_chain_cache", {})
        if key not in cache:
            placeholders = {k: new_sid() for k in extras}
            prog, grad = self._build_layers_chain(count, mode, grad_in, placeholders, first_layer)
            cache[key] = (prog, grad, placeholders)
        prog, grad, placeholders = cache[key]
        mapping = {placeholders[k]: v for k, v in extras.items()}
        for events in (prog.fwd, prog.bwd):
            for ev in events:
                if ev[0] in ("a", "r") and ev[1] not in mapping:
                    mapping[ev[1]] = new_sid()
        for sid in prog.roles.values():
            if sid not in mapping:
                mapping[sid] = new_sid()
        return prog.relabel(mapping), grad

    def _build_layers_chain(self, count: int, mode: str, grad_in: bool, extras: dict[str, int],
                            first_layer: int = 0) -> tuple[Program, bool]:
        """``count`` layers as the stack's loop runs them (``state = step(state)``), with roles X,
        Y, GY, GX. Up to three layers (or a ``dense`` stack) explicitly; more as the first, the
        middle one repeated ``count - 2`` times in closed form, and the last. A ``rev`` stack passes
        group lists between layers: :meth:`_rev_groups_chain` (for ``store``, each ``checkpoint``
        segment and ``reversible``'s forward)."""
        if self.kind == "rev":
            return self._rev_groups_chain(mode, grad_in, extras, count, first_layer)
        tie = self.stage.tie
        indices = range(first_layer, first_layer + count)  # not a list: depth may be huge
        explicit = count <= 3 or self.kind == "dense"
        chosen = list(indices) if explicit else [indices[0], indices[1], indices[-1]]
        gcnii = self.kind == "gcnii" and mode != "o"
        x0 = extras.get("X0")
        progs: list[Program] = []
        gx0s: list[int] = []
        grad = grad_in
        jk_max = self.jk == "max"
        acc_prev = extras.get("ACC")
        for layer in chosen:
            accum = tie and layer != indices[-1]
            layer_extras = dict(extras)
            if gcnii:
                gx0s.append(new_sid())
                layer_extras["GX0"] = gx0s[-1]
            p, grad = self.layer_program(layer, mode, grad, accum, layer_extras)
            if jk_max:
                p, acc_prev = self._with_max(p, mode, acc_prev, first=layer == 0)
            progs.append(p)
        final_acc = final_gacc = None
        if jk_max:
            for i in range(len(progs) - 1):
                if "GACC" in progs[i].roles:
                    progs[i] = progs[i].relabel({progs[i].roles["GACC"]: progs[i + 1].roles["GACCP"]})
            final_acc, final_gacc = progs[-1].roles.get("ACC", acc_prev), progs[-1].roles.get("GACC")
        cat_head, tail, cat_out = self._last_cat(first_layer, count)
        head, recomputed_cat = self._recomputed_cats(first_layer, count) if mode == "g" else ([], None)
        fwd, bwd, roles = _chain_marked(progs, tail, cat_head + head)
        if cat_out is not None:
            roles["ACAT"] = cat_out
        if recomputed_cat is not None:
            roles["RCAT"] = recomputed_cat
        if jk_max and mode == "g" and first_layer + count < self.stage.depth:
            # a checkpointed segment's recompute: torch stops it once the last saved tensor is
            # back, and the last maximum saves its inputs before it runs, so its output is never
            # made again (the forward's copy is the next segment's input)
            fwd = [ev for ev in fwd if not (ev[0] == "a" and ev[1] == final_acc)]
        elif jk_max:
            roles["ACC_OUT"] = acc_prev  # the running maximum after the chain's last layer
        if jk_max and first_layer + count == self.stage.depth:
            # the stack returns the running maximum; the last layer's output goes with the frame
            fwd.append(("r", roles["Y"]))
            roles["Y"] = final_acc
            if final_gacc is not None:
                mapping = {final_gacc: roles["GY"]}
                bwd = Program([], bwd, {}).relabel(mapping).bwd
        if gcnii and "X0BUF" in extras:
            # checkpoint segments: x0's gradient buffer is the stage's (see _checkpoint_program)
            bwd = _accumulate(bwd, first=None, others=set(gx0s))
        elif gcnii and grad_in:
            # every layer's gradient for x0 accumulates into one buffer (the first to arrive,
            # from the last layer), as does the first layer's gradient for its input x = x0
            bwd = _accumulate(bwd, first=gx0s[-1], others=set(gx0s[:-1]) | ({roles["GX"]} if "GX" in roles else set()))
            roles["GX"] = gx0s[-1]
        elif gcnii:
            bwd = _accumulate(bwd, first=None, others=set(gx0s))
        prog = Program(fwd, bwd, roles)
        if x0 is not None and first_layer == 0:
            prog = prog.relabel({roles["X"]: x0})
        if explicit:
            return _strip_marks(prog), grad
        keep = set(prog.roles.values()) | set(extras.values())
        return _compress(prog, count, keep), grad

    def _last_cat(self, start: int, count: int) -> tuple[list[tuple], list[tuple], int | None]:
        """``jk=cat``: the events before and after the last layer's forward of the stack's last
        ``acc = cat([acc, x])`` when a chain of layers ``start .. start + count - 1`` ends at the
        last layer, and its output (else nothing). It runs inside the loop's last step, while the
        loop still holds its previous state (the last layer's input and the ``(depth - 1) *
        hidden`` concatenation, alive through the last layer's forward), which goes when the step
        returns. A checkpoint's last segment of one layer starts from that previous
        concatenation: the segment's input, held by ``run_segments`` (not made here)."""
        depth = self.stage.depth
        if self.jk != "cat" or start + count != depth:
            return [], [], None
        out = new_sid()
        made = ("a", out, _alloc(self.graph, self.jk_row * depth), None)
        if depth == 1 or (start > 0 and count == 1):
            return [], [made], out
        prev = new_sid()
        return [("a", prev, _alloc(self.graph, self.jk_row * (depth - 1)), None)], [made, ("r", prev)], out

    def _recomputed_cats(self, start: int, count: int) -> tuple[list[tuple], int | None]:
        """``jk=cat``: the concatenations a checkpointed segment of layers ``start .. stop - 1``
        (``stop < depth``) makes again when it is recomputed, and the one it keeps (else
        nothing), placed before its last layer: torch
        stops the recomputation at the last saved tensor, before the last layer's concatenation
        (a concatenation saves nothing), so the largest one made is ``stop - 1`` rows wide, made
        while the one before it (``stop - 2`` rows, when that is not the segment's input) is
        alive; it is held until the recomputation is left (role ``RCAT`` of the chain), with the
        segment's activations."""
        stop = start + count
        if self.jk != "cat" or stop == self.stage.depth or count < 2:
            return [], None
        last = new_sid()
        made = [("a", last, _alloc(self.graph, self.row * (stop - 1)), None)]
        if count >= 3:
            before = new_sid()
            made = [("a", before, _alloc(self.graph, self.row * (stop - 2)), None)] + made + [("r", before)]
        return made, last

    def _stack_program(self, grad_in: bool) -> tuple[Program, bool]:
        pre: list[tuple] = []
        extras = self._stage_extras(pre)
        if self.kind == "gcnii":
            extras["X0"] = new_sid()
        if self.jk == "max":
            # the running maximum starts as a full -inf tensor, saved by the first maximum
            extras["ACC"] = new_sid()
            pre.append(("a", extras["ACC"], _alloc(self.graph, self.jk_row), None))
        prog, grad = self._layers_chain(self.stage.depth, "g", grad_in, extras)
        if self.jk == "cat":
            prog = self._cat_output(prog)
        return _with_stage_storages(prog, pre, {k: v for k, v in extras.items() if k == "M"}), grad

    def _rev_groups_chain(self, mode: str, grad_in: bool, extras: dict[str, int], count: int,
                          first_layer: int = 0) -> tuple[Program, bool]:
        """:meth:`~gnnspec.lower.reversible.ReversibleStack.forward_groups` over layers
        ``first_layer .. first_layer + count - 1`` (the whole stack, or one checkpointed segment),
        with autograd (mode ``g``) or without (``o``): between layers a list of group tensors, not
        one tensor, so ``d = min(count, 3)`` layers are one calibrated skeleton
        (``skel:revstack<G>:<d>``) with a hole per group function; more repeat the middle layer
        ``count - 2`` times in closed form, cut before each layer's first group function in the
        forward and before its last one in the backward (which runs the groups in reverse).
        Roles X, Y, GY, GX; returns the program and whether its output requires grad."""
        st, g = self.stage, self.graph
        groups = st.groups
        units = self.layer_units()
        layers = min(count, 3)
        variant = "o" if mode == "o" else ("g" if grad_in else "n")
        sk, holes = instantiate(f"skel:revstack{groups}:{layers}", variant,
                                {"N": g.nodes, "W": self.hidden // groups, "s": g.s})
        inner: dict[int, Program] = {}
        grad_out = False
        ends_stack = first_layer + count == st.depth
        for k in sorted(holes):
            # under tie the stack's last layer's functions run backward first and make the .grad;
            # every layer before adds into it
            accum = st.tie and not (ends_stack and k // groups == layers - 1) and mode != "o"
            inner[k], made = chain_units(units, mode, grad_in if k == 0 else grad_in or grad_out, accum, extras)
            grad_out = grad_out or made
        fwd, bwd = sk.fwd, sk.bwd
        if count > 3:
            fwd = _marked_before(fwd, {("hF", groups), ("hF", 2 * groups)})
            bwd = _marked_before(bwd, {("hB", 2 * groups - 1), ("hB", groups - 1)}) if bwd else [("|",), ("|",)]
        fwd, bwd = substitute(fwd, bwd, holes, inner)
        roles = {r: sid for r, sid in sk.roles.items() if r in ("X", "Y", "GY", "GX")}
        roles.setdefault("X", new_sid())  # the input's storage, when no piece of the stack holds it
        prog = Program(fwd, bwd, roles)
        if count > 3:
            prog = _compress(prog, count, set(prog.roles.values()) | set(extras.values()))
        return _strip_marks(prog), grad_out or grad_in

    def _with_max(self, p: Program, mode: str, acc_prev: int, first: bool = False) -> tuple[Program, int]:
        """A layer followed by ``acc = maximum(acc, x)`` (saves both; its backward makes a
        gradient for each, the layer's added in place to the one from above; after the ``first``
        layer none for ``acc``, the stage's ``-inf`` tensor, which needs none).

        Each gradient is torch's formula ``where(a == b, grad / 2, grad).masked_fill_(a < b, 0)``:
        while it is made, ``grad / 2`` and two boolean masks are alive beside it."""
        g = self.graph
        nh = _alloc(g, self.jk_row)
        acc = new_sid()
        fwd = p.fwd + [("a", acc, nh, None)]
        if mode == "o":
            return Program(fwd + [("r", acc_prev)], [], dict(p.roles)), acc
        nb = _alloc(g, g.nodes * self.jk_width)  # a boolean mask

        def gradient(out: int) -> list[tuple]:
            half, equal, order = new_sid(), new_sid(), new_sid()
            return [("a", half, nh, None), ("a", equal, nb, None), ("a", out, nh, None),
                    ("a", order, nb, None), ("r", half), ("r", equal), ("r", order)]

        g_prev, g_x, g_acc = new_sid(), new_sid(), new_sid()
        # the maximum holds both inputs until its backward: the layer's output may have no
        # other holder (a last layer without activation, norm or dropout)
        bwd = ([] if first else gradient(g_prev)) + gradient(g_x)
        bwd += [("r", g_acc), ("r", acc_prev), ("r", p.roles["Y"]), ("r", g_x)] + p.bwd
        roles = dict(p.roles)
        roles["GACC"], roles["ACC"], roles["GACCP"] = g_acc, acc, g_prev
        return Program(fwd, bwd, roles), acc

    def _cat_output(self, prog: Program) -> Program:
        """``acc = cat([acc, x])`` after every layer: the output is ``depth * hidden`` wide (made
        by the chain, :meth:`_last_cat`); its backward only takes views."""
        out = prog.roles["ACAT"]
        fwd = prog.fwd + [("r", prog.roles["Y"])]
        roles = dict(prog.roles)
        roles["Y"] = out
        if self.stage.depth == 1:  # the layer's gradient is a view of the whole: gone with its use
            return Program(fwd, prog.bwd, roles)
        gy = new_sid()
        roles["GY"] = gy
        return Program(fwd, prog.bwd + [("r", gy)], roles)

    def _checkpoint_program(self, segments: int, grad_in: bool) -> tuple[Program, bool]:
        """Segments (:func:`gnnspec.lower.checkpoint.run_segments`): each but the last runs
        without saving and its checkpoint keeps its input; in backward it is recomputed with
        saving just before its backward. The last segment runs plainly. Runs of equal segments
        are composed from three, the middle one repeated in closed form."""
        from gnnspec.lower.checkpoint import segment_bounds, segment_runs

        depth = self.steps()
        runs = segment_runs(depth, segments)
        if sum(count for _, _, count in runs) == 1:  # one segment runs plainly (run_segments): store
            return self._stack_program(grad_in)
        # the last segment runs plainly; the checkpointed ones before it are runs of equal length
        start, length, count = runs[-1]
        last = (start + (count - 1) * length, start + count * length, 1)
        checkpointed = runs[:-1] + ([(start, length, count - 1)] if count > 1 else [])
        # (start, stop, repeat): each run of equal segments reduced to first, middle, last
        plan: list[tuple[int, int, int]] = []
        for start, length, count in checkpointed:
            if count >= 4 and self.kind != "dense":
                plan += [(start, start + length, 1), (start + length, start + 2 * length, count - 2),
                         (start + (count - 1) * length, start + count * length, 1)]
            else:
                plan += [(start + i * length, start + (i + 1) * length, 1) for i in range(count)]
        plan.append(last)
        g, row = self.graph, self.row
        jk_cat, jk_max = self.jk == "cat", self.jk == "max"
        if jk_cat or jk_max:  # the running concatenation grows / maximum is threaded: explicit
            plan = [(*b, 1) for b in segment_bounds(depth, segments)]
        pre: list[tuple] = []
        extras = self._stage_extras(pre)
        # jk=max: the running maximum is part of the state; each segment's checkpoint keeps the
        # one it starts from (the first is the stage's -inf tensor) until its backward
        acc_in = [new_sid()] if jk_max else []
        if jk_max:
            pre.append(("a", acc_in[0], _alloc(g, row), None))
        x = new_sid()
        if self.kind == "gcnii":
            extras["X0"] = x
            if grad_in:
                extras["X0BUF"] = new_sid()
        fwd: list[tuple] = list(pre)
        inputs = [x]
        grad = grad_in
        segs = []
        counts: dict[int, int] = {}
        accs: list[int] = []  # jk=cat: the concatenation each segment starts from
        for index, (start, stop, repeat) in enumerate(plan):
            out = new_sid()
            is_last = index == len(plan) - 1
            seg_extras = dict(extras, ACC=acc_in[-1]) if jk_max else extras
            f_prog, _ = self._layers_chain(stop - start, "g" if is_last else "o", grad, seg_extras, first_layer=start)
            f_prog = f_prog.bind(X=inputs[-1], Y=out)
            if jk_max and not is_last:
                acc_in.append(f_prog.roles["ACC_OUT"])
            tape_bytes = 0 if is_last else self._tape_bytes(start, stop)
            tape = new_sid() if tape_bytes else None
            # the segment's dropout tape: counted from the segment's start (errs high by the masks
            # not drawn yet), kept with the segment's input until its backward has run
            part = ([("a", tape, tape_bytes, None)] if tape is not None else []) + list(f_prog.fwd)
            if 0 < index and not is_last:
                part.append(("r", inputs[-1]))  # the loop moves on; the checkpoint keeps it
            if jk_cat and not is_last:
                acc = new_sid()  # the concatenation so far, the next segment's input
                part.append(("a", acc, _alloc(g, row * stop), None))
                if accs:
                    part.append(("r", accs[-1]))
                accs.append(acc)
            if repeat > 1:
                counts[index] = repeat
                part = [("<", index)] + part + [(">", index)]
            fwd += part
            segs.append((index, start, stop, inputs[-1], grad, f_prog if is_last else None, tape,
                         acc_in[index] if jk_max else None))
            grad = True
            inputs.append(out)
        if len(plan) > 1:
            fwd.append(("r", inputs[-2]))  # run_segments returns: the last segment's input
        gy = new_sid()
        g_next = gy
        has_gx = False
        bwd: list[tuple] = []
        if jk_cat:
            # the last segment runs plainly: its concatenations; the output is depth * hidden wide
            out = segs[-1][5].roles["ACAT"]  # made by the last segment's chain (_last_cat)
            fwd += [("r", inputs[-1])] + ([("r", accs[-1])] if accs else [])
            stage_y, stage_gy, gy = out, gy, new_sid()  # the layers' gradients are views of it
            g_next = gy
        if "X0BUF" in extras:
            bwd.append(("a", extras["X0BUF"], _alloc(g, row), None))
        for index, start, stop, seg_in, seg_grad, plain, tape, seg_acc in reversed(segs):
            g_prev = new_sid()
            if plain is not None:
                q = plain.bind(GY=g_next, GX=g_prev)
                part = list(q.bwd)
                has_gx = "GX" in q.roles
            else:
                seg_extras = dict(extras, ACC=seg_acc) if jk_max else extras
                r_prog, _ = self._layers_chain(stop - start, "g", seg_grad, seg_extras, first_layer=start)
                y_re = new_sid()
                r_prog = r_prog.bind(X=seg_in, Y=y_re, GY=g_next, GX=g_prev)
                r_fwd = r_prog.fwd
                if self.kind == "rev":
                    # torch's checkpoint stops a recomputation once its last saved tensor is back
                    # (early stop, its default): a rev segment's closing concatenation, which no
                    # node saves, is never made again (+5.8% high while it was counted)
                    r_fwd = [e for e in r_fwd if not (e[0] == "a" and e[1] == y_re)]
                part = r_fwd + [("r", y_re)]
                if "RCAT" in r_prog.roles:  # the recomputed concatenation goes with the recomputation
                    part.append(("r", r_prog.roles["RCAT"]))
                part += r_prog.bwd + [("r", seg_in)] + ([("r", tape)] if tape is not None else [])
                if seg_acc is not None:
                    part.append(("r", seg_acc))  # the checkpoint lets go of its running maximum
                if jk_cat and index > 0:
                    part.append(("r", accs[index - 1]))  # the frame lets go of its concatenation
                has_gx = "GX" in r_prog.roles
            if index in counts:
                part = [("<", index)] + part + [(">", index)]
            bwd += part
            g_next = g_prev
        roles = {"X": x, "Y": inputs[-1], "GY": gy}
        if jk_cat:
            roles["Y"], roles["GY"] = stage_y, stage_gy
            bwd.append(("r", stage_gy))
        if has_gx and grad_in:
            roles["GX"] = g_next
            if "X0BUF" in extras:  # the first layer's input is x0: its gradient joins the buffer
                bwd.append(("r", g_next))
                roles["GX"] = extras["X0BUF"]
        if "M" in extras:
            # rev/deq: the stage's mask is an argument of every checkpointed segment, which the
            # checkpoint keeps until that segment's backward (the first segment's comes last)
            bwd.append(("r", extras["M"]))
        prog = _with_stage_storages(Program(fwd, bwd, roles), [], extras)
        if counts:
            prog = _collapse_regions(prog, counts, set(roles.values()) | set(extras.values()))
        return prog, True

    def _tape_bytes(self, start: int, stop: int) -> int:
        """Bytes of the dropout tape (``gnnspec.lower.dropout_tape``) of a checkpointed segment of
        layers ``start .. stop - 1``: ``ceil(numel / 8)`` (one bit per element) for every dropout
        they draw. Device tensors redraw instead (no tape)."""
        g = self.graph
        if g.device == "cuda" or self.kind in ("rev", "deq"):  # rev/deq: the stage's shared mask
            return 0

        def tape(layer: int) -> int:
            return sum(_alloc(g, -(-u.shape["N"] * u.shape["D"] // 8))
                       for u in self.layer_units(layer) if draws_dropout(u.key))

        if self.kind == "dense":  # each layer wider than the last
            return sum(tape(layer) for layer in range(start, stop))
        # only layer 0 may differ (it can start at the stage's input width)
        return (tape(0) if start == 0 else 0) + (stop - max(start, 1)) * tape(1)

    def _reversible_program(self, grad_in: bool) -> tuple[Program, bool]:
        """Forward: every layer without saving; the output stays on the function's context.
        Backward (:func:`gnnspec.lower.reversible._layer_backward`, calibrated with the group
        functions as holes): layer by layer from the output groups and their gradients to the
        input groups and theirs, recomputing each group function with saving before its backward;
        finally the gradient groups are concatenated."""
        st, g = self.stage, self.graph
        groups = st.groups
        w = self.hidden // groups
        pre: list[tuple] = []
        extras = self._stage_extras(pre)
        units = self.layer_units()
        depth = st.depth
        f_prog, _ = self._layers_chain(depth, "o", False, extras)
        x, y = f_prog.roles["X"], f_prog.roles["Y"]
        fwd = pre + f_prog.fwd
        if "M" in extras:
            fwd.append(("r", extras["M"]))  # the stage's frame returns; the function saved it
        gy = new_sid()
        shape = {"N": g.nodes, "W": w, "s": g.s}

        from gnnspec.ops import subtracting_op

        subtract = subtracting_op(st.op, g.s)  # the group functions reconstruct inside their products

        def piece(first: bool, ins: dict[str, int]) -> tuple[list[tuple], dict[str, int]]:
            key = rev_back_key(groups, first, subtract)
            sk, holes = instantiate(key, "g", shape)
            inner = {}
            for k in holes:
                # autograd.grad hands each gradient back when it returns (none is accumulated into
                # a .grad, as the "ga" variant records); under tie every layer after the first
                # adds them into the sums of the ones before
                prog, _ = chain_units(units, "g", True, False, extras)
                inner[k] = _added_to_sums(prog) if st.tie and not first else prog
            events, _ = substitute(sk.fwd, [], holes, inner)
            mapping = {sk.roles[n]: sid for n, sid in ins.items() if n in sk.roles}
            outs = {}
            for n, sid in sk.roles.items():
                if n.startswith("Y") and sid not in mapping:
                    outs[n] = sid
                elif n.startswith("Y"):
                    outs[n] = mapping[sid]
            events = Program(events, [], {}).relabel(mapping).fwd
            return events, outs

        def inputs_from(outs: dict[str, int]) -> dict[str, int]:
            ins = {}
            for i in range(groups):
                ins[f"Xy{i}"] = outs[f"Yx{i}"]
                ins[f"Xg{i}"] = outs[f"Yg{i}"]
            return ins

        head, outs = piece(True, {"Xy": y, "Xg": gy})
        # ctx.output lets go of the output as the backward starts; its views carry it
        head = [("r", y)] + head
        inner_count = depth - 1
        segments: list[list[tuple]] = []
        explicit = inner_count <= 3
        for i in range(inner_count if explicit else 3):
            events, outs = piece(False, inputs_from(outs))
            segments.append(events)
        gx = new_sid()
        tail = [("a", gx, _alloc(g, self.row), None)]
        tail += [("r", outs[f"Yx{i}"]) for i in range(groups)] + [("r", outs[f"Yg{i}"]) for i in range(groups)]
        tail.append(("r", gy))  # the engine held the incoming gradient until now
        if "M" in extras:
            tail.append(("r", extras["M"]))
        keep = {x, y, gy, gx} | set(extras.values())
        if explicit:
            bwd = head + [e for seg in segments for e in seg] + tail
        else:
            mark = ("|",)
            events = head + segments[0] + [mark] + segments[1] + [mark] + segments[2] + tail
            prog = _compress(Program(list(fwd), events, {}), inner_count, keep, backward_only=True)
            bwd = prog.bwd
        roles = {"X": x, "Y": y, "GY": gy}
        if grad_in:
            roles["GX"] = gx
        else:
            bwd.append(("r", gx))
        return Program(fwd, bwd, roles), True

    # -- deq

    def _deq_program(self, plan: ir.Plan, grad_in: bool) -> tuple[Program, bool]:
        from gnnspec.memory.deq import deq_program

        return deq_program(self, plan, grad_in)

    # -- time

    def forward_cost(self) -> float:
        """A relative forward cost: edge work plus dense work, per layer."""
        g = self.graph
        n, e = g.nodes, g.prepared_edges
        kind = self.kind
        if kind in ("linear",):
            return n * self.resolved.in_width * self.resolved.out_width
        if kind == "mlp":
            dims = [self.resolved.in_width, *(self.stage.dims or (self.hidden,))]
            return sum(n * a * b for a, b in zip(dims, dims[1:]))
        if kind in ("norm", "act", "dropout"):
            return 5 * n * self.resolved.in_width
        if kind in ("appnp", "sgc"):
            return self.stage.k * (e + n) * self.resolved.in_width
        h = self.hidden
        if kind == "rev":
            w = h // self.stage.groups
            per = self.stage.groups * (3 * (e + n) * w + n * w * w + 10 * n * w)
        else:
            per = 3 * (e + n) * h + n * h * h + 10 * n * h
        if kind == "deq":
            return per * self.stage.depth
        return per * self.stage.depth

    def step_time(self, plan: ir.Plan) -> float:
        """Relative time of forward + backward (backward = 2 forwards) under ``plan``."""
        c = self.forward_cost()
        if self.kind == "deq":
            iters = self.stage.max_iter
            if plan.kind == "implicit":
                # solve (no grad) + one application with grad + adjoint solve (one vjp each) + backward
                return c * (iters + 1) + 2 * c * iters + 2 * c + 0.05 * c * iters
            return 3 * c * (iters + 1)  # unroll, and checkpoint, which runs its one segment plainly
        if plan.kind in ("checkpoint", "reversible"):
            return 4 * c
        return 3 * c


def _identity() -> Program:
    x, gy = new_sid(), new_sid()
    return Program([], [], {"X": x, "Y": x, "GY": gy, "GX": gy})


def _whole(value: object, minimum: int) -> bool:
    """Whether ``value`` is a whole number (an int, or a float without a fraction) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        return False
    return (isinstance(value, numbers.Integral) or value.is_integer()) and value >= minimum


DEVICES = ("cpu", "cuda")


def device_kind(device: object) -> str:
    """The kind of device the estimate models for ``device`` ("cuda:1" or ``torch.device("cuda",
    1)`` is "cuda"); a ValueError for one it does not model."""
    kind = getattr(device, "type", device)
    kind = kind.split(":")[0] if isinstance(kind, str) else kind
    if kind not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    return kind


def _total(tensors: Counter[int]) -> int:
    """Bytes of a ``{bytes: count}`` multiset of tensors."""
    return sum(b * n for b, n in tensors.items())


# torch's default cuBLAS workspace on Hopper (``CUBLAS_WORKSPACE_CONFIG=:4096:8``), the size a
# CUDA estimate made without a device assumes (other GPUs default to 8.125 MiB: this errs high)
_HOPPER_CUBLAS_WORKSPACE = 4096 * 1024 * 8
# cuBLASLt's default workspace where torch cannot say (``CUBLASLT_WORKSPACE_SIZE``, KiB)
_DEFAULT_CUBLASLT_WORKSPACE = 1024 * 1024
# threads that run matrix products in a step: the caller's (forward) and autograd's device thread
_BLAS_THREADS = 2


def cuda_workspace_bytes() -> int:
    """Bytes of BLAS workspace a CUDA training step holds: torch gives every (cuBLAS handle,
    stream) its own workspace from the caching allocator, keeps it for the process's life (so
    ``max_memory_allocated`` counts it), and a handle is per thread; the forward runs on the
    caller's thread and the backward on autograd's device thread, ``_BLAS_THREADS`` x (cuBLAS +
    cuBLASLt workspace). The sizes are torch's own for the current device where it can say
    (``torch._C._cuda_getCublasWorkspaceSize``), else those of ``CUBLAS_WORKSPACE_CONFIG`` and
    ``CUBLASLT_WORKSPACE_SIZE`` as torch reads them, else torch's Hopper default."""
    import torch

    try:
        if torch.cuda.is_available():
            return _BLAS_THREADS * (int(torch._C._cuda_getCublasWorkspaceSize())
                                    + int(torch._C._cuda_getCublasLtWorkspaceSize()))
    except (AttributeError, RuntimeError):
        pass
    return _BLAS_THREADS * (_cublas_workspace_from_env() + _cublaslt_workspace_from_env())


def _cublas_workspace_from_env() -> int:
    """``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE_KiB:COUNT`` pairs) as torch parses it, else the Hopper
    default."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
    pairs = re.findall(r":(\d+):(\d+)", config)
    return sum(int(size) * 1024 * int(count) for size, count in pairs) if pairs else _HOPPER_CUBLAS_WORKSPACE


def _cublaslt_workspace_from_env() -> int:
    value = os.environ.get("CUBLASLT_WORKSPACE_SIZE", "")
    return int(value) * 1024 if value.isdigit() else _DEFAULT_CUBLASLT_WORKSPACE


def _cuda_rounded(nbytes: int) -> int:
    """What the CUDA caching allocator reserves for ``nbytes``."""
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


def _cuda_rounded_all(tensors: Counter[int]) -> Counter[int]:
    rounded: Counter[int] = Counter()
    for b, n in tensors.items():
        rounded[_cuda_rounded(b)] += n
    return rounded


def dropout_key(graph: Graph) -> str:
    """The piece of ``F.dropout`` on ``graph``'s device (:data:`gnnspec.memory.pieces.CUDA_DROPOUT`:
    CUDA keeps a one-byte mask where the CPU keeps the float noise)."""
    return pieces.CUDA_DROPOUT if graph.device == "cuda" else "dropout"


def _alloc(graph: Graph, nbytes: int) -> int:
    return _cuda_rounded(nbytes) if graph.device == "cuda" else nbytes


def _chain_marked(progs: list[Program], tail: Sequence[tuple] = (), head: Sequence[tuple] = ()
                  ) -> tuple[list[tuple], list[tuple], dict[str, int]]:
    """:func:`chain` of layer programs with ``("|",)`` between layers in both lists; ``head``
    events come just before the last layer's forward, ``tail`` events after it, before the loop
    lets go of that layer's input."""
    x = progs[0].roles.get("X", new_sid())
    gy = new_sid()
    outs = [x] + [new_sid() for _ in progs]
    grads = [new_sid() for _ in progs] + [gy]
    fwd: list[tuple] = []
    bound = []
    for i, p in enumerate(progs):
        q = p.bind(X=outs[i], Y=outs[i + 1], GY=grads[i + 1], GX=grads[i])
        bound.append(q)
        if i:
            fwd.append(("|",))
        if i == len(progs) - 1:
            fwd += [*head, *q.fwd, *tail]
        else:
            fwd += q.fwd
        if i > 0:
            fwd.append(("r", outs[i]))
    bwd: list[tuple] = []
    for i, q in enumerate(reversed(bound)):
        if i:
            bwd.append(("|",))
        bwd += q.bwd
    roles = {"X": x, "Y": outs[-1], "GY": gy}
    if "GX" in bound[0].roles:
        roles["GX"] = grads[0]
    return fwd, bwd, roles


def _marked_before(events: list[tuple], places: set[tuple]) -> list[tuple]:
    """``events`` with a layer mark ``("|",)`` before each event in ``places``."""
    out: list[tuple] = []
    for ev in events:
        if tuple(ev) in places:
            out.append(("|",))
        out.append(ev)
    return out


def _strip_marks(prog: Program) -> Program:
    return Program([e for e in prog.fwd if e[0] != "|"], [e for e in prog.bwd if e[0] != "|"], prog.roles)


def _added_to_sums(prog: Program) -> Program:
    """``prog`` (a group function's recomputation and ``autograd.grad``) followed by
    :func:`gnnspec.lower.reversible._layer_backward`'s ``param_grads[k] = param_grads[k] + g`` for
    each gradient ``g`` it hands back: a new sum while the old one and ``g`` are alive (one
    parameter's bytes more, briefly), then both let go; the sums themselves stay as the first
    layer made them."""
    added = []
    for ev in (*prog.fwd, *prog.bwd):
        if ev[0] == "a" and ev[3] == "grad":
            total = new_sid()
            added += [("a", total, ev[2], None), ("r", total), ("r", ev[1])]
    return Program(prog.fwd, prog.bwd + added, prog.roles)


def _accumulate(bwd: list[tuple], first: int | None, others: set[int]) -> list[tuple]:
    """Gradients in ``others`` are added into an existing buffer as soon as they are made."""
    out = []
    for ev in bwd:
        out.append(ev)
        if ev[0] == "a" and ev[1] in others:
            out.append(("r", ev[1]))
    return out


def _compress(prog: Program, count: int, keep: set[int], backward_only: bool = False) -> Program:
    """A three-layer chain (marked by :func:`_chain_marked`) as first + middle x (count - 2) +
    last, every storage but ``keep`` resolved. Releases of kept storages in the middle layer are
    dropped when a later release exists (they are not the last holder)."""
    fwd, bwd = resolve(prog.fwd, prog.bwd, keep)
    timeline = [("f", i, ev) for i, ev in enumerate(fwd)] + [("b", i, ev) for i, ev in enumerate(bwd)]
    last_release: dict[int, int] = {}
    for pos, (_, _, ev) in enumerate(timeline):
        if ev[0] == "r":
            last_release[ev[1]] = pos
    def split(events: list[tuple], offset: int) -> list[list[tuple]]:
        parts: list[list[tuple]] = [[]]
        for i, ev in enumerate(events):
            if ev[0] == "|":
                parts.append([])
                continue
            parts[-1].append((offset + i, ev))
        return parts
    f_parts = split(fwd, 0)
    b_parts = split(bwd, len(fwd))
    if backward_only:
        if len(b_parts) != 3:
            raise ValueError("expected three layers")
        n = count - 2
        new_bwd = [ev for _, ev in b_parts[0]] + [("x", summarize(middle_of(b_parts[1], last_release), n))] + [
            ev for _, ev in b_parts[2]]
        return Program([ev for _, ev in f_parts[0]], new_bwd, dict(prog.roles))
    if len(f_parts) != 3 or len(b_parts) != 3:
        raise ValueError("expected three layers")

    def middle(part):
        return middle_of(part, last_release)

    def plain(part):
        return [ev for _, ev in part]

    n = count - 2
    new_fwd = plain(f_parts[0]) + [("x", summarize(middle(f_parts[1]), n))] + plain(f_parts[2])
    new_bwd = plain(b_parts[0]) + [("x", summarize(middle(b_parts[1]), n))] + plain(b_parts[2])
    return Program(new_fwd, new_bwd, dict(prog.roles))


def _collapse_regions(prog: Program, counts: dict[int, int], keep: set[int]) -> Program:
    """Resolve every storage but ``keep``, then replace each region ``("<", k) ... (">", k)`` by
    its events repeated ``counts[k]`` times in closed form."""
    fwd, bwd = resolve(prog.fwd, prog.bwd, keep)
    last_release: dict[int, int] = {}
    for pos, ev in enumerate(fwd + bwd):
        if ev[0] == "r":
            last_release[ev[1]] = pos

    def collapse(events: list[tuple], offset: int) -> list[tuple]:
        out: list[tuple] = []
        region: list[tuple[int, tuple]] | None = None
        for i, ev in enumerate(events):
            if ev[0] == "<":
                region = []
            elif ev[0] == ">":
                out.append(("x", summarize(middle_of(region, last_release), counts[ev[1]])))
                region = None
            elif region is not None:
                region.append((offset + i, ev))
            else:
                out.append(ev)
        return out

    return Program(collapse(fwd, 0), collapse(bwd, len(fwd)), dict(prog.roles))


def middle_of(part: list[tuple[int, tuple]], last_release: dict[int, int]) -> list[tuple]:
    """The resolved events of a repeated layer; releases of shared storages that are not their
    last are dropped."""
    out = []
    for pos, ev in part:
        if ev[0] in ("d", "x"):
            out.append(ev)
        elif ev[0] == "r" and last_release.get(ev[1], pos) > pos:
            continue
        else:
            raise ValueError(f"the middle layer of a stack touches a shared storage: {ev}")
    return out


def _with_stage_storages(prog: Program, pre: list[tuple], extras: dict[str, int]) -> Program:
    """Add the stage's own storages: the mask drawn at its start, held by the stage's frame until
    it returns and by every layer that saved it."""
    fwd = list(pre) + prog.fwd
    if "M" in extras:
        fwd.append(("r", extras["M"]))
    return Program(fwd, prog.bwd, prog.roles)


# ---------------------------------------------------------------------------- the model


class ModelEstimator:
    """The stages of a spec on a graph; estimates the step under any plan assignment."""

    def __init__(self, spec: ir.Spec, *, nodes: int, edges: int, in_channels: int | None = None,
                 out_channels: int | None = None, dtype: str | None = None, optimizer: str | None = None,
                 device: str = "cpu", self_loops: int = 0) -> None:
        from gnnspec.lower.widths import declared_widths, resolve_widths

        if not (_whole(nodes, 1) and _whole(edges, 0)):
            raise ValueError(f"a graph needs nodes >= 1 and edges >= 0 (integers), got nodes={nodes!r}, edges={edges!r}")
        if not (_whole(self_loops, 0) and self_loops <= edges):
            raise ValueError(f"self_loops must be a whole number from 0 to edges ({edges}), got {self_loops!r}")
        if dtype is not None and dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
        if optimizer is not None and optimizer not in get_args(ir.OptimizerName):
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(get_args(ir.OptimizerName))}")
        device = device_kind(device)
        self.spec = spec
        self.dtype = dtype or spec.dtype
        self.resolved = resolve_widths(spec, *declared_widths(spec, in_channels, out_channels))
        self.graph = Graph(int(nodes), int(edges), DTYPE_BYTES[self.dtype], device, int(self_loops))
        self.stages = [StageModel(r, spec, self.graph, i) for i, r in enumerate(self.resolved)]
        self.in_width = self.resolved[0].in_width
        self.out_width = self.resolved[-1].out_width
        self.optimizer = optimizer or spec.train.optimizer
        self._base: dict[str, int] | None = None
        self._param_lists: list[tuple[list[int], float]] | None = None

    # -- the candidates

    def stage_plan(self, stage: StageModel, plan: ir.Plan) -> ir.Plan:
        """The plan ``stage`` runs under ``plan`` (:func:`gnnspec.ir.runnable_plan`, as the
        lowering does), as the estimator models it."""
        return ir.runnable_plan(stage.stage, plan)

    def assignment(self, plan: ir.Plan | Sequence[ir.Plan]) -> list[ir.Plan]:
        return ir.runnable_plans([s.stage for s in self.stages], plan)

    # -- the step

    def base(self) -> dict[str, int]:
        """Bytes alive for the whole step: parameters, optimizer state, inputs; on CUDA also the
        BLAS workspaces (:func:`cuda_workspace_bytes`, as temporaries)."""
        if self._base is None:
            g = self.graph
            params = sum((st.params() for st in self.stages), Counter())
            buffers = sum((st.buffers() for st in self.stages), Counter())
            opt = _optimizer_entry(self.optimizer, self.spec.train)
            per_byte, fixed = opt["state_per_byte"], opt["state_fixed"]
            from gnnspec.ops import graph_form, prepared_bytes

            forms = {"raw"}
            for st in self.stages:
                if st.is_stack:
                    forms.add(graph_form("gcn2" if st.kind == "gcnii" else st.stage.op))
                elif st.kind in ("appnp", "sgc"):
                    forms.add(graph_form(st.kind))
            inputs = (g.nodes * self.in_width * g.s + 2 * g.edges * 8 + g.nodes * 8
                      + sum(prepared_bytes({form}, g.nodes, g.edges_for(form), g.s) for form in forms))
            if g.device == "cuda":
                params, buffers = _cuda_rounded_all(params), _cuda_rounded_all(buffers)
                state = sum((_cuda_rounded(int(per_byte * b)) + (CUDA_BLOCK if fixed else 0)) * n
                            for b, n in params.items())
            else:
                # per tensor first: a float times a count above 2**53 would lose bytes
                state = sum(int(per_byte * b + fixed) * n for b, n in params.items())
            self._base = {"parameters": int(_total(params) + _total(buffers)), "optimizer": int(state),
                          "inputs": int(inputs)}
            if g.device == "cuda":  # library scratch, alive all step: counted with the temporaries
                self._base["temporaries"] = cuda_workspace_bytes()
            self._params = params
        return self._base

    def optimizer_peak(self) -> int:
        """The optimizer step's largest transient above gradients and state."""
        if getattr(self, "_optimizer_peak", None) is None:
            self._optimizer_peak = self._compute_optimizer_peak()
        return self._optimizer_peak

    def _compute_optimizer_peak(self) -> int:
        self.base()
        opt_name = self.optimizer
        wd = self.spec.train.weight_decay
        decays: set[tuple[int, float]] = set()  # (bytes, weight decay) of the parameter tensors
        for st in self.stages:
            d = getattr(st.stage, "weight_decay", None)
            d = wd if d is None else d
            decays |= {(b, d) for b in st.params()}
        table = pieces.optimizer_table()[_optimizer_key(opt_name, self.spec.train)]
        if self.graph.device == "cuda":
            # torch's foreach kernels (the CUDA default) work on all parameters at once
            total = _total(self._params)
            per = table["plain"]["peak_per_byte"]
            extra = total * (1 if per else 0)
            if any(d for _, d in decays) and opt_name != "adamw":
                extra += total
            return int(extra)
        # CPU: one parameter at a time, so the largest tensor's transient
        best = 0
        for b, d in decays:
            per = table["weight_decay" if d else "plain"]["peak_per_byte"]
            best = max(best, int(per * b))
        largest = max((b for b, _ in decays), default=0)
        if opt_name in ("adam", "adamw") and _total(self._params) > largest:
            # torch's single-tensor Adam keeps the previous parameter's `denom` (a local) while it
            # makes the next one's: at most the largest parameter more (the order is not modelled)
            best += largest
        return best

    def program(self, plans: list[ir.Plan]) -> tuple[list[tuple], list[tuple]]:
        """The whole step's forward and backward, resolved."""
        progs = []
        grad = False  # x needs no gradient
        for st, plan in zip(self.stages, plans):
            p, grad = st.program(plan, grad)
            progs.append(p)
        model = chain(progs)
        g = self.graph
        loss, _ = instantiate("loss:ce", "g", {"N": g.nodes, "D": self.out_width, "s": g.s})
        loss = loss.bind(X=model.roles["Y"], GX=model.roles["GY"])
        ones = loss.roles["GY"]
        fwd = model.fwd + loss.fwd
        bwd = [("a", ones, _alloc(g, g.s), None)] + loss.bwd + model.bwd
        # the step's frame holds the model's output and the loss until it returns
        return resolve(fwd, bwd, persist={model.roles["Y"], loss.roles["Y"]})

    def estimate(self, plans: list[ir.Plan]) -> tuple[int, dict[str, int], str]:
        fwd, bwd = self.program(plans)
        opt = self.optimizer_peak()
        base = self.base()
        result = peak([("forward", fwd), ("backward", bwd), ("optimizer", [("d", opt, "temporaries"), ("d", -opt, "temporaries")])], base)
        return result.bytes, {k: int(v) for k, v in result.breakdown.items()}, result.phase

    def relative_time(self, plans: list[ir.Plan]) -> float:
        store = sum(st.step_time(ir.Store(kind="store")) for st in self.stages)
        return sum(st.step_time(p) for st, p in zip(self.stages, plans)) / store if store else 1.0


def _optimizer_key(name: str, train: ir.Train) -> str:
    if name == "sgd":
        return "sgd_momentum" if train.momentum else "sgd"
    return name


def _optimizer_entry(name: str, train: ir.Train) -> dict[str, float]:
    return pieces.optimizer_table()[_optimizer_key(name, train)]["plain"]


def assignment_name(plans: Sequence[ir.Plan], stages: Sequence[StageModel]) -> str:
    """``reversible`` when every stack runs one plan, else the stacks' plans in order."""
    texts = [plan_text(p) for p, s in zip(plans, stages) if s.is_stack]
    if not texts:
        return "store"
    if len(set(texts)) == 1:
        return texts[0]
    return ", ".join(texts)


def estimate_spec(spec: ir.Spec | str, *, nodes: int, edges: int, in_channels: int | None = None,
                  out_channels: int | None = None, budget: int | str | None = None,
                  plan: ir.Plan | str | Sequence[ir.Plan | str] | None = None, dtype: str | None = None,
                  optimizer: str | None = None, device: str = "cpu", self_loops: int = 0) -> Estimate:
    """Every candidate plan assignment of ``spec`` on a graph of ``nodes``/``edges`` (of which
    ``self_loops`` are self-loops; otherwise the graph is taken to have none), and the
    fastest whose peak fits ``budget`` (see :mod:`gnnspec.plan`). ``plan`` fixes the assignment
    (one plan, or one per resolved stage or per stack); else the spec's plans are used where it fixes them
    and every candidate is estimated where it says ``auto``."""
    from gnnspec.plan import candidate_assignments, choose, given_segments

    if isinstance(spec, str):
        import gnnspec

        spec = gnnspec.parse(spec)
    budget_bytes = parse_size(budget)
    if budget_bytes is None and isinstance(spec.plan, ir.Auto) and spec.plan.budget is not None and plan is None:
        budget_bytes = spec.plan.budget
    model = ModelEstimator(spec, nodes=nodes, edges=edges, in_channels=in_channels, out_channels=out_channels,
                           dtype=dtype, optimizer=optimizer, device=device, self_loops=self_loops)
    fixed = _parse_plans(plan)
    assignments = candidate_assignments(model, fixed)
    estimates = [plan_estimate(model, a, budget_bytes) for a in assignments]
    chosen = choose(estimates, budget_bytes, model, given_segments(model, fixed))
    return Estimate(spec.name, model.graph.nodes, model.graph.edges, model.dtype, budget_bytes, estimates,
                    chosen.name if chosen else None, device, [s.kind for s in model.stages])


def plan_estimate(model: ModelEstimator, plans: list[ir.Plan], budget_bytes: int | None) -> PlanEstimate:
    peak_bytes, breakdown, phase = model.estimate(plans)
    fits = None if budget_bytes is None else peak_bytes <= budget_bytes
    return PlanEstimate(assignment_name(plans, model.stages), [plan_text(p) for p in plans], peak_bytes, fits,
                        model.relative_time(plans), breakdown, phase)


def _parse_plans(plan) -> list[ir.Plan] | ir.Plan | None:
    from gnnspec.syntax import parse_plan

    if plan is None:
        return None
    if isinstance(plan, str):
        return parse_plan(plan)
    if isinstance(plan, (list, tuple)):
        return [parse_plan(p) if isinstance(p, str) else p for p in plan]
    return plan


def _calibrated(key: str, op: ir.Op, shape: dict[str, int]) -> None:
    """Make sure the table holds ``key``, the pieces of ``op`` at its arguments, in the precision
    of ``shape``: the shipped table has the built-in ops at the arguments that change memory only
    at their defaults (``cheb(k=2)``, ``egc(bases=4)``), so other arguments, and registered ops,
    are calibrated here on first use (a few seconds, once per process and precision;
    :func:`gnnspec.memory.calibrate.calibrate_op_pieces`)."""
    from gnnspec.memory import pieces
    from gnnspec.ops import op_impl

    half = shape["s"] == 2
    table_key, impl = pieces.table_key(key, half), op_impl(op.name)
    if table_key not in pieces.table() or pieces.CALIBRATED_FROM.get(table_key, impl) is not impl:
        from gnnspec.memory.calibrate import calibrate_op_pieces

        calibrate_op_pieces(op.name, dict(op.args), (half,))
