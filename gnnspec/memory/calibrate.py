"""Calibration: the allocation programs of every building block, measured under fake tensors.

    python -m gnnspec.memory.calibrate            # regenerate gnnspec/memory/coefficients.json
    python -m gnnspec.memory.calibrate --only op:gat      # recalibrate some pieces, keep the rest
    python -m gnnspec.memory.calibrate --check            # is the checked-in table up to date?

The analytic estimate (:mod:`gnnspec.memory.estimate`) replays, for each piece of a training step,
the sequence of storage allocations and releases that piece makes. This module measures those
sequences; it is the only place that runs torch for the estimator, and it never runs at estimate
time.

**Units.** A unit is one building block called as ``y = unit(x)``: each op's convolution, each
norm, activation, dropout, linear layer, the loss. For several shape points ``(N, E, I, O, H, C)``
and two dtypes (float32, float64) the unit runs under ``FakeTensorMode`` (shapes, no data: any size
costs the same) inside an :class:`~gnnspec.memory.recorder.AllocationRecorder`:

    x = leaf * 1.0          # the input, as a previous op would hand it over
    y = unit(x)             # forward: the unit's allocations and frees
    del x; z = y * 1.0; del y
    z.sum().backward()      # backward, between the hooks of y's and x's gradients

From the log it keeps, in order, every allocation (with the output tensor's shape and dtype) and
every release, and the boundary storages by role: ``X`` (input; a release in backward means the
unit saved it), ``Y`` (output), ``GY`` (the incoming gradient, released by the unit), ``GX`` (the
gradient it returns), parameter gradients (tagged ``grad``). The event sequence must be the same at
every shape point; each allocation's size is then fitted exactly: every dimension of its shape as
an integer-rational linear function of the shape variables, its element size as the model dtype's
(``s``) or a fixed one. Each unit is recorded in up to five variants: ``g`` (input requires grad),
``n`` (it does not), ``ga``/``na`` (parameter gradients already exist: tied weights), ``o`` (under
``torch.no_grad``).

**Half precision.** Every piece is recorded a second time in bfloat16 alone, under its key with
the suffix ``@half`` (:data:`gnnspec.memory.pieces.HALF`), for float16/bfloat16 estimates (``s = 2``):
torch has no CPU sparse kernels in half precision (the CSR products cast to float32 and back) and
the fused GAT path takes float32/float64 only (torch-geometric's stock message passing runs), so
such a step's allocations are not a float32 step's at half the size. float16 allocates as bfloat16.

**Skeletons.** The structure around a chain of units (a residual add, a reversible layer's group
split, its inverse in backward) is recorded the same way with the chain replaced by a *hole*: an
autograd function that allocates its output and its input gradient and marks where it runs. The
estimate substitutes the composed chain for each hole.

Skeletons recorded: ``skel:res``/``skel:res+``/``skel:dense`` (the whole chain as the hole),
``skel:res:<op>``/``skel:dense:<op>`` (the op's convolution inside, the units after it as the
hole: the convolution's input is also the skip connection's, and how their gradients meet depends
on the op), ``skel:deqf`` (``f(z, x) = hole(z) + x``), ``skel:revstack<G>:<d>`` (a reversible stack,
or a checkpointed segment of one, of ``d`` = 1-3 layers under plain autograd or ``no_grad``: group
lists between layers),
``skel:rev<G>:back[:first]`` (``_layer_backward`` of the
reversible plan, group functions as holes).

**Optimizers.** One step of each optimizer on one parameter gives its per-parameter transient.

The table depends on the lowering (``gnnspec.lower``), the op registry and torch-geometric: when
they change, rerun this script (``--check`` reports stale pieces; the corpus dry-run tests in
``tests/test_estimate.py`` fail when the table no longer matches the code).

The shape points here are random (seeded) and are not the benchmark's configurations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

from gnnspec import ir
from gnnspec.memory.pieces import norm_act_key, op_key, rev_back_key, table_key
from gnnspec.memory.recorder import AllocationRecorder

TABLE_PATH = Path(__file__).with_name("coefficients.json")
TABLE_VERSION = 1

DTYPES = {4: torch.float32, 8: torch.float64, 2: torch.bfloat16}

# ---------------------------------------------------------------------------- units


@dataclass
class Built:
    """What a unit factory returns for one shape point."""

    module: nn.Module
    call: Callable[..., Tensor]
    in_shape: tuple[int, ...]
    # extra inputs: name -> (shape, dtype or None for the model dtype, requires grad)
    extras: dict[str, tuple[tuple[int, ...], torch.dtype | None, bool]] = field(default_factory=dict)
    keep: list[Tensor] = field(default_factory=list)  # graph tensors: alive, not the unit's


@dataclass
class UnitDef:
    key: str
    vars: tuple[str, ...]
    build: Callable[[dict[str, int], torch.dtype], Built]
    points: Callable[[random.Random], dict[str, int]]
    variants: tuple[str, ...] = ("g", "ga", "n", "na", "o")
    npoints: int = 10


def _fake_graph(form: str, n: int, e: int, dtype: torch.dtype):
    """A graph of ``n`` nodes and ``e`` edges prepared in ``form``: placeholders under
    ``FakeTensorMode``; outside it (:func:`record_unit` with ``real``), :func:`_distinct_edges`
    prepared as a model prepares its graph."""
    from gnnspec.lower.dropout_tape import fake_tensors_active
    from gnnspec.ops import GraphCache, PreparedGraph

    if fake_tensors_active():
        return PreparedGraph.placeholder(torch.empty(2, e, dtype=torch.long), n, [form], dtype)
    return GraphCache().prepare(_distinct_edges(n, e), num_nodes=n, dtype=dtype, forms=[form])


def _distinct_edges(n: int, e: int) -> Tensor:
    """``[2, e]`` edges on ``n`` nodes without self-loops or duplicates (``e <= n (n - 1)``), the
    graph the estimate is exact for: edge ``k`` runs from ``k mod n`` to ``k mod n + 1 + k div n``
    (mod ``n``)."""
    k = torch.arange(e)
    src = k % n
    return torch.stack([src, (src + 1 + k // n) % n])


def _graph_tensors(graph) -> list[Tensor]:
    return [graph.edge_index, *graph.prepared_tensors()]


def _points_op(heads: bool, same_width: bool = False):
    def points(rng: random.Random) -> dict[str, int]:
        n = rng.randrange(500, 5000)
        e = n * rng.randrange(2, 12) + rng.randrange(0, n)
        if heads:
            h = rng.randrange(1, 6)
            c = rng.randrange(3, 40)
            o = h * c
        else:
            h, o = 1, rng.randrange(5, 200)
            c = o
        i = o if same_width else o + rng.randrange(1, 300)
        return {"N": n, "E": e, "I": i, "O": o, "H": h, "C": c}

    return points


def _points_width(rng: random.Random) -> dict[str, int]:
    return {"N": rng.randrange(500, 5000), "D": rng.randrange(5, 300)}


def _points_linear(rng: random.Random) -> dict[str, int]:
    return {"N": rng.randrange(500, 5000), "I": rng.randrange(5, 300), "O": rng.randrange(5, 300)}


def _points_prop(rng: random.Random) -> dict[str, int]:
    n = rng.randrange(500, 5000)
    return {"N": n, "E": n * rng.randrange(2, 12) + rng.randrange(0, n), "D": rng.randrange(5, 300)}


def _conv_builder(name: str, args: dict[str, Any]):
    """``build(pt, dtype) -> (conv, graph)``: op ``name`` with ``args`` (heads from ``pt["H"]``) at
    ``pt["I"] -> pt["O"]``, and a fake prepared graph of ``pt["N"]`` nodes and ``pt["E"]`` edges."""
    from gnnspec.ir import OP_SIGNATURES, Op
    from gnnspec.ops import graph_form, make_conv

    sig = OP_SIGNATURES[name]
    form = graph_form(Op(name=name, args=tuple(args.items())))

    def build(pt: dict[str, int], dtype: torch.dtype):
        full = {p.name: args.get(p.name, p.default) for p in sig.params}
        if sig.heads is not None:
            full[sig.heads] = pt["H"]
        conv = make_conv(Op(name=name, args=tuple(full.items())), pt["O"], in_channels=pt["I"])
        return conv, _fake_graph(form, pt["N"], pt["E"], dtype)

    return build


def _op_unit_def(key: str, name: str, widen: bool, build) -> UnitDef:
    """The unit ``key`` of op ``name`` (variables N, E, O[, H, C][, I when ``widen``])."""
    from gnnspec.ir import OP_SIGNATURES

    heads = OP_SIGNATURES[name].heads is not None
    vars_ = ("N", "E", "O", "H", "C") if heads else ("N", "E", "O")
    if widen:
        vars_ = vars_[:2] + ("I",) + vars_[2:]
    return UnitDef(key, vars_, build, _points_op(heads, same_width=not widen), npoints=16 if heads else 12)


def _op_unit(name: str, args: dict[str, Any], widen: bool = False) -> UnitDef:
    from gnnspec.ops import call_conv

    make = _conv_builder(name, args)

    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        conv, graph = make(pt, dtype)
        return Built(conv, lambda x: call_conv(conv, name, x, graph), (pt["N"], pt["I"]), keep=_graph_tensors(graph))

    # A layer may be built differently when its input is wider (GENConv adds a projection), so
    # `dense` stacks, whose layers widen, get their own unit (key suffix ":wide").
    return _op_unit_def(op_key(name, args) + (":wide" if widen else ""), name, widen, build)


def _conv_skeleton(kind: str, name: str, args: dict[str, Any], widen: bool) -> UnitDef:
    """A residual (``res``) or dense layer with its op's convolution inside and the units after
    the convolution (norm, act, dropout) as a hole: the convolution's input is also the
    layer's input, and how its gradient meets the skip connection's depends on the op."""
    from gnnspec.ops import call_conv

    make = _conv_builder(name, args)

    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        conv, graph = make(pt, dtype)
        hole = Hole()
        if kind == "res":
            call = lambda x: hole(call_conv(conv, name, x, graph)) + x  # noqa: E731
        else:
            call = lambda x: torch.cat([x, hole(call_conv(conv, name, x, graph))], dim=-1)  # noqa: E731
        return Built(conv, call, (pt["N"], pt["I"]), keep=_graph_tensors(graph))

    return _op_unit_def(f"skel:{kind}:" + op_key(name, args) + (":wide" if widen else ""), name, widen, build)


def _gcn2_unit() -> UnitDef:
    from gnnspec.ops import call_conv, graph_form, make_gcn2

    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        conv = make_gcn2(pt["D"], 0.1, 0.5, 1)
        graph = _fake_graph(graph_form("gcn2"), pt["N"], pt["E"], dtype)
        return Built(
            conv,
            lambda x, X0: call_conv(conv, "gcn2", x, graph, x_0=X0),
            (pt["N"], pt["D"]),
            extras={"X0": ((pt["N"], pt["D"]), None, True)},
            keep=_graph_tensors(graph),
        )

    return UnitDef("op:gcn2", ("N", "E", "D"), build, _points_prop)


def _prop_unit(kind: str, k: int) -> UnitDef:
    from gnnspec.ops import call_conv, graph_form, make_appnp, make_sgc

    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        prop = make_appnp(k, 0.1) if kind == "appnp" else make_sgc(k)
        graph = _fake_graph(graph_form(kind), pt["N"], pt["E"], dtype)
        return Built(prop, lambda x: call_conv(prop, kind, x, graph), (pt["N"], pt["D"]), keep=_graph_tensors(graph))

    return UnitDef(f"{kind}:{k}", ("N", "E", "D"), build, _points_prop, variants=("g", "n", "o"), npoints=8)


def _norm_unit(kind: str) -> UnitDef:
    from gnnspec.lower.layers import make_norm

    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        norm = make_norm(kind, pt["D"])
        return Built(norm, norm, (pt["N"], pt["D"]))

    return UnitDef(f"norm:{kind}", ("N", "D"), build, _points_width, npoints=8)


def _act_unit(kind: str) -> UnitDef:
    from gnnspec.lower.layers import make_act

    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        act = make_act(kind)
        return Built(act, act, (pt["N"], pt["D"]))

    variants = ("g", "ga", "n", "na", "o") if kind == "prelu" else ("g", "n", "o")
    return UnitDef(f"act:{kind}", ("N", "D"), build, _points_width, variants=variants, npoints=8)


def _norm_act_unit(norm_kind: str, act_kind: str, between: str | None) -> UnitDef:
    """A stack layer's norm and its activation in place on the norm's output
    (:func:`gnnspec.ir.act_in_place`), with ``between`` them (:func:`gnnspec.ir.drop_in_place`)
    ``"drop"``, a dropout in place, or ``"mask"``, the stage's shared mask (the extra ``M``,
    ``rev``/``deq``), as :class:`gnnspec.lower.layers.ConvLayer` runs them."""
    from gnnspec.lower.layers import make_act, make_norm, norm_relu_of_dropout, norm_relu_of_masked

    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        norm, act = make_norm(norm_kind, pt["D"]), make_act(act_kind)
        act.inplace = True
        if between == "mask":
            return Built(norm, lambda x, M: norm_relu_of_masked(norm, x, M, 0.5), (pt["N"], pt["D"]),
                         extras={"M": ((pt["N"], pt["D"]), None, False)})
        if between == "drop":
            return Built(norm, lambda x: norm_relu_of_dropout(norm, x, 0.5, True), (pt["N"], pt["D"]))
        return Built(norm, lambda x: act(norm(x)), (pt["N"], pt["D"]))

    return UnitDef(norm_act_key(norm_kind, act_kind, between), ("N", "D"), build, _points_width, npoints=8)


def _dropout_unit() -> UnitDef:
    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        return Built(nn.Module(), lambda x: F.dropout(x, 0.5, True), (pt["N"], pt["D"]))

    return UnitDef("dropout", ("N", "D"), build, _points_width, variants=("g", "n", "o"), npoints=8)


def _mask_unit() -> UnitDef:
    from gnnspec.lower.recompute import SharedDropout

    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        return Built(
            nn.Module(),
            lambda x, M: SharedDropout.apply_mask(x, M),
            (pt["N"], pt["D"]),
            extras={"M": ((pt["N"], pt["D"]), None, False)},
        )

    return UnitDef("mask", ("N", "D"), build, _points_width, variants=("g", "n", "o"), npoints=8)


def _linear_unit(bias: bool) -> UnitDef:
    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        lin = nn.Linear(pt["I"], pt["O"], bias=bias)
        return Built(lin, lin, (pt["N"], pt["I"]))

    return UnitDef("linear" if bias else "linear:nobias", ("N", "I", "O"), build, _points_linear, npoints=10)


def _loss_unit() -> UnitDef:
    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        return Built(
            nn.Module(),
            lambda x, T: F.cross_entropy(x, T),
            (pt["N"], pt["D"]),
            extras={"T": ((pt["N"],), torch.long, False)},
        )

    return UnitDef("loss:ce", ("N", "D"), build, _points_width, variants=("g",), npoints=8)


def _points_rev(rng: random.Random) -> dict[str, int]:
    return {"N": rng.randrange(500, 5000), "W": rng.randrange(5, 150)}


def _skeleton(key: str, call: Callable, vars_=("N", "D"), in_width="D", points=_points_width, extras=None,
              variants=("g", "n", "o")) -> UnitDef:
    def build(pt: dict[str, int], dtype: torch.dtype) -> Built:
        width = pt[in_width] if isinstance(in_width, str) else in_width(pt)
        return Built(nn.Module(), call(pt), (pt["N"], width), extras=(extras(pt) if extras else {}))

    return UnitDef(key, vars_, build, points, variants=variants, npoints=6)


def skeleton_defs() -> list[UnitDef]:
    """The structures around a layer's chain of units, each with the chain as a hole."""
    from gnnspec.lower.reversible import ReversibleStack

    def res(pt):
        hole = Hole()
        return lambda x: hole(x) + x

    def res_plus(pt):
        hole = Hole()
        return lambda x: x + hole(x)

    def dense(pt):
        hole = Hole(pt["O"])
        return lambda x: torch.cat([x, hole(x)], dim=-1)

    def deqf(pt):
        hole = Hole()
        return lambda z, X1: hole(z) + X1

    def rev_stack(groups, depth):
        def call(pt):
            stack = ReversibleStack([[Hole() for _ in range(groups)] for _ in range(depth)], reversible=False)
            return lambda x: stack(x)
        return call

    out = [
        _skeleton("skel:res", res),
        _skeleton("skel:res+", res_plus),
        _skeleton("skel:dense", dense, vars_=("N", "I", "O"), in_width="I", points=_points_linear),
        _skeleton("skel:deqf", deqf, extras=lambda pt: {"X1": ((pt["N"], pt["D"]), None, True)}),
    ]
    for groups in (2, 3, 4):
        for depth in (1, 2, 3):
            out.append(_skeleton(f"skel:revstack{groups}:{depth}", rev_stack(groups, depth), vars_=("N", "W"),
                                 in_width=lambda pt, g=groups: g * pt["W"], points=_points_rev))
    for name, combo in _op_combinations():
        out.append(_conv_skeleton("res", name, combo, widen=False))
        out.append(_conv_skeleton("dense", name, combo, widen=False))
        out.append(_conv_skeleton("dense", name, combo, widen=True))
    return out


