"""gnnspec: deep graph neural networks from a one-line spec (the public API of SPEC.md section 7).

    spec = gnnspec.parse("rev(groups=2, depth=1001, op=gat, tie=true)")
    spec = gnnspec.load("specs/revgnn_deep.gnn")
    text = gnnspec.format(spec)
"""

from __future__ import annotations

from pathlib import Path

# The submodules `check` and `format` are imported before the functions of the same names are
# defined: importing a submodule binds it on the package, and it must not shadow the API.
import gnnspec.check as _check_module
import gnnspec.format as _format_module
from gnnspec.errors import SpecError
from gnnspec.ir import Spec
from gnnspec.syntax import parse_text, read_spec_file, spec_form
from gnnspec.syntax.comments import source_layout

__all__ = ["Spec", "SpecError", "parse", "load", "format", "check", "build", "estimate", "register_op"]
__version__ = "0.1.0"


def _spec_of(spec: Spec | str, function: str) -> Spec:
    """``spec``, or the checked IR of spec text; a TypeError for anything else."""
    if isinstance(spec, str):
        return parse(spec)
    if not isinstance(spec, Spec):
        raise TypeError(f"{function}() takes a gnnspec.Spec or spec text, got {type(spec).__name__}")
    return spec


def check(spec: Spec | str) -> Spec:
    """``spec`` unchanged when it satisfies every semantic rule; else the first rule's `SpecError`.
    Spec text is parsed first (:func:`parse`, which checks it)."""
    if isinstance(spec, str):
        return parse(spec)
    spec = _spec_of(spec, "check")
    errors = _check_module.violations(spec)
    if errors:
        raise errors[0]
    return spec


def _checked(text: str, filename: str, **options) -> Spec:
    spec = parse_text(text, filename=filename, **options)
    try:
        return check(spec)
    except SpecError as err:
        raise err.located(filename, text) from None


def parse(text: str, *, filename: str = "<spec>", form: str | None = None, name: str | None = None) -> Spec:
    """The checked IR of spec text: a `.gnn` file's text, a bare expression, or YAML (``form="yaml"``
    or a `.yaml`/`.yml` ``filename``). ``name`` is the default for the spec's `name` key."""
    return _checked(text, filename, form=form, name=name)


def load(path: str | Path) -> Spec:
    """The checked IR of the spec file at ``path`` (`.gnn`, `.yaml`/`.yml`, or "-" for stdin)."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"load() takes a path (str or pathlib.Path), got {type(path).__name__}")
    text, shown = read_spec_file(path)
    return _checked(text, shown, name=Path(path).stem if str(path) != "-" else None)


def format(spec: Spec | str, *, filename: str = "<spec>", form: str | None = None) -> str:
    """The canonical text of a spec. Given spec text, its comments are kept and a YAML text
    (``form="yaml"`` or a `.yaml`/`.yml` ``filename``) stays YAML; a `Spec` gives `.gnn` text."""
    if not isinstance(spec, str):
        return _format_module.format_spec(_spec_of(spec, "format"))
    form = spec_form(form, filename, spec)
    parsed = parse(spec, filename=filename, form=form)
    layout = source_layout(spec, form=form)
    return _format_module.format_spec(parsed, layout, style=form)


def build(
    spec: Spec | str,
    in_channels: int | None = None,
    out_channels: int | None = None,
    plan=None,
    *,
    nodes: int | None = None,
    edges: int | None = None,
    budget: int | str | None = None,
    device: str | None = None,
    self_loops: int = 0,
):
    """The model of a spec (or spec text): an ``nn.Module`` called as ``model(x, edge_index)``.

    ``in_channels``/``out_channels`` fill the spec's ``auto`` widths (default: its ``graph:``
    ``features``/``classes``, as ``estimate`` and the command line take them). ``plan`` overrides the
    spec's plans: a plan or its text (``"reversible"``, ``"checkpoint(segments=4)"``), one per
    resolved stage or one per stack, an :class:`Estimate` or its ``.chosen`` name. Every plan gives
    the same parameters, outputs and gradients.

    ``plan="auto"`` (or the spec's ``plan: auto(...)`` when ``plan`` is None) runs the planner
    (SPEC.md section 4) on a graph of ``nodes``/``edges`` (default: the spec's ``graph:``;
    ``self_loops`` as :func:`estimate`) under ``budget`` (default: the one in ``auto(budget=...)``,
    else the free memory of the CUDA device; with neither, every stage runs ``store``). Raises ``gnnspec.plan.NoFit`` when nothing fits.
    Parameters are in the spec's ``dtype``.
    """
    import torch

    from gnnspec.lower.model import build_model
    from gnnspec.lower.widths import declared_widths
    from gnnspec.plan import plans_for_build

    spec = _spec_of(spec, "build")
    in_channels, out_channels = declared_widths(spec, in_channels, out_channels)
    plan = plans_for_build(spec, plan, nodes=nodes, edges=edges, budget=budget, in_channels=in_channels,
                           out_channels=out_channels, device=device, self_loops=self_loops)
    model = build_model(spec, in_channels, out_channels, plan)
    return model.to(getattr(torch, spec.dtype))


def register_op(name: str, factory, **options) -> None:
    """Add a message-passing op: ``factory(channels, **args)`` returns a module called as
    ``conv(x, edge_index)``; see :func:`gnnspec.ops.register_op` for ``params`` and ``heads``."""
    from gnnspec.ops import register_op as _register

    _register(name, factory, **options)


def estimate(spec: Spec | str, *, nodes: int, edges: int, budget=None, plan=None, in_channels=None,
             out_channels=None, dtype=None, optimizer=None, device=None, self_loops: int = 0):
    """The training-step memory of every plan on a graph of ``nodes``/``edges`` (SPEC.md section 5),
    analytically, without running the model; ``.chosen`` is the fastest plan that fits ``budget``
    (default: the spec's ``auto(budget=...)``). ``device="cuda"`` counts the CUDA caching
    allocator's rounding. ``self_loops``: how many of the edges are self-loops (the graph is
    otherwise taken to have none; ops that add a self-loop to every node replace them). Raises
    ``gnnspec.plan.NoFit`` when nothing fits."""
    from gnnspec.plan import estimate_with_planner

    spec = _spec_of(spec, "estimate")
    return estimate_with_planner(spec, nodes=nodes, edges=edges, budget=budget, plan=plan, in_channels=in_channels,
                                 out_channels=out_channels, dtype=dtype, optimizer=optimizer, device=device,
                                 self_loops=self_loops)
