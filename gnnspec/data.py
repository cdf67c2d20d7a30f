"""Datasets for training: Planetoid files, synthetic SBM / R-MAT graphs, saved torch-geometric `Data`.

``load_data(source)`` reads the ``DATA`` argument of SPEC.md section 6:

- ``cora``, ``citeseer``, ``pubmed`` (any case): the Planetoid files under the data root
  (``data_root``, default ``$GNNSPEC_DATA``), laid out as ``DIR/Cora/raw/ind.cora.x`` ... as
  torch-geometric's ``Planetoid`` reads them, with Planetoid's public split (20 labelled nodes per
  class for training, 500 for validation, 1000 for testing). The data root is only read, never
  written: Planetoid reads the raw files where they are and writes its processed file to the cache
  (``cache_dir``, default ``$GNNSPEC_CACHE``, else ``~/.cache/gnnspec``), under
  ``planetoid/<Name>-<key>/processed``, where the key hashes the raw files' path, sizes and
  modification times, so a changed data root is never served stale. Nothing is downloaded unless
  ``download=True``; then the files go to ``<cache>/planetoid/<Name>/raw`` (looked in, after
  ``DIR/<Name>/raw`` and ``DIR/<name>/raw``, on later loads too).
- ``sbm(nodes=N, edges=E, classes=C, features=F, homophily=H)``: a stochastic block model.
- ``rmat(nodes=N, edges=E, features=F, classes=C, a=, b=, c=, d=)``: an R-MAT (Kronecker) graph.
  Omitted arguments: sbm ``nodes=1000, edges=10*nodes, classes=4, features=32, homophily=0.8``;
  rmat ``nodes=1024, edges=16*nodes, features=32, classes=4``, ``(a, b, c, d) = (0.57, 0.19,
  0.19, 0.05)``. Both are seeded (``seed``) and vectorised (a million edges in about a second).
- a path to a saved graph (``.pt``/``.pth``, or any existing file): a torch-geometric ``Data`` or a
  dict of tensors, loaded with ``torch.load(weights_only=True)``; it must hold ``x``,
  ``edge_index`` and ``y``; ``train_mask``/``val_mask``/``test_mask`` are optional (all or none).

Synthetic graphs are undirected: every edge is stored in both directions, without self-loops or
duplicates, so ``edge_index`` has exactly ``E`` columns (``E - 1`` when ``E`` is odd) and ``E``
may be at most ``N * (N - 1)``. Labels are balanced classes; features are
``x = mu[y] + noise`` with class means ``mu[c] ~ N(0, s^2 I)``, ``s = 1 / sqrt(2F)`` (class means
about one noise standard deviation apart), so a linear model on the features alone is only
somewhat better than chance while averaging over same-class neighbours separates the classes.
For SBM a fraction ``H`` (default 0.8) of the edges join nodes of the same class; for R-MAT the
class of a node is its position in the id range before a random relabelling,
``y = (id * C) // N`` (its top id bits when ``N`` and ``C`` are powers of two): an edge keeps each
id bit with probability ``a + d`` (0.62), so edges join same-class nodes more often than chance,
but the low-id classes hold the hubs (a core-periphery graph, not communities), so message passing
helps less than on SBM; R-MAT is for skewed degrees at scale.

Data without masks (synthetic, or a saved graph without them) gets a seeded random split, 60% /
20% / 20% of the labelled nodes for train / validation / test (:func:`random_split`), stratified
by class for single-label ``y`` (each class split in those proportions, up to one node) and plain
for multi-label ``y`` (``[N, C]`` float). Nodes with a negative label are unlabelled and in no
split.

Every bad input raises `gnnspec.SpecError`; errors in the ``sbm(...)``/``rmat(...)`` expression
carry the column of the offending text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from gnnspec.errors import SpecError, did_you_mean
from gnnspec.syntax.cst import Arg, Atom, Call

__all__ = [
    "GraphData",
    "load_data",
    "check_widths",
    "sbm_graph",
    "rmat_graph",
    "random_split",
    "PLANETOID",
    "SPLIT_FRACTIONS",
]

# Planetoid datasets: the name a user writes -> torch-geometric's name (the folder under the root).
PLANETOID: dict[str, str] = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
_PLANETOID_PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
_PLANETOID_URL = "https://github.com/kimiyoung/planetoid/tree/master/data"
SYNTHETIC = ("sbm", "rmat")
DATASETS = (*PLANETOID, *SYNTHETIC)

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
_DATA_FILE = "<data>"
_MAX_NODES = 2**31 - 1  # pair keys u * N + v must fit in int64
_RMAT_DEFAULT = {"a": 0.57, "b": 0.19, "c": 0.19, "d": 0.05}
_MASKS = ("train_mask", "val_mask", "test_mask")


@dataclass(frozen=True, eq=False, repr=False)
class GraphData:
    """One graph and its node-classification task, as training needs it.

    ``x``: ``[N, F]`` float; ``edge_index``: ``[2, E]`` int64; ``y``: ``[N]`` int64 class labels
    (negative: unlabelled) or ``[N, C]`` float multi-label targets; the masks: ``[N]`` bool.
    """

    name: str
    x: Tensor
    edge_index: Tensor
    y: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_features: int
    num_classes: int

    @property
    def num_nodes(self) -> int:
        return int(self.x.size(0))

    @property
    def num_edges(self) -> int:
        """Columns of ``edge_index`` (an undirected edge counts twice)."""
        return int(self.edge_index.size(1))

    @property
    def num_self_loops(self) -> int:
        """Columns of ``edge_index`` from a node to itself."""
        return int((self.edge_index[0] == self.edge_index[1]).sum())

    @property
    def multilabel(self) -> bool:
        return self.y.dim() == 2

    def to(self, device: torch.device | str) -> "GraphData":
        """The same graph with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)

    def to_pyg(self):
        """A torch-geometric ``Data`` holding the same tensors."""
        from torch_geometric.data import Data

        return Data(
            x=self.x,
            edge_index=self.edge_index,
            y=self.y,
            train_mask=self.train_mask,
            val_mask=self.val_mask,
            test_mask=self.test_mask,
        )

    def __repr__(self) -> str:
        split = "/".join(str(int(m.sum())) for m in (self.train_mask, self.val_mask, self.test_mask))
        return (
            f"GraphData({self.name!r}, nodes={self.num_nodes}, edges={self.num_edges}, "
            f"features={self.num_features}, classes={self.num_classes}, split={split})"
        )


