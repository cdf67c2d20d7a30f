"""Seconds per training epoch: the GCNII-64 Cora spec against torch-geometric's own GCNII example.

Issue 5 asks that ``specs/gcnii_cora.gnn`` train no slower than torch-geometric's
``examples/gcn2_cora.py`` (ratio gnnspec / PyG at most 1.0) on the same data, in one process.

* **gnnspec**: ``gnnspec.build(specs/gcnii_cora.gnn)`` with the optimizer ``gnnspec.train`` makes
  (per-stage weight decay); one epoch is the body of ``gnnspec.train.train``'s loop: a training
  step (train mode, ``zero_grad(set_to_none=True)``, forward, cross-entropy on the training nodes,
  backward, Adam step) and an evaluation forward under ``no_grad`` with the accuracies.
* **PyG**: the ``Net`` of ``examples/gcn2_cora.py`` (``Linear`` 1433 -> 64, 64 ``GCN2Conv(64,
  alpha=0.1, theta=0.5, layer, shared_weights=True, normalize=False)``, ``Linear`` 64 -> 7, dropout
  0.6, log-softmax), its two-group Adam, and its ``train()`` + ``test()`` as one epoch, on the data
  transformed as the example does (``NormalizeFeatures`` -- a no-op here, the loader already
  row-normalises -- then ``GCNNorm`` and ``ToSparseTensor``: the normalisation is computed once and
  every layer multiplies by a sparse ``adj_t``; without ``torch_sparse`` installed ``adj_t`` is a
  ``torch.sparse_csr`` tensor).
* **PyG (edge_index)**, for reference: the same ``Net`` called with ``edge_index`` and the
  ``gcn_norm`` weights computed once (scatter-based message passing, the form gnnspec uses).

The PyG models get the gnnspec model's weights, and their eval-mode outputs are checked to equal
gnnspec's (``max |d log_softmax|``), so all three compute one function on the same data. Timing
uses ``torch.set_num_threads(--threads)`` (default 1); after ``--warmup`` epochs of each, every
round runs one epoch of each model in an order rotated every round, ``--rounds`` times. Reported:
the median seconds per epoch of each, and the ratio gnnspec / PyG as the ratio of medians and as
the median of the per-round ratios (paired, so drifts in machine load cancel). With ``--profile``
it also prints the ops that take the most self CPU time in a few epochs of each model.

    python benchmarks/train_speed.py                    # 3 warm-up epochs, 30 rounds
    python benchmarks/train_speed.py --rounds 10 --profile
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn import Linear

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch_geometric.transforms as T  # noqa: E402
from torch_geometric.data import Data  # noqa: E402
from torch_geometric.nn import GCN2Conv  # noqa: E402
from torch_geometric.nn.conv.gcn_conv import gcn_norm  # noqa: E402

import gnnspec  # noqa: E402
from gnnspec.data import load_data  # noqa: E402
from gnnspec.train import make_optimizer  # noqa: E402


class Net(torch.nn.Module):
    """torch-geometric ``examples/gcn2_cora.py``'s model, verbatim (but for the sizes as arguments)."""

    def __init__(self, in_channels, out_channels, hidden_channels, num_layers, alpha, theta,
                 shared_weights=True, dropout=0.0):
        super().__init__()

        self.lins = torch.nn.ModuleList()
        self.lins.append(Linear(in_channels, hidden_channels))
        self.lins.append(Linear(hidden_channels, out_channels))

        self.convs = torch.nn.ModuleList()
        for layer in range(num_layers):
            self.convs.append(
                GCN2Conv(hidden_channels, alpha, theta, layer + 1,
                         shared_weights, normalize=False))

        self.dropout = dropout

    def forward(self, x, adj_t, edge_weight=None):
        x = F.dropout(x, self.dropout, training=self.training)
        x = x_0 = self.lins[0](x).relu()

        for conv in self.convs:
            x = F.dropout(x, self.dropout, training=self.training)
            x = conv(x, x_0, adj_t, edge_weight)
            x = x.relu()

        x = F.dropout(x, self.dropout, training=self.training)
        x = self.lins[1](x)

        return x.log_softmax(dim=-1)


def pyg_optimizer(model: Net) -> torch.optim.Optimizer:
    """The example's optimizer: weight decay 0.01 on the convolutions, 5e-4 on the linear layers."""
    return torch.optim.Adam([
        dict(params=model.convs.parameters(), weight_decay=0.01),
        dict(params=model.lins.parameters(), weight_decay=5e-4),
    ], lr=0.01)


def copy_weights(spec_model: torch.nn.Module, net: Net) -> None:
    """Load the gnnspec model's weights into the example's ``Net`` (same modules, other names)."""
    linears = [s.module for s in spec_model.stages if s.kind == "linear"]
    (stack,) = [s for s in spec_model.stages if s.kind == "gcnii"]
    assert len(linears) == 2 and len(stack.layers) == len(net.convs)
    with torch.no_grad():
        for mine, theirs in zip(linears, net.lins):
            theirs.load_state_dict(mine.state_dict())
        for layer, conv in zip(stack.layers, net.convs):
            conv.load_state_dict(layer.conv.state_dict())


