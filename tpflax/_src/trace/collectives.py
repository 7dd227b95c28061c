"""Handlers for the collectives a ``shard_map`` body calls (``psum``, ``all_gather``, ``ppermute``...).

A ``shard_map`` equation is walked like any call (:func:`tpflax._src.trace.control.call`): its
body takes the equation's inputs dim for dim, only each dim is the local shard of the one outside.
Inside, the collectives move data between the shards but keep what each dim *is*: a ``psum`` of a
row's partial output is still that output, a sequence ``all_gather`` of keys still carries their
heads, and ``pvary`` only marks a value as varying over mesh axes (a parameter stays a parameter).
Ending every chain at them (the fallback for unknown primitives) lost the pairs of context-parallel
attention and of a hand-written row layer. Each output keeps the tags of the operand it comes from,
dim for dim; a non-tiled ``all_gather`` adds a new dim (no tags), a non-tiled ``psum_scatter``
removes its scattered one.

>>> sorted(HANDLERS)[:4]
['all_gather', 'all_gather_invariant', 'all_to_all', 'axis_index']
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tpflax._src.jaxprs import body_of
from tpflax._src.trace import constraints
from tpflax._src.trace.interpreter import Handler, Val, Walk, is_minor, opaque
from tpflax._src.trace.records import Collective

# Marks a value as varying over mesh axes (or not): no data moves, a parameter stays a parameter.
VIEWS = ("pvary", "pcast", "pbroadcast", "core_pvary")
# Operands map to outputs one to one, every dim in place.
IN_PLACE = ("psum", "psum_invariant", "psum2", "pmax", "pmin", "pmean", "ppermute", "all_to_all")


# primitive -> (kind forward, kind backward, the buffer S: "in", "out" or "first", the first operand); psum and
# pvary are left out: a psum over the axis a row's contraction is split on is the column -> row pair's
# all-reduce, and pvary's transpose (a psum of a gradient) the gradient reduction, both priced by the plan's model.
PRICED = {"all_gather": ("all-gather", "reduce-scatter", "out"),
          "all_gather_invariant": ("all-gather", "reduce-scatter", "out"),
          "reduce_scatter": ("reduce-scatter", "all-gather", "in"),
          "psum_scatter": ("reduce-scatter", "all-gather", "in"),
          "ppermute": ("collective-permute", "collective-permute", "in"),
          "all_to_all": ("all-to-all", "all-to-all", "in"),
          # expert-parallel token dispatch (EasyDeL's and MaxText's experts over an expert axis): its operand
          # only; the output buffer it writes into and the offsets and sizes move nothing of their own
          "ragged_all_to_all": ("all-to-all", "all-to-all", "first")}


def _note(w: Walk, eqn: Any, ins: list[Val], ctx: tuple) -> None:
    """Record a data-moving collective (and its transpose, when the gradient flows back through it)."""
    name = eqn.primitive.name
    if name not in PRICED:
        return
    fwd, bwd, which = PRICED[name]
    axes = eqn.params.get("axis_name", eqn.params.get("axes", ()))
    axes = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    group = math.prod(w.axis_sizes.get(a, 1) for a in axes)
    vars_ = eqn.invars[:1] if which == "first" else eqn.invars if which == "in" else eqn.outvars
    size = float(sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in vars_ if hasattr(v.aval, "dtype")))
    item = max((v.aval.dtype.itemsize for v in vars_ if hasattr(v.aval, "dtype")), default=0)
    count = math.prod(w.lengths.get(c, 1) for c in ctx if isinstance(c, int))
    again = 1 + any(c in w.rematted for c in ctx)  # a remat recompute runs the forward's again (its transpose once)
    carries = frozenset(w.uses[w.root(k)[0]].path for v in ins[:1] for d in range(v.rank) for k in v.dim_tags(d)
                        if not is_minor(k))
    found = [Collective(fwd, axes, size, group, count * again, name, carries, item)]
    if any(v.live or v.origin for v in ins):
        found.append(Collective(bwd, axes, size, group, count, f"{name} (backward)", carries, item))
    w.collectives[(ctx, id(eqn))] = tuple(found)


def view(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    return [ins[i] if i < len(ins) and ins[i].rank == r else Val(r) for i, r in enumerate(ranks)]


def in_place(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    _note(w, eqn, ins, ctx)
    return [w.moved(ins[i], list(range(r)), r) if i < len(ins) and ins[i].rank == r else Val(r)
            for i, r in enumerate(ranks)]


def all_gather(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    _note(w, eqn, ins, ctx)
    v, r = ins[0], ranks[0]
    if r == v.rank:  # tiled: the gathered dim grows, still the same dim
        return [w.moved(v, list(range(r)), r)]
    new = int(eqn.params.get("all_gather_dimension", 0))
    return [w.moved(v, [d if d < new else None if d == new else d - 1 for d in range(r)], r)]


def reduce_scatter(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    _note(w, eqn, ins, ctx)
    v, r = ins[0], ranks[0]
    if r == v.rank:  # tiled: the scattered dim shrinks, still the same dim
        return [w.moved(v, list(range(r)), r)]
    gone = int(eqn.params.get("scatter_dimension", 0))
    return [dataclasses.replace(w.moved(v, [d for d in range(v.rank) if d != gone], r), origin=())]


def ragged_all_to_all(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """Rows of the operand sent to the ranks that take them, written into the output buffer (operand 1): each
    row keeps its feature dims. Priced as an all-to-all of the whole operand: how many rows it sends depends
    on the routing, all of them at most, and the compiled program's count is read the same way
    (:func:`tpflax._src.hlo.collectives.parse_collectives`)."""
    _note(w, eqn, ins, ctx)
    v, r = ins[0], ranks[0]
    return [w.moved(v, list(range(r)), r) if v.rank == r else Val(r)]


def axis_index(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    return [Val(r) for r in ranks]


HANDLERS: dict[str, Handler] = {
    **{name: view for name in VIEWS},
    **{name: in_place for name in IN_PLACE},
    "all_gather": all_gather, "all_gather_invariant": all_gather,
    "reduce_scatter": reduce_scatter, "psum_scatter": reduce_scatter,
    "ragged_all_to_all": ragged_all_to_all, "axis_index": axis_index,
}


def _axes(spec: Any, rank: int) -> list[tuple[str, ...]]:
    """Per dim, the mesh axes ``spec`` (a PartitionSpec of an in_spec) cuts it over."""
    out = []
    for d in range(rank):
        entry = spec[d] if spec is not None and d < len(spec) else None
        out.append(tuple(entry) if isinstance(entry, tuple) else (entry,) if entry is not None else ())
    return out


def shard_map(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """Walk a ``shard_map`` body like a call, its kernels' dims known as the shards of the whole.

    The body's shapes are one device's: a kernel whose in_spec splits its heads over ``model=4``
    shows one head there, which would cap its pair at no split. While the body is walked,
    ``Walk.split`` says how many shards each parameter dim entering it was cut into, and
    ``Walk.row_shards`` how many its activations' rows were (the batch split over data): the rows a
    kernel's collectives move are the whole batch's. ``Walk.row_axes`` keeps the mesh axes the
    in_specs cut those rows over (context parallelism's sequence over ``model``).
    """
    body = body_of(eqn.params.get("jaxpr"))
    if body is None or len(body.invars) != len(ins):
        return opaque(w, eqn, ins, ctx, ranks, why="no body jaxpr")
    mesh = eqn.params.get("mesh")
    sizes = dict(getattr(mesh, "shape", {}) or {})
    specs = tuple(eqn.params.get("in_specs") or (None,) * len(ins))
    saved, outer, rows, body_rows = dict(w.split), w.axis_sizes, w.row_shards, w.body_rows
    w.axis_sizes = {**outer, **sizes}
    for v, var, spec in zip(ins, eqn.invars, specs, strict=False):
        cut = _axes(spec, v.rank)
        constraints.boundary(w, v, cut, sizes)
        shards = [math.prod(sizes.get(a, 1) for a in names) for names in cut]
        shape = tuple(getattr(getattr(var, "aval", None), "shape", ()))
        activation = not v.origin and (v.live or v.fed)
        if activation and len(shape) >= 2:  # its rows (outside the body: whole)
            w.body_rows = max(w.body_rows, math.prod(shape[:-1]))
        if v.tags is not None:  # an activation: its dims without a kernel's features are its rows
            w.row_shards = max(w.row_shards, rows * math.prod(n for d, n in enumerate(shards) if not v.tags[d]))
            w.row_axes.update(a for d, names in enumerate(cut) if not v.tags[d] for a in names if sizes.get(a, 1) > 1)
        elif activation and shards:  # untagged (past a norm): its leading dim, the rows
            w.row_shards = max(w.row_shards, rows * shards[0])
        for d, n in enumerate(shards):
            for path, dims in v.origin:
                if n > 1 and dims[d] is not None:
                    w.split[(path, dims[d])] = w.split.get((path, dims[d]), 1) * n
        for path, dims in v.origin:  # a parameter's layout inside the body, whatever the plan's
            w.in_specs.setdefault(path, tuple(
                (dims[d], tuple(a for a in names if sizes.get(a, 1) > 1), tuple(sizes[a] for a in names if
                                                                              sizes.get(a, 1) > 1))
                for d, names in enumerate(cut) if dims[d] is not None and any(sizes.get(a, 1) > 1 for a in names)))
    try:
        outs = w.run(body, ins, ctx + (id(eqn),))
    finally:
        w.split, w.axis_sizes, w.row_shards, w.body_rows = saved, outer, rows, body_rows
    for v, spec in zip(outs, tuple(eqn.params.get("out_specs") or ()), strict=False):
        constraints.boundary(w, v, _axes(spec, v.rank), sizes)
        w.pinned[id(v)] = v
    return outs


HANDLERS["shard_map"] = shard_map


def shard_map_meshes(jaxpr: Any, concrete: bool = False) -> list[Any]:
    """The meshes (``{axis: size}``; ``concrete``: the mesh objects) of every ``shard_map`` in ``jaxpr`` and the
    jaxprs it calls.

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AbstractMesh, PartitionSpec as P
    >>> f = jax.shard_map(lambda x: x, mesh=AbstractMesh((1,), ("model",)), in_specs=P(), out_specs=P())
    >>> shard_map_meshes(jax.make_jaxpr(f)(jnp.ones(2)).jaxpr)
    [{'model': 1}]
    """
    found: list[dict[str, int]] = []
    todo = [jaxpr]
    while todo:
        j = body_of(todo.pop())
        for eqn in j.eqns if j is not None else ():
            if eqn.primitive.name == "shard_map" and eqn.params.get("mesh") is not None:
                found.append(eqn.params["mesh"] if concrete else dict(eqn.params["mesh"].shape))
            for p in eqn.params.values():
                todo.extend(x for x in (p if isinstance(p, (tuple, list)) else (p,)) if body_of(x) is not None)
    return found
