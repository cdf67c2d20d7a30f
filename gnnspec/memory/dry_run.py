"""Dry run: one training step at full size under fake tensors, peak of live storage bytes.

An independent check of the analytic estimate (``gnnspec estimate-mem --dry-run``): the model is
built and stepped exactly as :func:`gnnspec.memory.measure.measure_step_peak` does (SPEC.md
section 5: a warm-up step, then ``zero_grad(set_to_none)``, forward, cross-entropy, backward,
optimizer step), but inside ``FakeTensorMode``: every tensor has a shape, a dtype and a storage
size and no data, so nothing is allocated and any graph size costs the same time. The peak is
taken with the same :class:`~gnnspec.memory.measure.LiveStorageTracker`.

Where the real step depends on data, the dry run decides:

* the prepared graph (self-loops, normalisation) has ``E + N`` columns per edge-index form and
  ``E + N`` (``gcn_csr``) or ``E`` (``mean_csr``) entries per CSR matrix, as for a graph without
  self-loops (what the estimate assumes; :meth:`gnnspec.ops.PreparedGraph.placeholder`);
* a ``deq`` solver never converges but improves at every iteration: every solve runs
  ``max_iter`` iterations (the estimate's worst case). ``broyden`` branches on data and is not
  supported;
* the optimizers' step counters read as 1.

Its cost is Python time per operation: about 10-30 ms per layer of forward and backward, so a
1001-layer RevGNN takes tens of seconds; tests use the corpus at reduced depth or size.
"""

from __future__ import annotations

import contextlib
import itertools
import gc
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gnnspec import ir
from gnnspec.memory.measure import LiveStorageTracker, step_state_tensors, training_step

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DryRun:
    peak_bytes: int
    baseline_bytes: int
    seconds: float
    plans: tuple[str, ...]


@contextlib.contextmanager
def _patched_for_fake_tensors():
    import torch.optim.optimizer as optimizer_module

    import gnnspec.lower.deq as deq

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj, name, value):
        if hasattr(obj, name):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    def get_value(x):
        return 1.0 if isinstance(x, torch.Tensor) else x

    patch(optimizer_module, "_get_value", get_value)
    for mod_name in ("adam", "adamw", "sgd"):
        mod = getattr(torch.optim, mod_name, None)
        if mod is not None:
            patch(mod, "_get_value", get_value)
    # a residual that improves every iteration and never reaches any tolerance: every solve runs
    # max_iter iterations and keeps a new best iterate each time, as a slowly converging solve does
    calls = itertools.count(1)
    patch(deq, "_relative_residual", lambda gz, z: 1.0 + 1.0 / next(calls))
    patch(deq, "_usable_denominator", lambda denom: True)  # every Broyden step updates its history
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def dry_run(spec: ir.Spec | str, nodes: int, edges: int, plan: ir.Plan | str | Sequence[Any] | None = None, *,
            in_channels: int | None = None, out_channels: int | None = None, dtype: str | None = None,
            optimizer: str | None = None) -> DryRun:
    """Peak live storage bytes of one training step of ``spec`` on a graph of ``nodes``/``edges``
    under ``plan`` (a plan, its text, one per resolved stage, or None for the spec's), replayed
    under fake tensors: nothing is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import gnnspec
    from gnnspec.lower.model import build_model
    from gnnspec.lower.widths import declared_widths
    from gnnspec.ops import PreparedGraph
    from gnnspec.syntax import parse_plan

    if isinstance(spec, str):
        spec = gnnspec.parse(spec)
    if dtype is not None:
        spec = spec.model_copy(update={"dtype": dtype})
    if isinstance(plan, str):
        plan = parse_plan(plan)
    elif isinstance(plan, (list, tuple)):
        plan = [parse_plan(p) if isinstance(p, str) else p for p in plan]
    in_channels, out_channels = declared_widths(spec, in_channels, out_channels)
    torch_dtype = DTYPES[spec.dtype]
    start = time.perf_counter()
    before = torch.get_default_dtype()
    with _patched_for_fake_tensors(), FakeTensorMode():
        torch.set_default_dtype(torch_dtype)
        try:
            model = build_model(spec, in_channels, out_channels, plan)
        finally:
            torch.set_default_dtype(before)
        n, e = int(nodes), int(edges)
        width = model.resolved[0].in_width
        x = torch.empty(n, width, dtype=torch_dtype)
        edge_index = torch.empty(2, e, dtype=torch.long)
        y = torch.empty(n, dtype=torch.long)
        cache = model.graph_cache
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache._key = cache._key_of(edge_index, n, torch_dtype)
        cache._graph = PreparedGraph.placeholder(edge_index, n, model.forms, torch_dtype)
        opt = model.make_optimizer(spec.train, optimizer)

        def step() -> None:
            training_step(model, opt, x, edge_index, y)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()
            opt.zero_grad(set_to_none=True)
            gc.collect()
            tracker = LiveStorageTracker()
            tracker.track_existing(step_state_tensors(model, opt, x, edge_index, y))
            with tracker:
                step()
    return DryRun(tracker.peak_bytes, tracker.baseline_bytes, time.perf_counter() - start, model.plans)
