"""The `gnnspec` command line (SPEC.md section 6): argument parsing, output and exit codes only.

Every command calls the Python API. Exit codes: 0 ok, 1 internal error (or `fmt --check` found a
file to reformat), 2 invalid spec or arguments, 3 nothing fits the budget. Bad input never shows
a traceback (set ``GNNSPEC_DEBUG=1`` to see one for internal errors).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import gnnspec
from gnnspec.errors import NoParameters, SpecError
from gnnspec.ir import MAX_SEED, MAX_WIDTH, ir_json, uses_batch_norm
from gnnspec.schema import yaml_form_schema
from gnnspec.syntax import read_spec_file

EXIT_OK, EXIT_INTERNAL, EXIT_INVALID, EXIT_NO_FIT = 0, 1, 2, 3


class UsageError(Exception):
    """Bad command-line arguments (exit 2)."""


class RunError(UsageError):
    """A run that cannot go on for a reason other than its arguments' form (a file it cannot
    write, a training that diverged): exit 2, without the pointer to ``--help``."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit itself; we own the exit codes
        raise UsageError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------- spec sources


def _spec_inputs(args: argparse.Namespace) -> list[str | None]:
    """The specs named on the command line: paths ("-" is standard input), or None for --expr."""
    if getattr(args, "expr", None) is not None:
        if args.specs:
            raise UsageError("give either SPEC paths or --expr, not both")
        return [None]
    if not args.specs:
        raise UsageError("give a SPEC path, - for standard input, or --expr TEXT")
    return list(args.specs)


def _read(args: argparse.Namespace, path: str | None) -> tuple[str, str]:
    return (args.expr, "<expr>") if path is None else read_spec_file(path)


def _parse_input(args: argparse.Namespace, path: str | None) -> tuple[gnnspec.Spec, str, str]:
    """The spec at ``path`` (or --expr), with its text and display name."""
    text, shown = _read(args, path)
    spec = gnnspec.parse(text, filename=shown, name=None if path in (None, "-") else Path(path).stem)
    return spec, text, shown


def _load(args: argparse.Namespace, path: str | None) -> gnnspec.Spec:
    return _parse_input(args, path)[0]


def _load_located(args: argparse.Namespace) -> tuple[gnnspec.Spec, str, str]:
    """The one spec of a command that builds or estimates, with its text and display name (errors
    raised later, e.g. by width resolution, are located in that file with :func:`_located`)."""
    (path,) = _spec_inputs(args)
    return _parse_input(args, path)


def _located(err: SpecError, shown: str, text: str) -> SpecError:
    """``err`` placed in the spec file unless it already names its own source (a --plan text)."""
    return err.located(shown, text) if err.filename == "<spec>" else err


# ---------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    """Each spec's first error on stderr. ``--json``: one spec's IR as an object; several specs'
    as one object keyed by path, null for an invalid one (one JSON document either way)."""
    failed = 0
    paths = _spec_inputs(args)
    irs: dict[str, Any] = {}
    for path in paths:
        try:
            spec = _load(args, path)
        except SpecError as err:
            print(err.render(), file=sys.stderr)
            failed += 1
            irs[path] = None
            continue
        irs[path] = ir_json(spec)
        if not args.json and not args.quiet:
            print(f"ok: {path or '<expr>'} ({spec.name}, {_plural(len(spec.model), 'stage')})")
    if args.json and (len(paths) > 1 or not failed):
        print(json.dumps(irs if len(paths) > 1 else irs[paths[0]], indent=2))
    return EXIT_INVALID if failed else EXIT_OK


def cmd_fmt(args: argparse.Namespace) -> int:
    status, invalid = EXIT_OK, False
    for path in _spec_inputs(args):
        try:  # as `check` does: report each file's first error and go on with the next file
            text, shown = _read(args, path)
            canonical = gnnspec.format(text, filename=shown)  # the form follows the file's suffix
        except SpecError as err:
            print(err.render(), file=sys.stderr)
            invalid = True
            continue
        if args.check:
            if canonical != text:
                diff = difflib.unified_diff(
                    text.splitlines(keepends=True), canonical.splitlines(keepends=True), shown, f"{shown} (formatted)"
                )
                sys.stdout.writelines(diff)
                print(f"would reformat {shown}", file=sys.stderr)
                status = EXIT_INTERNAL
        elif args.write and not shown.startswith("<"):
            if canonical != text:
                _write_atomically(Path(shown), canonical)
                print(f"reformatted {shown}", file=sys.stderr)
        else:
            sys.stdout.write(canonical)
    return EXIT_INVALID if invalid else status


def _channels(args: argparse.Namespace, spec: gnnspec.Spec) -> tuple[int | None, int | None]:
    """``in``/``out`` widths from the command line, else from the spec's `graph` features/classes."""
    graph = spec.graph
    in_channels = args.in_channels if args.in_channels is not None else (graph.features if graph else None)
    out_channels = args.out_channels if args.out_channels is not None else (graph.classes if graph else None)
    return in_channels, out_channels


