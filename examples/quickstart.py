"""gnnspec in one page: parse a spec, build it under two plans, train it, compare memory.

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
from gnnspec.memory.measure import measure_step_peak
from gnnspec.train import train

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

    for plan in ("store", "reversible"):
        torch.manual_seed(0)
        model = gnnspec.build(spec, data.num_features, data.num_classes, plan=plan)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
        peak = measure_step_peak(model, data.x, data.edge_index, data.y, optimizer)
        print(f"plan {plan:<10}  training-step peak {peak / 2**20:7.1f} MiB")

    _, result = train(spec, data, epochs=args.epochs, plan="reversible")
    print(
        f"reversible training: test accuracy {result.test_acc:.3f} at epoch {result.best_epoch} "
        f"(validation {result.val_acc:.3f}), {result.seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
