"""Place trees derived from the planned parameters: optimizer state, TrainState, nnx.Optimizer.

The specs come from :mod:`tpflax._src.planner.state` (pure, shared with the
cost model); this module binds them to a mesh and moves the arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from tpflax._src.apply import nnx as nnx_apply
from tpflax._src.apply.bind import bind_mesh, is_graph_node, match_plan, rebox_all
from tpflax._src.apply.put import check_values, put
from tpflax._src.apply.stored import (
    check_order,
    has_layouts,
    in_stored_order,
    mark_stored,
    tree_layouts,
)
from tpflax._src.errors import OptionError, PlanMismatchError
from tpflax._src.facts.tree import is_box, keystr, unbox, walk
from tpflax._src.planner.decision import require_plan
from tpflax._src.planner.params import abstract_params, optimizer_params, planned_tree
from tpflax._src.planner.plan import Plan
from tpflax._src.planner.state import (
    check_state_leaves,
    init_shape,
    lookahead_quiet,
    state_leaf_specs,
)


def state_shardings(tree: Any, plan: Plan, mesh: Any = None, *, optimizer: Any = None,
                    params: Any = None) -> Any:
    """``NamedSharding`` tree for any tree derived from the planned parameters.

    Optimizer states (any optax optimizer, chains, ``masked``,
    ``multi_transform``, ``MultiSteps``), ``TrainState``, ``nnx.Optimizer`` state,
    gradients, EMA copies: every leaf that belongs to a parameter gets that
    parameter's spec, carried over to its own shape (adafactor's factored
    moments lose the reduced dim's entry); scalars such as ``count`` and leaves
    belonging to no parameter are replicated. Leaves are tied to parameters by
    ``optax.tree_map_params`` when ``optimizer`` and ``params`` are given and
    it applies, else by path: the state leaf's path ends with the parameter's.

    Args:
        tree: the state, concrete or abstract (``jax.eval_shape`` output).
        plan: the parameters' plan.
        mesh: a ``jax.sharding.Mesh`` or ``AbstractMesh`` (or a shape), as for :func:`tpflax.shardings`.
        optimizer: the optax optimizer that made the state (optional).
        params: the parameter tree the optimizer was initialised with (optional).

    >>> import jax, optax, tpflax
    >>> params = {"w": jax.ShapeDtypeStruct((8, 4), "float32")}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> st = jax.eval_shape(optax.adam(1e-3).init, params)
    >>> s = state_shardings(st, p, tpflax.make_mesh({"model": 2}))
    >>> s[0].mu["w"].spec, s[0].count.spec
    (P('model', None), P())
    """
    mesh = bind_mesh(plan, mesh, abstract=True)  # shardings place nothing: an AbstractMesh will do
    _, treedef, specs = state_leaf_specs(tree, plan, optimizer=optimizer, params=params)
    return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def _init_shape(optimizer: Any, params: Any) -> Any:
    try:
        return init_shape(optimizer, params)
    except Exception:  # noqa: BLE001 - an init built for another tree (masks, labels): no match
        return None


_SHOWN = 5  # leaves named per side of a state that differs from what the optimizer makes


def _state_problems(got: Any, want: Any) -> list[str]:
    """Every leaf where ``got`` differs from ``want`` (paths, shapes); [] when the same."""
    if want is None:
        return ["optimizer.init fails on this parameter tree"]
    got_leaves = jax.tree_util.tree_flatten_with_path(got, is_leaf=is_box)[0]
    want_leaves = jax.tree_util.tree_flatten_with_path(want, is_leaf=is_box)[0]
    if len(got_leaves) != len(want_leaves):
        # name the leaves: a count alone leaves the caller to diff two optimizer states by hand
        got_paths = [keystr(path) for path, _ in got_leaves]
        want_paths = [keystr(path) for path, _ in want_leaves]
        got_set, want_set = set(got_paths), set(want_paths)
        missing = [q for q in want_paths if q not in got_set]
        extra = [q for q in got_paths if q not in want_set]
        out = [f"the state has {len(got_leaves)} leaves; optimizer.init on the planned parameters "
               f"makes {len(want_leaves)}"]
        out += [f"{q}: made for the planned parameters, missing from the state" for q in missing[:_SHOWN]]
        out += [f"{q}: in the state, not made for the planned parameters" for q in extra[:_SHOWN]]
        hidden = len(missing[_SHOWN:]) + len(extra[_SHOWN:])
        return out + ([f"... and {hidden} more"] if hidden else [])
    problems = []
    for (path, g), (wpath, w) in zip(got_leaves, want_leaves, strict=True):
        gs, ws = tuple(np.shape(unbox(g))), tuple(np.shape(unbox(w)))
        if keystr(path) != keystr(wpath):
            problems.append(f"{keystr(path)}: the planned parameters give {keystr(wpath)} here")
        elif gs != ws:
            problems.append(f"{keystr(path)}: shape {gs}, but the planned parameters give {ws}")
    return problems


def params_for_state(optimizer: Any, opt_state: Any, plan: Plan, params: Any = None) -> Any:
    """The parameter tree ``opt_state`` was made from: ``params``, the plan's params, or its full tree.

    A plan of full linen variables serves states made with
    ``optimizer.init(variables)`` and with ``optimizer.init(variables["params"])``.
    A state that none of them makes would silently fall back to replicated
    leaves (an OOM on a pod), so it is refused.

    Raises:
        TreeError: a state leaf is not an array.
        PlanMismatchError: naming every leaf that differs from what the
            optimizer makes for the planned parameters.
    """
    check_state_leaves(opt_state)  # a non-array leaf is the clearer error than a mismatch
    candidates = [abstract_params(plan)]
    if params is not None:  # its params collection, as the train step updates it; all of it (optimizer.init(variables))
        given = [abstract_params(plan, params), abstract_params(plan, params, collection=False)]
        same = jax.tree_util.tree_structure(given[0]) == jax.tree_util.tree_structure(given[1])
        candidates[:0] = given[:1] if same else given
    full = planned_tree(plan)
    tried_full = jax.tree_util.tree_structure(full) != jax.tree_util.tree_structure(candidates[-1])
    if tried_full:
        candidates.append(full)
    first = None
    for cand in candidates:
        problems = _state_problems(opt_state, _init_shape(optimizer, cand))
        if not problems:
            return cand
        first = first or problems
    raise PlanMismatchError(
        "the optimizer state was not made for the planned parameters (tried optimizer.init of the "
        f"{'given params, ' if params is not None else ''}planned params"
        f"{' and the full planned variables' if tried_full else ''}); "
        "re-create it with optimizer.init(params) or pass opt_state=None", first)


def _check_optimizer_args(call: str, optimizer: Any, plan: Any) -> None:
    """OptionError for arguments in the wrong places: a plan that is no Plan (the mesh, swapped with it), an
    optimizer with no ``init()`` (a state given first), named by type: a state's repr prints its arrays."""
    require_plan(plan, call, "make one with tpflax.plan(tree, mesh) or tpflax.Plan.from_json(text)")
    if is_graph_node(optimizer) or callable(getattr(optimizer, "init", None)):
        return
    state = isinstance(optimizer, tuple) or any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(optimizer))
    short = isinstance(optimizer, (str, int, float)) and len(repr(optimizer)) <= 60
    raise OptionError(f"{call}: optimizer {repr(optimizer) if short else 'a ' + type(optimizer).__name__} has no init()"
                      + (", an optimizer state by the look of it (the arguments swapped?)" if state else "")
                      + "; pass an optax GradientTransformation (e.g. optax.adamw(1e-3)) or an nnx.Optimizer "
                      f"(the order is {call})")


