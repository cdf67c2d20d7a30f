"""The gnnspec IR: frozen pydantic models for SPEC.md sections 1, 2 and 4.

Every value of the language has a typed field with its default; stages and plans are
discriminated unions keyed by a required ``kind``; sequences are tuples. Source positions live in
a ``spans`` field of type :class:`Spans`, which compares equal to every other ``Spans``: two specs
that mean the same thing are equal wherever their text came from.

The IR also holds the vocabulary that is not a model of its own: the op signatures
(:data:`OP_SIGNATURES`) and the enumerations. This module imports nothing of gnnspec and nothing
of torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

# ---------------------------------------------------------------------------- source positions


SIZE_UNITS: dict[str, int] = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
"""The units of a size literal (``16GiB``), case-sensitive as written, in bytes."""


def size_bytes(text: str) -> int | None:
    """Bytes of a size literal such as ``16GiB``, ``1.5GB`` or ``1_000B`` (a number, then one of
    :data:`SIZE_UNITS`); None when that is not a whole number of bytes."""
    number = text.rstrip("KMGTiB")
    # exact arithmetic: a float would round sizes above 2**53 bytes
    value = Fraction(number.replace("_", "")) * SIZE_UNITS[text[len(number):]]
    return int(value) if value.denominator == 1 else None


class Span(NamedTuple):
    """A region of source text: 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


class Spans:
    """Source spans of a node's values, by field name ("" is the whole node, "name" its name).

    Equal to every other ``Spans`` and hashed alike, so positions never take part in equality.
    """

    __slots__ = ("_by_field",)

    def __init__(self, by_field: dict[str, Span] | None = None) -> None:
        self._by_field = dict(by_field or {})

    def get(self, name: str = "") -> Span | None:
        """The span of ``name``'s value, else of the whole node."""
        return self._by_field.get(name) or self._by_field.get("")

    def exact(self, name: str) -> Span | None:
        """The span of ``name``'s value if it was written, else None."""
        return self._by_field.get(name)

    def items(self):
        return self._by_field.items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spans)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "Spans()"


class IRModel(BaseModel):
    """Base of every IR node: frozen, no unknown fields, spans excluded from dumps and schema."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", arbitrary_types_allowed=True, populate_by_name=True
    )
    spans: SkipJsonSchema[Spans] = Field(default_factory=Spans, exclude=True, repr=False)

    def span(self, name: str = "") -> Span | None:
        return self.spans.get(name)


# ---------------------------------------------------------------------------- enumerations

ActName = Literal["relu", "gelu", "elu", "leaky_relu", "prelu", "tanh", "none"]
NormName = Literal["batch", "layer", "graph", "instance", "none"]
JkName = Literal["none", "last", "cat", "max"]
SolverName = Literal["anderson", "fixed_point", "broyden"]
DtypeName = Literal["float32", "bfloat16", "float16", "float64"]
OptimizerName = Literal["adam", "adamw", "sgd"]
LossName = Literal["ce", "bce", "mse"]

Scalar = Union[bool, int, float, str]

# ---------------------------------------------------------------------------- ops


@dataclass(frozen=True)
class OpParam:
    """One argument of an op: its type, default and, for enumerations, the allowed values."""

    name: str
    type: Literal["int", "float", "bool", "enum"]
    default: Scalar
    choices: tuple[str, ...] = ()
    minimum: float | None = None


@dataclass(frozen=True)
class OpSignature:
    """The arguments an op takes. ``heads`` names the argument that splits the width, if any."""

    name: str
    params: tuple[OpParam, ...] = ()
    heads: str | None = None
    builtin: bool = field(default=True, compare=False)

    def param(self, name: str) -> OpParam | None:
        return next((p for p in self.params if p.name == name), None)


def _heads(default: int) -> OpParam:
    return OpParam("heads", "int", default, minimum=1)


OP_SIGNATURES: dict[str, OpSignature] = {
    sig.name: sig
    for sig in (
        OpSignature("gcn"),
        OpSignature("sage", (OpParam("aggr", "enum", "mean", ("mean", "max", "sum", "min")),)),
        OpSignature("gat", (_heads(4),), heads="heads"),
        OpSignature("gatv2", (_heads(4),), heads="heads"),
        OpSignature(
            "gen",
            (
                OpParam("aggr", "enum", "softmax", ("softmax", "powermean", "mean", "max", "sum", "min")),
                OpParam("t", "float", 1.0, minimum=0.0),
                OpParam("learn_t", "bool", False),
            ),
        ),
        OpSignature("gin"),
        OpSignature("graphconv"),
        OpSignature("transformer", (_heads(4),), heads="heads"),
        OpSignature("egc", (_heads(8), OpParam("bases", "int", 4, minimum=1)), heads="heads"),
        OpSignature("cheb", (OpParam("k", "int", 2, minimum=1),)),
    )
}


def register_op_signature(signature: OpSignature) -> None:
    """Make an op name known to the parser and checker (used by ``gnnspec.register_op``)."""
    OP_SIGNATURES[signature.name] = signature


class Op(IRModel):
    """A message-passing op: its name and every argument, defaults filled in signature order."""

    name: str
    args: tuple[tuple[str, Scalar], ...] = ()

    def arg(self, name: str, default: Any = None) -> Any:
        return dict(self.args).get(name, default)

    @property
    def heads(self) -> int | None:
        sig = OP_SIGNATURES.get(self.name)
        return None if sig is None or sig.heads is None else int(self.arg(sig.heads))


def default_op(name: str = "gcn") -> Op:
    sig = OP_SIGNATURES[name]
    return Op(name=name, args=tuple((p.name, p.default) for p in sig.params))


# ---------------------------------------------------------------------------- plans


class Store(IRModel):
    """Plain autograd: every layer's activations are kept for backward."""

    kind: Literal["store"]


