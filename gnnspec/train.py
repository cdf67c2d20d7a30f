"""Full-batch node classification: a spec and a graph in, a trained model and its scores out.

``train(spec, data)`` builds the model (``gnnspec.build``), optimises it with the spec's `train:`
settings (optimizer, learning rate, weight decay as per-stage parameter groups, epochs, patience,
loss, seed) and reports the test accuracy at the epoch of best validation accuracy, as the
Planetoid papers do. The peak memory of one training step in steady state (the second epoch's
step, SPEC.md section 5) is measured on the way.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnnspec import ir
from gnnspec.data import GraphData
from gnnspec.memory.measure import peak_of_step


@dataclass
class EpochReport:
    epoch: int
    loss: float
    val_acc: float
    test_acc: float
    seconds: float


@dataclass
class TrainResult:
    """What `gnnspec train --json` prints (SPEC.md section 6), plus the per-epoch history."""

    spec: str
    data: str
    plan: str
    epochs: int
    best_epoch: int
    val_acc: float
    test_acc: float
    seconds: float
    peak_bytes: int | None
    history: list[EpochReport] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("history")
        return data


def make_optimizer(model: nn.Module, settings: ir.Train) -> torch.optim.Optimizer:
    """The spec's optimizer over the model's parameter groups (per-stage ``weight_decay``)."""
    return model.make_optimizer(settings)


def loss_function(settings: ir.Train, data: GraphData) -> Callable[[Tensor, Tensor], Tensor]:
    """``ce``: cross-entropy on class labels; ``bce``: binary cross-entropy with logits on
    multi-label targets (or one-hot class labels); ``mse``: squared error to one-hot labels."""
    classes = data.num_classes

    def targets(y: Tensor) -> Tensor:
        return y.float() if y.dim() == 2 else F.one_hot(y, classes).float()

    if settings.loss == "ce":
        return F.cross_entropy
    if settings.loss == "bce":
        return lambda out, y: F.binary_cross_entropy_with_logits(out, targets(y))
    return lambda out, y: F.mse_loss(out, targets(y))


def accuracy(out: Tensor, y: Tensor, mask: Tensor) -> float:
    """Fraction of correctly classified nodes in ``mask`` (multi-label: of correct label bits)."""
    if int(mask.sum()) == 0:
        return float("nan")
    # counts divided in Python: a float32 mean printed as 0.12200000137090683 in --json
    if y.dim() == 2:
        correct = (out[mask] > 0) == (y[mask] > 0.5)
    else:
        correct = out[mask].argmax(dim=-1) == y[mask]
    return int(correct.sum()) / correct.numel()


def plan_label(model: nn.Module, requested: Any, spec: ir.Spec, budget: int | str | None = None) -> str:
    """The plan ``compile`` and ``train`` report: the requested plan's text (else the spec's), and
    for ``auto`` what the planner chose, one plan per stack as ``--plan`` takes them
    (``"auto(budget=1GB) -> checkpoint(segments=8), reversible"``; a bare ``auto`` given a
    ``budget`` (bytes, or a size as ``build`` takes it) reads as ``auto(budget=...)``); a request given as plans or an
    ``Estimate`` reads as the stacks' plans."""
    from gnnspec.format import format_node, format_size
    from gnnspec.memory.estimate import parse_size

    stacks = [s.plan_text for r, s in zip(model.resolved, model.stages) if isinstance(r.stage, ir.Stack)]
    chosen = ", ".join(stacks) or "store"
    if requested is not None and not isinstance(requested, str):
        return chosen
    label = (requested or "").strip() or format_node(spec.plan)  # a --plan text may be padded
    if label == "auto" and budget is not None:
        label = f"auto(budget={format_size(parse_size(budget))})"
    return f"{label} -> {chosen}" if label.startswith("auto") else label


class TrainingDiverged(RuntimeError):
    """The loss or the model's outputs stopped being finite: the accuracies that follow would be
    those of NaN outputs (a run had reported chance accuracy, exit 0)."""

    def __init__(self, epoch: int, loss: float, settings: ir.Train, dtype: torch.dtype) -> None:
        what = f"the loss is {loss}" if not math.isfinite(loss) else "the model's outputs are not finite"
        if dtype == torch.float16 and settings.optimizer in ("adam", "adamw"):
            hint = (f"{settings.optimizer}'s eps (1e-8) is 0 in float16, so a zero second moment divides by "
                    "zero: use dtype: bfloat16 or float32, or optimizer=sgd")
        else:
            hint = f"lower the learning rate (lr={settings.lr:g}), or check the data for NaN or infinite values"
        super().__init__(f"training diverged at epoch {epoch}: {what}; {hint}")
        self.epoch = epoch


