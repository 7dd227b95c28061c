"""Specs for trees derived from the planned parameters: optimizer state, TrainState, EMA.

Pure: it reads only the plan (specs, shapes, mesh shape) and the state's
shapes, never devices, so the cost model counts exactly what apply places.
Every leaf that belongs to a parameter takes that parameter's spec, carried
over to its own shape; everything else (step counts, rng state) is replicated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from tpflax._src.errors import PlanMismatchError, TreeError
from tpflax._src.facts.tree import (
    COLLECTIONS,
    is_box,
    is_nnx_state,
    keystr,
    state_variable,
    unbox,
    unboxed,
    walk,
)
from tpflax._src.planner.plan import Plan
from tpflax._src.specs import entries, entry_axes, to_pspec


def factored_dim(pshape: tuple[int, ...], shape: tuple[int, ...], path: str = "") -> int | None:
    """The parameter dim an adafactor moment at ``path`` averaged away, or None if it is not one.

    optax's ``scale_by_factored_rms`` factors a parameter over its two largest dims,
    ``d1, d0 = np.argsort(pshape)[-2:]`` (its ``_factored_dims``: equal sizes keep index
    order), and keeps ``v_row`` = the mean over ``d0``, ``v_col`` = the mean over ``d1``.
    The state path names which of the two a leaf is; its shape alone does not when those
    dims are equal (a square kernel: both moments are ``(d,)``).

    >>> factored_dim((128, 128, 4), (128, 4), "0/v_row/w"), factored_dim((128, 128, 4), (128, 4), "0/v_col/w")
    (1, 0)
    """
    pshape, shape = tuple(pshape), tuple(shape)
    field = next((c for c in path.split("/") if c in ("v_row", "v_col")), None)
    if field is None or len(pshape) < 2 or len(shape) != len(pshape) - 1:
        return None
    d1, d0 = (int(k) for k in np.argsort(pshape)[-2:])  # the very call optax makes, ties and all
    k = d0 if field == "v_row" else d1
    return k if pshape[:k] + pshape[k + 1:] == shape else None


def kept_dims(pshape: tuple[int, ...], shape: tuple[int, ...], path: str = "",
              below: str = "") -> tuple[int | None, ...] | None:
    """For each dim of a leaf derived from a parameter of ``pshape``, the parameter dim it keeps
    (None: a dim reduced to 1, or of another size), or None if ``shape`` is not derived from ``pshape``.

    A derived leaf is the parameter with some dims reduced to 1 or dropped, the others kept in
    order: adafactor's factored moments (one dim averaged away), SM3's per-dim accumulators (all
    dims but one dropped), a ``keepdims`` statistic. Same rank: dim by dim, equal sizes keep. Fewer
    dims: when several ways fit (a square kernel), the leaf's state ``path`` says which: adafactor's
    ``v_row`` / ``v_col`` (:func:`factored_dim`), or ``below`` (the path under the parameter's in the
    state) an integer ``k``, a list holding one leaf per parameter dim (SM3's); else the way that
    reduces fewest dims to 1 and drops the earliest.

    >>> kept_dims((64, 64), (64,), "0/mu/w/1", below="1"), kept_dims((64, 64), (64,), "0/mu/w/0", below="0")
    ((1,), (0,))
    >>> kept_dims((16, 4, 8), (4,)), kept_dims((16, 4, 8), (1, 4, 1)), kept_dims((16, 4), (5,))
    ((1,), (None, 1, None), None)
    """
    pshape, shape = tuple(pshape), tuple(shape)
    if len(shape) == len(pshape):
        return tuple(k if a == b else None for k, (a, b) in enumerate(zip(shape, pshape, strict=True)))
    if len(shape) > len(pshape):
        return None
    drop = factored_dim(pshape, shape, path)
    if drop is not None:
        return tuple(k for k in range(len(pshape)) if k != drop)
    if below.isdigit() and len(shape) == 1 and int(below) < len(pshape) and pshape[int(below)] == shape[0]:
        return (int(below),)
    fits = list(_fits(pshape, shape, 0, 0))
    if not fits:
        return None
    return min(fits, key=lambda f: (f.count(None), tuple(-k for k in f if k is not None)))


def _fits(pshape: tuple[int, ...], shape: tuple[int, ...], j: int, i: int):
    """Every way ``shape[i:]`` is ``pshape[j:]`` with dims dropped or reduced to 1 (see :func:`kept_dims`)."""
    if i == len(shape):
        yield ()
        return
    if len(pshape) - j < len(shape) - i:
        return
    yield from _fits(pshape, shape, j + 1, i)  # pshape[j] dropped
    if pshape[j] == shape[i]:
        yield from ((j, *rest) for rest in _fits(pshape, shape, j + 1, i + 1))
    if shape[i] == 1:
        yield from ((None, *rest) for rest in _fits(pshape, shape, j + 1, i + 1))


def adapt_spec(spec: PartitionSpec, pshape: tuple[int, ...], shape: tuple[int, ...],
               sizes: Mapping[str, int], path: str = "", below: str = "") -> PartitionSpec:
    """The parameter's spec carried over to a leaf derived from it, whose shape may differ.

    Each dim the leaf keeps from the parameter (:func:`kept_dims`) keeps its entry; dims reduced to
    1 and leaves not derived from the parameter (a scalar, a norm of it) get none. An entry that
    would not divide the leaf's dim is dropped: that dim is whole.

    >>> adapt_spec(PartitionSpec(None, "model"), (16, 64), (64,), {"model": 4})
    P('model',)
    >>> adapt_spec(PartitionSpec("model", None), (64, 64), (64,), {"model": 4}, "0/v_row/w")
    P('model',)
    >>> adapt_spec(PartitionSpec("model", None), (64, 64), (64,), {"model": 4}, "0/mu/w/1", below="1")
    P(None,)
    """
    ent = entries(spec, len(pshape))
    kept = kept_dims(pshape, shape, path, below)
    out = [None] * len(shape) if kept is None else [None if k is None else ent[k] for k in kept]
    for i, e in enumerate(out):
        n = math.prod(sizes[a] for a in entry_axes(e))
        if n > 1 and shape[i] % n:
            out[i] = None
    return to_pspec(out)


def below_param(path: str, target: str) -> str:
    """The components of a state leaf's ``path`` under its parameter's path ``target`` ('' if none).

    >>> below_param("0/mu/up/kernel/1", "params/up/kernel"), below_param("0/nu/up/kernel", "up/kernel")
    ('1', '')
    """
    head, _, rest = target.partition("/")
    forms = [target] + ([rest] if rest and head in COLLECTIONS else [])
    padded = f"/{path}/"
    for form in forms:
        at = padded.rfind(f"/{form}/")
        if at >= 0:
            return padded[at + len(form) + 2:].strip("/")
    return ""


class _NoFastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "has no attribute `fast`" not in record.getMessage()


@contextlib.contextmanager
def lookahead_quiet():
    """Calls of ``optimizer.init`` on the parameters without optax's lookahead warning.

    ``optax.lookahead``'s init warns when it sees parameters rather than ``LookaheadParams``, and
    then makes the same state (the slow copy is a second parameter tree, not optimizer state):
    tpflax asks for the state's shapes that way on purpose, for any optimizer.
    """
    quiet = _NoFastWarning()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def init_shape(optimizer: Any, params: Any) -> Any:
    """``jax.eval_shape(optimizer.init, params)``, quietly (:func:`lookahead_quiet`)."""
    with lookahead_quiet():
        return jax.eval_shape(optimizer.init, params)


def is_lookahead_params(tree: Any) -> bool:
    """Whether ``tree`` is an ``optax.LookaheadParams(fast, slow)`` pair of parameter trees."""
    import optax

    return isinstance(tree, optax.LookaheadParams)


def takes_lookahead_params(state: Any) -> bool:
    """Whether the optimizer that made ``state`` is ``optax.lookahead`` (its state holds a
    ``LookaheadState``): its update takes ``LookaheadParams(fast, slow)`` as the parameters.

    >>> import jax, optax
    >>> w = {"w": jax.ShapeDtypeStruct((4,), "float32")}
    >>> tx = optax.lookahead(optax.sgd(0.1), 2, 0.5)
    >>> takes_lookahead_params(init_shape(tx, w)), takes_lookahead_params(init_shape(optax.sgd(0.1), w))
    (True, False)
    """
    import optax

    def found(x: Any) -> bool:
        return isinstance(x, optax.LookaheadState)

    return any(map(found, jax.tree_util.tree_leaves(state, is_leaf=found)))


def _suffix_index(plan: Plan) -> dict[str, str]:
    """Plan paths keyed also without a leading linen collection, for suffix matching."""
    index: dict[str, str] = {}
    for path in plan.decisions:
        index.setdefault(path, path)
    for path in plan.decisions:
        head, _, rest = path.partition("/")
        if rest and head in COLLECTIONS:
            index.setdefault(rest, path)
    return index


def _match_nested(path: str, index: Mapping[str, str]) -> str | None:
    """:func:`_match_suffix` of ``path``, else of ``path`` without its last components: a leaf
    nested under a parameter's path (SM3 keeps a list of per-dim accumulators for each parameter)."""
    cur = path
    while True:
        found = _match_suffix(cur, index)
        if found is not None or "/" not in cur:
            return found
        cur = cur.rsplit("/", 1)[0]


def _match_suffix(path: str, index: Mapping[str, str]) -> str | None:
    """The plan path that is the longest '/'-aligned suffix of ``path``."""
    cur = path
    while True:
        if cur in index:
            return index[cur]
        if "/" not in cur:
            return None
        cur = cur.split("/", 1)[1]


@dataclasses.dataclass(frozen=True)
class _Id:
    """Marks a state leaf as a copy of parameter number ``i`` (an unregistered type: a leaf)."""

    i: int


_OTHER = _Id(-1)  # a state leaf that belongs to no parameter


def _positional_matches(optimizer: Any, state: Any, params: Any) -> dict[int, str] | None:
    """{state leaf index: plan-relative param path} from ``optax.tree_map_params``, or None.

    tree_map_params initialises the optimizer on a placeholder, so it finds the
    params-shaped subtrees exactly; it fails for optimizers whose init inspects
    the params (masked, multi_transform), and then path matching takes over.
    """
    import optax

    if not jax.tree_util.tree_leaves(params, is_leaf=is_box):
        return {}  # nothing trainable (only keys or integers): no state leaf follows a parameter
    param_leaves, _ = walk(params)
    ids = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_box),
                                       [_Id(i) for i in range(len(param_leaves))])
    try:
        with lookahead_quiet():
            tagged = optax.tree_map_params(optimizer, lambda _, i: i, state, ids,
                                           transform_non_params=lambda _: _OTHER, is_leaf=is_box)
        flat_tagged = jax.tree_util.tree_leaves(tagged, is_leaf=lambda x: isinstance(x, _Id))
        flat_state = jax.tree_util.tree_leaves(state, is_leaf=is_box)
    except Exception:  # noqa: BLE001 - optimizer init needs real params: fall back to paths
        return None
    if len(flat_tagged) != len(flat_state):
        return None
    return {i: param_leaves[t.i].path for i, t in enumerate(flat_tagged)
            if isinstance(t, _Id) and t.i >= 0}