class Checkpoint(IRModel):
    """Gradient checkpointing over ``segments`` contiguous segments (``None``:
    :func:`default_segments` of the stage's depth)."""

    kind: Literal["checkpoint"]
    segments: int | None = None


def default_segments(depth: int) -> int:
    """The segments ``checkpoint`` runs when the plan gives none: ``round(sqrt(depth))``, at least 1."""
    return max(1, round(math.sqrt(depth)))


def act_in_place(norm: str, act: str) -> bool:
    """Whether a stack layer's activation overwrites its normalisation's output (``act(norm(x))``
    with ``relu``/``leaky_relu`` after ``layer``/``batch`` norm): those norms' backward keeps their
    input and statistics, not their output, so the activation needs no buffer of its own (one
    ``[N, hidden]`` allocation and pass fewer per layer, read by the lowering and the estimator)."""
    return norm in ("layer", "batch") and act in ("relu", "leaky_relu")


def drop_in_place(kind: str, norm: str, act: str, dropout: float) -> bool:
    """Whether a ``kind`` stack layer's ``drop(relu(norm(x)))`` (with the stage's shared mask in
    ``rev``/``deq``; never in ``gcnii``, which drops its input) runs as ``relu(drop(norm(x)))`` in place on
    the norm's output, keeping only its result for the backward
    (:func:`gnnspec.lower.layers.relu_of_dropout`): ``relu(y) * m == relu(y * m)`` bit for bit for
    a dropout noise ``m >= 0``, the same draws in the same order, and the result's sign is the
    mask relu and dropout need. The layer then keeps one ``[N, hidden]`` tensor (which the next
    product keeps anyway) instead of three. Only for ``relu``: ``leaky_relu``'s slope would
    multiply in another order."""
    return kind != "gcnii" and act_in_place(norm, act) and act == "relu" and dropout > 0


class Reversible(IRModel):
    """Reconstruct each layer's input from its output in backward (``rev`` stages only)."""

    kind: Literal["reversible"]


class Implicit(IRModel):
    """Implicit-function-theorem backward of a fixed point (``deq`` stages only)."""

    kind: Literal["implicit"]


class Unroll(IRModel):
    """Backpropagate through every solver iteration (``deq`` stages only)."""

    kind: Literal["unroll"]


class Auto(IRModel):
    """Per stage, the fastest plan whose estimated peak fits ``budget`` bytes (None: device memory)."""

    kind: Literal["auto"]
    budget: int | None = None


Plan = Annotated[
    Union[Store, Checkpoint, Reversible, Implicit, Unroll, Auto], Field(discriminator="kind")
]
PLAN_MODELS: dict[str, type[IRModel]] = {
    "store": Store,
    "checkpoint": Checkpoint,
    "reversible": Reversible,
    "implicit": Implicit,
    "unroll": Unroll,
    "auto": Auto,
}


def plans_per_stage(plans: Sequence[Any], stages: Sequence[Any]) -> list[Any]:
    """One plan per stage from a list given per stage or per stack (``stages`` are IR stages):
    a list with one plan per stack gives each stack its plan, in order, and every other stage
    ``store``. ValueError for any other length."""
    stacks = [i for i, stage in enumerate(stages) if isinstance(stage, Stack)]
    if len(plans) != len(stages) and len(plans) == len(stacks):
        per_stack = dict(zip(stacks, plans))
        return [per_stack.get(i, Store(kind="store")) for i in range(len(stages))]
    if len(plans) != len(stages):
        raise ValueError(f"got {len(plans)} plans for {len(stages)} stages ({len(stacks)} stacks)")
    return list(plans)


