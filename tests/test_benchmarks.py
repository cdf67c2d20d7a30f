"""``benchmarks/plans.py --quick`` runs and reports what its table claims: every peer computes
gnnspec's function, and the memory plans keep less than ``store`` (timings are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_plans_benchmark_quick_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plans.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Target checks" in proc.stdout
    assert ("pinned to CPU" in proc.stdout) == hasattr(os, "sched_setaffinity")
    record = json.loads((tmp_path / "plans.json").read_text())
    rows = record["rows"]
    cells = {(r["op"], r["depth"], r["kind"]) for r in rows}
    assert {op for op, _, _ in cells} == {"gcn", "sage", "gat"}
    assert {kind for _, _, kind in cells} == {"plain", "res+", "rev"}
    for op, depth, kind in cells:
        cell = [r for r in rows if (r["op"], r["depth"], r["kind"]) == (op, depth, kind)]
        # checkpoint methods carry their segment count: "gnnspec checkpoint(2)"
        methods = {r["method"].split("(")[0] if "checkpoint" in r["method"] else r["method"]: r for r in cell}
        assert len(methods) == len(cell), [r["method"] for r in cell]
        expected = {"gnnspec store", "gnnspec checkpoint"} | {
            "plain": {"torch Sequential", "torch checkpoint_sequential"},
            "res+": {"pyg DeepGCNLayer", "pyg DeepGCNLayer(ckpt_grad)"},
            "rev": {"gnnspec reversible", "pyg GroupAddRev(disable)", "pyg GroupAddRev"},
        }[kind]
        assert expected == methods.keys(), (op, depth, kind, methods.keys())
        for r in cell:  # every method of a cell computes one function (eval mode)
            assert r["out_diff"] <= 1e-5, (op, depth, kind, r["method"], r["out_diff"])
        store = methods["gnnspec store"]["peak_bytes"]
        assert methods["gnnspec checkpoint"]["peak_bytes"] <= store
        if kind == "rev":
            rev = methods["gnnspec reversible"]["peak_bytes"]
            assert rev <= methods["pyg GroupAddRev"]["peak_bytes"]
            # two layers under store keep about what reversible's backward holds for one
            assert rev < store or depth < 4
    try:
        import matplotlib  # noqa: F401  (the `bench` extra)
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout
    else:
        assert (tmp_path / "plans.png").exists()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_plans_pins_its_method_threads_to_one_cpu() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from plans import pin_to_cpus
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    before = os.sched_getaffinity(0)
    try:
        assert pin_to_cpus(-1, 1) == [] and os.sched_getaffinity(0) == before
        first = min(before)
        assert pin_to_cpus(None, 1) == [first] and os.sched_getaffinity(0) == {first}
        seen: list[set[int]] = []
        thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        thread.start()
        thread.join()
        assert seen == [{first}]  # a method's thread, started afterwards, runs on the same CPU
        with pytest.raises(SystemExit, match="may use CPUs"):
            pin_to_cpus(max(before) + 1, 1)
    finally:
        os.sched_setaffinity(0, before)


def test_median_interval_is_the_binomial_order_statistics() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from plans import median_interval
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # n = 9: P(Binomial(9, 1/2) <= 1) = 10/512 <= 2.5% < P(<= 2) = 46/512, so the 2nd and 8th values
    assert median_interval([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0]) == (2.0, 8.0)
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (1.0, 6.0)  # P(Binomial(6, 1/2) = 0) = 1/64 <= 2.5%
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # even min-max covers only 93.75%


def test_plans_summary_says_when_the_reversible_target_is_below_its_floor() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from plans import Row, summary
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from rich.console import Console

    def row(method: str, op: str, cpu: list[float], floor: float | None) -> Row:
        ratio = cpu[0]  # store steps take 1.0
        return Row(op=op, depth=64, kind="rev", method=method, time_ratio=ratio, ratio_lo=ratio, ratio_hi=ratio,
                   cpu_ratio=ratio, cpu_lo=ratio, cpu_hi=ratio, cpu_min_ratio=ratio, floor=floor, peak_bytes=1,
                   peak_ratio=1.0, out_diff=0.0, is_base=method == "gnnspec store", times=cpu, cpu_times=cpu)

    rows = [row("gnnspec store", "gcn", [1.0], None), row("gnnspec reversible", "gcn", [1.45], 1.43),
            row("gnnspec store", "gat", [1.0], None), row("gnnspec reversible", "gat", [1.38], 1.36)]
    console = Console(record=True, width=300)
    checks = {c["op"]: c for c in summary(rows, console)["checks"]}
    text = console.export_text()
    assert checks["gcn"]["target_below_floor"] and not checks["gcn"]["time_ok"]
    assert not checks["gat"]["target_below_floor"] and checks["gat"]["time_ok"]
    assert "floor 1.43 (above the target): time MISS" in text and "floor 1.36: time PASS" in text


def test_plan_sweep_finds_every_plan_equal_to_store() -> None:
    """A small run of the random differential sweep (all ops, stack kinds, norms, activations)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plan_sweep.py"), "--count", "25", "--seed", "7"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("25 specs, ") and ": 0 failed;" in summary, summary
    compared = int(summary.split(", ")[1].split(" ")[0])
    assert compared >= 25, summary  # every spec that builds compares at least one plan


