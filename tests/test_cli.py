"""The command line as a user runs it: output, exit codes, no tracebacks (SPEC.md section 6)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gnnspec.cli import main


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


def test_expr_and_stdin(capsys, monkeypatch):
    import io

    code, _, err = run(capsys, "check", "--expr", "rev(groups=1)")
    assert code == 2 and "<expr>:1:12: `groups` must be at least 2" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"model: rev >> linear\n")))
    code, out, _ = run(capsys, "fmt", "-")
    assert code == 0 and out == "model: rev >> linear\n"


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
