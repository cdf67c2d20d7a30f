"""The checkpoint plan's dropout tape: masks kept bit-packed, replayed bit for bit, never redrawn;
falls back to redrawing when another random op shares the segment."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import gnnspec
from gnnspec import ops
from gnnspec.ir import OP_SIGNATURES
from gnnspec.lower.checkpoint import run_segments
from gnnspec.lower.dropout_tape import DropoutTape, dropout, pack_bits, packed_bytes, unpack_bits
from gnnspec.memory.measure import LiveStorageTracker

N, IN, OUT = 30, 5, 3


class RandomOps(TorchDispatchMode):
    """Counts the random draws (``bernoulli``, ``rand``...) dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__.startswith(("bernoulli", "rand", "normal", "uniform")):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 2048 + 3])
def test_pack_unpack_round_trip(numel: int) -> None:
    gen = torch.Generator().manual_seed(numel)
    mask = (torch.rand(numel, generator=gen) < 0.5).double()
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(numel) == -(-numel // 8)
    assert torch.equal(unpack_bits(packed, numel, torch.float64, 1.0), mask)


def test_every_byte_pattern_round_trips() -> None:
    bits = ((torch.arange(256).unsqueeze(1) >> torch.arange(7, -1, -1)) & 1).reshape(-1).float()
    packed = pack_bits(bits)
    assert torch.equal(packed, torch.arange(256, dtype=torch.uint8))
    assert torch.equal(unpack_bits(packed, bits.numel(), torch.float32, 1.0), bits)


def test_torch_fallback_packs_and_unpacks_as_numpy_does(monkeypatch) -> None:
    """Off the CPU pack/unpack run on torch's ops: the same bytes and values as numpy's."""
    from gnnspec.lower import dropout_tape

    gen = torch.Generator().manual_seed(2)
    mask = (torch.rand(2048 + 5, generator=gen) < 0.5).float()
    packed = pack_bits(mask)
    unpacked = unpack_bits(packed, mask.numel(), torch.bfloat16, 0.7)
    monkeypatch.setattr(dropout_tape, "_has_numpy_data", lambda t: False)
    assert torch.equal(pack_bits(mask), packed)
    assert torch.equal(unpack_bits(packed, mask.numel(), torch.bfloat16, 0.7), unpacked)
    assert torch.equal(unpacked, mask.to(torch.bfloat16).div_(0.7))


@pytest.mark.parametrize("shape", [(40, 16), (7, 13)])
def test_a_recorded_and_replayed_mask_allocates_the_same_under_fake_tensors(shape) -> None:
    """The calibration records the tape under FakeTensorMode, where numpy cannot run: the fake
    path must allocate and free the same storages, in the same order, as the real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gnnspec.memory.recorder import AllocationRecorder

    def sizes(fake: bool) -> list[tuple[str, int]]:
        tape, rec = DropoutTape(), AllocationRecorder()
        mode = FakeTensorMode() if fake else contextlib.nullcontext()
        with mode:
            x = torch.empty(shape)
            with rec:
                with tape.recording():
                    a = dropout(x, 0.4, True)
                with tape.replaying():
                    b = dropout(x, 0.4, True)
                del a, b
        return [(e[0], e[2]) for e in rec.events if e[0] in "af"]

    real = sizes(fake=False)
    assert real == sizes(fake=True)
    assert ("a", packed_bytes(shape[0] * shape[1])) in real
    # the replay allocates its noise alone: the byte table comes from the cache (it had been made
    # again under any dispatch mode, a tracker's included, its temporaries in the measured peak)
    assert not any(size in (256 * 8 * 4, 256 * 8 * 8) for _, size in real), real  # the table, its int64 bits


def test_unpacking_under_fake_tensors_leaves_the_cached_tables_real() -> None:
    """The byte table is cached per (dtype, scale, device) for real tensors only: an unpack under
    FakeTensorMode (dry run, calibration) needs none, and a later real unpack is still right."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from gnnspec.lower.dropout_tape import _byte_table

    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    scale = 0.37  # a scale no other test uses, so the cache has no entry for it yet
    before = _byte_table.cache_info().currsize
    packed = pack_bits(mask)
    with FakeTensorMode() as mode:
        fake = unpack_bits(mode.from_tensor(packed), mask.numel(), torch.float32, scale)
    assert isinstance(fake, FakeTensor)
    assert _byte_table.cache_info().currsize == before
    real = unpack_bits(packed, mask.numel(), torch.float32, scale)
    assert not isinstance(real, FakeTensor) and torch.equal(real, mask.div(scale))
    assert _byte_table.cache_info().currsize == before + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_recorded_dropout_is_f_dropout_and_replay_is_bitwise_without_draws(dtype) -> None:
    x = torch.randn(13, 11, dtype=torch.float64).to(dtype)
    torch.manual_seed(5)
    expected = [F.dropout(x, 0.3, True), F.dropout(x, 0.6, True)]
    after = torch.get_rng_state()
    tape = DropoutTape()
    torch.manual_seed(5)
    with tape.recording():
        recorded = [dropout(x, 0.3, True), dropout(x, 0.6, True)]
    assert torch.equal(torch.get_rng_state(), after)  # the same draws as F.dropout
    for r, e in zip(recorded, expected):
        assert torch.equal(r, e)
    assert tape.valid and sum(m.numel() for m, _ in tape.masks) == 2 * packed_bytes(x.numel())
    for _ in range(2):  # a retain_graph backward replays again
        with RandomOps() as counter, tape.replaying():
            replayed = [dropout(x, 0.3, True), dropout(x, 0.6, True)]
        assert counter.count == 0
        for r, e in zip(replayed, expected):
            assert torch.equal(r, e)


def test_without_a_tape_or_in_eval_it_is_f_dropout() -> None:
    x = torch.randn(6, 4)
    torch.manual_seed(1)
    a = dropout(x, 0.5, True)
    torch.manual_seed(1)
    assert torch.equal(a, F.dropout(x, 0.5, True))
    with DropoutTape().recording():
        assert dropout(x, 0.5, False) is x
        assert dropout(x, 0.0, True) is x


def test_checkpoint_steps_equal_store_step_after_step_as_the_graph_changes_size() -> None:
    """Each step records a fresh tape: four steps (the last on a smaller graph) equal store's."""
    spec = "plain(op=gcn, depth=6, dropout=0.5, norm=batch, hidden=8)"
    torch.manual_seed(0)
    models = {plan: gnnspec.build(spec, IN, OUT, plan=plan).double().train()
              for plan in ("store", "checkpoint(segments=3)")}
    models["checkpoint(segments=3)"].load_state_dict(models["store"].state_dict())
    gen = torch.Generator().manual_seed(1)
    for step, nodes in enumerate([N, N, N, N - 7]):
        x = torch.randn(nodes, IN, generator=gen, dtype=torch.float64)
        edge_index = torch.randint(0, nodes, (2, 4 * nodes), generator=gen)
        results = []
        for model in models.values():
            torch.manual_seed(step)
            out = model(x, edge_index)
            out.pow(2).sum().backward()
            results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
            model.zero_grad()
        (ref, ref_grads), (got, grads) = results
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=k)


