"""Run a model written for its own parameter order on head-aligned stored parameters.

A plan made with ``fused="aligned"`` stores each fused kernel's fused dim rank by
rank (:class:`tpflax._src.layout.Interleave`): rank ``r`` holds ``[q_r | k_r | v_r]``.
The model's own ``apply`` reads the kernel in its natural order, so on stored
parameters it computes wrong values. :func:`aligned` fixes that without touching
the model: it traces the function to a jaxpr and evaluates it equation by
equation, carrying each value derived from a stored leaf *as stored* (its natural
value is ``from_storage(value)``) while that is cheap:

* ``dot_general`` with the stored operand on a free dim, ``transpose``,
  ``reshape`` keeping the dim whole, ``broadcast_in_dim``, ``squeeze``,
  reductions over other dims, elementwise ops and the identities
  (``with_sharding_constraint``, ``checkpoint_name``) keep it stored (a natural
  operand of an elementwise op, a bias say, is put into stored order);
* ``split``/``slice`` taking the pieces, and a reshape to ``(pieces, ...)``, cut
  each piece *per rank* (reshape the dim to ``(ranks, block)``, take the piece's
  columns in every block): the result is the natural piece, sharded rank-major
  like the stored dim, so no reshard is needed;
* ``jit``/``closed_call`` are inlined, ``checkpoint`` (remat) is re-issued over
  the interpreted body with the same policy, ``scan`` with an interpreted body
  (stacked stored leaves lose their leading dim inside; stored ys come out stored);
* anything else sees its stored inputs materialized (``from_storage``: a gather,
  i.e. a reshard, always correct) and runs unchanged. Outputs are materialized.

So ``aligned(fn, plan)(stored, *rest) == fn(natural, *rest)`` for every model (up
to float summation order where a contraction runs over a stored dim), and its
gradients are the gradients with respect to the stored leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tpflax._src.jaxprs import scan_counts
from tpflax._src.layout import Interleave, from_storage, to_storage

# elementwise primitives: operands of the output's rank (lax broadcasts size-1 dims) or scalars
_ELEMENTWISE = frozenset("""
    add sub mul div rem pow max min atan2 and or xor not eq ne lt le gt ge select_n nextafter add_any clamp
    neg exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh acosh atanh
    sqrt rsqrt cbrt abs sign floor ceil round erf erfc erf_inv integer_pow square convert_element_type
    copy copy_p reduce_precision is_finite real imag conj