def optimizer_shardings(optimizer: Any, plan: Plan, mesh: Any = None, *, opt_state: Any = None,
                        params: Any = None) -> Any:
    """``NamedSharding`` tree for ``optimizer``'s state (for ``jax.jit`` in/out shardings).

    Args:
        optimizer: an optax ``GradientTransformation`` (or anything with ``init``), or an
            ``nnx.Optimizer`` / ``nnx.ModelAndOptimizer``: then the tree is shaped like
            ``nnx.state(optimizer)`` (as :func:`state_shardings` of it gives).
        plan: the parameters' plan.
        mesh: a ``jax.sharding.Mesh`` or ``AbstractMesh`` (or a shape), as for :func:`tpflax.shardings`.
        opt_state: the state (concrete or abstract); derived with
            ``jax.eval_shape(optimizer.init, params)`` when omitted. An ``nnx.Optimizer`` here is
            read as if given as ``optimizer``.
        params: the parameters (concrete or abstract); default: from the plan.

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"model": 2},
    ...                 rules=[("w", "row")])
    >>> optimizer_shardings(optax.sgd(0.1, momentum=0.9), p)[0].trace["w"].spec
    P('model', None)
    """
    _check_optimizer_args("optimizer_shardings(optimizer, plan, mesh)", optimizer, plan)
    if is_graph_node(opt_state):  # an nnx.Optimizer given as the state: its own (optax's state was made to fit it)
        optimizer = opt_state
    if is_graph_node(optimizer):  # it has no init(): its state holds what the optax state would
        from flax import nnx

        return state_shardings(nnx.state(optimizer), plan, mesh)
    if opt_state is None:
        abstract = abstract_params(plan, params)
        opt_state = init_shape(optimizer, abstract)
    else:
        abstract = params_for_state(optimizer, opt_state, plan, params)
    return state_shardings(opt_state, plan, mesh, optimizer=optimizer, params=abstract)