# ---------------------------------------------------------------------------- stages


class Linear(IRModel):
    """``y = x W^T + b``; ``dim`` defaults to ``hidden``, or to ``out`` in last place."""

    kind: Literal["linear"]
    dim: int | None = None
    bias: bool = True


class Mlp(IRModel):
    """``linear`` to each width of ``dims`` in turn (empty: ``[hidden]``), ``norm``/``act``/``dropout`` between."""

    kind: Literal["mlp"]
    dims: tuple[int, ...] = ()
    act: ActName = "relu"
    dropout: float = 0.0
    norm: NormName = "none"


class Dropout(IRModel):
    """Elementwise dropout with probability ``p``."""

    kind: Literal["dropout"]
    p: float = 0.5
    positional: ClassVar[str] = "p"


class Act(IRModel):
    """An activation function."""

    kind: Literal["act"]
    fn: ActName = "relu"
    positional: ClassVar[str] = "fn"


class Norm(IRModel):
    """A normalisation layer."""

    kind: Literal["norm"]
    type: NormName = "batch"
    positional: ClassVar[str] = "type"


class Stack(IRModel):
    """Arguments shared by the message-passing stacks (SPEC.md section 2)."""

    op: Op = Field(default_factory=default_op)
    depth: int = 2
    hidden: int | None = None
    norm: NormName = "none"
    act: ActName = "relu"
    dropout: float = 0.0
    tie: bool = False
    plan: Plan | None = None
    weight_decay: float | None = None


class Plain(Stack):
    """``x = drop(act(norm(conv(x))))``, ``depth`` times.

    ``project=false`` (an extension of SPEC.md): no linear projection is inserted in front when the
    input width differs from ``hidden``; the first convolution maps the input width to ``hidden``
    itself, as torch-geometric's models (``GAT``, ``GCN``) and the papers' first layers do."""

    kind: Literal["plain"]
    jk: JkName = "none"
    project: bool = True


class Res(Stack):
    """Post-activation residual (ResGCN): ``x = drop(act(norm(conv(x)))) + x``."""

    kind: Literal["res"]
    jk: JkName = "none"


class ResPlus(Stack):
    """Pre-activation residual (DeeperGCN): ``x = x + conv(drop(act(norm(x))))``."""

    kind: Literal["res+"]
    jk: JkName = "none"


class Dense(Stack):
    """Dense connections: ``x = cat(x, conv(x))``; the width grows by ``hidden`` per layer."""

    kind: Literal["dense"]
    jk: JkName = "none"


class Rev(Stack):
    """Grouped reversible residual (RevGNN): ``x'_i = f_i(x'_{i-1}) + x_i`` over ``groups`` channel groups."""

    kind: Literal["rev"]
    groups: int = 2


class Gcnii(Stack):
    """GCNII: initial residual to the stage input (``alpha``) plus identity mapping (``theta``)."""

    kind: Literal["gcnii"]
    jk: JkName = "none"
    alpha: float = 0.1
    theta: float = 0.5


class Deq(Stack):
    """Deep equilibrium: ``z* = f(z*, x)``, ``f(z, x) = conv(act(norm(z))) + x``, one layer's weights."""

    kind: Literal["deq"]
    depth: int = 1
    solver: SolverName = "anderson"
    max_iter: int = 50
    tol: float = 1e-4


class Appnp(IRModel):
    """Personalised-PageRank propagation: ``k`` steps with teleport ``alpha``; no weights."""

    kind: Literal["appnp"]
    k: int = 10
    alpha: float = 0.1


class Sgc(IRModel):
    """``A^k x`` with the GCN-normalised adjacency; no weights."""

    kind: Literal["sgc"]
    k: int = 2


Stage = Annotated[
    Union[Linear, Mlp, Dropout, Act, Norm, Plain, Res, ResPlus, Dense, Rev, Gcnii, Deq, Appnp, Sgc],
    Field(discriminator="kind"),
]
STAGE_MODELS: dict[str, type[IRModel]] = {
    "linear": Linear,
    "mlp": Mlp,
    "dropout": Dropout,
    "act": Act,
    "norm": Norm,
    "plain": Plain,
    "res": Res,
    "res+": ResPlus,
    "dense": Dense,
    "rev": Rev,
    "gcnii": Gcnii,
    "deq": Deq,
    "appnp": Appnp,
    "sgc": Sgc,
}
STACK_KINDS = tuple(k for k, m in STAGE_MODELS.items() if issubclass(m, Stack))
# torch's generators take 64-bit seeds; the data generators derive seeds from it, so stay signed
MAX_SEED = 2**63 - 1

