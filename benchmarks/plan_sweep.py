"""Random differential sweep: every execution plan against ``store`` on random specs and graphs.

Draws ``--count`` stacks over the whole vocabulary the tests sample only in part (all ten ops,
every stack kind, norm and activation, ``tie``, ``jk``, ``groups``, dropout 0 / 0.2 / 0.5) on
random float64 graphs with isolated nodes, duplicate edges and self-loops, and checks for each
valid plan what SPEC.md section 3 promises: the training-mode output, every parameter gradient,
the state after one SGD step (running statistics included) and the eval-mode output after it equal
``store``'s (rtol 1e-6; 1e-5 for ``deq``), and the input tensor is unchanged.

Not counted as failures, and listed: a spec gnnspec refuses with a ``SpecError`` (e.g. 8 ``egc``
heads on 6 channels), a model whose ``store`` step is not finite or has gradients above 1e6 (an
exploding random model: there a reversible reconstruction loses digits by design), and a ``deq``
solve that stopped at ``max_iter`` (its fixed point depends on the solver). This sweep found the
``dense(jk=cat)`` shape error and the silent non-converged ``deq`` solve.

    python benchmarks/plan_sweep.py                    # 300 specs
    python benchmarks/plan_sweep.py --count 1000 --seed 3 --nodes 50,200
    python benchmarks/plan_sweep.py --device cuda --count 100   # the device's kernels and RNG

On a CUDA device the dropout tape does not replay (it keeps CPU masks only): a checkpointed
segment restores the CPU and device RNG states and draws its masks again, a path only a device
run exercises.

Exit code 1 when any comparison fails.
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from dataclasses import dataclass

import torch

import gnnspec
from gnnspec.lower.deq import DEQFixedPoint, NotConvergedWarning

OPS = ["gcn", "sage", "gat(heads=2)", "gatv2(heads=2)", "gen", "gin", "graphconv", "transformer(heads=2)",
       "egc(heads=2)", "cheb"]
KINDS = ["plain", "res", "res+", "dense", "gcnii", "rev", "deq"]
NORMS = ["batch", "layer", "graph", "instance", "none"]
ACTS = ["relu", "gelu", "elu", "leaky_relu", "prelu", "tanh", "none"]
IN, OUT = 5, 3
EXPLODING = 1e6


@dataclass
class Case:
    text: str
    plans: list[str]
    nodes: int
    deq: bool


def draw_case(rng: random.Random, nodes: tuple[int, int]) -> Case:
    kind, op = rng.choice(KINDS), rng.choice(OPS)
    args = [] if kind == "gcnii" else [f"op={op}"]
    args += [f"norm={'none' if kind == 'deq' else rng.choice(NORMS)}", f"act={rng.choice(ACTS)}",
             f"dropout={rng.choice([0.0, 0.2, 0.5])}"]
    hidden = rng.choice([6, 8, 12])
    if kind == "deq":
        args += ["max_iter=300", "tol=1e-12"]
    else:
        args.append(f"depth={rng.randint(1, 6)}")
    if kind != "dense" and rng.random() < 0.3:
        args.append("tie=true")
    if kind == "rev":
        groups = rng.choice([2, 3])
        hidden = groups * rng.choice([2, 4])
        args.append(f"groups={groups}")
    if kind in ("plain", "res", "res+", "gcnii") and rng.random() < 0.3:
        args.append(f"jk={rng.choice(['last', 'cat', 'max'])}")
    plans = {"rev": ["reversible", "checkpoint(segments=2)"], "deq": ["implicit", "unroll", "checkpoint"]}.get(
        kind, [f"checkpoint(segments={rng.randint(1, 4)})"])
    text = f"hidden: {hidden}\nmodel: linear >> {kind}({', '.join(args)}) >> linear"
    return Case(text, plans, rng.randint(*nodes), kind == "deq")


def random_graph(rng: random.Random, seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g, dtype=torch.float64)
    e = rng.randint(0, 4 * n)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    if e and rng.random() < 0.3:  # duplicates and self-loops
        loops = torch.arange(n).repeat(2, 1)[:, : n // 2]
        edge_index = torch.cat([edge_index, edge_index[:, : e // 3], loops], 1)
    return x, edge_index, torch.randint(0, OUT, (n,), generator=g)


def build(case: Case, plan: str, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = gnnspec.build(case.text, IN, OUT, plan=plan).double().to(device)
    if case.deq:  # scale f's weights toward a contraction so that a fixed point exists
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".solver." in name and p.dim() > 1:
                    p.mul_(0.3 / max(1.0, torch.linalg.matrix_norm(p, 2).item()))
    return model


def step(model: torch.nn.Module, x, edge_index, y):
    """Output, gradients, state after one SGD step, eval output after it, and whether every deq
    solve converged."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.manual_seed(1)
    out = model(x, edge_index)
    torch.nn.functional.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    converged = all(m.forward_info is None or m.forward_info.converged
                    for m in model.modules() if isinstance(m, DEQFixedPoint))
    optimizer.step()
    model.eval()
    with torch.no_grad():
        evaluated = model(x, edge_index)
    return out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}, evaluated, converged