def _model_grads(plan: str, spec: str, seed: int = 3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=gen, dtype=torch.float64)
    edge_index = torch.randint(0, N, (2, 120), generator=gen)
    torch.manual_seed(0)
    model = gnnspec.build(spec, IN, OUT, plan=plan).double().train()
    torch.manual_seed(seed)
    out = model(x, edge_index)
    counter = RandomOps()
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    with counter:
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return out.detach(), grads, counter.count


@pytest.mark.parametrize("kind", ["plain", "res", "res+", "dense", "gcnii"])
def test_checkpoint_replays_masks_equal_to_store_and_draws_nothing_in_backward(kind: str) -> None:
    op = "" if kind == "gcnii" else "op=gcn, "
    spec = f"{kind}({op}depth=6, norm=batch, dropout=0.4, hidden=8)"
    ref_out, ref_grads, ref_draws = _model_grads("store", spec)
    out, grads, draws = _model_grads("checkpoint(segments=3)", spec)
    assert ref_draws == 0 and draws == 0  # the recomputation of two segments drew no mask
    assert torch.equal(out, ref_out)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=k)


class NoisyConv(nn.Module):
    """A user op with a random op of its own: ``x W`` plus Gaussian noise in training."""

    def __init__(self, channels: int, **_: object) -> None:
        super().__init__()
        self.lin = nn.Linear(channels, channels)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.lin(x)
        return h + 0.1 * torch.randn_like(h) if self.training else h


