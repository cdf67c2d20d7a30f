"""Full-batch node classification: a spec and a graph in, a trained model and its scores out.

``train(spec, data)`` builds the model (``gnnspec.build``), optimises it with the spec's `train:`
settings (optimizer, learning rate, weight decay as per-stage parameter groups, epochs, patience,
loss, seed) and reports the test accuracy at the epoch of best validation accuracy, as the
Planetoid papers do. The peak memory of one training step in steady state (the second epoch's
step, SPEC.md section 5) is measured on the way.
"""

from __future__ import annotations

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
    groups = model.parameter_groups(settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)


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
    if y.dim() == 2:
        return float(((out[mask] > 0) == (y[mask] > 0.5)).float().mean())
    return float((out[mask].argmax(dim=-1) == y[mask]).float().mean())


def train(
    spec: ir.Spec,
    data: GraphData,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    device: str = "cpu",
    plan: Any = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Train ``spec`` on ``data``; returns the model (at its last epoch) and the result.

    ``epochs`` and ``seed`` override the spec's; ``plan`` overrides its plans (see
    ``gnnspec.build``). Same seed, same data: same loss curve.
    """
    from gnnspec import build

    settings = spec.train
    epochs = epochs if epochs is not None else settings.epochs
    seed = seed if seed is not None else spec.seed
    torch.manual_seed(seed)
    model = build(spec, data.num_features, data.num_classes, plan=plan).to(device)
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

    result = TrainResult(spec.name, data.name, "+".join(getattr(model, "plans", ())), epochs, 0, 0.0, 0.0, 0.0, None)
    best_val, stale = -1.0, 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        tic = time.perf_counter()
        if epoch == 2:  # steady state: optimizer state exists, the first step's caches are warm
            optimizer.zero_grad(set_to_none=True)
            result.peak_bytes = peak_of_step(step, model, optimizer, x, edge_index, y, train_mask)
        else:
            step()
        model.eval()
        with torch.no_grad():
            out = model(x, edge_index)
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