SPEC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
"""What a spec writes bare as a name (grammars/gnnspec.lark: ``NAME``, less ``res+``'s suffix);
``SPEC_NAME.match(text)`` matches the whole text."""
SPEC_WORDS = frozenset({"true", "false", "auto", "none"})
"""The words a spec reads as values, not as names."""

MAX_WIDTH = 2**31 - 1
"""The widest layer a spec may ask for (``in``, ``out``, ``hidden``, ``dim``, ``dims``): beyond it
torch's kernels index with 32-bit integers, and a weight matrix alone holds 2**31 elements."""

# Which stage kinds each plan is valid for (SPEC.md section 4); None: every stage.
PLAN_VALID_FOR: dict[str, tuple[str, ...] | None] = {
    "store": None,
    "checkpoint": STACK_KINDS,
    "reversible": ("rev",),
    "implicit": ("deq",),
    "unroll": ("deq",),
}


def uses_batch_norm(spec: "Spec") -> bool:
    """Whether a stage of ``spec`` normalises with batch statistics (a ``norm(batch)`` stage, or
    ``norm=batch`` on a stack or ``mlp``): such a model cannot take a training step on one node."""
    return any((stage.kind == "norm" and stage.type == "batch") or getattr(stage, "norm", None) == "batch"
               for stage in spec.model)


def runnable_plan(stage: Any, plan: Any) -> Any:
    """The plan ``stage`` runs under ``plan``: ``plan`` where it is valid for the stage's kind
    (:data:`PLAN_VALID_FOR`), ``store`` elsewhere; ``auto`` without a planner decision runs
    ``store``. A ``deq``'s ``store`` is its synonym ``unroll`` (it keeps every iteration's graph),
    the name the lowering and the estimate report."""
    valid = None if plan.kind == "auto" else PLAN_VALID_FOR[plan.kind]
    if plan.kind == "auto" or not (valid is None or stage.kind in valid):
        plan = Store(kind="store")
    return Unroll(kind="unroll") if plan.kind == "store" and stage.kind == "deq" else plan


def runnable_plans(stages: Sequence[Any], plan: Any) -> list[Any]:
    """:func:`runnable_plan` of each stage, from one plan for the whole model or a list of one plan
    per stage or per stack (:func:`plans_per_stage`)."""
    per_stage = plans_per_stage(plan, stages) if isinstance(plan, (list, tuple)) else [plan] * len(stages)
    return [runnable_plan(stage, p) for stage, p in zip(stages, per_stage)]

# ---------------------------------------------------------------------------- spec


class Graph(IRModel):
    """The graph assumed when no data is given."""

    nodes: int
    edges: int
    features: int | None = None
    classes: int | None = None


class Train(IRModel):
    """Training settings; the test score is reported at the best validation epoch."""

    optimizer: OptimizerName = "adam"
    lr: float = 0.01
    weight_decay: float = 0.0
    momentum: float = 0.0
    epochs: int = 200
    patience: int | None = None
    loss: LossName = "ce"


Width = Union[int, Literal["auto"]]


class Spec(IRModel):
    """A whole spec: the model pipeline and the settings around it (SPEC.md section 1)."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_alias=True, validate_by_name=True)

    model: tuple[Stage, ...] = Field(min_length=1)
    name: str = "model"
    in_: Width = Field(default="auto", alias="in")
    out: Width = "auto"
    hidden: int = 64
    graph: Graph | None = None
    dtype: DtypeName = "float32"
    plan: Plan = Field(default_factory=lambda: Auto(kind="auto"))
    train: Train = Field(default_factory=Train)
    seed: int = 0


# Keys of a spec file in canonical order, with the field each one fills.
SPEC_KEYS: dict[str, str] = {
    "name": "name",
    "in": "in_",
    "out": "out",
    "hidden": "hidden",
    "model": "model",
    "graph": "graph",
    "dtype": "dtype",
    "plan": "plan",
    "train": "train",
    "seed": "seed",
}


def ir_json(spec: Spec) -> dict[str, Any]:
    """The IR as JSON data (keys as written in spec files, e.g. ``in``); spans left out."""
    return spec.model_dump(mode="json", by_alias=True)