def compare(ref, got, deq: bool) -> None:
    tol = dict(rtol=1e-5, atol=1e-7) if deq else dict(rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got[0], ref[0], **tol, msg="training output")
    assert got[1].keys() == ref[1].keys(), "parameters with a gradient differ"
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], **tol, msg=f"gradient of {name}")
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **tol, msg=f"state {name} after the step")
    torch.testing.assert_close(got[3], ref[3], **tol, msg="eval output after the step")


def exploding(result) -> bool:
    # the eval output too: with running statistics instead of batch statistics a deep stack can
    # overflow in eval (rev(op=egc, norm=batch, act=none), depth 6: inputs of 1e237, then NaN)
    tensors = [result[0], result[3], *result[1].values()]
    return not all(torch.isfinite(t).all() for t in tensors) or max(float(t.abs().max()) for t in tensors if t.numel()) > EXPLODING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", default="3,30", help="node count range, LOW,HIGH")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (models and graphs on it)")
    args = parser.parse_args(argv)
    low, high = (int(v) for v in args.nodes.split(","))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=NotConvergedWarning)  # read from forward_info instead
    warnings.filterwarnings("ignore", category=UserWarning)
    rng = random.Random(args.seed)
    failures, refused, skipped, compared = [], [], [], 0
    for index in range(args.count):
        case = draw_case(rng, (low, high))
        x, edge_index, y = (t.to(args.device) for t in random_graph(rng, index, case.nodes))
        before = x.clone()
        try:
            ref = step(build(case, "store", args.device), x, edge_index, y)
        except gnnspec.SpecError as err:
            refused.append((index, str(err).splitlines()[0]))
            continue
        if exploding(ref) or not ref[4]:
            skipped.append((index, "exploding" if exploding(ref) else "deq not converged"))
            continue
        for plan in case.plans:
            compared += 1
            try:
                compare(ref, step(build(case, plan, args.device), x, edge_index, y), case.deq)
                assert torch.equal(x, before), "the input tensor changed"
            except Exception as err:  # noqa: BLE001 - every failure is reported, with its spec
                failures.append((index, plan, f"{type(err).__name__}: {str(err).splitlines()[0]}", case.text))
    for index, plan, message, text in failures:
        print(f"FAIL [{index}] {plan}: {message}\n  {text.splitlines()[1]} (nodes {low}-{high})")
    print(f"{args.count} specs, {compared} plan comparisons against store: {len(failures)} failed; "
          f"{len(refused)} refused by check, {len(skipped)} skipped "
          f"({sum(s == 'exploding' for _, s in skipped)} exploding, {sum(s != 'exploding' for _, s in skipped)} deq not converged)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