# ---------------------------------------------------------------------------- entry point


def load_data(
    source: str,
    *,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    download: bool = False,
) -> GraphData:
    """The graph named by ``source`` (SPEC.md section 6; see the module docstring).

    ``data_root`` defaults to ``$GNNSPEC_DATA``; ``cache_dir`` to ``$GNNSPEC_CACHE``, else
    ``~/.cache/gnnspec``. ``seed`` seeds synthetic graphs and random splits. ``download=True``
    lets torch-geometric's Planetoid download missing Planetoid files into the cache.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise SpecError(f"expected a dataset name or a path, got {type(source).__name__}", filename=_DATA_FILE)
    text = os.fspath(source)
    if not text.strip():
        raise SpecError("empty dataset", hint=_DATASET_HINT, filename=_DATA_FILE)
    if _looks_like_path(text):
        return load_saved_graph(text, seed=seed)

    from gnnspec.syntax.parser import parse_cst

    try:
        node = parse_cst(text, rule="value")
    except SpecError as err:
        if Path(text).is_file():
            return load_saved_graph(text, seed=seed)
        if err.hint is None:
            err.hint = _DATASET_HINT
        raise err.located(_DATA_FILE, text) from None
    try:
        return _load_node(node, text, data_root=data_root, cache_dir=cache_dir, seed=seed, download=download)
    except SpecError as err:
        if err.source is None and err.filename == "<spec>":
            err.located(_DATA_FILE, text)
        raise


_DATASET_HINT = (
    "a dataset is cora, citeseer, pubmed, sbm(nodes=N, edges=E, classes=C, features=F), "
    "rmat(nodes=N, edges=E, features=F, classes=C), or a path to a saved graph (.pt)"
)


def _looks_like_path(text: str) -> bool:
    suffix = Path(text).suffix.lower()
    return suffix in (".pt", ".pth") or "/" in text or os.sep in text or text.startswith(("~", "."))


def _load_node(node, text: str, *, data_root, cache_dir, seed: int, download: bool) -> GraphData:
    if isinstance(node, Atom) and node.type == "string":
        return load_saved_graph(str(node.value), seed=seed)
    if isinstance(node, Atom) and node.type == "name":
        name, args, name_span = str(node.value), (), node.span
    elif isinstance(node, Call):
        name, args, name_span = node.name, node.args, node.name_span
    else:
        span = getattr(node, "span", None)
        raise _error_at(span, text, "expected a dataset name", _DATASET_HINT)

    key = name.lower()
    if key not in DATASETS:
        raise _error_at(name_span, text, f"unknown dataset `{name}`", did_you_mean(name, DATASETS))
    if key in PLANETOID:
        if isinstance(node, Call) and args:
            raise _error_at(args[0].span, text, f"`{key}` takes no arguments", "write just `" + key + "`")
        try:
            return load_planetoid(key, data_root=data_root, cache_dir=cache_dir, download=download)
        except SpecError as err:
            raise _error_at(name_span, text, err.message, err.hint) from None
    values = _synthetic_args(key, args, text)
    generate = sbm_graph if key == "sbm" else rmat_graph
    try:
        return generate(**values, seed=seed)
    except SpecError as err:
        # Errors about the arguments as a whole (too many edges) point at the call.
        span = _arg_span(args, getattr(err, "_argument", None)) or node.span
        raise _error_at(span, text, err.message, err.hint) from None


def _error_at(span, text: str | None, message: str, hint: str | None = None) -> SpecError:
    if span is None:
        return SpecError(message, hint=hint, filename=_DATA_FILE, source=text)
    end = span.end_column if span.end_line == span.line else None
    return SpecError(
        message,
        line=span.line,
        column=span.column,
        end_column=end,
        hint=hint,
        filename=_DATA_FILE,
        source=text,
    )


# ---------------------------------------------------------------------------- synthetic arguments

# name -> (kind, default). A default of None is computed from `nodes`.
_SYNTHETIC_PARAMS: dict[str, dict[str, tuple[str, Any]]] = {
    "sbm": {
        "nodes": ("count", 1000),
        "edges": ("count", None),  # 10 * nodes
        "classes": ("count", 4),
        "features": ("count", 32),
        "homophily": ("fraction", 0.8),
    },
    "rmat": {
        "nodes": ("count", 1024),
        "edges": ("count", None),  # 16 * nodes (Graph500's edge factor)
        "features": ("count", 32),
        "classes": ("count", 4),
        **{q: ("fraction", p) for q, p in _RMAT_DEFAULT.items()},
    },
}
_EDGE_FACTOR = {"sbm": 10, "rmat": 16}


def _synthetic_args(kind: str, args: tuple[Arg, ...], text: str) -> dict[str, Any]:
    params = _SYNTHETIC_PARAMS[kind]
    example = "sbm(nodes=1000, edges=10000, classes=4, features=32)" if kind == "sbm" else (
        "rmat(nodes=1024, edges=16384, features=32, classes=4)"
    )
    values: dict[str, Any] = {}
    for arg in args:
        if arg.name is None:
            raise _error_at(arg.span, text, f"arguments of `{kind}` are named", f"e.g. `{example}`")
        if arg.name not in params:
            hint = did_you_mean(arg.name, params)
            raise _error_at(arg.name_span or arg.span, text, f"unknown argument `{arg.name}` of `{kind}`", hint)
        if arg.name in values:
            raise _error_at(arg.name_span or arg.span, text, f"argument `{arg.name}` given twice")
        param_kind, _ = params[arg.name]
        values[arg.name] = _argument_value(arg, param_kind, text)
    return values


def _argument_value(arg: Arg, kind: str, text: str):
    value = arg.value
    shown = getattr(value, "text", None) or "this value"
    if not isinstance(value, Atom):
        raise _error_at(value.span, text, f"`{arg.name}` must be a number")
    if kind == "count":
        number = value.value
        if value.type == "float" and float(number).is_integer():
            number = int(number)
        if value.type not in ("int", "float") or not isinstance(number, int):
            raise _error_at(value.span, text, f"`{arg.name}` must be a whole number, got `{shown}`")
        return number
    if value.type not in ("int", "float"):
        raise _error_at(value.span, text, f"`{arg.name}` must be a number between 0 and 1, got `{shown}`")
    return float(value.value)


def _arg_span(args: tuple[Arg, ...], name: str | None):
    for arg in args:
        if arg.name == name:
            return arg.value.span
    return None


def _argument_error(name: str | None, message: str, hint: str | None = None) -> SpecError:
    err = SpecError(message, hint=hint)
    err._argument = name  # which argument the expression error should point at
    return err


def _check_sizes(kind: str, nodes: int, edges: int | None, classes: int, features: int) -> int:
    for name, value in (("nodes", nodes), ("features", features), ("classes", classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _argument_error(name, f"`{name}` must be a positive whole number, got {value!r}")
    if nodes > _MAX_NODES:
        raise _argument_error("nodes", f"`nodes` must be at most {_MAX_NODES}, got {nodes}")
    if classes > nodes:
        raise _argument_error(
            "classes", f"`classes` ({classes}) must be at most `nodes` ({nodes})", "every class needs a node"
        )
    if edges is None:
        edges = min(_EDGE_FACTOR[kind] * nodes, nodes * (nodes - 1))
    if not isinstance(edges, int) or isinstance(edges, bool) or edges < 0:
        raise _argument_error("edges", f"`edges` must be a whole number >= 0, got {edges!r}")
    room = nodes * (nodes - 1)
    if edges > room:
        raise _argument_error(
            "edges",
            f"{nodes} nodes have room for at most {room} edges, got edges={edges}",
            "edges are undirected and stored both ways, without self-loops or duplicates: "
            "at most nodes * (nodes - 1)",
        )
    return edges


# ---------------------------------------------------------------------------- generators


def sbm_graph(
    nodes: int = 1000,
    edges: int | None = None,
    classes: int = 4,
    features: int = 32,
    homophily: float = 0.8,
    *,
    seed: int = 0,
) -> GraphData:
    """A stochastic block model: ``classes`` balanced blocks (the labels), ``edges`` edge-index
    columns of an undirected simple graph, a fraction ``homophily`` of them inside blocks, the rest
    between blocks uniformly (when the blocks cannot hold that many distinct edges, the rest go
    between blocks; a large graph with ``homophily=1`` raises `SpecError` instead); ``x = mu[y] + N(0, I)``. ``edges`` defaults to ``10 * nodes``."""
    edges = _check_sizes("sbm", nodes, edges, classes, features)
    if not 0.0 <= homophily <= 1.0:
        raise _argument_error("homophily", f"`homophily` must be between 0 and 1, got {homophily}")
    gen = torch.Generator().manual_seed(int(seed))
    n, c = nodes, classes
    y = (torch.arange(n) % c)[torch.randperm(n, generator=gen)]
    # Nodes grouped by block: block k holds by_block[start[k] : start[k] + size[k]].
    by_block = torch.argsort(y, stable=True)
    size = torch.bincount(y, minlength=c)
    start = torch.cumsum(size, 0) - size

    def draw(k: int) -> tuple[Tensor, Tensor]:
        u = torch.randint(n, (k,), generator=gen)
        block = y[u]
        inside = torch.rand(k, generator=gen) < homophily
        r = torch.rand(k, generator=gen, dtype=torch.float64)
        # Inside: a uniform node of u's block. Between: a uniform position among the nodes of
        # the other blocks, skipping u's block in the grouped order.
        others = n - size[block]
        pos_in = start[block] + (r * size[block]).long().clamp_max(size[block] - 1)
        pos_out = (r * others).long().clamp_max((others - 1).clamp_min(0))
        pos_out = torch.where(pos_out >= start[block], pos_out + size[block], pos_out)
        pos = torch.where(inside | (others == 0), pos_in, pos_out).clamp_max(n - 1)
        return u, by_block[pos]

    def weight(a: Tensor, b: Tensor) -> Tensor:
        same = y[a] == y[b]
        n_same = int(same.sum())
        n_diff = same.numel() - n_same
        w_in = homophily / n_same if n_same else 0.0
        w_out = (1.0 - homophily) / n_diff if n_diff else 0.0
        return torch.where(same, torch.tensor(w_in, dtype=torch.float64), torch.tensor(w_out, dtype=torch.float64))

    edge_index = _undirected_edges(n, edges // 2, draw, weight, gen, "sbm")
    x = _class_features(y, c, features, gen)
    name = f"sbm(nodes={n}, edges={edges}, classes={c}, features={features}"
    name += ")" if homophily == 0.8 else f", homophily={homophily:g})"
    return _with_split(name, x, edge_index, y, c, gen)


def rmat_graph(
    nodes: int = 1024,
    edges: int | None = None,
    features: int = 32,
    classes: int = 4,
    a: float = 0.57,
    b: float = 0.19,
    c: float = 0.19,
    d: float = 0.05,
    *,
    seed: int = 0,
) -> GraphData:
    """An R-MAT graph (Chakrabarti et al., 2004): each edge picks one of the four quadrants of the
    ``2^L x 2^L`` adjacency matrix with probabilities ``(a, b, c, d)`` at each of ``L = ceil(log2
    nodes)`` levels (ids >= ``nodes`` rejected); undirected, simple, ``edges`` edge-index columns.
    Labels ``y = (id * classes) // nodes`` before a random relabelling of the nodes; ``x = mu[y] +
    N(0, I)``. ``edges`` defaults to ``16 * nodes``."""
    edges = _check_sizes("rmat", nodes, edges, classes, features)
    probs = {"a": a, "b": b, "c": c, "d": d}
    for q, p in probs.items():
        if not 0.0 < p < 1.0:
            raise _argument_error(q, f"`{q}` must be between 0 and 1 (exclusive), got {p}")
    if abs(sum(probs.values()) - 1.0) > 1e-6:
        raise _argument_error(
            None,
            f"the quadrant probabilities must sum to 1, got a+b+c+d = {sum(probs.values()):g}",
            "the defaults are a=0.57, b=0.19, c=0.19, d=0.05",
        )
    gen = torch.Generator().manual_seed(int(seed))
    n = nodes
    levels = max(1, math.ceil(math.log2(n)))
    ab, abc = a + b, a + b + c

    def draw(k: int) -> tuple[Tensor, Tensor]:
        # One uniform per level picks the quadrant: [0, a) top-left, [a, a+b) top-right,
        # [a+b, a+b+c) bottom-left, [a+b+c, 1) bottom-right; row bit = bottom, column bit = right.
        u = torch.zeros(k, dtype=torch.long)
        v = torch.zeros(k, dtype=torch.long)
        for _ in range(levels):
            r = torch.rand(k, generator=gen)
            u.mul_(2).add_(r >= ab)
            v.mul_(2).add_(((r >= a) & (r < ab)) | (r >= abc))
        keep = (u < n) & (v < n)
        return u[keep], v[keep]

    log_a, log_b, log_c, log_d = (math.log(q) for q in (a, b, c, d))

    def weight(u: Tensor, v: Tensor) -> Tensor:
        # P(u, v) = a^n00 b^n01 c^n10 d^n11, n_ij = the levels where u's bit is i and v's is j.
        n11, n10, n01 = _popcount(u & v), _popcount(u & ~v), _popcount(~u & v)
        n00 = levels - n11 - n10 - n01
        same = n00 * log_a + n11 * log_d
        return torch.exp(same + n01 * log_b + n10 * log_c) + torch.exp(same + n10 * log_b + n01 * log_c)

    # Draws repeat the few hub pairs often: enumerate all pairs from a density of 10% on.
    edge_index = _undirected_edges(n, edges // 2, draw, weight, gen, "rmat", dense_share=10)
    y = torch.arange(n) * classes // n
    # Relabel the nodes at random so that ids say nothing about degree or class.
    perm = torch.randperm(n, generator=gen)
    y_new = torch.empty_like(y)
    y_new[perm] = y
    edge_index = _sorted_edges(perm[edge_index[0]], perm[edge_index[1]], n)
    x = _class_features(y_new, classes, features, gen)
    name = f"rmat(nodes={n}, edges={edges}, features={features}, classes={classes}"
    if probs != _RMAT_DEFAULT:
        name += f", a={a:g}, b={b:g}, c={c:g}, d={d:g}"
    return _with_split(name + ")", x, edge_index, y_new, classes, gen)


_DENSE_PAIRS = 1 << 26  # enumerate all pairs (exact weighted sampling) up to this many
_MAX_ROUNDS = 200


def _undirected_edges(
    n: int,
    pairs: int,
    draw: Callable[[int], tuple[Tensor, Tensor]],
    weight: Callable[[Tensor, Tensor], Tensor],
    gen: torch.Generator,
    kind: str,
    dense_share: int = 4,
) -> Tensor:
    """``pairs`` distinct unordered pairs ``{u, v}``, ``u != v``, each stored both ways (sorted).

    Sparse graphs: draw pairs with ``draw`` and drop loops and duplicates until there are enough,
    then keep a random ``pairs`` of them. Dense graphs (at most ``_DENSE_PAIRS`` possible pairs
    and at least ``1 / dense_share`` of them wanted, where duplicates would make drawing slow):
    weighted sampling without replacement over all pairs (Efraimidis-Spirakis keys
    ``Exp(1) / w``), with ``weight`` the probability of each pair under ``draw``.
    """
    total = n * (n - 1) // 2
    if pairs == 0:
        return torch.empty(2, 0, dtype=torch.long)
    if total <= _DENSE_PAIRS and dense_share * pairs >= total:
        keys = torch.empty(total, dtype=torch.float32)
        for lo in range(0, total, 1 << 22):
            hi = min(total, lo + (1 << 22))
            a, b = _pair_of_index(torch.arange(lo, hi), n)
            noise = torch.empty(hi - lo, dtype=torch.float64).exponential_(generator=gen)
            keys[lo:hi] = (noise / weight(a, b)).float()
        chosen = torch.sort(keys, stable=True).indices[:pairs]
        a, b = _pair_of_index(chosen, n)
        return _sorted_edges(a, b, n, both_ways=True)
    found = torch.empty(0, dtype=torch.long)
    acceptance, drawn, rounds, stalled = 1.0, 0, 0, 0
    # Typical graphs need about 1.1-3 draws per pair; a block or quadrant that is full (e.g.
    # homophily=1 with more edges than the blocks hold) makes every further draw a duplicate.
    budget = 20 * pairs + 100_000
    while found.numel() < pairs:
        if rounds >= _MAX_ROUNDS or drawn > budget or stalled >= 2:
            raise _argument_error(
                "edges",
                f"could not place {2 * pairs} distinct edges in {kind}(nodes={n}) "
                f"({2 * found.numel()} after {drawn} draws)",
                "the blocks or quadrants cannot hold that many distinct edges: ask for fewer edges or "
                "more nodes (sbm: or fewer classes, or a lower homophily)",
            )
        missing = pairs - found.numel()
        want = min(int(missing / acceptance * 1.1), 2 * missing + (1 << 20)) + 64
        u, v = draw(want)
        loop = u == v
        u, v = u[~loop], v[~loop]
        keys = torch.minimum(u, v) * n + torch.maximum(u, v)
        before = found.numel()
        found = torch.unique(torch.cat([found, keys]))
        acceptance = (found.numel() - before) / want
        stalled = stalled + 1 if acceptance < 1e-3 else 0
        acceptance = max(acceptance, 1e-3)
        drawn += want
        rounds += 1
    if found.numel() > pairs:
        found = found[torch.randperm(found.numel(), generator=gen)[:pairs]]
    return _sorted_edges(found // n, found % n, n, both_ways=True)


def _popcount(x: Tensor) -> Tensor:
    """Set bits of each non-negative int64 below 2^32 (SWAR), as float64."""
    x = x & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x + (x >> 8) + (x >> 16) + (x >> 24)) & 0x3F).double()


def _pair_of_index(index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The pair ``(a, b)``, ``a < b``, at ``index`` in the row-major order of the upper triangle."""
    start = lambda row: row * (2 * n - row - 1) // 2  # noqa: E731 - index of (row, row + 1)
    m = 2 * n - 1
    a = ((m - torch.sqrt((m * m - 8 * index).double())) / 2).floor().long().clamp(0, n - 2)
    a = torch.where(start(a + 1) <= index, a + 1, a)
    a = torch.where(start(a) > index, a - 1, a)
    return a, index - start(a) + a + 1


