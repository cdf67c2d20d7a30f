"""Regenerate the golden files of the spec corpus: `python tests/golden/regenerate.py`.

For every file in specs/ it writes `tests/golden/<file>.ir.json`, the output of
`gnnspec check --json <file>` (the same code path a user runs). Review the diff before committing:
a changed golden file means a spec now means something else.
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


def golden_path(spec: Path) -> Path:
    return GOLDEN / f"{spec.name}.ir.json"


def ir_output(spec: Path) -> str:
    """What `gnnspec check --json SPEC` prints."""
    from gnnspec.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["check", "--json", str(spec)])
    if code != 0:
        raise SystemExit(f"{spec} does not check (exit {code})")
    return out.getvalue()


def main() -> int:
    for spec in corpus():
        golden_path(spec).write_text(ir_output(spec), encoding="utf-8")
        print(f"wrote {golden_path(spec).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