def _requested_plan(args: argparse.Namespace) -> str | None:
    """``--plan``; ``--budget`` alone means ``auto``."""
    if args.budget is None:
        return args.plan
    if args.plan is not None and not args.plan.strip().startswith("auto"):
        raise UsageError(f"--budget lets the planner choose; it cannot be combined with --plan {args.plan}")
    _one_budget(args)
    return args.plan or "auto"


def _one_budget(args: argparse.Namespace) -> None:
    """``--budget`` and ``--plan 'auto(budget=...)'`` are two budgets: refused, not one ignored."""
    from gnnspec.syntax import parse_plan

    if args.budget is None or args.plan is None or not args.plan.strip().startswith("auto"):
        return
    try:
        plan = parse_plan(args.plan)
    except SpecError:
        return  # reported where the plan is used, located in its text
    if getattr(plan, "budget", None) is not None:
        raise UsageError(f"two budgets: --budget {args.budget} and --plan {args.plan}; give one of them")


def _build(args: argparse.Namespace, spec: gnnspec.Spec, text: str, shown: str, in_channels, out_channels,
           nodes: int | None, edges: int | None):
    """``gnnspec.build`` with the command's plan, budget and graph size; errors placed in the spec."""
    from gnnspec.plan import MissingGraphSize, NoFit

    requested = _requested_plan(args)
    try:
        model = gnnspec.build(spec, in_channels, out_channels, plan=requested, nodes=nodes, edges=edges,
                              budget=args.budget)
    except NoFit as err:
        raise _NoFitExit(str(err)) from None
    except MissingGraphSize as err:
        raise UsageError(str(err)) from None
    except SpecError as err:
        raise _located(err, shown, text) from None
    from gnnspec.train import plan_label

    return model, plan_label(model, requested, spec, args.budget)


class _NoFitExit(Exception):
    """Nothing fits the budget (exit 3, the message on standard error)."""


def cmd_compile(args: argparse.Namespace) -> int:
    spec, text, shown = _load_located(args)
    in_channels, out_channels = _channels(args, spec)
    if (args.nodes is None) != (args.edges is None):
        raise UsageError("give both --nodes and --edges")
    import torch

    torch.manual_seed(spec.seed)  # the spec's seed sets the initial weights, as `train` starts from
    model, label = _build(args, spec, text, shown, in_channels, out_channels, args.nodes, args.edges)
    summary = model.summary(label)
    if args.save:
        _save_state(model, args.save)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_compile_table(summary, saved=args.save)
    return EXIT_OK


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _console(**options):
    """A rich console that prints text as it is: names and paths may hold `[...]`, which rich's
    markup would read as tags (`[/]` raised MarkupError, `[bold]x` printed `x`)."""
    from rich.console import Console

    return Console(markup=False, **options)


def _table_console():
    """:func:`_console` at least 150 columns wide: a table's plans (``checkpoint(segments=16)``)
    and sizes are not cut at the 80 columns of a pipe."""
    return _console(width=max(_console().width, 150))


def _print_compile_table(summary: dict, saved: str | None) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['name']}: {summary['parameters']:,} parameters, plan {summary['plan']}")
    for column in ("#", "stage", "plan", "depth", "width", "parameters"):
        table.add_column(column, justify="right" if column in ("#", "depth", "parameters") else "left")
    for index, stage in enumerate(summary["stages"]):
        kind = f"{stage['kind']} (inserted)" if stage["inserted"] else stage["kind"]
        table.add_row(
            str(index), kind, stage["plan"], str(stage["depth"]), f"{stage['in']} -> {stage['out']}", f"{stage['parameters']:,}"
        )
    console = _table_console()
    console.print(table)
    if saved:
        console.print(f"state dict written to {saved}")


