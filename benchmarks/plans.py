"""Step time and peak memory of gnnspec's execution plans against their peers, versus depth.

For each op (gcn, sage, gat) and depth, on a random graph, three stack kinds are built from one
spec line each and run one training step at a time (SPEC.md section 5: forward, cross-entropy on
every node, backward, Adam step)::

    plain(op=OP, depth=D, norm=layer, dropout=P)          -> gnnspec store / checkpoint
    res+(op=OP, depth=D, norm=layer, dropout=P)           -> gnnspec store / checkpoint
    rev(op=OP, depth=D, groups=G, norm=layer, dropout=P)  -> gnnspec store / checkpoint / reversible

(``in -> hidden`` and ``hidden -> out`` linear projections are inserted by width resolution.)
Each kind is compared, in the same process, with peers made of the same torch-geometric layers:

* ``plain``: ``torch.nn.Sequential`` of the same layers, run plainly and under
  ``torch.utils.checkpoint.checkpoint_sequential`` (same number of segments as gnnspec);
* ``res+``: a stack of ``torch_geometric.nn.DeepGCNLayer(block="res+")``, with
  ``ckpt_grad=False`` and ``ckpt_grad=True``;
* ``rev``: a stack of ``torch_geometric.nn.GroupAddRev`` over the group function
  ``norm -> relu -> shared dropout mask -> conv`` at width ``hidden/groups`` (PyG's
  ``examples/rev_gnn.py``), with ``disable=True`` (plain autograd) and as shipped (reversible).

Every peer receives the gnnspec model's weights (module by module) and the graph prepared once
the way gnnspec prepares it (GCN normalisation / self-loops computed once and cached on the model,
so it counts as input data for every method alike); before timing, each peer's eval-mode output
is compared with gnnspec's (column ``|dout|``), so all methods of a row group compute one function.

Timing: ``torch.set_num_threads(1)``, on one CPU (``--cpu``: every method's thread pinned to the same
one, see :func:`pin_to_cpus`); denormal floats flushed to zero
(``torch.set_flush_denormal(True)``: every round takes an Adam step, and after a few of them a deep
``plain`` stack's gradients include denormals, on which x86 arithmetic is up to ~100x slower: a
``plain`` sage step at depth 64 went from 0.45 s to 2.9 s over 8 steps without it, and stayed at
0.45 s with it, for every method of the cell alike, so the ratios measured the denormals' count,
not the plans); glibc keeps freed memory mapped (``mallopt``, see
``_keep_freed_memory_mapped``: otherwise whichever method runs after a smaller one pays page
faults a single-model training loop does not; the faults of each timed step are recorded); each
method steps in a thread of its own (``MethodThread``), so each allocates from its own malloc
arena as a process training one plan does (sharing one heap slowed the methods that ran after
a deep ``store`` step by up to 40%); one warm-up step, then ``--repeats`` rounds in which every
method of an (op, depth) cell runs one step, in an order rotated every round. A method's time
ratio is the median over rounds of its step time divided by the same round's step time of
gnnspec ``store`` of the same stack kind (paired, so machine load drifts cancel). ``floor`` is
``1 + forward / step`` of the store model, the forward timed under ``no_grad`` in train mode in the
same rounds (for a ``rev`` stack the forward ``reversible`` runs: groups passed on as a list): the
ratio ``reversible`` (one no-grad forward, then one recompute fused with the backward) cannot beat.
``checkpoint``'s first forward runs with autograd on (torch's non-reentrant checkpoint records the
graph and drops the saved tensors), so where an op's no-grad kernels are faster than its autograd
ones (``gat``) checkpoint's own floor lies above this column. ``fastest`` is a method's fastest
step over store's fastest step (less affected by other load on a shared machine; the target checks
use the paired median, and from 6 rounds on give a distribution-free 95% confidence interval of it:
binomial order statistics of the rounds' ratios, :func:`median_interval`). Peak memory is
``gnnspec.memory.measure.measure_step_peak`` (live tensor storage bytes, including parameters,
optimizer state and graph data; ``resize_`` of a storage, as ``GroupAddRev`` does, is tracked).

Cells run depth by depth across ops, one stack kind at a time: depth 256 with every peer needs
6-17 GB of resident memory per stack kind (the peers' ``edge_index`` layers keep ``E x hidden``
messages per layer), so only one kind's models are alive and freed memory is handed back to the
system between kinds. A cell whose projected cost would take the run past ``--budget-s`` is
skipped and listed (run it on its own with ``--depths``/``--ops``).

    python benchmarks/plans.py                      # depths 4,16,64,256; gcn,sage,gat
    python benchmarks/plans.py --depths 4,16,64 --ops gcn
    python benchmarks/plans.py --quick              # a tiny smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import queue
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    import resource
except ImportError:  # not on POSIX
    resource = None  # type: ignore[assignment]

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint_sequential
from torch_geometric.nn import DeepGCNLayer, GATConv, GCNConv, GroupAddRev, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import add_self_loops, remove_self_loops

import gnnspec
from gnnspec.memory.measure import measure_step_peak, training_step

OUT_DIR = Path(__file__).resolve().parent / "out"
KINDS = ("plain", "res+", "rev")
HEADS = 4  # gat's default
MiB = 2**20

# Targets checked in the summary.
REV_TIME_TARGET = 1.4  # gnnspec reversible / gnnspec rev store
CKPT_TIME_TARGET = 1.35  # gnnspec checkpoint / gnnspec store, for the stacks in CKPT_TARGET_KINDS
# The stacks whose peers checkpoint (checkpoint_sequential, DeepGCNLayer(ckpt_grad)). A rev stack's
# plan is `reversible` (the planner never prefers checkpoint for it: same modelled time, higher
# peak); its checkpoint ratio is printed for information.
CKPT_TARGET_KINDS = ("plain", "res+")


# ------------------------------------------------------------------------------------ the graph


def random_graph(nodes: int, edges: int, features: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nodes, features, generator=g)
    edge_index = torch.randint(0, nodes, (2, edges), generator=g)
    y = torch.randint(0, classes, (nodes,), generator=g)
    return x, edge_index, y


class PreparedEdges:
    """The graph in the form each op's layer takes, prepared once per ``edge_index`` and kept
    (as gnnspec's ``GraphCache`` does): ``gcn`` -> ``(edge_index', edge_weight)`` of
    ``gcn_norm`` with self-loops; ``gat`` -> self-loops removed then one added per node, sorted by
    target;
    ``sage`` -> the raw ``edge_index``."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.key: tuple | None = None
        self.tensors: tuple[Tensor, ...] = ()

    def __call__(self, edge_index: Tensor, num_nodes: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
        key = (edge_index.data_ptr(), edge_index._version, tuple(edge_index.shape), num_nodes, dtype)
        if key != self.key:
            with torch.no_grad():
                if self.op == "gcn":
                    ei, w = gcn_norm(edge_index, None, num_nodes, add_self_loops=True, dtype=dtype)
                    self.tensors = (ei, w)
                elif self.op == "gat":
                    ei, _ = remove_self_loops(edge_index)
                    ei, _ = add_self_loops(ei, num_nodes=num_nodes)
                    self.tensors = (ei[:, torch.argsort(ei[1], stable=True)],)
                else:
                    self.tensors = (edge_index,)
            self.key = key
        return self.tensors


def make_conv(op: str, channels: int) -> nn.Module:
    """The torch-geometric layer gnnspec builds for ``op`` (gnnspec/ops.py), width ``channels``."""
    if op == "gcn":
        return GCNConv(channels, channels, normalize=False, cached=False)
    if op == "sage":
        return SAGEConv(channels, channels, aggr="mean")
    if op == "gat":
        return GATConv(channels, channels // HEADS, heads=HEADS, concat=True, add_self_loops=False)
    raise ValueError(f"op {op!r} has no peer in this benchmark (gcn, sage, gat)")


# ------------------------------------------------------------------------------------ the peers


class PeerModel(nn.Module):
    """``lin_in -> body -> lin_out``, the body called as ``body(h, graph_tensors)``."""

    def __init__(self, op: str, lin_in: nn.Linear, body: nn.Module, lin_out: nn.Linear) -> None:
        super().__init__()
        self.lin_in, self.body, self.lin_out = lin_in, body, lin_out
        self.prepare = PreparedEdges(op)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        graph = self.prepare(edge_index, x.size(0), x.dtype)
        return self.lin_out(self.body(self.lin_in(x), graph))


class PlainLayer(nn.Module):
    """``drop(relu(norm(conv(x))))``; one input, so ``checkpoint_sequential`` can run it."""

    def __init__(self, conv: nn.Module, norm: nn.Module, dropout: float) -> None:
        super().__init__()
        self.conv, self.norm, self.dropout = conv, norm, dropout
        self.graph: tuple[Tensor, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.norm(self.conv(x, *self.graph)).relu(), self.dropout, self.training)


class PlainBody(nn.Module):
    def __init__(self, layers: list[PlainLayer], segments: int | None) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.segments = segments

    def forward(self, h: Tensor, graph: tuple[Tensor, ...]) -> Tensor:
        for layer in self.layers:
            layer.graph = graph
        if self.segments is None or not (self.training and torch.is_grad_enabled()):
            return self.layers(h)
        return checkpoint_sequential(self.layers, self.segments, h, use_reentrant=False)


class ResPlusBody(nn.Module):
    def __init__(self, layers: list[DeepGCNLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: Tensor, graph: tuple[Tensor, ...]) -> Tensor:
        for layer in self.layers:
            h = layer(h, *graph)
        return h


class RevBlock(nn.Module):
    """RevGNN's group function (PyG examples/rev_gnn.py ``GNNBlock``):
    ``conv(mask * relu(norm(x)))``, called by ``GroupAddRev`` as ``f(x, edge_index, *rest)``
    with ``rest = (*other graph tensors, mask)``."""

    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.conv = norm, conv

    def forward(self, x: Tensor, edge_index: Tensor, *rest: Any) -> Tensor:
        *graph, mask = rest
        h = self.norm(x).relu()
        if self.training and mask is not None:
            h = h * mask
        return self.conv(h, edge_index, *graph)


class RevBody(nn.Module):
    """A stack of ``GroupAddRev``; one dropout mask ``[N, hidden/groups]`` per forward, shared by
    every group of every layer (as gnnspec's ``rev`` and RevGNN draw it)."""

    def __init__(self, layers: list[GroupAddRev], groups: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.groups, self.dropout = groups, dropout

    def forward(self, h: Tensor, graph: tuple[Tensor, ...]) -> Tensor:
        mask = None
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            width = h.size(-1) // self.groups
            mask = torch.empty_like(h[:, :width]).bernoulli_(keep).div_(keep)
        for layer in self.layers:
            h = layer(h, *graph, mask)
        return h


def _copy(dst: nn.Module, src: nn.Module) -> nn.Module:
    dst.load_state_dict(src.state_dict())
    return dst


def _ends(model: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    stages = model.stages
    if len(stages) != 3 or stages[0].kind != "linear" or stages[2].kind != "linear":
        raise RuntimeError(f"expected linear >> stack >> linear, got {[s.kind for s in stages]}")
    lin_in = _copy(nn.Linear(stages[0].module.in_features, stages[0].module.out_features), stages[0].module)
    lin_out = _copy(nn.Linear(stages[2].module.in_features, stages[2].module.out_features), stages[2].module)
    return lin_in, stages[1], lin_out


def _layer_copy(op: str, layer: nn.Module, width: int) -> tuple[nn.Module, nn.Module]:
    """Fresh conv and LayerNorm with the weights of gnnspec ``ConvLayer`` ``layer``."""
    return _copy(make_conv(op, width), layer.conv), _copy(nn.LayerNorm(width), layer.norm.norm)


def peer_plain(op: str, ref: nn.Module, hidden: int, dropout: float, segments: int | None) -> PeerModel:
    lin_in, stack, lin_out = _ends(ref)
    layers = []
    for i in stack.table:
        conv, norm = _layer_copy(op, stack.layers[i], hidden)
        layers.append(PlainLayer(conv, norm, dropout))
    return PeerModel(op, lin_in, PlainBody(layers, segments), lin_out)


def peer_resplus(op: str, ref: nn.Module, hidden: int, dropout: float, ckpt: bool) -> PeerModel:
    lin_in, stack, lin_out = _ends(ref)
    layers = []
    for i in stack.table:
        conv, norm = _layer_copy(op, stack.layers[i], hidden)
        layers.append(DeepGCNLayer(conv, norm, nn.ReLU(), block="res+", dropout=dropout, ckpt_grad=ckpt))
    return PeerModel(op, lin_in, ResPlusBody(layers), lin_out)


def peer_rev(op: str, ref: nn.Module, hidden: int, groups: int, dropout: float, disable: bool) -> PeerModel:
    lin_in, stage, lin_out = _ends(ref)
    stack = stage.stack
    width = hidden // groups
    layers = []
    for layer in stack.table:
        blocks = [RevBlock(*_layer_copy(op, stack.functions[i], width)) for i in layer]
        layers.append(GroupAddRev(nn.ModuleList(blocks), disable=disable))
    return PeerModel(op, lin_in, RevBody(layers, groups, dropout), lin_out)


# ------------------------------------------------------------------------------------ methods


@dataclass
class Method:
    kind: str  # stack kind: plain, res+, rev
    name: str  # shown in the table
    model: nn.Module
    is_base: bool = False  # gnnspec store of its kind: the reference of the ratios
    recompute: bool = False  # pays one extra forward (floor applies)
    optimizer: torch.optim.Optimizer | None = None


def spec_of(kind: str, op: str, depth: int, hidden: int, groups: int, dropout: float) -> str:
    extra = f", groups={groups}" if kind == "rev" else ""
    return f"{kind}(op={op}, depth={depth}{extra}, hidden={hidden}, norm=layer, dropout={dropout})"


def build_methods(op: str, depth: int, args: argparse.Namespace, in_ch: int) -> list[Method]:
    segments = gnnspec.ir.default_segments(depth)
    methods: list[Method] = []
    for kind in args.kinds:
        spec = spec_of(kind, op, depth, args.hidden, args.groups, args.dropout)
        plans = ["store", "checkpoint"] + (["reversible"] if kind == "rev" else [])
        built = {}
        for plan in plans:
            torch.manual_seed(args.seed)  # same parameters under every plan (SPEC section 4)
            built[plan] = gnnspec.build(spec, in_channels=in_ch, out_channels=args.classes, plan=plan)
        ref = built["store"]
        methods.append(Method(kind, "gnnspec store", ref, is_base=True))
        methods.append(Method(kind, f"gnnspec checkpoint({segments})", built["checkpoint"], recompute=True))
        if kind == "rev":
            methods.append(Method(kind, "gnnspec reversible", built["reversible"], recompute=True))
        if not args.no_peers:
            if kind == "plain":
                methods.append(Method(kind, "torch Sequential", peer_plain(op, ref, args.hidden, args.dropout, None)))
                methods.append(Method(kind, f"torch checkpoint_sequential({segments})",
                                      peer_plain(op, ref, args.hidden, args.dropout, segments), recompute=True))
            elif kind == "res+":
                methods.append(Method(kind, "pyg DeepGCNLayer", peer_resplus(op, ref, args.hidden, args.dropout, False)))
                methods.append(Method(kind, "pyg DeepGCNLayer(ckpt_grad)",
                                      peer_resplus(op, ref, args.hidden, args.dropout, True), recompute=True))
            else:
                methods.append(Method(kind, "pyg GroupAddRev(disable)",
                                      peer_rev(op, ref, args.hidden, args.groups, args.dropout, True)))
                methods.append(Method(kind, "pyg GroupAddRev",
                                      peer_rev(op, ref, args.hidden, args.groups, args.dropout, False),
                                      recompute=True))
    for m in methods:
        m.optimizer = torch.optim.Adam(m.model.parameters(), lr=0.01)
    return methods


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, ei: Tensor, y: Tensor) -> None:
    """The step of SPEC.md section 5."""
    training_step(model, opt, x, ei, y)


def timed(fn: Callable[[], None]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this thread, minor page faults) of ``fn()``, with the cyclic
    collector off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        f0, t0, c0 = _minor_faults(), time.perf_counter(), time.thread_time()
        fn()
        return time.perf_counter() - t0, time.thread_time() - c0, _minor_faults() - f0
    finally:
        if enabled:
            gc.enable()


class MethodThread:
    """A thread of its own for one method's steps, so that each method allocates from its own
    glibc malloc arena, as a training process running one plan does.

    Sharing one heap penalised whichever method ran after a large one: after a ``store`` step of
    a 256-layer GAT stack (2 GB of activations freed into the heap), ``reversible`` of the same
    stack ran at 35.8 ms a layer against 25.8 ms in a process of its own, and 26.1 ms with each
    method in its own thread (the paired ratio to ``store`` 1.44x vs 1.19x).
    ``run(fn)`` calls ``fn`` in the thread and returns its result (or raises its exception);
    ``time.thread_time`` inside ``fn`` is that thread's CPU time. The thread runs single-threaded
    kernels with denormals flushed, as the main thread does (both settings are per thread).
    """

    def __init__(self) -> None:
        self._jobs: "queue.Queue[Callable[[], Any] | None]" = queue.Queue()
        self._results: "queue.Queue[tuple[bool, Any]]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        while (job := self._jobs.get()) is not None:
            try:
                self._results.put((True, job()))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                self._results.put((False, err))

    def run(self, fn: Callable[[], Any]) -> Any:
        self._jobs.put(fn)
        ok, value = self._results.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def _minor_faults() -> int:
    if resource is None:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ------------------------------------------------------------------------------------ one cell


@dataclass
class Row:
    op: str
    depth: int
    kind: str
    method: str
    time_ratio: float  # wall
    ratio_lo: float
    ratio_hi: float
    cpu_ratio: float
    cpu_lo: float
    cpu_hi: float
    cpu_min_ratio: float  # fastest step / store's fastest step, CPU time
    floor: float | None  # CPU time
    peak_bytes: int
    peak_ratio: float
    out_diff: float
    is_base: bool
    times: list[float] = field(default_factory=list)  # wall seconds per round
    cpu_times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults per timed step


def run_cell(op: str, depth: int, args: argparse.Namespace, data) -> list[Row]:
    x, ei, y = data
    methods = build_methods(op, depth, args, x.size(1))

    # Same function: eval-mode outputs of every method against gnnspec store of its kind.
    diffs: dict[int, float] = {}
    with torch.no_grad():
        base_out: dict[str, Tensor] = {}
        for m in methods:
            m.model.eval()
            out = m.model(x, ei)
            if m.is_base:
                base_out[m.kind] = out
            diffs[id(m)] = float((out - base_out[m.kind]).abs().max())
        del base_out

    # Peak memory (measure_step_peak runs its own warm-up step first).
    peaks = {id(m): measure_step_peak(m.model, x, ei, y, m.optimizer) for m in methods}

    # Interleaved timing rounds, order rotated each round; plus the store models' no_grad forward.
    times: dict[int, list[tuple[float, float, int]]] = {id(m): [] for m in methods}
    fwd: dict[str, list[tuple[float, float, int]]] = {k: [] for k in args.kinds}
    bases = {m.kind: m for m in methods if m.is_base}

    def forward_only(model: nn.Module) -> None:
        model.train()
        with torch.no_grad():
            model(x, ei)

    threads = {id(m): MethodThread() for m in methods}
    try:
        for m in methods:  # the thread's own warm-up step: its arena reaches its steady state
            threads[id(m)].run(lambda m=m: train_step(m.model, m.optimizer, x, ei, y))
        for r in range(args.repeats):
            gc.collect()
            shift = r % len(methods)
            for m in methods[shift:] + methods[:shift]:
                times[id(m)].append(threads[id(m)].run(
                    lambda m=m: timed(lambda: train_step(m.model, m.optimizer, x, ei, y))))
            for kind, base in bases.items():
                fwd[kind].append(threads[id(base)].run(lambda b=base: timed(lambda: forward_only(b.model))))
    finally:
        for thread in threads.values():
            thread.close()

    rows = []
    for m in methods:
        base = bases[m.kind]
        wall = [t[0] / b[0] for t, b in zip(times[id(m)], times[id(base)])]
        cpu = [t[1] / b[1] for t, b in zip(times[id(m)], times[id(base)])]
        floor = None
        if m.recompute:
            floor = statistics.median(1 + f[1] / b[1] for f, b in zip(fwd[m.kind], times[id(base)]))
        rows.append(Row(
            op=op, depth=depth, kind=m.kind, method=m.name,
            time_ratio=statistics.median(wall), ratio_lo=min(wall), ratio_hi=max(wall),
            cpu_ratio=statistics.median(cpu), cpu_lo=min(cpu), cpu_hi=max(cpu),
            cpu_min_ratio=min(t[1] for t in times[id(m)]) / min(b[1] for b in times[id(base)]),
            floor=floor, peak_bytes=peaks[id(m)], peak_ratio=peaks[id(m)] / peaks[id(base)],
            out_diff=diffs[id(m)], is_base=m.is_base,
            times=[t[0] for t in times[id(m)]], cpu_times=[t[1] for t in times[id(m)]],
            faults=[t[2] for t in times[id(m)]],
        ))
    return rows


# ------------------------------------------------------------------------------------ output


def print_table(rows: list[Row], console) -> None:
    from rich.table import Table

    table = Table(title="Step time and peak memory per plan (ratios vs gnnspec store of the same stack; "
                        "median of paired rounds)")
    for col, just in [("op", "left"), ("depth", "right"), ("stack", "left"), ("method", "left"),
                      ("cpu ×store", "right"), ("[min–max]", "right"), ("fastest", "right"),
                      ("floor", "right"),
                      ("wall ×store", "right"), ("[min–max]", "right"),
                      ("peak MiB", "right"), ("peak ×store", "right"), ("|dout|", "right")]:
        table.add_column(col, justify=just)
    last = None
    for r in rows:
        group = (r.op, r.depth, r.kind)
        if last is not None and group != last:
            table.add_section()
        last = group
        style = "bold" if r.method.startswith("gnnspec") else None
        table.add_row(
            r.op, str(r.depth), r.kind, r.method,
            f"{r.cpu_ratio:.2f}", f"[{r.cpu_lo:.2f}–{r.cpu_hi:.2f}]", f"{r.cpu_min_ratio:.2f}",
            f"{r.floor:.2f}" if r.floor is not None else "",
            f"{r.time_ratio:.2f}", f"[{r.ratio_lo:.2f}–{r.ratio_hi:.2f}]",
            f"{r.peak_bytes / MiB:.1f}", f"{r.peak_ratio:.2f}", f"{r.out_diff:.1e}",
            style=style,
        )
    console.print(table)
    console.print(
        "cpu: thread CPU time of the step (the run is single-threaded; unlike wall time it does not "
        "count time the process waits for a core on a shared machine); the target checks use its "
        "median over paired rounds. fastest: the method's fastest step over store's fastest step "
        "(CPU time), less affected by other load on a shared machine. floor: 1 + (no_grad forward "
        "of the store model) / (store step), CPU time: the least reversible can cost (checkpoint's "
        "first forward runs with autograd on; for gat, whose no-grad kernels are faster, its floor is higher). |dout|: eval-mode output difference to gnnspec store."
    )


def _find(rows: list[Row], op: str, depth: int, kind: str, method: str) -> Row | None:
    return next((r for r in rows if (r.op, r.depth, r.kind) == (op, depth, kind) and r.method == method), None)


def _per_round(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(_per_round(a, b))


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of ``values`` (independent rounds):
    the order statistics ``[x_(k), x_(n+1-k)]`` with the largest ``k`` such that
    ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``, which cover the median with probability at
    least ``level``. None when ``n`` is too small for that level (n < 6 at 95%)."""
    xs, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while True:
        tail += math.comb(n, k) / 2 ** n  # P(Binomial(n, 1/2) <= k)
        if tail > (1 - level) / 2:
            break
        k += 1
    return None if k == 0 else (xs[k - 1], xs[n - k])


def _interval_text(ratios: list[float]) -> str:
    ci = median_interval(ratios)
    return "" if ci is None else f", 95% CI of the median {ci[0]:.2f}-{ci[1]:.2f}"


def _ratios(row: Row, rows: list[Row]) -> list[float]:
    """``row``'s per-round CPU time ratios to gnnspec store of its stack kind."""
    return _per_round(row.cpu_times, _find(rows, row.op, row.depth, row.kind, "gnnspec store").cpu_times)


def _overall(results: list[bool]) -> str:
    """A target's verdict over its cells: "not run" when the run had none."""
    return "not run" if not results else ("PASS" if all(results) else "MISS")


def summary(rows: list[Row], console) -> dict[str, Any]:
    """The two target checks, per (op, depth), and whether all pass (CPU time; wall shown too)."""
    cells = sorted({(r.op, r.depth) for r in rows})
    checks: list[dict[str, Any]] = []
    console.print("\n[bold]Target checks[/bold] (time ratios: CPU time, wall in parentheses)")
    console.print(f"(1) gnnspec reversible <= {REV_TIME_TARGET}x gnnspec rev store, and its peak <= pyg GroupAddRev's")
    console.print(f"(2) gnnspec checkpoint <= {CKPT_TIME_TARGET}x gnnspec store ({', '.join(CKPT_TARGET_KINDS)} "
                  f"stacks; other stacks shown as info)")
    for op, depth in cells:
        rev = _find(rows, op, depth, "rev", "gnnspec reversible")
        gar = _find(rows, op, depth, "rev", "pyg GroupAddRev")
        if rev is not None:
            ok_t = rev.cpu_ratio <= REV_TIME_TARGET
            ok_m = gar is None or rev.peak_bytes <= gar.peak_bytes
            # the floor (one extra no-grad forward) above the target: no plan that recomputes the
            # forward once can meet it in this cell
            below_floor = rev.floor is not None and rev.floor > REV_TIME_TARGET
            line = (f"  {op:5s} depth {depth:4d}  (1) reversible {rev.cpu_ratio:.3f}x ({rev.time_ratio:.2f}x) "
                    f"store{_interval_text(_ratios(rev, rows))}, fastest {rev.cpu_min_ratio:.2f}x, "
                    f"floor {rev.floor:.2f}{' (above the target)' if below_floor else ''}: "
                    f"time {'PASS' if ok_t else 'MISS'}")
            entry = {"check": "reversible", "op": op, "depth": depth, "cpu_ratio": rev.cpu_ratio,
                     "cpu_min_ratio": rev.cpu_min_ratio,
                     "wall_ratio": rev.time_ratio, "floor": rev.floor, "time_ok": ok_t,
                     "target_below_floor": below_floor, "peak_bytes": rev.peak_bytes, "peak_ok": ok_m}
            if gar is not None:
                vs_cpu, vs_wall = _paired(rev.cpu_times, gar.cpu_times), _paired(rev.times, gar.times)
                line += (f" | GroupAddRev {gar.cpu_ratio:.2f}x ({gar.time_ratio:.2f}x) store, "
                         f"reversible/GroupAddRev {vs_cpu:.2f} ({vs_wall:.2f}) | peak {rev.peak_bytes / MiB:.1f} "
                         f"vs GroupAddRev {gar.peak_bytes / MiB:.1f} MiB: {'PASS' if ok_m else 'MISS'}")
                entry.update(groupaddrev_peak_bytes=gar.peak_bytes, groupaddrev_cpu_ratio=gar.cpu_ratio,
                             groupaddrev_wall_ratio=gar.time_ratio, reversible_over_groupaddrev_cpu=vs_cpu,
                             reversible_over_groupaddrev_wall=vs_wall)
            console.print(line)
            checks.append(entry)
        for kind in KINDS:
            ck = next((r for r in rows if (r.op, r.depth, r.kind) == (op, depth, kind)
                       and r.method.startswith("gnnspec checkpoint")), None)
            if ck is None:
                continue
            ok = ck.cpu_ratio <= CKPT_TIME_TARGET
            targeted = kind in CKPT_TARGET_KINDS
            verdict = ("PASS" if ok else "MISS") if targeted else "info"
            console.print(f"  {op:5s} depth {depth:4d}  (2) {kind:5s} checkpoint {ck.cpu_ratio:.3f}x "
                          f"({ck.time_ratio:.2f}x) store{_interval_text(_ratios(ck, rows))}, fastest {ck.cpu_min_ratio:.2f}x, floor {ck.floor:.2f}, peak {ck.peak_ratio:.2f}x: "
                          f"{verdict}")
            checks.append({"check": "checkpoint" if targeted else "checkpoint (info)", "op": op,
                           "depth": depth, "kind": kind,
                           "cpu_ratio": ck.cpu_ratio, "cpu_min_ratio": ck.cpu_min_ratio, "wall_ratio": ck.time_ratio, "floor": ck.floor,
                           "time_ok": ok})
    rev_results = [c["time_ok"] and c["peak_ok"] for c in checks if c["check"] == "reversible"]
    ck_results = [c["time_ok"] for c in checks if c["check"] == "checkpoint"]
    rev_ok, ck_ok = all(rev_results), all(ck_results)
    console.print(f"\n  target (1) reversible: {_overall(rev_results)}    "
                  f"target (2) checkpoint: {_overall(ck_results)}")
    return {"reversible_ok": rev_ok, "checkpoint_ok": ck_ok, "checks": checks}


def plot(rows: list[Row], ops: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib, or the `bench` extra): no plot")
        return False
    ops = [op for op in ops if any(r.op == op for r in rows)]
    fig, axes = plt.subplots(2, len(ops), figsize=(6 * len(ops), 10), squeeze=False)
    styles = {"plain": ":", "res+": "--", "rev": "-"}
    # One line per method across depths: the segment count in "checkpoint(k)" changes with depth.
    series = lambda r: (r.kind, re.sub(r"\(\d+\)$", "", r.method))  # noqa: E731
    methods = sorted({series(r) for r in rows}, key=lambda km: (KINDS.index(km[0]), km[1]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["black", "gold", "teal"]
    for col, op in enumerate(ops):
        for k, (kind, method) in enumerate(methods):
            pts = sorted((r.depth, r.cpu_ratio, r.peak_bytes / MiB) for r in rows
                         if r.op == op and series(r) == (kind, method))
            if not pts:
                continue
            d, t, p = zip(*pts)
            style = dict(ls=styles[kind], marker="o", ms=3, color=colors[k % len(colors)],
                         lw=2.2 if method.startswith("gnnspec") else 1.2,
                         label=f"{kind}: {method}" + (" (√depth segments)" if "checkpoint" in method and "(" not in method else ""))
            axes[0][col].plot(d, t, **style)
            axes[1][col].plot(d, p, **style)
        axes[0][col].set_title(f"{op}: step CPU time / gnnspec store (same stack)")
        axes[1][col].set_title(f"{op}: peak live tensor memory")
        axes[1][col].set_ylabel("MiB")
        axes[0][col].axhline(REV_TIME_TARGET, color="grey", lw=0.8)
        axes[0][col].axhline(CKPT_TIME_TARGET, color="grey", lw=0.8, ls="--")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel("depth")
            axes[row][col].grid(alpha=0.3)
        axes[1][col].set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    strs = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    p.add_argument("--depths", type=ints, default=[4, 16, 64, 256])
    p.add_argument("--ops", type=strs, default=["gcn", "sage", "gat"])
    p.add_argument("--kinds", type=strs, default=list(KINDS), help="stack kinds: plain,res+,rev")
    p.add_argument("--nodes", type=int, default=5000)
    p.add_argument("--edges", type=int, default=50000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--features", type=int, default=32, help="input feature width")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5, help="timing rounds per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu", type=int, default=None,
                   help="pin the run to this CPU and the next --threads - 1 the process may use "
                        "(default: the first it may use; -1: not pinned)")
    p.add_argument("--budget-s", type=float, default=570.0,
                   help="skip cells projected to end the run past this many seconds (0: no limit)")
    p.add_argument("--no-peers", action="store_true", help="gnnspec plans only")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.depths = [2, 4]
        args.nodes, args.edges, args.repeats = 400, 2000, 3
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(f"unknown stack kind {bad[0]!r}; known: {', '.join(KINDS)}")
    return args


def pin_to_cpus(first: int | None, count: int) -> list[int]:
    """Restrict the calling thread, and so the threads it starts afterwards (the methods'
    :class:`MethodThread`), to ``count`` of the CPUs the process may use, from ``first`` on
    (``None``: from the first), and return them; ``first == -1``, or no affinity call on this OS:
    not pinned, ``[]``. Each round wakes the methods' threads in turn: unpinned, a method's step
    could run on either vCPU of a 2-vCPU machine, with the other's cold cache and its own share of
    the host's load, which ``store`` and the method compared with it need not share."""
    if first == -1 or not hasattr(os, "sched_setaffinity"):
        return []
    allowed = sorted(os.sched_getaffinity(0))
    if first is not None and first not in allowed:
        raise SystemExit(f"--cpu {first}: this process may use CPUs {allowed}")
    start = 0 if first is None else allowed.index(first)
    cpus = allowed[start:start + max(count, 1)]
    os.sched_setaffinity(0, cpus)
    return cpus


def _glibc_malloc():
    """glibc's ``mallopt`` and ``malloc_trim`` as ``(mallopt, malloc_trim)``, or None where the C
    library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _keep_freed_memory_mapped() -> bool:
    """Make glibc keep freed heap memory mapped for reuse (no-op elsewhere); True if set.

    By default glibc serves every allocation above 128 KiB (an ``[N, hidden]`` activation) with
    its own ``mmap`` and unmaps it on free, or trims freed memory off the top of the heap, so
    the next step touches fresh pages: a minor page fault per 4 KiB, measured at 3-8 us each on
    this VM. A training loop that runs one model settles into a fault-free steady state within a
    few steps; rounds that alternate methods of different footprints do not, and the larger
    method (``store``, the peers) kept paying up to 13,000 faults a step after a smaller one ran
    (gat ``res+`` depth 64). Serving allocations below 32 MiB from the heap and never trimming it
    automatically gives every method its steady-state speed; ``_return_freed_memory`` still trims
    between cells.
    """
    glibc = _glibc_malloc()
    if glibc is None:
        return False
    mallopt, _ = glibc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 * MiB) and mallopt(m_trim_threshold, 2**31 - 1)
                and mallopt(m_top_pad, 64 * MiB))


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages for reuse; hand them back so the next cell starts from the
    memory it needs (no-op elsewhere)."""
    glibc = _glibc_malloc()
    if glibc is not None:
        _, malloc_trim = glibc
        malloc_trim(0)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(width=200)
    pinned = pin_to_cpus(args.cpu, args.threads)
    torch.set_num_threads(args.threads)
    denormals = "denormals flushed" if torch.set_flush_denormal(True) else "denormals kept (no flush on this CPU)"
    allocator = "glibc: freed memory kept mapped" if _keep_freed_memory_mapped() else "default allocator"
    # Everything imported so far is permanent: keeps gc.collect() (here and in measure_step_peak)
    # from walking torch's module graph, which takes ~0.25 s a call.
    gc.collect()
    gc.freeze()
    data = random_graph(args.nodes, args.edges, args.features, args.classes, args.seed)
    console.print(
        f"graph: {args.nodes} nodes, {args.edges} edges, {args.features} features, {args.classes} classes; "
        f"hidden {args.hidden}, groups {args.groups}, norm layer, dropout {args.dropout}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{'pinned to CPU ' + ','.join(map(str, pinned)) if pinned else 'not pinned'}, {allocator}, {denormals}; "
        f"{args.repeats} rounds per cell"
    )
    start = time.perf_counter()
    rows: list[Row] = []
    skipped: list[tuple[str, int, float]] = []
    cost: dict[tuple[str, str], tuple[int, float]] = {}  # (op, kind) -> (depth, seconds) of its last cell
    for depth in sorted(args.depths):
        for op in args.ops:
            # One stack kind at a time: only its models are alive, and the memory the previous
            # kind's peers freed goes back to the system first (at depth 256 a kind needs up to
            # ~17 GB of RSS; all three in one cell did not fit in 24 GB).
            for kind in args.kinds:
                elapsed = time.perf_counter() - start
                if (op, kind) in cost and args.budget_s > 0:
                    last_depth, last_s = cost[(op, kind)]
                    projected = last_s * depth / last_depth
                    if elapsed + projected > args.budget_s:
                        skipped.append((f"{op} {kind}", depth, projected))
                        continue
                t0 = time.perf_counter()
                cell = run_cell(op, depth, argparse.Namespace(**{**vars(args), "kinds": [kind]}), data)
                cost[(op, kind)] = (depth, time.perf_counter() - t0)
                rows.extend(cell)
                console.print(f"  {op} depth {depth} {kind}: {len(cell)} methods, {cost[(op, kind)][1]:.0f}s")
                del cell
                gc.collect()
                _return_freed_memory()
    console.print()
    print_table(rows, console)
    faults = [f for r in rows for f in r.faults]
    if faults:
        worst = max(rows, key=lambda r: max(r.faults, default=0))
        console.print(f"minor page faults per timed step: median {statistics.median(faults):.0f}, largest "
                      f"{max(faults)} ({worst.op} depth {worst.depth} {worst.kind}, {worst.method})")
    result = summary(rows, console)
    if skipped:
        console.print("\nskipped (budget --budget-s {:.0f}s): ".format(args.budget_s)
                      + ", ".join(f"{op} depth {d} (~{s:.0f}s)" for op, d, s in skipped))
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "plans.png"
    if plot(rows, args.ops, png):
        console.print(f"plot: {png}")
    record = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "torch": torch.__version__, "rows": [asdict(r) for r in rows], "skipped": skipped, **result}
    (args.out / "plans.json").write_text(json.dumps(record, indent=1))
    console.print(f"data: {args.out / 'plans.json'}; total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