def _op_combinations() -> list[tuple[str, dict[str, Any]]]:
    """Every built-in op with every combination of its shape-changing arguments."""
    from gnnspec.ir import OP_SIGNATURES

    out = []
    for name, sig in OP_SIGNATURES.items():
        if not sig.builtin:
            continue
        choices: list[list[tuple[str, Any]]] = [[]]
        for p in sig.params:
            if p.name == sig.heads or p.type == "float":
                continue
            if p.type == "enum":
                values = list(p.choices)
            elif p.type == "bool":
                values = [False, True]
            else:
                values = [p.default]
            choices = [c + [(p.name, v)] for c in choices for v in values]
        out += [(name, dict(combo)) for combo in choices]
    return out


def record_rev_back(groups: int, pt: dict[str, int], s: int, first: bool, subtract: bool = False) -> dict:
    """The reversible stack's backward through one layer (``_layer_backward``), group functions as
    holes. It takes the layer's output groups and their gradients as lists and drops each piece
    once used: ``first`` (the stack's last layer) gets views of the saved output ``Xy`` and of the
    incoming gradient ``Xg``; a layer below gets separate group tensors ``Xy<i>``/``Xg<i>``. It
    returns the input groups ``Yx<i>`` and their gradients ``Yg<i>`` (one may be an input passed
    on: an alias). With ``subtract`` the holes reconstruct inside their products
    (:class:`SubtractingHole`: the function's output is the reconstructed group), else the layer
    subtracts each function's output from its group."""
    from types import SimpleNamespace

    from gnnspec.lower.recompute import ModuleRecord
    from gnnspec.lower.reversible import ReversibleStack, _FunctionState, _layer_backward

    dtype = DTYPES[s]
    n, w = pt["N"], pt["W"]
    with _fake_mode():
        hole = SubtractingHole if subtract else Hole
        stack = ReversibleStack([[hole() for _ in range(groups)]], reversible=True)
        rec = AllocationRecorder()
        rec.hole_calls = 0
        _RECORDERS.append(rec)
        with rec, _popping(_RECORDERS):
            if first:
                y = torch.empty(n, groups * w, dtype=dtype)
                g = torch.empty(n, groups * w, dtype=dtype)
                uids = {"Xy": rec.uid_of(y), "Xg": rec.uid_of(g)}
                ys, grad_ys = list(y.chunk(groups, dim=-1)), list(g.chunk(groups, dim=-1))
                del y, g
            else:
                ys = [torch.empty(n, w, dtype=dtype) for _ in range(groups)]
                grad_ys = [torch.empty(n, w, dtype=dtype) for _ in range(groups)]
                uids = {**{f"Xy{i}": rec.uid_of(t) for i, t in enumerate(ys)},
                        **{f"Xg{i}": rec.uid_of(t) for i, t in enumerate(grad_ys)}}
            # The holes' parameters are not the stack's: their gradients belong to the hole's own
            # calibration, so each function recomputes with no parameters to differentiate.
            states = [_FunctionState([], [], ModuleRecord()) for _ in stack.functions]
            ctx = SimpleNamespace(stack=stack, functions=list(stack.functions), autocast=("cpu", False, torch.bfloat16),
                                  states=states, buffers_before=None)
            rec.mark("F")
            xs, grad_xs = _layer_backward(ctx, 0, ys, grad_ys, (), [])
            rec.mark("Fend")
            del ys, grad_ys
            aliases = {}
            inputs = {u: name for name, u in uids.items()}
            for name, outs in (("Yx", xs), ("Yg", grad_xs)):
                for i, t in enumerate(outs):
                    u = rec.uid_of(t)
                    if u in inputs:
                        aliases[f"{name}{i}"] = inputs[u]
                    else:
                        uids[f"{name}{i}"] = u
            rec.mark("Xdrop")
            del xs, grad_xs, outs, t
            rec.mark("Ydrop")
            rec.mark("Bend")
        raw = _extract(rec.events, uids, set(), backward=False, inputs_held=False)
        raw["aliases"] = aliases
        return raw


