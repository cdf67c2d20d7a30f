"""Timelines of ``deq`` stages (:mod:`gnnspec.lower.deq`): solver buffers and applications of ``f``.

``f(z, x) = layers(z) + x`` is the calibrated ``skel:deqf`` skeleton around the chain of the
layer's units. With ``Z = N * hidden * s`` (one iterate):

* ``unroll`` (and ``store``): ``z0 = 0`` then ``max_iter + 1`` applications chained with autograd
  (a solve that never converges: the worst case), a residual temporary after each;
* ``implicit``: the solve without autograd (Anderson: history ``F``, ``G`` of ``m = 5`` iterates
  each; fixed point: none; Broyden: ``U``, ``V`` of up to 30), the iterate, ``g(iterate)``, the best
  iterate so far (re-cloned when the residual improves), one application of ``f`` without saving;
  then one application with autograd and the output's clone. Backward: the adjoint solve with the
  same buffers, each iteration a vector-Jacobian product through the retained application (its
  saved tensors kept, no parameter gradients), then the application's backward;
* ``checkpoint``: as ``unroll``. The solve is one step, so its one segment is a stack's last,
  which runs plainly (:func:`gnnspec.lower.checkpoint.run_segments`): every iteration is kept.

The gradient of ``x`` through ``+ x`` is the incoming gradient itself, accumulated in place over
applications: the stage hands back one ``Z``.
"""

from __future__ import annotations

from gnnspec import ir
from gnnspec.lower.deq import ANDERSON_MEMORY, BROYDEN_MEMORY
from gnnspec.memory.timeline import Program, new_sid

SOLVER_ITERATIONS_EXPLICIT = 3


def _application(stage, mode: str, z_grad: bool, accum: bool, extras: dict[str, int], x: int) -> Program:
    from gnnspec.memory.estimate import in_skeleton

    g = stage.graph
    units = stage.layer_units()
    # f's loop holds each layer's input (the layer before's output) until the layer returns
    per_layer = len(units) // stage.stage.depth
    holds = {k * per_layer: (k + 1) * per_layer for k in range(1, stage.stage.depth)}
    prog, _ = in_skeleton("skel:deqf", {"N": g.nodes, "D": stage.hidden, "s": g.s}, mode, z_grad,
                          units, accum, extras or None, holds=holds)
    # x (the stage's input) is held by the stage; its gradient is handled by the stage
    out = prog.bind(X1=x)
    out.roles = {k: v for k, v in out.roles.items() if k in ("X", "Y", "GY", "GX")}
    return out


def deq_program(stage, plan: ir.Plan, grad_in: bool) -> tuple[Program, bool]:
    from gnnspec.memory.estimate import _alloc

    st, g = stage.stage, stage.graph
    Z = _alloc(g, g.nodes * stage.hidden * g.s)
    x = new_sid()
    fwd: list[tuple] = []
    extras: dict[str, int] = {}
    if st.dropout > 0:
        extras["M"] = new_sid()
        fwd.append(("a", extras["M"], Z, None))
    if plan.kind == "implicit":
        prog = _implicit(stage, x, Z, extras, fwd)
    else:
        prog = _unrolled(stage, x, Z, extras, fwd)
    if "M" in extras:
        prog.fwd.append(("r", extras["M"]))
        if _mask_saved(stage):
            prog.bwd.append(("r", extras["M"]))
    prog.roles["X"] = x
    if grad_in:
        gx = new_sid()
        prog.bwd += [("r", prog.roles["GY"]), ("a", gx, Z, None)]
        prog.roles["GX"] = gx
    return prog, True


def _mask_saved(stage) -> bool:
    """Whether the applications of ``f`` save the stage's dropout mask for backward, which then
    holds it until the stage's backward ends: a ``mask`` unit (``y * mask`` saves the mask) does;
    a mask the norm's unit multiplies in place (layer or batch norm, then relu) is not saved, and
    the mask is freed when the stage's forward returns (the estimate had kept it: 5-11% high)."""
    return any(unit.key == "mask" for unit in stage.layer_units())


def _unrolled(stage, x: int, Z: int, extras: dict[str, int], pre: list[tuple]) -> Program:
    iters = stage.stage.max_iter
    count = iters + 1
    tie_accum = True  # one set of weights applied count times

    from gnnspec.memory.estimate import _chain_marked

    chosen = list(range(count)) if count <= 3 else [0, 1, count - 1]
    progs = []
    for k in chosen:
        p = _application(stage, "g", k > 0, k != count - 1 and tie_accum, extras, x)
        if k != count - 1:
            # the residual check after each iteration: one temporary iterate
            t = new_sid()
            p = Program(p.fwd + [("a", t, Z, None), ("r", t)], p.bwd, p.roles)
        progs.append(p)
    f, b, roles = _chain_marked(progs)
    z0 = roles["X"]  # zeros_like(x): held by the solver's frame until the stage returns
    f = [("a", z0, Z, None)] + f + [("r", z0)]
    if "M" in extras and _mask_saved(stage):  # the stage's mask outlives every application that saved it
        b = b + [("r", extras["M"])]
    prog = _maybe_compress(f, b, roles, count, extras, x)
    return Program(pre + prog.fwd, prog.bwd, {"Y": roles["Y"], "GY": roles["GY"]})


def _maybe_compress(f, b, roles, count, extras, x) -> Program:
    from gnnspec.memory.estimate import _compress, _strip_marks

    prog = Program(f, b, dict(roles))
    if count <= 3:
        return _strip_marks(prog)
    keep = set(roles.values()) | set(extras.values()) | {x}
    return _compress(prog, count, keep)


