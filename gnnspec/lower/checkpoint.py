"""The ``checkpoint(segments=k)`` plan: segment-wise activation recomputation of a stack.

A stack of ``L`` steps ``state = step_i(state, *args)`` is cut into ``k`` contiguous segments of
near-equal length (``k`` clamped to ``[1, L]``; the first ``L mod k`` segments get one extra step).
Each segment runs under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), so the forward
keeps only the ``k`` segment inputs (the last segment runs plainly: its activations are needed as soon
as backward starts) and the backward recomputes one segment at a time: the peak
holds ``k`` segment inputs plus one segment's activations, at the price of one extra forward of the
stack (SPEC.md section 4).

Contract (SPEC.md section 3): outputs and gradients equal those of running the steps plainly
(the ``store`` plan) on the same seed, and module state changes exactly as in one plain forward:

* dropout masks drawn inside a step (through :func:`gnnspec.lower.dropout_tape.dropout`) are kept
  bit-packed on the segment's :class:`~gnnspec.lower.dropout_tape.DropoutTape` (``ceil(numel / 8)``
  bytes each, on CPU) and the recomputation applies them again without drawing; where the tape
  cannot replay (another random op in the segment, device tensors), the CPU and device RNG states
  saved before each segment are restored before it is recomputed (``preserve_rng_state=True``)
  and the masks are drawn again; masks passed in ``args`` (:class:`SharedDropout`) are reused as is;
* normalisation running statistics are updated once per step: torch's checkpoint alone runs a
  batch norm's forward twice in training mode and so updates ``running_mean``/``running_var``
  twice; here the recomputation runs inside :func:`~gnnspec.lower.recompute.preserved_buffers` of
  the running statistics of that segment's modules, which undoes the second update;
* any other buffer the segment's forward changes (``spectral_norm``'s vectors, a user op's
  counter) is recomputed from the value it had before the forward and ends as the forward left it
  (:class:`~gnnspec.lower.recompute.BuffersBefore`; torch's checkpoint alone recomputes from the
  changed value, and so computes another function than the forward's, and changes it again).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gnnspec.lower.dropout_tape import DropoutTape
from gnnspec.lower.recompute import (
    BuffersBefore, buffers_as_before, module_record, preserved_buffers, restored_parameters, restored_training_modes,
)

State = Union[Tensor, tuple[Tensor, ...]]
Step = Callable[..., State]

__all__ = ["State", "run_segments", "segment_bounds", "segment_runs"]


def segment_runs(num_steps: int, segments: int) -> list[tuple[int, int, int]]:
    """:func:`segment_bounds` as runs of equal segments, ``(start, length, count)``: at most two
    runs (the longer segments first), so any depth is described in constant space."""
    if num_steps <= 0:
        return []
    k = min(max(int(segments), 1), num_steps)
    base, extra = divmod(num_steps, k)
    runs = [(0, base + 1, extra)] if extra else []
    return runs + [(extra * (base + 1), base, k - extra)]


def segment_bounds(num_steps: int, segments: int) -> list[tuple[int, int]]:
    """Half-open ``(start, stop)`` index ranges of ``segments`` contiguous near-equal segments.

    ``segments`` is clamped to ``[1, num_steps]``; segment lengths differ by at most one, the
    longer ones first, so the longest segment has ``ceil(num_steps / segments)`` steps.
    """
    return [(start + i * length, start + (i + 1) * length)
            for start, length, count in segment_runs(num_steps, segments) for i in range(count)]


def _run_plainly(steps: Sequence[Step], state: State, args: tuple[Any, ...]) -> State:
    for step in steps:
        state = step(state, *args)
    return state


def _checkpointed_segment(
    steps: Sequence[Step], modules: Sequence[nn.Module], state: State, args: tuple[Any, ...]
) -> State:
    # checkpoint() takes a flat argument list, so a tuple state travels unpacked beside ``args``
    # and is re-packed inside; the segment's output keeps the caller's state structure.
    is_tuple = isinstance(state, tuple)
    width = len(state) if is_tuple else 1
    flat = (*state, *args) if is_tuple else (state, *args)

    def segment(*inputs: Any) -> State:
        inner: State = tuple(inputs[:width]) if is_tuple else inputs[0]
        return _run_plainly(steps, inner, tuple(inputs[width:]))

    tape = DropoutTape()

    def contexts() -> tuple[Any, Any]:
        recomputation = _Recomputation(tape, modules)
        return _Forward(tape, recomputation.buffers), recomputation

    return checkpoint(
        segment, *flat, use_reentrant=False, preserve_rng_state=True, context_fn=contexts
    )


class _Forward:
    """The context of a segment's forward: its dropout masks recorded on ``tape``, and ``buffers``
    (taken just before) settled when it ends."""

    def __init__(self, tape: DropoutTape, buffers: BuffersBefore) -> None:
        self.recording, self.buffers = tape.recording(), buffers

    def __enter__(self) -> None:
        self.recording.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.recording.__exit__(*exc)
        finally:
            self.buffers.settle()


class _Recomputation:
    """The context of a segment's recomputation: its modules in the training modes and holding the
    parameters of the forward (recorded with the segment's forward: the model may be put in
    ``eval()`` before backward, a forward under ``torch.func.functional_call`` used other
    tensors) and the buffers the forward started from, its dropout masks replayed from ``tape``,
    its modules' running statistics and changed buffers restored afterwards. Made just before the
    forward; re-enterable: a ``retain_graph`` backward recomputes the segment again with the same
    object."""

    def __init__(self, tape: DropoutTape, modules: Sequence[nn.Module]) -> None:
        self.tape = tape
        self.record = module_record(*modules)
        self.buffers = BuffersBefore(self.record.stateful)
        self._stack: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(restored_training_modes(self.record.modes))
        stack.enter_context(restored_parameters(self.record.parameters))
        stack.enter_context(buffers_as_before(self.buffers.changed))
        stack.enter_context(self.tape.replaying())
        stack.enter_context(preserved_buffers(self.record.running_stats))
        self._stack.append(stack)

    def __exit__(self, *exc: Any) -> None:
        self._stack.pop().__exit__(*exc)


def run_segments(
    steps: Sequence[Step],
    state: State,
    *args: Any,
    segments: int,
    modules: Sequence[nn.Module],
) -> State:
    """Run ``state = steps[i](state, *args)`` for every step, checkpointed in ``segments`` parts.

    ``steps[i]`` is one whole block (norm, activation, dropout and conv together) and
    ``modules[i]`` is the module that owns its parameters and buffers (the same module may appear
    for several steps when weights are tied); ``len(modules) == len(steps)``. ``state`` is a
    tensor or a tuple of tensors (e.g. ``(x, x0)`` for an initial-residual stack) and every step
    returns the same structure. ``args`` are passed unchanged to every step (``edge_index`` or a
    prepared graph, a shared dropout mask or ``None``); they receive no gradient.

    In training mode with grad enabled, the result, every parameter gradient and the gradient of
    ``state`` equal those of the plain loop, and running statistics are updated once per step.
    When no module is in training mode or grad is disabled, there is no backward to save memory
    for, and the steps run plainly.
    """
    if len(modules) != len(steps):
        raise ValueError(
            f"run_segments needs one module per step, got {len(steps)} steps and "
            f"{len(modules)} modules"
        )
    if not steps:
        return state
    training = any(module.training for module in modules)
    if not (training and torch.is_grad_enabled()):
        return _run_plainly(steps, state, args)
    bounds = segment_bounds(len(steps), segments)
    for start, stop in bounds[:-1]:
        state = _checkpointed_segment(steps[start:stop], modules[start:stop], state, args)
    # The last segment's activations are needed as soon as backward starts: recomputing them
    # would cost a forward of the segment and save nothing (as checkpoint_sequential does).
    start, stop = bounds[-1]
    return _run_plainly(steps[start:stop], state, args)
