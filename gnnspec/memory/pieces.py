"""The calibrated table (``coefficients.json``) and its pieces as numeric programs.

Each entry of the table (written by :mod:`gnnspec.memory.calibrate`) is a unit or skeleton: for
each variant (``g``, ``ga``, ``n``, ``na``, ``o``) its forward and backward events, every
allocation's size a polynomial in the shape variables (``N``, ``E``, ``I``, ``O``, ``H``, ``C``,
``D``, ``W``) and the element size ``s``; plus the sizes of its parameters and buffers.
:func:`instantiate` evaluates one variant at a shape into a :class:`~gnnspec.memory.timeline.Program`
with fresh storage ids. Evaluated templates are cached, so a stack of identical layers evaluates
each polynomial once.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from gnnspec.memory.timeline import Program, new_sid

from pathlib import Path

TABLE_PATH = Path(__file__).with_name("coefficients.json")


class MissingCalibration(KeyError):
    """The table has no entry for a piece (a user op, or a variant never recorded)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Table(dict):
    """The coefficient table, each piece compiled on first use (a step uses a few of them)."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(__meta__=data.get("meta", {}), __optimizers__=data["optimizers"])
        self.raw = data["pieces"]

    def __missing__(self, key: str) -> dict[str, Any]:
        raw = cuda_dropout_entry(self.raw[_cuda_dropout_base(key)]) if _is_cuda_dropout(key) else self.raw[key]
        compiled = self[key] = _compile_entry(raw)
        return compiled

    def __contains__(self, key: object) -> bool:
        return (dict.__contains__(self, key) or key in self.raw
                or (isinstance(key, str) and _is_cuda_dropout(key) and _cuda_dropout_base(key) in self.raw))


CUDA_DROPOUT = "dropout:cuda"
"""The key of ``F.dropout`` on a CUDA tensor: torch runs its fused kernel there (``native_dropout``),
which keeps a ``bool`` mask for the backward, one byte an element, where the CPU kernels keep the
float noise (``s`` bytes). Derived from the calibrated ``dropout`` piece (:func:`cuda_dropout_entry`):
the calibration runs on CPU, and fake CUDA tensors need a CUDA build."""


def _is_cuda_dropout(key: str) -> bool:
    return key == CUDA_DROPOUT or key == CUDA_DROPOUT + HALF


def _cuda_dropout_base(key: str) -> str:
    return "dropout" + key[len(CUDA_DROPOUT):]


def cuda_dropout_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """The calibrated ``dropout`` piece with its noise (storage 0, ``D*N*s`` bytes) a one-byte mask
    (``D*N``); the rest (the output, the gradient) as recorded."""
    variants = {}
    for variant, prog in entry["variants"].items():
        out = dict(prog)
        for phase in ("fwd", "bwd"):
            events = []
            for ev in prog[phase]:
                if ev[0] == "a" and ev[1] == 0:
                    if ev[2] != {"D*N*s": 1}:
                        raise ValueError(f"the dropout piece's noise is not D*N*s bytes: {ev}")
                    ev = [ev[0], ev[1], {"D*N": 1}, *ev[3:]]
                events.append(ev)
            out[phase] = events
        variants[variant] = out
    return dict(entry, variants=variants)


CALIBRATED_FROM: dict[str, object] = {}
"""Table key -> the op implementation (:func:`gnnspec.ops.op_impl`) a piece calibrated in this
process was recorded from: an op registered again under its name is a new implementation, and its
pieces are recorded again."""


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    with open(TABLE_PATH, encoding="utf-8") as handle:
        data = json.load(handle)
    return _Table(data)


def optimizer_table() -> dict[str, Any]:
    return table()["__optimizers__"]


def _compile_form(form: dict[str, Any]) -> tuple[tuple[float, tuple[str, ...]], ...]:
    return tuple((coef, tuple(m.split("*")) if m else ()) for m, coef in form.items())


def _compile_entry(entry: dict[str, Any]) -> dict[str, Any]:
    out = {"vars": tuple(entry["vars"]), "variants": {}}
    for variant, prog in entry["variants"].items():
        compiled = {"holes": {int(k): v for k, v in prog.get("holes", {}).items()},
                    "aliases": dict(prog.get("aliases", {}))}
        for phase in ("fwd", "bwd"):
            events = []
            for ev in prog[phase]:
                if ev[0] == "a":
                    events.append(("a", ev[1], _compile_form(ev[2]), ev[3] if len(ev) > 3 else None))
                elif ev[0] in ("z", "d"):
                    events.append((ev[0], ev[1], _compile_form(ev[2])))
                elif ev[0] == "r":
                    events.append(("r", ev[1]))
                else:
                    events.append((ev[0], ev[1]))
            compiled[phase] = events
        out["variants"][variant] = compiled
    out["params"] = [_compile_form(f) for f in entry.get("params", [])]
    out["buffers"] = [_compile_form(f) for f in entry.get("buffers", [])]
    return out


def op_key(name: str, args: dict[str, Any]) -> str:
    """The table key of an op's unit: its name and the arguments that change its memory (heads
    are a shape variable; float arguments change values, not shapes)."""
    from gnnspec.ir import OP_SIGNATURES

    sig = OP_SIGNATURES[name]
    parts = []
    for p in sig.params:
        if p.name == sig.heads or p.type == "float":
            continue
        parts.append(f"{p.name}={str(args.get(p.name, p.default)).lower()}")
    return f"op:{name}" + (f"({','.join(parts)})" if parts else "")


def norm_act_key(norm: str, act: str, between: str | None = None) -> str:
    """The table key of a norm followed by an activation in place (:func:`gnnspec.ir.act_in_place`),
    with ``between`` them (:func:`gnnspec.ir.drop_in_place`) ``"drop"``, a dropout in place, or
    ``"mask"``, the stage's shared mask (``rev``/``deq``: the mask is the role ``M``)."""
    return f"norm:{norm}+{between}+act:{act}" if between else f"norm:{norm}+act:{act}"


