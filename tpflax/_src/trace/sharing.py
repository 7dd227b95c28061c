"""Which parameter contractions read an activation that something else reads too.

In a post-norm block (BERT, BART: ``LayerNorm(x + attention(x))``) the hidden
state feeds the q, k and v projections *and* the residual add; in a pre-norm
block (Llama, GPT-2, T5) the normed input feeds the projections only. The
backward pass sums the input's cotangents in reverse program order, so in the
post-norm case the residual's cotangent comes first and the projections'
partial (tensor-split) gradients are added to it one by one: XLA:TPU then
cannot reassociate their all-reduces into one and reduces each apart (measured:
BERT-base on v5e:2x4 compiles one tuple all-reduce of three ``f32[4,512,768]``
per layer where pre-norm models compile one). The cost model reads the result
(:func:`tpflax._src.cost.comm`).

A bfloat16 Dense over a float32 input (transformers' Flax models with ``dtype=``: their RMSNorm returns
float32) converts the input inside each projection: q, k and v read three casts of it, and their cotangents
are three bfloat16 values, each converted back before the float32 sum. XLA:TPU all-reduces the three apart
too (one tuple all-reduce of three ``bf16[4,32,64]`` per layer, measured on v5e:2x4: transformers' Llama in
mixed precision, data=2,model=4), so :func:`own_casts` marks them like the post-norm reads.

Views on the way (dtype converts, reshapes, transposes, calls such as ``pjit``)
are looked through on both sides: a bfloat16 Dense converts its input first,
and that convert is not another reader.

>>> import jax, jax.numpy as jnp
>>> from tpflax._src.trace.dataflow import analyze
>>> w = {"q": jnp.ones((4, 4)), "k": jnp.ones((4, 4))}
>>> post = lambda w, x: x + (x @ w["q"]) * (x @ w["k"])
>>> pre = lambda w, x: (x @ w["q"]) * (x @ w["k"])
>>> def shared(fn):
...     flow = analyze(jax.make_jaxpr(fn)(w, jnp.ones((2, 4))), ["k", "q"])
...     return sorted(flow.uses[u].path for u in flow.shared)
>>> shared(post), shared(pre)
(['k', 'q'], [])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tpflax._src.jaxprs import CALL_KEYS, body_of
from tpflax._src.trace.control import CALLS

# ops that only re-view or re-type a value: a reader through them reads the same activation
VIEWS = frozenset({"convert_element_type", "reshape", "copy", "squeeze", "expand_dims",
                   "transpose", "broadcast_in_dim", "sharding_constraint", "reshard", "name"})

# a value inside a call body, with the call stack it was reached through (the walk's ``ctx``): one
# jaxpr object serves every call of a jitted helper, so its values mean nothing without the call site
At = tuple  # (var, ctx)


def _literal(v: Any) -> bool:
    return type(v).__name__ == "Literal"


class _Index:
    """Producers and readers of every value of a jaxpr and the calls in it (loops are boundaries)."""

    def __init__(self, jaxpr: Any) -> None:
        self.producer: dict[Any, Any] = {}
        self.readers: dict[Any, list[tuple[Any, int]]] = {}
        self.outer: dict[tuple[int, Any], Any] = {}  # (call eqn, body input) -> the caller's value
        self.inner: dict[tuple[int, int], Any] = {}  # (call eqn, input position) -> the body's input
        self.returned: dict[tuple[int, Any], Any] = {}  # (call eqn, body output) -> the caller's output
        self.results = {id(v) for v in jaxpr.outvars}  # the model's outputs, and loop bodies' (below)
        self._add(jaxpr, set())

    def _add(self, jaxpr: Any, seen: set[int]) -> None:
        for eqn in jaxpr.eqns:
            for k, v in enumerate(eqn.invars):
                if not _literal(v):
                    self.readers.setdefault(v, []).append((eqn, k))
            for v in eqn.outvars:
                self.producer[v] = eqn
            for key, val in eqn.params.items():
                for sub in (val if isinstance(val, (tuple, list)) else (val,)):
                    inner = body_of(sub)
                    if inner is None:
                        continue
                    if eqn.primitive.name in CALLS and key in CALL_KEYS:
                        skip = len(eqn.invars) - len(inner.invars)
                        for k, v in enumerate(inner.invars):
                            if skip >= 0:
                                self.outer[(id(eqn), v)] = eqn.invars[skip + k]
                                self.inner[(id(eqn), skip + k)] = v
                        for v, o in zip(inner.outvars, eqn.outvars, strict=False):
                            self.returned[(id(eqn), v)] = o
                    else:  # a scan's carry or ys, a cond's result: read beyond this body, like an output
                        self.results.update(id(v) for v in inner.outvars if not _literal(v))
                    if id(inner) not in seen:  # a jitted helper's body is indexed once
                        seen.add(id(inner))
                        self._add(inner, seen)

    def root(self, v: Any, ctx: tuple, views: frozenset = VIEWS) -> At:
        """The value ``v`` (reached through ``ctx``) is a view of: through converts, reshapes and calls (the
        ops in ``views``)."""
        for _ in range(256):
            if _literal(v):
                return v, ctx
            if ctx and (ctx[-1], v) in self.outer:
                v, ctx = self.outer[(ctx[-1], v)], ctx[:-1]
                continue
            eqn = self.producer.get(v)
            if eqn is None or eqn.primitive.name not in views:
                return v, ctx
            v = eqn.invars[0]
        return v, ctx

    def other_reader(self, at: At, contractions: set[int]) -> bool:
        """Whether anything but the contractions in ``contractions`` (eqn ids) reads the value or a view of it."""
        todo, seen = [at], set()
        while todo:
            x, ctx = todo.pop()
            if _literal(x) or (id(x), ctx) in seen:
                continue
            seen.add((id(x), ctx))
            if id(x) in self.results and not (ctx and (ctx[-1], x) in self.returned):
                return True  # an output (the model's, a loop body's): its cotangent is another term of the sum
            if ctx and (ctx[-1], x) in self.returned:
                todo.append((self.returned[(ctx[-1], x)], ctx[:-1]))
            for eqn, k in self.readers.get(x, ()):
                if eqn.primitive.name in VIEWS:
                    todo.append((eqn.outvars[0], ctx))
                elif (id(eqn), k) in self.inner:
                    todo.append((self.inner[(id(eqn), k)], ctx + (id(eqn),)))
                elif id(eqn) not in contractions:
                    return True
        return False


def shared_reads(jaxpr: Any, reads: Mapping[int, tuple[Any, int, tuple]]) -> frozenset[int]:
    """Use ids whose activation operand is also read by an op other than a parameter contraction.

    Args:
        jaxpr: the traced model's (open) jaxpr.
        reads: use id -> (its ``dot_general`` equation, the activation operand's position, the
            walk's call stack ``ctx`` there).

    Returns:
        The use ids whose activation a residual add (or the model's output) also reads.

    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda w, x: x + x @ w)(jnp.ones((4, 4)), jnp.ones((2, 4)))
    >>> dot = closed.jaxpr.eqns[0]
    >>> shared_reads(closed.jaxpr, {0: (dot, 0, ())})
    frozenset({0})
    """
    if not reads:
        return frozenset()
    index = _Index(jaxpr)
    contractions = {id(eqn) for eqn, _, _ in reads.values()}
    return frozenset(uid for uid, (eqn, k, ctx) in reads.items()
                     if index.other_reader(index.root(eqn.invars[k], ctx), contractions))


def own_casts(jaxpr: Any, reads: Mapping[int, tuple[Any, int, tuple]],
              one: Mapping[int, int] | None = None) -> frozenset[int]:
    """Use ids whose activation is one of several dtype casts of one value that contractions read: each
    reader converts it for itself (a bfloat16 Dense over a float32 input), so the backward's partial input
    gradients are converted back one by one before they are added.

    >>> import jax, jax.numpy as jnp
    >>> w = {"q": jnp.ones((4, 4), jnp.bfloat16), "k": jnp.ones((4, 4), jnp.bfloat16)}
    >>> each = lambda w, x: (x.astype(jnp.bfloat16) @ w["q"]) * (x.astype(jnp.bfloat16) @ w["k"])
    >>> once = lambda w, x: (lambda y: (y @ w["q"]) * (y @ w["k"]))(x.astype(jnp.bfloat16))
    >>> def cast(fn):
    ...     closed = jax.make_jaxpr(fn)(w, jnp.ones((2, 4)))
    ...     dots = [e for e in closed.jaxpr.eqns if e.primitive.name == "dot_general"]
    ...     return sorted(own_casts(closed.jaxpr, {i: (e, 0, ()) for i, e in enumerate(dots)}))
    >>> cast(each), cast(once)
    ([0, 1], [])

    ``one``: :func:`read_groups` of ``reads`` already found (:attr:`Dataflow.inputs`), else found here.
    """
    one = read_groups(jaxpr, reads) if one is None else one
    apart = read_groups(jaxpr, reads, VIEWS - {"convert_element_type"})
    values: dict[int, set[int]] = {}
    for uid, group in one.items():
        values.setdefault(group, set()).add(apart[uid])
    return frozenset(uid for uid, group in one.items() if len(values[group]) > 1)


def read_groups(jaxpr: Any, reads: Mapping[int, tuple[Any, int, tuple]], views: frozenset = VIEWS) -> dict[int, int]:
    """``{use id: group}``: contractions reading one activation (or views of it: ops in ``views``) share a
    group, the smallest use id among them (a self-attention's q, k and v read the one normed input).

    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda w, x: (x @ w) * (x @ w.T) + (x * 2) @ w)(jnp.ones((4, 4)), jnp.ones((2, 4)))
    >>> dots = [e for e in closed.jaxpr.eqns if e.primitive.name == "dot_general"]
    >>> read_groups(closed.jaxpr, {i: (e, 0, ()) for i, e in enumerate(dots)})
    {0: 0, 1: 0, 2: 2}
    """
    if not reads:
        return {}
    index = _Index(jaxpr)
    first: dict[tuple[int, tuple], int] = {}
    out = {}
    for uid in sorted(reads):
        eqn, k, ctx = reads[uid]
        v, c = index.root(eqn.invars[k], ctx, views)
        out[uid] = first.setdefault((id(v), c), uid)
    return out