def _data(args: argparse.Namespace, spec: gnnspec.Spec, text: str, shown: str):
    """The graph of ``--data`` (``--data-root``), checked against the spec's ``in``/``out``."""
    from gnnspec.data import check_widths, load_data

    seed = args.seed if getattr(args, "seed", None) is not None else spec.seed
    try:
        data = load_data(args.data, data_root=args.data_root, seed=seed)
    except OSError as err:  # a path the system refuses (a name too long, a loop of links)
        raise UsageError(f"cannot read --data {args.data}: {err.strerror or err}") from None
    try:
        check_widths(spec.in_, spec.out, data, spans=spec.spans)
    except SpecError as err:
        raise _located(err, shown, text) from None
    return data


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from gnnspec.plan import NoFit
    from gnnspec.train import TrainingDiverged, train

    spec, text, shown = _load_located(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    requested = _requested_plan(args)
    data = _data(args, spec, text, shown)
    progress = None if args.json else _TrainProgress(spec.name, data.name, args.epochs or spec.train.epochs)
    try:
        with progress or contextlib.nullcontext():
            model, result = train(
                spec, data, epochs=args.epochs, seed=args.seed, device=args.device,
                plan=requested, budget=args.budget, on_epoch=progress.update if progress else None,
            )
    except NoFit as err:
        raise _NoFitExit(str(err)) from None
    except SpecError as err:
        raise _located(err, shown, text) from None
    except TrainingDiverged as err:
        raise RunError(str(err)) from None
    failed = None
    if args.save:
        try:
            _save_state(model, args.save)
        except UsageError as err:  # the result is still printed: the run is not lost
            failed = err
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_train_summary(result, None if failed else args.save)
    if failed is not None:
        raise failed
    return EXIT_OK


class _TrainProgress:
    """A rich progress bar: epoch, loss, validation and test accuracy, seconds."""

    def __init__(self, spec: str, data: str, epochs: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.fields[title]}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}", markup=False), TimeElapsedColumn(), transient=False,
            console=_console(stderr=True),
        )
        # the title is a field, not the format: a name may hold `{`, `}` or `[...]`
        self.task = self.progress.add_task("train", total=epochs, status="", title=f"{spec} on {data}")

    def update(self, report) -> None:
        status = f"loss {report.loss:.4f}  val {report.val_acc:.3f}  test {report.test_acc:.3f}"
        self.progress.update(self.task, completed=report.epoch, status=status)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _print_train_summary(result, saved: str | None) -> None:

    peak = "n/a" if result.peak_bytes is None else f"{result.peak_bytes / 2**20:.1f} MiB"
    _console().print(
        f"{result.spec} on {result.data}: test accuracy {result.test_acc:.4f} at epoch {result.best_epoch} "
        f"(validation {result.val_acc:.4f}); {_plural(result.epochs, 'epoch')} in {result.seconds:.1f} s; "
        f"plan {result.plan}; step peak {peak}" + (f"; model saved to {saved}" if saved else "")
    )


def _save_state(model, target: Path) -> None:
    """``torch.save`` of the state dict, written atomically (:func:`_write_atomically`)."""
    import torch

    _write_atomically(target, lambda handle: torch.save(model.state_dict(), handle), binary=True)


def _save_target(text: str) -> Path:
    """``--save FILE``: a path that can be written, checked before any work is done."""
    if not text:
        raise argparse.ArgumentTypeError("needs a file name")
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} names a directory, not a file")
    path = Path(text)
    try:
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
        parent = path.resolve().parent
        existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    except (OSError, RuntimeError) as err:  # a name too long, a loop of symbolic links
        raise argparse.ArgumentTypeError(f"{text}: {getattr(err, 'strerror', None) or err}") from None
    if existing is not None and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, not a directory")
    if existing is not None:
        # a file made and removed there: a folder that refuses it (no permission, immutable, a
        # read-only file system) is reported now, not after a training run
        try:
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".gnnspec-probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot write into {existing}: {err.strerror or err}") from None
    return path


