"""Fuzz the gnnspec parser and time it.

Runs ``--count`` inputs (default 10,000) through ``gnnspec.parse`` in both forms (``gnn`` and
``yaml``): mutations of every file under ``specs/`` (or of a few built-in examples when there are
none), specs generated from the IR's vocabulary, and random bytes decoded as UTF-8 with errors
replaced. Any exception other than ``gnnspec.SpecError`` is a crash: the first few distinct ones
are printed with their tracebacks, and the exit code is 1 when there is any.

Then it times parse + check of each file under ``specs/`` (median over many repetitions; the
target is under 5 ms per spec).

    python benchmarks/fuzz.py [--count 10000] [--seed 0] [--specs specs] [--show 5]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

import gnnspec
from gnnspec import SpecError, ir

ROOT = Path(__file__).resolve().parents[1]
TARGET_MS = 5.0
SLOW_S = 1.0

BUILTIN = {
    "builtin/revgnn_deep.gnn": (
        "# RevGNN-Deep (Li et al., ICML 2021, Table 1): 1001 layers, 80 channels\n"
        "name:   revgnn_deep\nin:     8\nout:    112\nhidden: 80\n"
        "model:  linear\n"
        "        >> rev(groups=2, depth=1001, op=gen(aggr=softmax, learn_t=true), norm=layer, dropout=0.1)\n"
        "        >> linear\n"
        "graph:  nodes=132534, edges=39561252\nplan:   auto(budget=16GiB)\ntrain:  optimizer=adam, lr=0.001\n"
    ),
    "builtin/gcnii.gnn": (
        "name: gcnii_cora\nhidden: 64\n"
        "model: dropout(0.6) >> linear >> gcnii(depth=64, alpha=0.1, theta=0.5, dropout=0.6, weight_decay=0.01)\n"
        "       >> dropout(0.6) >> linear\n"
        "graph: nodes=2708, edges=10556, features=1433, classes=7\n"
        "train: optimizer=adam, lr=0.01, weight_decay=5e-4, epochs=1500, patience=100\n"
    ),
    "builtin/bare.gnn": "rev(groups=2, depth=1001, op=gat, tie=true)\n",
    "builtin/deeper.yaml": (
        "name: deepergcn\nhidden: 128\n"
        "model: >\n  linear >> res+(op=gen(aggr=softmax, t=1.0, learn_t=true), depth=28, norm=layer,\n"
        "  dropout=0.1, plan=checkpoint(segments=4)) >> linear\n"
        "graph:\n  nodes: 169343\n  edges: 1166243\n"
        "train: {optimizer: adamw, lr: 0.001, epochs: 500}\nplan: auto(budget=8GB)\n"
    ),
    "builtin/list.yaml": "model:\n  - mlp(dims=[256, 128], act=gelu)\n  - deq(op=gcn, solver=anderson, max_iter=30)\n"
                         "  - sgc(k=2)\nseed: 7\ndtype: bfloat16\n",
}

# What mutations insert: grammar characters, words of the language, YAML syntax, line breaks of
# every kind, control characters and unicode.
ALPHABET = (
    list("()[]{}=,:>#\"'+-._ \t\n\r|&*!?%@`~") + list("0123456789abcxyzGiB")
    + ["\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u00a0", "\u2028", "\u2029", "\ufeff", "é", "中",
       "\U0001f600", "\u0301", "\u202e"]
    + [">>", " >> ", "\n  ", "\n>>", "\n- ", ": ", "model:", "rev(", "op=", "depth=", "1e309", "1_", "GiB",
       "true", "none", "auto", "res+", "[]", "{}", "!!int ", "!!str ", "!!float ", "&a ", "*a", "---\n", "|\n  ",
       ">\n  ", "null", "~"]
)


# ------------------------------------------------------------------------------------ inputs


def corpus(specs_dir: Path) -> dict[str, str]:
    files = sorted(p for p in specs_dir.rglob("*") if p.is_file() and p.suffix in (".gnn", ".yaml", ".yml"))
    texts = {}
    for path in files:
        try:
            texts[str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)] = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    return texts


def _fields(model) -> list[str]:
    return [f for f in model.model_fields if f not in ("kind", "spans")]


VALUES = {
    "depth": lambda r: str(r.choice([1, 2, 4, 28, 64, 1001, r.randint(0, 3000)])),
    "hidden": lambda r: str(r.choice([16, 32, 64, 80, 96, 128, 63])),
    "groups": lambda r: str(r.choice([2, 2, 4, 8, 3, 1])),
    "norm": lambda r: r.choice(["batch", "layer", "graph", "instance", "none"]),
    "type": lambda r: r.choice(["batch", "layer", "graph", "instance", "none"]),
    "act": lambda r: r.choice(["relu", "gelu", "elu", "leaky_relu", "prelu", "tanh", "none"]),
    "fn": lambda r: r.choice(["relu", "gelu", "elu", "leaky_relu", "prelu", "tanh", "none"]),
    "dropout": lambda r: r.choice(["0", "0.1", "0.5", "0.6", "1e-1"]),
    "p": lambda r: r.choice(["0", "0.1", "0.5", "0.6", "1e-1"]),
    "tie": lambda r: r.choice(["true", "false"]),
    "bias": lambda r: r.choice(["true", "false"]),
    "jk": lambda r: r.choice(["none", "last", "cat", "max"]),
    "weight_decay": lambda r: r.choice(["0", "5e-4", "0.01", "none"]),
    "alpha": lambda r: r.choice(["0", "0.1", "0.5", "1"]),
    "theta": lambda r: r.choice(["0.5", "1.0", "1e-2"]),
    "solver": lambda r: r.choice(["anderson", "fixed_point", "broyden"]),
    "max_iter": lambda r: str(r.randint(1, 100)),
    "tol": lambda r: r.choice(["1e-4", "1e-6", "0.001"]),
    "k": lambda r: str(r.randint(1, 12)),
    "dim": lambda r: r.choice(["16", "64", "auto", "none"]),
    "dims": lambda r: "[" + ", ".join(str(r.choice([16, 32, 64, 128])) for _ in range(r.randint(0, 3))) + "]",
}


def gen_op(r: random.Random) -> str:
    name = r.choice(sorted(ir.OP_SIGNATURES))
    sig = ir.OP_SIGNATURES[name]
    args = []
    for param in sig.params:
        if r.random() < 0.5:
            continue
        if param.type == "enum":
            value = r.choice(param.choices)
        elif param.type == "bool":
            value = r.choice(["true", "false"])
        elif param.type == "int":
            value = str(r.choice([1, 2, 4, 8]))
        else:
            value = r.choice(["0.5", "1.0", "2.0"])
        args.append(f"{param.name}={value}")
    return f"{name}({', '.join(args)})" if args or r.random() < 0.3 else name


def gen_plan(r: random.Random, top: bool) -> str:
    options = ["store", "checkpoint", "checkpoint(segments=4)", "reversible", "implicit", "unroll"]
    if top:
        options += ["auto", "auto(budget=16GiB)", "auto(budget=512MiB)", "auto(budget=8GB)"]
    return r.choice(options)


def gen_stage(r: random.Random) -> str:
    kind = r.choice(sorted(ir.STAGE_MODELS))
    args = []
    for field in _fields(ir.STAGE_MODELS[kind]):
        if r.random() < 0.7:
            continue
        if field == "op":
            value = gen_op(r)
        elif field == "plan":
            value = gen_plan(r, top=False)
        else:
            value = VALUES.get(field, lambda r: "1")(r)
        args.append(f"{field}={value}")
    return f"{kind}({', '.join(args)})" if args or r.random() < 0.3 else kind


def gen_spec(r: random.Random) -> tuple[str, str]:
    """A spec from the vocabulary (mostly valid), as .gnn text or YAML text."""
    joiner = r.choice([" >> ", " >> ", "\n  >> ", "\n>> ", ">>"])
    model = joiner.join(gen_stage(r) for _ in range(r.randint(1, 4)))
    if r.random() < 0.2:
        return model, "gnn"
    entries = {"model": model}
    if r.random() < 0.5:
        entries["hidden"] = VALUES["hidden"](r)
    for key, make in (
        ("name", lambda: r.choice(["m", "revgnn_deep", '"my model"', "auto"])),
        ("in", lambda: r.choice(["8", "auto", "1433"])),
        ("out", lambda: r.choice(["7", "112", "auto"])),
        ("seed", lambda: str(r.randint(0, 99))),
        ("dtype", lambda: r.choice(["float32", "bfloat16", "float16", "float64"])),
        ("plan", lambda: gen_plan(r, top=True)),
        ("graph", lambda: f"nodes={r.randint(1, 10**6)}, edges={r.randint(0, 10**7)}"),
        ("train", lambda: r.choice(["optimizer=adam, lr=0.01", "lr=1e-3, epochs=100, patience=10", "loss=mse"])),
    ):
        if r.random() < 0.3:
            entries[key] = make()
    keys = list(entries)
    r.shuffle(keys)
    if r.random() < 0.3:
        lines = []
        for key in keys:
            value = entries[key].replace("\n>> ", " >> ").replace("\n  >> ", " >> ")
            if key in ("graph", "train") and r.random() < 0.5:
                lines.append(f"{key}: {{{value.replace('=', ': ')}}}")
            elif r.random() < 0.3:
                lines.append(f"{key}: >\n  " + value.replace(" >> ", "\n  >> "))
            else:
                lines.append(f"{key}: '{value}'" if r.random() < 0.3 else f"{key}: {value}")
        return "\n".join(lines) + "\n", "yaml"
    return "\n".join(f"{key}: {entries[key]}" for key in keys) + "\n", "gnn"


def mutate(r: random.Random, text: str) -> str:
    for _ in range(r.randint(1, 4)):
        i = r.randint(0, len(text))
        how = r.randrange(8)
        if how == 0 and text:
            text = text[:i] + text[i + r.randint(1, 4):]
        elif how in (1, 2):
            text = text[:i] + r.choice(ALPHABET) + text[i:]
        elif how == 3 and i < len(text):
            text = text[:i] + r.choice(ALPHABET) + text[i + 1:]
        elif how == 4:
            tokens = _tokens(text)
            if len(tokens) > 1:
                a, b = r.randrange(len(tokens)), r.randrange(len(tokens))
                tokens[a], tokens[b] = tokens[b], tokens[a]
                text = "".join(tokens)
        elif how == 5:
            text = text[:i]
        elif how == 6:
            j = r.randint(i, min(len(text), i + 40))
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + chr(r.choice([r.randint(0, 0x7F), r.randint(0x80, 0xFFFF), r.randint(0x10000, 0x10FFFF)])) + text[i:]
    return text


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+\+?|>>|\s+|.", text, flags=re.S)


def random_text(r: random.Random) -> str:
    data = bytes(r.randrange(256) for _ in range(r.randint(0, 120)))
    if r.random() < 0.5:  # printable-heavy bytes look more like a spec
        data = bytes(r.choice(b"model: rev(depth=4, op=gat) >> linear\n  #[]=,") for _ in range(r.randint(0, 120)))
    return data.decode("utf-8", errors=r.choice(["replace", "ignore"]))


def inputs(r: random.Random, count: int, seeds: dict[str, str]):
    """(origin, text, forms) triples: about 45% mutated files, 35% generated specs (half of them
    mutated), 20% random bytes."""
    names = sorted(seeds)
    for _ in range(count):
        roll = r.random()
        if roll < 0.45 and names:
            name = r.choice(names)
            yield f"mutated {name}", mutate(r, seeds[name])
        elif roll < 0.8:
            text, form = gen_spec(r)
            if r.random() < 0.5:
                yield f"mutated generated {form}", mutate(r, text)
            else:
                yield f"generated {form}", text
        else:
            yield "random bytes", random_text(r)


# ------------------------------------------------------------------------------------ running


def run_one(text: str, form: str) -> tuple[str, BaseException | None, float]:
    start = time.perf_counter()
    try:
        gnnspec.parse(text, form=form)
        outcome, error = "valid", None
    except SpecError as err:
        outcome, error = "invalid", None
        lines = text.splitlines()
        if not (1 <= err.line <= len(lines) + 1 and err.column >= 1):
            outcome, error = "crash", AssertionError(f"SpecError position {err.line}:{err.column} outside the text")
        else:
            try:
                str(err)
            except Exception as exc:  # rendering must not fail either
                outcome, error = "crash", exc
    except Exception as exc:  # RecursionError included
        outcome, error = "crash", exc
    return outcome, error, time.perf_counter() - start


def signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames) if "gnnspec" in f.filename), "?")
    return f"{type(exc).__name__} at {where}"


def time_specs(texts: dict[str, str], repeat: int) -> list[tuple[str, float, str]]:
    """(name, median ms of parse + check, outcome) for each spec text."""
    rows = []
    for name, text in texts.items():
        form = "yaml" if name.endswith((".yaml", ".yml")) else "gnn"
        try:
            gnnspec.parse(text, form=form)  # warm-up (grammar load)
            outcome = "valid"
        except SpecError:
            outcome = "invalid"
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            try:
                gnnspec.parse(text, form=form)
            except SpecError:
                pass
            samples.append(time.perf_counter() - start)
        rows.append((name, statistics.median(samples) * 1000, outcome))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="inputs to run (each in both forms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--specs", type=Path, default=ROOT / "specs", help="directory of spec files")
    parser.add_argument("--repeat", type=int, default=200, help="repetitions per spec for the timing")
    parser.add_argument("--show", type=int, default=5, help="distinct crashes to print with tracebacks")
    args = parser.parse_args(argv)
    console = Console()

    files = corpus(args.specs) if args.specs.is_dir() else {}
    seeds = files or BUILTIN
    console.print(
        f"seed corpus: {len(files)} files under {args.specs}" if files
        else f"[yellow]no spec files under {args.specs}; mutating {len(BUILTIN)} built-in examples[/]"
    )

    r = random.Random(args.seed)
    outcomes: Counter[tuple[str, str]] = Counter()
    crashes: dict[str, tuple[str, str, str, BaseException]] = {}
    crash_count = 0
    slow: list[tuple[float, str, str]] = []
    started = time.perf_counter()
    for origin, text in inputs(r, args.count, seeds):
        for form in ("gnn", "yaml"):
            outcome, error, seconds = run_one(text, form)
            outcomes[(origin.split(" ")[0], outcome)] += 1
            if seconds > SLOW_S:
                slow.append((seconds, form, text))
            if error is not None:
                crash_count += 1
                crashes.setdefault(signature(error), (origin, form, text, error))
    elapsed = time.perf_counter() - started

    table = Table(title=f"gnnspec fuzz: {args.count} inputs x 2 forms, seed {args.seed}, {elapsed:.1f} s")
    table.add_column("inputs")
    for column in ("valid", "invalid", "crash"):
        table.add_column(column, justify="right")
    for origin in ("mutated", "generated", "random"):
        cells = [outcomes[(origin, c)] for c in ("valid", "invalid", "crash")]
        table.add_row({"random": "random bytes"}.get(origin, origin), *map(str, cells))
    totals = [sum(n for (o, c), n in outcomes.items() if c == col) for col in ("valid", "invalid", "crash")]
    table.add_row("[bold]total[/]", *(f"[bold]{n}[/]" for n in totals))
    console.print(table)

    if slow:
        console.print(f"[yellow]{len(slow)} inputs took over {SLOW_S:.0f} s; slowest {max(slow)[0]:.2f} s[/]")
    if crashes:
        console.print(f"[red bold]{crash_count} crashes, {len(crashes)} distinct[/]")
        for i, (sig, (origin, form, text, error)) in enumerate(crashes.items()):
            if i >= args.show:
                console.print(f"... and {len(crashes) - args.show} more distinct crashes")
                break
            console.print(f"\n[red]crash {i + 1}: {sig}[/] ({origin}, form={form})")
            console.print(f"input: {text[:400]!r}", markup=False, highlight=False)
            console.print("".join(traceback.format_exception(error)).rstrip()[-2500:], markup=False, highlight=False)
    else:
        console.print("[green bold]0 crashes[/]")

    timing_texts = files or BUILTIN
    rows = time_specs(timing_texts, args.repeat)
    timing = Table(title=f"parse + check, median of {args.repeat} runs" + ("" if files else " (built-in examples)"))
    timing.add_column("spec")
    timing.add_column("outcome")
    timing.add_column("ms", justify="right")
    for name, ms, outcome in sorted(rows, key=lambda row: -row[1]):
        timing.add_row(name, outcome, f"{ms:.3f}")
    median = statistics.median(ms for _, ms, _ in rows) if rows else float("nan")
    colour = "green" if median < TARGET_MS else "red"
    timing.add_row("[bold]median over specs[/]", "", f"[bold {colour}]{median:.3f}[/]")
    console.print(timing)
    console.print(f"median parse + check per spec: {median:.3f} ms (target < {TARGET_MS:g} ms)")
    console.print(f"crashes: {crash_count}")
    return 1 if crash_count else 0


if __name__ == "__main__":
    sys.exit(main())