def _leaf_spec(plan: Plan, value: Any, target: str | None, path: str) -> PartitionSpec:
    shape = tuple(int(d) for d in value.shape)
    if target is None:
        return PartitionSpec()  # counts, step numbers, rng state: replicated
    d = plan.decisions[target]
    return adapt_spec(d.spec, tuple(d.shape), shape, plan.mesh.sizes, path, below_param(path, target))


def state_leaf_specs(tree: Any, plan: Plan, *, optimizer: Any = None,
                     params: Any = None) -> tuple[list[Any], Any, list[PartitionSpec]]:
    """(boxed leaves, treedef, one spec per leaf) for a tree derived from the planned parameters.

    The flat form of :func:`state_specs`, for code that places the leaves:
    ``treedef`` treats flax boxes and nnx Variables as leaves.

    Raises:
        TreeError: a leaf is neither an array nor a Python/numpy scalar.

    >>> import jax, optax, tpflax
    >>> params = {"w": jax.ShapeDtypeStruct((8, 4), "float32")}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> _, _, specs = state_leaf_specs(jax.eval_shape(optax.sgd(0.1, 0.9).init, params), p)
    >>> specs
    [P('model', None)]
    """
    paths, boxes, treedef, targets = state_leaf_ties(tree, plan, optimizer=optimizer, params=params)
    specs = [PartitionSpec() if getattr(unbox(b), "shape", None) is None  # a Python/numpy scalar
             else _leaf_spec(plan, unbox(b), t, path) for path, b, t in zip(paths, boxes, targets, strict=True)]
    return boxes, treedef, specs


