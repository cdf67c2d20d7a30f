"""The command line as a user runs it: output, exit codes, no tracebacks (SPEC.md section 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gnnspec.cli import main

SPECS = Path(__file__).resolve().parent.parent / "specs"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_check_ok_and_error(tmp_path, capsys):
    good = tmp_path / "good.gnn"
    good.write_text("model: linear >> rev(depth=4) >> linear\n")
    bad = tmp_path / "bad.gnn"
    bad.write_text("hidden: 64\nmodel: rev(op=gatt)\n")
    code, out, err = run(capsys, "check", str(good))
    assert code == 0 and "ok:" in out
    code, out, err = run(capsys, "check", str(good), str(bad))
    assert code == 2
    assert f"{bad}:2:15: unknown op `gatt`" in err
    assert "  model: rev(op=gatt)\n" in err and "\n                ^^^^\n" in err
    assert "hint: did you mean `gat`?" in err


def test_check_json_prints_the_ir(capsys):
    code, out, _ = run(capsys, "check", "--json", "--expr", "rev(depth=3)")
    assert code == 0
    data = json.loads(out)
    assert data["model"][0]["kind"] == "rev" and data["model"][0]["depth"] == 3


def test_check_json_of_several_files_is_one_document_keyed_by_path(tmp_path, capsys):
    good = tmp_path / "good.gnn"
    good.write_text("name: first\nmodel: rev(depth=3)\n")
    bad = tmp_path / "bad.gnn"
    bad.write_text("model: rev(op=gatt)\n")
    code, out, err = run(capsys, "check", "--json", str(good), str(bad))
    assert code == 2 and "unknown op `gatt`" in err
    data = json.loads(out)  # several pretty-printed objects one after another had failed here
    assert list(data) == [str(good), str(bad)]
    assert data[str(good)]["name"] == "first" and data[str(bad)] is None
    code, out, _ = run(capsys, "check", "--json", str(bad))
    assert code == 2 and out == ""


def test_a_spec_file_larger_than_16_mib_is_refused_without_reading_it_whole(capsys):
    code, out, err = run(capsys, "check", "/dev/zero")  # had read without end
    assert code == 2 and out == ""
    assert "/dev/zero is larger than 16 MiB, too large for a spec file" in err


def test_expr_and_stdin(capsys, monkeypatch):
    import io

    code, _, err = run(capsys, "check", "--expr", "rev(groups=1)")
    assert code == 2 and "<expr>:1:12: `groups` must be at least 2" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"model: rev >> linear\n")))
    code, out, _ = run(capsys, "fmt", "-")
    assert code == 0 and out == "model: rev >> linear\n"


def test_a_yaml_spec_on_standard_input_is_read_as_yaml(capsys, monkeypatch):
    """Standard input has no suffix: text that is not `.gnn` syntax but a YAML mapping is YAML (it
    had failed as `.gnn`: "expected a stage")."""
    import io

    def stdin(text: str) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))

    yaml_text = (SPECS / "revgnn_deep.yaml").read_text()
    stdin(yaml_text)
    code, out, _ = run(capsys, "check", "--json", "-")
    assert code == 0 and json.loads(out) == json.loads(run(capsys, "check", "--json", str(SPECS / "revgnn_deep.gnn"))[1])
    stdin(yaml_text)
    code, out, _ = run(capsys, "fmt", "-")
    assert code == 0 and out == yaml_text  # formatted as YAML, comments kept
    stdin("model:\n  - linear\n  - rev(op=gatt)\n")
    code, _, err = run(capsys, "check", "-")
    assert code == 2 and err.startswith("<stdin>:3:12: unknown op `gatt`")
    # YAML that YAML cannot read either: its error, not the `.gnn` parser's "unexpected `:`"
    stdin("model: linear\ntrain:\n  lr: 0.1\n   seed: 2\n")
    code, _, err = run(capsys, "check", "-")
    assert code == 2 and err.startswith("<stdin>:4:8: invalid YAML: mapping values are not allowed here")
    stdin("model: linear\n---\nmodel: rev\n")
    code, _, err = run(capsys, "check", "-")
    assert code == 2 and err.startswith("<stdin>:2:1: invalid YAML")


def test_fmt_prints_canonical_text(tmp_path, capsys):
    path = tmp_path / "m.gnn"
    path.write_text("# keep me\nmodel:   linear>>rev( depth = 4 )  # deep\nseed: 0\n")
    code, out, _ = run(capsys, "fmt", str(path))
    assert code == 0 and out == "# keep me\nmodel: linear >> rev(depth=4)  # deep\n"


def test_fmt_check_reports_and_exits_1_without_writing(tmp_path, capsys):
    path = tmp_path / "m.gnn"
    original = "model:   rev\n"
    path.write_text(original)
    code, out, err = run(capsys, "fmt", "--check", str(path))
    assert code == 1 and "would reformat" in err and "+model: rev" in out
    assert path.read_text() == original
    path.write_text("model: rev\n")
    assert run(capsys, "fmt", "--check", str(path))[0] == 0


def test_fmt_write_rewrites_and_never_half_writes(tmp_path, capsys):
    path = tmp_path / "m.gnn"
    path.write_text("model:   rev\n")
    assert run(capsys, "fmt", "--write", str(path))[0] == 0
    assert path.read_text() == "model: rev\n"
    broken = "model: rev(\n"
    path.write_text(broken)
    code, _, err = run(capsys, "fmt", "--write", str(path))
    assert code == 2 and path.read_text() == broken
    assert [p.name for p in tmp_path.iterdir()] == ["m.gnn"]


def test_fmt_reports_each_invalid_file_and_formats_the_others(tmp_path, capsys):
    bad, good = tmp_path / "bad.gnn", tmp_path / "good.gnn"
    bad.write_text("model: rev(op=gatt)\n")
    good.write_text("model:   linear>>rev\n")
    code, _, err = run(capsys, "fmt", "--write", str(bad), str(good))
    assert code == 2 and "bad.gnn:1:15: unknown op `gatt`" in err
    assert good.read_text() == "model: linear >> rev\n"


def test_fmt_write_keeps_permissions_and_writes_through_a_symlink(tmp_path, capsys):
    target, link = tmp_path / "t.gnn", tmp_path / "l.gnn"
    target.write_text("model:   rev\n")
    target.chmod(0o640)
    link.symlink_to(target)
    assert run(capsys, "fmt", "--write", str(link))[0] == 0
    assert link.is_symlink() and target.read_text() == "model: rev\n"
    assert target.stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_save_into_a_fifo_or_device_writes_into_it_instead_of_replacing_it(tmp_path, capsys):
    """The atomic writer had renamed a regular file over the FIFO (and, as root, over /dev/null)."""
    import stat
    import threading

    regular, fifo = tmp_path / "regular.pt", tmp_path / "pipe.pt"
    expr = ["compile", "--expr", "rev(depth=2)", "--in", "4", "--out", "2"]
    assert run(capsys, *expr, "--save", str(regular))[0] == 0
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert run(capsys, *expr, "--save", str(fifo))[0] == 0
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert len(received[0]) == regular.stat().st_size > 0
    code, _, err = run(capsys, *expr, "--save", "/dev/null")
    assert code == 0 and stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("where, message", [
    ("dir", "is a directory, not a file"), ("", "needs a file name"),
    ("file.pt/sub.pt", "is a file, not a directory"),
    ("new/", "new/ names a directory, not a file"),  # was written as a file named `new`
    ("a" * 300 + ".pt", "File name too long"),  # was an internal error (exit 1)
    ("new/" + "a" * 300 + ".pt", "File name too long"),  # refused at the write: `new/` is not left behind
    ("loop/x.pt", "Symlink loop"),  # was an internal error (exit 1)
])
def test_save_to_an_unwritable_path_is_refused_before_any_work(tmp_path, capsys, monkeypatch, where, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.pt").write_bytes(b"x")
    (tmp_path / "loop").symlink_to("loop")
    code, _, err = run(capsys, "compile", "--expr", "rev", "--in", "3", "--out", "2", "--save", where)
    assert code == 2 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file.pt", "loop"]  # no temporary left
    assert (tmp_path / "file.pt").read_bytes() == b"x"


def test_a_yaml_spec_nested_too_deeply_is_a_located_error(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("model: " + "[" * 900 + "linear" + "]" * 900 + "\n")
    code, _, err = run(capsys, "check", str(path))
    assert code == 2 and "deep.yaml:1:1: YAML nested too deeply to read" in err


@pytest.mark.parametrize("argv, message", [
    (["--expr", "rev(depth=2)", "--in", str(2**64), "--out", "2"], "--in: expected an integer of at most 2,147,483,647"),
    (["--expr", "rev(depth=2, hidden=18446744073709551616)", "--in", "3", "--out", "2"],
     "<expr>:1:21: `hidden` must be at most 2**31 - 1, got 18446744073709551616"),
    (["--expr", "mlp(dims=[4, 18446744073709551616])", "--in", "3", "--out", "2"],
     "widths in `dims` must be at most 2**31 - 1"),
])
def test_a_width_beyond_32_bits_is_refused(capsys, argv, message):
    # was an internal error (exit 1) with torch's C++ stack: "Overflow when unpacking long long"
    code, _, err = run(capsys, "compile", *argv)
    assert code == 2 and message in err


def test_compile_save_writes_the_initial_weights_of_the_spec_seed(capsys, tmp_path):
    import torch

    import gnnspec

    states = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        spec = tmp_path / f"{name}.gnn"
        spec.write_text(f"in: 3\nout: 2\nseed: {seed}\nmodel: rev(depth=2)\n")
        code, _, _ = run(capsys, "compile", str(spec), "--save", str(tmp_path / f"{name}.pt"))
        assert code == 0
        states.append(torch.load(tmp_path / f"{name}.pt"))
    torch.manual_seed(7)
    built = gnnspec.build("in: 3\nout: 2\nseed: 7\nmodel: rev(depth=2)").state_dict()
    for first, second, third in zip(states[0].values(), states[1].values(), states[2].values()):
        assert torch.equal(first, second)  # were drawn afresh on every run
    assert any(not torch.equal(a, c) for a, c in zip(states[0].values(), states[2].values()))
    assert all(torch.equal(built[k], v) for k, v in states[0].items())


def test_standard_input_closed_or_an_empty_path_is_a_clear_error(tmp_path):
    closed = subprocess.run([sys.executable, "-m", "gnnspec.cli", "check", "-"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, preexec_fn=lambda: os.close(0))
    assert closed.returncode == 2 and "cannot read <stdin>: standard input is closed" in closed.stderr
    empty = subprocess.run([sys.executable, "-m", "gnnspec.cli", "check", ""], capture_output=True, text=True)
    assert empty.returncode == 2 and "an empty file name" in empty.stderr
    assert "Traceback" not in closed.stderr + empty.stderr


def test_a_padded_plan_option_reports_the_planned_choice(capsys):
    code, out, _ = run(capsys, "compile", "--expr", "rev(depth=2)", "--in", "3", "--out", "2", "--plan", " auto ",
                       "--json")
    assert code == 0 and json.loads(out)["plan"] == "auto -> store"  # was " auto "


def test_a_seed_beyond_64_bits_is_refused(tmp_path, capsys):
    path = tmp_path / "s.gnn"
    path.write_text("model: linear\nseed: 99999999999999999999999\n")
    code, _, err = run(capsys, "check", str(path))
    assert code == 2 and "s.gnn:2:7: `seed` must be at most 2**63 - 1" in err
    code, _, err = run(capsys, "train", "--expr", "linear", "--seed", str(2**64), "--data", "sbm(nodes=50)")
    assert code == 2 and "--seed" in err


def test_estimating_an_op_at_uncalibrated_arguments_calibrates_it(capsys):
    code, out, _ = run(capsys, "estimate-mem", "--expr", "plain(depth=2, op=cheb(k=3))",
                       "--nodes", "10", "--edges", "5", "--in", "4", "--out", "2", "--json")
    assert code == 0 and json.loads(out)["chosen"] == "store"


def test_schema_is_json(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0 and json.loads(out)["title"].startswith("gnnspec")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "usage"),
        (["frobnicate"], "invalid choice"),
        (["check"], "give a SPEC path"),
        (["check", "--expr", "rev", "x.gnn"], "not both"),
        (["check", "/nonexistent/x.gnn"], "no such file"),
        (["fmt", "--check", "--write", "x.gnn"], "not allowed with"),
        (["estimate-mem", "--expr", "rev", "--budget", "16Gib"], "did you mean `GiB`?"),
        (["estimate-mem", "--expr", "rev", "--budget", "lots"], "`lots` is not a size"),
        (["compile", "--expr", "rev", "--budget", "-5"], "`-5` is not a size"),
        (["train", "--expr", "rev", "--data", "cora", "--budget", "0B"], "a budget must be positive"),
        (["estimate-mem", "--expr", "rev", "--nodes", "10"], "give both --nodes and --edges"),
    ],
)
def test_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in out + err


def test_console_script_is_installed_and_never_shows_a_traceback(tmp_path):
    binary = tmp_path / "b.gnn"
    binary.write_bytes(b"\x00\x01\x02model")
    result = subprocess.run(
        [sys.executable, "-m", "gnnspec.cli", "check", str(binary), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "binary data" in result.stderr and "is a directory" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_compile_json_lists_inserted_stages_and_parameters(capsys, tmp_path):
    code, out, _ = run(capsys, "compile", "--json", "--expr", "rev(depth=3, op=gat)", "--in", "5", "--out", "2", "--plan", "reversible")
    assert code == 0
    data = json.loads(out)
    assert data["plan"] == "reversible"
    assert [(s["kind"], s["plan"], s["depth"]) for s in data["stages"]] == [
        ("linear", "store", 1), ("rev", "reversible", 3), ("linear", "store", 1)
    ]
    assert data["parameters"] == sum(s["parameters"] for s in data["stages"])
    assert data["stages"][0]["parameters"] == 5 * 64 + 64


def test_compile_table_and_save(capsys, tmp_path):
    import torch

    target = tmp_path / "out" / "model.pt"
    code, out, _ = run(capsys, "compile", "--expr", "res+(depth=2)", "--in", "3", "--out", "2", "--save", str(target))
    assert code == 0 and "res+" in out and "inserted" in out
    state = torch.load(target, weights_only=True)
    assert any(key.startswith("stages.1.") for key in state)


def test_compile_errors_exit_2(capsys):
    code, _, err = run(capsys, "compile", "--expr", "rev")
    assert code == 2 and "<expr>:1:1: `in` is `auto` and no data gives it" in err
    code, _, err = run(capsys, "compile", "--expr", "rev", "--in", "0")
    assert code == 2 and "positive integer" in err
    code, _, err = run(capsys, "compile", "--expr", "rev", "--in", "3", "--out", "2", "--plan", "reversable")
    assert code == 2 and "did you mean `reversible`" in err


def test_estimate_mem_json_and_exit_3_when_nothing_fits(capsys):
    code, out, _ = run(capsys, "estimate-mem", "--expr", "rev(depth=8)", "--in", "8", "--out", "4",
                       "--nodes", "1000", "--edges", "5000", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["graph"] == {"nodes": 1000, "edges": 5000} and data["chosen"] == "store"
    assert {p["name"] for p in data["plans"]} >= {"store", "reversible"}
    assert all(p["peak_bytes"] > 0 for p in data["plans"])
    code, out, err = run(capsys, "estimate-mem", "--expr", "rev(depth=8)", "--in", "8", "--out", "4",
                         "--nodes", "100000", "--edges", "5000000", "--budget", "1MiB")
    assert code == 3 and "nothing fits the budget" in err and "what would make it fit" in err
    code, _, err = run(capsys, "estimate-mem", "--expr", "rev", "--in", "8", "--out", "4")
    assert code == 2 and "--nodes" in err


def test_estimate_mem_table_keeps_every_number_beside_long_plans(capsys):
    """Five stacks name five plans a row: the plan column wraps at its commas, and the peaks the
    exit-3 message points to are printed whole (they were cut to `1…` at 150 columns)."""
    five = " >> ".join(["res+(depth=2)"] * 5)
    code, out, err = run(capsys, "estimate-mem", "--expr", five, "--in", "16", "--out", "4",
                         "--nodes", "1000", "--edges", "5000", "--budget", "1MiB")
    assert code == 3 and "the leanest plan" in err
    assert "…" not in out
    assert "fits" in out and "time" in out
    needed = err.split(" needs ")[1].split(" (")[0]  # "3.96 MiB"
    assert needed in out


# ---------------------------------------------------------------------------- planner on the command line

TWO = "rev(op=gcn, depth=6, hidden=32, dropout=0.2) >> res+(op=gcn, depth=8, hidden=32)"
SIZE = ("--in", "16", "--out", "4", "--nodes", "4000", "--edges", "40000")


def _estimate_json(capsys, *extra):
    code, out, _ = run(capsys, "estimate-mem", "--expr", TWO, *SIZE, "--json", *extra)
    assert code == 0
    return json.loads(out)


def test_compile_with_a_budget_builds_the_chosen_plan(capsys):
    plans = _estimate_json(capsys)["plans"]
    budget = (min(p["peak_bytes"] for p in plans) + max(p["peak_bytes"] for p in plans)) // 2
    chosen = _estimate_json(capsys, "--budget", str(budget))["chosen"]
    code, out, _ = run(capsys, "compile", "--expr", TWO, *SIZE, "--budget", str(budget), "--json")
    assert code == 0
    summary = json.loads(out)
    # the budget reads in the plan as a spec's `plan: auto(budget=...)` does
    assert summary["plan"].startswith(f"auto(budget={budget}B) -> ") and chosen != "store"
    stack_plans = [s["plan"] for s in summary["stages"] if s["kind"] in ("rev", "res+")]
    assert stack_plans == [p.split("(")[0] for p in chosen.split(", ")]


def test_a_budget_in_units_reads_in_the_reported_plan(capsys):
    code, out, _ = run(capsys, "compile", "--expr", "rev(op=gcn, depth=4)", "--in", "3", "--out", "2",
                       "--nodes", "100000", "--edges", "3000000", "--budget", "260MB", "--json")
    assert code == 0 and json.loads(out)["plan"] == "auto(budget=260MB) -> reversible"


def test_compile_budget_errors(capsys):
    code, _, err = run(capsys, "compile", "--expr", TWO, *SIZE, "--budget", "1KiB")
    assert code == 3 and "nothing fits the budget of 1.00 KiB" in err and "Traceback" not in err
    code, _, err = run(capsys, "compile", "--expr", TWO, "--in", "16", "--out", "4", "--budget", "1GiB")
    assert code == 2 and "needs the graph's size" in err and "--nodes" in err
    code, _, err = run(capsys, "compile", "--expr", TWO, *SIZE, "--budget", "1GiB", "--plan", "store")
    assert code == 2 and "cannot be combined with --plan store" in err


@pytest.mark.parametrize("command", ["compile", "estimate-mem"])
def test_a_plan_option_is_checked_like_a_plan_in_a_spec(capsys, command):
    res_plus = "res+(op=gcn, depth=3, hidden=32)"

    def refused(expr: str, plan: str) -> str:
        """Standard error of ``command`` refusing ``--plan plan`` (exit 2, nothing on stdout)."""
        code, out, err = run(capsys, command, "--expr", expr, *SIZE, "--plan", plan)
        assert code == 2 and out == "" and "Traceback" not in err
        return err

    assert refused(res_plus, "checkpoint(segments=0)").splitlines()[:3] == [
        "<plan>:1:21: `segments` must be at least 1, got 0",
        "  checkpoint(segments=0)",
        "                      ^",
    ]
    err = refused(res_plus, "implicit")
    assert err.splitlines()[:3] == [
        "<plan>:1:1: plan `implicit` applies to `deq` stages; this model has none",
        "  implicit",
        "  ^^^^^^^^",
    ]
    assert "hint: use `store` or `auto` or `checkpoint`\n" in err
    # the hint names the plans of the stages the model has (a deq's implicit and unroll)
    err = refused("deq(op=gcn, hidden=16)", "reversible")
    assert "hint: use `store` or `auto` or `checkpoint` or `implicit` or `unroll`" in err
    err = refused(TWO, "store, store, store")
    assert err.splitlines()[0] == "<plan>:1:1: 3 plans given for a model with 2 stacks"
    assert "or 2 separated by commas (one per stack, in order)" in err
    assert refused(TWO, "reversible, checkpoint(segmets=2)").splitlines()[:4] == [
        "<plan>:1:24: `checkpoint` has no argument `segmets`",
        "  reversible, checkpoint(segmets=2)",
        "                         ^^^^^^^",
        "hint: did you mean `segments`? valid: segments",
    ]
    assert refused(TWO, "reversible, ").splitlines() == [  # had said "empty spec", hinting at `model:`
        "<plan>:1:12: empty plan",
        "  reversible, ",
        "             ^",
        "hint: write a plan: store, checkpoint(segments=K), reversible, implicit, unroll or auto(budget=SIZE)",
    ]


def test_one_plan_per_stack_on_the_command_line(capsys):
    code, out, _ = run(capsys, "compile", "--expr", TWO, *SIZE, "--plan", "reversible, checkpoint(segments=2)", "--json")
    assert code == 0
    stages = json.loads(out)["stages"]
    assert [s["plan"] for s in stages if s["kind"] in ("rev", "res+")] == ["reversible", "checkpoint(segments=2)"]
    data = _estimate_json(capsys, "--plan", "reversible, checkpoint(segments=2)", "--measure")
    (plan,) = data["plans"]
    assert plan["name"] == "reversible, checkpoint(segments=2)"
    assert abs(data["measured_peak_bytes"] - plan["peak_bytes"]) <= 0.05 * plan["peak_bytes"]


def test_estimate_mem_measure_and_dry_run_sit_beside_the_estimate(capsys):
    data = _estimate_json(capsys, "--plan", "reversible", "--measure", "--dry-run")
    (plan,) = data["plans"]
    assert data["chosen"] == plan["name"] == "reversible, store"  # --plan applies where valid
    assert data["device"] == "cpu"
    assert abs(data["measured_peak_bytes"] - plan["peak_bytes"]) <= 0.05 * data["measured_peak_bytes"]
    assert abs(data["dry_run_peak_bytes"] - plan["peak_bytes"]) <= 0.05 * data["dry_run_peak_bytes"]
    code, out, _ = run(capsys, "estimate-mem", "--expr", TWO, *SIZE, "--plan", "reversible", "--measure")
    assert code == 0 and "measured on cpu, plan reversible, store:" in out and "estimate" in out


@pytest.mark.parametrize("expr", ["in: 4\nout: 2\nmodel: plain(op=gcn, depth=2, norm=batch)",
                                  "in: 4\nout: 2\nmodel: linear >> norm(batch) >> linear"])
@pytest.mark.parametrize("run_it", ["--measure", "--dry-run"])
def test_a_one_node_graph_with_batch_norm_is_refused_before_running(capsys, expr, run_it):
    code, out, err = run(capsys, "estimate-mem", "--expr", expr, "--nodes", "1", "--edges", "0", run_it)
    assert code == 2 and out == ""  # had been an internal error from torch's BatchNorm
    assert "batch norm cannot take a training step on a graph of 1 node" in err and "--nodes 2" in err
    layer = expr.replace("norm=batch", "norm=layer").replace("norm(batch)", "norm(layer)")
    code, out, _ = run(capsys, "estimate-mem", "--expr", layer, "--nodes", "1", "--edges", "0", run_it, "--json")
    assert code == 0 and json.loads(out)["graph"]["nodes"] == 1


def _saved_graph_with_loops(tmp_path, n: int, *, pairs: int, loop_step: int, seed: int, masks: bool = False):
    """A saved ``Data`` (8 features, 3 classes) of ``n`` nodes: up to ``pairs`` distinct random edges
    between different nodes, then a self-loop on every ``loop_step``-th node; with ``masks``, train,
    validation and test masks of every node. Returns ``(path, edges without loops, loop nodes)``."""
    import torch
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (pairs,), generator=g)
    edges = torch.unique(torch.stack([src, (src + torch.randint(1, n, (pairs,), generator=g)) % n]), dim=1)
    loops = torch.arange(0, n, loop_step)
    split = {name: torch.ones(n, dtype=torch.bool) for name in ("train_mask", "val_mask", "test_mask")} if masks else {}
    path = tmp_path / "loops.pt"
    torch.save(Data(x=torch.randn(n, 8), edge_index=torch.cat([edges, torch.stack([loops, loops])], dim=1),
                    y=torch.randint(0, 3, (n,)), **split), path)
    return path, edges, loops


def _estimate_store_on_looped_data(capsys, tmp_path, expr: str, loop_step: int) -> tuple[int, int, int]:
    """``estimate-mem --data --measure --plan store`` of ``expr`` on a saved 1,500-node graph with a
    self-loop on every ``loop_step``-th node: (edges, estimated peak, measured peak), after checking
    that the command counts every edge and that the estimate is within 0.2% of the measured peak."""
    path, pairs, loops = _saved_graph_with_loops(tmp_path, 1500, pairs=9000, loop_step=loop_step, seed=0)
    code, out, _ = run(capsys, "estimate-mem", "--expr", expr, "--data", str(path), "--measure", "--plan", "store",
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["graph"]["edges"] == pairs.size(1) + loops.numel()
    estimate, measured = data["plans"][0]["peak_bytes"], data["measured_peak_bytes"]
    assert abs(estimate - measured) <= 0.002 * measured
    return data["graph"]["edges"], estimate, measured


@pytest.mark.parametrize("expr", ["plain(op=gat, depth=2)", "appnp(k=2)"])
def test_estimate_mem_counts_the_self_loops_of_the_data(capsys, tmp_path, expr):
    """A saved graph's self-loops are replaced, not added to, where gat and gcn-like ops add a
    self-loop to every node; the estimate had counted them as extra edges (8% high for appnp on
    a saved graph with 1,900 loops among 21,900 edges)."""
    edges, _, measured = _estimate_store_on_looped_data(capsys, tmp_path, expr, loop_step=5)
    import gnnspec

    ignored = gnnspec.estimate(expr, nodes=1500, edges=edges, in_channels=8, out_channels=3,
                               plan="store").plans[0].peak_bytes
    assert ignored > measured * 1.005  # 300 loops of 9,284 edges taken as ordinary edges


@pytest.mark.parametrize("expr", ["plain(op=transformer, depth=2)", "plain(op=sage(aggr=max), depth=2)",
                                  "plain(op=sage, depth=2)", "plain(op=gin, depth=2)"])
def test_estimate_mem_keeps_the_self_loops_of_the_data_where_the_op_does(capsys, tmp_path, expr):
    """Ops on the raw edge_index (and sage's mean over a CSR matrix of the given edges) keep a
    saved graph's self-loops as edges; the estimate had removed them for every op (32.6% low for
    transformer on a graph with one loop per node)."""
    _estimate_store_on_looped_data(capsys, tmp_path, expr, loop_step=1)


def test_train_budget_counts_the_self_loops_of_the_data(capsys, tmp_path):
    """``train --budget`` plans with the data's self-loops, as ``estimate-mem --data`` estimates:
    a budget just above the store estimate that counts them runs store, and the estimate that
    takes them as extra edges would not have fit it (it had chosen checkpoint here)."""
    import gnnspec

    n, expr = 1200, "plain(op=gat, depth=4, hidden=32, norm=layer)"
    path, pairs, _ = _saved_graph_with_loops(tmp_path, n, pairs=6000, loop_step=1, seed=1, masks=True)
    code, out, _ = run(capsys, "estimate-mem", "--expr", expr, "--data", str(path), "--plan", "store", "--json")
    store = json.loads(out)["plans"][0]["peak_bytes"]
    edges = pairs.size(1) + n
    as_edges = gnnspec.estimate(expr, nodes=n, edges=edges, in_channels=8, out_channels=3,
                                plan="store").plans[0].peak_bytes
    budget = store + (as_edges - store) // 4
    assert as_edges > budget  # the loops counted as edges would not fit
    code, out, _ = run(capsys, "train", "--expr", expr, "--data", str(path), "--epochs", "1", "--budget", str(budget),
                       "--json")
    assert code == 0 and json.loads(out)["plan"] == f"auto(budget={budget}B) -> store"


def test_estimate_mem_takes_the_graph_from_data(capsys):
    sbm = "sbm(nodes=1500, edges=12000, classes=4, features=16)"
    code, out, _ = run(capsys, "estimate-mem", "--expr", TWO, "--data", sbm, "--json", "--measure")
    assert code == 0
    data = json.loads(out)
    assert data["graph"]["nodes"] == 1500 and data["graph"]["edges"] > 0
    chosen = next(p for p in data["plans"] if p["name"] == data["chosen"])
    assert abs(data["measured_peak_bytes"] - chosen["peak_bytes"]) <= 0.05 * data["measured_peak_bytes"]
    code, _, err = run(capsys, "estimate-mem", "--expr", TWO, "--data", sbm, "--nodes", "5", "--edges", "5")
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, "estimate-mem", "--expr", TWO, "--data", sbm, "--in", "5")  # was ignored
    assert code == 2 and "give --in/--out or --data, not both" in err
    code, _, err = run(capsys, "estimate-mem", "--expr", TWO, "--data", "c" * 300 + ".pt")  # was exit 1
    assert code == 2 and "cannot read --data" in err and "File name too long" in err
    code, _, err = run(capsys, "estimate-mem", "--expr", TWO, "--data", "sbm(nodes=10, edgez=5)")
    assert code == 2 and "edgez" in err


def test_a_deq_solve_that_stops_at_max_iter_warns_in_one_plain_line(capsys):
    sbm = "sbm(nodes=300, edges=2000, classes=4, features=16)"
    expr = "linear >> deq(op=gcn, solver=fixed_point, max_iter=2, tol=1e-6) >> linear"
    code, _, err = run(capsys, "train", "--expr", expr, "--data", sbm, "--epochs", "2", "--json")
    assert code == 0
    lines = [line for line in err.splitlines() if "did not converge" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: deq: the forward solve did not converge")
    assert "after 2 iterations (tol 1e-06)" in lines[0] and "NotConvergedWarning" not in err
    assert "_warn_if_not_converged" not in err  # no source line of gnnspec's code


@pytest.mark.parametrize("command", ["compile", "estimate-mem", "train"])
def test_two_budgets_are_refused_not_one_ignored(capsys, command):
    """``--plan 'auto(budget=1KiB)' --budget 1GiB`` had planned for 1 GiB without a word."""
    graph = ["--data", "sbm(nodes=100, edges=300, classes=2, features=4)"] if command == "train" else \
        ["--in", "4", "--out", "2", "--nodes", "100", "--edges", "300"]
    code, out, err = run(capsys, command, "--expr", "rev(depth=3)", *graph, "--plan", "auto(budget=1KiB)",
                         "--budget", "1GiB")
    assert code == 2 and out == ""
    assert "two budgets: --budget 1073741824 and --plan auto(budget=1KiB); give one of them" in err


def test_the_planned_label_lists_one_plan_per_stack_and_can_be_given_back(capsys):
    """It had dropped repeated plans ("auto -> store, unroll" for three stacks) and segment counts."""
    expr = "res+(depth=16) >> rev(depth=4) >> plain(depth=2)"
    size = ["--in", "4", "--out", "3", "--nodes", "20000", "--edges", "400000", "--budget", "90MB", "--json"]
    code, out, _ = run(capsys, "estimate-mem", "--expr", expr, *size)
    chosen = json.loads(out)["chosen"]
    assert chosen.count(",") == 2 and "checkpoint(segments=" in chosen
    code, out, _ = run(capsys, "compile", "--expr", expr, *size)
    assert code == 0 and json.loads(out)["plan"] == f"auto(budget=90MB) -> {chosen}"
    code, out, _ = run(capsys, "compile", "--expr", expr, *size[:-3], "--plan", chosen, "--json")
    assert code == 0 and json.loads(out)["plan"] == chosen


def test_a_deq_planned_store_reads_unroll_as_the_estimate_names_it(capsys):
    """A deq's `store` is `unroll`: compile and train had said `auto -> store` where estimate-mem
    chose `unroll`."""
    size = ["--in", "8", "--out", "3", "--nodes", "200", "--edges", "1000", "--json"]
    code, out, _ = run(capsys, "estimate-mem", "--expr", "deq(op=gcn, hidden=16)", *size)
    assert code == 0 and json.loads(out)["chosen"] == "unroll"
    code, out, _ = run(capsys, "compile", "--expr", "deq(op=gcn, hidden=16)", *size)
    assert code == 0 and json.loads(out)["plan"] == "auto -> unroll"


def test_train_of_one_epoch_measures_its_step(capsys):
    code, out, _ = run(capsys, "train", "--expr", "res+(depth=2)", "--data",
                       "sbm(nodes=300, edges=1500, classes=3, features=8)", "--epochs", "1", "--json")
    assert code == 0 and json.loads(out)["peak_bytes"] > 0  # had been null


def test_train_and_compile_report_a_plan_in_the_same_words(capsys):
    sbm = "sbm(nodes=300, edges=1500, classes=3, features=8)"
    for plan in ("reversible, checkpoint(segments=2)", "store"):
        code, out, _ = run(capsys, "train", "--expr", TWO, "--data", sbm, "--epochs", "1", "--plan", plan, "--json")
        assert code == 0 and json.loads(out)["plan"] == plan  # had been "store+reversible+checkpoint+store"
        code, out, _ = run(capsys, "compile", "--expr", TWO, "--in", "8", "--out", "3", "--plan", plan, "--json")
        assert code == 0 and json.loads(out)["plan"] == plan


def test_train_with_a_budget_runs_the_planned_plan(capsys):
    sbm = "sbm(nodes=1500, edges=12000, classes=4, features=16)"
    code, out, _ = run(capsys, "estimate-mem", "--expr", TWO, "--data", sbm, "--json")
    peaks = [p["peak_bytes"] for p in json.loads(out)["plans"]]
    budget = (min(peaks) + max(peaks)) // 2
    code, out, _ = run(capsys, "train", "--expr", TWO, "--data", sbm, "--epochs", "2", "--budget", str(budget), "--json")
    assert code == 0
    result = json.loads(out)
    label = f"auto(budget={budget}B) -> "
    assert result["plan"].startswith(label) and result["plan"] != label + "store"
    assert result["peak_bytes"] <= budget * 1.05
    code, _, err = run(capsys, "train", "--expr", TWO, "--data", sbm, "--epochs", "2", "--budget", "1KiB")
    assert code == 3 and "nothing fits" in err


def test_names_and_paths_print_as_written(tmp_path, capsys):
    """Names and paths went to rich as markup: `[/]` raised MarkupError (exit 1, after the file was
    written), `[bold]w.pt` printed as `w.pt`; a `{x}` in the progress title was a format field."""
    spec = tmp_path / "mk.gnn"
    spec.write_text('model: plain\nname: "[/] {x} [bold]y"\nin: 4\nout: 2\ngraph: nodes=10, edges=20\n')
    code, out, _ = run(capsys, "compile", str(spec), "--save", str(tmp_path / "[/]c.pt"))
    assert code == 0 and "[/] {x} [bold]y: " in out and f"written to {tmp_path / '[/]c.pt'}" in out.replace("\n", "")
    code, out, _ = run(capsys, "estimate-mem", str(spec))
    assert code == 0 and "[/] {x} [bold]y: N=10" in out
    code, out, err = run(capsys, "train", str(spec), "--data", "sbm(nodes=100, features=4, classes=2)", "--epochs", "1",
                         "--save", str(tmp_path / "[bold]w.pt"))
    assert code == 0 and "[bold]w.pt" in out.replace("\n", "") and (tmp_path / "[bold]w.pt").exists()


def test_estimate_mem_plan_auto_is_the_planner(capsys):
    """`--plan auto` had estimated `store` alone (and exited 3 where store did not fit), and
    `--plan 'auto(budget=...)'` had ignored its budget."""
    spec = str(SPECS / "revgnn_deep.gnn")
    code, plain, _ = run(capsys, "estimate-mem", spec, "--budget", "100GB", "--json")
    assert code == 0
    code, auto, _ = run(capsys, "estimate-mem", spec, "--plan", "auto", "--budget", "100GB", "--json")
    assert code == 0 and json.loads(auto) == json.loads(plain) and len(json.loads(auto)["plans"]) > 1
    code, own, _ = run(capsys, "estimate-mem", spec, "--plan", "auto(budget=100GB)", "--json")
    assert code == 0 and json.loads(own) == json.loads(plain) and json.loads(own)["budget_bytes"] == 100 * 10**9


def test_train_save_into_a_folder_that_refuses_files_fails_before_training(tmp_path, capsys, monkeypatch):
    """An immutable or read-only folder had been found only after every epoch ran (43 s), and
    the run's result was not printed."""
    import errno

    import gnnspec.cli as cli

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    trained = []
    monkeypatch.setattr(cli.tempfile, "mkstemp", refuse)
    monkeypatch.setattr("gnnspec.train.train", lambda *a, **k: trained.append(1))
    code, _, err = run(capsys, "train", "--expr", "plain(op=gcn)", "--data", "sbm(nodes=60)", "--epochs", "1",
                       "--save", str(tmp_path / "m.pt"))
    assert code == 2 and f"cannot write into {tmp_path}: Read-only file system" in err and not trained


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_train_prints_its_result_when_the_save_fails_after_training(capsys):
    code, out, err = run(capsys, "train", "--expr", "plain(op=gcn)", "--data", "sbm(nodes=60)", "--epochs", "1",
                         "--save", "/dev/full", "--json")
    assert code == 2 and "test_acc" in json.loads(out) and "cannot write /dev/full" in err