def draws_dropout(key: str) -> bool:
    """Whether the unit ``key`` draws a dropout mask (``dropout``, or a norm block with dropout)."""
    return key in ("dropout", CUDA_DROPOUT) or (key.startswith("norm:") and "+drop+" in key)


def evaluate(form, shape: dict[str, int]) -> int:
    total = 0.0
    for coef, mono in form:
        term = coef
        for v in mono:
            term *= shape[v]
        total += term
    return int(round(total))


def entry(key: str) -> dict[str, Any]:
    try:
        return table()[key]
    except KeyError:
        raise MissingCalibration(
            f"no calibrated memory program for {key!r}; run `python -m gnnspec.memory.calibrate` "
            "(user ops: gnnspec.memory.calibrate.calibrate_op)"
        ) from None


def has_variant(key: str, variant: str) -> bool:
    return variant in entry(key)["variants"]


HALF = "@half"
"""The key suffix of a piece recorded in half precision (``s = 2``, bfloat16): torch has no CPU
sparse kernels and gnnspec no fused GAT path in float16/bfloat16, so such a step allocates
differently (some temporaries in float32, torch-geometric's message tensors), not just half the
bytes of a float32 one."""


def table_key(key: str, half: bool) -> str:
    """The table key of ``key``'s piece in half precision (``half``) or in float32/float64."""
    return key + HALF if half else key


def rev_back_key(groups: int, first: bool, subtract: bool) -> str:
    """The key of the reversible backward's skeleton through one layer of ``groups`` groups
    (``first``: the stack's last layer, which starts from the saved output); ``subtract`` for
    group functions that reconstruct inside their products
    (:func:`gnnspec.ops.subtracting_op`), whose output is the reconstructed group."""
    return f"skel:rev{groups}:back" + (":sub" if subtract else "") + (":first" if first else "")


def keyed(key: str, shape: dict[str, int]) -> str:
    """The table key of ``key``'s piece at ``shape``: half precision (``s = 2``) has pieces of its
    own, since a float16/bfloat16 step keeps some temporaries in float32 and takes other kernels."""
    return table_key(key, shape.get("s") == 2)


def param_bytes(key: str, shape: dict[str, int]) -> list[int]:
    """Bytes of each parameter of the piece at ``shape``."""
    return [evaluate(f, shape) for f in entry(keyed(key, shape))["params"]]


def buffer_bytes(key: str, shape: dict[str, int]) -> list[int]:
    return [evaluate(f, shape) for f in entry(keyed(key, shape))["buffers"]]


@lru_cache(maxsize=4096)
def _template(key: str, variant: str, shape_items: tuple) -> tuple:
    e = entry(key)
    if variant not in e["variants"]:
        raise MissingCalibration(f"piece {key!r} has no variant {variant!r}")
    prog = e["variants"][variant]
    shape = dict(shape_items)
    phases = []
    for phase in ("fwd", "bwd"):
        events = []
        for ev in prog[phase]:
            if ev[0] == "a":
                events.append(("a", ev[1], evaluate(ev[2], shape), ev[3]))
            elif ev[0] == "z":
                events.append(("d", evaluate(ev[2], shape), "temporaries"))
            elif ev[0] == "d":
                events.append(("d", evaluate(ev[2], shape), "gradients"))
            else:
                events.append(ev)
        phases.append(tuple(events))
    return phases[0], phases[1], prog["holes"], prog["aliases"]


def instantiate(key: str, variant: str, shape: dict[str, int]) -> tuple[Program, dict[int, dict[str, int]]]:
    """One variant of a piece at ``shape``: the program (fresh storage ids; every named storage a
    role) and, for a skeleton, the storage ids of each hole's ``X``, ``Y``, ``GY``, ``GX``."""
    key = keyed(key, shape)
    vars_ = entry(key)["vars"]
    fwd_t, bwd_t, holes_t, aliases = _template(key, variant, tuple((v, shape[v]) for v in vars_) + (("s", shape["s"]),))
    names: dict[Any, int] = {}

    def sid(name: Any) -> int:
        if name not in names:
            names[name] = new_sid()
        return names[name]

    def conv(events):
        out = []
        for ev in events:
            if ev[0] in ("a", "r"):
                out.append((ev[0], sid(ev[1]), *ev[2:]))
            else:
                out.append(ev)
        return out

    fwd, bwd = conv(fwd_t), conv(bwd_t)
    holes = {k: {r: sid(n) for r, n in h.items()} for k, h in holes_t.items()}
    roles = {n: i for n, i in names.items() if isinstance(n, str)}
    for alias, target in aliases.items():
        roles[alias] = sid(target)
    return Program(fwd, bwd, roles), holes
