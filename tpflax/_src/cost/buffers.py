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
(:mod:`tpflax._src.cost.experts`). Which it is shows by following the sample's leading dim (the batch)
through the forward (:func:`tpflax._src.trace.batchflags.batch_dims`: contractions, reshapes, transposes,
broadcasts, reductions, calls and scans; elementwise ops keep it): a buffer that keeps the batch has a dim carrying it. One whose rows grow
with the batch without such a dim (Switch's capacity ``C = tokens / E``, a dispatch ``nd,nec->ecd`` over the
batch's tokens as one group) has still summed the batch away (measured, XLA:CPU data=2,model=4: its
``f32[E, C, d]`` all-reduced over data), even where ``C`` is as long as the batch.

Both :func:`tpflax.plan` (pricing expert layouts) and the estimate read these rows; they are kept per model
and shapes (:mod:`tpflax._src.model_cache`), so the second reader traces nothing again.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from tpflax._src.trace.batchflags import batch_dims as _batch_dims
from tpflax._src.trace.batchflags import input_flags as _input_flags
from tpflax._src.trace.batchflags import no_flags as _none
from tpflax._src.trace.batchflags import shape_of as _shape
from tpflax._src.trace.batchflags import sized as _sized


def batched_paths(flow: Any) -> frozenset[str]:
    """The parameters of a :class:`~tpflax._src.trace.records.Dataflow` contracted only with batch dims (expert
    kernels reading a dispatched buffer, ``ecd,edf->ecf``): their uses record no rows."""
    rows = {u.path for u in flow.uses if u.rows and not u.scan_length}
    return frozenset(u.path for u in flow.uses if u.op == "dot" and u.batch and not u.rows and u.path not in rows)


def ragged_dot(u: Any) -> bool:
    """Whether dataflow use ``u`` is a ``jax.lax.ragged_dot``'s: a dot with batch dims and rows
    (:mod:`tpflax._src.trace.contractions` gives a batched one no rows)."""
    return u.op == "dot" and bool(u.batch) and bool(u.rows)


def ragged_groups(flow: Any) -> dict[str, frozenset[int]]:
    """``{path: dims}``: the kernel dims every ``dot`` use of a parameter takes as a ``jax.lax.ragged_dot``'s groups
    (:func:`ragged_dot`); a kernel some other contraction also reads is left out. No dim of the rows carries the groups:
    split over a tensor axis, each such dot's output and input gradient are partial sums
    (:func:`tpflax._src.cost.comm.ragged_split_items`). A ``shard_map`` body's are left out too: it contracts its
    own shard of the kernel with its own rows, and sums as written (EasyDeL's experts)."""
    out: dict[str, frozenset[int]] = {}
    for u in flow.uses:
        if u.op == "dot" and u.path not in flow.in_specs:
            dims = frozenset(u.batch) if ragged_dot(u) else frozenset()
            out[u.path] = out.get(u.path, dims) & dims
    return {p: d for p, d in out.items() if d}


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
    except TraceError:
        return {}, {}
    examples = m.batch_size or 1
    per_example = {p: r / examples for p, (r, batch) in now.items() if batch}
    return per_example, {p: r for p, (r, _) in now.items() if p not in per_example}


def _walk(m: Any) -> tuple[Any, dict[int, list[tuple[bool, ...]]]]:
    """The dataflow walk of ``m``'s forward and, per ``dot_general`` (and ``ragged_dot_general``), which dims of
    its operands carry the batch (:func:`tpflax._src.trace.batchflags.batch_dims`)."""
    from tpflax._src.trace.dataflow import trace_jaxpr
    from tpflax._src.trace.handlers import new_walk
    from tpflax._src.trace.interpreter import Val

    closed, leaves, n = trace_jaxpr(m)
    jaxpr = closed.jaxpr
    w = new_walk()
    # the sample's inputs are fed (a value of neither parameters nor inputs is a constant: trace.handlers)
    args = [Val(len(getattr(v.aval, "shape", ())),
                origin=((leaves[i], tuple(range(len(v.aval.shape)))),) if i < len(leaves) else (),
                fed=i >= len(leaves))
            for i, v in enumerate(jaxpr.invars)]
    w.run(jaxpr, args)
    examples = m.batch_size
    dots: dict[int, list[tuple[bool, ...]]] = {}
    _batch_dims(jaxpr, [_input_flags(v, examples) if i >= n else _none(v) for i, v in enumerate(jaxpr.invars)],
                dots, examples)
    return w, dots


