"""Handlers for control flow (``scan``, ``while``, ``cond``) and calls (jit, remat, custom_jvp/vjp).

Parameters are read defensively: primitive parameters change between jax
versions (jax 0.12's ``scan`` carries ``{jaxpr, length, reverse, unroll,
ft_in, ft_out}`` without ``num_consts``/``num_carry``, and its ``jaxpr`` is an
open ``Jaxpr`` rather than a ``ClosedJaxpr``). Counts that a version leaves out
are derived from what every version has: the body's and the equation's
invars and outvars and their shapes.

>>> import jax, jax.numpy as jnp
>>> eqn = jax.make_jaxpr(lambda w, h, xs: jax.lax.scan(lambda c, x: (c @ w + x, c), h, xs))(
...     jnp.zeros((4, 4)), jnp.zeros((2, 4)), jnp.zeros((5, 2, 4))).jaxpr.eqns[0]
>>> scan_counts(eqn, body_of(eqn.params["jaxpr"]))
(1, 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from tpflax._src.jaxprs import CALL_KEYS, aval_shape, body_of, scan_counts
from tpflax._src.trace.interpreter import Val, Walk, opaque, same_tags

# Primitives whose body takes the equation's (trailing) inputs and gives its outputs.
CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
         "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin")

# rematerialised calls, and the checkpoint policies that save nothing (jax.checkpoint's default,
# ``nothing_saveable``): the backward recomputes the whole body (:func:`tpflax._src.trace.dataflow.remat_share`)
REMAT = ("checkpoint", "remat", "remat2")
FULL_REMAT = (None, jax.checkpoint_policies.nothing_saveable)


def call(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """Walk into the body of a call-like primitive; anything else is opaque."""
    for key in CALL_KEYS:
        inner = body_of(eqn.params.get(key))
        if inner is None:
            continue
        skip = len(eqn.invars) - len(inner.invars)
        if skip >= 0:
            if eqn.primitive.name in REMAT and eqn.params.get("policy") in FULL_REMAT:
                w.rematted.add(id(eqn))  # the backward runs its body again (a collective in it too)
            return w.run(inner, ins[skip:], ctx + (id(eqn),))
    return opaque(w, eqn, ins, ctx, ranks)


def _loop(w: Walk, body: Any, consts: list[Val], carry: list[Val], xs: list[Val], length: int,
          ctx: tuple) -> tuple[list[Val], list[Val]]:
    """Walk a loop body until the carry's tags stop growing and its ids stop spreading (:attr:`Val.fed`);
    returns (carry out, ys). A carry started from constants is walked again from the tags it ends with."""
    consts = [dataclasses.replace(c, const_of=length or 1) if c.origin else c for c in consts]
    seeded = [c.constant for c in carry]
    records = (set(w.joined), {k: set(v) for k, v in w.added.items()}) if any(seeded) else None
    state, outs = _fixed(w, body, consts, carry, xs, ctx)
    if records and any(s and v.tags is not None for s, v in zip(seeded, state, strict=True)):
        # a state started from constants (a selective scan's ``h = jnp.zeros(...)``, then ``h = a * h + b``) holds
        # only what the body adds to it: the walks before it held the body's tags saw that add as a branch joining
        # a stream (Walk.joined, Walk.added). Walked again from its tags; a carry from activations starts as it came
        w.joined.clear()
        w.joined.update(records[0])
        w.added.clear()
        w.added.update(records[1])
        start = [v if s else c for s, v, c in zip(seeded, state, carry, strict=True)]
        state, outs = _fixed(w, body, consts, start, xs, ctx)
    for v in outs[:len(carry)]:
        for m in v.tags or ():
            for uid, _ in m:
                if w.uses[uid].scan_length:  # applied every step and fed back: a cell
                    w.recurrent.add(uid)
    return outs[:len(carry)], outs[len(carry):]


def _fixed(w: Walk, body: Any, consts: list[Val], carry: list[Val], xs: list[Val],
           ctx: tuple) -> tuple[list[Val], list[Val]]:
    """Walk ``body`` from ``carry`` until the carry's tags stop growing and its ids stop spreading: (state, outs)."""
    state = list(carry)
    outs: list[Val] = []
    for _ in range(4):
        outs = w.run(body, consts + state + xs, ctx)
        new = [w.join(a, b) for a, b in zip(carry, outs[:len(carry)], strict=True)]
        if all(same_tags(a, b) and (a.fed, a.deps, a.live) == (b.fed, b.deps, b.live)
               for a, b in zip(new, state, strict=True)):
            break
        state = new
    return state, outs


def _scan_length(eqn: Any, n_in: int) -> int:
    if "length" in eqn.params:
        return int(eqn.params["length"])
    xs = [aval_shape(v) for v in eqn.invars[n_in:]]
    return xs[0][0] if xs and xs[0] else 0


def scan(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    body = body_of(eqn.params["jaxpr"])
    if body is None:
        return opaque(w, eqn, ins, ctx, ranks, why="no body jaxpr")
    nc, ncarry = scan_counts(eqn, body)
    length = _scan_length(eqn, nc + ncarry)
    consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
    w.lengths[id(eqn)] = max(length, 1)
    sliced = []
    for x in xs:
        for path, dims in x.origin:
            if dims and dims[0] is not None:
                w.scanned.setdefault(path, dims[0])
        if x.tags is not None:
            w.escape(x.tags[0], "scanned over (each step sees one slice)")
        sliced.append(w.moved(x, list(range(1, x.rank)), x.rank - 1))
    c_out, ys = _loop(w, body, consts, carry, sliced, length, ctx + (id(eqn),))
    ys = [w.moved(y, [None] + list(range(y.rank)), y.rank + 1) for y in ys]
    return c_out + ys


def while_(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    p = eqn.params
    body, cond_body = body_of(p["body_jaxpr"]), body_of(p["cond_jaxpr"])
    n_carry = len(eqn.outvars)
    # cond takes cond consts + carry, body takes body consts + carry.
    cn = int(p.get("cond_nconsts", len(cond_body.invars) - n_carry))
    bn = int(p.get("body_nconsts", len(body.invars) - n_carry))
    cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    c_out, _ = _loop(w, body, bconsts, carry, [], 0, ctx + (id(eqn),))
    w.run(cond_body, cconsts + c_out, ctx + (id(eqn), "cond"))
    return c_out


def cond(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    outs: list[Val] | None = None
    for i, br in enumerate(eqn.params["branches"]):
        body = body_of(br)
        # The first input is the branch index; the branches take the rest.
        o = w.run(body, ins[len(ins) - len(body.invars):], ctx + (("branch", id(eqn), i),))
        outs = o if outs is None else [w.join(a, b) for a, b in zip(outs, o, strict=True)]
    return outs or [Val(r) for r in ranks]
