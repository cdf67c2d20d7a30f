"""Allocation timelines: the numeric programs the estimate composes and replays.

A :class:`Program` is what a piece of a training step does to memory, in order: a forward list and
a backward list of events over storages named by integer ids. Events:

* ``("a", sid, nbytes, tag)``: storage ``sid`` is allocated (``tag`` ``"grad"`` for a parameter
  gradient, else ``None``);
* ``("r", sid)``: one holder of ``sid`` lets go. A storage may have several holders (the Python
  frame that made it, every autograd node that saved it, the engine buffer holding a gradient):
  it is freed at its **last** release in the whole timeline, never before;
* ``("d", nbytes, category)``: an already resolved change of live bytes;
* ``("x", block)``: a :class:`Block` of resolved changes repeated ``n`` times (deep stacks).

``roles`` names the storages a program shares with its surroundings: ``X`` (input), ``Y``
(output), ``GY`` (gradient of the output, released by the program), ``GX`` (gradient of the input,
allocated by it) and extra inputs (``M`` a dropout mask, ``X0`` GCNII's initial representation).
Composition only relabels those ids and concatenates lists; :func:`resolve` turns every storage
whose holders are all known into ``"d"`` events at its allocation and at its last release, and
:func:`peak` walks the result (closed form over repeated blocks), so a 1001-layer stack costs
as much as a 3-layer one.

Categories of resolved bytes: ``activations`` (allocated in the forward, alive into the backward),
``temporaries`` (everything else the step allocates and frees), ``gradients`` (parameter
gradients).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable

CATEGORIES = ("parameters", "gradients", "optimizer", "inputs", "activations", "temporaries")
_ids = itertools.count(1)


def new_sid() -> int:
    """A storage id not used before in this process."""
    return next(_ids)


@dataclass
class Block:
    """``n`` repetitions of resolved changes: ``peak`` above the start within one repetition (with
    the live bytes per category at that point, ``at_peak``), ``total`` net change (``totals``)."""

    peak: int
    total: int
    n: int
    at_peak: dict[str, int]
    totals: dict[str, int]


def summarize(events: Iterable[tuple], n: int) -> Block:
    """The :class:`Block` of ``n`` repetitions of resolved ``"d"``/``"x"`` events."""
    level = 0
    best = 0
    cats: dict[str, int] = {}
    best_cats: dict[str, int] = {}
    for ev in events:
        if ev[0] == "d":
            level += ev[1]
            cats[ev[2]] = cats.get(ev[2], 0) + ev[1]
            if level > best:
                best, best_cats = level, dict(cats)
        elif ev[0] == "x":
            b: Block = ev[1]
            k = b.n - 1 if b.total > 0 else 0
            top = level + k * b.total + b.peak
            if top > best:
                best = top
                best_cats = {c: cats.get(c, 0) + k * b.totals.get(c, 0) + b.at_peak.get(c, 0)
                             for c in set(cats) | set(b.totals) | set(b.at_peak)}
            level += b.n * b.total
            for c, v in b.totals.items():
                cats[c] = cats.get(c, 0) + b.n * v
        else:
            raise ValueError(f"unresolved event in a repeated block: {ev}")
    return Block(best, level, n, best_cats, cats)


@dataclass
class Program:
    fwd: list[tuple] = field(default_factory=list)
    bwd: list[tuple] = field(default_factory=list)
    roles: dict[str, int] = field(default_factory=dict)

    def relabel(self, mapping: dict[int, int]) -> "Program":
        """The same program with storage ids replaced per ``mapping`` (others kept)."""
        if not mapping:
            return self

        def conv(events: list[tuple]) -> list[tuple]:
            out = []
            for ev in events:
                if ev[0] in ("a", "r") and ev[1] in mapping:
                    ev = (ev[0], mapping[ev[1]], *ev[2:])
                out.append(ev)
            return out

        return Program(conv(self.fwd), conv(self.bwd), {k: mapping.get(v, v) for k, v in self.roles.items()})

    def bind(self, **roles: int | None) -> "Program":
        """Relabel the program's named roles to the given storage ids (None, or a role the program
        does not have: nothing to do)."""
        mapping = {self.roles[k]: v for k, v in roles.items() if v is not None and k in self.roles}
        return self.relabel(mapping)


def resolve(fwd: list[tuple], bwd: list[tuple], keep: set[int] = frozenset(),
            persist: set[int] = frozenset()) -> tuple[list[tuple], list[tuple]]:
    """Turn every storage not in ``keep`` into ``"d"`` events: its bytes at its allocation, and
    minus them at its last release (if any; never for a storage in ``persist``, which something
    outside holds to the end). Releases of storages allocated elsewhere are kept only when they
    are in ``keep``."""
    alloc: dict[int, tuple[int, int, int, str | None]] = {}  # sid -> (phase, index, nbytes, tag)
    last: dict[int, tuple[int, int]] = {}
    for phase, events in enumerate((fwd, bwd)):
        for i, ev in enumerate(events):
            if ev[0] == "a":
                alloc[ev[1]] = (phase, i, ev[2], ev[3])
            elif ev[0] == "r" and ev[1] not in persist:
                last[ev[1]] = (phase, i)
    out: list[list[tuple]] = [[], []]
    for phase, events in enumerate((fwd, bwd)):
        for i, ev in enumerate(events):
            kind = ev[0]
            if kind == "a":
                sid = ev[1]
                if sid in keep:
                    out[phase].append(ev)
                    continue
                out[phase].append(("d", ev[2], _category(alloc[sid], last.get(sid))))
            elif kind == "r":
                sid = ev[1]
                if sid in keep:
                    out[phase].append(ev)
                elif sid in alloc and last.get(sid) == (phase, i):
                    out[phase].append(("d", -alloc[sid][2], _category(alloc[sid], last[sid])))
            else:
                out[phase].append(ev)
    return out[0], out[1]


def _category(alloc: tuple[int, int, int, str | None], release: tuple[int, int] | None) -> str:
    if alloc[3] == "grad":
        return "gradients"
    if alloc[0] == 0 and (release is None or release[0] == 1):
        return "activations"
    return "temporaries"


@dataclass
class Peak:
    bytes: int
    breakdown: dict[str, int]
    phase: str


def peak(phases: list[tuple[str, list[tuple]]], base: dict[str, int]) -> Peak:
    """The largest live total over resolved event lists run in order, starting from ``base``
    (bytes per category alive throughout), with the live bytes per category at that moment."""
    level = sum(base.values())
    cats = dict(base)
    best = Peak(level, dict(cats), "start")
    for name, events in phases:
        for ev in events:
            if ev[0] == "d":
                level += ev[1]
                cats[ev[2]] = cats.get(ev[2], 0) + ev[1]
                if level > best.bytes:
                    best = Peak(level, dict(cats), name)
            elif ev[0] == "x":
                b: Block = ev[1]
                k = b.n - 1 if b.total > 0 else 0
                top = level + k * b.total + b.peak
                if top > best.bytes:
                    best = Peak(top, {c: cats.get(c, 0) + k * b.totals.get(c, 0) + b.at_peak.get(c, 0)
                                      for c in set(cats) | set(b.totals) | set(b.at_peak)}, name)
                level += b.n * b.total
                for c, v in b.totals.items():
                    cats[c] = cats.get(c, 0) + b.n * v
            else:
                raise ValueError(f"unresolved event at the top level: {ev}")
    return best


# ---------------------------------------------------------------------------- composition


def chain(programs: list[Program], *, hold_input: bool = True, held: int | None = None,
          holds: dict[int, int] | None = None) -> Program:
    """``y = u_n(...u_1(x))``: each output is the next input, dropped by the caller once the next
    unit returns; each gradient a unit hands back is the previous unit's incoming gradient.

    Returns a program with roles ``X``, ``Y``, ``GY`` and ``GX`` (absent when no unit hands back
    a gradient of its input). ``hold_input``: the caller holds ``x`` through the chain (else it is
    dropped after the first unit, as a chain inside a stack of chains would). ``held``: the output
    of unit ``held`` (1-based) is dropped only when the chain ends, as a Python argument is held by
    its call (``_norm_act_drop(conv(x))`` holds the conv's output through norm, act and dropout).
    ``holds``: the output of unit ``j`` (1-based) is dropped only when unit ``holds[j]`` (1-based)
    returns (a layer's input, held by the layer's call through its units)."""
    if not programs:
        raise ValueError("an empty chain")
    holds = dict(holds or {})
    if held is not None and 0 < held < len(programs):
        holds[held] = len(programs)
    x = new_sid()
    gy = new_sid()
    outs = [x] + [new_sid() for _ in programs]
    grads = [new_sid() for _ in programs] + [gy]  # grads[i] = gradient of outs[i]
    fwd: list[tuple] = []
    bwd: list[tuple] = []
    bound = []
    for i, p in enumerate(programs):
        q = p.bind(X=outs[i], Y=outs[i + 1], GY=grads[i + 1], GX=grads[i])
        bound.append(q)
        fwd += q.fwd
        if (i > 0 or not hold_input) and i not in holds and i != held:
            fwd.append(("r", outs[i]))
        fwd += [("r", outs[j]) for j, until in holds.items() if until == i + 1]
    for q in reversed(bound):
        bwd += q.bwd
    roles = {"X": x, "Y": outs[-1], "GY": gy}
    if "GX" in bound[0].roles:
        roles["GX"] = grads[0]
    return Program(fwd, bwd, roles)


def substitute(skeleton_fwd: list[tuple], skeleton_bwd: list[tuple], holes: dict[int, dict[str, int]],
               inner: dict[int, Program]) -> tuple[list[tuple], list[tuple]]:
    """Replace each hole's placeholders by ``inner[k]``'s forward/backward, its roles bound to the
    storages the skeleton gave the hole (``holes[k]``: ``X``, ``Y``, ``GY``, ``GX`` -> sid)."""
    bound = {k: inner[k].bind(**{r: holes[k].get(r) for r in ("X", "Y", "GY", "GX")}) for k in inner}

    def fill(events: list[tuple]) -> list[tuple]:
        out: list[tuple] = []
        for ev in events:
            if ev[0] == "hF":
                out += bound[ev[1]].fwd
            elif ev[0] == "hB":
                out += bound[ev[1]].bwd
            else:
                out.append(ev)
        return out

    return fill(skeleton_fwd), fill(skeleton_bwd)