def calibrate_rev_back(groups: int, first: bool, seed: int = 0, half: bool = False, subtract: bool = False) -> dict:
    rng = random.Random(f"rev_back{groups}:{first}:{seed}")
    points = []
    for k in range(6):
        pt = _points_rev(rng)
        pt["s"] = 2 if half else 4 if k % 2 == 0 else 8
        points.append(pt)
    raws = [record_rev_back(groups, {k: v for k, v in pt.items() if k != "s"}, pt["s"], first, subtract)
            for pt in points]
    label = f"rev_back{groups}{':sub' if subtract else ''}{':first' if first else ''}"
    return {"vars": ["N", "W"], "variants": {"g": fit_programs(raws, points, ("N", "W"), label)},
            "params": [], "buffers": []}


def unit_defs() -> list[UnitDef]:
    """Every unit of the table."""
    units: list[UnitDef] = []
    for name, combo in _op_combinations():
        units.append(_op_unit(name, combo))
        units.append(_op_unit(name, combo, widen=True))
    units.append(_gcn2_unit())
    for kind in ("batch", "layer", "graph", "instance"):
        units.append(_norm_unit(kind))
    for kind in ("relu", "gelu", "elu", "leaky_relu", "prelu", "tanh"):
        units.append(_act_unit(kind))
    for norm_kind in ("batch", "layer"):
        for act_kind in ("relu", "leaky_relu"):
            if ir.act_in_place(norm_kind, act_kind):
                units.append(_norm_act_unit(norm_kind, act_kind, None))
            for kind, between in (("plain", "drop"), ("rev", "mask")):
                if ir.drop_in_place(kind, norm_kind, act_kind, 0.5):
                    units.append(_norm_act_unit(norm_kind, act_kind, between))
    units += [_dropout_unit(), _mask_unit(), _linear_unit(True), _linear_unit(False), _loss_unit()]
    for k in range(1, 17):
        units += [_prop_unit("appnp", k), _prop_unit("sgc", k)]
    return units


