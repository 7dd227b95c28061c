"""Apply a plan to NNX objects: split, place, merge back.

An unannotated ``nnx.Module`` (or an ``nnx.Optimizer``) is split into its
graph definition and state, the state's arrays are placed on the mesh, and a
*new* object is merged from them, so its variables carry the shardings and an
``nnx.jit`` step runs on the mesh. The object passed in is left as it was.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import NamedSharding

from tpflax._src.apply.bind import bind_mesh, rebox_all
from tpflax._src.apply.put import check_values, place_tree, put
from tpflax._src.apply.stored import (
    has_layouts,
    in_stored_order,
    mark_stored,
    tree_layouts,
)
from tpflax._src.facts.tree import unbox
from tpflax._src.planner.plan import Plan
from tpflax._src.planner.state import state_leaf_specs


def shard_module(obj: Any, plan: Plan, mesh: Any = None, *, per_shard: bool = False,
                 derived: bool = False, order: str | None = None) -> Any:
    """A copy of an nnx Module / Optimizer whose arrays are placed on the mesh.

    Args:
        obj: an ``nnx.Module`` whose ``nnx.state`` the plan was made for, or an
            ``nnx.Optimizer`` (with ``derived=True``).
        plan: the plan.
        mesh: the mesh (or a shape; defaults to the plan's).
        per_shard: build leaves from per-device slices (see :func:`tpflax.shard`).
        derived: the state is derived from the planned parameters (an
            optimizer's moments and step), not the planned tree itself: specs
            are carried over by path as in :func:`tpflax.state_shardings`.
        order: with ``derived``: the order the state is in (``order`` of :func:`tpflax.shard_optimizer_state`;
            None: ``"stored"`` when it holds arrays tpflax put into the stored order, such as the placed
            model of an ``nnx.ModelAndOptimizer``, else ``"model"``).

    Raises:
        PlanMismatchError: a module's state does not match the plan.
        OptionError: ``order="model"`` for a state holding arrays tpflax already stored.

    >>> import tpflax
    >>> from flax import nnx
    >>> m = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    >>> p = tpflax.plan(nnx.state(m), {"model": 2}, rules=[("kernel", "column")])
    >>> shard_module(m, p, tpflax.make_mesh({"model": 2})).kernel.get_value().sharding.spec
    P(None, 'model')
    """
    from flax import nnx

    graphdef, state = nnx.split(obj)
    if not derived:
        return nnx.merge(graphdef, place_tree(state, plan, mesh, per_shard=per_shard))
    mesh = bind_mesh(plan, mesh)
    boxes, treedef, specs = state_leaf_specs(state, plan)
    values = [unbox(b) for b in boxes]
    check_values(state, values, what="the optimizer's state")
    if has_layouts(plan):
        lays = tree_layouts(plan, state)
        values = in_stored_order(order, state, values, lays)  # in the model's order, as shard() takes it
    placed = put(values, [NamedSharding(mesh, s) for s in specs], per_shard=per_shard)
    if has_layouts(plan):
        mark_stored(placed, lays)
    return nnx.merge(graphdef, rebox_all(boxes, placed, treedef))


__all__ = ["shard_module"]
