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
(:mod:`tpflax._src.cost.experts`). Which it is shows by tracing at a second batch size.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def batched_rows(m: Any, paths: Collection[str]) -> tuple[dict[str, float], dict[str, float]]:
    """``(rows per example, buffer rows)`` of the first batched contraction of each of ``paths``: a buffer
    whose rows grow with the batch (it keeps a batch dim) is counted per example, one whose rows do not
    (the dispatch summed the batch away) whole. Empty when the model cannot be traced again.

    >>> import jax, jax.numpy as jnp
    >>> from tpflax._src.model import as_model
    >>> def moe(v, x, dispatch):  # a one-hot dispatch into 4 rows per expert, then the experts
    ...     return jnp.einsum("ecd,edf->ecf", jnp.einsum("btec,btd->ecd", dispatch, x), v["w"])
    >>> sds = jax.ShapeDtypeStruct
    >>> m = as_model(moe, (sds((2, 8, 16), "float32"), sds((2, 8, 3, 4), "float32")), {"w": sds((3, 16, 32), "float32")})
    >>> batched_rows(m, {"w"})
    ({}, {'w': 12})
    """
    from tpflax._src.errors import TraceError

    try:
        now = _rows(m, paths)
        bigger = m.with_batch(2 * m.batch_size) if m.batch_size else m
        later = _rows(bigger, paths) if bigger is not m else now
    except TraceError:
        return {}, {}
    examples = m.batch_size or 1
    per_example = {p: r / examples for p, r in now.items() if later.get(p) != r or bigger is m}
    return per_example, {p: r for p, r in now.items() if p not in per_example}


def _rows(m: Any, paths: Collection[str]) -> dict[str, int]:
    """``{path: rows}`` of the activation the first batched ``dot_general`` of each parameter reads."""
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
    out: dict[str, int] = {}
    for u in w.uses:
        if u.op != "dot" or not u.batch or u.path not in paths or u.path in out or u.id not in w.reads:
            continue
        eqn, i, _ = w.reads[u.id]
        (lc, rc), _ = eqn.params["dimension_numbers"]
        shape = eqn.invars[i].aval.shape
        summed = set(lc if i == 0 else rc)
        out[u.path] = math.prod(n for d, n in enumerate(shape) if d not in summed)
    return out
