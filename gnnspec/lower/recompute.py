"""Side-effect-free recomputation, shared by every plan that runs a layer more than once.

Contract (SPEC.md section 3): a plan that recomputes a forward (checkpoint, reversible, the DEQ
solver's iterations) must compute the same function as the first forward and must not change
module state a second time. Two pieces of state matter:

* dropout masks: :class:`SharedDropout` draws one mask per forward of a stage
  (``draw``) and applies that same mask in every layer and in every recomputation;
* normalisation running statistics: :func:`preserved_running_stats` snapshots the running
  buffers of every batch/instance norm below a module and restores them on exit, so a
  recomputation in training mode uses batch statistics (the same values as the first forward)
  but leaves ``running_mean``, ``running_var`` and ``num_batches_tracked`` as they were;
* any other buffer a forward changes (``spectral_norm``'s power-iteration vectors, a user op's
  counter): the forward reads it, so its recomputation must start from the value the forward
  started from. :class:`BuffersBefore` copies such buffers before the forward and keeps the copies
  of those the forward changed; :func:`buffers_as_before` runs the recomputation on them and puts
  the current ones back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from gnnspec.lower.dropout_tape import draw_noise


def running_stat_buffers(modules: Iterable[nn.Module]) -> list[Tensor]:
    """The running buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) of every
    batch/instance norm below ``modules`` that tracks running statistics, each once."""
    return _running_stats_of(_submodules(modules))


def _running_stats_of(submodules: Iterable[nn.Module]) -> list[Tensor]:
    buffers: list[Tensor] = []
    seen: set[int] = set()
    for module in submodules:
        if isinstance(module, _NormBase) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buf is not None and id(buf) not in seen:
                    seen.add(id(buf))
                    buffers.append(buf)
    return buffers


@contextmanager
def preserved_running_stats(*modules: nn.Module) -> Iterator[None]:
    """Run a recomputation without a second update of normalisation running statistics.

    Costs one copy of each running buffer (O(channels)), independent of N, E and depth. Norms that
    replace their buffers instead of updating them in place are not covered (PyG's InstanceNorm
    with ``batch=``; gnnspec calls it without).
    """
    with preserved_buffers(running_stat_buffers(modules)):
        yield


@contextmanager
def preserved_buffers(buffers: Sequence[Tensor]) -> Iterator[None]:
    """:func:`preserved_running_stats` for buffers already found (:attr:`ModuleRecord.running_stats`):
    a caller that recomputes the same modules looks them up once, with the forward."""
    if not buffers:
        yield
        return
    saved = _copies(buffers)
    try:
        yield
    finally:
        _copy_back(buffers, saved)


def _copies(buffers: Sequence[Tensor]) -> list[Tensor]:
    return [b.detach().clone() for b in buffers]


def _copy_back(buffers: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    # Through `.data`, like batch norm's own update: the version counter stays as it is, so an
    # autograd graph recorded inside the block (which saved the running buffers) stays valid.
    for buf, value in zip(buffers, saved):
        buf.data.copy_(value)


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")

BufferSlot = tuple[nn.Module, str]


class BuffersBefore:
    """The values of ``slots``' buffers before one forward, for recomputing that forward.

    Made just before the forward (a copy of each buffer: O(buffer size), no buffer of gnnspec's
    own layers but GIN's one-element ``eps``); :meth:`settle` just after it keeps the copies of the
    buffers the forward changed (written in place, which bumps the version counter, or replaced in
    the module) and drops the rest. :attr:`changed` is what :func:`buffers_as_before` takes."""

    def __init__(self, slots: Sequence[BufferSlot]) -> None:
        # the buffer each module holds now (a forward may assign a new one); one copy of a buffer
        # that several modules hold
        copies: dict[int, Tensor] = {}
        self._taken = []
        for m, name in slots:
            b = m._buffers.get(name)
            if b is not None:
                before = copies.get(id(b))
                if before is None:
                    before = copies[id(b)] = b.detach().clone()
                self._taken.append((m, name, b, b._version, before))
        self.changed: list[tuple[nn.Module, str, Tensor]] = []

    def settle(self) -> "BuffersBefore":
        self.changed = [(m, name, before) for m, name, b, version, before in self._taken
                        if m._buffers.get(name) is not b or b._version != version]
        self._taken = []
        return self


@contextmanager
def buffers_as_before(changed: Sequence[tuple[nn.Module, str, Tensor]]) -> Iterator[None]:
    """Each module holding a copy of its buffer's value before the forward (:class:`BuffersBefore`)
    while the block (a recomputation of that forward) runs, and the buffer it holds now afterwards:
    the recomputation computes what the forward did (``spectral_norm`` starts its power iteration
    from the same vectors) and the buffers end as the forward left them, changed once. A fresh
    copy each time, as the recomputation may write into it (a ``retain_graph`` backward recomputes
    again)."""
    with _held(_fresh_buffers(changed)):
        yield


def _fresh_buffers(changed: Sequence[tuple[nn.Module, str, Tensor]]) -> list[tuple[dict[str, Any], str, Tensor]]:
    """:func:`buffers_as_before`'s assignments: a fresh copy of each value in its module's slot."""
    fresh: dict[int, Tensor] = {}  # a buffer several modules held stays one tensor
    for _, _, before in changed:
        if id(before) not in fresh:
            fresh[id(before)] = before.clone()
    return [(m._buffers, name, fresh[id(before)]) for m, name, before in changed]


@contextmanager
def _held(assignments: Iterable[tuple[dict[str, Any], str, Any]]) -> Iterator[None]:
    """Each ``slots[name] = value`` of ``assignments`` (a module's ``_parameters`` or ``_buffers``,
    each slot once) while the block runs, and what each slot held before afterwards."""
    assignments = list(assignments)
    if not assignments:
        yield
        return
    before = _assign(assignments)
    try:
        yield
    finally:
        _assign(before)


def _assign(assignments: Sequence[tuple[dict[str, Any], str, Any]]) -> list[tuple[dict[str, Any], str, Any]]:
    """Each ``slots[name] = value``; returns the assignments that undo them."""
    before = [(slots, name, slots.get(name)) for slots, name, _ in assignments]
    for slots, name, value in assignments:
        slots[name] = value
    return before


def refuse_second_order(plan: str) -> None:
    """A RuntimeError inside a backward run with ``create_graph=True``: ``plan``'s backward
    computes its gradients from a recomputation of its own, which records no graph for them, and
    would hand back gradients that cannot be differentiated again (second-order terms silently
    missing)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"second-order gradients (backward with create_graph=True) are not supported under the "
            f"`{plan}` plan, whose backward recomputes the stack without recording a graph; "
            f"use `store` or `checkpoint` for this stack"
        )


