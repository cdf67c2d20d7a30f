"""The checks that need a CUDA device, as one prepared run that fits a short device lease.

    python benchmarks/device_check.py --out "$OUT"                  # on a CUDA machine (~8 min)
    python benchmarks/device_check.py --device cpu --quick --out D  # a smoke run anywhere (CI)

Three parts, each run only while ``--budget-s`` has time left (the first takes about half of it),
with their results written to ``--out`` as they finish:

1. ``plans``: for gcn, sage and gat in ``plain``, ``res+`` and ``rev`` stacks (the specs of
   ``benchmarks/plans.py``) at ``--depths``, on a random graph without self-loops, every plan of the
   stack (``store``, ``checkpoint`` with its default ``round(sqrt(depth))`` segments, and
   ``reversible`` for ``rev``) runs training steps (SPEC.md section 5) on the device: the step
   time is the median over ``--rounds`` rounds of its ratio to ``store`` in the same round
   (rotated order, the device synchronised around each step); the peak is
   ``measure_step_peak`` (``torch.cuda.max_memory_allocated`` over a step on CUDA, live tensor
   storage on CPU) beside ``gnnspec.estimate`` for the same device (on CUDA it counts the caching
   allocator's 512-byte rounding). Targets as in ``plans.py``: ``checkpoint`` <= 1.35x and
   ``reversible`` <= 1.4x ``store``.
2. ``equivalence``: ``benchmarks/plan_sweep.py --device DEVICE``: random float64 specs, every
   plan's outputs, gradients and state after a step against ``store``'s. On CUDA the dropout tape
   does not replay (it keeps CPU masks only), so checkpointed segments restore the device RNG
   state and redraw: the path only a device run exercises.
3. ``estimator``: ``benchmarks/estimator_accuracy.py --device DEVICE``: estimated vs measured
   step peaks over random configurations (targets: median <= 2%, max <= 5%).

Exit code 0 when every part that ran passed its correctness checks (plan equivalence, the
estimator's targets, peaks within 5% of their estimates); time ratios are reported, not enforced.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plans  # noqa: E402  (the specs and targets of the CPU benchmark)
from estimator_accuracy import random_graph  # noqa: E402  (no self-loops: the estimate is exact)

import gnnspec  # noqa: E402
from gnnspec.memory.measure import measure_step_peak, training_step  # noqa: E402

HERE = Path(__file__).resolve().parent
PEAK_TOLERANCE = 0.05


@dataclass
class PlanCell:
    op: str
    kind: str
    depth: int
    plan: str
    time_ratio: float  # median over rounds of this plan's step time / store's in the same round
    step_ms: float  # median step time
    peak_bytes: int
    estimated_bytes: int
    error: float  # (estimated - measured) / measured

    @property
    def target(self) -> float | None:
        if self.plan.startswith("checkpoint") and self.kind in plans.CKPT_TARGET_KINDS:
            return plans.CKPT_TIME_TARGET
        return plans.REV_TIME_TARGET if self.plan == "reversible" else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Free a cell's models before the next: collect them and return cached device blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_plans_cell(op: str, kind: str, depth: int, args: argparse.Namespace, device: torch.device) -> list[PlanCell]:
    spec = plans.spec_of(kind, op, depth, args.hidden, 2, args.dropout)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.nodes, args.hidden, generator=gen).to(device)
    edge_index = random_graph(args.nodes, args.edges, 0).to(device)
    y = torch.randint(0, 8, (args.nodes,), generator=gen).to(device)
    names = ["store", "checkpoint"] + (["reversible"] if kind == "rev" else [])

    def built(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = gnnspec.build(spec, in_channels=args.hidden, out_channels=8, plan=name).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    # Each peak with its model alone on the device: max_memory_allocated counts every live tensor,
    # and the first device run (2026-12-04) had measured each plan beside the models measured
    # before it (their parameters, optimizer state, gradients and prepared graphs): `reversible`
    # read 9-22% above its estimate that way, and 0.3-0.5% below it alone.
    peaks, estimates = {}, {}
    for name in names:
        model, optimizer = built(name)
        peaks[name] = measure_step_peak(model, x, edge_index, y, optimizer)  # includes a warm-up step
        est = gnnspec.estimate(spec, nodes=args.nodes, edges=args.edges, in_channels=args.hidden, out_channels=8,
                               plan=name, device=device.type)
        estimates[name] = est.plans[0].peak_bytes
        del model, optimizer
        _release(device)
    models = {name: built(name) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            training_step(*models[name], x, edge_index, y)
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    segments = gnnspec.ir.default_segments(depth)
    cells = []
    for name in names:
        ratio = statistics.median(t / s for t, s in zip(times[name], times["store"]))
        label = f"checkpoint(segments={segments})" if name == "checkpoint" else name
        cells.append(PlanCell(op, kind, depth, label, ratio, statistics.median(times[name]) * 1e3, peaks[name],
                              estimates[name], (estimates[name] - peaks[name]) / peaks[name]))
    del models
    _release(device)
    return cells


def print_plans(cells: list[PlanCell]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="plans on the device: step time vs store, peak vs estimate")
    for column in ("op", "kind", "depth", "plan", "time / store", "target", "step ms", "peak", "estimate", "error"):
        table.add_column(column, justify="left" if column in ("op", "kind", "plan") else "right")
    for c in cells:
        target = c.target
        verdict = "" if target is None else (f"<= {target}: " + ("yes" if c.time_ratio <= target else "no"))
        table.add_row(c.op, c.kind, str(c.depth), c.plan, f"{c.time_ratio:.3f}", verdict, f"{c.step_ms:.1f}",
                      f"{c.peak_bytes / 2**20:.2f} MiB", f"{c.estimated_bytes / 2**20:.2f} MiB", f"{100 * c.error:+.2f}%")
    Console(width=160).print(table)


def run_script(script: str, arguments: list[str], timeout: float) -> dict:
    """Run a sibling benchmark script; its output goes to ours, its last line is its summary."""
    command = [sys.executable, str(HERE / script), *arguments]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        return {"command": command, "returncode": None, "summary": f"stopped after {timeout:.0f} s"}
    print(proc.stdout, end="")
    print(proc.stderr, end="", file=sys.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if "configurations in" in line or "specs, " in line),
                   lines[-1] if lines else "")
    return {"command": command, "returncode": proc.returncode, "summary": summary}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ops", default="gcn,sage,gat")
    parser.add_argument("--kinds", default="plain,res+,rev")
    parser.add_argument("--depths", default="16,64,256")
    parser.add_argument("--nodes", type=int, default=50_000)
    parser.add_argument("--edges", type=int, default=500_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sweep-count", type=int, default=80)
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock seconds for all three parts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=plans.OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.nodes, args.edges, args.rounds, args.sweep_count = "4", 300, 3000, 2, 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu for a smoke run")
        return 2
    start = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    args.out.mkdir(parents=True, exist_ok=True)
    record: dict = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "parts": {}}

    def save() -> None:
        (args.out / "device_check.json").write_text(json.dumps(record, indent=1))

    cells: list[PlanCell] = []
    skipped: list[str] = []
    plans_deadline = args.budget_s / 2
    for depth in (int(d) for d in args.depths.split(",")):
        for op in args.ops.split(","):
            for kind in args.kinds.split(","):
                if time.perf_counter() - start > plans_deadline:
                    skipped.append(f"{op} {kind} {depth}")
                    continue
                try:
                    cells += run_plans_cell(op, kind, depth, args, device)
                except torch.OutOfMemoryError:  # a smaller device than the H200 this is sized for
                    skipped.append(f"{op} {kind} {depth} (out of memory)")
                    _release(device)
                record["parts"]["plans"] = {"cells": [asdict(c) | {"target": c.target} for c in cells],
                                            "skipped": skipped}
                save()
    record["parts"]["plans"] = {"cells": [asdict(c) | {"target": c.target} for c in cells], "skipped": skipped}
    print_plans(cells)
    if skipped:
        print(f"not run (time budget): {', '.join(skipped)}")
    save()

    sweep = run_script("plan_sweep.py", ["--device", args.device, "--count", str(args.sweep_count), "--seed", "11"],
                       timeout=left() / 2)
    record["parts"]["equivalence"] = sweep
    save()
    accuracy = run_script("estimator_accuracy.py",
                          ["--device", args.device, "--budget-s", str(max(left() - 30, 1.0)),
                           "--out", str(args.out / "estimator_accuracy_device")] + (["--quick"] if args.quick else []),
                          timeout=left())
    record["parts"]["estimator"] = accuracy
    save()

    peaks_ok = all(abs(c.error) <= PEAK_TOLERANCE for c in cells)
    ok = peaks_ok and sweep["returncode"] == 0 and accuracy["returncode"] == 0
    print(f"peaks within {100 * PEAK_TOLERANCE:.0f}% of their estimates: {'yes' if peaks_ok else 'NO'}; "
          f"equivalence: {sweep['summary']}; estimator: {accuracy['summary']}")
    print(f"data: {args.out / 'device_check.json'}; total {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
