"""The layouts a model's own ``jax.lax.with_sharding_constraint`` calls force on its activations.

For the dataflow a constraint is an identity (:func:`tpflax._src.trace.handlers.elementwise`): a model that
annotates its activations keeps its pairs. It also pins the activation to a layout whatever the plan: a dim
laid out over mesh axes that the kernels making or reading it are not split over makes XLA reshard into the
constraint and out of it. The walk records, for each tagged dim a constraint lays out over mesh axes, the
kernel dims it carries (:attr:`tpflax._src.trace.records.Dataflow.constraints`); the estimate prices the
disagreement with the plan (:func:`tpflax._src.cost.whole.constrained_dims`).

A dim the constraint replicates (``None``, or past the end of a short spec: measured, ``P('data')`` compiles as
``P('data', None)``) records no axes, ``()``: a plan that splits its kernel dims over a tensor axis has it
gathered (:func:`tpflax._src.cost.whole.replicated_items`). A dim left to XLA (``P.UNCONSTRAINED``) records
nothing, nor a dim that carries no kernel's features (the batch, a sequence): a split of those over the batch
axes is the plan's batch layout.

>>> import jax, jax.numpy as jnp
>>> from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P
>>> from tpflax._src.trace.dataflow import analyze
>>> mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)  # jax 0.12's default: Explicit
>>> def f(w, x):
...     return jax.lax.with_sharding_constraint(x @ w, NamedSharding(mesh, P("data", "model")))
>>> closed = jax.make_jaxpr(f)(jnp.ones((16, 32)), jnp.ones((8, 16)))
>>> analyze(closed, ["w"]).constraints
((0, 1, ('model',)),)
"""

from __future__ import annotations

from typing import Any

from tpflax._src.trace.interpreter import Val, Walk, is_minor


def boundary(w: Walk, v: Val, axes: list[tuple[str, ...]], sizes: dict[str, int]) -> None:
    """Record the layout a ``shard_map``'s in_spec or out_spec gives the activation ``v`` (``axes``: per dim,
    the mesh axes it cuts the dim over): a boundary is a constraint on what crosses it. A column's output
    split over ``model`` that enters a body taking its features whole is gathered on the way in, and its
    gradient on the way back out of a body that gives them whole (measured on XLA:TPU, a ragged
    all-to-all's token dispatch between a split column and its row, ``tests/test_shard_map.py``)."""
    if v.origin:
        return  # a parameter: its layout in the body is :attr:`Dataflow.in_specs`
    for d, names in enumerate(axes[:v.rank]):
        _laid_out(w, v, d, tuple(a for a in names if sizes.get(a, 1) > 1))


def _laid_out(w: Walk, v: Val, d: int, axes: tuple[str, ...]) -> bool:
    """Record that dim ``d`` of ``v`` is laid out over ``axes`` for every kernel dim it carries (its major tags);
    whether it carries any."""
    major = [k for k in v.dim_tags(d) if not is_minor(k)]
    for k in major:
        w.constraints.add((*w.root(k), axes))
    return bool(major)


def note(w: Walk, eqn: Any, v: Val) -> None:
    """Record the mesh axes the constraint ``eqn`` lays each tagged dim of the activation ``v`` out over, and
    the widths of the untagged dims it splits of any activation but a constant (a residual stream past a
    norm carries no tag: MaxText's ``activation_embed`` over ``tensor``)."""
    spec = getattr(eqn.params.get("sharding", eqn.params.get("dst_sharding")), "spec", None)
    if spec is None or v.origin:
        return
    entries = tuple(spec)[:v.rank] + (None,) * (v.rank - len(tuple(spec)))  # a short spec replicates the rest
    shape = tuple(getattr(getattr(eqn.invars[0], "aval", None), "shape", ()))
    for d, entry in enumerate(entries):
        if entry is not None and not isinstance(entry, (str, tuple)):
            continue  # P.UNCONSTRAINED: left to XLA
        axes = entry if isinstance(entry, tuple) else (entry,) if isinstance(entry, str) else ()
        tagged = _laid_out(w, v, d, tuple(axes))
        if axes and not tagged and not v.constant and len(shape) == v.rank:
            w.split_widths.add((shape[d], tuple(axes)))