def cmd_estimate_mem(args: argparse.Namespace) -> int:

    from gnnspec.plan import NoFit

    spec, text, shown = _load_located(args)
    in_channels, out_channels = _channels(args, spec)
    if (args.nodes is None) != (args.edges is None):
        raise UsageError("give both --nodes and --edges")
    if args.data is not None and args.nodes is not None:
        raise UsageError("give --nodes/--edges or --data, not both")
    if args.data is not None and (args.in_channels is not None or args.out_channels is not None):
        raise UsageError("--data sets the input and output widths; give --in/--out or --data, not both")
    data, self_loops = None, 0
    if args.data is not None:
        data = _data(args, spec, text, shown)
        nodes, edges = data.num_nodes, data.num_edges
        self_loops = data.num_self_loops
        in_channels, out_channels = data.num_features, data.num_classes
    elif args.nodes is not None:
        nodes, edges = args.nodes, args.edges
    elif spec.graph is not None:
        nodes, edges = spec.graph.nodes, spec.graph.edges
    else:
        raise UsageError("give --nodes N --edges E or --data DATA, or set `graph: nodes=..., edges=...` in the spec")
    if (args.measure or args.dry_run) and nodes < 2 and uses_batch_norm(spec):
        raise UsageError(f"batch norm cannot take a training step on a graph of {nodes} node (torch's BatchNorm needs "
                         "more than one value per channel); give --nodes 2 or more")
    device = None
    if args.measure:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    console = _table_console()
    try:
        _one_budget(args)
        est = gnnspec.estimate(spec, nodes=nodes, edges=edges, budget=args.budget, plan=args.plan,
                               in_channels=in_channels, out_channels=out_channels, dtype=args.dtype, device=device,
                               self_loops=self_loops)
    except NoFit as err:
        if err.estimate is not None:
            if args.json:
                print(json.dumps(err.estimate.to_json(), indent=2))
            else:
                console.print(err.estimate)
        print(str(err), file=sys.stderr)
        return EXIT_NO_FIT
    except SpecError as err:
        raise _located(err, shown, text) from None
    report = est.to_json()
    chosen = est.chosen_plan
    notes = []
    if args.dry_run:
        from gnnspec.memory.dry_run import dry_run

        dry = dry_run(spec, nodes, edges, plan=est.chosen_assignment, in_channels=in_channels,
                      out_channels=out_channels, dtype=args.dtype)
        report["dry_run_peak_bytes"] = dry.peak_bytes
        notes.append(_beside("dry run (fake tensors)", dry.peak_bytes, chosen))
    if args.measure:
        from gnnspec.train import measure_spec

        measured = measure_spec(spec, nodes=nodes, edges=edges, data=data, plan=est.chosen_assignment,
                                in_channels=in_channels, out_channels=out_channels, dtype=args.dtype, device=device)
        report["measured_peak_bytes"] = measured.peak_bytes
        report["device"] = measured.device
        notes.append(_beside(f"measured on {measured.device}", measured.peak_bytes, chosen))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        console.print(est)
        for note in notes:
            console.print(note)
    return EXIT_OK


def _beside(what: str, peak_bytes: int, chosen) -> str:
    """``what``'s peak next to the estimate of the plan it ran."""
    from gnnspec.memory.estimate import format_bytes

    error = (chosen.peak_bytes - peak_bytes) / peak_bytes * 100 if peak_bytes else 0.0
    return (f"{what}, plan {chosen.name}: {format_bytes(peak_bytes)} ({peak_bytes:,} bytes); "
            f"estimate {format_bytes(chosen.peak_bytes)}, {error:+.2f}%")


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(yaml_form_schema(), indent=2))
    return EXIT_OK


