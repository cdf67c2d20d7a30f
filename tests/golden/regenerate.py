"""Regenerate the golden files of the spec corpus: `python tests/golden/regenerate.py`.

For every file in specs/ it writes, from the same commands a user runs:

* `tests/golden/<file>.ir.json`: `gnnspec check --json <file>` (the IR);
* `tests/golden/<file>.compile.json`: `gnnspec compile --json <file>` (resolved stages, plans and
  parameter counts, widths from the spec's `graph: features=, classes=`; `auto` planned there);
* `tests/golden/<file>.estimate.json`: `gnnspec estimate-mem --json <file>` (every plan's
  estimated peak at the spec's `graph:` size, and the chosen plan).

Review the diff before committing: a changed golden file means a spec now means something else.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent


def corpus() -> list[Path]:
    return sorted(p for p in (ROOT / "specs").iterdir() if p.suffix in (".gnn", ".yaml", ".yml"))


# golden kind -> the command whose output it records
COMMANDS = {"ir": ["check", "--json"], "compile": ["compile", "--json"], "estimate": ["estimate-mem", "--json"]}
OK_CODES = {"estimate": (0, 3)}  # 3: nothing fits the spec's budget, still a table to record


def golden_path(spec: Path, kind: str = "ir") -> Path:
    return GOLDEN / f"{spec.name}.{kind}.json"


def command_output(spec: Path, kind: str = "ir") -> str:
    """What `gnnspec <command> --json SPEC` prints."""
    from gnnspec.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*COMMANDS[kind], str(spec)])
    if code not in OK_CODES.get(kind, (0,)):
        raise SystemExit(f"`gnnspec {' '.join(COMMANDS[kind])} {spec}` failed (exit {code})")
    return out.getvalue()


def main() -> int:
    for spec in corpus():
        for kind in COMMANDS:
            golden_path(spec, kind).write_text(command_output(spec, kind), encoding="utf-8")
            print(f"wrote {golden_path(spec, kind).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
