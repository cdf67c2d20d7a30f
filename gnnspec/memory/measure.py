"""Measured peak memory of one training step (SPEC.md section 5).

On CPU the measure is the peak of live tensor storage bytes, tracked op by op with
:class:`LiveStorageTracker`; on CUDA it is the caching allocator's ``max_memory_allocated``.
"""

from __future__ import annotations

import functools
import gc
import types
import weakref
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class LiveStorageTracker(TorchDispatchMode):
    """Bytes of live tensor storages, followed op by op while the mode is active.

    Every op output's untyped storage is registered once (views share their base's storage and
    count once) and counts its ``nbytes`` until the storage is freed. ``UntypedStorage.resize_``
    is not an op, so it is patched while the mode is active: a storage shrunk to 0 or grown
    changes the count. Ops run by autograd during ``backward()`` on the calling thread are seen
    too. Storages that exist before entry count only once registered with :meth:`track_existing`;
    an op writing into or viewing an unregistered older storage adds nothing.

    * ``current_bytes``: bytes of registered storages alive now.
    * ``peak_bytes``: the largest ``current_bytes`` seen (baseline included).
    * ``baseline_bytes``: bytes registered by :meth:`track_existing`.

    Allocations made inside a single kernel and freed before it returns are not visible.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.baseline_bytes = 0
        # id(storage) -> [nbytes, weakref]; the weakref's callback drops the entry when the
        # storage is freed, so an id is never reused while its entry exists.
        self._live: dict[int, list[Any]] = {}
        self._patched_resize: list[Callable[..., Any]] = []

    def track_existing(self, tensors: Iterable[Tensor]) -> int:
        """Register the storages of ``tensors`` (alive before entry) as baseline; returns the
        bytes added (storages already registered count once)."""
        added = 0
        for t in tensors:
            for storage in _storages_of(t):
                if id(storage) not in self._live:
                    added += self._register(storage)
        self.baseline_bytes += added
        return added

    def __enter__(self) -> "LiveStorageTracker":
        original = torch.UntypedStorage.resize_
        tracker = self

        @functools.wraps(original)
        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = original(storage, size)
            tracker._refresh(storage)
            return result

        self._patched_resize.append(original)
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        try:
            return super().__enter__()
        except BaseException:
            torch.UntypedStorage.resize_ = self._patched_resize.pop()  # type: ignore[method-assign]
            raise

    def __exit__(self, *exc: Any) -> Any:
        torch.UntypedStorage.resize_ = self._patched_resize.pop()  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, _types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        input_storages: set[int] | None = None
        for storage in (s for t in tree_flatten(out)[0] for s in _storages_of(t)):
            if id(storage) in self._live:
                self._refresh(storage)  # an op may have resized it (resize_, out= variants)
                continue
            if input_storages is None:
                inputs = tree_flatten((args, kwargs))[0]
                input_storages = {id(s) for t in inputs for s in _storages_of(t)}
            # An unregistered storage that came in as an input is older than the tracker.
            if id(storage) not in input_storages:
                self._register(storage)
        return out

    def _register(self, storage: torch.UntypedStorage) -> int:
        key = id(storage)
        nbytes = storage.nbytes()
        self._live[key] = [nbytes, weakref.ref(storage, functools.partial(self._release, key))]
        self._add(nbytes)
        return nbytes

    def _release(self, key: int, _ref: weakref.ref) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current_bytes -= entry[0]

    def _refresh(self, storage: torch.UntypedStorage) -> None:
        entry = self._live.get(id(storage))
        if entry is not None and entry[0] != storage.nbytes():
            change = storage.nbytes() - entry[0]
            entry[0] = storage.nbytes()
            self._add(change)

    def _add(self, nbytes: int) -> None:
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)


def _storages_of(obj: Any) -> list[torch.UntypedStorage]:
    """The storages holding ``obj``'s data: its own, or for a wrapper subclass (torch-geometric's
    ``EdgeIndex``) those of its inner tensors, since the wrapper's own storage is a placeholder."""
    if not isinstance(obj, Tensor) or obj.device.type == "meta":
        return []
    if is_traceable_wrapper_subclass(obj):
        names, _ = obj.__tensor_flatten__()
        return [s for name in names for s in _storages_of(getattr(obj, name))]
    try:
        return [obj.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less layouts
        return []


# Objects whose references lead out of the training state into the interpreter at large.
_OPAQUE_TYPES = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.FrameType,
)