# ---------------------------------------------------------------------------- recording


class CalibrationError(RuntimeError):
    pass


_RECORDERS: list[AllocationRecorder] = []


class _HoleFunction(torch.autograd.Function):
    """A stand-in for a chain of units: allocates its output (forward) and its input's gradient
    (backward), saves nothing, and marks both regions in the current recorder."""

    @staticmethod
    def forward(ctx, x: Tensor, out_width: int, weight: Tensor) -> Tensor:  # type: ignore[override]
        rec = _RECORDERS[-1]
        k = rec.hole_calls
        rec.hole_calls += 1
        rec.mark(f"HF:{k}", rec.uid_of(x))
        y = x.new_empty((*x.shape[:-1], out_width))
        rec.mark(f"HFe:{k}", rec.uid_of(y))
        ctx.k, ctx.in_width = k, x.shape[-1]
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rec = _RECORDERS[-1]
        rec.mark(f"HB:{ctx.k}", rec.uid_of(grad))
        gx = grad.new_empty((*grad.shape[:-1], ctx.in_width)) if ctx.needs_input_grad[0] else None
        rec.mark(f"HBe:{ctx.k}", None if gx is None else rec.uid_of(gx))
        return gx, None, None


class Hole(nn.Module):
    """A module whose forward is :class:`_HoleFunction` (extra arguments ignored). Its empty
    weight makes its output require grad like a chain with parameters, whatever the input."""

    def __init__(self, out_width: int | None = None) -> None:
        super().__init__()
        self.out_width = out_width
        self.weight = nn.Parameter(torch.empty(0))

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        return _HoleFunction.apply(x, self.out_width or x.shape[-1], self.weight)