def state_leaf_targets(tree: Any, plan: Plan, *, optimizer: Any = None,
                       params: Any = None) -> tuple[list[Any], Any, list[str | None]]:
    """(boxed leaves, treedef, the plan path each leaf belongs to or None), tied as :func:`state_leaf_specs` ties them."""
    return state_leaf_ties(tree, plan, optimizer=optimizer, params=params)[1:]


def state_leaf_ties(tree: Any, plan: Plan, *, optimizer: Any = None,
                    params: Any = None) -> tuple[list[str], list[Any], Any, list[str | None]]:
    """:func:`state_leaf_targets` with each leaf's own path in the state first (it names adafactor's moments)."""
    flat, treedef = check_state_leaves(tree)
    positional = None
    if is_lookahead_params(params):  # optax.lookahead's state mirrors the fast parameters only
        params = params.fast
    if optimizer is not None and params is not None:
        positional = _positional_matches(optimizer, tree, params)
    index = _suffix_index(plan)
    targets: list[str | None] = []
    for i, (path, box) in enumerate(flat):
        if getattr(unbox(box), "shape", None) is None:
            targets.append(None)
            continue
        target = index.get(positional[i]) if positional is not None and i in positional else None
        targets.append(target if target is not None else _match_nested(keystr(path), index))
    return [keystr(p) for p, _ in flat], [b for _, b in flat], treedef, targets


