"""A deep reversible spec trains on an SBM graph, with the step memory of a shallow one (issue 5).

The spec (``--depth``, default 128; ``tie`` false, then true)::

    hidden: 64
    model:  linear >> rev(groups=2, depth=D, op=gcn, norm=layer, dropout=0.1, tie=T) >> linear
    plan:   reversible

is trained with ``gnnspec.train.train`` (Adam, lr 0.01, ``--epochs`` epochs, test accuracy at the
best validation epoch) on ``sbm(nodes=2000, edges=20000, classes=4, features=16)`` (``--data``;
seeded, 60/20/20 random split, chance 0.25). Then the measured step peak of the built model
(``gnnspec.memory.measure.measure_step_peak``: SPEC.md section 5's step -- forward, cross-entropy
on every node, backward, Adam step -- after one warm-up step; live tensor storage bytes on CPU) is
compared with the same spec at depth 4 (``--shallow``): the target is a deep peak within 10% of the
shallow one. For contrast it also measures the deep spec under ``store`` (every layer's activations
kept).

Why both ``tie`` settings: the reversible plan makes the *activation* memory independent of depth,
but an untied stack has ``depth`` layers of weights, and each weight comes with a gradient and two
Adam moments. On this small graph (2000 x 64 floats = 0.5 MiB per activation) that parameter state
(about 36 KiB per layer here) outweighs everything else past a few dozen layers, so the untied deep
peak exceeds the shallow one by exactly that state, whatever the plan. With ``tie=true`` (one set of
weights for every layer, as weight-tied RevGNN) the whole step peak is independent of depth. For
each spec the table also splits the peak, using gnnspec's analytic estimate (``estimate_spec``, which
matches the measurement here), into parameter state (parameters, gradients and optimizer state
alive at the peak) and the rest (graph data, activations, temporaries).

    python benchmarks/deep_rev_sbm.py                  # depth 128 vs 4, 100 epochs, untied and tied
    python benchmarks/deep_rev_sbm.py --depth 256 --epochs 50 --tie true
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gnnspec  # noqa: E402
from gnnspec.data import load_data  # noqa: E402
from gnnspec.memory.measure import measure_step_peak  # noqa: E402
from gnnspec.train import make_optimizer, train  # noqa: E402

SPEC = """\
name:   deep_rev_sbm
hidden: {hidden}
model:  linear >> rev(groups=2, depth={depth}, op=gcn, norm=layer, dropout=0.1, tie={tie}) >> linear
plan:   {plan}
train:  epochs={epochs}
"""

PARAMETER_STATE = ("parameters", "gradients", "optimizer")


def make_spec(depth: int, tie: bool, hidden: int, epochs: int, plan: str = "reversible") -> gnnspec.Spec:
    return gnnspec.parse(SPEC.format(depth=depth, tie=str(tie).lower(), hidden=hidden, epochs=epochs, plan=plan))


def step_peak(spec: gnnspec.Spec, data, seed: int) -> int:
    """``measure_step_peak`` on the model ``gnnspec.build`` makes of ``spec``, with its optimizer."""
    torch.manual_seed(seed)
    model = gnnspec.build(spec, data.num_features, data.num_classes)
    optimizer = make_optimizer(model, spec.train)
    return measure_step_peak(model, data.x, data.edge_index, data.y, optimizer, loss_fn=F.cross_entropy)


def estimated(spec: gnnspec.Spec, data) -> tuple[int | None, dict[str, int]]:
    """gnnspec's analytic estimate of the step peak under the spec's plan and its breakdown."""
    estimate = getattr(gnnspec, "estimate", None)
    if estimate is None:
        try:
            from gnnspec.memory.estimate import estimate_spec as estimate
        except ImportError:
            return None, {}
    try:
        est = estimate(spec, nodes=data.num_nodes, edges=data.edge_index.size(1),
                       in_channels=data.num_features, out_channels=data.num_classes)
    except Exception as err:  # noqa: BLE001 -- the estimate is informative only
        print(f"  (no estimate: {type(err).__name__}: {err})")
        return None, {}
    plans = list(getattr(est, "plans", ()))
    chosen = next((p for p in plans if p.name == est.chosen), plans[0] if plans else None)
    if chosen is None:
        return None, {}
    return chosen.peak_bytes, dict(getattr(chosen, "breakdown", {}) or {})


def mib(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def run(tie: bool, args, data) -> tuple[bool, bool]:
    chance = 1.0 / data.num_classes
    deep = make_spec(args.depth, tie, args.hidden, args.epochs)
    print(f"\n=== tie={str(tie).lower()} " + "=" * 60)
    print("spec:\n  " + gnnspec.format(deep).strip().replace("\n", "\n  "))

    tic = time.perf_counter()
    _, result = train(deep, data, seed=args.seed)
    seconds = time.perf_counter() - tic
    first = result.history[0]
    print(f"training, depth {args.depth}, plan {result.plan}: {result.epochs} epochs in {seconds:.0f}s; "
          f"loss {first.loss:.3f} -> {result.history[-1].loss:.3f}; best epoch {result.best_epoch}: "
          f"val {result.val_acc:.3f}, test {result.test_acc:.3f} (chance {chance:.2f})")

    cases = [(f"depth {args.depth}, reversible", deep),
             (f"depth {args.shallow}, reversible", make_spec(args.shallow, tie, args.hidden, args.epochs))]
    if not args.no_store:
        cases.append((f"depth {args.depth}, store", make_spec(args.depth, tie, args.hidden, args.epochs, "store")))
    print("step peak: measured (measure_step_peak, CPU live tensor bytes) | estimated | estimate split into "
          "parameter state (params + grads + Adam) and the rest")
    peaks = {}
    for label, spec in cases:
        measured = step_peak(spec, data, args.seed)
        estimate, breakdown = estimated(spec, data)
        state = sum(breakdown.get(k, 0) for k in PARAMETER_STATE) if breakdown else None
        rest = None if state is None else measured - state
        peaks[label] = (measured, rest)
        print(f"  {label:24s} measured {mib(measured):>11s} | estimated {mib(estimate):>11s} | "
              f"parameter state {mib(state):>11s}, rest {mib(rest):>11s}")
    (deep_peak, deep_rest), (shallow_peak, shallow_rest) = peaks[cases[0][0]], peaks[cases[1][0]]
    ratio = deep_peak / shallow_peak
    meets = abs(ratio - 1) <= 0.10
    print(f"deep / shallow step peak: {ratio:.3f} (target within 10%: {'met' if meets else 'NOT met'})")
    if deep_rest is not None and shallow_rest:
        print(f"deep / shallow peak without parameter state: {deep_rest / shallow_rest:.3f}")
    above = result.test_acc > chance + 0.25
    print(f"test accuracy {result.test_acc:.3f} vs chance {chance:.2f}: {'clearly above' if above else 'NOT clearly above'}")
    return above, meets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--shallow", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie", choices=("both", "false", "true"), default="both")
    parser.add_argument("--data", default="sbm(nodes=2000, edges=20000, classes=4, features=16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-store", action="store_true", help="skip measuring the deep spec under store")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_data(args.data)
    print(f"data: {args.data}: {data.num_nodes} nodes, {data.edge_index.size(1)} edges, "
          f"{data.num_features} features, {data.num_classes} classes (chance {1 / data.num_classes:.2f})")
    ties = {"both": (False, True), "false": (False,), "true": (True,)}[args.tie]
    outcomes = {tie: run(tie, args, data) for tie in ties}
    # Success: every spec trains clearly above chance, and some deep spec has a shallow step peak.
    return 0 if all(a for a, _ in outcomes.values()) and any(m for _, m in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