def _rows(m: Any, paths: Collection[str]) -> dict[str, tuple[int, bool]]:
    """``{path: (rows, keeps the batch)}`` of the activation the first batched ``dot_general`` of each
    parameter reads."""
    w, dots = _walk(m)
    examples = m.batch_size
    out: dict[str, tuple[int, bool]] = {}
    for u in w.uses:
        if u.op != "dot" or not u.batch or u.path not in paths or u.path in out or u.id not in w.reads:
            continue
        eqn, i, _ = w.reads[u.id]
        (lc, rc), _ = eqn.params["dimension_numbers"]
        shape = tuple(eqn.invars[i].aval.shape)
        summed = set(lc if i == 0 else rc)
        flags = dots.get(id(eqn), [_sized(shape, examples)] * 2)[i]
        out[u.path] = (math.prod(n for d, n in enumerate(shape) if d not in summed), any(flags))
    return out


def ragged_buffers(m: Any, paths: Collection[str]) -> dict[str, float]:
    """``{path: rows}`` of the ``jax.lax.ragged_dot`` kernels among ``paths`` whose tokens carry no batch dim:
    a dropless MoE that sorts every token of the batch by expert (``jnp.argsort`` of the flattened top-k ids)
    and gathers them in that order. XLA cannot split a sort over the dim it sorts, so it gathers the ids,
    and the sorted tokens are summed over the batch axes (a masked gather): every device of those axes runs
    the experts on all the tokens, and their weights' gradients need no sum over them (measured, XLA:CPU
    data=2,model=4: the ``f32[T*k, d]`` tokens all-reduced over data at the gather and at the combine's
    transpose, no expert weight in the gradients' all-reduce). Empty when the model cannot be traced again.
    Kept per model and shapes: do not change the dict returned.

    >>> import jax, jax.numpy as jnp
    >>> from tpflax._src.model import as_model
    >>> def moe(v, x):  # x (tokens, d): sorted globally by a routing id, then the experts
    ...     ids = jnp.argmax(x @ v["gate"], -1)
    ...     xs = x[jnp.argsort(ids)]
    ...     return jax.lax.ragged_dot(xs, v["w"], jnp.bincount(ids, length=3).astype(jnp.int32))
    >>> sds = jax.ShapeDtypeStruct
    >>> m = as_model(moe, (sds((8, 16), "float32"),), {"gate": sds((16, 3), "float32"), "w": sds((3, 16, 32), "float32")})
    >>> ragged_buffers(m, {"w"})
    {'w': 8}
    """
    from tpflax._src.model_cache import cached

    return cached("ragged_buffers", m, lambda: _ragged_buffers(m, paths), tuple(sorted(paths)))


def _ragged_buffers(m: Any, paths: Collection[str]) -> dict[str, float]:
    from tpflax._src.errors import TraceError

    if not m.batch_size:
        return {}
    try:
        w, dots = _walk(m)
    except TraceError:
        return {}
    out: dict[str, float] = {}
    batched: set[str] = set()  # read by a contraction whose tokens keep the batch somewhere
    for u in w.uses:
        if u.op != "dot" or u.path not in paths or u.id not in w.reads:
            continue
        eqn, i, _ = w.reads[u.id]  # i: the activation's operand
        source = getattr(eqn, "source", eqn)
        if i != 0 or source.primitive.name != "ragged_dot_general" or id(source) not in dots or any(
                dots[id(source)][0]):
            batched.add(u.path)
            continue
        (lc, _), _ = source.params["ragged_dot_dimension_numbers"].dot_dimension_numbers
        shape = _shape(source.invars[0])
        out.setdefault(u.path, math.prod(k for d, k in enumerate(shape) if d not in lc))
    return {p: r for p, r in out.items() if p not in batched}