@pytest.mark.parametrize("text, hint", [
    ("model: linear >> act >> linear\ndtype: float16\n", "adam's eps (1e-8) is 0 in float16"),
    ("model: plain(op=gcn)\ntrain: lr=1e30\n", "lower the learning rate (lr=1e+30)"),
])
def test_a_training_that_diverges_is_an_error(tmp_path, capsys, text, hint):
    """float16 with Adam, or a huge learning rate, had trained on NaN outputs and reported chance
    accuracy with exit 0."""
    spec = tmp_path / "s.gnn"
    spec.write_text(text)
    code, out, err = run(capsys, "train", str(spec), "--data", "sbm(nodes=200)", "--epochs", "5", "--json")
    assert code == 2 and out == "" and "training diverged at epoch 1" in err and hint in err
    assert "--help" not in err


def test_compile_json_names_the_segments_a_stack_runs(capsys):
    """A stack's plan had been printed as `checkpoint`, without the segment count."""
    code, out, _ = run(capsys, "compile", "--expr", "plain(op=gcn, depth=9)", "--in", "8", "--out", "3",
                       "--plan", "checkpoint(segments=2)", "--json")
    assert code == 0 and [s["plan"] for s in json.loads(out)["stages"]] == ["store", "checkpoint(segments=2)", "store"]
    code, out, _ = run(capsys, "compile", "--expr", "plain(op=gcn, depth=9)", "--in", "8", "--out", "3",
                       "--plan", "checkpoint", "--json")
    assert code == 0 and json.loads(out)["stages"][1]["plan"] == "checkpoint(segments=3)"  # round(sqrt(9))
    code, out, _ = run(capsys, "compile", "--expr", "plain(op=gcn, depth=9)", "--in", "8", "--out", "3",
                       "--plan", "checkpoint(segments=40)", "--json")
    assert code == 0 and json.loads(out)["stages"][1]["plan"] == "checkpoint(segments=9)"  # one per layer at most