def step_state_tensors(*roots: Any) -> list[Tensor]:
    """Every tensor reachable through Python references from ``roots`` (a model, an optimizer,
    the graph data), one per storage.

    Parameters and buffers are not all a model keeps across steps: layers cache tensors in
    plain attributes (``GCNConv(cached=True)`` keeps the normalised adjacency), optimizers keep
    per-parameter state in dicts, and a tensor may hang off another tensor's ``__dict__``. SPEC
    section 5 counts all of it as input data, and no module API enumerates it, so it is found
    the way the garbage collector sees it (``gc.get_referents``). Walking from the step's own
    roots, rather than taking every tensor in ``gc.get_objects()``, leaves out tensors the
    process holds for other reasons (other models, test fixtures), which are not this step's
    memory. Functions, classes and modules are not entered: through their globals every object
    in the interpreter would be reachable.
    """
    seen: set[int] = set()
    storages: set[int] = set()
    tensors: list[Tensor] = []
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE_TYPES):
            continue
        seen.add(id(obj))
        new = [id(s) for s in _storages_of(obj) if id(s) not in storages]
        if new:
            storages.update(new)
            tensors.append(obj)
        stack.extend(gc.get_referents(obj))
    return tensors


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, edge_index: Tensor, y: Tensor,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> None:
    """The training step of SPEC.md section 5, the one estimated and measured::

        model.train(); optimizer.zero_grad(set_to_none=True)
        out = model(x, edge_index); loss = loss_fn(out, y); loss.backward(); optimizer.step()
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(x, edge_index)
    loss = loss_fn(out, y)
    loss.backward()
    optimizer.step()


def measure_step_peak(
    model: nn.Module,
    x: Tensor,
    edge_index: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    warmup: int = 1,
) -> int:
    """Peak bytes of live tensor memory during one training step in steady state (SPEC section 5).

    Runs ``warmup`` untracked steps, then one tracked step::

        model.train(); optimizer.zero_grad(set_to_none=True)
        out = model(x, edge_index); loss = loss_fn(out, y); loss.backward(); optimizer.step()

    The peak includes everything alive at the start of the step: parameters, optimizer state,
    ``x``, ``edge_index``, ``y``, buffers and whatever the model caches across steps. On CPU it is
    the peak of live storage bytes (:class:`LiveStorageTracker`); on CUDA (``x.is_cuda``) it is
    ``torch.cuda.max_memory_allocated`` over the step.
    """

    def step() -> None:
        training_step(model, optimizer, x, edge_index, y, loss_fn)

    for _ in range(warmup):
        step()
    # The last step's gradients are freed first thing in the step, before anything is allocated,
    # so freeing them before the measurement starts cannot change the peak.
    optimizer.zero_grad(set_to_none=True)
    return peak_of_step(step, model, optimizer, x, edge_index, y)


def peak_of_step(step: Callable[[], None], *roots: Any) -> int:
    """Peak live tensor bytes while ``step()`` runs once, counting every tensor reachable from
    ``roots`` at the start (:func:`step_state_tensors`). CUDA when any root tensor is on CUDA
    (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), else CPU storage."""
    gc.collect()
    cuda = next((r.device for r in roots if isinstance(r, Tensor) and r.is_cuda), None)
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        step()
        torch.cuda.synchronize(cuda)
        return torch.cuda.max_memory_allocated(cuda)

    tracker = LiveStorageTracker()
    tracker.track_existing(step_state_tensors(*roots))
    with tracker:
        step()
    return tracker.peak_bytes