class SubtractingHole(Hole):
    """A hole for a ``rev`` group function that reconstructs inside its products
    (:meth:`~gnnspec.lower.layers.ConvLayer.subtracts_residual`): called with ``residual=y,
    subtract=True`` its output is ``y - f(x)``, allocated where the chain's last unit allocates
    its own output (the product accumulates into the difference instead)."""

    adds_residual = True

    def forward(self, x: Tensor, *args: Any, residual: Tensor | None = None, subtract: bool = False) -> Tensor:
        if residual is not None and not subtract:
            raise ValueError("a SubtractingHole stands for the reconstruction only")
        return super().forward(x)

    def subtracts_residual(self, x: Tensor) -> bool:
        return True


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@contextlib.contextmanager
def _popping(stack: list):
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Modules are built in the target dtype directly: `Module.to` cannot swap fake parameters.
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _make(shape, dtype, requires_grad: bool) -> Tensor:
    if dtype == torch.long:
        return torch.empty(shape, dtype=dtype)
    leaf = torch.empty(shape, dtype=dtype, requires_grad=requires_grad)
    return leaf * 1.0 if requires_grad else leaf


def record_unit(unit: UnitDef, pt: dict[str, int], s: int, variant: str, real: bool = False) -> dict:
    """One run of ``unit`` at shape point ``pt`` (element size ``s``) in ``variant``; the raw program.
    ``real``: on real tensors (a graph of distinct edges), for an op whose forward fake tensors
    cannot run (shapes that depend on the data, as ``add_remaining_self_loops``' mask gives)."""
    dtype = DTYPES[s]
    grad_x = variant in ("g", "ga")
    accum = variant in ("ga", "na")
    nograd = variant == "o"
    with contextlib.nullcontext() if real else _fake_mode():
        torch.manual_seed(0)
        with _default_dtype(dtype):
            built = unit.build(pt, dtype)
        params = list(built.module.parameters())
        if accum:
            for p in params:
                p.grad = torch.zeros_like(p)
        rec = AllocationRecorder()
        rec.hole_calls = 0
        rec.track_existing([*params, *built.module.buffers(), *(p.grad for p in params if p.grad is not None), *built.keep])
        _RECORDERS.append(rec)
        with rec, _popping(_RECORDERS):
            x = _make(built.in_shape, dtype, grad_x and not nograd)
            extras = {
                name: _make(shape, dt or dtype, g and grad_x and not nograd)
                for name, (shape, dt, g) in built.extras.items()
            }
            uids = {"X": rec.uid_of(x), **{name: rec.uid_of(t) for name, t in extras.items()}}
            if x.requires_grad:
                x.register_hook(lambda g: rec.mark("GX", rec.uid_of(g)))
            for name, extra in extras.items():
                if extra.requires_grad:
                    extra.register_hook(lambda g, name=name: rec.mark("G" + name, rec.uid_of(g)))
                    # the harness's own node behind the extra input runs inside the backward:
                    # its allocations are cut out (up to this post-hook)
                    extra.grad_fn.register_hook(lambda *a, name=name: rec.mark("H" + name))
            extra = None  # no reference of the harness may keep an input alive
            rec.mark("F")
            with torch.no_grad() if nograd else contextlib.nullcontext():
                y = built.call(x, **extras)
            rec.mark("Fend")
            uids["Y"] = rec.uid_of(y)
            del x, extras
            rec.mark("Xdrop")
            backward = y.requires_grad
            if backward:
                y.register_hook(lambda g: rec.mark("GY", rec.uid_of(g)))
                z = y * 1.0
            del y
            rec.mark("Ydrop")
            if backward:
                loss = z.sum()
                del z
                rec.mark("B")
                loss.backward()
                del loss
            rec.mark("Bend")
        grad_uids = {rec.uid_of(p.grad) for p in params if p.grad is not None}
        raw = _extract(rec.events, uids, grad_uids, backward)
        raw["params"] = [(tuple(p.shape), str(p.dtype).replace("torch.", "")) for p in params]
        raw["buffers"] = [(tuple(b.shape), str(b.dtype).replace("torch.", "")) for b in built.module.buffers()]
        return raw


def _is_output(role: str) -> bool:
    return role.startswith("Y")


