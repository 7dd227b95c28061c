"""Move leaves between the model's order and a plan's stored order (``plan(..., fused="aligned")``).

A leaf whose :attr:`Decision.layout` is set is stored head-aligned
(:mod:`tpflax._src.layout`). Placement (:func:`tpflax.shard`, the restores)
takes trees in the model's order and gives them back stored; :func:`tpflax.unshard`
and :func:`tpflax.save_checkpoint` give the model's order back. Trees derived
from the parameters (adam's ``mu``/``nu``, a TrainState) are tied to them by
path as their specs are (:func:`tpflax._src.planner.state.state_leaf_ties`),
and a leaf shaped like its parameter (or one dim fewer, the fused dim kept:
adafactor's factored moments) follows that parameter's layout.

Host numpy arrays are reordered on the host; jax arrays on their devices, keeping
their sharding, by pure data movement (:mod:`tpflax._src.apply.permute`: a gather
XLA partitions over a split dim sums masked shards, which turns -0.0 into +0.0).
Both are bit-exact, and the caller's arrays are never written.

The jax arrays tpflax puts into a stored order are remembered (weakly, with their layout), so a tree
that holds them is known to be stored already: ``nnx.ModelAndOptimizer(tpflax.shard(model, ...), tx)``
holds the placed model itself (:func:`resolve_order`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tpflax._src.apply.permute import program
from tpflax._src.errors import OptionError
from tpflax._src.facts.tree import is_box, keystr, unbox
from tpflax._src.layout import Interleave, check_fits, from_storage, to_storage
from tpflax._src.planner.plan import Plan
from tpflax._src.planner.state import below_param, kept_dims, state_leaf_ties

ORDERS = ("model", "stored")


def has_layouts(plan: Plan) -> bool:
    return any(d.layout is not None for d in plan.decisions.values())


def check_order(order: object) -> str:
    """``order`` as given, or OptionError naming the allowed values.

    >>> check_order("model")
    'model'
    """
    if order not in ORDERS:
        raise OptionError(f"order={order!r} is not one of {', '.join(map(repr, ORDERS))}: 'model' for a tree in "
                          "the model's order (loaded from a checkpoint, made from unsharded params), 'stored' "
                          "for one made from tpflax-placed params (optimizer.init(tpflax.shard(params, plan)))")
    return str(order)


# id(array) -> (weak reference, layout) of every jax array tpflax put into a plan's stored order
_STORED: dict[int, tuple[weakref.ref, Interleave]] = {}


def mark_stored(values: Sequence[Any], layouts: Sequence[Interleave | None]) -> None:
    """Remember the jax arrays among ``values`` that are in the stored order of their ``layouts``."""
    for x, lay in zip(values, layouts, strict=True):
        if lay is not None and isinstance(x, jax.Array):
            key = id(x)
            ref = weakref.ref(x, lambda r, key=key: _STORED.pop(key) if _STORED.get(key, (None,))[0] is r else None)
            _STORED[key] = (ref, lay)


def stored_layout(x: Any) -> Interleave | None:
    """The layout whose stored order tpflax put ``x`` in, or None (not an array tpflax stored)."""
    held = _STORED.get(id(x))
    return held[1] if held is not None and held[0]() is x else None


def tree_paths(tree: Any) -> list[str]:
    """The paths of ``tree``'s leaves, flax boxes and nnx Variables as leaves (as :func:`tree_layouts` lists them)."""
    return [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]]


def resolve_order(order: object, paths: Sequence[str], values: Sequence[Any],
                  layouts: Sequence[Interleave | None]) -> str:
    """The order of a tree whose leaves are ``values``: ``order``, or with None, ``"stored"`` when a laid-out
    leaf is an array tpflax put into the stored order (an ``nnx.ModelAndOptimizer`` of a tpflax-placed model,
    an optimizer initialised from tpflax-placed parameters whose state holds them), else ``"model"``.

    Raises:
        OptionError: ``order="model"`` for a tree holding such arrays: moved again, they would be scrambled.
    """
    held = [p for p, x, lay in zip(paths, values, layouts, strict=True)
            if lay is not None and stored_layout(x) is not None]
    if order is None:
        return "stored" if held else "model"
    order = check_order(order)
    if order == "model" and held:
        raise OptionError(
            "order='model', but these leaves are arrays tpflax already put into the plan's stored order "
            "(tpflax.shard / init_sharded / restore_checkpoint output); moving them again would scramble "
            "their heads: pass order='stored' (or leave order unset: it is detected)", held[:8])
    return order


