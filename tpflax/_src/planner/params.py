"""The parameter tree an optimizer sees, of a plan's tree: the params collection of full linen
variables, the trainable leaves (``plan(..., trainable=)``, float dtypes), nnx ``Param`` state;
abstract or of arrays, with the merge that puts an updated tree back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from tpflax._src.errors import PlanMismatchError
from tpflax._src.facts.tree import (
    COLLECTIONS,
    is_box,
    is_nnx_state,
    keystr,
    state_variable,
    unbox,
    unboxed,
)
from tpflax._src.planner.plan import Plan
from tpflax._src.planner.state import is_lookahead_params


def _sds(shape: tuple[int, ...], dtype: str) -> jax.ShapeDtypeStruct:
    try:
        return jax.ShapeDtypeStruct(shape, np.dtype(jax.numpy.dtype(dtype)))
    except TypeError:  # PRNG keys and other opaque leaves: a shape-only stand-in
        return jax.ShapeDtypeStruct(shape, np.uint32)


def planned_tree(plan: Plan) -> Any:
    """The planned tree as ``jax.ShapeDtypeStruct`` leaves (full variables if those were planned).

    The plan's own structure (``plan.specs``), or nested dicts after
    ``Plan.from_json``. PRNG-key leaves become uint32 stand-ins of their shape.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"params": {"w": jax.ShapeDtypeStruct((8, 4), "float32")}}, {"model": 2})
    >>> planned_tree(p)["params"]["w"].shape
    (8, 4)
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        plan.specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    paths = [keystr(p) for p, _ in flat]
    if sorted(paths) == sorted(plan.decisions):
        return jax.tree_util.tree_unflatten(treedef, [
            _sds(plan.decisions[p].shape, plan.decisions[p].dtype) for p in paths])
    tree: dict[str, Any] = {}
    for path, d in plan.decisions.items():
        node = tree
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _sds(d.shape, d.dtype)
    return tree


def abstract_params(plan: Plan, params: Any = None, *, collection: bool = True) -> Any:
    """The parameter tree an optimizer sees, abstract: :func:`optimizer_params` of ``params``,
    else of the planned tree, as tpflax's train step updates it. ``collection=False``: of full linen
    variables, all of them (a state made with ``optimizer.init(variables)``).

    >>> import jax, tpflax
    >>> p = tpflax.plan({"params": {"w": jax.ShapeDtypeStruct((8, 4), "float32")}}, {"model": 2})
    >>> list(abstract_params(p))
    ['w']
    """
    if params is not None:
        params = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.asarray(x).dtype)), params)
    return optimizer_params(plan, params, collection=collection)


def optimizer_params(plan: Plan, params: Any = None, *, collection: bool = True) -> Any:
    """What the optimizer sees of ``params`` (arrays or abstract), or of the planned tree: the
    float leaves tpflax's train step differentiates (:func:`split_params`).

    ``params`` may be the planned tree or its trainable part (``variables["params"]``,
    ``nnx.state(model, nnx.Param)``); of full linen variables, their ``params`` collection
    (:func:`params_collection`; all of them with ``collection=False``); an ``nnx.State`` keeps its Variables, so the state is what
    ``optimizer.init`` makes of them (the train step takes it either way). Without ``params`` the
    planned tree stands in, built from the plan (:func:`planned_tree`), with bare arrays. An
    ``optax.LookaheadParams(fast, slow)`` of such trees gives the pair of what the optimizer sees.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32"),
    ...                  "n": jax.ShapeDtypeStruct((), "int32")}, {"model": 2})
    >>> optimizer_params(p)["n"] is None
    True
    """
    if params is None:
        return split_params(plan, planned_tree(plan))[0]
    if is_lookahead_params(params):  # optax.lookahead's pair: each tree as the optimizer sees it
        return type(params)(*(optimizer_params(plan, p, collection=collection) for p in params))
    if is_nnx_state(params):
        return _nnx_params(params, _plan_trains(plan))[0]
    if collection:
        params, prefix = params_collection(plan, params)
    else:
        full = isinstance(params, Mapping) and "params" in params
        prefix = "params/" if not full and any(path.startswith("params/") for path in plan.decisions) else ""
    return trainable(params, _plan_keeps(plan, prefix))[0]


