"""Bind a plan to a device mesh and to a tree: the checks every apply function runs first.

Everything is validated before the first byte moves: a tree that does not
match the plan, a mesh of another shape, or too few devices raise a
:class:`~tpflax.errors.TpflaxError` and nothing is placed halfway.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import NamedSharding

from tpflax._src.errors import OptionError, PlanMismatchError
from tpflax._src.facts.tree import COLLECTIONS, Leaf, is_box, walk
from tpflax._src.mesh import check_mesh_matches, device_mesh, sharding_mesh
from tpflax._src.planner.plan import Plan, check_tree_matches


def check_mesh(plan: Plan, mesh: Any) -> None:
    """Raise PlanMismatchError if ``mesh`` differs from the plan's mesh shape.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
    >>> check_mesh(p, {"model": 2})
    """
    check_mesh_matches(mesh, plan.mesh)


def bind_mesh(plan: Plan, mesh: Any, *, abstract: bool = False) -> jax.sharding.Mesh:
    """The device mesh to apply ``plan`` on: ``mesh`` checked, or built from a shape (or the plan's).

    ``abstract=True``: an ``AbstractMesh`` is accepted and returned (for shardings
    and constraints, which place nothing).

    Raises:
        OptionError: ``plan`` is not a Plan (e.g. arguments swapped).
        PlanMismatchError: the mesh differs from the plan's.
        AbstractMeshError: the mesh is an ``AbstractMesh`` (without ``abstract=True``); a MeshError and a
            PlanMismatchError.
        DeviceError: too few devices for a mesh given as a shape.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
    >>> bind_mesh(p, None).axis_names
    ('model',)
    """
    if not isinstance(plan, Plan):
        raise OptionError(
            f"expected a tpflax.Plan, got {type(plan).__name__}; make one with tpflax.plan(tree, mesh) or "
            "tpflax.Plan.from_json(text) (the order is shard(tree, plan, mesh), shardings(plan, mesh))")
    return sharding_mesh(mesh, plan.mesh) if abstract else device_mesh(mesh, plan.mesh)


def _collection_prefix(plan: Plan, leaves: list[Leaf]) -> str:
    """"params/" (or another collection) when ``leaves`` are one collection of the planned variables.

    A tree whose paths are all missing from the plan but all present with one
    linen collection prepended is ``variables[collection]`` of the planned
    variables: unambiguous, so it is accepted. Otherwise "" (matched as is).
    """
    if not leaves or any(x.path in plan.decisions for x in leaves):
        return ""
    for c in sorted(COLLECTIONS):
        if all(f"{c}/{x.path}" in plan.decisions for x in leaves):
            return c + "/"
    return ""


def _prefix_hint(plan: Plan, leaves: list[Leaf]) -> str:
    """One line when most differences are only a missing collection prefix (else "")."""
    if any(x.path in plan.decisions for x in leaves):
        return ""
    counts = {c: sum(f"{c}/{x.path}" in plan.decisions for x in leaves) for c in sorted(COLLECTIONS)}
    best = max(counts, key=counts.__getitem__)
    if not counts[best]:
        return ""
    return (f"{counts[best]} of the tree's {len(leaves)} paths are in the plan with the prefix {best}/: "
            f"the plan is for full variables; pass them, or variables[{best!r}] exactly as planned")


def derived_leaves(plan: Plan, leaves: list[Leaf]) -> bool:
    """Whether ``leaves`` are state derived from the planned parameters: some hold a planned path under another
    root (``0/mu/up/kernel``, ``params/up/kernel``), and every other leaf outside the plan is a scalar (``count``)."""
    outside = [x for x in leaves if x.path not in plan.decisions]
    derived = {x.path for x in outside if any("/".join(x.path.split("/")[i:]) in plan.decisions
                                              for i in range(1, x.path.count("/") + 1))}
    return bool(derived) and all(x.path in derived or x.shape == () for x in outside)


def _derived_hint(plan: Plan, leaves: list[Leaf], checkpoint: str) -> str:
    """One line when the leaves outside the plan are state derived from the planned parameters (else "").

    An optimizer state, a TrainState or an ``nnx.Optimizer``'s state holds leaves whose paths end with a
    planned parameter's (``0/mu/up/kernel``), besides scalars (``count``): re-planning is not the fix,
    deriving their shardings from the plan is.
    """
    if not derived_leaves(plan, leaves):
        return ""
    if checkpoint:
        return ("it holds the planned parameters' paths under other roots, as state derived from them does (an "
                "optimizer's, a TrainState's): restore it with like= that object and "
                "shardings=tpflax.state_shardings(like, plan, mesh), or tpflax.optimizer_shardings(like, plan, mesh) "
                "for an nnx.Optimizer")
    return ("its leaves are the planned parameters' under other roots, as in state derived from them (an "
            "optimizer's, a TrainState's): place it with tpflax.shard_optimizer_state or tpflax.shard_train_state, "
            "or jax.device_put it with tpflax.state_shardings(tree, plan, mesh)")


def _container_hint(plan: Plan, leaves: list[Leaf]) -> str:
    """One line when the tree holds a container (a nested Python list, a tuple, a dict) where the plan has an
    array: jax reads each element as a leaf, and every one was listed as "not in the plan (shape ()); re-plan"."""
    under: dict[str, int] = {}
    for x in leaves:
        if x.path in plan.decisions:
            continue
        parts = x.path.split("/")
        for i in range(len(parts) - 1, 0, -1):
            head = "/".join(parts[:i])
            if head in plan.decisions:
                under[head] = under.get(head, 0) + 1
                break
    if not under:
        return ""
    head, n = next(iter(under.items()))
    more = f" (and {len(under) - 1} more such)" if len(under) > 1 else ""
    return (f"{head} is a container of {n} leaves in the tree where the plan has an array of shape "
            f"{tuple(plan.decisions[head].shape)}{more}: a nested Python list or tuple is no array to jax; pass "
            "np.asarray(...) of it")


def _subset_hint(plan: Plan, leaves: list[Leaf], checkpoint: str) -> str:
    """One line when the tree is a part of the planned tree, every leaf as planned (a filtered state:
    ``nnx.state(model, nnx.Param)`` of a planned module, whose BatchNorm statistics and RNG state it leaves out).

    Such a tree was refused with "re-plan or pass the full tree", which re-planning does not fix: it is a
    part, and its layout is the plan's for its leaves."""
    if checkpoint or not leaves or len(leaves) >= len(plan.decisions):
        return ""
    for x in leaves:
        d = plan.decisions.get(x.path)
        if d is None or tuple(d.shape) != tuple(x.shape) or d.dtype != x.dtype:
            return ""
    return (f"it holds {len(leaves)} of the plan's {len(plan.decisions)} leaves, each as planned: a part of the "
            "planned tree, such as nnx.state(model, nnx.Param); pass the whole tree (nnx.state(model), the model), "
            "or place the part with jax.device_put(tree, tpflax.state_shardings(tree, plan, mesh)), which gives "
            "each leaf its planned spec")


def match_plan(plan: Plan, leaves: list[Leaf], *, checkpoint: str = "") -> list[str]:
    """The plan path of every leaf; raise PlanMismatchError naming every difference.

    ``leaves`` may be the whole planned tree, or one collection of planned full
    linen variables (e.g. ``variables["params"]``): then every leaf of that
    collection must be there. ``checkpoint``: the leaves are the checkpoint's at that path
    (the problems are worded for restoring it).
    """
    what = f"the checkpoint {checkpoint}" if checkpoint else "the tree"
    prefix = _collection_prefix(plan, leaves)
    if not prefix:
        try:
            check_tree_matches(plan, leaves, checkpoint=checkpoint)
        except PlanMismatchError as e:
            hint = (_prefix_hint(plan, leaves) or _derived_hint(plan, leaves, checkpoint)
                    or _subset_hint(plan, leaves, checkpoint) or (_container_hint(plan, leaves) if not checkpoint else ""))
            if not hint:
                raise
            raise PlanMismatchError(f"{what} does not match the plan ({hint})", e.problems) from None
        return [x.path for x in leaves]
    sub = {k: v for k, v in plan.decisions.items() if k.startswith(prefix)}
    prefixed = [dataclasses.replace(x, path=prefix + x.path) for x in leaves]
    try:
        check_tree_matches(dataclasses.replace(plan, decisions=sub), prefixed, checkpoint=checkpoint)
    except PlanMismatchError as e:
        raise PlanMismatchError(
            f"{what} does not match the plan's {prefix} collection ({what} is variables"
            f"[{prefix[:-1]!r}] of the planned variables; paths below carry the {prefix} prefix)",
            e.problems) from None
    return [x.path for x in prefixed]


def plan_leaf_shardings(plan: Plan, mesh: jax.sharding.Mesh, tree: Any):
    """(boxed leaves, boxed treedef, one NamedSharding per leaf) for a tree that must match the plan."""
    leaves, treedef = walk(tree)
    paths = match_plan(plan, leaves)
    boxes = treedef.flatten_up_to(tree)
    return boxes, treedef, [NamedSharding(mesh, plan.decisions[p].spec) for p in paths]


def rebox(box: Any, value: Any) -> Any:
    """``box`` with its array replaced by ``value`` (a new object; ``box`` is untouched)."""
    if not is_box(box):
        return value
    from flax.core import meta

    if isinstance(box, meta.AxisMetadata):
        return box.replace_boxed(value)
    return box.replace(value)  # nnx.Variable.replace returns a copy with the new value


def rebox_all(boxes: list[Any], values: list[Any], treedef: Any) -> Any:
    """The tree ``treedef`` of ``boxes``, each box holding its new value."""
    return jax.tree_util.tree_unflatten(treedef, [rebox(b, v) for b, v in zip(boxes, values, strict=True)])


def leaf_count(box: Any) -> int:
    """How many array leaves a full flatten yields for one walked leaf (1 for every flax box)."""
    return len(jax.tree_util.tree_leaves(box)) if is_box(box) else 1


def is_graph_node(x: Any) -> bool:
    """True for nnx Modules / Optimizers: objects to split, place and merge back."""
    try:
        from flax import nnx
    except Exception:  # noqa: BLE001 - flax without nnx
        return False
    return isinstance(x, (nnx.Module, nnx.Optimizer)) or (
        hasattr(nnx, "Pytree") and isinstance(x, nnx.Pytree) and not isinstance(x, nnx.State))


__all__ = ["bind_mesh", "check_mesh", "is_graph_node", "leaf_count", "match_plan",
           "plan_leaf_shardings", "rebox", "rebox_all"]