class ModuleRecord(NamedTuple):
    """What a recomputation of one forward of some modules needs to know about them, recorded
    just before that forward by one walk of their submodules (:func:`module_record`):

    * ``modes``: each submodule with its ``training`` flag (:func:`restored_training_modes`);
    * ``parameters``: each parameter with the ``(module, attribute)`` holding it
      (:func:`restored_parameters`, :class:`recomputed_as_recorded`);
    * ``running_stats``: the running buffers of the norms (:func:`preserved_buffers`);
    * ``stateful``: the ``(module, attribute)`` of every other buffer, which a forward may change
      (:class:`BuffersBefore`); a training-mode norm writes its running statistics without
      reading them, so those are not among them.
    """

    modes: tuple[tuple[nn.Module, bool], ...] = ()
    parameters: tuple[tuple[nn.Module, str, Tensor], ...] = ()
    running_stats: tuple[Tensor, ...] = ()
    stateful: tuple[BufferSlot, ...] = ()


def module_record(*modules: nn.Module) -> ModuleRecord:
    """The :class:`ModuleRecord` of ``modules`` (themselves included) now."""
    submodules = _submodules(modules)
    return ModuleRecord(
        modes=tuple((m, m.training) for m in submodules),
        parameters=tuple((m, name, p) for m in submodules for name, p in m._parameters.items() if p is not None),
        running_stats=tuple(_running_stats_of(submodules)),
        stateful=tuple((m, name) for m in submodules for name, b in m._buffers.items()
                       if b is not None and not (isinstance(m, _NormBase) and name in _RUNNING_STATS)),
    )


