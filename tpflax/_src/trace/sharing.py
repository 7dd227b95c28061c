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

from tpflax._src.trace.control import CALLS, body_of

# ops that only re-view or re-type a value: a reader through them reads the same activation
VIEWS = frozenset({"convert_element_type", "reshape", "copy", "copy_p", "squeeze", "expand_dims",
                   "transpose", "broadcast_in_dim", "sharding_constraint", "name"})
_CALL_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Index:
    """Producers and readers of every value of a jaxpr and the calls in it (loops are boundaries)."""

    def __init__(self, jaxpr: Any) -> None:
        self.producer: dict[Any, Any] = {}
        self.readers: dict[Any, list[tuple[Any, int]]] = {}
        self.outer: dict[Any, Any] = {}  # a call body's input -> the caller's value
        self.inner: dict[tuple[int, int], Any] = {}  # (call eqn, input position) -> the body's input
        self.returned: dict[Any, Any] = {}  # a call body's output -> the caller's output value
        self.results = {id(v) for v in jaxpr.outvars}
        self._add(jaxpr)

    def _add(self, jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            for k, v in enumerate(eqn.invars):
                if type(v).__name__ != "Literal":
                    self.readers.setdefault(v, []).append((eqn, k))
            for v in eqn.outvars:
                self.producer[v] = eqn
            for key, val in eqn.params.items():
                for sub in (val if isinstance(val, (tuple, list)) else (val,)):
                    inner = body_of(sub)
                    if inner is None:
                        continue
                    if eqn.primitive.name in CALLS and key in _CALL_KEYS:
                        skip = len(eqn.invars) - len(inner.invars)
                        for k, v in enumerate(inner.invars):
                            if skip >= 0:
                                self.outer[v] = eqn.invars[skip + k]
                                self.inner[(id(eqn), skip + k)] = v
                        for v, o in zip(inner.outvars, eqn.outvars, strict=False):
                            self.returned[v] = o
                    self._add(inner)

    def root(self, v: Any) -> Any:
        """The value ``v`` is a view of (through converts, reshapes and call boundaries)."""
        for _ in range(64):
            if v in self.outer:
                v = self.outer[v]
                continue
            eqn = self.producer.get(v)
            if eqn is None or eqn.primitive.name not in VIEWS:
                return v
            v = eqn.invars[0]
        return v

    def other_reader(self, v: Any, contractions: set[int]) -> bool:
        """Whether anything but the contractions in ``contractions`` (eqn ids) reads ``v`` or a view of it."""
        todo, seen = [v], set()
        while todo:
            x = todo.pop()
            if id(x) in seen:
                continue
            seen.add(id(x))
            if id(x) in self.results:
                return True  # the model's output: its cotangent is another term of the sum
            if x in self.returned:
                todo.append(self.returned[x])
            for eqn, k in self.readers.get(x, ()):
                name = eqn.primitive.name
                if name in VIEWS:
                    todo.append(eqn.outvars[0])
                elif (id(eqn), k) in self.inner:
                    todo.append(self.inner[(id(eqn), k)])
                elif id(eqn) not in contractions:
                    return True
        return False


def shared_reads(jaxpr: Any, reads: Mapping[int, tuple[Any, int]]) -> frozenset[int]:
    """Use ids whose activation operand (``reads``: use id -> (dot eqn, operand position)) is also read
    by an op other than a parameter contraction (a residual add, the model's output)."""
    if not reads:
        return frozenset()
    index = _Index(jaxpr)
    contractions = {id(eqn) for eqn, _ in reads.values()}
    return frozenset(uid for uid, (eqn, k) in reads.items()
                     if index.other_reader(index.root(eqn.invars[k]), contractions))