def test_estimator_accuracy_jk_sample_never_underestimates(tmp_path: Path) -> None:
    """``estimator_accuracy.py --jk --quick --seed 4``: a dozen stacks with ``jk`` and ``act`` drawn are
    measured; none is estimated more than 1% below its measured peak (the estimate may err high
    where torch's checkpoint stops a recomputation early, never low). Seed 4 draws
    ``gcnii(depth=2, jk=cat, act=none, ...)``, which was 7.2% low before the last concatenation
    was modelled inside the loop's last step."""
    out = tmp_path / "acc"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "estimator_accuracy.py"), "--jk", "--quick", "--seed", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 12
    assert {r["stack"] for r in rows} <= {"plain", "res", "res+", "gcnii"}
    assert any(r["jk"] == "cat" for r in rows) and any(r["jk"] == "max" for r in rows)
    for r in rows:
        assert r["error"] > -0.01, (r["expr"], r["plan_text"], r["error"])


def test_checkpoint_floor_quick_run(tmp_path: Path) -> None:
    """The decomposition's replayed forward computes what the recorded forward computed (the
    masks replayed, none drawn), and every cell reports its parts (timings are not asserted)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "checkpoint_floor.py"), "--quick", "--ops", "gcn,gat",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "checkpoint_floor.json").read_text())
    cells = record["cells"]
    assert {(c["op"], c["kind"]) for c in cells} == {(op, kind) for op in ("gcn", "gat") for kind in ("plain", "res+")}
    for c in cells:
        assert c["replay_equal"] is True, c
        # depth 9, checkpoint's default k = 3: segments of 3, the last runs plainly
        assert (c["depth"], c["segments"], c["recomputed_layers"]) == (9, 3, 6), c
        assert c["ratio"] > 0 and c["replayed_fwd_ms"] > 0 and c["store_step_ms"] > 0, c
        # the bound is the parts' sum (not asserted above 1: at 300 nodes the two forwards' times
        # differ by less than their noise)
        depth, fwd_gap = c["depth"], c["ckpt_fwd_ms"] - c["store_fwd_ms"]
        expected = 1 + (c["recomputed_layers"] * c["replayed_fwd_ms"] + fwd_gap * depth) / (c["store_step_ms"] * depth)
        assert c["bound"] == pytest.approx(expected, rel=1e-9), c
        assert c["overhead"] == pytest.approx(c["recompute_ms"] / c["replayed_fwd_ms"] - 1, rel=1e-9, abs=1e-12), c
    assert "bound" in proc.stdout and "replay == record" in proc.stdout


def test_device_check_smoke_run_on_cpu(tmp_path: Path) -> None:
    """The prepared device run works end to end on the CPU: every plan's peak is its estimate
    (within 5%), the equivalence sweep and the estimator sample pass, the record is written."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu", "--quick",
         "--ops", "gcn,gat", "--kinds", "res+,rev", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "device_check.json").read_text())
    assert record["device"] == "cpu" and set(record["parts"]) == {"plans", "equivalence", "estimator"}
    cells = record["parts"]["plans"]["cells"]
    assert {(c["op"], c["kind"], c["plan"]) for c in cells} == {
        (op, kind, plan) for op in ("gcn", "gat") for kind in ("res+", "rev")
        for plan in ("store", "checkpoint(segments=2)") + (("reversible",) if kind == "rev" else ())
    }
    for c in cells:
        assert abs(c["estimated_bytes"] - c["peak_bytes"]) <= 0.05 * c["peak_bytes"], c
        if c["plan"] == "store":
            assert c["time_ratio"] == 1.0
        else:  # the memory plans keep less than store
            store = next(s for s in cells if (s["op"], s["kind"], s["plan"]) == (c["op"], c["kind"], "store"))
            assert c["peak_bytes"] < store["peak_bytes"], (c, store)
    assert record["parts"]["equivalence"]["returncode"] == 0
    assert ": 0 failed;" in record["parts"]["equivalence"]["summary"]
    assert record["parts"]["estimator"]["returncode"] == 0


def test_device_check_without_cuda_says_so() -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device here" in proc.stdout


def _instruction_counts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import instruction_counts
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return instruction_counts


def test_instruction_counts_reads_callgrind_dumps() -> None:
    """The counts come from the dump's ``summary`` line (the part since the counters were zeroed),
    labelled by the ``--dump=<label>`` trigger; per step and per forward over ``--steps``."""
    ic = _instruction_counts()
    dump = ("# callgrind format\nversion: 1\npart: 3\n\ndesc: Trigger: dump reversible:step\n\n"
            "positions: line\nevents: Ir\nsummary: 4705176863\n\nob=(4) /usr/lib/libm.so.6\n")
    assert ic.parse_dump(dump) == ("reversible:step", 4705176863)
    with pytest.raises(ValueError, match="not a callgrind dump"):
        ic.parse_dump("version: 1\nsummary: 5\n")
    counts = {"store:step": 3438076906, "store:forward": 1390899449,
              "reversible:step": 4705176863, "reversible:forward": 1389953397}
    steps = ic.per_step(counts, 2)
    assert steps == {"store": {"step": 1719038453.0, "forward": 695449724.5},
                     "reversible": {"step": 2352588431.5, "forward": 694976698.5}}


def test_instruction_counts_needs_valgrind(monkeypatch, capsys) -> None:
    ic = _instruction_counts()
    monkeypatch.setattr(ic.shutil, "which", lambda name: None)
    assert ic.main(["--ops", "gcn"]) == 2
    assert "valgrind" in capsys.readouterr().err