def _submodules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Every submodule of ``modules`` (themselves included), each once, by a walk over
    ``_modules`` (``Module.modules()`` builds a name for each: this runs on every forward of a
    checkpointed segment)."""
    seen: dict[int, nn.Module] = {}
    stack = list(modules)
    while stack:
        m = stack.pop()
        if id(m) not in seen:
            seen[id(m)] = m
            stack.extend(child for child in m._modules.values() if child is not None)
    return list(seen.values())


@contextmanager
def restored_parameters(slots: tuple[tuple[nn.Module, str, Tensor], ...]) -> Iterator[None]:
    """Each module holding the parameter recorded in ``slots`` while the block runs, and what it
    holds now afterwards: a forward run under ``torch.func.functional_call`` (which swaps its
    tensors in, and the module's own back on return) is recomputed with the tensors it used, so
    the gradients go to them (they had been zero, or taken at the module's own values)."""
    with _held((m._parameters, name, p) for m, name, p in slots if m._parameters.get(name) is not p):
        yield


def _leaf_aliases(slots: tuple[tuple[nn.Module, str, Tensor], ...]) -> dict[int, Tensor]:
    """``{id(parameter): alias}`` for the parameters recorded in ``slots``: detached aliases (the
    same storage and version counter, leaves with the parameter's ``requires_grad``, none of its
    hooks)."""
    aliases: dict[int, Tensor] = {}
    for _, _, p in slots:
        if id(p) not in aliases:
            aliases[id(p)] = p.detach().requires_grad_(p.requires_grad)
    return aliases


@contextmanager
def restored_training_modes(modes: tuple[tuple[nn.Module, bool], ...]) -> Iterator[None]:
    """Each module in the training mode recorded in ``modes`` while the block runs, and back in its
    current mode afterwards: a recomputation in backward computes what the forward computed even
    when the model was switched to ``eval()`` (or back) in between."""
    changed = _set_modes(modes)
    if not changed:
        yield
        return
    try:
        yield
    finally:
        _reset_modes(changed)


def _set_modes(modes: tuple[tuple[nn.Module, bool], ...]) -> list[tuple[nn.Module, bool]]:
    """Each module in its recorded training mode; returns the changed ones with their current mode."""
    changed = [(m, m.training) for m, recorded in modes if m.training != recorded]
    for m, current in changed:
        m.training = not current
    return changed


def _reset_modes(changed: list[tuple[nn.Module, bool]]) -> None:
    for m, current in changed:
        m.training = current


class recomputed_as_recorded:
    """A recomputation of the forward ``record`` was taken at, whose parameter gradients a plan
    takes itself (with respect to the aliases ``with`` gives) and hands to the engine as its own.
    While the block runs: the running buffers of the norms are preserved
    (:func:`preserved_buffers`), each module is in its recorded training mode
    (:func:`restored_training_modes`), holds a leaf alias of its recorded parameter
    (:func:`_leaf_aliases`) and the copy of its buffer's value before the forward
    (:func:`buffers_as_before` of ``changed``); afterwards all is as before the block, undone in
    reverse order.

    Gradients are taken with respect to the aliases so that a hook registered on a parameter
    (``Tensor.register_hook``) runs once, on the gradient the engine receives, as under ``store``
    (with respect to the parameters it had run once per recomputation as well, twice or more in
    all). Recorded parameters are the forward's, as :func:`restored_parameters` restores.

    One context object rather than four generator-based ones: the reversible stack's backward
    enters it ``depth * groups`` times a step, and the four cost ~12 us each time."""

    __slots__ = ("record", "changed", "_undo")

    def __init__(self, record: ModuleRecord, changed: Sequence[tuple[nn.Module, str, Tensor]]) -> None:
        self.record, self.changed = record, changed

    def __enter__(self) -> dict[int, Tensor]:
        record = self.record
        stats = _copies(record.running_stats)
        modes = _set_modes(record.modes)
        try:
            aliases = _leaf_aliases(record.parameters)
            parameters = _assign([(m._parameters, name, aliases[id(p)]) for m, name, p in record.parameters])
            try:
                buffers = _assign(_fresh_buffers(self.changed))
            except BaseException:
                _assign(parameters)
                raise
        except BaseException:
            _reset_modes(modes)
            raise
        self._undo = (stats, modes, parameters, buffers)
        return aliases

    def __exit__(self, *exc: object) -> None:
        stats, modes, parameters, buffers = self._undo
        self._undo = None
        try:
            _assign(buffers)
            _assign(parameters)
            _reset_modes(modes)
        finally:
            _copy_back(self.record.running_stats, stats)


class SharedDropout(nn.Module):
    """Dropout with one mask per forward of a stage, shared by all of the stage's layers.

    ``mask = draw(x)`` samples ``bernoulli(1 - p) / (1 - p)`` with the shape of ``x`` (RevGNN's
    shared dropout); ``apply(x, mask)`` returns ``x * mask``. In eval mode or with ``p == 0``
    ``draw`` returns ``None`` and ``apply`` is the identity. The mask is a plain tensor, so a
    plan that recomputes the stage passes the same mask again instead of drawing a new one.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def draw(self, x: Tensor) -> Tensor | None:
        if not self.training or self.p == 0.0:
            return None
        return draw_noise(x, 1.0 - self.p)

    @staticmethod
    def apply_mask(x: Tensor, mask: Tensor | None) -> Tensor:
        return x if mask is None else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
