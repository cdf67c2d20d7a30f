"""Estimator accuracy: predicted versus measured peak memory of one training step, on CPU.

``--device cuda`` runs the same sample on a CUDA device: the estimate counts the caching
allocator's rounding and the measurement is ``torch.cuda.max_memory_allocated`` over the step.

For a seeded sample of configurations (op x stack x plan x graph size x width x depth), each spec
is built with ``gnnspec.build`` and one training step (SPEC.md section 5: a warm-up step, then
forward, cross-entropy on every node, backward, Adam step) is measured with
``gnnspec.memory.measure.measure_step_peak`` (peak of live tensor storage bytes), next to
``gnnspec.memory.estimate.estimate_spec`` on the same spec and graph size. The graph is random
without self-loops (the estimate counts ``E + N`` columns per prepared form).

The sample is drawn here, independently of the calibration (which records single units at random
shapes of its own, under fake tensors): nothing is fitted to these configurations.

    python benchmarks/estimator_accuracy.py              # the full sample (>= 60 configurations)
    python benchmarks/estimator_accuracy.py --quick      # a dozen small ones
    python benchmarks/estimator_accuracy.py --count 100 --seed 3
    python benchmarks/estimator_accuracy.py --jk --count 80     # also jk and act, small graphs

Output: a table on stdout, the error distribution (median, p90, max of |relative error|),
``benchmarks/out/estimator_accuracy.json`` and ``.png``. Targets: median <= 2%, max <= 5%.
Runs single-threaded; deep configurations get the smaller graphs so the whole run stays within a
few minutes per core.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import gnnspec
from gnnspec.memory.estimate import estimate_spec, format_bytes
from gnnspec.lower.deq import NotConvergedWarning
from gnnspec.memory.measure import measure_step_peak

OUT = Path(__file__).parent / "out"

OPS = {"gcn": "gcn", "sage": "sage", "gat": "gat(heads=4)", "gen": "gen(learn_t=true)", "gin": "gin"}
# stack -> (ops it is tried with, plans)
STACKS = {
    "plain": (["gcn", "sage", "gat", "gen", "gin"], ["store", "checkpoint"]),
    "res": (["gcn", "sage", "gat", "gen", "gin"], ["store", "checkpoint"]),
    "res+": (["gcn", "sage", "gat", "gen", "gin"], ["store", "checkpoint"]),
    "rev": (["gcn", "sage", "gat", "gen", "gin"], ["store", "checkpoint", "reversible"]),
    "gcnii": ([None], ["store", "checkpoint"]),
    "deq": (["gcn", "sage", "gin"], ["unroll", "implicit"]),
}
WIDTHS = [32, 48, 64, 96, 128, 160, 192, 256]
MAX_PEAK = 2_000_000_000  # bytes: keep every measurement well inside the machine
MAX_WORK = 3.0e9  # depth * (E + N) * width * cost: keeps one configuration to a few seconds


@dataclass
class Config:
    stack: str
    op: str | None
    plan: str
    nodes: int
    edges: int
    width: int
    depth: int
    in_channels: int
    out_channels: int
    norm: str
    dropout: float
    groups: int = 2
    jk: str = "none"
    act: str | None = None  # None: the stack's default

    def expr(self) -> str:
        args = [f"depth={self.depth}"] if self.stack != "deq" else []
        if self.op is not None:
            args.insert(0, f"op={OPS[self.op]}")
        if self.stack == "rev":
            args.append(f"groups={self.groups}")
        if self.stack == "deq":
            # a solve that never converges runs max_iter iterations: the estimate's worst case
            args += ["max_iter=6", "tol=1e-30"]
        if self.jk != "none":
            args.append(f"jk={self.jk}")
        if self.act is not None:
            args.append(f"act={self.act}")
        args += [f"norm={self.norm}", f"dropout={self.dropout}", f"hidden={self.width}"]
        return f"{self.stack}({', '.join(args)})"

    def plan_text(self) -> str:
        if self.plan == "checkpoint":
            segments = max(2, round(math.sqrt(self.depth))) if self.depth > 1 else 1
            return f"checkpoint(segments={segments})"
        return self.plan


def _work(c: Config) -> float:
    edge_cost = {"gat": 6.0, "gen": 6.0}.get(c.op or "", 2.0)
    depth = 6 if c.stack == "deq" else c.depth
    extra = 1.5 if c.plan in ("checkpoint", "reversible") else 1.0
    return depth * (c.edges + c.nodes) * c.width * edge_cost * extra


JK_STACKS = ("plain", "res", "res+", "gcnii")


def sample(count: int, seed: int, jk: bool = False) -> list[Config]:
    """``count`` configurations: every (stack, op, plan) in turn, sizes drawn at random and shrunk
    (depth first for deep stacks, then the graph) until the step is cheap and small enough.
    ``jk``: the stacks that take it also draw ``jk`` (none, cat, max) and ``act`` (relu, none),
    at most 12 layers deep on at most 20k nodes (a ``jk=cat`` output is ``depth * hidden`` wide),
    where a layer without norm, activation or dropout meets a concatenation or a maximum."""
    rng = random.Random(seed)
    combos = [(s, op, plan) for s, (ops, plans) in STACKS.items() for op in ops for plan in plans]
    rng.shuffle(combos)
    configs: list[Config] = []
    i = 0
    while len(configs) < count:
        stack, op, plan = combos[i % len(combos)]
        i += 1
        nodes = int(math.exp(rng.uniform(math.log(2_000), math.log(200_000))))
        density = rng.randint(5, 50)
        width = rng.choice(WIDTHS)
        depth = int(round(math.exp(rng.uniform(0, math.log(256)))))
        if plan == "checkpoint":
            depth = max(depth, 2)
        groups = rng.choice([2, 2, 4]) if stack == "rev" else 2
        if stack == "rev" and width % (groups * (4 if op == "gat" else 1)):
            width = 64
        if op == "gat" and width % 4:
            width = 64
        c = Config(stack, op, plan, nodes, nodes * density, width, depth, rng.choice([16, 32, 64, 100]),
                   rng.choice([8, 16, 40]), rng.choice(["none", "batch", "layer"]), rng.choice([0.0, 0.1, 0.5]),
                   groups)
        if jk:  # drawn after the default sample's draws, which stay as they were
            if stack not in JK_STACKS:
                continue
            c.jk, c.act = rng.choice(["none", "cat", "max"]), rng.choice(["relu", "none"])
            c.depth, c.nodes = min(c.depth, 12), min(c.nodes, 20_000)
            c.edges = c.nodes * density
        # half the configurations keep their graph and give up depth, half keep their depth
        keep_graph = rng.random() < 0.5
        while _work(c) > MAX_WORK:
            if c.depth > 2 and (keep_graph or (c.depth > 8 and rng.random() < 0.5)):
                c.depth = max(2 if plan == "checkpoint" else 1, c.depth // 2)
            elif c.nodes > 2_000:
                c.nodes = max(2_000, int(c.nodes / 1.5))
                c.edges = c.nodes * density
            elif c.depth > 1:
                c.depth = max(2 if plan == "checkpoint" else 1, c.depth // 2)
            else:
                break
        try:
            est = estimate_spec(c.expr(), nodes=c.nodes, edges=c.edges, in_channels=c.in_channels,
                                out_channels=c.out_channels, plan=c.plan_text())
        except Exception as err:  # a configuration the estimator cannot take is reported, not hidden
            print(f"skip {c.expr()}: {err}", file=sys.stderr)
            continue
        if est.plans[0].peak_bytes > MAX_PEAK:
            c.nodes, c.edges = max(2_000, c.nodes // 3), max(2_000, c.nodes // 3) * density
            est = estimate_spec(c.expr(), nodes=c.nodes, edges=c.edges, in_channels=c.in_channels,
                                out_channels=c.out_channels, plan=c.plan_text())
            if est.plans[0].peak_bytes > MAX_PEAK:
                continue
        configs.append(c)
    return configs


def random_graph(nodes: int, edges: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, nodes, (edges,), generator=g)
    dst = (src + torch.randint(1, nodes, (edges,), generator=g)) % nodes  # no self-loops
    return torch.stack([src, dst])


def run(c: Config, seed: int, device: str = "cpu") -> dict:
    t0 = time.perf_counter()
    est = estimate_spec(c.expr(), nodes=c.nodes, edges=c.edges, in_channels=c.in_channels,
                        out_channels=c.out_channels, plan=c.plan_text(), device=device)
    est_seconds = time.perf_counter() - t0
    predicted = est.plans[0].peak_bytes
    torch.manual_seed(seed)
    model = gnnspec.build(c.expr(), c.in_channels, c.out_channels, plan=c.plan_text()).to(device)
    x = torch.randn(c.nodes, c.in_channels).to(device)
    edge_index = random_graph(c.nodes, c.edges, seed).to(device)
    y = torch.randint(0, c.out_channels, (c.nodes,)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t1 = time.perf_counter()
    measured = measure_step_peak(model, x, edge_index, y, opt)
    seconds = time.perf_counter() - t1
    del model, opt, x, edge_index, y
    gc.collect()
    return {
        **asdict(c), "expr": c.expr(), "plan_text": c.plan_text(), "predicted": predicted, "measured": measured,
        "error": (predicted - measured) / measured, "estimate_ms": est_seconds * 1e3, "measure_s": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--quick", action="store_true", help="a dozen small configurations")
    parser.add_argument("--jk", action="store_true", help="plain/res/res+/gcnii stacks with jk and act drawn")
    parser.add_argument("--out", default=str(OUT / "estimator_accuracy"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop drawing configurations once this many seconds have passed")
    args = parser.parse_args(argv)
    # deq configurations run max_iter iterations on purpose (tol=1e-30: the estimate's worst case)
    warnings.filterwarnings("ignore", category=NotConvergedWarning)
    torch.set_num_threads(1)
    global MAX_WORK
    if args.quick:
        args.count = 12
        MAX_WORK = 2e8
    configs = sample(args.count, args.seed, jk=args.jk)
    rows = []
    header = f"{'#':>3} {'spec':78s} {'plan':24s} {'N':>7} {'E':>9} {'predicted':>11} {'measured':>11} {'error':>7}"
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for k, c in enumerate(configs):
        if args.budget_s is not None and rows and time.perf_counter() - start > args.budget_s:
            print(f"(time budget of {args.budget_s:.0f} s spent: {len(configs) - k} configurations not run)")
            break
        r = run(c, args.seed + k, args.device)
        rows.append(r)
        print(f"{k:>3} {r['expr'][:78]:78s} {r['plan_text']:24s} {c.nodes:>7} {c.edges:>9} "
              f"{format_bytes(r['predicted']):>11} {format_bytes(r['measured']):>11} {100 * r['error']:>+6.2f}%",
              flush=True)
    errors = sorted(abs(r["error"]) for r in rows)
    median = statistics.median(errors)
    p90 = errors[min(len(errors) - 1, math.ceil(0.9 * len(errors)) - 1)]
    worst = errors[-1]
    print("-" * len(header))
    print(f"{len(rows)} configurations in {time.perf_counter() - start:.0f} s; |error|: median {100 * median:.2f}%, "
          f"p90 {100 * p90:.2f}%, max {100 * worst:.2f}% (targets: median <= 2%, max <= 5%); "
          f"estimate time: median {statistics.median(r['estimate_ms'] for r in rows):.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"count": len(rows), "median_abs_error": median, "p90_abs_error": p90, "max_abs_error": worst,
               "seed": args.seed, "device": args.device, "torch": torch.__version__, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for stack in STACKS:
            pts = [r for r in rows if r["stack"] == stack]
            a1.scatter([r["measured"] / 2**20 for r in pts], [r["predicted"] / 2**20 for r in pts], label=stack, s=14)
        lim = max(r["measured"] for r in rows) / 2**20 * 1.1
        a1.plot([0.5, lim], [0.5, lim], "k--", lw=0.8)
        a1.set_xscale("log"), a1.set_yscale("log")
        a1.set_xlabel("measured peak (MiB)"), a1.set_ylabel("predicted peak (MiB)"), a1.legend(fontsize=8)
        a2.hist([100 * r["error"] for r in rows], bins=30)
        a2.set_xlabel("relative error (%)"), a2.set_ylabel("configurations")
        a2.set_title(f"median {100 * median:.2f}%, p90 {100 * p90:.2f}%, max {100 * worst:.2f}%")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except Exception as err:  # pragma: no cover - plotting is optional
        print(f"(no plot: {err})", file=sys.stderr)
    return 0 if worst <= 0.05 and median <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