def params_collection(plan: Plan, params: Any) -> tuple[Any, str]:
    """``(the tree the optimizer state mirrors, its paths' prefix in the plan)`` of ``params`` given as
    the planned tree, its ``params`` collection, or full linen variables (``{"params": ..., "batch_stats":
    ...}``): of those, the ``params`` collection, as :func:`split_params` trains it, whether the plan was
    made of the full variables or of their ``params`` collection.

    Raises:
        PlanMismatchError: full linen variables whose ``params`` collection is not the plan's parameters.

    >>> import jax, tpflax
    >>> w = {"params": {"w": jax.ShapeDtypeStruct((8, 4), "float32")},
    ...      "batch_stats": {"mean": jax.ShapeDtypeStruct((4,), "float32")}}
    >>> p = tpflax.plan(w["params"], {"model": 2})
    >>> params_collection(p, w)[0] == w["params"], params_collection(p, w["params"])[1]
    (True, '')
    """
    in_plan = any(path.startswith("params/") for path in plan.decisions)
    others = set(map(str, params)) - {"params"} if isinstance(params, Mapping) and "params" in params else None
    if others is None or not (in_plan or others <= COLLECTIONS):
        return params, "params/" if in_plan else ""  # the planned tree, or its params collection
    prefix = "params/" if in_plan else ""
    got = {prefix + keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params["params"], is_leaf=is_box)[0]}
    want = {path for path in plan.decisions if path.startswith(prefix)}
    if got != want:
        problems = [f"{path}: planned, not in params['params']" for path in sorted(want - got)[:5]]
        problems += [f"{path}: in params['params'], not planned" for path in sorted(got - want)[:5]]
        raise PlanMismatchError(
            f"params= holds linen collections {sorted(map(str, params))}; the optimizer state mirrors their "
            f"'params' collection (what the train step updates), which does not match the plan's "
            f"{len(want)} parameters ({len(want - got)} missing, {len(got - want)} not planned); pass "
            "params= the variables (or their params collection) the plan was made for", problems)
    return params["params"], prefix


def split_params(plan: Plan, tree: Any) -> tuple[Any, Callable[[Any, Any], Any]]:
    """``(what the optimizer sees of tree, merge(tree, new_params))`` for a tree shaped like the plan.

    The one definition of what tpflax's train step differentiates and its optimizer state covers
    (:func:`shard_optimizer_state <tpflax.shard_optimizer_state>` builds the state over the same):

    * full linen variables (the plan's paths start with ``params/``): ``tree["params"]``;
    * an ``nnx.State``: the leaves the plan marks trainable (``Decision.trainable``: float
      ``nnx.Param`` s) as bare arrays, as ``nnx.Optimizer`` hands them to optax (so a state built
      from the plan alone, which keeps no Variable metadata, has the same treedef);
      ``BatchStat`` s, RNG state and integer, bool or key Params are left out;
    * else the whole tree.

    Integer, bool and key leaves of a linen ``params`` collection or a plain tree are set to None
    (:func:`trainable`). ``merge`` carries every leaf the optimizer does not see through.

    >>> import jax, tpflax
    >>> tree = {"params": {"w": jax.ShapeDtypeStruct((4,), "float32")}}
    >>> p = tpflax.plan(tree, {"data": 1})
    >>> list(split_params(p, tree)[0])
    ['w']
    """
    if is_nnx_state(tree):  # before the linen test: a State is a Mapping and may hold a "params" attribute
        params, merge = _nnx_params(tree, _plan_trains(plan))
        return unboxed(params), merge
    collections = any(path.startswith("params/") for path in plan.decisions)
    if collections and isinstance(tree, Mapping) and "params" in tree:
        params, restore = trainable(tree["params"], _plan_keeps(plan, "params/"))
        return params, lambda t, p: type(t)({**t, "params": restore(t["params"], p)})  # a FrozenDict stays one
    return trainable(tree, _plan_keeps(plan, ""))


