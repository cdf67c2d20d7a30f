"""gnnspec in one page: parse a spec, estimate its memory per plan, let the planner fit a budget, train.

    python examples/quickstart.py [--data-root ../shared/data/planetoid] [--epochs 50]

Trains on Cora when its Planetoid files are under the data root (default: $GNNSPEC_DATA, else
../shared/data/planetoid next to this checkout), else on a synthetic SBM graph.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import gnnspec
from gnnspec.data import load_data
from gnnspec.train import measure_spec, train

SPEC = """
# A small RevGNN: 2 channel groups, 32 weight-tied reversible GCN layers.
hidden: 64
model:  dropout(0.5) >> linear >> rev(groups=2, depth=32, op=gcn, norm=layer, dropout=0.2, tie=true)
        >> norm(layer) >> act >> dropout(0.5) >> linear
train:  lr=0.005, weight_decay=0.0005, epochs=50
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_root = os.environ.get("GNNSPEC_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "planetoid")
    parser.add_argument("--data-root", default=default_root)
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()

    spec = gnnspec.parse(SPEC)
    print("canonical form:\n" + gnnspec.format(spec))

    if (Path(args.data_root) / "Cora" / "raw" / "ind.cora.x").is_file():
        data = load_data("cora", data_root=args.data_root)
    else:
        print(f"(no Cora under {args.data_root}: using a synthetic graph)")
        data = load_data("sbm(nodes=2708, edges=10556, classes=7, features=128)")
    print(data)

    # Before anything runs: the training-step peak of every plan, analytically; then the real
    # step of each plan, measured, beside it.
    est = gnnspec.estimate(spec, nodes=data.num_nodes, edges=data.num_edges,
                           in_channels=data.num_features, out_channels=data.num_classes)
    for plan in est.plans:
        measured = measure_spec(spec, data=data, plan=plan.stages).peak_bytes
        print(f"plan {plan.name:<24} estimated {plan.peak_bytes / 2**20:7.2f} MiB   "
              f"measured {measured / 2**20:7.2f} MiB   relative time {plan.relative_time:.2f}")

    # A budget below what `store` needs: the planner picks the fastest plan that fits.
    budget = (est.plan("store").peak_bytes + est.plan("reversible").peak_bytes) // 2
    _, result = train(spec, data, epochs=args.epochs, plan="auto", budget=budget)
    print(
        f"trained under a {budget / 2**20:.1f} MiB budget with plan {result.plan}: test accuracy "
        f"{result.test_acc:.3f} at epoch {result.best_epoch} (validation {result.val_acc:.3f}), "
        f"step peak {result.peak_bytes / 2**20:.2f} MiB, {result.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
