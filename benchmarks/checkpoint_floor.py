"""Where a ``checkpoint`` step's time goes, against the least any whole-block recomputation costs.

``checkpoint(segments=k)`` costs ``store`` plus a recomputation of the checkpointed layers inside
the backward (SPEC.md section 4: "one forward of the stage"). This script splits one step of each
into its parts, per stack layer, in the same process and rounds as ``benchmarks/plans.py`` (same
random graph, specs and single-threaded timing, CPU time of the thread; each model steps in a
thread of its own, ``plans.MethodThread``)::

    store step        forward + loss + backward + Adam step of the store model
    store fwd         its forward + loss
    ckpt fwd          the checkpoint model's forward + loss (autograd on, activations dropped)
    recompute         (ckpt step - ckpt fwd) - (store step - store fwd), per recomputed layer
                      (the last segment runs plainly: L - ceil-or-floor(L/k) layers are recomputed)
    replayed fwd      a grad-mode forward of the store model with every dropout mask replayed from
                      a DropoutTape (no draws), keeping its activations: the work a recomputation
                      must do, without torch.utils.checkpoint around it (it includes the two
                      projections, so it slightly overstates a stack layer)

and prints two ratios to ``store``: the measured one, and ``bound``, the ratio the step would
have if each recomputed layer cost exactly one replayed forward layer::

    bound = 1 + (recomputed * replayed_fwd_per_layer + ckpt_fwd - store_fwd) / store_step

``bound`` is what whole-block recomputation of ``(L - L/k)`` layers costs on this machine before
any checkpoint machinery: when it lies above a time target, no implementation of the plan meets
that target here. ``overhead`` is recompute / replayed fwd - 1 (hooks, holders, the recomputation
running inside the backward). Each cell also checks that the replayed forward reproduces the
recorded forward's output exactly (``replay == record``).

    python benchmarks/checkpoint_floor.py                          # depth 256, gcn/sage/gat, plain/res+
    python benchmarks/checkpoint_floor.py --depths 64,256 --ops gcn
    python benchmarks/checkpoint_floor.py --quick                  # a tiny smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plans  # noqa: E402  (the benchmark whose cells this one decomposes)

import gnnspec  # noqa: E402
from gnnspec.lower.checkpoint import segment_bounds  # noqa: E402
from gnnspec.lower.dropout_tape import DropoutTape  # noqa: E402


@dataclass
class Cell:
    op: str
    kind: str
    depth: int
    segments: int
    recomputed_layers: int
    ratio: float  # checkpoint step / store step (median over rounds)
    bound: float  # the ratio if each recomputed layer cost one replayed forward layer
    overhead: float  # recompute per layer / replayed forward per layer - 1
    store_step_ms: float  # per layer, as every *_ms below
    store_fwd_ms: float
    ckpt_fwd_ms: float
    recompute_ms: float
    replayed_fwd_ms: float
    replay_equal: bool


def _step(model, optimizer, x, edge_index, y) -> tuple[float, float]:
    """(forward + loss, whole step) CPU seconds of one training step (SPEC.md section 5)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    start = time.thread_time()
    loss = F.cross_entropy(model(x, edge_index), y)
    forward = time.thread_time()
    loss.backward()
    optimizer.step()
    return forward - start, time.thread_time() - start


def _replayed_forward(model, x, edge_index) -> tuple[float, bool]:
    """CPU seconds of a grad-mode forward with the masks of the forward before it replayed, and
    whether its output equals that forward's bit for bit."""
    model.train()
    tape = DropoutTape()
    with tape.recording():
        recorded = model(x, edge_index).detach()
    with tape.replaying():
        start = time.thread_time()
        out = model(x, edge_index)
        seconds = time.thread_time() - start
    return seconds, bool(torch.equal(out.detach(), recorded))