def shard_optimizer_state(optimizer: Any, opt_state: Any, plan: Plan, mesh: Any = None, *,
                          params: Any = None, order: str | None = None) -> Any:
    """Optimizer state on the mesh, its specs derived from the parameter specs.

    Args:
        optimizer: an optax ``GradientTransformation``, or an ``nnx.Optimizer``
            (then ``opt_state`` is ignored and a new, sharded ``nnx.Optimizer``
            is returned; the given one is untouched).
        opt_state: an existing state to place (made with ``optimizer.init`` of
            the planned tree, or of its ``params`` collection when full linen
            variables were planned), or None to create it sharded with
            ``jax.jit(optimizer.init, out_shardings=...)``. An ``nnx.Optimizer`` here is read as if
            given as ``optimizer``.
        plan: the parameters' plan.
        mesh: the mesh (or a shape).
        params: the parameters to initialise from when ``opt_state`` is None
            (needed by optimizers whose state copies the parameters, such as
            ``optax.contrib.schedule_free_adamw``); default: zeros of the planned shapes, which is
            what adam, adafactor, sgd and friends start from anyway. For ``optax.lookahead`` it may
            be the ``optax.LookaheadParams(fast, slow)`` pair (the state is the fast optimizer's
            either way: the slow copy is the step's second parameter tree).
        order: which order ``opt_state`` (or ``params``, or an ``nnx`` optimizer's state) is in when
            the plan stores fused kernels head-aligned (``plan(..., fused="aligned")``; ignored
            otherwise). ``"model"`` (as :func:`tpflax.shard` takes parameters): a state loaded from a
            checkpoint, or made by ``optimizer.init`` of unsharded parameters; its leaves tied to a
            laid-out parameter (adam's ``mu``/``nu``) are put into the stored order. ``"stored"``:
            made by ``optimizer.init`` of tpflax-placed parameters (``tpflax.shard``/``init_sharded``
            output), already stored; placed as it is. None (default): ``"stored"`` when the state
            holds arrays tpflax put into the stored order (the placed model of an
            ``nnx.ModelAndOptimizer(tpflax.shard(model, plan, mesh), tx)``, ``params=`` from
            ``tpflax.shard``), else ``"model"``. An optax state made from placed parameters holds
            new arrays, which cannot be told apart: pass ``order="stored"`` for it.

    Raises:
        PlanMismatchError: ``opt_state`` is not what ``optimizer.init`` makes
            for the planned parameters.
        OptionError: ``order="model"`` for a state (or ``params``) holding arrays tpflax already
            put into the stored order (moved again, they would be scrambled).

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"model": 2},
    ...                 rules=[("w", "row")])
    >>> st = shard_optimizer_state(optax.adam(1e-3), None, p, tpflax.make_mesh({"model": 2}))
    >>> st[0].nu["w"].sharding.spec
    P('model', None)
    """
    _check_optimizer_args("shard_optimizer_state(optimizer, opt_state, plan, mesh)", optimizer, plan)
    if is_graph_node(opt_state):  # shard_optimizer_state(tx, nnx_optimizer, ...): the nnx.Optimizer is the state
        optimizer, opt_state = opt_state, None
    if order is not None:
        check_order(order)
    laid = has_layouts(plan)
    if is_graph_node(optimizer):
        return nnx_apply.shard_module(optimizer, plan, mesh, derived=True, order=order)
    mesh = bind_mesh(plan, mesh)
    if opt_state is not None:
        made_from = params_for_state(optimizer, opt_state, plan, params)
        boxes, treedef, specs = state_leaf_specs(opt_state, plan, optimizer=optimizer, params=made_from)
        values = [unbox(b) for b in boxes]
        check_values(opt_state, values, what="the optimizer state")
        if laid:  # the moments of head-aligned kernels into the stored order
            lays = tree_layouts(plan, opt_state, optimizer=optimizer, params=made_from)
            values = in_stored_order(order, opt_state, values, lays)
        placed = put(values, [NamedSharding(mesh, s) for s in specs])
        if laid:
            mark_stored(placed, lays)
        return rebox_all(boxes, placed, treedef)
    abstract = abstract_params(plan, params)
    out_shardings = optimizer_shardings(optimizer, plan, mesh, params=abstract)
    if params is not None:  # the float leaves, as abstract_params sees them
        start = optimizer_params(plan, params)
        if laid:  # in the model's order: initialise from the stored one, moved where it is (bit-exact)
            boxes, treedef = jax.tree_util.tree_flatten(start, is_leaf=is_box)
            values, lays = [unbox(b) for b in boxes], tree_layouts(plan, start)
            start = rebox_all(boxes, in_stored_order(order, start, values, lays), treedef)
        with lookahead_quiet():
            return jax.jit(optimizer.init, out_shardings=out_shardings)(start)

    def init_from_zeros():
        return optimizer.init(jax.tree_util.tree_map(lambda s: jax.numpy.zeros(s.shape, s.dtype), abstract))

    with lookahead_quiet():
        return jax.jit(init_from_zeros, out_shardings=out_shardings)()