def _extract(events: list[tuple], uids: dict[str, int | None], grad_uids: set, backward: bool,
             inputs_held: bool = True) -> dict:
    """Cut a log into a piece's forward and backward programs (see the module docstring).

    ``uids`` names the boundary storages: inputs (``X``, ``X0``, ``M``, ...: held by the caller
    through the forward) and outputs (``Y``, ``Y1``). Gradient hooks mark ``GY`` (start of the
    backward) and ``G<input>`` (the gradient handed on). Hole markers cut out the regions where
    a hole ran (``("hF", k)`` / ``("hB", k)`` placeholders), with the hole's boundary storages
    named ``CY<k>``/``GCX<k>`` (allocated by the hole) and recorded in ``holes``.
    """
    marks: dict[str, int] = {}
    payload: dict[str, Any] = {}
    for i, e in enumerate(events):
        if e[0] == "m":
            marks[e[1]] = i
            payload[e[1]] = e[2]
    roles: dict[int, str] = {uid: name for name, uid in uids.items() if uid is not None}
    aliases: dict[str, str] = {}
    f0, f1 = marks["F"], marks["Fend"]
    grad_marks = [k for k in marks if k.startswith("G")]
    if backward:
        if "GY" not in marks:
            raise CalibrationError("the output's gradient never arrived")
        b0 = marks["GY"]
        ends = [marks[k] for k in grad_marks if k != "GY"]
        b1 = max(ends) if ends else marks["Bend"]
        for k in grad_marks:
            if payload[k] in roles and roles[payload[k]] != k:
                # a gradient handed on as is (the other input of an add): the same storage
                aliases[k] = roles[payload[k]]
                continue
            roles[payload[k]] = k
    else:
        b0 = b1 = marks["Bend"]
    baseline = {e[1] for e in events if e[0] == "a" and e[5] == "existing"}
    # hole regions: index ranges to skip, and the storages each hole made
    holes: dict[int, dict[str, int]] = {}
    skip: dict[int, tuple[str, int]] = {}  # start index -> (kind, hole)
    region_end: dict[int, int] = {}
    hole_gy_free: set[int] = set()
    for label, i in marks.items():
        if label.startswith("HF:") or label.startswith("HB:"):
            kind, k = label[:2], int(label[3:])
            j = marks[f"{kind}e:{k}"]
            skip[i] = (kind, k)
            region_end[i] = j
            h = holes.setdefault(k, {})
            if kind == "HF":
                h["X"], h["Y"] = payload[label], payload[f"HFe:{k}"]
                roles.setdefault(h["Y"], f"CY{k}")
            else:
                h["GY"], h["GX"] = payload[label], payload[f"HBe:{k}"]
                roles.setdefault(h["GX"], f"GCX{k}")
                nxt = next((n for n in range(j + 1, len(events)) if events[n][0] != "m"), None)
                if nxt is not None and events[nxt][0] == "f" and events[nxt][1] == h["GY"]:
                    hole_gy_free.add(nxt)  # the hole held the gradient last: the inner unit will
    fwd: list[tuple] = []
    bwd: list[tuple] = []
    mine: set[int] = set()
    end_f: list[Any] = []
    end_b: list[Any] = []
    in_hole_until = -1
    harness_spans = [(marks["G" + k[1:]], marks[k]) for k in marks if k.startswith("H") and ("G" + k[1:]) in marks
                     and not k.startswith("HF") and not k.startswith("HB")]
    for i, e in enumerate(events):
        if any(a < i < b for a, b in harness_spans) and e[0] != "m":
            continue
        kind = e[0]
        in_f = f0 < i < f1
        in_b = backward and b0 < i < b1
        if i in skip:
            hk, k = skip[i]
            (fwd if in_f else bwd).append(("hF" if hk == "HF" else "hB", k))
            in_hole_until = region_end[i]
            continue
        if kind == "m" or i in hole_gy_free:
            continue
        if i < in_hole_until:
            if kind == "a":
                mine.add(e[1])  # the hole's own output / input gradient
                continue
            if kind == "z":
                continue
        if kind == "a":
            if in_f or in_b:
                uid = e[1]
                mine.add(uid)
                tag = "grad" if uid in grad_uids else None
                (fwd if in_f else bwd).append(("a", uid, e[2], e[3], e[4], tag))
            continue
        if kind == "z":
            if in_f or in_b:
                (fwd if in_f else bwd).append(("z", e[1], e[2]))
            elif e[1] in mine:
                raise CalibrationError(f"resize of a piece's storage outside it: {e}")
            continue
        uid = e[1]
        role = roles.get(uid)
        if role is None and uid not in mine:
            if in_b and uid in baseline:  # a gradient that existed before (tied weights), replaced
                bwd.append(("d", uid, -e[2]))
            continue
        if role == "GY" and not in_b:
            if backward and i > b1:
                end_b.append(uid)
            continue
        if role is not None and role.startswith("G") and role != "GY" and not role.startswith("GCX"):
            continue  # a gradient handed on: its consumer frees it
        is_input = role is not None and role in uids and not _is_output(role)
        if in_f:
            if is_input and inputs_held:
                raise CalibrationError(f"input {role} was freed while its caller held it")
            fwd.append(("r", uid))
        elif in_b:
            bwd.append(("r", uid))
        elif i < f0:
            continue
        elif f1 < i < (b0 if backward else marks["Bend"] + 1):
            # dropped by the harness after the forward: nothing in the piece held it
            if role is None or role.startswith("CY"):
                end_f.append(uid)
        elif backward and i > b1:
            end_b.append(uid)
    for uid in end_f:
        fwd.append(("r", uid))
    for uid in end_b:
        bwd.append(("r", uid))
    names: dict[int, Any] = {}
    counter = 0

    def name_of(uid: int) -> Any:
        nonlocal counter
        if uid not in names:
            if uid in roles:
                names[uid] = roles[uid]
            else:
                names[uid] = counter
                counter += 1
        return names[uid]

    def rename(prog):
        return [ev if ev[0] in ("hF", "hB") else (ev[0], name_of(ev[1]), *ev[2:]) for ev in prog]

    fwd, bwd = rename(fwd), rename(bwd)
    hole_roles = {k: {r: name_of(u) for r, u in h.items() if u is not None} for k, h in sorted(holes.items())}
    return {"fwd": fwd, "bwd": bwd, "holes": hole_roles, "aliases": aliases}


# ---------------------------------------------------------------------------- fitting

ELSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4, "bool": 1, "uint8": 1, "int8": 1}


def _rational_solve(rows: list[list[int]], values: list[int]) -> list[Fraction] | None:
    """Exact integer-rational coefficients c with rows @ c == values, or None."""
    import numpy as np

    a = np.array(rows, dtype=float)
    b = np.array(values, dtype=float)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    coefs = [Fraction(float(c)).limit_denominator(64) for c in sol]
    for row, v in zip(rows, values):
        if sum(Fraction(r) * c for r, c in zip(row, coefs)) != v:
            return None
    return coefs


def _poly_mul(a: dict[tuple, Fraction], b: dict[tuple, Fraction]) -> dict[tuple, Fraction]:
    out: dict[tuple, Fraction] = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            m = tuple(sorted(ma + mb))
            out[m] = out.get(m, Fraction(0)) + ca * cb
    return {m: c for m, c in out.items() if c != 0}


def fit_size(samples: list[tuple[int, Any, Any]], points: list[dict[str, int]], vars_: tuple[str, ...]) -> dict[tuple, Fraction]:
    """Bytes of one allocation as a polynomial in the shape variables and ``s``.

    ``samples[k] = (nbytes, shape or None, dtype or None)`` at ``points[k]`` (which holds ``s``)."""
    dtypes = [d for _, _, d in samples]
    model = [{2: "bfloat16", 4: "float32", 8: "float64"}[p["s"]] for p in points]
    shapes = [sh for _, sh, _ in samples]
    if all(sh is not None for sh in shapes) and len({len(sh) for sh in shapes}) == 1 and all(d is not None for d in dtypes):
        if all(d == m for d, m in zip(dtypes, model)):
            size: dict[tuple, Fraction] = {("s",): Fraction(1)}
        elif len(set(dtypes)) == 1:
            size = {(): Fraction(ELSIZE[dtypes[0]])}
        else:
            raise CalibrationError(f"dtype varies across points: {dtypes}")
        poly = size
        rows = [[1] + [p[v] for v in vars_] for p in points]
        for d in range(len(shapes[0])):
            coefs = _rational_solve(rows, [sh[d] for sh in shapes])
            if coefs is None:
                break
            dim = {(): coefs[0]} if coefs[0] else {}
            for v, c in zip(vars_, coefs[1:]):
                if c:
                    dim[(v,)] = c
            poly = _poly_mul(poly, dim) if dim else {}
        else:
            return poly
    # fallback: bytes as a polynomial of degree <= 3 in the variables and s
    names = ("s",) + vars_
    monos = [()] + [m for k in (1, 2, 3, 4) for m in combinations_with_replacement(names, k) if m.count("s") <= 1]
    monos = [m for m in monos if len(m) - m.count("s") <= 3]
    values = [b for b, _, _ in samples]
    table = [[math.prod(p[v] for v in m) for m in monos] for p in points]
    # the sparsest exact fit: one term, then two, then all (when there are points enough)
    for size in (1, 2):
        for chosen in combinations_with_replacement(range(len(monos)), size):
            if len(set(chosen)) < size:
                continue
            coefs = _rational_solve([[row[j] for j in chosen] for row in table], values)
            if coefs is not None:
                return {monos[j]: c for j, c in zip(chosen, coefs) if c}
    if len(table) < len(monos):
        raise CalibrationError(f"too few points ({len(table)}) for a {len(monos)}-term fit of {values}")
    coefs = _rational_solve(table, values)
    if coefs is None:
        raise CalibrationError(f"no exact fit for allocation sizes {values}")
    return {m: c for m, c in zip(monos, coefs) if c}