def run_cell(op: str, kind: str, depth: int, args: argparse.Namespace, data) -> Cell:
    x, edge_index, y = data
    segments = gnnspec.ir.default_segments(depth)
    spec = plans.spec_of(kind, op, depth, args.hidden, 2, args.dropout)
    models = {}
    for name, plan in (("store", "store"), ("ckpt", f"checkpoint(segments={segments})")):
        torch.manual_seed(0)
        model = gnnspec.build(spec, in_channels=x.size(1), out_channels=int(y.max()) + 1, plan=plan)
        models[name] = (model, torch.optim.Adam(model.parameters(), lr=0.01))
    # each model in a thread of its own (its own malloc arena), as in plans.py
    threads = {name: plans.MethodThread() for name in models}
    times: dict[str, list[float]] = {key: [] for key in ("store_fwd", "store", "ckpt_fwd", "ckpt", "replay")}
    replay_equal = True
    try:
        for name, (model, optimizer) in models.items():  # warm-up
            threads[name].run(lambda m=model, o=optimizer: _step(m, o, x, edge_index, y))
        threads["store"].run(lambda: _replayed_forward(models["store"][0], x, edge_index))
        gc.collect()
        gc.disable()
        for round_ in range(args.repeats):
            order = ("store", "ckpt") if round_ % 2 == 0 else ("ckpt", "store")
            for name in order:
                forward, step = threads[name].run(lambda name=name: _step(*models[name], x, edge_index, y))
                times[f"{name}_fwd"].append(forward)
                times[name].append(step)
            seconds, equal = threads["store"].run(lambda: _replayed_forward(models["store"][0], x, edge_index))
            times["replay"].append(seconds)
            replay_equal &= equal
    finally:
        gc.enable()
        for thread in threads.values():
            thread.close()
    med = {key: statistics.median(values) for key, values in times.items()}
    start, stop = segment_bounds(depth, segments)[-1]
    recomputed = depth - (stop - start)
    recompute = (med["ckpt"] - med["ckpt_fwd"]) - (med["store"] - med["store_fwd"])
    replay_per_layer = med["replay"] / depth
    recompute_per_layer = recompute / recomputed if recomputed else 0.0
    ratio = statistics.median(c / s for c, s in zip(times["ckpt"], times["store"]))
    bound = 1 + (recomputed * replay_per_layer + med["ckpt_fwd"] - med["store_fwd"]) / med["store"]
    ms = 1e3 / depth
    return Cell(op, kind, depth, segments, recomputed, ratio, bound,
                recompute_per_layer / replay_per_layer - 1 if recomputed else 0.0,
                med["store"] * ms, med["store_fwd"] * ms, med["ckpt_fwd"] * ms,
                recompute_per_layer * 1e3, replay_per_layer * 1e3, replay_equal)


def print_table(cells: list[Cell], target: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="checkpoint step vs store: measured, and the whole-block recomputation bound")
    for column in ("op", "kind", "depth", "k", "ckpt/store", "bound", f"bound <= {target}", "overhead",
                   "store step", "store fwd", "ckpt fwd", "recompute", "replayed fwd", "replay == record"):
        table.add_column(column, justify="left" if column in ("op", "kind") else "right")
    for c in cells:
        table.add_row(c.op, c.kind, str(c.depth), str(c.segments), f"{c.ratio:.3f}", f"{c.bound:.3f}",
                      "yes" if c.bound <= target else "no", f"{c.overhead:+.0%}",
                      *(f"{v:.2f}" for v in (c.store_step_ms, c.store_fwd_ms, c.ckpt_fwd_ms,
                                              c.recompute_ms, c.replayed_fwd_ms)),
                      "yes" if c.replay_equal else "NO")
    console = Console(width=200)
    console.print(table)
    console.print("times are CPU ms per stack layer (medians over rounds); recompute is per recomputed layer. "
                  "bound: the ratio if each recomputed layer cost one replayed forward layer.")


def plot(cells: list[Cell], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{c.op} {c.kind} {c.depth}" for c in cells]
    positions = range(len(cells))
    fig, ax = plt.subplots(figsize=(max(6, len(cells)), 4))
    ax.bar([p - 0.2 for p in positions], [c.ratio for c in cells], width=0.4, label="checkpoint / store")
    ax.bar([p + 0.2 for p in positions], [c.bound for c in cells], width=0.4, label="whole-block bound")
    ax.axhline(plans.CKPT_TIME_TARGET, color="k", linestyle="--", label="target")
    ax.set_xticks(list(positions), labels, rotation=30, ha="right")
    ax.set_ylim(1.0, max(plans.CKPT_TIME_TARGET, *(max(c.ratio, c.bound) for c in cells)) * 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="gcn,sage,gat")
    parser.add_argument("--kinds", default="plain,res+")
    parser.add_argument("--depths", default="256")
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--edges", type=int, default=50000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="depth 9, 300 nodes, one round")
    parser.add_argument("--out", type=Path, default=plans.OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.nodes, args.edges, args.repeats = "9", 300, 3000, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as plans.py: denormal gradients would time the denormals
    plans._keep_freed_memory_mapped()
    data = plans.random_graph(args.nodes, args.edges, args.hidden, 8, 0)
    cells = []
    for depth in (int(d) for d in args.depths.split(",")):
        for op in args.ops.split(","):
            for kind in args.kinds.split(","):
                cells.append(run_cell(op, kind, depth, args, data))
                gc.collect()
                plans._return_freed_memory()
    print_table(cells, plans.CKPT_TIME_TARGET)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpoint_floor.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
         "target": plans.CKPT_TIME_TARGET, "cells": [asdict(c) for c in cells]}, indent=1))
    if plot(cells, args.out / "checkpoint_floor.png"):
        print(f"plot: {args.out / 'checkpoint_floor.png'}")
    else:
        print("matplotlib is not installed (pip install matplotlib, or the `bench` extra): no plot")
    print(f"data: {args.out / 'checkpoint_floor.json'}")
    return 0 if all(c.replay_equal for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
