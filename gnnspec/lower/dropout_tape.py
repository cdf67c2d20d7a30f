"""Dropout masks kept bit-packed between a checkpointed segment's forward and its recomputation.

Under ``checkpoint(segments=k)`` every segment but the last runs twice: once in the forward and once
in the backward. The plain way to get the same dropout masks the second time is to restore the RNG
state and draw them again (``preserve_rng_state=True``); on CPU that redraw is a Bernoulli sample
per element, about half of a no-grad forward of a GCN layer (measured at 5000 x 64). A
:class:`DropoutTape` instead keeps each mask the segment's forward draws, packed to one bit per
element, and the recomputation unpacks it (a table lookup, ~20x cheaper than the draw).

Contract of :func:`dropout` (what a stack layer calls instead of ``F.dropout``):

* with no tape active, in eval mode, with ``p == 0`` or on a non-CPU tensor it is ``F.dropout``;
* recording (a segment's forward) it computes exactly what ``F.dropout`` computes on CPU
  (``noise = empty_like(x).bernoulli_(1 - p); noise.div_(1 - p); x * noise``, the same draws
  from the default generator) and keeps ``ceil(numel / 8)`` bytes of mask;
* replaying (each recomputation of the segment) the ``i``-th call returns the ``i``-th recorded
  result's recomputation, ``x * noise`` with the recorded noise, bit for bit, and draws nothing.

:func:`dropout_noise` hands out the noise itself, recorded and replayed the same way, for a layer
that applies it in a fused function (``gnnspec.lower.layers.relu_of_dropout``).

The replay skips the draws, so it is only used when the recorded draws were the only use of the
CPU generator inside the segment (checked by comparing generator states around each draw): a
segment with any other random op (a user op's own dropout, say) replays nothing and redraws every
mask from the restored RNG state, as plain checkpointing does. Memory: the tape holds
``sum(ceil(numel / 8))`` bytes per checkpointed segment, from its forward until the segment's
backward has run (the estimator counts it).
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

__all__ = ["DropoutTape", "draw_noise", "dropout", "dropout_noise", "noise_scale", "pack_bits", "unpack_bits", "packed_bytes"]

# (b0 + b1 * 2**8 + ... + b7 * 2**56) * MAGIC puts b_k at bit 63 - k of the (wrapped) product,
# for bytes b_k in {0, 1}: eight mask elements become the product's most significant byte.
_MAGIC = 0x8040201008040201 - (1 << 64)
_TOP_BYTE = 7 if sys.byteorder == "little" else 0
_local = threading.local()


def packed_bytes(numel: int) -> int:
    """Bytes of one packed mask of ``numel`` elements."""
    return -(-numel // 8)


def pack_bits(mask: Tensor) -> Tensor:
    """A ``uint8`` tensor of ``ceil(numel / 8)`` bytes: element ``8 j + k`` of the flattened
    ``mask != 0`` is bit ``7 - k`` of byte ``j`` (``numpy.packbits``' order).

    Allocates a bool copy of ``mask`` (none for a bool mask), then the result; on a real CPU tensor
    numpy packs (4x faster than torch's ops here), on a fake one (dry run, calibration) the same
    tensors are allocated and nothing is computed, so both allocate alike."""
    keep = mask.reshape(-1).to(torch.bool)  # == ne(0), and ~8x faster on CPU floats
    packed = torch.empty(packed_bytes(keep.numel()), dtype=torch.uint8, device=keep.device)
    if _has_numpy_data(keep):
        packed.numpy()[:] = np.packbits(keep.numpy())
    elif not is_fake(keep):
        _pack_bits_with_torch(keep, packed)
    return packed


def _pack_bits_with_torch(keep: Tensor, packed: Tensor) -> None:
    # Off the CPU (the tape itself only records on the CPU; here for completeness).
    tail = keep.numel() % 8
    if tail:
        keep = torch.cat([keep, keep.new_zeros(8 - tail)])
    words = keep.view(torch.uint8).view(torch.int64) * _MAGIC
    packed.copy_(words.view(torch.uint8).view(-1, 8)[:, _TOP_BYTE])


def unpack_bits(packed: Tensor, numel: int, dtype: torch.dtype, scale: float) -> Tensor:
    """The flat ``[numel]`` tensor ``bits / scale`` of :func:`pack_bits`' bits, in ``dtype``: rows
    of a 256 x 8 table, gathered by numpy on a real CPU tensor (2x faster than ``index_select``);
    allocates the result alone (the table is cached; a fake ``packed`` gets the result's storage
    and no table: nothing is gathered)."""
    out = torch.empty(packed.numel(), 8, dtype=dtype, device=packed.device)
    if _has_numpy_data(packed):
        # as same-width integers: numpy has no bfloat16, and a gather only moves bits
        as_int = _SAME_WIDTH_INT[dtype.itemsize]
        table = _byte_table(dtype, scale, packed.device)
        np.take(table.view(as_int).numpy(), packed.numpy(), axis=0, out=out.view(as_int).numpy(), mode="wrap")
    elif not is_fake(packed):
        torch.index_select(_byte_table(dtype, scale, packed.device), 0, packed.to(torch.int32), out=out)
    return out.view(-1)[:numel]


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _has_numpy_data(t: Tensor) -> bool:
    """Whether ``t.numpy()`` shares ``t``'s data: a plain CPU tensor (under a tracker's dispatch
    mode too), not a fake, meta or device one."""
    return type(t) is Tensor and t.device.type == "cpu" and not t.requires_grad


def fake_tensors_active() -> bool:
    """Whether a ``FakeTensorMode`` is on the dispatch mode stack (the dry run, the calibration),
    under whatever other modes (a recorder) are above it."""
    return any(isinstance(mode, FakeTensorMode) for mode in _get_current_dispatch_mode_stack())


def _constant_tensor(make: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``make(*key)``, a tensor no caller writes to, kept per key (64 most recent) and handed out
    again (made outside inference mode, so it can be saved for backward, and outside dispatch
    modes, so a memory tracker sees it as a training process does: made once, before the step);
    under fake tensors (dry run, calibration) made afresh, so no fake one outlives its mode."""
    cached = functools.lru_cache(maxsize=64)(make)

    @functools.wraps(make)
    def get(*key: Any) -> Tensor:
        if fake_tensors_active():
            return make(*key)
        # An inference tensor, once cached, could never again be saved for a backward (every later
        # training step would fail); one made under a tracker had been made again on every call,
        # its temporaries in the measured peak (-58% beside the estimate on a 30-node graph).
        with no_dispatch(), torch.inference_mode(False):
            return cached(*key)

    get.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return get


@_constant_tensor
def noise_scale(dtype: torch.dtype, device: torch.device, keep: float) -> Tensor:
    """The nonzero value of a dropout noise, ``1 / keep``, as a 0-dim tensor of ``dtype``: divided
    as ``F.dropout`` divides, so a product with it rounds as the product with the noise does."""
    return torch.ones((), dtype=dtype, device=device).div_(keep)


@_constant_tensor
def _byte_table(dtype: torch.dtype, scale: float, device: torch.device) -> Tensor:
    """Row ``b`` (256 x 8): the bits of byte ``b``, most significant first, as ``bits / scale``."""
    shifts = torch.arange(7, -1, -1, device=device)
    table = (torch.arange(256, device=device).unsqueeze(1) >> shifts) & 1
    # the same division F.dropout makes: 0/1 values of dtype divided by (1 - p)
    return table.to(dtype).div_(scale)


def _generator_state() -> bytes:
    # Outside any dispatch mode: this also runs under FakeTensorMode (dry run, calibration), which
    # refuses ops on the real tensor the generator hands out.
    with no_dispatch():
        return torch.get_rng_state().numpy().tobytes()


class DropoutTape:
    """The dropout masks of one checkpointed segment, recorded in its forward, replayed in its
    recomputations (any number of them: a ``retain_graph`` backward recomputes again)."""

    def __init__(self) -> None:
        self.masks: list[tuple[Tensor, float]] = []
        self.valid = True
        self.replay = False
        self._cursor = 0
        self._state: bytes | None = None

    # -- the two contexts a checkpoint uses (each re-enterable)

    def recording(self) -> "_Active":
        return _Active(self, replay=False)

    def replaying(self) -> "_Active":
        return _Active(self, replay=True)

    def _start(self, replay: bool) -> None:
        self.replay = replay
        self._cursor = 0
        if not replay:
            self.masks.clear()
            self.valid = True
            self._state = _generator_state()

    def _stop(self) -> None:
        if not self.replay and self.valid and _generator_state() != self._state:
            self.valid = False  # something after the last mask drew random numbers
        if not self.valid:
            self.masks.clear()

    # -- one dropout call

    def noise(self, x: Tensor, p: float) -> Tensor:
        """The noise ``F.dropout(x, p, True)`` multiplies ``x`` by on CPU (zeros and
        ``1 / (1 - p)``): drawn and recorded, or replayed, or drawn plainly where the tape is not
        valid (the same draws from the restored RNG state)."""
        keep = 1.0 - p
        if self.replay:
            if not self.valid:
                return draw_noise(x, keep)
            packed, scale = self.masks[self._cursor]
            self._cursor += 1
            return unpack_bits(packed, x.numel(), x.dtype, scale).view(x.shape)
        if not self.valid or not x.is_contiguous() or x.numel() == 0:
            self.valid = False
            return draw_noise(x, keep)
        if _generator_state() != self._state:
            self.valid = False  # a random op other than ours ran before this mask
            return draw_noise(x, keep)
        noise = torch.empty_like(x).bernoulli_(keep)
        self._state = _generator_state()
        self.masks.append((pack_bits(noise), keep))
        return noise.div_(keep)

    def dropout(self, x: Tensor, p: float) -> Tensor:
        return x * self.noise(x, p)


def draw_noise(x: Tensor, keep: float) -> Tensor:
    """``bernoulli(keep) / keep`` shaped like ``x``: on CPU the draws and values of ``F.dropout``
    (``noise = empty_like(x).bernoulli_(keep); noise.div_(keep)``)."""
    return torch.empty_like(x).bernoulli_(keep).div_(keep)


class _Active:
    """Makes ``tape`` the one :func:`dropout` uses while the block runs (re-enterable, nests)."""

    def __init__(self, tape: DropoutTape, replay: bool) -> None:
        self.tape, self.replay = tape, replay
        self._previous: list[Any] = []

    def __enter__(self) -> DropoutTape:
        self._previous.append(getattr(_local, "tape", None))
        _local.tape = self.tape
        self.tape._start(self.replay)
        return self.tape

    def __exit__(self, *exc: Any) -> None:
        try:
            self.tape._stop()
        finally:
            _local.tape = self._previous.pop()


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``, recorded on or replayed from the active tape (see module)."""
    tape: DropoutTape | None = getattr(_local, "tape", None)
    if tape is None or not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return tape.dropout(x, p)


def dropout_noise(x: Tensor, p: float) -> Tensor:
    """The noise of a training-mode ``dropout(x, p)`` (zeros and ``1 / (1 - p)``), recorded on or
    replayed from the active tape; without one (or off the CPU) drawn as :func:`draw_noise`."""
    tape: DropoutTape | None = getattr(_local, "tape", None)
    if tape is None or x.device.type != "cpu":
        return draw_noise(x, 1.0 - p)
    return tape.noise(x, p)