def check_state_leaves(tree: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """``tree_flatten_with_path`` of a state (boxes as leaves); TreeError naming non-array leaves.

    >>> check_state_leaves({"note": "x"})
    Traceback (most recent call last):
    tpflax._src.errors.TreeError: the state has leaves that are not arrays:
      - note: leaf of type str is not an array
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    problems = [f"{keystr(path)}: leaf of type {type(unbox(b)).__name__} is not an array"
                for path, b in flat if getattr(unbox(b), "shape", None) is None
                and not isinstance(unbox(b), (int, float, complex, bool, np.generic))]
    if problems:
        raise TreeError("the state has leaves that are not arrays", problems)
    return flat, treedef


def state_specs(tree: Any, plan: Plan, *, optimizer: Any = None, params: Any = None) -> Any:
    """PartitionSpec tree for a tree derived from the planned parameters (no mesh needed).

    Leaves are tied to parameters by ``optax.tree_map_params`` when
    ``optimizer`` and ``params`` are given and it applies, else by path: the
    state leaf's path ends with the parameter's (with or without the plan's
    linen collection, so states made from full variables or from
    ``variables["params"]`` both work).

    Args:
        tree: the state, concrete or abstract (``jax.eval_shape`` output).
        plan: the parameters' plan.
        optimizer: the optax optimizer that made the state (optional).
        params: the parameter tree the optimizer was initialised with (optional).

    >>> import jax, optax, tpflax
    >>> params = {"w": jax.ShapeDtypeStruct((8, 4), "float32")}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> state_specs(jax.eval_shape(optax.adam(1e-3).init, params), p)[0].mu["w"]
    P('model', None)
    """
    _, treedef, specs = state_leaf_specs(tree, plan, optimizer=optimizer, params=params)
    return jax.tree_util.tree_unflatten(treedef, specs)


def opt_state_problems(got: Any, want: Any, plan: Plan) -> list[str]:
    """Every leaf where optimizer state ``got`` differs from ``want`` (what the optimizer makes for the
    parameters it updates), named by path, shape and dtype, and by the planned leaf it belongs to
    when that leaf is one the optimizer does not update.

    >>> import jax, jax.numpy as jnp, optax, tpflax
    >>> w = {"w": jnp.ones((8, 4)), "n": jnp.zeros((), jnp.int32)}
    >>> p = tpflax.plan(w, {"model": 2})
    >>> tx = optax.sgd(0.1, momentum=0.9)
    >>> opt_state_problems(tx.init(w), tx.init(trainable(w)[0]), p)
    ['0/trace/n: shape () int32 is optimizer state of n (shape () int32), which is not trained']
    """
    def flat(tree: Any) -> dict[str, Any]:
        return {keystr(path): unbox(x) for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]}

    def form(x: Any) -> str:
        return f"shape {tuple(np.shape(x))} {getattr(x, 'dtype', type(x).__name__)}"

    got_leaves, want_leaves = flat(got), flat(want)
    index = _suffix_index(plan)
    problems = []
    for path, x in got_leaves.items():
        if path in want_leaves:
            continue
        target = _match_suffix(path, index)
        d = plan.decisions.get(target) if target is not None else None
        if d is not None and not d.trainable:
            problems.append(f"{path}: {form(x)} is optimizer state of {target} (shape {tuple(d.shape)} "
                            f"{d.dtype}), which is not trained")
        else:
            problems.append(f"{path}: {form(x)} is not in the optimizer state of the trained parameters")
    problems += [f"{path}: {form(x)} is missing" for path, x in want_leaves.items() if path not in got_leaves]
    if not problems:
        problems.append(f"the leaves agree but the containers differ: the state given is "
                        f"{_short(jax.tree_util.tree_structure(got))}, the optimizer makes "
                        f"{_short(jax.tree_util.tree_structure(want))}")
    return problems


def _short(treedef: Any, n: int = 300) -> str:
    text = str(treedef)
    return text if len(text) <= n else text[:n] + "..."


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


__all__ = ["abstract_params", "adapt_spec", "below_param", "check_state_leaves", "factored_dim", "init_shape", "is_lookahead_params", "kept_dims", "lookahead_quiet", "opt_state_problems",
           "optimizer_params", "params_collection", "planned_tree", "split_params", "state_leaf_specs", "state_leaf_targets",
           "state_leaf_ties", "state_specs", "takes_lookahead_params", "trainable"]