""".split())
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMAT = frozenset({"remat2", "checkpoint", "remat"})
_IDENTITIES = frozenset({"sharding_constraint", "name"})


def aligned(fn: Callable[..., Any], plan, argnum: int = 0) -> Callable[..., Any]:
    """``g(stored, *rest) == fn(natural, *rest)`` for a plan whose decisions carry layouts.

    A user needs it for a hand-written step (their own ``jax.grad`` of
    ``model.apply``) over parameters placed with a plan made with
    ``fused="aligned"``: those parameters are in stored order, and ``model.apply``
    on them computes wrong values. :func:`tpflax.make_train_step` wraps the model
    with it already. ``g`` is jit-able and differentiable (its gradients are in
    stored order, like the parameters); its outputs are in the model's order.

    Args:
        fn: a function taking the model's parameters (in the model's order) at ``argnum``.
        plan: the plan the parameters were placed with.
        argnum: which positional argument holds the parameters.

    >>> import jax.numpy as jnp, numpy as np
    >>> from tpflax._src.layout import Interleave, to_storage
    >>> lay = Interleave(dim=1, pieces=(4, 2, 2), ranks=2)
    >>> w = np.arange(16.0).reshape(2, 8)
    >>> f = lambda p, x: jnp.split(x @ p["w"], [4, 6], -1)[2]
    >>> g = aligned_layouts(f, lambda p: {"w": lay})
    >>> bool((g({"w": to_storage(w, lay)}, np.ones((1, 2))) == f({"w": w}, np.ones((1, 2)))).all())
    True
    """
    import jax

    from tpflax._src.planner.decision import Decision
    from tpflax._src.step import plan_decisions

    def layouts(tree):  # each parameter's Interleave (or None), in a tree like the parameters
        return jax.tree_util.tree_map(lambda d: d.layout, plan_decisions(plan, tree),
                                      is_leaf=lambda x: isinstance(x, Decision))

    return aligned_layouts(fn, layouts, argnum)


def aligned_layouts(fn: Callable[..., Any], layouts: Callable[[Any], Any], argnum: int = 0) -> Callable[..., Any]:
    """:func:`aligned` with ``layouts(params)`` giving each leaf's Interleave (or None) in a like tree."""
    import functools

    import jax

    @functools.wraps(fn)
    def g(*args):
        marks_tree = layouts(args[argnum])
        marks = jax.tree_util.tree_leaves(marks_tree, is_leaf=lambda x: x is None or isinstance(x, Interleave))
        flat, tree = jax.tree_util.tree_flatten(args)
        before = len(jax.tree_util.tree_leaves(args[:argnum]))
        n = len(jax.tree_util.tree_leaves(args[argnum]))
        if len(marks) != n:
            from tpflax._src.errors import PlanMismatchError

            raise PlanMismatchError(f"{len(marks)} planned leaves for parameters of {n} leaves; pass the tree "
                                    "the plan was made for")
        all_marks = [None] * before + list(marks) + [None] * (len(flat) - before - n)
        is_array = [_is_array(x) for x in flat]
        if not any(m is not None for m in all_marks):
            return fn(*args)

        def flat_fn(*arrays):
            it = iter(arrays)
            return fn(*jax.tree_util.tree_unflatten(tree, [next(it) if a else x for x, a in zip(flat, is_array, strict=True)]))

        arrays = [x for x, a in zip(flat, is_array, strict=True) if a]
        in_marks = [m for m, a in zip(all_marks, is_array, strict=True) if a]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
        outs = _eval(closed.jaxpr, closed.consts, list(zip(arrays, in_marks, strict=True)))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), [_natural(v) for v in outs])

    return g


def _is_array(x: Any) -> bool:
    import jax
    import numpy as np

    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.core.Tracer)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, jax.ShapeDtypeStruct))


# ---------------------------------------------------------------------------
# values: (array, Interleave or None); the Interleave's dim is where the array holds the stored dim

def _natural(v) -> Any:
    x, m = v
    return x if m is None else from_storage(x, m)


def _at(m: Interleave, dim: int) -> Interleave:
    return m if m.dim == dim else dataclasses.replace(m, dim=dim)


def _as(v, m: Interleave) -> Any:
    """``v``'s array in the order ``m`` stores. A scalar, or an operand of size 1 on ``m``'s dim (lax
    broadcasts it, a softmax's ``x - max(x, keepdims=True)``), is the same in every order: only its natural
    value is needed."""
    x, vm = v
    if vm == m:
        return x
    if getattr(x, "ndim", 0) == 0 or x.shape[m.dim] == 1:
        return _natural(v)
    return to_storage(_natural(v), m)


