"""Datasets (gnnspec/data.py): Planetoid files read in place, synthetic SBM / R-MAT graphs, saved
graphs, random splits, and the errors a user gets for a bad ``DATA`` argument.

Nothing here downloads: Planetoid reads a temporary read-only copy of the real Cora files in
/work/shared/data/planetoid (tests needing them are skipped where they are absent).
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Data

import gnnspec
from gnnspec import SpecError
from gnnspec.data import GraphData, check_widths, load_data, random_split

_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "planetoid"
PLANETOID_SOURCE = Path(
    os.environ.get("GNNSPEC_TEST_PLANETOID", _BESIDE if _BESIDE.is_dir() else "/work/shared/data/planetoid")
)
CORA_FILES = [f"ind.cora.{p}" for p in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]
needs_cora = pytest.mark.skipif(
    not all((PLANETOID_SOURCE / "Cora" / "raw" / f).is_file() for f in CORA_FILES),
    reason=f"the Planetoid Cora files are not in {PLANETOID_SOURCE}/Cora/raw",
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors: on a busy 2-core machine, intra-op threads spin-wait and run 10-20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_user_environment(monkeypatch):
    # The user's data root and cache must not leak into (or be written by) the tests.
    monkeypatch.delenv("GNNSPEC_DATA", raising=False)
    monkeypatch.delenv("GNNSPEC_CACHE", raising=False)


def _set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        path.chmod((mode | stat.S_IWUSR) if writable else (mode & ~bits))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}


@pytest.fixture(scope="module")
def cora_root(tmp_path_factory):
    """A read-only copy of the Planetoid data root (root ignores the mode bits, hence snapshots)."""
    root = tmp_path_factory.mktemp("data") / "planetoid"
    shutil.copytree(PLANETOID_SOURCE / "Cora", root / "Cora")
    _set_writable(root, False)
    yield root
    _set_writable(root, True)


@pytest.fixture(scope="module")
def cora_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cora(cora_root, cora_cache):
    return load_data("cora", data_root=cora_root, cache_dir=cora_cache)


# ---------------------------------------------------------------------------- Planetoid


@needs_cora
def test_cora_has_the_published_shape_and_public_split(cora: GraphData) -> None:
    assert (cora.name, cora.num_nodes, cora.num_features, cora.num_classes) == ("cora", 2708, 1433, 7)
    assert cora.num_edges == 10556
    assert cora.x.shape == (2708, 1433) and cora.x.dtype == torch.float32
    assert cora.edge_index.dtype == torch.int64 and cora.y.dtype == torch.int64
    assert [int(m.sum()) for m in (cora.train_mask, cora.val_mask, cora.test_mask)] == [140, 500, 1000]
    assert all(m.dtype == torch.bool and m.shape == (2708,) for m in (cora.train_mask, cora.val_mask, cora.test_mask))
    assert torch.bincount(cora.y[cora.train_mask]).tolist() == [20] * 7  # 20 per class
    assert "nodes=2708" in repr(cora)


@needs_cora
def test_cora_is_read_in_place_and_the_data_root_is_never_written(cora_root, tmp_path) -> None:
    before = _snapshot(cora_root)
    cache = tmp_path / "cache"
    data = load_data("CORA", data_root=cora_root, cache_dir=cache)
    assert data.num_nodes == 2708
    assert _snapshot(cora_root) == before
    assert list(cache.rglob("data.pt"))  # the processed file went to the cache


@needs_cora
def test_a_second_load_uses_the_cache(cora, cora_root, cora_cache, monkeypatch) -> None:
    from torch_geometric.datasets import Planetoid

    (processed,) = cora_cache.rglob("data.pt")
    stamp = processed.stat().st_mtime_ns

    def process_again(self):
        raise AssertionError("the raw files were processed again")

    monkeypatch.setattr(Planetoid, "process", process_again)
    again = load_data("cora", data_root=cora_root, cache_dir=cora_cache)
    assert processed.stat().st_mtime_ns == stamp
    assert torch.equal(again.x, cora.x) and torch.equal(again.edge_index, cora.edge_index)
    assert torch.equal(again.test_mask, cora.test_mask)


@needs_cora
def test_the_environment_names_the_data_root_and_the_cache(cora_root, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GNNSPEC_DATA", str(cora_root))
    monkeypatch.setenv("GNNSPEC_CACHE", str(tmp_path / "envcache"))
    assert load_data("cora").num_nodes == 2708
    assert list((tmp_path / "envcache").rglob("data.pt"))


@needs_cora
def test_an_unusable_cache_still_loads_from_the_raw_files(cora_root, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    data = load_data("cora", data_root=cora_root, cache_dir=blocker / "cache")
    assert (data.num_nodes, data.num_edges, int(data.train_mask.sum())) == (2708, 10556, 140)


def test_missing_planetoid_files_say_where_to_put_which(tmp_path) -> None:
    with pytest.raises(SpecError) as info:
        load_data("cora", data_root=tmp_path, cache_dir=tmp_path / "cache")
    err = info.value
    assert str(tmp_path / "Cora" / "raw") in err.message
    assert "ind.cora.x" in err.hint and "ind.cora.test.index" in err.hint
    assert "download=True" in err.hint
    assert (err.line, err.column, err.end_column) == (1, 1, 5)
    assert not (tmp_path / "Cora").exists()


def test_incomplete_planetoid_files_name_the_missing_ones(tmp_path) -> None:
    raw = tmp_path / "Cora" / "raw"
    raw.mkdir(parents=True)
    for name in CORA_FILES[:-1]:
        (raw / name).write_bytes(b"")
    with pytest.raises(SpecError, match="incomplete: no ind.cora.test.index"):
        load_data("cora", data_root=tmp_path, cache_dir=tmp_path / "cache")


def test_without_a_data_root_the_error_says_how_to_give_one(tmp_path) -> None:
    with pytest.raises(SpecError) as info:
        load_data("pubmed", cache_dir=tmp_path)
    assert "--data-root" in info.value.message and "GNNSPEC_DATA" in info.value.message
    assert "PubMed/raw" in info.value.hint and "ind.pubmed.graph" in info.value.hint


def test_planetoid_downloads_only_when_asked(tmp_path, monkeypatch) -> None:
    from torch_geometric.datasets import Planetoid

    calls = []

    def offline_download(self):
        calls.append(self.raw_dir)
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(Planetoid, "download", offline_download)
    with pytest.raises(SpecError, match="missing"):
        load_data("citeseer", data_root=tmp_path / "root", cache_dir=tmp_path / "cache")
    assert calls == []
    with pytest.raises(SpecError, match="could not download"):
        load_data("citeseer", data_root=tmp_path / "root", cache_dir=tmp_path / "cache", download=True)
    assert calls == [str(tmp_path / "cache" / "planetoid" / "CiteSeer" / "raw")]
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------------------- synthetic graphs


def _check_simple_undirected(data: GraphData) -> None:
    n, (row, col) = data.num_nodes, data.edge_index
    assert bool((row != col).all()), "self-loop"
    keys = row * n + col
    assert torch.equal(keys, torch.sort(keys).values), "edge_index is sorted by (row, col)"
    assert keys.unique().numel() == keys.numel(), "duplicate edge"
    assert torch.equal(torch.sort(col * n + row).values, keys), "not symmetric"
    assert int(data.edge_index.min()) >= 0 and int(data.edge_index.max()) < n


def _check_split(data: GraphData) -> None:
    train, val, test = data.train_mask, data.val_mask, data.test_mask
    assert not bool((train & val).any() or (train & test).any() or (val & test).any())
    n = data.num_nodes
    assert [int(m.sum()) for m in (train, val, test)] == [round(0.6 * n), round(0.8 * n) - round(0.6 * n), n - round(0.8 * n)]
    # Stratified: every class is in the training split.
    assert set(data.y[train].tolist()) == set(range(data.num_classes))


@pytest.mark.parametrize(
    "source, nodes, edges, features, classes",
    [
        ("sbm", 1000, 10000, 32, 4),
        ("rmat", 1024, 16384, 32, 4),
        ("sbm(nodes=500, edges=3000, classes=3, features=16)", 500, 3000, 16, 3),
        ("rmat(nodes=3000, edges=2e4, features=8, classes=5)", 3000, 20000, 8, 5),
        ("SBM(nodes=300, edges=1001)", 300, 1000, 32, 4),  # odd edges: one less, stored both ways
        ("sbm(nodes=10, edges=90, classes=2)", 10, 90, 32, 2),  # the complete graph
        ("rmat(nodes=12, edges=100, classes=3, features=2)", 12, 100, 2, 3),  # dense: exact sampling
    ],
)
def test_synthetic_graphs_have_the_asked_shape(source, nodes, edges, features, classes) -> None:
    data = load_data(source)
    assert (data.num_nodes, data.num_edges, data.num_features, data.num_classes) == (nodes, edges, features, classes)
    assert data.x.shape == (nodes, features) and data.x.dtype == torch.float32
    assert data.edge_index.shape == (2, edges) and data.edge_index.dtype == torch.int64
    assert data.y.shape == (nodes,) and data.y.dtype == torch.int64
    assert torch.bincount(data.y, minlength=classes).tolist() == torch.bincount(
        torch.arange(nodes) * classes // nodes if source.lower().startswith("rmat") else torch.arange(nodes) % classes,
        minlength=classes,
    ).tolist()
    _check_simple_undirected(data)
    _check_split(data)
    assert data.name.startswith(source.split("(")[0].lower())


@pytest.mark.parametrize("source", ["sbm(nodes=400, edges=4000)", "rmat(nodes=512, edges=4000)"])
def test_synthetic_graphs_are_seeded(source) -> None:
    a, b, c = load_data(source, seed=1), load_data(source, seed=1), load_data(source, seed=2)
    for field in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.edge_index, c.edge_index)
    assert not torch.equal(a.x, c.x)


def test_sbm_puts_the_asked_fraction_of_edges_inside_blocks() -> None:
    for homophily in (0.8, 0.3):
        data = load_data(f"sbm(nodes=2000, edges=40000, classes=5, homophily={homophily})")
        row, col = data.edge_index
        inside = float((data.y[row] == data.y[col]).float().mean())
        assert inside == pytest.approx(homophily, abs=0.02)


def test_rmat_degrees_are_skewed_and_ids_shuffled() -> None:
    data = load_data("rmat(nodes=4096, edges=65536)")
    degree = torch.bincount(data.edge_index[0], minlength=data.num_nodes)
    assert int(degree.max()) > 20 * float(degree.float().mean())  # hubs
    assert int(degree.argmax()) != 0  # the hub is not node 0: ids are relabelled
    row, col = data.edge_index
    assert float((data.y[row] == data.y[col]).float().mean()) > 1 / data.num_classes


def test_a_million_edges_take_seconds() -> None:
    start = time.perf_counter()
    data = load_data("sbm(nodes=100000, edges=1000000)")
    sbm_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rmat = load_data("rmat(nodes=100000, edges=1000000)")
    rmat_seconds = time.perf_counter() - start
    print(f"1e6 edges: sbm {sbm_seconds:.2f} s, rmat {rmat_seconds:.2f} s")
    assert data.num_edges == rmat.num_edges == 1_000_000
    assert sbm_seconds < 60 and rmat_seconds < 60  # a hang guard, not a benchmark


def _train_linear(data: GraphData, epochs: int = 100) -> float:
    torch.manual_seed(0)
    model = torch.nn.Linear(data.num_features, data.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(data.x)[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
    with torch.no_grad():
        pred = model(data.x).argmax(1)
    return float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())


def _train_gcn(data: GraphData, epochs: int = 50) -> float:
    """A 2-layer GCN (Kipf & Welling): ``A_hat relu(A_hat X W1) W2``, ``A_hat = D^-1/2 (A + I) D^-1/2``."""
    torch.manual_seed(0)
    n = data.num_nodes
    loops = torch.arange(n)
    row = torch.cat([data.edge_index[0], loops])
    col = torch.cat([data.edge_index[1], loops])
    degree = torch.bincount(row, minlength=n).float()
    value = degree[row].rsqrt() * degree[col].rsqrt()
    adj = torch.sparse_coo_tensor(torch.stack([row, col]), value, (n, n), check_invariants=True).coalesce()
    ax = torch.sparse.mm(adj, data.x)  # the first propagation has no parameters: once
    lin1, lin2 = torch.nn.Linear(data.num_features, 16), torch.nn.Linear(16, data.num_classes)
    opt = torch.optim.Adam([*lin1.parameters(), *lin2.parameters()], lr=0.02, weight_decay=5e-4)
    for _ in range(epochs):
        opt.zero_grad()
        out = torch.sparse.mm(adj, lin2(torch.relu(lin1(ax))))
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
    pred = out.detach().argmax(1)
    return float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())


def test_sbm_labels_are_learnable_but_not_from_features_alone() -> None:
    data = load_data("sbm(nodes=1000, edges=10000, classes=4, features=32)")
    chance = 1 / data.num_classes
    linear, gcn = _train_linear(data), _train_gcn(data)
    print(f"sbm test accuracy: chance {chance:.2f}, linear {linear:.2f}, 2-layer GCN {gcn:.2f}")
    assert chance < linear < 0.8
    assert gcn > 0.75 and gcn > linear + 0.2


def test_rmat_labels_are_learnable() -> None:
    data = load_data("rmat(nodes=2048, edges=32768)")
    linear = _train_linear(data)
    print(f"rmat test accuracy: chance {1 / data.num_classes:.2f}, linear {linear:.2f}")
    assert linear > 1 / data.num_classes + 0.05


# ---------------------------------------------------------------------------- saved graphs


def test_a_saved_data_object_round_trips(tmp_path) -> None:
    source = load_data("sbm(nodes=200, edges=1000)", seed=3)
    path = tmp_path / "graph.pt"
    torch.save(source.to_pyg(), path)
    data = load_data(str(path))
    assert data.name == str(path)
    for field in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(getattr(data, field), getattr(source, field)), field
    assert (data.num_features, data.num_classes) == (32, 4)


def test_a_saved_dict_without_masks_gets_a_seeded_split(tmp_path) -> None:
    path = tmp_path / "graph.pth"
    y = torch.arange(100) % 3
    y[:10] = -1  # unlabelled
    torch.save({"x": torch.randn(100, 5, dtype=torch.float64), "edge_index": torch.tensor([[0, 1], [1, 0]]), "y": y}, path)
    a, b, c = load_data(str(path), seed=0), load_data(str(path), seed=0), load_data(str(path), seed=1)
    assert a.x.dtype == torch.float64 and a.num_classes == 3
    assert torch.equal(a.train_mask, b.train_mask) and not torch.equal(a.train_mask, c.train_mask)
    assert [int(m.sum()) for m in (a.train_mask, a.val_mask, a.test_mask)] == [54, 18, 18]
    assert not bool((a.train_mask | a.val_mask | a.test_mask)[:10].any())


def test_a_saved_multilabel_graph_keeps_its_targets(tmp_path) -> None:
    path = tmp_path / "multi.pt"
    y = torch.rand(50, 6) > 0.5
    torch.save(Data(x=torch.randn(50, 4), edge_index=torch.tensor([[0], [1]]), y=y), path)
    data = load_data(str(path))
    assert data.multilabel and data.y.dtype == torch.float32 and data.num_classes == 6
    assert [int(m.sum()) for m in (data.train_mask, data.val_mask, data.test_mask)] == [30, 10, 10]


def test_an_existing_file_with_another_suffix_is_a_saved_graph(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"x": torch.randn(6, 2), "edge_index": torch.tensor([[0, 1], [1, 2]]), "y": torch.tensor([0, 1, 1, 0, 1, 0])},
               "graph.bin")
    assert load_data("graph.bin").num_nodes == 6


# ---------------------------------------------------------------------------- splits and widths


def test_random_split_is_stratified_for_every_class() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val, test = random_split(y, seed=7)
    assert torch.bincount(y[train]).tolist() == [30, 18, 12]
    assert torch.bincount(y[val]).tolist() == [10, 6, 4]
    assert torch.bincount(y[test]).tolist() == [10, 6, 4]


def test_check_widths_names_the_contradiction() -> None:
    data = load_data("sbm(nodes=100, edges=200, classes=7, features=1433)")
    check_widths("auto", "auto", data)
    check_widths(1433, 7, data)
    check_widths(None, 7, data)
    text = "in: 3703\nout: 7\nmodel: linear >> plain(op=gcn, depth=2) >> linear"
    spec = gnnspec.parse(text)
    with pytest.raises(SpecError) as info:
        check_widths(spec.in_, spec.out, data, spans=spec.spans)
    err = info.value
    assert err.message == f"the spec says `in: 3703` but {data.name} has 1433 features"
    assert "`in: 1433`" in err.hint and "auto" in err.hint
    assert (err.line, err.column) == (1, 5)
    with pytest.raises(SpecError, match="`out: 6` but .* has 7 classes"):
        check_widths("auto", 6, data)


def test_graph_data_moves_between_devices() -> None:
    data = load_data("sbm(nodes=50, edges=100)")
    moved = data.to("cpu")
    assert isinstance(moved, GraphData) and torch.equal(moved.x, data.x) and moved.name == data.name


# ---------------------------------------------------------------------------- errors


def err(id_, source, message, column=None, hint=None):
    return pytest.param(source, message, column, hint, id=id_)


ERRORS = [
    err("unknown-name", "coro", "unknown dataset `coro`", 1, "did you mean `cora`?"),
    err("unknown-generator", "rmatt(nodes=10)", "unknown dataset `rmatt`", 1, "did you mean `rmat`?"),
    err("unknown-argument", "sbm(nodes=10, edgse=4)", "unknown argument `edgse` of `sbm`", 15, "did you mean `edges`?"),
    err("rmat-unknown-argument", "rmat(node=10)", "unknown argument `node` of `rmat`", 6, "did you mean `nodes`?"),
    err("positional", "sbm(100, 200)", "arguments of `sbm` are named", 5, "sbm(nodes="),
    err("twice", "sbm(nodes=10, nodes=5)", "argument `nodes` given twice", 15),
    err("zero-nodes", "sbm(nodes=0)", "`nodes` must be a positive whole number", 11),
    err("zero-features", "sbm(features=0)", "`features` must be a positive whole number", 14),
    err("negative-classes", "rmat(classes=-2)", "`classes` must be a positive whole number", 14),
    err("fraction-nodes", "sbm(nodes=1.5)", "`nodes` must be a whole number, got `1.5`", 11),
    err("name-value", "sbm(features=many)", "`features` must be a whole number, got `many`", 14),
    err("too-many-edges", "sbm(nodes=10, edges=101)", "10 nodes have room for at most 90 edges", 21, "nodes * (nodes - 1)"),
    err("edges-over-n-squared", "rmat(nodes=100, edges=1e5)", "100 nodes have room for at most 9900 edges", 23),
    err("classes-over-nodes", "sbm(nodes=5, edges=4, classes=9)", "`classes` (9) must be at most `nodes` (5)", 31),
    err("homophily-range", "sbm(homophily=1.5)", "`homophily` must be between 0 and 1", 15),
    err("rmat-probabilities", "rmat(a=0.5)", "must sum to 1, got a+b+c+d = 0.93", 1, "a=0.57"),
    err("planetoid-arguments", "cora(split=full)", "`cora` takes no arguments", 6),
    err("pipeline", "sbm >> rmat", "expected a dataset name", 1, "sbm(nodes=N"),
    err("syntax", "sbm(nodes=10", "unexpected end", 13),
    err("empty", "  ", "empty dataset", None, "cora"),
    err("missing-file", "no/such/graph.pt", "no such file: no/such/graph.pt", None, ".pt file"),
]


@pytest.mark.parametrize("source, message, column, hint", ERRORS)
def test_bad_data_arguments_raise_spec_errors(source, message, column, hint, tmp_path) -> None:
    with pytest.raises(SpecError) as info:
        load_data(source, data_root=tmp_path, cache_dir=tmp_path / "cache")
    error = info.value
    assert message in error.message
    if column is not None:
        assert (error.line, error.column) == (1, column)
        rendered = str(error)
        assert rendered.startswith(f"<data>:1:{column}: ")
        assert "\n  " + source + "\n" in rendered
        assert "\n  " + " " * (column - 1) + "^" in rendered
    if hint is not None:
        assert hint in (error.hint or "")


def test_saved_masks_leave_out_unlabelled_nodes(tmp_path) -> None:
    """A node labelled -1 inside a saved mask had crashed cross-entropy (IndexError: Target -1)."""
    y = torch.arange(30) % 3
    y[:5] = -1
    everything = torch.ones(30, dtype=torch.bool)
    source = _saved(tmp_path, {"x": torch.randn(30, 4), "edge_index": torch.randint(0, 30, (2, 90)), "y": y,
                               "train_mask": everything, "val_mask": everything, "test_mask": everything})
    data = load_data(source)
    for mask in (data.train_mask, data.val_mask, data.test_mask):
        assert torch.equal(mask, y >= 0)
    from gnnspec.train import train

    _, result = train(gnnspec.parse("res+(depth=2)"), data, epochs=2)
    assert 0.0 <= result.val_acc <= 1.0 and all(math.isfinite(e.loss) for e in result.history)


def _saved(tmp_path: Path, obj, name: str = "graph.pt") -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_bad_saved_graphs_raise_spec_errors(tmp_path) -> None:
    x, edge_index, y = torch.randn(4, 3), torch.tensor([[0, 1], [1, 2]]), torch.tensor([0, 1, 0, 1])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    cases = [
        (str(corrupt), "not a file written by torch.save"),
        (_saved(tmp_path, {"x": x, "y": y}, "a.pt"), "has no tensor `edge_index` (it has x, y)"),
        (_saved(tmp_path, [x, edge_index], "b.pt"), "holds a list, not a graph"),
        (_saved(tmp_path, {"x": x, "edge_index": torch.tensor([[0, 9], [1, 2]]), "y": y}, "c.pt"), "refers to node 9"),
        (_saved(tmp_path, {"x": x, "edge_index": edge_index, "y": y[:3]}, "d.pt"), "`y` has 3 rows but `x` has 4 nodes"),
        (_saved(tmp_path, {"x": x, "edge_index": edge_index.float(), "y": y}, "e.pt"), "`edge_index` must be [2, edges] integers"),
        (
            _saved(tmp_path, {"x": x, "edge_index": edge_index, "y": y, "train_mask": y > 0}, "f.pt"),
            "has train_mask but no val_mask, test_mask",
        ),
        (_saved(tmp_path, {"x": x, "edge_index": edge_index, "y": Path("p")}, "g.pt"), "does not load safely"),
        (  # every epoch's loss had been NaN, with exit 0
            _saved(tmp_path, {"x": x, "edge_index": edge_index, "y": y, "train_mask": y > 5, "val_mask": y >= 0,
                              "test_mask": y >= 0}, "h.pt"),
            "`train_mask` selects no labelled node",
        ),
        (
            _saved(tmp_path, {"x": x, "edge_index": edge_index, "y": torch.tensor([0, 1, -1, -1]), "train_mask": y >= 0,
                              "val_mask": y == 0, "test_mask": torch.tensor([False, False, True, True])}, "i.pt"),
            "`test_mask` selects no labelled node",
        ),
        (str(tmp_path), "not a file"),
        (  # class numbers in a [nodes, 2] tensor had trained as soft targets, with exit 0
            _saved(tmp_path, {"x": x, "edge_index": edge_index, "y": torch.tensor([[0, 2], [1, 0], [2, 1], [0, 0]])},
                   "j.pt"),
            "`y` is [nodes, classes] but holds values outside [0, 1]",
        ),
        (_saved(tmp_path, {"x": x, "edge_index": edge_index, "y": torch.full((4, 2), float("nan"))}, "k.pt"),
         "outside [0, 1]"),
    ]
    for source, message in cases:
        with pytest.raises(SpecError) as info:
            load_data(source)
        assert message in info.value.message, source
        assert str(info.value).startswith("<data>:1:1: ")


def test_a_saved_graph_with_a_pyg_edge_index_object_loads_and_trains(tmp_path) -> None:
    # torch_geometric's EdgeIndex (a wrapper subclass) failed with "its data is not allocated yet"
    from torch_geometric import EdgeIndex

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=gen), torch.randint(3, (50,), generator=gen)
    edges = torch.randint(50, (2, 200), generator=gen)
    path = _saved(tmp_path, Data(x=x, edge_index=EdgeIndex(edges, sparse_size=(50, 50)), y=y), "ei.pt")
    data = load_data(path)
    assert type(data.edge_index) is torch.Tensor and torch.equal(data.edge_index, edges)
    model = gnnspec.build("plain(op=gcn, depth=2)", in_channels=6, out_channels=3).eval()
    torch.testing.assert_close(model(x, EdgeIndex(edges, sparse_size=(50, 50))), model(x, edges), rtol=0, atol=0)


@pytest.mark.parametrize("source, split", [("rmat(nodes=2, edges=2, classes=2)", "test"),
                                           ("sbm(nodes=3, edges=6, classes=3, features=4)", "validation")])
def test_a_graph_too_small_for_every_split_is_refused(source, split, tmp_path) -> None:
    # it trained and reported best_epoch 0 and accuracies over no node (0, or NaN: not JSON)
    with pytest.raises(SpecError, match=f"the {split} split holds no node"):
        load_data(source)
    x, edges, y = torch.randn(3, 2), torch.tensor([[0, 1], [1, 2]]), torch.tensor([0, 1, 0])
    with pytest.raises(SpecError, match="split holds no node"):
        load_data(_saved(tmp_path, {"x": x, "edge_index": edges, "y": y}, "tiny.pt"))


def test_a_pickle_calling_a_blocked_module_is_named_unsafe_not_corrupt(tmp_path) -> None:
    import os as os_module

    class Payload:
        def __reduce__(self):
            return (os_module.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(SpecError, match="holds an object gnnspec does not load safely") as info:
        load_data(str(path))
    assert "system" in info.value.message