def derived(lay: Interleave | None, pshape: Sequence[int], shape: Sequence[int], path: str = "",
            below: str = "") -> Interleave | None:
    """The layout of a leaf of ``shape`` (at ``path`` in its state, ``below`` its parameter's path there)
    derived from a parameter of ``pshape`` stored with ``lay``: on the leaf's dim that keeps the stored
    dim (:func:`kept_dims <tpflax._src.planner.state.kept_dims>`; adafactor's moments lose the dim its
    rule reduced, SM3's accumulators keep one dim each), else none.

    >>> lay = Interleave(1, (4, 4), 2)
    >>> derived(lay, (3, 8), (3, 8)) == lay, derived(lay, (3, 8), (8,)), derived(lay, (3, 8), (3,))
    (True, Interleave(dim=0, pieces=(4, 4), ranks=2), None)
    >>> derived(lay, (8, 8), (8,), "0/v_row/w"), derived(lay, (8, 8), (8,), "0/v_col/w")
    (None, Interleave(dim=0, pieces=(4, 4), ranks=2))
    >>> derived(lay, (8, 8), (8,), "0/mu/w/0", "0"), derived(lay, (8, 8), (8,), "0/mu/w/1", "1")
    (None, Interleave(dim=0, pieces=(4, 4), ranks=2))
    """
    pshape, shape = tuple(pshape), tuple(shape)
    if lay is None or shape == pshape:
        return lay
    kept = kept_dims(pshape, shape, path, below)
    if kept is None or lay.dim not in kept:
        return None
    return Interleave(kept.index(lay.dim), lay.pieces, lay.ranks)


def tree_layouts(plan: Plan, tree: Any, *, optimizer: Any = None, params: Any = None) -> list[Interleave | None]:
    """One layout per leaf of ``tree`` (flax boxes and nnx Variables as leaves), tied to the parameters by path."""
    paths, boxes, _, targets = state_leaf_ties(tree, plan, optimizer=optimizer, params=params)
    out: list[Interleave | None] = []
    for path, b, t in zip(paths, boxes, targets, strict=True):
        d = plan.decisions[t] if t is not None else None
        out.append(None if d is None else derived(d.layout, d.shape, np.shape(unbox(b)), path, below_param(path, t)))
    return out


def reorder(values: Sequence[Any], layouts: Sequence[Interleave | None], *, back: bool = False) -> list[Any]:
    """``values`` with every leaf that has a layout in stored order (``back``: in the model's order)."""
    out = list(values)
    for i, (x, lay) in enumerate(zip(values, layouts, strict=True)):
        if lay is None or x is None:
            continue
        if isinstance(x, jax.Array):
            out[i] = _on_devices(x, lay, back)
        elif isinstance(x, (np.ndarray, np.generic)):
            out[i] = from_storage(x, lay) if back else to_storage(x, lay)
    return out


def in_stored_order(order: object, tree: Any, values: Sequence[Any], layouts: Sequence[Interleave | None]
                    ) -> list[Any]:
    """``values`` (the unboxed leaves of ``tree``) in the plan's stored order: moved there from the model's
    order unless ``order`` (:func:`resolve_order`: given, or detected) says they are stored already."""
    if resolve_order(order, tree_paths(tree), values, layouts) == "model":
        return reorder(values, layouts)
    return list(values)


def into_plan_order(values: Sequence[Any], layouts: Sequence[Interleave | None]) -> list[Any]:
    """``values`` in the order ``layouts`` give (None: the model's), wherever they are now.

    A jax array tpflax already put into a stored order (:func:`stored_layout`: the output of
    :func:`tpflax.shard`, :func:`tpflax.init_sharded`, a restore) is taken from that order, not from the
    model's: placed again on the same plan it is not moved, on a plan without the layout it is moved back.
    Every other value is taken to be in the model's order.
    """
    out = list(values)
    for i, (x, lay) in enumerate(zip(values, layouts, strict=True)):
        held = stored_layout(x)
        if held == lay:
            continue
        if held is not None:
            x = reorder([x], [held], back=True)[0]
        out[i] = reorder([x], [lay])[0] if lay is not None else x
    return out


def _on_devices(x: jax.Array, lay: Interleave, back: bool) -> jax.Array:
    check_fits(x, lay)
    index = lay.inverse() if back else lay.order()
    return program(index.astype(np.int64).tobytes(), lay.dim, x.sharding)(x)


def model_order(tree: Any, plan: Plan | None) -> Any:
    """``tree`` unboxed, its head-aligned leaves (and the state leaves tied to them) in the model's order."""
    if plan is None or not has_layouts(plan):
        return tree
    from tpflax._src.facts.tree import unboxed

    flat, treedef = jax.tree_util.tree_flatten(unboxed(tree))
    return jax.tree_util.tree_unflatten(treedef, reorder(flat, tree_layouts(plan, unboxed(tree)), back=True))


__all__ = ["ORDERS", "check_order", "derived", "has_layouts", "in_stored_order", "into_plan_order",
           "mark_stored", "model_order", "reorder",
           "resolve_order", "stored_layout", "tree_layouts", "tree_paths"]
