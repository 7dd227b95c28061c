"""Apply a plan: NamedShardings on a real mesh."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

from .errors import PlanMismatchError
from .mesh import make_mesh, mesh_shape
from .plan import Plan


def check_mesh(plan: Plan, mesh: Any) -> None:
    """Raise PlanMismatchError if ``mesh`` differs from the plan's mesh shape."""
    got = mesh_shape(mesh, dict(plan.mesh.roles)).axes
    if tuple(got) != tuple(plan.mesh.axes):
        raise PlanMismatchError(
            f"the mesh {dict(got)} differs from the plan's mesh {plan.mesh.sizes}; build it with "
            f"tpflax.make_mesh({plan.mesh.sizes}) or re-plan for this mesh")


def shardings(plan: Plan, mesh: Any, tree: Any = None) -> Any:
    """A ``NamedSharding`` tree for the plan on ``mesh``.

    Args:
        plan: the plan.
        mesh: a ``jax.sharding.Mesh`` (or a shape, to build one with :func:`make_mesh`).
        tree: lay the shardings out on this tree (matched by path); defaults to
            ``plan.specs``' own structure.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 1})
    >>> shardings(p, tpflax.make_mesh({"model": 1}))["w"].spec
    PartitionSpec(None, None)
    """
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = make_mesh(mesh)
    check_mesh(plan, mesh)
    specs = plan.specs if tree is None else plan.specs_for(tree)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