def test_a_model_without_parameters_cannot_be_trained_or_measured(capsys):
    """torch's "optimizer got an empty parameter list" had been an internal error (exit 1)."""
    text = "hidden: 16\nmodel: appnp(k=1)"
    code, _, err = run(capsys, "estimate-mem", "--expr", text, "--in", "16", "--out", "16", "--nodes", "100",
                       "--edges", "300", "--measure")
    assert code == 2 and "model has no parameters to train" in err and "internal error" not in err
    code, _, err = run(capsys, "train", "--expr", text, "--data", "sbm(nodes=100, features=16, classes=16)",
                       "--epochs", "1", "--json")
    assert code == 2 and "model has no parameters to train" in err


def test_standard_input_can_be_given_once(capsys):
    """The second `-` had read the emptied standard input and reported an empty spec."""
    code, _, err = run(capsys, "check", "-", "-")
    assert code == 2 and "standard input (-) can be given once" in err


def test_train_json_accuracies_are_exact_fractions(capsys):
    """A float32 mean had printed as 0.12200000137090683: 100 test nodes (20% of 500) give a
    whole number of hundredths."""
    code, out, _ = run(capsys, "train", "--expr", "plain(op=gcn)", "--data", "sbm(nodes=500)", "--epochs", "2", "--json")
    result = json.loads(out)
    assert code == 0 and (result["test_acc"] * 100).is_integer() and (result["val_acc"] * 100).is_integer()