def _cut(x: Any, m: Interleave, i: int) -> Any:
    """Piece ``i`` of stored ``x`` in natural order, cut per rank (no data crosses ranks)."""
    import jax

    a, r, shape = m.dim, m.ranks, tuple(x.shape)
    off, w = sum(m.pieces[:i]) // r, m.pieces[i] // r
    y = x.reshape(shape[:a] + (r, m.size // r) + shape[a + 1:])
    y = jax.lax.slice_in_dim(y, off, off + w, axis=a + 1)
    return y.reshape(shape[:a] + (m.pieces[i],) + shape[a + 1:])


def _bind(eqn, xs):
    from jax._src import source_info_util

    bind_params = eqn.primitive.get_bind_params(eqn.params)
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
        out = eqn.primitive.bind(*xs, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval(jaxpr, consts, args) -> list:
    """Evaluate ``jaxpr`` on ``(array, mark)`` args; returns ``(array, mark)`` outputs."""
    from jax.extend.core import Literal

    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = (c, None)
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a

    def read(v):
        return (v.val, None) if isinstance(v, Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if all(m is None for _, m in ins):
            outs = [(o, None) for o in _bind(eqn, [x for x, _ in ins])]
        else:
            outs = _rule(eqn, ins)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _rule(eqn, ins) -> list:
    """The stored-aware evaluation of one equation with a stored input."""
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if rule is None and name in _ELEMENTWISE:
        rule = _elementwise
    if rule is not None:
        out = rule(eqn, ins)
        if out is not None:
            return out
    return [(o, None) for o in _bind(eqn, [_natural(v) for v in ins])]  # the fallback: always correct


def _elementwise(eqn, ins):
    m = next(m for _, m in ins if m is not None)
    return [(o, m) for o in _bind(eqn, [_as(v, m) for v in ins])]


def _follow(new_dim: Callable[[Any, int], int | None]):
    """A one-operand rule whose output holds the stored dim at ``new_dim(params, dim)`` (None: fallback)."""
    def rule(eqn, ins):
        (x, m), *rest = ins
        if m is None or any(r[1] is not None for r in rest):
            return None
        d = new_dim(eqn.params, m.dim)
        if d is None:
            return None
        return [(o, _at(m, d)) for o in _bind(eqn, [x] + [r[0] for r in rest])]
    return rule


def _reduce_dim(p, a):
    axes = tuple(p["axes"])
    return None if a in axes else a - sum(1 for x in axes if x < a)


def _squeeze_dim(p, a):
    dims = tuple(p["dimensions"])
    return None if a in dims else a - sum(1 for x in dims if x < a)


def _reshape(eqn, ins):
    import jax.numpy as jnp
    import numpy as np

    (x, m), = ins[:1]
    if m is None or len(ins) > 1 or eqn.params.get("dimensions") is not None:
        return None
    shape, new = tuple(x.shape), tuple(eqn.params["new_sizes"])
    before = int(np.prod(shape[:m.dim]))
    for j in range(len(new)):
        if int(np.prod(new[:j])) != before:
            continue
        if new[j] == m.size:  # the stored dim kept whole
            return [(o, _at(m, j)) for o in _bind(eqn, [x])]
        n = len(m.pieces)
        rest = next((k for k in range(j + 2, len(new) + 1) if int(np.prod(new[j + 1:k])) == m.pieces[0]), None)
        if new[j] == n and len(set(m.pieces)) == 1 and rest is not None:  # (..., pieces, piece...): cut
            stacked = jnp.stack([_cut(x, m, i) for i in range(n)], axis=m.dim)
            return [(o, None) for o in _bind(eqn, [stacked.reshape(shape[:m.dim] + (n * m.pieces[0],)
                                                                   + shape[m.dim + 1:])])]
    return None


def _split(eqn, ins):
    (x, m), = ins
    axis, sizes = eqn.params["axis"], tuple(int(s) for s in eqn.params["sizes"])
    if axis != m.dim:
        return [(o, m) for o in _bind(eqn, [x])]
    if sizes == m.pieces:
        return [(_cut(x, m, i), None) for i in range(len(sizes))]
    return None


def _slice(eqn, ins):
    import jax

    (x, m), = ins
    p, a = eqn.params, m.dim
    start, limit = list(p["start_indices"]), list(p["limit_indices"])
    strides = p["strides"]
    if strides is not None and strides[a] != 1:
        return None
    starts = [sum(m.pieces[:i]) for i in range(len(m.pieces))]
    whole = start[a] == 0 and limit[a] == m.size
    if not whole and (start[a], limit[a] - start[a]) not in zip(starts, m.pieces, strict=True):
        return None
    start[a], limit[a] = 0, m.size
    y = jax.lax.slice(x, start, limit, strides)
    if whole:
        return [(y, m)]
    return [(_cut(y, m, starts.index(p["start_indices"][a])), None)]


def _transpose(eqn, ins):
    (x, m), = ins
    perm = tuple(eqn.params["permutation"])
    return [(o, _at(m, perm.index(m.dim))) for o in _bind(eqn, [x])]


def _broadcast(eqn, ins):
    (x, m), = ins
    return [(o, _at(m, eqn.params["broadcast_dimensions"][m.dim])) for o in _bind(eqn, [x])]


def _dot(eqn, ins):
    (lhs, lm), (rhs, rm) = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nl, nr = lhs.ndim, rhs.ndim
    lfree = [d for d in range(nl) if d not in lc and d not in lb]
    rfree = [d for d in range(nr) if d not in rc and d not in rb]
    if lm is not None and rm is not None:
        if lm.dim in lc and rm.dim in rc and list(rc)[list(lc).index(lm.dim)] == rm.dim and \
                _at(lm, 0) == _at(rm, 0):  # a contraction over the same stored order: natural
            return [(o, None) for o in _bind(eqn, [lhs, rhs])]
        if lm.dim in lfree:  # keep the left one stored
            rhs, rm = _natural((rhs, rm)), None
        elif rm.dim in rfree:
            lhs, lm = _natural((lhs, lm)), None
        else:
            return None
    if lm is not None and lm.dim in lfree:
        d = len(lb) + lfree.index(lm.dim)
        return [(o, _at(lm, d)) for o in _bind(eqn, [lhs, rhs])]
    if rm is not None and rm.dim in rfree:
        d = len(lb) + len(lfree) + rfree.index(rm.dim)
        return [(o, _at(rm, d)) for o in _bind(eqn, [lhs, rhs])]
    return None


def _call(eqn, ins):
    closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if closed is None or not hasattr(closed, "consts"):
        return None
    return _eval(closed.jaxpr, closed.consts, ins)


def _remat(eqn, ins):
    import jax

    p = eqn.params
    marks, out_marks = [m for _, m in ins], []

    def body(*xs):
        outs = _eval(p["jaxpr"], (), list(zip(xs, marks, strict=True)))
        out_marks[:] = [m for _, m in outs]
        return [x for x, _ in outs]

    outs = jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*[x for x, _ in ins])
    return list(zip(outs, out_marks, strict=True))


def _scan(eqn, ins):
    import jax

    p = eqn.params
    nc, nk = scan_counts(eqn, p["jaxpr"].jaxpr)  # (jax 0.12's scan has no num_consts/num_carry)
    consts, carry, xs = ins[:nc], [_natural(v) for v in ins[nc:nc + nk]], ins[nc + nk:]
    if any(m is not None and m.dim == 0 for _, m in xs):
        return None
    x_marks = [None if m is None else _at(m, m.dim - 1) for _, m in xs]
    closed, y_marks = p["jaxpr"], []

    def body(c, x):
        outs = _eval(closed.jaxpr, closed.consts, consts + [(v, None) for v in c] + list(zip(x, x_marks, strict=True)))
        y_marks[:] = [m for _, m in outs[nk:]]
        return [_natural(v) for v in outs[:nk]], [y for y, _ in outs[nk:]]

    c, ys = jax.lax.scan(body, carry, [x for x, _ in xs], length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"])
    return [(v, None) for v in c] + [(y, None if m is None else _at(m, m.dim + 1)) for y, m in zip(ys, y_marks, strict=True)]


_RULES: dict[str, Callable[..., Any]] = {
    "dot_general": _dot, "transpose": _transpose, "broadcast_in_dim": _broadcast, "reshape": _reshape,
    "split": _split, "slice": _slice, "squeeze": _follow(_squeeze_dim), "scan": _scan,
    # identities on values: a constraint applies to the stored array as it stands (same shape), a name tags it
    **{n: _follow(lambda p, a: a) for n in _IDENTITIES},
    **{n: _follow(_reduce_dim) for n in _REDUCE},
    **{n: _call for n in _CALLS}, **{n: _remat for n in _REMAT},
}