def make_epoch_gnnspec(model, optimizer, x, edge_index, y, masks) -> Callable[[], float]:
    train_mask, val_mask, test_mask = masks

    def epoch() -> float:
        # gnnspec.train.train's loop body: a step, then an evaluation forward and the accuracies.
        model.train()
        optimizer.zero_grad(set_to_none=True)
        out = model(x, edge_index)
        loss = F.cross_entropy(out[train_mask], y[train_mask])
        loss.backward()
        optimizer.step()
        float(loss.detach())
        model.eval()
        with torch.no_grad():
            pred = model(x, edge_index).argmax(dim=-1)
        return float((pred[val_mask] == y[val_mask]).float().mean()) + float((pred[test_mask] == y[test_mask]).float().mean())

    return epoch


def make_epoch_pyg(model, optimizer, data, graph_args) -> Callable[[], float]:
    # The example's train() and test().
    def train() -> float:
        model.train()
        optimizer.zero_grad()
        out = model(data.x, *graph_args)
        loss = F.nll_loss(out[data.train_mask], data.y[data.train_mask])
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def test():
        model.eval()
        pred, accs = model(data.x, *graph_args).argmax(dim=-1), []
        for _, mask in data('train_mask', 'val_mask', 'test_mask'):
            accs.append(int((pred[mask] == data.y[mask]).sum()) / int(mask.sum()))
        return accs

    def epoch() -> float:
        train()
        return sum(test())

    return epoch


def timed(fn: Callable[[], object]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def profile(name: str, epoch: Callable[[], object], epochs: int = 5, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(epochs):
            epoch()
    print(f"\n--- {name}: top ops by self CPU time over {epochs} epochs")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def default_root() -> str:
    return os.environ.get("GNNSPEC_DATA") or str(ROOT.parent / "shared" / "data" / "planetoid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "gcnii_cora.gnn"))
    parser.add_argument("--data-root", default=default_root())
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-edge-index", action="store_true", help="skip the PyG edge_index reference")
    parser.add_argument("--profile", action="store_true", help="print the top ops of each model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # torch's beta warnings about sparse CSR tensors (the example's adj_t); nothing to act on.
    warnings.filterwarnings("ignore", message=r"Sparse (CSR tensor support|invariant checks)")

    data = load_data("cora", data_root=args.data_root)
    spec = gnnspec.load(args.spec)

    # gnnspec, as gnnspec.train builds it.
    torch.manual_seed(args.seed)
    model = gnnspec.build(spec, data.num_features, data.num_classes)
    optimizer = make_optimizer(model, spec.train)
    masks = (data.train_mask, data.val_mask, data.test_mask)
    methods: dict[str, Callable[[], float]] = {
        "gnnspec": make_epoch_gnnspec(model, optimizer, data.x, data.edge_index, data.y, masks)
    }

    # torch-geometric's example, on the same data, transformed as the example does.
    pyg_data = Data(x=data.x.clone(), edge_index=data.edge_index.clone(), y=data.y.clone(),
                    train_mask=data.train_mask, val_mask=data.val_mask, test_mask=data.test_mask)
    base = T.NormalizeFeatures()(pyg_data.clone())
    sparse = T.Compose([T.GCNNorm(), T.ToSparseTensor()])(base.clone())
    hidden = model.stages[3].layers[0].conv.channels
    depth = len(model.stages[3].layers)
    net = Net(data.num_features, data.num_classes, hidden, depth, alpha=0.1, theta=0.5,
              shared_weights=True, dropout=0.6)
    copy_weights(model, net)
    methods["pyg"] = make_epoch_pyg(net, pyg_optimizer(net), sparse, (sparse.adj_t,))
    variants = {"pyg": (net, sparse.x, (sparse.adj_t,))}
    if not args.no_edge_index:
        net_ei = copy.deepcopy(net)
        ei, ew = gcn_norm(base.edge_index, None, base.num_nodes, add_self_loops=True)
        methods["pyg (edge_index)"] = make_epoch_pyg(net_ei, pyg_optimizer(net_ei), base, (ei, ew))
        variants["pyg (edge_index)"] = (net_ei, base.x, (ei, ew))

    # Same function: eval-mode outputs (log-softmax) of the copies equal gnnspec's.
    model.eval()
    with torch.no_grad():
        ours = model(data.x, data.edge_index).log_softmax(dim=-1)
        for name, (m, x, graph_args) in variants.items():
            m.eval()
            diff = float((m(x, *graph_args) - ours).abs().max())
            print(f"max |d log_softmax| gnnspec vs {name}: {diff:.2e}")
            if diff > 1e-4:
                print(f"warning: {name} does not compute the gnnspec model's function")

    names = list(methods)
    for name in names:
        for _ in range(args.warmup):
            methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(methods[name]))

    print(f"\nseconds per epoch (train step + evaluation), {args.rounds} rounds, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}:")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name in names:
        ts = times[name]
        print(f"  {name:18s} median {medians[name]:.4f}  min {min(ts):.4f}  max {max(ts):.4f}")
    for ref in names[1:]:
        paired = statistics.median(a / b for a, b in zip(times["gnnspec"], times[ref]))
        print(f"ratio gnnspec / {ref}: {medians['gnnspec'] / medians[ref]:.3f} (of medians), "
              f"{paired:.3f} (median of per-round ratios)")
    ratio = medians["gnnspec"] / medians["pyg"]
    print(f"target gnnspec / pyg <= 1.0: {'met' if ratio <= 1.0 else 'NOT met'} ({ratio:.3f})")

    if args.profile:
        for name in names:
            profile(name, methods[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
