"""checkpoint(segments=k): same function, same gradients, same module state as the plain run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import GATConv, GCNConv, SAGEConv
from torch_geometric.nn.norm import BatchNorm

from gnnspec.lower.checkpoint import run_segments, segment_bounds

N, D, E, DEPTH, P = 24, 8, 96, 6, 0.3
RTOL, ATOL = 1e-6, 1e-12


def _graph(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    edge_index = torch.randint(0, N, (2, E), generator=gen)
    return x, edge_index


def _conv(i: int) -> nn.Module:
    kind = i % 3
    if kind == 0:
        return GCNConv(D, D)
    if kind == 1:
        return SAGEConv(D, D)
    return GATConv(D, D // 2, heads=2)


class PreResBlock(nn.Module):
    """res+ block: ``x + conv(dropout(relu(norm(x))))``."""

    def __init__(self, i: int) -> None:
        super().__init__()
        self.norm = BatchNorm(D)
        self.conv = _conv(i)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.norm(x)), P, training=self.training)
        return x + self.conv(h, edge_index)


class InitialResBlock(nn.Module):
    """GCNII-like block on a tuple state: ``(0.9 conv(...) + 0.1 x0, x0)``."""

    def __init__(self, i: int) -> None:
        super().__init__()
        self.norm = BatchNorm(D)
        self.conv = _conv(i)

    def forward(self, state: tuple[Tensor, Tensor], edge_index: Tensor) -> tuple[Tensor, Tensor]:
        x, x0 = state
        h = F.dropout(F.relu(self.norm(x)), P, training=self.training)
        return 0.9 * self.conv(h, edge_index) + 0.1 * x0, x0


def _stack(block: type[nn.Module] = PreResBlock, dtype=torch.float64) -> nn.ModuleList:
    torch.manual_seed(1)
    return nn.ModuleList(block(i) for i in range(DEPTH)).to(dtype)


def _run(blocks: nn.ModuleList, x: Tensor, edge_index: Tensor, segments: int | None, seed: int = 7):
    """One step on a copy of ``blocks``: returns (output, input grad, param grads, copy)."""
    blocks = copy.deepcopy(blocks)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    if segments is None:
        out = x
        for block in blocks:
            out = block(out, edge_index)
    else:
        out = run_segments(list(blocks), x, edge_index, segments=segments, modules=list(blocks))
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in blocks.named_parameters()}
    return out.detach(), x.grad.clone(), grads, blocks


def _running_stats(blocks: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in blocks.state_dict().items() if "running" in k or "num_batches" in k}


def _assert_same_stats(a: nn.Module, b: nn.Module) -> None:
    sa, sb = _running_stats(a), _running_stats(b)
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("segments", [1, 2, 3, DEPTH, 100])
def test_outputs_gradients_and_running_stats_equal_plain_run(segments: int) -> None:
    x, edge_index = _graph()
    blocks = _stack().train()
    x_before = x.clone()
    ref_out, ref_gx, ref_grads, ref_blocks = _run(blocks, x, edge_index, None)
    out, gx, grads, ck_blocks = _run(blocks, x, edge_index, segments)

    torch.testing.assert_close(out, ref_out, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gx, ref_gx, rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=RTOL, atol=ATOL, msg=name)
    _assert_same_stats(ck_blocks, ref_blocks)
    assert int(ck_blocks[0].norm.module.num_batches_tracked) == 1
    assert torch.equal(x, x_before)


def test_dropout_masks_are_reproduced_not_absent() -> None:
    x, edge_index = _graph()
    blocks = _stack().train()
    out_a, gx_a, _, _ = _run(blocks, x, edge_index, 2, seed=7)
    out_b, gx_b, _, _ = _run(blocks, x, edge_index, 2, seed=8)
    # A different seed gives different masks, so equality with the plain run above is not an
    # accident of dropout being inactive; the gradients would mismatch if the recomputation drew
    # fresh masks.
    assert not torch.allclose(out_a, out_b)
    assert not torch.allclose(gx_a, gx_b)


def test_torch_checkpoint_alone_updates_running_stats_twice() -> None:
    """The bug run_segments exists to avoid."""
    x, edge_index = _graph()
    blocks = _stack().train()
    naive = copy.deepcopy(blocks)
    xs = x.clone().requires_grad_()
    out = checkpoint(naive[0], xs, edge_index, use_reentrant=False)
    out.sum().backward()
    assert int(naive[0].norm.module.num_batches_tracked) == 2

    _, _, _, ours = _run(blocks, x, edge_index, 1)
    assert int(ours[0].norm.module.num_batches_tracked) == 1


def test_each_step_runs_once_in_forward_and_once_in_recompute_but_the_last_segment() -> None:
    x, edge_index = _graph()
    blocks = _stack().train()
    calls = [0] * DEPTH

    def counted(i: int):
        def step(state: Tensor, ei: Tensor) -> Tensor:
            calls[i] += 1
            return blocks[i](state, ei)

        return step

    xs = x.clone().requires_grad_()
    out = run_segments([counted(i) for i in range(DEPTH)], xs, edge_index, segments=4,
                       modules=list(blocks))
    assert calls == [1] * DEPTH
    out.sum().backward()
    last = segment_bounds(DEPTH, 4)[-1]
    assert calls == [1 if last[0] <= i < last[1] else 2 for i in range(DEPTH)]


@pytest.mark.parametrize("segments", [1, 3])
def test_tuple_state(segments: int) -> None:
    x, edge_index = _graph()
    blocks = _stack(InitialResBlock).train()

    def one_step(segs: int | None):
        local = copy.deepcopy(blocks)
        xs = x.clone().requires_grad_()
        torch.manual_seed(3)
        state = (xs, xs)
        if segs is None:
            for block in local:
                state = block(state, edge_index)
        else:
            state = run_segments(list(local), state, edge_index, segments=segs, modules=list(local))
        assert isinstance(state, tuple) and len(state) == 2
        (state[0] ** 2).sum().backward()
        grads = [p.grad.clone() for p in local.parameters()]
        return state[0].detach(), xs.grad.clone(), grads, local

    ref_out, ref_gx, ref_grads, ref_blocks = one_step(None)
    out, gx, grads, ck_blocks = one_step(segments)
    torch.testing.assert_close(out, ref_out, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gx, ref_gx, rtol=RTOL, atol=ATOL)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=RTOL, atol=ATOL)
    _assert_same_stats(ck_blocks, ref_blocks)


def test_eval_and_no_grad_paths_equal_plain_run() -> None:
    x, edge_index = _graph()
    trained = _stack().train()
    _run(trained, x, edge_index, None)  # gives the norms non-trivial running statistics

    plain, ours = copy.deepcopy(trained), copy.deepcopy(trained)
    for mode in ("eval", "no_grad"):
        if mode == "eval":
            plain.eval(), ours.eval()
        else:
            plain.train(), ours.train()
        torch.manual_seed(5)
        with torch.set_grad_enabled(mode == "eval"):
            ref = x
            for block in plain:
                ref = block(ref, edge_index)
        torch.manual_seed(5)
        with torch.set_grad_enabled(mode == "eval"):
            out = run_segments(list(ours), x, edge_index, segments=2, modules=list(ours))
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        _assert_same_stats(ours, plain)


def test_bfloat16_autocast_forward_backward() -> None:
    x, edge_index = _graph()
    x = x.float()
    blocks = _stack(dtype=torch.float32).train()
    before = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))

    results = []
    for segments in (None, 3):
        local = copy.deepcopy(blocks)
        xs = x.clone().requires_grad_()
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if segments is None:
                out = xs
                for block in local:
                    out = block(out, edge_index)
            else:
                out = run_segments(list(local), xs, edge_index, segments=segments,
                                   modules=list(local))
            loss = out.float().pow(2).mean()
        loss.backward()
        assert (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")) == before
        assert xs.grad is not None and torch.isfinite(xs.grad).all()
        results.append((out.detach().float(), xs.grad.clone(), local))

    (ref_out, ref_gx, ref_blocks), (out, gx, ck_blocks) = results
    # The recomputation runs under the forward's autocast state, so it repeats the same bf16 ops.
    torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-2, atol=1e-2)
    assert int(ck_blocks[0].norm.module.num_batches_tracked) == 1


def test_segment_bounds_are_contiguous_and_near_equal() -> None:
    assert segment_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert segment_bounds(4, 0) == [(0, 4)]
    assert segment_bounds(3, 10) == [(0, 1), (1, 2), (2, 3)]
    assert segment_bounds(0, 2) == []
    for length in range(1, 12):
        for k in range(1, 14):
            bounds = segment_bounds(length, k)
            sizes = [stop - start for start, stop in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert len(bounds) == min(k, length) and max(sizes) - min(sizes) <= 1


def test_one_module_per_step_is_required() -> None:
    x, edge_index = _graph()
    blocks = _stack()
    with pytest.raises(ValueError, match="one module per step"):
        run_segments(list(blocks), x, edge_index, segments=2, modules=list(blocks)[:2])
