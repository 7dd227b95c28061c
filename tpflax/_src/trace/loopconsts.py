"""Parameters a ``scan`` body reads as loop constants outside any contraction (:func:`loop_consts`).

The dataflow trace follows parameters into contractions and lookups; a scan body that reads a parameter
elementwise (a diagonal SSM's ``exp(A) * h + u * B``, Mamba's ``A_log`` and ``D`` in a per-timestep selective
scan) records no use of it. Its gradient still comes out at every step of the backward loop: jax's scan
transpose adds each step's contribution, summed over the batch, into a carry, and XLA:CPU all-reduces that
contribution over the batch axes inside the loop, at every step (measured, XLA:CPU data=8 and data=2,model=4:
``A_log (128, 16)`` and ``B (16,)`` read in the body of a 64-step scan, the HLO's ``all-reduce`` of both inside
the backward ``while`` body, 64 times; tests/test_loop_grads.py). :func:`tpflax._src.cost.gradients.loop_reps`
prices those steps, as for a recurrent cell's kernels (through :attr:`tpflax._src.cost.traced.Traced.loops`).
"""

from __future__ import annotations

import math
from typing import Any

from tpflax._src.jaxprs import CALL_KEYS, body_of, scan_counts


def loop_consts(m: Any) -> dict[str, int]:
    """``{parameter path: trip count}`` for the float parameters the model's forward hands a ``scan`` as
    loop constants, as they are or through ops on parameters alone (``-exp(A_log)``, a cast, a reshape), at
    their own size; the largest trip count of the scans (nested ones multiplied) reading each. Cached per
    model and shapes.

    >>> import jax, jax.numpy as jnp
    >>> from tpflax._src.model import as_model
    >>> def fn(v, x):
    ...     a = -jnp.exp(v["A"])
    ...     return jax.lax.scan(lambda h, u: (a * h + u * v["B"], h), jnp.zeros(4), x)[1] @ v["W"]
    >>> sds = lambda *s: jax.ShapeDtypeStruct(s, "float32")
    >>> loop_consts(as_model(fn, (sds(6, 4),), {"A": sds(4), "B": sds(4), "W": sds(4, 2)}))
    {'A': 6, 'B': 6}
    """
    from tpflax._src.model_cache import cached
    from tpflax._src.trace.dataflow import trace_jaxpr

    # :func:`tpflax._src.trace.dataflow.dataflow` keeps what its trace gives: no second trace after it
    return cached("loop_consts", m, lambda: loop_consts_of(*trace_jaxpr(m)))


def loop_consts_of(closed: Any, paths: list[str], n: int) -> dict[str, int]:
    """:func:`loop_consts` of a traced forward (:func:`tpflax._src.trace.dataflow.trace_jaxpr`'s triple)."""
    jaxpr = closed.jaxpr
    env: dict[Any, frozenset[str]] = {}
    sizes: dict[str, int] = {}
    for i, v in enumerate(jaxpr.invars[:n]):
        if _floating(v):
            env[v] = frozenset({paths[i]})
            sizes[paths[i]] = _size(v)
    for v in jaxpr.constvars:
        env[v] = frozenset()
    out: dict[str, int] = {}
    _walk(jaxpr, env, 1, sizes, out)
    return out


def _walk(jaxpr: Any, env: dict[Any, frozenset[str]], trips: int, sizes: dict[str, int],
          out: dict[str, int]) -> list[frozenset[str] | None]:
    """Walk ``jaxpr`` with ``env``: each var computed from parameters alone, the parameters it is made of.
    Records the parameters scans read as loop constants in ``out``; the outvars' parameters (None: not made
    from parameters alone)."""
    def of(v: Any) -> frozenset[str] | None:
        if not hasattr(v, "aval") or type(v).__name__ == "Literal":
            return frozenset()
        return env.get(v)

    for eqn in jaxpr.eqns:
        ins = [of(v) for v in eqn.invars]
        prm = eqn.params
        name = eqn.primitive.name
        if name == "scan":
            # jax 0.12's scan has no num_consts and an open body jaxpr: read as the trace reads them
            body = body_of(prm["jaxpr"])
            k, length = scan_counts(eqn, body)[0], prm["length"]
            for v, got in zip(eqn.invars[:k], ins[:k], strict=True):
                for p in got or ():
                    if _floating(v) and _size(v) == sizes[p]:
                        out[p] = max(out.get(p, 0), trips * length)
            inner = {bv: got for bv, got in zip(body.invars[:k], ins[:k], strict=True) if got is not None}
            for bv in body.constvars if hasattr(body, "constvars") else ():
                inner[bv] = frozenset()
            _walk(body, inner, trips * length, sizes, out)
            outs: list[frozenset[str] | None] = [None] * len(eqn.outvars)
        elif (sub := next((prm[c] for c in CALL_KEYS if c in prm), None)) is not None and \
                hasattr(getattr(sub, "jaxpr", sub), "invars") and \
                len(getattr(sub, "jaxpr", sub).invars) == len(eqn.invars):
            inner_jaxpr = getattr(sub, "jaxpr", sub)
            inner = {bv: got for bv, got in zip(inner_jaxpr.invars, ins, strict=True) if got is not None}
            for bv in inner_jaxpr.constvars:
                inner[bv] = frozenset()
            outs = _walk(inner_jaxpr, inner, trips, sizes, out)
            if len(outs) != len(eqn.outvars):
                outs = [None] * len(eqn.outvars)
        elif any(x is None for x in ins) or any(isinstance(p, (list, tuple)) and p and hasattr(p[0], "jaxpr")
                                                for p in prm.values()):
            outs = [None] * len(eqn.outvars)  # reads an activation (or branches: cond, while), not parameters alone
        else:
            made = frozenset().union(*ins) if ins else frozenset()
            outs = [made] * len(eqn.outvars)
        for v, got in zip(eqn.outvars, outs, strict=True):
            if got is not None:
                env[v] = got
    return [of(v) for v in jaxpr.outvars]


def _floating(v: Any) -> bool:
    import jax.numpy as jnp

    dtype = getattr(getattr(v, "aval", None), "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _size(v: Any) -> int:
    return math.prod(getattr(v.aval, "shape", ()))
