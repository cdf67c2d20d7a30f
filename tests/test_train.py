"""Training: a spec and a graph in, scores out (`gnnspec train`, SPEC.md section 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gnnspec
from gnnspec.cli import main
from gnnspec.data import load_data
from gnnspec.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "planetoid"
SBM = "sbm(nodes=400, edges=3000, classes=4, features=16)"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GNNSPEC_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_training_on_sbm_learns_well_above_chance():
    spec = gnnspec.parse("hidden: 16\nmodel: res+(op=gcn, depth=2, norm=layer) >> linear\ntrain: epochs=60, lr=0.01")
    _, result = train(spec, load_data(SBM))
    assert result.test_acc > 0.6  # chance is 0.25
    assert result.epochs == 60 and 1 <= result.best_epoch <= 60
    assert result.peak_bytes and result.peak_bytes > 0


def test_same_seed_same_loss_curve_and_different_seed_differs():
    spec = gnnspec.parse("hidden: 16\nmodel: rev(op=sage, depth=3, dropout=0.3) >> linear\ntrain: epochs=8")
    data = load_data(SBM)
    curve = lambda seed: [r.loss for r in train(spec, data, seed=seed)[1].history]  # noqa: E731
    assert curve(3) == curve(3)
    assert curve(3) != curve(4)


def test_patience_stops_early_and_reports_the_best_validation_epoch():
    spec = gnnspec.parse("model: linear\ntrain: epochs=500, patience=5, lr=1e-12")  # nothing improves
    _, result = train(spec, load_data(SBM))
    assert result.best_epoch == 1 and result.epochs == 6


def test_per_stage_weight_decay_reaches_the_optimizer():
    from gnnspec.train import make_optimizer

    spec = gnnspec.parse("hidden: 8\nmodel: linear >> gcnii(depth=2, weight_decay=0.01) >> linear\ntrain: weight_decay=5e-4")
    model = gnnspec.build(spec, 4, 2)
    decays = sorted(g["weight_decay"] for g in make_optimizer(model, spec.train).param_groups)
    assert decays == [5e-4, 0.01]


@pytest.mark.skipif(not (SHARED / "Cora" / "raw").is_dir(), reason="the shared Cora files are not beside this checkout")
def test_train_json_on_cora_from_the_shared_data(capsys):
    code, out, _ = run(
        capsys, "train", "specs/gcn_cora.gnn", "--data", "cora", "--data-root", str(SHARED), "--epochs", "60", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"spec", "data", "plan", "epochs", "best_epoch", "val_acc", "test_acc", "seconds", "peak_bytes"}
    assert data["spec"] == "gcn_cora" and data["data"] == "cora" and data["epochs"] == 60
    assert data["test_acc"] > 0.6  # 7 classes, the largest 30%; GCN reaches ~0.78 within 60 epochs


def test_train_prints_a_summary_and_saves(capsys, tmp_path):
    target = tmp_path / "m.pt"
    code, out, _ = run(capsys, "train", "--expr", "rev(depth=4)", "--data", SBM, "--epochs", "3", "--save", str(target))
    assert code == 0 and "test accuracy" in out
    assert any(k.startswith("stages.1.") for k in torch.load(target, weights_only=True))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "coraa"], "did you mean `cora`"),
        (["--data", "sbm(nodes=10, edgez=5)"], "did you mean `edges`"),
        (["--data", "/nonexistent/graph.pt"], "/nonexistent/graph.pt"),
        (["--data", "citeseer", "--data-root", "/nonexistent"], "CiteSeer"),
        (["--data", SBM, "--device", "tpu"], "invalid choice"),
        (["--data", SBM, "--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
    ],
)
def test_bad_data_arguments_exit_2(capsys, argv, message):
    code, out, err = run(capsys, "train", "--expr", "rev", "--epochs", "1", *argv)
    assert code == 2 and message in err


def test_widths_that_contradict_the_data_exit_2(capsys, tmp_path):
    spec = tmp_path / "m.gnn"
    spec.write_text("in: 99\nmodel: rev\n")
    code, _, err = run(capsys, "train", str(spec), "--data", SBM, "--epochs", "1")
    assert code == 2 and f"{spec}:1:5:" in err and "99" in err and "16" in err


def test_train_rejects_a_negative_seed_and_no_epochs():
    data = load_data(SBM)
    spec = gnnspec.parse("rev")
    with pytest.raises(ValueError, match="seed must be at least 0, got -1"):
        train(spec, data, seed=-1)
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        train(spec, data, epochs=0)


@pytest.mark.parametrize("budget, shown", [("1GB", "1GB"), (2**30, "1GiB")])
def test_a_budget_given_to_train_reads_in_its_plan(budget, shown):
    # a budget written as text had raised TypeError in the plan's label
    data = load_data("sbm(nodes=300, edges=1500, classes=3, features=8)")
    _, result = train(gnnspec.parse("rev(depth=2)"), data, epochs=1, budget=budget)
    assert result.plan == f"auto(budget={shown}) -> store"