@pytest.fixture
def noisy_op():
    gnnspec.register_op("noisy", NoisyConv)
    yield "noisy"
    OP_SIGNATURES.pop("noisy", None)
    ops._IMPLS.pop("noisy", None)


def test_another_random_op_in_the_segment_makes_the_recomputation_redraw(noisy_op) -> None:
    spec = "plain(op=noisy, depth=6, dropout=0.4, hidden=8)"
    ref_out, ref_grads, _ = _model_grads("store", spec)
    out, grads, draws = _model_grads("checkpoint(segments=3)", spec)
    assert draws > 0  # masks (and the op's noise) redrawn from the restored RNG state
    assert torch.equal(out, ref_out)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=k)


def test_a_random_op_under_reversible_is_refused_not_given_wrong_gradients(noisy_op) -> None:
    # reversible recomputes each group function in backward with no RNG replay: its noise would
    # be drawn again, different, and the gradients wrong (13.9 off before this was refused)
    spec = "rev(op=noisy, depth=2, groups=2, dropout=0.4, hidden=8)"
    with pytest.raises(RuntimeError, match="drew random numbers in training mode.*`checkpoint`"):
        _model_grads("reversible", spec)
    model = gnnspec.build(spec, IN, OUT, plan="reversible").double()
    x, edge_index = torch.randn(N, IN, dtype=torch.float64), torch.randint(0, N, (2, 60))
    assert model.eval()(x, edge_index).shape == (N, OUT)  # eval and no_grad run plainly
    with torch.no_grad():
        model.train()(x, edge_index)
    ref_out, ref_grads, _ = _model_grads("store", spec)
    out, grads, _ = _model_grads("checkpoint(segments=2)", spec)  # the suggested plan is exact
    assert torch.equal(out, ref_out)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=k)


def test_tape_bytes_are_one_bit_per_mask_element_of_the_checkpointed_segments() -> None:
    """After a forward of 6 steps in 3 segments, the live storage with dropout minus without is
    the two checkpointed segments' packed masks plus, for each dropout of the last (plain) segment,
    its saved noise and its output (without dropout the output is tanh's, which is kept anyway)."""
    d, steps, segments = 10, 6, 3

    def live_after_forward(p: float) -> int:
        layers = [nn.Linear(d, d).double() for _ in range(steps)]

        def step(layer):
            return lambda h: dropout(torch.tanh(layer(h)), p, True)

        x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
        tracker = LiveStorageTracker()
        tracker.track_existing([x, *(q for layer in layers for q in layer.parameters())])
        with tracker:
            out = run_segments([step(layer) for layer in layers], x, segments=segments, modules=layers)
            live = tracker.current_bytes
        out.sum().backward()
        return live

    last_segment = 2 * (2 * N * d * 8)
    tape = 4 * packed_bytes(N * d)
    assert live_after_forward(0.5) - live_after_forward(0.0) == last_segment + tape


@pytest.mark.parametrize("expr", ["plain(op=gcn, depth=8, norm=batch, dropout=0.5, hidden=32)",
                                  "gcnii(depth=8, dropout=0.3, hidden=32)"])
def test_estimate_counts_the_tape_to_the_byte(expr: str) -> None:
    """The step's peak is in the backward, while the earlier segments' tapes are held: 3 segments x
    2 layers x ceil(900 * 32 / 8) = 21,600 bytes that an estimate without the tape would miss."""
    from gnnspec.memory.estimate import estimate_spec
    from gnnspec.memory.measure import measure_step_peak

    nodes, fin, fout, plan = 900, 20, 7, "checkpoint(segments=4)"
    gen = torch.Generator().manual_seed(0)
    edge_index = torch.randint(0, nodes, (2, 6000), generator=gen)
    edge_index = torch.unique(edge_index[:, edge_index[0] != edge_index[1]], dim=1)  # as the estimate assumes
    torch.manual_seed(0)
    model = gnnspec.build(expr, fin, fout, plan=plan)
    x, y = torch.randn(nodes, fin), torch.randint(0, fout, (nodes,))
    measured = measure_step_peak(model, x, edge_index, y, torch.optim.Adam(model.parameters()))
    est = estimate_spec(expr, nodes=nodes, edges=edge_index.size(1), in_channels=fin, out_channels=fout, plan=plan)
    # store is 4 bytes low as well (one float32 scalar); the tape is 21,600
    assert abs(est.plans[0].peak_bytes - measured) <= 64, (est.plans[0].peak_bytes, measured)