def _write_atomically(path: Path, content: str | Callable[[Any], None], binary: bool = False) -> None:
    """Write ``content`` (text, or a function writing into a file handle) to ``path`` so that a
    failure leaves the old file, never half a new one, and no temporary file. A symbolic link is
    written through to its target; an existing file keeps its permissions, a new one gets the
    usual ``0666 & ~umask``. A target that exists but is not a regular file (``/dev/null``, a FIFO)
    is written into, not replaced. An OSError is a UsageError (exit 2)."""
    target = Path(os.path.realpath(path))
    mode_args = ("wb",) if binary else ("w",)
    encoding = {} if binary else {"encoding": "utf-8"}
    write = content if callable(content) else lambda handle: handle.write(content)
    tmp: str | None = None
    created: Path | None = None  # the outermost directory this call made, removed on failure
    try:
        if target.exists() and not target.is_file():
            with open(target, *mode_args, **encoding) as handle:
                write(handle)
            return
        missing = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        created = missing[-1] if missing else None
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, *mode_args, **encoding) as handle:
            write(handle)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _remove_empty_directories(target.parent, created)
        raise RunError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            Path(tmp).unlink(missing_ok=True)


def _remove_empty_directories(directory: Path, outermost: Path | None) -> None:
    """Remove ``directory`` and its parents up to ``outermost`` (directories a failed write made),
    each only if empty."""
    if outermost is None:
        return
    for d in (directory, *directory.parents):
        try:
            d.rmdir()
        except OSError:
            return
        if d == outermost:
            return


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# ---------------------------------------------------------------------------- parser


def _add_spec_arguments(parser: argparse.ArgumentParser, many: bool) -> None:
    parser.add_argument(
        "specs", nargs="*" if many else "?", metavar="SPEC", help="a .gnn/.yaml spec file, or - for standard input"
    )
    parser.add_argument("--expr", metavar="TEXT", help="a spec given as a bare expression instead of a file")