def _signature(prog: list[tuple]) -> list[tuple]:
    return [(e[0], e[1]) if e[0] != "a" else (e[0], e[1], e[5], None if e[3] is None else len(e[3])) for e in prog]


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, str)) else str(value)


def form_text(poly: dict[tuple, Fraction]) -> dict[str, Any]:
    """A polynomial as JSON: ``{"N*O*s": 2, "": 8}``."""
    out = {}
    for m, c in sorted(poly.items()):
        out["*".join(m)] = int(c) if c.denominator == 1 else float(c)
    return out


def fit_programs(raws: list[dict], points: list[dict[str, int]], vars_: tuple[str, ...], label: str) -> dict:
    """Fit the raw programs of one variant recorded at ``points`` into one program of forms."""
    first = raws[0]
    for phase in ("fwd", "bwd"):
        sig = _signature(first[phase])
        for r, p in zip(raws[1:], points[1:]):
            if _signature(r[phase]) != sig:
                a, b = sig, _signature(r[phase])
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                raise CalibrationError(
                    f"{label}: the {phase} event sequence changes with the shape at event {k} "
                    f"({a[k:k + 3]} vs {b[k:k + 3]}) at {p}"
                )
    for r, p in zip(raws[1:], points[1:]):
        if r["holes"] != first["holes"]:
            raise CalibrationError(f"{label}: the holes' storages change with the shape at {p}")
    out: dict[str, Any] = {}
    if any(r["aliases"] != first["aliases"] for r in raws):
        raise CalibrationError(f"{label}: gradient aliases change with the shape")
    if first["aliases"]:
        out["aliases"] = first["aliases"]
    if first["holes"]:
        out["holes"] = {str(k): v for k, v in first["holes"].items()}
    for phase in ("fwd", "bwd"):
        prog = []
        for k, ev in enumerate(first[phase]):
            if ev[0] == "a":
                poly = fit_size([(r[phase][k][2], r[phase][k][3], r[phase][k][4]) for r in raws], points, vars_)
                prog.append(["a", ev[1], form_text(poly)] + (["grad"] if ev[5] else []))
            elif ev[0] in ("z", "d"):
                poly = fit_size([(r[phase][k][2], None, None) for r in raws], points, vars_)
                prog.append([ev[0], ev[1], form_text(poly)])
            elif ev[0] in ("hF", "hB"):
                prog.append([ev[0], ev[1]])
            else:
                prog.append(["r", ev[1]])
        out[phase] = prog
    return out


def _fit_tensor_list(raws: list[dict], key: str, points, vars_) -> list[dict]:
    n = len(raws[0][key])
    if any(len(r[key]) != n for r in raws):
        raise CalibrationError(f"the number of {key} changes with the shape")
    out = []
    for k in range(n):
        samples = []
        for r in raws:
            shape, dt = r[key][k]
            samples.append((math.prod(shape) * ELSIZE[dt], shape, dt))
        out.append(form_text(fit_size(samples, points, vars_)))
    return out


def calibrate_unit(unit: UnitDef, seed: int = 0, half: bool = False, real: bool = False) -> dict:
    """Record ``unit`` at its shape points in every variant and fit its programs: in float32 and
    float64 (an element of the model's dtype is ``s`` bytes), or with ``half`` in bfloat16 alone
    (for the :data:`~gnnspec.memory.pieces.HALF` piece; an allocation in bfloat16 is ``s``, one in float32 4 bytes).
    ``real``: on real tensors (:func:`record_unit`)."""
    rng = random.Random(f"{unit.key}:{seed}")
    points = []
    for k in range(unit.npoints):
        pt = unit.points(rng)
        if real and "E" in pt:
            # real kernels cost time: a tenth of the graph (sizes stay distinct, so the fit is the same)
            pt["N"], pt["E"] = pt["N"] // 10, pt["E"] // 10
        pt["s"] = 2 if half else 4 if k % 2 == 0 else 8
        points.append(pt)
    entry: dict[str, Any] = {"vars": list(unit.vars), "variants": {}}
    base: list[dict] | None = None
    for variant in unit.variants:
        raws = [record_unit(unit, {k: v for k, v in pt.items() if k != "s"}, pt["s"], variant, real) for pt in points]
        if base is None:
            base = raws
        entry["variants"][variant] = fit_programs(raws, points, unit.vars, f"{unit.key}[{variant}]")
    assert base is not None
    entry["params"] = _fit_tensor_list(base, "params", points, unit.vars)
    entry["buffers"] = _fit_tensor_list(base, "buffers", points, unit.vars)
    return entry


# ---------------------------------------------------------------------------- user ops


def calibrate_op(name: str, **args: Any) -> list[str]:
    """Calibrate an op registered with :func:`gnnspec.register_op` (or any op at non-default
    arguments) in this process, in float32/float64 and in half precision, adding its pieces to the
    loaded table so that estimates can use it; returns the keys added. Takes a few seconds per
    precision (fake tensors: no data is allocated)."""
    return calibrate_op_pieces(name, args, (False, True))


# what fake tensors raise for an op whose output shape or value depends on the data
_FAKE_TENSOR_REFUSALS = (DataDependentOutputException, DynamicOutputShapeException)


