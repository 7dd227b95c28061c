"""The collectives XLA compiles for rows gathered or scattered across the batch split, priced for the estimate.

A graph net's step reads its node and edge arrays as its batch: the step splits every input's leading dim over
the batch axes, so ``h[senders]`` and ``segment_sum(m, receivers)`` move rows between devices
(:class:`tpflax._src.trace.records.Crossing`). XLA's SPMD partitioner, measured on XLA:CPU (jax 0.10.2) for a
gather ``x[idx]`` and a scatter-add ``segment_sum(u, idx)`` with ``x``, ``idx`` and ``u`` split on rows over
``d`` batch devices, and ``r`` devices of the other axes that split neither (``k = gcd(d, r)``):

* ``k == 1`` (data=2, data=8): a gather all-gathers its operand over the batch axes; a scatter all-reduces its
  whole result over them;
* ``k > 1`` (data=2,model=4: ``k`` = 2; data=4,model=2 and data=2,fsdp=2,model=2: ``k`` = 2): XLA reshards the
  operand onto ``k`` devices of the other axes instead: a gather collective-permutes the operand's shard (one
  permute serves every gather of one operand), all-gathers it over the ``d / k`` batch devices left, gathers the
  rows it holds and all-reduces the partial rows over the ``k`` devices; a scatter scatters into its ``1 / k`` of
  the result, all-reduces that over the batch axes and collective-permutes its ``1 / d`` back in place.

Backward, a gather's gradient is a scatter of the rows' gradient into the operand's, and a scatter's a gather of
the result's gradient, priced alike.

A per-example write at ``(arange(b), idx)`` (``x.at[bi, idx].add(d)``: Mixture-of-Depths puts its routed tokens
back) indexes the batch dim with data, not as a batching dim, so XLA moves it alike, measured on data=2,model=4,
data=4,model=2, data=2 and data=8: the updates and their indices as a gather's operand (permuted, gathered over
the batch devices left), the partial result all-reduced over the ``k`` devices; backward, the updates' gradient as
a scatter's result. (Its ``top_k``'s scores gathered over the batch, a few hundred bytes, are not priced.) Measured, the review's MeshGraphNet (3 message-passing steps, 64 nodes,
256 edges, latent 128) on data=2,model=4: these are the 983,040 B (29%) of the step's 3,337,808 B of
collectives the estimate lacked (est/compiled 0.71, now 1.00).

A per-example read at ``(arange(b), idx)`` (``x[arange(b)[:, None], pos]``: BERT's masked positions) is the
mirror, measured on data=2,model=4, fsdp=2,model=4, data=4,model=2, data=2,fsdp=2,model=2 and data=8: the indices
move as a gather's operand (permuted, gathered over the batch devices left; with ``k == 1`` all-gathered), each
device picks the rows it holds and the picked rows are summed and put in place as a scatter's result (all-reduced
over the batch axes, ``1 / k`` of them, and their ``1 / d`` permuted back); backward, the rows' gradient moves as
a gather's operand and the operand's partial gradient is all-reduced over the ``k`` devices. Only the picked rows
and the indices cross, not the operand: the review's 2-layer BERT-style LM (B=8, T=32, 6 masked positions, width
64) on data=2,model=4 compiles 12,480 B of collective-permute, which the rule prices exactly (priced as a graph
net's gather, 65,536 B; est/compiled 1.058, now 1.00).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tpflax._src.cost.explicit import cpu_wire
from tpflax._src.cost.records import CommItem

SOURCE = "rows crossing the batch split"


def crossing_items(s: Any, crossings: Sequence[Any]) -> list[CommItem]:
    """The collectives of each traced crossing gather and scatter (:mod:`tpflax._src.cost.crossing`), forward and,
    where a gradient flows, backward.

    Args:
        s: the estimate's :class:`~tpflax._src.cost.scope.Scope`.
        crossings: :attr:`tpflax._src.cost.workload.Workload.crossings`.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, tpflax
    >>> class G(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, nodes, snd, rcv):
    ...         h = nn.Dense(16, name="enc")(nodes)
    ...         return h + jax.ops.segment_sum(h[snd], rcv, num_segments=nodes.shape[0])
    >>> sample = (jax.ShapeDtypeStruct((8, 4), jnp.float32), jax.ShapeDtypeStruct((32,), jnp.int32),
    ...           jax.ShapeDtypeStruct((32,), jnp.int32))
    >>> p = tpflax.plan(jax.eval_shape(G().init, jax.random.key(0), *sample), {"data": 2, "model": 4})
    >>> e = tpflax.estimate(p, optax.sgd(0.1), model=G(), sample=sample, backend="cpu")
    >>> [(i.kind, i.axes, i.size, i.group_size) for i in e.items if i.source == SOURCE][:3]  # the gather, forward
    [('collective-permute', ('data', 'model'), 256.0, 2), ('all-reduce', ('model',), 1024.0, 2), ('all-reduce', ('data',), 256.0, 2)]
    """
    batch = tuple(a for a in s.batch_axes if s.mesh.sizes[a] > 1)
    d = math.prod(s.mesh.sizes[a] for a in batch)
    if d == 1 or not crossings:
        return []
    spare = tuple(a for a in s.mesh.names if a not in s.batch_axes and s.mesh.sizes[a] > 1)
    k = math.gcd(d, math.prod(s.mesh.sizes[a] for a in spare))
    out: list[CommItem] = []
    permuted: set[int] = set()
    for c in crossings:
        item = cpu_wire(c.itemsize, s.backend)
        whole, rows = c.whole * item, c.rows * item
        if c.kind == "spread":  # the updates (and their indices) move as a gather's operand; backward as a scatter
            out.extend(_moves("gather", "forward", rows, whole, batch, spare, d, k, c.count, False, "the updates"))
            if c.indices:
                out.extend(i for i in _moves("gather", "forward", c.indices, 0, batch, spare, d, k, c.count, False,
                                             "the indices") if i.total)
            if c.live:
                out.extend(_moves("scatter", "backward", rows, 0, batch, spare, d, k, c.count, False,
                                  "the updates' gradient"))
            continue
        if c.kind == "pick":  # the mirror: the indices move as a gather's operand, the picked rows as a scatter's
            # result; backward, the rows' gradient as a gather's operand and the operand's partial gradient summed
            if c.indices:
                out.extend(i for i in _moves("gather", "forward", c.indices, 0, batch, spare, d, k, c.count, False,
                                             "the indices") if i.total)
            out.extend(_moves("scatter", "forward", rows, 0, batch, spare, d, k, c.count, False, "the picked rows"))
            if c.live:
                out.extend(_moves("gather", "backward", rows, whole, batch, spare, d, k, c.count, False,
                                  "the picked rows' gradient"))
            continue
        passes = [(c.kind, "forward")]
        if c.live:
            passes.append(("scatter" if c.kind == "gather" else "gather", "backward"))
        for kind, when in passes:
            # one permute serves every forward gather of one operand; each backward gather permutes its own
            shared = when == "forward" and c.key in permuted
            if when == "forward" and kind == "gather":
                permuted.add(c.key)
            out.extend(_moves(kind, when, whole, rows, batch, spare, d, k, c.count, shared))
    return out


def _moves(kind: str, when: str, whole: float, rows: float, batch: tuple[str, ...], spare: tuple[str, ...], d: int,
           k: int, count: int, shared: bool, what: str = "") -> list[CommItem]:
    """One gather's or scatter's collectives (the module docstring's rules): ``whole`` is the indexed array's bytes
    (a gather's operand, a scatter's result), ``rows`` the gathered rows' (a gather's output)."""
    why = f"rows gathered or scattered at indices across the batch split ({kind}{f' of {what}' if what else ''}, {when})"
    if k == 1:
        if kind == "gather":
            return [CommItem("all-gather", batch, whole, d, count, SOURCE, why + ": gather the operand")]
        return [CommItem("all-reduce", batch, whole, d, count, SOURCE, why + ": sum the whole result")]
    moved = (*batch, *spare)
    if kind == "gather":
        out = [] if shared else [CommItem("collective-permute", moved, whole / d, 2, count, SOURCE,
                                          why + ": move the operand's shard onto the other axes")]
        if d > k:
            out.append(CommItem("all-gather", batch, whole / k, d // k, count, SOURCE,
                                why + ": gather the operand over the batch devices left"))
        if rows:
            out.append(CommItem("all-reduce", spare, rows / d, k, count, SOURCE, why + ": sum the partial rows"))
        return out
    return [CommItem("all-reduce", batch, whole / k, d, count, SOURCE, why + ": sum the result's part"),
            CommItem("collective-permute", moved, whole / d, 2, count, SOURCE, why + ": move the result's shard back")]
