"""Reading jaxpr equations the same way wherever tpflax walks one (the trace, the aligned-layout step, ZeRO-3's
scan placement): shared, so apply and the step need not import the trace for it."""

from __future__ import annotations

from typing import Any

# the parameters that hold a called jaxpr (pjit's, closed_call's, custom_jvp's and custom_vjp's)
CALL_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def body_of(j: Any) -> Any:
    """The open jaxpr of a ``ClosedJaxpr`` or ``Jaxpr`` parameter (None when it is neither)."""
    inner = getattr(j, "jaxpr", j)
    return inner if hasattr(inner, "eqns") else None


def aval_shape(v: Any) -> tuple:
    """A jaxpr variable's shape (``()`` for one without)."""
    return tuple(getattr(v.aval, "shape", ()))


def scan_counts(eqn: Any, body: Any) -> tuple[int, int]:
    """``(num consts, num carry)`` of a scan equation: its parameters, or, where the scan has neither (jax 0.12),
    its shapes.

    The body takes consts + carry + one slice of each xs and returns carry + one
    slice of each ys; the equation's xs and ys have a leading length dim the
    body's do not, and its consts and carries have the body's shapes. So the
    trailing inputs whose shapes differ are xs, the leading outputs whose
    shapes agree are carries, and the rest of the inputs are consts.

    >>> import jax, jax.numpy as jnp
    >>> def f(c, xs):
    ...     return jax.lax.scan(lambda h, x: (h * c + x, h), jnp.zeros(3), xs)
    >>> eqn = jax.make_jaxpr(f)(jnp.ones(3), jnp.ones((5, 3))).jaxpr.eqns[-1]
    >>> scan_counts(eqn, body_of(eqn.params["jaxpr"]))
    (1, 1)
    """
    p = eqn.params
    if "num_consts" in p and "num_carry" in p:
        return int(p["num_consts"]), int(p["num_carry"])
    n_x = 0
    for outer, inner in zip(reversed(eqn.invars), reversed(body.invars), strict=False):
        if aval_shape(outer) == aval_shape(inner):
            break
        n_x += 1
    n_carry = 0
    for outer, inner in zip(eqn.outvars, body.outvars, strict=False):
        if aval_shape(outer) != aval_shape(inner):
            break
        n_carry += 1
    return len(eqn.invars) - n_x - n_carry, n_carry