def _plan_keeps(plan: Plan, prefix: str) -> Callable[[str], bool]:
    """``keeps(path)``: False for a leaf the plan freezes (``plan(..., trainable=)``); paths of a
    tree inside the planned one (its ``params`` collection) are under ``prefix``."""
    def keeps(path: str) -> bool:
        d = plan.decisions.get(prefix + path)
        return d is None or d.trainable or d.kind in ("int", "state")

    return keeps


def _plan_trains(plan: Plan) -> Callable[[str, Any], bool]:
    """``trains(path, leaf)``: the plan's word (``Decision.trainable``), else :func:`_nnx_trains`."""
    def trains(path: str, x: Any) -> bool:
        d = plan.decisions.get(path)
        return d.trainable if d is not None else _nnx_trains(path, x)

    return trains


def _nnx_trains(_: str, x: Any) -> bool:
    """An ``nnx.Param`` (or a bare array) of a float dtype."""
    return not state_variable(x) and _inexact(unbox(x))


def _nnx_params(state: Any, trains: Callable[[str, Any], bool]) -> tuple[Any, Callable[[Any, Any], Any]]:
    """``(the leaves of an nnx.State that trains(path, leaf) keeps, merge(full, new))``; ``new`` may
    hold them in their Variables or bare."""
    from flax import nnx

    def keep(path: tuple[Any, ...], x: Any) -> bool:
        return trains("/".join(str(k) for k in path), x)

    def merge(full: Any, new: Any) -> Any:
        boxed = nnx.filter_state(full, keep)  # the same leaves in the same order, in their Variables
        return nnx.merge_state(full, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(boxed),
                                                                  jax.tree_util.tree_leaves(new)))

    return nnx.filter_state(state, keep), merge


def _inexact(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return True
    try:
        return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))
    except TypeError:  # a dtype name numpy does not know: a PRNG key's ("key<fry>")
        return False


def trainable(tree: Any, keeps: Callable[[str], bool] | None = None) -> tuple[Any, Any]:
    """``(tree with its integer, bool and key leaves set to None, restore(full, new))``.

    The optimizer sees the float leaves only: jax cannot differentiate the others
    (step counters, int8 codes, RNG keys), so a train step carries them through
    unchanged. A tree with only float leaves is returned as it is. Of an
    ``nnx.State``: its float ``nnx.Param`` s, the rest left out (no None inside
    a Variable; see :func:`split_params`). ``keeps(path)`` False sets a leaf (or a
    flax box) to None too: one a plan freezes.

    >>> import jax.numpy as jnp
    >>> masked, restore = trainable({"w": jnp.ones(2), "n": jnp.zeros((), jnp.int32)})
    >>> masked["n"] is None, int(restore({"w": 1, "n": 7}, {"w": 2, "n": None})["n"])
    (True, 7)
    """
    if is_nnx_state(tree):
        return _nnx_params(tree, _nnx_trains if keeps is None else lambda p, x: keeps(p) and _nnx_trains(p, x))
    # the paths as the masking below names them (a tree of integers only has no array leaf to walk)
    paths = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]]
    frozen = keeps is not None and not all(keeps(p) for p in paths)
    if frozen:
        tree = jax.tree_util.tree_map_with_path(lambda p, x: x if keeps(keystr(p)) else None, tree, is_leaf=is_box)
    leaves = jax.tree_util.tree_leaves(tree)
    if not frozen and all(_inexact(x) for x in leaves):
        return tree, lambda full, new: new
    masked = jax.tree_util.tree_map(lambda x: x if _inexact(x) else None, tree)

    def restore(full: Any, new: Any) -> Any:
        return jax.tree_util.tree_map(lambda n, f: f if n is None else n, new, full,
                                      is_leaf=lambda x: x is None)

    return masked, restore


__all__ = ["abstract_params", "optimizer_params", "params_collection", "planned_tree", "split_params", "trainable"]
