"""The rows a batched (expert) contraction reads, and the buffer it reads them from.

An expert kernel ``(E, d, f)`` contracted with ``dot_general`` batch dims (``ecd,edf->ecf``) reads
each expert's slice of a dispatched buffer. The dataflow trace records no rows for such a use (its
``Use.rows`` are a plain contraction's tokens), so the cost model walks the forward again for these
uses only and reads the shape of the activation each one contracts: its rows are every dim it does
not sum over, the experts included.

Where the dispatch sums the batch away (GShard's one-hot ``btec,btd->ecd`` into a capacity ``C``
per expert), the buffer has no batch dim: its rows do not grow with the batch, every device of a
batch axis holds all of it, and XLA sums the dispatch over the batch axes before the experts run,
so the experts' work and their weights' gradients are the same on every device of those axes
(:mod:`tpflax._src.cost.experts`). Which it is shows by tracing at a second batch size: a buffer that
keeps the batch has a dim that is the batch at both sizes. One whose rows grow with the batch without
such a dim (Switch's capacity ``C = tokens / E``, a dispatch ``nd,nec->ecd`` over the batch's tokens as one
group) has still summed the batch away (measured, XLA:CPU data=2,model=4: its ``f32[E, C, d]`` all-reduced
over data).

Both :func:`tpflax.plan` (pricing expert layouts) and the estimate read these rows; they are kept per model
and shapes (:mod:`tpflax._src.model_cache`), so the second reader traces nothing again.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def batched_paths(flow: Any) -> frozenset[str]:
    """The parameters of a :class:`~tpflax._src.trace.records.Dataflow` contracted only with batch dims (expert
    kernels reading a dispatched buffer, ``ecd,edf->ecf``): their uses record no rows."""
    rows = {u.path for u in flow.uses if u.rows and not u.scan_length}
    return frozenset(u.path for u in flow.uses if u.op == "dot" and u.batch and not u.rows and u.path not in rows)


def batched_rows(m: Any, paths: Collection[str]) -> tuple[dict[str, float], dict[str, float]]:
    """``(rows per example, buffer rows)`` of the first batched contraction of each of ``paths``: a buffer
    that keeps a batch dim is counted per example, one that does not (the dispatch summed the batch away,
    whatever its capacity) whole. Empty when the model cannot be traced again. Kept per model and shapes:
    do not change the dicts returned.

    >>> import jax, jax.numpy as jnp
    >>> from tpflax._src.model import as_model
    >>> def moe(v, x, dispatch):  # a one-hot dispatch into 4 rows per expert, then the experts
    ...     return jnp.einsum("ecd,edf->ecf", jnp.einsum("btec,btd->ecd", dispatch, x), v["w"])
    >>> sds = jax.ShapeDtypeStruct
    >>> m = as_model(moe, (sds((2, 8, 16), "float32"), sds((2, 8, 3, 4), "float32")), {"w": sds((3, 16, 32), "float32")})
    >>> batched_rows(m, {"w"})
    ({}, {'w': 12})
    """
    from tpflax._src.model_cache import cached

    return cached("batched_rows", m, lambda: _batched_rows(m, paths), tuple(sorted(paths)))


def _batched_rows(m: Any, paths: Collection[str]) -> tuple[dict[str, float], dict[str, float]]:
    from tpflax._src.errors import TraceError

    try:
        now = _rows(m, paths)
        bigger = m.with_batch(2 * m.batch_size) if m.batch_size else m
        later = _rows(bigger, paths) if bigger is not m else now
    except TraceError:
        return {}, {}
    examples = m.batch_size or 1

    def keeps_batch(p: str) -> bool:  # a dim that is the batch at both sizes
        a, b = now[p][1], later.get(p, (0, ()))[1]
        return bigger is m or (len(a) == len(b) and any(x == examples and y == 2 * examples
                                                        for x, y in zip(a, b, strict=True)))

    per_example = {p: r / examples for p, (r, _) in now.items() if keeps_batch(p)}
    return per_example, {p: r for p, (r, _) in now.items() if p not in per_example}


def _rows(m: Any, paths: Collection[str]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``{path: (rows, shape)}`` of the activation the first batched ``dot_general`` of each parameter reads."""
    from tpflax._src.trace.dataflow import trace_jaxpr
    from tpflax._src.trace.handlers import new_walk
    from tpflax._src.trace.interpreter import Val

    closed, leaves, _ = trace_jaxpr(m)
    jaxpr = closed.jaxpr
    w = new_walk()
    args = [Val(len(getattr(v.aval, "shape", ())),
                origin=((leaves[i], tuple(range(len(v.aval.shape)))),) if i < len(leaves) else ())
            for i, v in enumerate(jaxpr.invars)]
    w.run(jaxpr, args)
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for u in w.uses:
        if u.op != "dot" or not u.batch or u.path not in paths or u.path in out or u.id not in w.reads:
            continue
        eqn, i, _ = w.reads[u.id]
        (lc, rc), _ = eqn.params["dimension_numbers"]
        shape = tuple(eqn.invars[i].aval.shape)
        summed = set(lc if i == 0 else rc)
        out[u.path] = (math.prod(n for d, n in enumerate(shape) if d not in summed), shape)
    return out