def train(
    spec: ir.Spec,
    data: GraphData,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    device: str = "cpu",
    plan: Any = None,
    budget: int | str | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Train ``spec`` on ``data``; returns the model (at its last epoch) and the result.

    ``epochs`` and ``seed`` override the spec's; ``plan`` overrides its plans (see
    ``gnnspec.build``; ``"auto"`` or the spec's ``auto`` plans for ``data``'s size under
    ``budget``). Same seed, same data: same loss curve.
    """
    from gnnspec import build

    settings = spec.train
    epochs = epochs if epochs is not None else settings.epochs
    seed = seed if seed is not None else spec.seed
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if seed < 0:
        raise ValueError(f"seed must be at least 0, got {seed}")
    if seed > ir.MAX_SEED:
        raise ValueError(f"seed must be at most 2**63 - 1, got {seed}")
    torch.manual_seed(seed)
    model = build(spec, data.num_features, data.num_classes, plan=plan, nodes=data.num_nodes, edges=data.num_edges,
                  self_loops=data.num_self_loops, budget=budget, device=device).to(device)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    data = data.to(device)
    x, edge_index, y = data.x.to(dtype), data.edge_index, data.y
    optimizer = make_optimizer(model, settings)
    loss_fn = loss_function(settings, data)
    train_mask = data.train_mask

    losses: list[float] = []

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        out = model(x, edge_index)
        loss = loss_fn(out[train_mask], y[train_mask])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    result = TrainResult(spec.name, data.name, plan_label(model, plan, spec, budget), epochs, 0, 0.0, 0.0, 0.0, None)
    best_val, stale = -1.0, 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        tic = time.perf_counter()
        if epoch == min(2, epochs):  # steady state: optimizer state exists, the first step's caches are warm
            # (with one epoch, its step: the peak then includes making the optimizer state)
            optimizer.zero_grad(set_to_none=True)
            result.peak_bytes = peak_of_step(step, model, optimizer, x, edge_index, y, train_mask)
        else:
            step()
        model.eval()
        with torch.no_grad():
            out = model(x, edge_index)
        if not (math.isfinite(losses[-1]) and bool(torch.isfinite(out).all())):
            raise TrainingDiverged(epoch, losses[-1], settings, dtype)
        report = EpochReport(
            epoch, losses[-1], accuracy(out, y, data.val_mask), accuracy(out, y, data.test_mask), time.perf_counter() - tic
        )
        result.history.append(report)
        if on_epoch is not None:
            on_epoch(report)
        if report.val_acc > best_val:
            best_val, stale = report.val_acc, 0
            result.best_epoch, result.val_acc, result.test_acc = epoch, report.val_acc, report.test_acc
        else:
            stale += 1
            if settings.patience is not None and stale >= settings.patience:
                break
    result.epochs = len(result.history)
    result.seconds = time.perf_counter() - start
    return model, result


# ---------------------------------------------------------------------------- measured step peak


def random_graph(nodes: int, edges: int, features: int, classes: int, *, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``x [nodes, features]`` (standard normal), ``edge_index [2, edges]`` with no self-loops (the
    graph the estimate assumes) and labels ``y [nodes]`` uniform in ``[0, classes)``, seeded."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(nodes, (edges,), generator=gen)
    dst = (src + torch.randint(1, max(nodes, 2), (edges,), generator=gen)) % nodes
    x = torch.randn(nodes, features, generator=gen, dtype=dtype)
    y = torch.randint(classes, (nodes,), generator=gen)
    return x, torch.stack([src, dst]), y


@dataclass
class MeasuredStep:
    peak_bytes: int
    device: str
    plans: tuple[str, ...]


def measure_spec(spec: ir.Spec, *, nodes: int | None = None, edges: int | None = None, data: GraphData | None = None,
                 plan: Any = None, in_channels: int | None = None, out_channels: int | None = None,
                 dtype: str | None = None, optimizer: str | None = None, device: str = "cpu",
                 seed: int = 0) -> MeasuredStep:
    """The measured peak of one training step of ``spec`` under ``plan`` (SPEC.md section 5: a
    warm-up step, then ``zero_grad(set_to_none=True)``, forward, cross-entropy over every node,
    backward, optimizer step): peak live storage bytes on CPU, ``torch.cuda.max_memory_allocated``
    on CUDA. The graph is ``data`` (its labels when they are class labels) or
    :func:`random_graph` of ``nodes``/``edges``."""
    from gnnspec import build
    from gnnspec.memory.measure import measure_step_peak

    if dtype is not None:
        spec = spec.model_copy(update={"dtype": dtype})
    torch_dtype = getattr(torch, spec.dtype)
    if data is not None:
        in_channels, out_channels = data.num_features, data.num_classes
    torch.manual_seed(seed)
    model = build(spec, in_channels, out_channels, plan=plan).to(device)  # build takes graph: widths
    if data is not None:
        x, edge_index = data.x.to(torch_dtype), data.edge_index
        y = data.y if data.y.dim() == 1 and bool((data.y >= 0).all()) else torch.randint(out_channels, (data.num_nodes,))
    else:
        widths = model.resolved[0].in_width, model.resolved[-1].out_width
        x, edge_index, y = random_graph(nodes, edges, *widths, dtype=torch_dtype, seed=seed)
    x, edge_index, y = x.to(device), edge_index.to(device), y.to(device)
    peak = measure_step_peak(model, x, edge_index, y, model.make_optimizer(spec.train, optimizer))
    return MeasuredStep(int(peak), torch.device(device).type, model.plans)
