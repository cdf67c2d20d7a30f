"""Width resolution (SPEC.md section 2): every stage's input and output width, before any module.

Widths flow left to right from ``in``. A stack whose input width differs from its ``hidden`` gets a
``linear`` projection to ``hidden`` in front; if the last width differs from ``out``, a ``linear``
to ``out`` is appended. ``linear`` without ``dim`` maps to ``hidden``, or to ``out`` in last place.
Inserted stages are ordinary stages of the result (``compile --json`` lists them) but are never
written back into the user's spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from gnnspec import ir
from gnnspec.errors import SpecError


@dataclass(frozen=True)
class ResolvedStage:
    """A stage with its widths. ``inserted``: added by width resolution, not written by the user."""

    stage: ir.Stage
    in_width: int
    out_width: int
    inserted: bool = False

    @property
    def hidden(self) -> int:
        """The width the stage's layers run at (a stack's ``hidden``; else its output width)."""
        return self.stage.hidden if isinstance(self.stage, ir.Stack) and self.stage.hidden else self.out_width


def stack_hidden(spec: ir.Spec, stage: ir.Stack) -> int:
    return stage.hidden if stage.hidden is not None else spec.hidden


def stack_output_width(stage: ir.Stack, hidden: int) -> int:
    """``dense`` grows by ``hidden`` per layer; ``jk=cat`` concatenates every layer's output."""
    if isinstance(stage, ir.Dense):
        return hidden * (stage.depth + 1)
    if getattr(stage, "jk", "none") == "cat":
        return hidden * stage.depth
    return hidden


def declared_widths(spec: ir.Spec, in_channels: int | None = None,
                    out_channels: int | None = None) -> tuple[int | None, int | None]:
    """``in_channels``/``out_channels`` for :func:`resolve_widths` when no data is at hand: the
    given ones, else, where the spec's ``in``/``out`` is ``auto``, its ``graph:`` features/classes."""
    graph = spec.graph
    if in_channels is None and spec.in_ == "auto" and graph is not None:
        in_channels = graph.features
    if out_channels is None and spec.out == "auto" and graph is not None:
        out_channels = graph.classes
    return in_channels, out_channels


def resolve_widths(spec: ir.Spec, in_channels: int | None = None, out_channels: int | None = None) -> tuple[ResolvedStage, ...]:
    """The stages of ``spec`` with widths, projections inserted. ``in_channels``/``out_channels``
    fill ``in``/``out`` when those are ``auto``, and must agree with them otherwise."""
    in_width = _width(spec, "in", spec.in_, in_channels)
    out_width = _width(spec, "out", spec.out, out_channels)
    resolved: list[ResolvedStage] = []
    width = in_width
    last = len(spec.model) - 1
    for index, stage in enumerate(spec.model):
        if isinstance(stage, ir.Stack):
            hidden = stack_hidden(spec, stage)
            if width != hidden and getattr(stage, "project", True):
                resolved.append(ResolvedStage(ir.Linear(kind="linear", dim=hidden), width, hidden, inserted=True))
                width = hidden
            out = stack_output_width(stage, hidden)
        elif isinstance(stage, ir.Linear):
            out = stage.dim if stage.dim is not None else (out_width if index == last else spec.hidden)
        elif isinstance(stage, ir.Mlp):
            out = stage.dims[-1] if stage.dims else spec.hidden
        else:
            out = width
        resolved.append(ResolvedStage(stage, width, out))
        width = out
    if width != out_width:
        resolved.append(ResolvedStage(ir.Linear(kind="linear", dim=out_width), width, out_width, inserted=True))
    return tuple(resolved)


def _width(spec: ir.Spec, key: str, declared: int | str, given: int | None) -> int:
    if given is not None and (isinstance(given, bool) or int(given) != given or given < 1):
        raise ValueError(f"{key}_channels must be a positive integer, got {given!r}")
    if declared == "auto":
        if given is None:
            raise SpecError(
                f"`{key}` is `auto` and no data gives it",
                hint=f"pass {key}_channels= (Python) or --{key} N (command line), or set `{key}:` in the spec",
            )
        return int(given)
    if given is not None and int(given) != declared:
        span = spec.span(key)
        raise SpecError(
            f"the spec says `{key}: {declared}` but the data has {given}",
            line=span.line if span else 1,
            column=span.column if span else 1,
            hint=f"set `{key}: auto` to take it from the data",
        )
    return int(declared)
