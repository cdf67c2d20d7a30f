"""Estimator latency: milliseconds per `gnnspec.estimate` call, one plan and the full `auto` table.

    python benchmarks/estimator_latency.py [--repeat 15]

For every corpus spec at its `graph:` size, and for RevGNN-Deep on the whole ogbn-proteins graph
(132,534 nodes, 79,122,504 edges: the issue's target, under 50 ms), it times in one process:

* `first`: the first estimate after `import gnnspec` and the imports it needs (the coefficient
  table is read and each piece compiled on first use);
* `one plan`: `estimate(spec, plan=<the chosen plan>)` (median of `--repeat`);
* `auto table`: `estimate(spec, budget=...)`, every candidate plan plus the checkpoint segment
  search (median of `--repeat`). The budget is the spec's own, else 80 GiB.

Prints a table and writes benchmarks/out/estimator_latency.{json,png}. The estimate never runs a
tensor operation (tests/test_estimate.py checks that), so the times are Python time on shapes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
TARGET_MS = 50.0


def timed(call, repeat: int) -> float:
    """Median milliseconds of ``call()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cases() -> list[tuple[str, Path, int, int]]:
    import gnnspec

    rows = []
    for path in sorted((ROOT / "specs").glob("*.gnn")):
        spec = gnnspec.load(path)
        rows.append((spec.name, path, spec.graph.nodes, spec.graph.edges))
    rows.append(("revgnn_deep (whole ogbn-proteins)", ROOT / "specs" / "revgnn_deep.gnn", 132534, 79122504))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", default=str(OUT / "estimator_latency"))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import gnnspec
    from gnnspec.memory.estimate import estimate_spec
    from gnnspec.ops import op_impl  # noqa: F401  (torch and torch-geometric, as the command line)

    import_ms = (time.perf_counter() - start) * 1e3
    rows = []
    header = f"{'spec':36s} {'N':>9} {'E':>11} {'chosen':26s} {'first':>8} {'one plan':>9} {'auto table':>11}"
    print(f"imports: {import_ms:.0f} ms\n{header}\n{'-' * len(header)}")
    for name, path, nodes, edges in cases():
        spec = gnnspec.load(path)
        budget = None if (spec.plan.kind == "auto" and spec.plan.budget) else "80GiB"
        t0 = time.perf_counter()
        est = estimate_spec(spec, nodes=nodes, edges=edges, budget=budget)
        first = (time.perf_counter() - t0) * 1e3
        leanest = min(est.plans, key=lambda p: p.peak_bytes)
        plan = (est.chosen_plan or leanest).stages
        chosen = est.chosen or f"none fits; {leanest.name}"
        one = timed(lambda: estimate_spec(spec, nodes=nodes, edges=edges, plan=plan), args.repeat)
        table = timed(lambda: estimate_spec(spec, nodes=nodes, edges=edges, budget=budget), args.repeat)
        rows.append({"spec": name, "nodes": nodes, "edges": edges, "chosen": chosen, "first_ms": first,
                     "one_plan_ms": one, "auto_table_ms": table})
        print(f"{name:36s} {nodes:>9,} {edges:>11,} {chosen[:26]:26s} {first:>7.1f} {one:>8.1f} {table:>10.1f}",
              flush=True)
    target = rows[-1]
    verdict = "met" if target["auto_table_ms"] < TARGET_MS else "MISSED"
    print("-" * len(header))
    print(f"RevGNN-Deep on ogbn-proteins: one plan {target['one_plan_ms']:.1f} ms, auto table "
          f"{target['auto_table_ms']:.1f} ms (target < {TARGET_MS:.0f} ms: {verdict}); milliseconds, median of "
          f"{args.repeat}, after imports")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"import_ms": import_ms, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4.5))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["one_plan_ms"] for r in rows], width=0.4, label="one plan")
        ax.bar([x + 0.2 for x in xs], [r["auto_table_ms"] for r in rows], width=0.4, label="auto table")
        ax.axhline(TARGET_MS, color="k", ls="--", lw=0.8, label=f"{TARGET_MS:.0f} ms target")
        ax.set_xticks(list(xs), [r["spec"].split(" ")[0] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("ms per estimate (median)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except Exception as err:  # pragma: no cover - plotting is optional
        print(f"(no plot: {err})", file=sys.stderr)
    return 0 if target["auto_table_ms"] < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
