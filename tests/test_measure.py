"""Live tensor storage measurement: exact byte counts, and the SPEC section 5 step protocol."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric import EdgeIndex
from torch_geometric.nn import GCNConv
from torch_geometric.nn.norm import BatchNorm

from gnnspec.lower.recompute import SharedDropout
from gnnspec.lower.reversible import ReversibleStack
from gnnspec.memory.measure import LiveStorageTracker, measure_step_peak, step_state_tensors


def test_known_allocations_give_exact_byte_counts() -> None:
    with LiveStorageTracker() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.zeros(10, dtype=torch.float64)  # 80
        c = a * 2  # 4000
        assert tracker.current_bytes == 8080
        del a
        assert tracker.current_bytes == 4080
        d = torch.cat([c, c])  # 8000
        del c, d
        assert tracker.current_bytes == 80
    assert tracker.peak_bytes == 12080
    assert tracker.baseline_bytes == 0
    del b
    assert tracker.current_bytes == 0


def test_views_are_counted_once() -> None:
    with LiveStorageTracker() as tracker:
        a = torch.zeros(16, 16)  # 1024 bytes
        views = [a[3:], a.view(256), a.t(), a[:, 1], a.detach(), *a.chunk(4, dim=-1)]
        assert tracker.current_bytes == 1024
        del a
        assert tracker.current_bytes == 1024  # the views keep the storage alive
        views.clear()
        assert tracker.current_bytes == 0
    assert tracker.peak_bytes == 1024


def test_older_storages_count_only_when_registered() -> None:
    older = torch.ones(100)
    with LiveStorageTracker() as tracker:
        older.add_(1)
        view = older[10:]
        assert tracker.current_bytes == 0
        assert tracker.track_existing([older, view, older.view(10, 10)]) == 400
        assert tracker.current_bytes == tracker.baseline_bytes == tracker.peak_bytes == 400
        fresh = older + 1
        assert tracker.current_bytes == 800
    del older, view, fresh
    assert tracker.current_bytes == 0


def test_wrapper_subclass_counts_its_data_once() -> None:
    with LiveStorageTracker() as tracker:
        raw = torch.zeros(2, 10, dtype=torch.long)  # 160 bytes
        edge_index = EdgeIndex(raw, sparse_size=(10, 10))  # wraps `raw`, no new data
        assert tracker.current_bytes == 160
        flipped = edge_index.flip(0)
        assert isinstance(flipped, EdgeIndex) and tracker.current_bytes == 320
    del raw, edge_index
    assert tracker.current_bytes == 160
    assert len(step_state_tensors(flipped)) == 1


def test_storage_resize_is_accounted() -> None:
    original = torch.UntypedStorage.resize_
    older = torch.ones(100)
    with LiveStorageTracker() as tracker:
        tracker.track_existing([older])
        fresh = torch.ones(50, dtype=torch.float64)  # 400 bytes
        assert tracker.current_bytes == 800
        older.untyped_storage().resize_(0)  # how PyG's GroupAddRev frees its input
        assert tracker.current_bytes == 400
        fresh.untyped_storage().resize_(1000)
        assert tracker.current_bytes == 1000
        fresh.resize_(500)  # the tensor op grows the storage to 4000 bytes
        assert tracker.current_bytes == 4000
    assert tracker.peak_bytes == 4000
    assert torch.UntypedStorage.resize_ is original


def test_backward_allocations_are_seen() -> None:
    weight = torch.randn(250, requires_grad=True)  # 1000 bytes
    with LiveStorageTracker() as tracker:
        tracker.track_existing([weight])
        loss = (weight * weight).sum()  # saves nothing new; product 1000 bytes freed, loss 4
        assert tracker.current_bytes == 1004
        loss.backward()  # grad of loss (4), 2 * weight * grad (temporaries), weight.grad (1000)
        assert tracker.current_bytes == 2004
    assert tracker.peak_bytes > 2004


class LinearModel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cache: int = 0) -> None:
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels)
        self.cache_numel = cache
        self.cache: Tensor | None = None

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        if self.cache_numel and self.cache is None:  # kept across steps in a plain attribute
            self.cache = torch.zeros(self.cache_numel)
        return self.lin(x)


N, IN, OUT, E = 100, 16, 4, 50


def _linear_setup(cache: int = 0):
    torch.manual_seed(0)
    model = LinearModel(IN, OUT, cache)
    x = torch.randn(N, IN)
    edge_index = torch.randint(0, N, (2, E))
    y = torch.randint(0, OUT, (N,))
    return model, x, edge_index, y, torch.optim.SGD(model.parameters(), lr=0.1)


def test_linear_step_peak_equals_hand_count() -> None:
    unrelated = torch.zeros(10_000)  # held by the process, not by the step: not counted
    model, x, edge_index, y, optimizer = _linear_setup()
    f32, i64 = 4, 8
    alive_at_start = (
        (IN * OUT + OUT) * f32  # weight and bias (SGD without momentum keeps no state)
        + N * IN * f32  # x
        + 2 * E * i64  # edge_index
        + N * i64  # y
    )
    # The peak is in backward, at log_softmax_backward: the logits and the log-probabilities
    # (saved for backward), the loss and nll_loss's total_weight, the gradient of the
    # log-probabilities and the new gradient of the logits.
    peak = alive_at_start + 4 * N * OUT * f32 + 2 * f32
    assert measure_step_peak(model, x, edge_index, y, optimizer) == peak == 14680
    assert unrelated.numel() == 10_000


def test_tensors_cached_by_the_model_count_as_inputs() -> None:
    cache = 1000
    plain = measure_step_peak(*_linear_setup())
    model, x, edge_index, y, optimizer = _linear_setup(cache)
    assert measure_step_peak(model, x, edge_index, y, optimizer) == plain + cache * 4
    found = {t.untyped_storage().data_ptr() for t in step_state_tensors(model)}
    assert model.cache is not None and model.cache.untyped_storage().data_ptr() in found


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = BatchNorm(width)
        self.conv = GCNConv(width, width, cached=True)

    def forward(self, x: Tensor, edge_index: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.conv(SharedDropout.apply_mask(F.relu(self.norm(x)), mask), edge_index)


class RevNet(nn.Module):
    """``linear >> rev(op=gcn, groups=2, tie=true, dropout=0.1) >> linear``."""

    def __init__(self, depth: int, reversible: bool, hidden: int = 32, groups: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(16, hidden)
        layer = [Block(hidden // groups) for _ in range(groups)]
        self.stack = ReversibleStack([layer] * depth, reversible)
        self.drop = SharedDropout(0.1)
        self.out = nn.Linear(hidden, 5)
        self.group_width = hidden // groups

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.inp(x)
        return self.out(self.stack(h, edge_index, self.drop.draw(h[:, : self.group_width])))


def _rev_peak(depth: int, reversible: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    nodes, edges = 2000, 10_000
    x = torch.randn(nodes, 16, generator=gen)
    edge_index = torch.randint(0, nodes, (2, edges), generator=gen)
    y = torch.randint(0, 5, (nodes,), generator=gen)
    torch.manual_seed(0)
    model = RevNet(depth, reversible)
    return measure_step_peak(model, x, edge_index, y, torch.optim.Adam(model.parameters(), lr=0.01))


def test_reversible_step_memory_does_not_grow_with_depth() -> None:
    shallow, deep = _rev_peak(4, reversible=True), _rev_peak(64, reversible=True)
    assert deep == pytest.approx(shallow, rel=0.05)
    store_shallow, store_deep = _rev_peak(4, reversible=False), _rev_peak(16, reversible=False)
    assert store_shallow > shallow
    assert store_deep > 2 * store_shallow