def _integer_at_least(lowest: int, what: str, highest: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        if highest is not None and value > highest:
            raise argparse.ArgumentTypeError(f"expected an integer of at most {highest:,}, got {value}")
        return value

    return convert


def _size(text: str) -> int:
    from gnnspec.memory.estimate import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_positive_int = _integer_at_least(1, "positive")
_width = _integer_at_least(1, "positive", MAX_WIDTH)
_non_negative_int = _integer_at_least(0, "non-negative")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="gnnspec", description="Deep GNNs from a one-line spec, planned to fit memory.")
    parser.add_argument("--version", action="version", version=f"gnnspec {gnnspec.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    check = commands.add_parser("check", help="check specs; report the first error of each")
    _add_spec_arguments(check, many=True)
    check.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    check.add_argument("--json", action="store_true", help="print each spec's IR as JSON")
    check.set_defaults(run=cmd_check)

    fmt = commands.add_parser("fmt", help="print a spec in canonical form (comments kept)")
    _add_spec_arguments(fmt, many=True)
    mode = fmt.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 and show a diff if a file is not canonical")
    mode.add_argument("--write", action="store_true", help="rewrite files in place")
    fmt.set_defaults(run=cmd_fmt)

    compile_ = commands.add_parser("compile", help="resolve widths and plans; print the stages and parameters")
    _add_spec_arguments(compile_, many=False)
    compile_.add_argument("--in", dest="in_channels", type=_width, metavar="N", help="input feature width")
    compile_.add_argument("--out", dest="out_channels", type=_width, metavar="N", help="output width")
    compile_.add_argument("--plan", metavar="PLAN", help="plan for every stage, e.g. reversible or checkpoint(segments=4)")
    compile_.add_argument("--budget", type=_size, metavar="SIZE", help="let the planner choose plans that fit, e.g. 16GiB")
    compile_.add_argument("--nodes", type=_positive_int, metavar="N", help="graph size for the planner")
    compile_.add_argument("--edges", type=_non_negative_int, metavar="E")
    compile_.add_argument("--save", metavar="FILE", type=_save_target, help="write the initial state dict (torch.save)")
    compile_.add_argument("--json", action="store_true", help="print JSON (SPEC.md section 6)")
    compile_.set_defaults(run=cmd_compile)

    train_ = commands.add_parser("train", help="train a spec on a graph; report test accuracy at the best validation epoch")
    _add_spec_arguments(train_, many=False)
    train_.add_argument("--data", required=True, metavar="DATA", help="cora, citeseer, pubmed, sbm(...), rmat(...) or a .pt file")
    train_.add_argument("--data-root", metavar="DIR", help="folder holding Cora/raw/ind.cora.* etc. (default $GNNSPEC_DATA)")
    train_.add_argument("--epochs", type=_positive_int, metavar="N", help="override the spec's train.epochs")
    train_.add_argument("--seed", type=_integer_at_least(0, "non-negative", MAX_SEED), metavar="N", help="override the spec's seed")
    train_.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    train_.add_argument("--plan", metavar="PLAN", help="plan for every stage, e.g. reversible")
    train_.add_argument("--budget", type=_size, metavar="SIZE", help="let the planner choose plans that fit, e.g. 16GiB")
    train_.add_argument("--save", metavar="FILE", type=_save_target, help="write the trained state dict (torch.save)")
    train_.add_argument("--json", action="store_true", help="print JSON (SPEC.md section 6), no progress bar")
    train_.set_defaults(run=cmd_train)

    estimate = commands.add_parser("estimate-mem", help="estimate the training-step memory of every plan; pick one")
    _add_spec_arguments(estimate, many=False)
    estimate.add_argument("--nodes", type=_positive_int, metavar="N")
    estimate.add_argument("--edges", type=_non_negative_int, metavar="E")
    estimate.add_argument("--budget", type=_size, metavar="SIZE", help="e.g. 16GiB; default: the spec's auto(budget=...)")
    estimate.add_argument("--plan", metavar="PLAN", help="estimate this plan only")
    estimate.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"))
    estimate.add_argument("--in", dest="in_channels", type=_width, metavar="N")
    estimate.add_argument("--out", dest="out_channels", type=_width, metavar="N")
    estimate.add_argument("--data", metavar="DATA", help="take the graph size and widths from data (as train)")
    estimate.add_argument("--data-root", metavar="DIR", help="folder holding Cora/raw/ind.cora.* etc.")
    estimate.add_argument("--measure", action="store_true",
                          help="also run one real step of the chosen plan and print its measured peak")
    estimate.add_argument("--dry-run", action="store_true",
                          help="also replay the chosen plan's step under fake tensors (nothing allocated)")
    estimate.add_argument("--json", action="store_true", help="print JSON (SPEC.md section 6)")
    estimate.set_defaults(run=cmd_estimate_mem)

    schema = commands.add_parser("schema", help="print the JSON Schema of the YAML form")
    schema.set_defaults(run=cmd_schema)
    return parser


def _normalise_specs(args: argparse.Namespace) -> None:
    specs = getattr(args, "specs", None)
    if isinstance(specs, str):
        args.specs = [specs]
    elif specs is None and hasattr(args, "specs"):
        args.specs = []
    if getattr(args, "specs", None) and args.specs.count("-") > 1:
        # the second would read standard input after the first has read all of it
        raise UsageError("standard input (-) can be given once")


@contextlib.contextmanager
def _plain_gnnspec_warnings():
    """gnnspec's own warnings (a deq solve that did not converge) as one ``warning: ...`` line on
    stderr, not Python's ``file:line: Category: ...`` and the source line of our code; other
    libraries' warnings are shown as Python shows them."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if category.__module__.startswith("gnnspec"):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _joined_budget(argv: Sequence[str]) -> list[str]:
    """``--budget -5GB`` as ``--budget=-5GB``: argparse takes a value that starts with ``-`` and is
    not a number for an option ("expected one argument"); joined, the size is checked and refused
    with its own message."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] == "--budget" and out[i + 1].startswith("-") and out[i + 1][1:2].isdigit():
            out[i : i + 2] = [f"--budget={out[i + 1]}"]
            break
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(_joined_budget(sys.argv[1:] if argv is None else argv))
        _normalise_specs(args)
        run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
        if run is None:
            parser.print_help(sys.stderr)
            return EXIT_INVALID
        with _plain_gnnspec_warnings():
            try:
                return run(args)
            except NoParameters as err:  # train, or a measured step, of a model without weights
                raise RunError(str(err)) from None
    except UsageError as err:
        print(str(err) if isinstance(err, RunError) else f"{err}\n(see `gnnspec --help`)", file=sys.stderr)
        return EXIT_INVALID
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_INVALID
    except _NoFitExit as err:
        print(err, file=sys.stderr)
        return EXIT_NO_FIT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as err:  # an internal error: say so plainly, no traceback unless asked
        if os.environ.get("GNNSPEC_DEBUG"):
            raise
        print(f"gnnspec: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
