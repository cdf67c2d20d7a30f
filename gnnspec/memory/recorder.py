"""An allocation recorder: :class:`~gnnspec.memory.measure.LiveStorageTracker` that also logs events.

The calibration (:mod:`gnnspec.memory.calibrate`) runs small pieces of a training step under it, in
``FakeTensorMode`` (shapes and storages without data), and turns the log into the allocation
programs the analytic estimate replays. Every storage gets a serial id in order of registration;
an event is ``("a", uid, nbytes, shape, dtype, op)`` for a new storage (``shape``/``dtype`` of the
op output holding it), ``("f", uid, nbytes)`` when it is freed, ``("z", uid, change)`` when it is
resized, and ``("m", label, payload)`` for a marker the harness writes.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from gnnspec.memory.measure import LiveStorageTracker, _storages_of


class AllocationRecorder(LiveStorageTracker):
    """Live storage bytes with an event log (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []
        self._serial = 0
        self._op = "existing"

    # -- markers and lookups used by the harnesses

    def mark(self, label: str, payload: Any = None) -> None:
        self.events.append(("m", label, payload))

    def uid_of(self, tensor: Tensor) -> int | None:
        """The serial id of ``tensor``'s storage, or None when it is not registered."""
        for storage in _storages_of(tensor):
            entry = self._live.get(id(storage))
            if entry is not None:
                return entry[2]
        return None

    # -- LiveStorageTracker internals, with logging

    def track_existing(self, tensors) -> int:  # type: ignore[override]
        self._op = "existing"
        return super().track_existing(tensors)

    def __torch_dispatch__(self, func, _types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        self._op = str(func)
        input_storages: set[int] | None = None
        for tensor in tree_flatten(out)[0]:
            for storage in _storages_of(tensor):
                if id(storage) in self._live:
                    self._refresh(storage)
                    continue
                if input_storages is None:
                    inputs = tree_flatten((args, kwargs))[0]
                    input_storages = {id(s) for t in inputs for s in _storages_of(t)}
                if id(storage) not in input_storages:
                    self._register(storage, tensor)
        return out

    def _register(self, storage: torch.UntypedStorage, tensor: Tensor | None = None) -> int:  # type: ignore[override]
        key = id(storage)
        nbytes = storage.nbytes()
        uid = self._serial
        self._serial += 1
        self._live[key] = [nbytes, weakref.ref(storage, functools.partial(self._release, key)), uid]
        self._add(nbytes)
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else None
        dtype = str(tensor.dtype).replace("torch.", "") if isinstance(tensor, Tensor) else None
        if shape is not None and tensor is not None:
            numel = 1
            for d in shape:
                numel *= d
            if numel * tensor.element_size() != nbytes:
                shape = None
        self.events.append(("a", uid, nbytes, shape, dtype, self._op))
        return nbytes

    def _release(self, key: int, _ref: weakref.ref) -> None:  # type: ignore[override]
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current_bytes -= entry[0]
            self.events.append(("f", entry[2], entry[0]))

    def _refresh(self, storage: torch.UntypedStorage) -> None:  # type: ignore[override]
        entry = self._live.get(id(storage))
        if entry is not None and entry[0] != storage.nbytes():
            change = storage.nbytes() - entry[0]
            entry[0] = storage.nbytes()
            self._add(change)
            self.events.append(("z", entry[2], change))
