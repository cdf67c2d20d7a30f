"""Instructions of a training step under ``store`` and ``reversible``, counted by callgrind.

A ratio of step times on a shared machine moves by more than the 1.4x target's margin (in one run
of ``plans.py``, ``store``'s own steps took 260-562 ms of thread CPU time); callgrind counts the
instructions a step executes, which do not depend on what else the machine runs. Instructions are
not time (a cache miss costs more than an add), so this complements ``plans.py``, it does not
replace it.

For each op, one process runs under ``valgrind --tool=callgrind`` and builds the ``rev`` stack of
``plans.py`` (same spec, graph and seed) under ``store`` and ``reversible`` and, unless
``--no-peers``, PyG's ``GroupAddRev`` over the same layers. For each it takes ``--warm`` steps,
then zeroes the counters (``callgrind_control -z``), runs ``--steps`` steps (SPEC.md section 5:
forward, loss, backward, Adam) and dumps them (``callgrind_control --dump``); then the same for
``--steps`` no-grad forwards in train mode. The table gives instructions per step and per forward,
the ratio to ``store``'s step, and ``floor = 1 + forward / step`` of ``store``.

    python benchmarks/instruction_counts.py                 # gcn, sage, gat at depth 64, 5,000 nodes
    python benchmarks/instruction_counts.py --ops gcn --nodes 200 --depth 4 --no-peers   # a smoke run

A depth-64 cell at 5,000 nodes takes 15-45 minutes under callgrind (importing torch alone takes
about a minute); ``--jobs 2`` runs two ops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"
METHODS = ("store", "reversible", "GroupAddRev")


def parse_dump(text: str) -> tuple[str, int]:
    """The label of a callgrind dump (``--dump=<label>``) and its instruction count (``summary``)."""
    label = re.search(r"^desc: Trigger: dump (\S+)", text, re.MULTILINE)
    summary = re.search(r"^summary: (\d+)", text, re.MULTILINE)
    if label is None or summary is None:
        raise ValueError("not a callgrind dump made by callgrind_control --dump=<label>")
    return label.group(1), int(summary.group(1))


def per_step(dumps: dict[str, int], steps: int) -> dict[str, dict[str, float]]:
    """Instructions per step and per no-grad forward of each method, from ``{label: count}``."""
    out = {}
    for method in METHODS:
        if f"{method}:step" in dumps:
            out[method] = {"step": dumps[f"{method}:step"] / steps, "forward": dumps[f"{method}:forward"] / steps}
    return out


def _plans():
    """``benchmarks/plans.py``, whose graph, spec and peer this script counts."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import plans

    return plans


def _child(args: argparse.Namespace) -> None:
    """Runs under callgrind: every method's steps, each between a zero and a dump of the counters."""
    import torch

    import gnnspec
    from gnnspec.memory.measure import training_step

    plans = _plans()
    peer_rev, random_graph, spec_of = plans.peer_rev, plans.random_graph, plans.spec_of

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    x, edge_index, y = random_graph(args.nodes, args.edges, args.features, args.classes, args.seed)
    spec = spec_of("rev", args.op, args.depth, args.hidden, args.groups, args.dropout)

    def control(flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(os.getpid())], check=True, stdout=subprocess.DEVNULL)

    models = {}
    for plan in ("store", "reversible"):
        torch.manual_seed(args.seed)  # same parameters under every plan
        models[plan] = gnnspec.build(spec, in_channels=args.features, out_channels=args.classes, plan=plan)
    if not args.no_peers:
        models["GroupAddRev"] = peer_rev(args.op, models["store"], args.hidden, args.groups, args.dropout, False)
    for name, model in models.items():
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(args.warm):
            training_step(model, optimizer, x, edge_index, y)
        control("-z")
        for _ in range(args.steps):
            training_step(model, optimizer, x, edge_index, y)
        control(f"--dump={name}:step")
        model.train()
        control("-z")
        with torch.no_grad():
            for _ in range(args.steps):
                model(x, edge_index)
        control(f"--dump={name}:forward")


def _count(op: str, args: argparse.Namespace, forwarded: list[str]) -> dict[str, int]:
    """Runs the child for ``op`` under callgrind; ``{label: instructions}`` of its dumps."""
    prefix = args.out / f"callgrind.{op}"
    for old in args.out.glob(f"callgrind.{op}.*"):
        old.unlink()
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p", sys.executable, __file__,
           "--child", "--op", op, *forwarded]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{op}: callgrind run failed:\n{proc.stderr[-3000:]}")
    dumps = {}
    for path in args.out.glob(f"callgrind.{op}.*.*"):  # <prefix>.<pid>.<part>
        label, count = parse_dump(path.read_text(errors="replace"))
        dumps[label] = count
    return dumps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    base = _plans().parse_args([])  # plans.py's configuration is the default
    per_node = base.edges // base.nodes
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="gcn,sage,gat")
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--nodes", type=int, default=base.nodes)
    p.add_argument("--edges", type=int, default=None, help=f"default: {per_node} per node, as plans.py")
    for name in ("hidden", "features", "classes", "groups"):
        p.add_argument(f"--{name}", type=int, default=getattr(base, name))
    p.add_argument("--dropout", type=float, default=base.dropout)
    p.add_argument("--steps", type=int, default=1, help="counted steps per method")
    p.add_argument("--warm", type=int, default=1, help="steps before counting (Adam's state, the graph cache)")
    p.add_argument("--seed", type=int, default=base.seed)
    p.add_argument("--no-peers", action="store_true", help="without GroupAddRev (the slowest method)")
    p.add_argument("--jobs", type=int, default=1, help="ops counted at once")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--op", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.edges is None:
        args.edges = per_node * args.nodes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (with callgrind_control) is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    args.out.mkdir(parents=True, exist_ok=True)
    forwarded = [f"--{k}={getattr(args, k)}" for k in
                 ("depth", "nodes", "edges", "hidden", "features", "classes", "groups", "dropout", "steps", "warm",
                  "seed")] + (["--no-peers"] if args.no_peers else [])
    ops = args.ops.split(",")
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        counted = dict(zip(ops, pool.map(lambda op: per_step(_count(op, args, forwarded), args.steps), ops)))
    table = Table(title=f"Instructions per training step (callgrind), rev depth {args.depth}, {args.nodes} nodes, "
                        f"{args.edges} edges, hidden {args.hidden}, groups {args.groups}")
    for col in ("op", "method", "step (G instr.)", "x store", "no-grad forward (G instr.)", "floor"):
        table.add_column(col, justify="left" if col in ("op", "method") else "right")
    record = []
    for op, methods in counted.items():
        store = methods["store"]
        floor = 1 + store["forward"] / store["step"]
        for name, c in methods.items():
            ratio = c["step"] / store["step"]
            table.add_row(op, name, f"{c['step'] / 1e9:.3f}", f"{ratio:.3f}", f"{c['forward'] / 1e9:.3f}",
                          f"{floor:.3f}" if name == "reversible" else "")
            record.append({"op": op, "method": name, **c, "ratio": ratio, "floor": floor})
        table.add_section()
    console = Console(width=160)
    console.print(table)
    console.print("floor: 1 + no-grad forward / step of store, the count reversible (one no-grad forward, then "
                  "one recomputation fused with the backward) cannot go below, up to store's own forward.")
    (args.out / "instruction_counts.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                  "rows": record}, indent=1))
    console.print(f"data: {args.out / 'instruction_counts.json'}; total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