def train_state_shardings(state: Any, plan: Plan, mesh: Any = None) -> Any:
    """``NamedSharding`` tree for a ``flax.training.train_state.TrainState`` (or abstract one).

    ``params`` take the plan's specs, ``opt_state`` is derived through
    ``state.tx``, ``step`` is replicated.
    """
    return state_shardings(state, plan, mesh, optimizer=getattr(state, "tx", None),
                           params=getattr(state, "params", None))


def shard_train_state(state: Any, plan: Plan, mesh: Any = None, *, order: str | None = None) -> Any:
    """A ``TrainState`` placed on the mesh: params per plan, optimizer state derived, step replicated.

    ``state.params`` is checked against the plan first (the planned tree, or
    its ``params`` collection; a mismatch raises PlanMismatchError and nothing
    is placed). ``order``: as for :func:`shard_optimizer_state`; with ``"model"`` the
    head-aligned kernels of a ``plan(..., fused="aligned")`` and the optimizer moments tied to
    them are put into the stored order, as :func:`tpflax.shard` puts the parameters; None
    (default): ``"stored"`` when ``state.params`` holds arrays tpflax placed, else ``"model"``.

    >>> import jax, jax.numpy as jnp, optax, tpflax
    >>> from flax.training import train_state
    >>> params = {"w": jnp.ones((8, 4))}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> ts = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
    >>> shard_train_state(ts, p, tpflax.make_mesh({"model": 2})).opt_state[0].mu["w"].sharding.spec
    P('model', None)
    """
    mesh = bind_mesh(plan, mesh)
    params = getattr(state, "params", None)
    if params is not None:
        match_plan(plan, walk(params)[0])
    tx = getattr(state, "tx", None)
    boxes, treedef, specs = state_leaf_specs(state, plan, optimizer=tx, params=params)
    values = [unbox(b) for b in boxes]
    check_values(state, values, what="the train state")
    laid = has_layouts(plan)
    if order is not None:
        check_order(order)
    if laid:
        lays = tree_layouts(plan, state, optimizer=tx, params=params)
        values = in_stored_order(order, state, values, lays)
    placed = put(values, [NamedSharding(mesh, s) for s in specs])
    if laid:
        mark_stored(placed, lays)
    return rebox_all(boxes, placed, treedef)


__all__ = ["optimizer_shardings", "params_for_state", "shard_optimizer_state", "shard_train_state",
           "state_shardings", "train_state_shardings"]