def _solver_buffers(stage, Z: int) -> tuple[int, int, int]:
    """(history bytes, iterates alive while ``g`` runs, iterates the update makes after ``g``
    returns beyond its output) of the solver. Broyden: the residual, the step, the new iterate and
    the best while ``g`` runs; then the new residual's difference, ``B^T dx`` and ``u`` with
    ``B dr``'s product (measured with :class:`~gnnspec.memory.measure.LiveStorageTracker`)."""
    solver = stage.stage.solver
    if solver == "anderson":
        return 2 * ANDERSON_MEMORY * Z, 3, 0
    if solver == "broyden":
        memory = min(BROYDEN_MEMORY, max(stage.stage.max_iter, 1))
        return 2 * memory * Z, 4, 3
    return 0, 2, 0


def _solve(stage, Z: int, step_events, z0: int | None = None) -> list[tuple]:
    """A solve's events: its buffers, then a few iterations of ``step_events(z_sid, out_sid)``
    (the map applied to the iterate), with the best iterate cloned on each improvement.

    In half precision the solver works in float32 (:func:`gnnspec.lower.deq._work_dtype`): its
    buffers are float32 iterates, it starts from a float32 copy of ``z0`` (held until it returns),
    the map gets a half copy of the iterate and its half output is copied to float32, and the best
    iterate is copied back to half at the end."""
    g = stage.graph
    half = g.s == 2
    events: list[tuple] = []
    if half:
        Z_half, Z = Z, Z * 2
        z0 = new_sid()
        events.append(("a", z0, Z, None))
        inner = step_events

        def step_events(z_sid: int, out_sid: int) -> list[tuple]:
            z_in, y = new_sid(), new_sid()
            return ([("a", z_in, Z_half, None)] + inner(z_in, y)
                    + [("a", out_sid, Z, None), ("r", y), ("r", z_in)])
    history, working, update = _solver_buffers(stage, Z)
    h = new_sid()
    if history:
        events.append(("a", h, history, None))
    # The solvers start from a view of z0 and have no best iterate yet; the first iteration mixes
    # nothing (Anderson carries g(z0)) and updates nothing (Broyden); a steady state from the second.
    z, best, prev = z0, None, None
    iterations = min(SOLVER_ITERATIONS_EXPLICIT, stage.stage.max_iter)
    extra_working = [new_sid() for _ in range(max(0, working - 3))] if iterations > 1 else []
    for w in extra_working:
        events.append(("a", w, Z, None))
    for k in range(iterations):
        out = new_sid()
        events += step_events(z, out)
        if update and k > 0:
            t = new_sid()
            events += [("a", t, update * Z, None), ("r", t)]
        if prev is not None:
            events.append(("r", prev))
        tmp = new_sid()
        events += [("a", tmp, Z, None), ("r", tmp)]  # the residual
        new_best = new_sid()
        events += [("a", new_best, Z, None)] + ([("r", best)] if best is not None else [])
        best = new_best
        # Anderson mixes from its second iteration on (the first carries g(z0)); Broyden steps from
        # g(z0) on, unless it stops there (max_iter 1)
        if history and (k > 0 or (update and stage.stage.max_iter > 1)):
            nz = new_sid()  # the mixed iterate
            events += [("a", nz, Z, None)] + ([("r", z)] if z != z0 else [])
            z = nz
        else:
            z = out
        prev = out
    events += [("r", prev)] + ([("r", z)] if z != z0 else []) + [("r", w) for w in extra_working]
    if history:
        events.append(("r", h))
    if half:
        back = new_sid()
        events += [("a", back, Z_half, None), ("r", best), ("r", z0)]
        best = back
    return events, best


def _implicit(stage, x: int, Z: int, extras: dict[str, int], pre: list[tuple]) -> Program:
    fwd = list(pre)
    z0 = new_sid()
    fwd.append(("a", z0, Z, None))

    def forward_step(z_sid: int, out_sid: int) -> list[tuple]:
        app = _application(stage, "o", False, False, extras, x).bind(X=z_sid, Y=out_sid)
        return app.fwd

    events, z_star = _solve(stage, Z, forward_step, z0)
    fwd += events
    app = _application(stage, "g", True, False, extras, x)
    app = app.bind(X=z_star)
    fwd += app.fwd
    out = new_sid()
    fwd += [("a", out, Z, None), ("r", app.roles["Y"]), ("r", z0)]
    # backward: the adjoint solve through the retained application, then its backward
    gy = new_sid()

    def adjoint_step(u_sid: int, out_sid: int) -> list[tuple]:
        vjp = _application(stage, "g", True, False, extras, x)
        vjp_f = {ev[1] for ev in vjp.fwd if ev[0] == "a"}
        gu = new_sid()
        vjp = vjp.bind(GY=u_sid, GX=gu)
        events = []
        for ev in vjp.bwd:
            if ev[0] == "a" and ev[3] == "grad":
                continue  # autograd.grad(inputs=z) computes no parameter gradients
            if ev[0] == "r" and (ev[1] in vjp_f or ev[1] == vjp.roles.get("X") or ev[1] == u_sid):
                continue  # retain_graph: the saved tensors stay
            if ev[0] == "a" and ev[1] == u_sid:
                continue
            events.append(ev)
        # the retained application's storages already exist (they are the forward's)
        events = [ev for ev in events if not (ev[0] == "r" and ev[1] not in {e[1] for e in events if e[0] == "a"})]
        return events + [("a", out_sid, Z, None), ("r", gu)]

    bwd_events, u = _solve(stage, Z, adjoint_step, gy)
    app = app.bind(GY=u)
    bwd = bwd_events + [("r", gy)] + app.bwd + [("r", u), ("r", z_star)]
    return Program(fwd, bwd, {"Y": out, "GY": gy})