def _sorted_edges(u: Tensor, v: Tensor, n: int, *, both_ways: bool = False) -> Tensor:
    if both_ways:
        u, v = torch.cat([u, v]), torch.cat([v, u])
    keys = torch.sort(u * n + v).values
    return torch.stack([keys // n, keys % n])


def _class_features(y: Tensor, classes: int, features: int, gen: torch.Generator) -> Tensor:
    """``x = mu[y] + N(0, I)``, ``mu[c] ~ N(0, I / (2F))``: class means about 1 noise std apart."""
    means = torch.randn(classes, features, generator=gen) / math.sqrt(2 * features)
    return means[y] + torch.randn(y.numel(), features, generator=gen)


# ---------------------------------------------------------------------------- splits


def random_split(
    y: Tensor, *, seed: int | torch.Generator = 0, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
) -> tuple[Tensor, Tensor, Tensor]:
    """Train / validation / test masks over the labelled nodes, in ``fractions`` (60/20/20).

    Seeded and deterministic. The labelled nodes (``y >= 0``; all nodes for multi-label ``[N, C]``
    targets) are put in a random order and cut at ``round(L * 0.6)`` and ``round(L * 0.8)``.
    Single-label ``y`` is stratified: each class's nodes are spread evenly over that order
    (systematic sampling: the ``i``-th of ``n_c`` nodes, shuffled, sits at ``(i + u_c) / n_c``,
    ``u_c`` uniform), so every split holds each class in proportion, up to one node.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    n = y.size(0)
    labelled = (y >= 0) if y.dim() == 1 else torch.ones(n, dtype=torch.bool)
    nodes = labelled.nonzero().view(-1)
    nodes = nodes[torch.randperm(nodes.numel(), generator=gen)]
    if y.dim() == 1 and nodes.numel():
        nodes = nodes[torch.argsort(y[nodes], stable=True)]
        labels = y[nodes]
        count = torch.bincount(labels)
        first = torch.cumsum(count, 0) - count
        rank = torch.arange(nodes.numel()) - first[labels]
        offset = torch.rand(count.numel(), generator=gen, dtype=torch.float64)
        position = (rank + offset[labels]) / count[labels]
        nodes = nodes[torch.argsort(position, stable=True)]
    total = nodes.numel()
    cuts = [round(total * fractions[0]), round(total * (fractions[0] + fractions[1])), round(total * sum(fractions))]
    masks = []
    for lo, hi in zip([0, cuts[0], cuts[1]], cuts):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[nodes[lo:hi]] = True
        masks.append(mask)
    return masks[0], masks[1], masks[2]


def _with_split(name, x, edge_index, y, classes: int, gen: torch.Generator) -> GraphData:
    train, val, test = _filled_split(name, y, gen)
    return GraphData(name, x, edge_index, y, train, val, test, int(x.size(1)), int(classes))


def _filled_split(name: str, y: Tensor, seed: int | torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`random_split`, refused where a split would hold no node: training would report a best
    epoch and accuracies over nothing (0, or NaN, which is not JSON)."""
    masks = random_split(y, seed=seed)
    for split, mask in zip(("training", "validation", "test"), masks):
        if not bool(mask.any()):
            labelled = int((y >= 0).sum()) if y.dim() == 1 else int(y.size(0))
            raise SpecError(
                f"{name}: the {split} split holds no node ({labelled} labelled nodes, split 60/20/20)",
                hint="a graph needs at least 5 labelled nodes, one in each split; or save train/val/test masks",
                filename=_DATA_FILE,
            )
    return masks


# ---------------------------------------------------------------------------- Planetoid


def default_cache_dir() -> Path:
    """``$GNNSPEC_CACHE``, else ``~/.cache/gnnspec``."""
    env = os.environ.get("GNNSPEC_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/gnnspec").expanduser()


def planetoid_files(name: str) -> list[str]:
    """The raw file names torch-geometric's Planetoid reads for ``name`` (``ind.cora.x`` ...)."""
    return [f"ind.{name.lower()}.{part}" for part in _PLANETOID_PARTS]


def load_planetoid(
    name: str,
    *,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = False,
) -> GraphData:
    """A Planetoid dataset (public split) from ``data_root/<Name>/raw``; see the module docstring."""
    key = name.lower()
    if key not in PLANETOID:
        raise SpecError(f"unknown Planetoid dataset `{name}`", hint=did_you_mean(name, PLANETOID))
    folder = PLANETOID[key]
    files = planetoid_files(key)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if data_root is None and os.environ.get("GNNSPEC_DATA"):
        data_root = os.environ["GNNSPEC_DATA"]
    root = Path(data_root).expanduser() if data_root is not None else None

    candidates = []
    if root is not None:
        candidates += [root / folder / "raw", root / key / "raw"]
    downloaded = cache / "planetoid" / folder / "raw"
    candidates.append(downloaded)
    raw_dir = next((d for d in candidates if all((d / f).is_file() for f in files)), None)

    if raw_dir is None and not download:
        raise _missing_planetoid(key, folder, files, root)
    if raw_dir is None:
        raw_dir, processed_dir = downloaded, downloaded.parent / "processed"
    else:
        processed_dir = cache / "planetoid" / f"{folder}-{_raw_key(raw_dir, files)}" / "processed"

    data = _read_planetoid(folder, raw_dir, processed_dir, download=download)
    # Row-normalised bag-of-words features, as the GCN, GAT, APPNP and GCNII papers (and
    # torch-geometric's examples, through NormalizeFeatures) train on them.
    x = data.x.float()
    x = x / x.sum(dim=1, keepdim=True).clamp(min=1.0)
    y = data.y.long().view(-1)
    return GraphData(
        key,
        x,
        data.edge_index.long(),
        y,
        data.train_mask.bool(),
        data.val_mask.bool(),
        data.test_mask.bool(),
        int(x.size(1)),
        int(y.max()) + 1,
    )


def _missing_planetoid(key: str, folder: str, files: list[str], root: Path | None) -> SpecError:
    listing = ", ".join(files)
    fetch = (
        f"(from {_PLANETOID_URL}, or call gnnspec.data.load_data({key!r}, download=True) to let "
        "torch-geometric's Planetoid download them into the cache when the network allows)"
    )
    if root is None:
        return SpecError(
            f"no data root for `{key}`: pass --data-root DIR or set GNNSPEC_DATA",
            hint=f"DIR/{folder}/raw/ must hold the Planetoid files {listing} {fetch}",
        )
    target = root / folder / "raw"
    present = [f for f in files if (target / f).is_file()]
    missing = [f for f in files if f not in present]
    what = "are missing" if not present else "are incomplete: no " + ", ".join(missing)
    return SpecError(
        f"the Planetoid files for `{key}` {what} in {target}",
        hint=f"put {listing} in {target}/ {fetch}",
    )


def _raw_key(raw_dir: Path, files: list[str]) -> str:
    digest = hashlib.sha256(str(raw_dir.resolve()).encode())
    for f in files:
        stat = (raw_dir / f).stat()
        digest.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:12]


def _read_planetoid(folder: str, raw_dir: Path, processed_dir: Path, *, download: bool):
    """Planetoid's ``Data``, processed once into ``processed_dir``; without a writable cache, read
    straight from the raw files."""
    try:
        from torch_geometric.datasets import Planetoid
    except ImportError as err:  # pragma: no cover - torch-geometric is a dependency
        raise SpecError(f"torch-geometric is needed to read `{folder}`: {err}") from None

    class CachedPlanetoid(Planetoid):
        """Planetoid reading raw files from ``raw_dir`` and keeping its processed file elsewhere."""

        def __init__(self, force_reload: bool = False) -> None:
            super().__init__(str(processed_dir.parent), folder, split="public", force_reload=force_reload)

        @property
        def raw_dir(self) -> str:
            return str(raw_dir)

        @property
        def processed_dir(self) -> str:
            return str(processed_dir)

        # Planetoid prints "Processing..." to stderr: keep the command line's output clean.
        log = property(lambda self: False, lambda self, value: None)

        def download(self) -> None:
            if not download:
                raise SpecError(f"the Planetoid files for `{folder.lower()}` are missing in {raw_dir}")
            super().download()

    try:
        try:
            return CachedPlanetoid()[0]
        except (SpecError, OSError):
            raise
        except Exception:
            if not all((raw_dir / f).is_file() for f in planetoid_files(folder)):
                raise
            # A cache file cut short (an interrupted run): process the raw files again.
            return CachedPlanetoid(force_reload=True)[0]
    except SpecError:
        raise
    except Exception as err:
        if download and not all((raw_dir / f).is_file() for f in planetoid_files(folder)):
            raise SpecError(
                f"could not download the Planetoid files for `{folder.lower()}` into {raw_dir}: {err}",
                hint=f"put them there by hand, from {_PLANETOID_URL}",
            ) from None
        if isinstance(err, OSError):
            # No usable cache (not writable, not a directory): read the raw files, keep nothing.
            return _read_raw_planetoid(folder, raw_dir)
        raise SpecError(
            f"cannot read the Planetoid files for `{folder.lower()}` in {raw_dir}: {err}",
            hint=f"the files should be the originals from {_PLANETOID_URL}",
        ) from None


def _read_raw_planetoid(folder: str, raw_dir: Path):
    from torch_geometric.io import read_planetoid_data

    try:
        return read_planetoid_data(str(raw_dir), folder)
    except Exception as err:
        raise SpecError(
            f"cannot read the Planetoid files for `{folder.lower()}` in {raw_dir}: {err}",
            hint=f"the files should be the originals from {_PLANETOID_URL}",
        ) from None


# ---------------------------------------------------------------------------- saved graphs


def load_saved_graph(path: str | Path, *, seed: int = 0) -> GraphData:
    """A graph saved with ``torch.save``: a torch-geometric ``Data`` (or the processed file of an
    ``InMemoryDataset`` with one graph) or a dict with ``x``, ``edge_index``, ``y`` and optionally
    all three masks. Loaded with ``weights_only=True``; no code in the file runs."""
    shown = str(path)
    file = Path(path).expanduser()
    if not file.exists():
        raise SpecError(
            f"no such file: {shown}",
            hint="a saved graph is a .pt file written by torch.save(data) with x, edge_index and y; "
            "a dataset name is cora, citeseer, pubmed, sbm(...) or rmat(...)",
            filename=_DATA_FILE,
        )
    if not file.is_file():
        raise SpecError(f"not a file: {shown}", filename=_DATA_FILE)
    obj = _torch_load(file, shown)
    fields = _graph_fields(obj, shown)
    return _graph_from_fields(fields, shown, seed)


def _torch_load(file: Path, shown: str):
    import pickle

    from torch_geometric.data import Data
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    safe = [Data, DataEdgeAttr, DataTensorAttr, GlobalStorage]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        # torch words a global outside the allow-list one way and one from a blocked module another
        blocked = re.search(r"Unsupported global:\s*(.*?) was not|unsupported GLOBAL (\S+) whose", text, re.S)
        if blocked:
            detail = (blocked.group(1) or blocked.group(2)).strip()
            raise SpecError(
                f"{shown} holds an object gnnspec does not load safely ({detail})",
                hint="save a torch_geometric Data or a dict of tensors: "
                "torch.save({'x': x, 'edge_index': edge_index, 'y': y}, path)",
                filename=_DATA_FILE,
            ) from None
        raise _corrupt(shown, err) from None
    except Exception as err:  # a damaged file fails anywhere inside the unpickler
        raise _corrupt(shown, err) from None


def _corrupt(shown: str, err: Exception) -> SpecError:
    reason = str(err).strip().splitlines()
    reason = next((line for line in reversed(reason) if line.strip() and "torch.load" not in line), "")
    return SpecError(
        f"cannot read {shown}: not a file written by torch.save" + (f" ({reason.strip()[:200]})" if reason else ""),
        hint="save the graph with torch.save(data, path), data a torch_geometric Data or a dict of tensors",
        filename=_DATA_FILE,
    )


def _graph_fields(obj, shown: str) -> dict[str, Any]:
    from torch_geometric.data import Data

    # The processed file of an InMemoryDataset: (data dict, slices[, class]).
    if isinstance(obj, tuple) and len(obj) in (2, 3) and isinstance(obj[0], (dict, Data)):
        obj = obj[0]
    if isinstance(obj, Data):
        return {key: obj[key] for key in obj.keys()}
    if isinstance(obj, dict):
        return dict(obj)
    raise SpecError(
        f"{shown} holds a {type(obj).__name__}, not a graph",
        hint="save a torch_geometric Data or a dict with x, edge_index and y",
        filename=_DATA_FILE,
    )


def _graph_from_fields(fields: dict[str, Any], shown: str, seed: int) -> GraphData:
    def fail(message: str, hint: str | None = None) -> SpecError:
        return SpecError(f"{shown}: {message}", hint=hint, filename=_DATA_FILE)

    for key in ("x", "edge_index", "y"):
        if not isinstance(fields.get(key), Tensor):
            have = ", ".join(sorted(str(k) for k in fields)) or "nothing"
            raise fail(f"the saved graph has no tensor `{key}` (it has {have})", "a graph needs x, edge_index and y")
    x, edge_index, y = fields["x"], fields["edge_index"], fields["y"]
    if x.dim() == 1:
        x = x.view(-1, 1)
    if x.dim() != 2 or x.size(1) < 1:
        raise fail(f"`x` must be [nodes, features], got shape {list(x.shape)}")
    x = x if x.is_floating_point() else x.float()
    n = x.size(0)
    if edge_index.dim() != 2 or edge_index.size(0) != 2 or edge_index.is_floating_point():
        raise fail(f"`edge_index` must be [2, edges] integers, got {list(edge_index.shape)} {edge_index.dtype}")
    from gnnspec.ops import plain_tensor

    edge_index = plain_tensor(edge_index).long()
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        raise fail(
            f"`edge_index` refers to node {int(edge_index.max()) if int(edge_index.min()) >= 0 else int(edge_index.min())}"
            f" but `x` has {n} nodes",
        )
    if y.size(0) != n:
        raise fail(f"`y` has {y.size(0)} rows but `x` has {n} nodes")
    if y.dim() == 2 and y.size(1) == 1 and not y.is_floating_point():
        y = y.view(-1)
    if y.dim() == 1:
        if y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise fail("`y` holds fractional values", "class labels are integers; multi-label targets are [nodes, classes]")
        y = y.long()
        if not bool((y >= 0).any()):
            raise fail("`y` labels no node (every label is negative)")
        classes = int(y.max()) + 1
    elif y.dim() == 2:
        y = y.float()
        if y.numel() and not (bool(torch.isfinite(y).all()) and float(y.min()) >= 0.0 and float(y.max()) <= 1.0):
            # class numbers in a [nodes, k] tensor had trained as soft targets, silently meaningless
            raise fail("`y` is [nodes, classes] but holds values outside [0, 1]",
                       "multi-label targets are 0/1 or probabilities; class labels are a [nodes] tensor")
        classes = int(y.size(1))
    else:
        raise fail(f"`y` must be [nodes] labels or [nodes, classes] targets, got shape {list(y.shape)}")

    given = [m for m in _MASKS if fields.get(m) is not None]
    if given and len(given) < 3:
        missing = [m for m in _MASKS if m not in given]
        raise fail(f"the saved graph has {', '.join(given)} but no {', '.join(missing)}", "save all three masks or none")
    if given:
        masks = []
        for key in _MASKS:
            mask = fields[key]
            if not isinstance(mask, Tensor):
                raise fail(f"`{key}` is not a tensor")
            if mask.dim() == 2:  # several splits (e.g. geom-gcn): the first
                mask = mask[:, 0]
            if mask.dim() != 1 or mask.size(0) != n:
                raise fail(f"`{key}` must be [nodes] booleans, got shape {list(mask.shape)}")
            mask = mask.bool()
            if y.dim() == 1:
                mask = mask & (y >= 0)  # an unlabelled node is in no split
            if not bool(mask.any()):
                raise fail(f"`{key}` selects no labelled node", "each split needs at least one node with a label >= 0")
            masks.append(mask)
        train, val, test = masks
    else:
        train, val, test = _filled_split(shown, y, seed)
    return GraphData(shown, x, edge_index, y, train, val, test, int(x.size(1)), classes)


# ---------------------------------------------------------------------------- spec widths


def check_widths(spec_in, spec_out, data: GraphData, *, spans=None) -> None:
    """Raise `SpecError` when the spec's ``in`` / ``out`` (an int, or ``"auto"``/None) contradict
    ``data``'s feature / class counts. ``spans`` (a spec's ``.spans``) places the error on the
    spec's ``in:`` / ``out:`` value."""
    for key, value, have, unit in (
        ("in", spec_in, data.num_features, "features"),
        ("out", spec_out, data.num_classes, "classes"),
    ):
        if value is None or value == "auto":
            continue
        if int(value) == have:
            continue
        span = spans.get(key) if spans is not None else None
        err = SpecError(
            f"the spec says `{key}: {value}` but {data.name} has {have} {unit}",
            hint=f"write `{key}: {have}`, or `{key}: auto` to take it from the data",
        )
        if span is not None:
            err.line, err.column = span.line, span.column
            err.end_column = span.end_column if span.end_line == span.line else None
        raise err