def calibrate_op_pieces(name: str, args: dict[str, Any], precisions: tuple[bool, ...]) -> list[str]:
    """:func:`calibrate_op` for the precisions given (False: float32/float64, True: half)."""
    from gnnspec.ir import OP_SIGNATURES
    from gnnspec.memory import pieces
    from gnnspec.ops import op_impl

    if name not in OP_SIGNATURES:
        raise KeyError(f"unknown op {name!r}; register it first with gnnspec.register_op")
    defs = [_op_unit(name, args), _op_unit(name, args, widen=True), _conv_skeleton("res", name, args, False),
            _conv_skeleton("dense", name, args, False), _conv_skeleton("dense", name, args, True)]
    added = []
    real = False
    for unit in defs:
        for half in precisions:
            try:
                try:
                    entry = calibrate_unit(unit, half=half, real=real)
                except _FAKE_TENSOR_REFUSALS:
                    if real:
                        raise
                    # shapes that depend on the data (a mask's nonzero, as torch-geometric's
                    # add_remaining_self_loops takes): recorded on real tensors instead, at the same
                    # points (a few seconds more), and so are the op's other pieces
                    real = True
                    entry = calibrate_unit(unit, half=half, real=real)
            except Exception:
                if unit.key.endswith(":wide"):
                    break  # a factory without `in_channels`: no dense stacks for this op
                raise
            key = table_key(unit.key, half)
            pieces.table()[key] = pieces._compile_entry(entry)
            pieces.CALIBRATED_FROM[key] = op_impl(name)
            added.append(key)
    pieces._template.cache_clear()
    return added


# ---------------------------------------------------------------------------- optimizers

OPTIMIZER_CONFIGS = {
    "adam": lambda ps, wd: torch.optim.Adam(ps, lr=1e-3, weight_decay=wd),
    "adamw": lambda ps, wd: torch.optim.AdamW(ps, lr=1e-3, weight_decay=wd),
    "sgd": lambda ps, wd: torch.optim.SGD(ps, lr=1e-3, weight_decay=wd),
    "sgd_momentum": lambda ps, wd: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=wd),
}


def calibrate_optimizer(name: str, weight_decay: float) -> dict[str, float]:
    """Per parameter of ``b`` bytes: ``state`` bytes kept (``state_per_byte * b + state_fixed``) and
    the step's transient peak above grads and state (``peak_per_byte * b``), on CPU (one tensor at
    a time, as torch's CPU default)."""
    results = []
    for numel in (1000, 3000):
        p = nn.Parameter(torch.zeros(numel))
        opt = OPTIMIZER_CONFIGS[name]([p], weight_decay)
        p.grad = torch.ones(numel)
        opt.step()  # creates the state
        p.grad = torch.ones(numel)
        from gnnspec.memory.measure import step_state_tensors

        state = sum(t.untyped_storage().nbytes() for t in step_state_tensors(list(opt.state.values())))
        tracker = AllocationRecorder()
        tracker.track_existing([p, p.grad, *step_state_tensors(list(opt.state.values()))])
        start = tracker.current_bytes
        with tracker:
            opt.step()
        results.append((numel * 4, state, tracker.peak_bytes - start))
    (b1, s1, t1), (b2, s2, t2) = results
    per = (s2 - s1) / (b2 - b1)
    return {"state_per_byte": per, "state_fixed": s1 - per * b1, "peak_per_byte": (t2 - t1) / (b2 - b1)}


# ---------------------------------------------------------------------------- the table


def build_table(only: list[str] | None = None, log=print) -> dict[str, Any]:
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
    pieces: dict[str, Any] = {}
    previous: dict[str, Any] = {}
    if only and TABLE_PATH.exists():
        previous = json.loads(TABLE_PATH.read_text())
        pieces = dict(previous.get("pieces", {}))
    defs = unit_defs() + skeleton_defs()
    failed: list[str] = []
    for unit in defs:
        for half in (False, True):
            key = table_key(unit.key, half)
            if only and not any(key.startswith(o) for o in only):
                continue
            t0 = time.perf_counter()
            try:
                pieces[key] = calibrate_unit(unit, half=half)
            except Exception as err:  # one piece failing should not lose the others
                failed.append(key)
                log(f"{key:48s} FAILED: {type(err).__name__}: {err}")
                continue
            log(f"{key:48s} {time.perf_counter() - t0:6.2f} s")
    # the subtracting form (rev_back_key) only in float32/float64: in half precision no layer takes it
    for groups in (2, 3, 4):
        for first in (True, False):
            for half, subtract in ((False, False), (True, False), (False, True)):
                key = table_key(rev_back_key(groups, first, subtract), half)
                if only and not any(key.startswith(o) for o in only):
                    continue
                try:
                    pieces[key] = calibrate_rev_back(groups, first, half=half, subtract=subtract)
                except Exception as err:
                    failed.append(key)
                    log(f"{key:48s} FAILED: {type(err).__name__}: {err}")
                    continue
                log(f"{key:48s}")
    optimizers = previous.get("optimizers", {})
    if not only or any(o.startswith("opt") for o in only):
        optimizers = {
            name: {"plain": calibrate_optimizer(name, 0.0), "weight_decay": calibrate_optimizer(name, 0.01)}
            for name in OPTIMIZER_CONFIGS
        }
    if failed:
        # a table without these pieces would make every estimate that needs them fail later
        raise CalibrationError(f"{len(failed)} pieces failed: {', '.join(failed)}; nothing was written")
    return {
        "meta": {"version": TABLE_VERSION, "torch": torch.__version__, "torch_geometric": _pyg_version()},
        "pieces": dict(sorted(pieces.items())),
        "optimizers": optimizers,
    }


def _pyg_version() -> str:
    import torch_geometric

    return torch_geometric.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gnnspec.memory.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="recalibrate only pieces whose key starts with this")
    parser.add_argument("--out", default=str(TABLE_PATH), help="where to write the table")
    parser.add_argument("--check", action="store_true",
                        help="recalibrate and compare with the checked-in table instead of writing (exit 1 if stale)")
    args = parser.parse_args(argv)
    try:
        table = build_table(args.only)
    except CalibrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.check:
        current = json.loads(TABLE_PATH.read_text())
        stale = sorted(k for k, v in table["pieces"].items() if current["pieces"].get(k) != v)
        if table["optimizers"] != current.get("optimizers"):
            stale.append("optimizers")
        for key in stale:
            print(f"stale: {key}")
        print("the table is up to date" if not stale else f"{len(stale)} stale pieces: rerun without --check")
        return 1 if stale else 0
    Path(args.out).write_text(json.dumps(table, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {len(table['pieces'])} pieces to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