def test_a_spec_file_with_carriage_return_line_ends_reads_as_lines(tmp_path, capsys):
    """Classic Mac OS line ends had made the whole file one line: `1:31 the line ends before
    the value does`."""
    good, bad = tmp_path / "good.gnn", tmp_path / "bad.gnn"
    good.write_bytes(b"name: cr\rmodel: linear >> rev(op=gat)\r")
    bad.write_bytes(b"name: cr\rmodel: linear >> rev(op=gatt)\r")
    assert run(capsys, "check", str(good))[0] == 0
    code, _, err = run(capsys, "check", str(bad))
    assert code == 2 and err.startswith(f"{bad}:2:25: unknown op `gatt`")


def test_a_negative_budget_is_refused_as_a_size(capsys):
    """argparse had taken `-5GB` for an option: "expected one argument"."""
    code, _, err = run(capsys, "estimate-mem", "--expr", "linear", "--in", "3", "--out", "3", "--nodes", "10",
                       "--edges", "10", "--budget", "-5GB")
    assert code == 2 and "`-5GB` is not a size" in err


def test_the_compile_table_shows_whole_plans_when_piped(capsys):
    # at the 80 columns of a pipe rich had cut the plan column to `checkpoint(segments…`
    code, out, _ = run(capsys, "compile", "--expr", "linear >> res+(op=gcn, depth=4, plan=checkpoint(segments=2)) "
                       ">> rev(op=gat, depth=3, plan=reversible) >> deq(op=gcn, plan=implicit)", "--in", "3", "--out", "2")
    assert code == 0 and "│ checkpoint(segments=2) │" in out
