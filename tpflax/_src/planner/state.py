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
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from tpflax._src.errors import TreeError
from tpflax._src.facts.tree import (
    COLLECTIONS,
    is_box,
    keystr,
    unbox,
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
    dims but one dropped), a ``keepdims`` statistic; or the parameter behind leading dims of its own
    (optax.lbfgs's history of differences, whose leading dims are whole). Same rank: dim by dim, equal sizes keep. Fewer
    dims: when several ways fit (a square kernel), the leaf's state ``path`` says which: adafactor's
    ``v_row`` / ``v_col`` (:func:`factored_dim`), or ``below`` (the path under the parameter's in the
    state) an integer ``k``, a list holding one leaf per parameter dim (SM3's); else the way that
    reduces fewest dims to 1 and drops the earliest.

    >>> kept_dims((64, 64), (64,), "0/mu/w/1", below="1"), kept_dims((64, 64), (64,), "0/mu/w/0", below="0")
    ((1,), (0,))
    >>> kept_dims((16, 4, 8), (4,)), kept_dims((16, 4, 8), (1, 4, 1)), kept_dims((16, 4), (5,))
    ((1,), (None, 1, None), None)
    >>> kept_dims((16, 4), (10, 16, 4)), kept_dims((16, 4), (16, 4, 10))  # a history of the parameter: lbfgs's
    ((None, 0, 1), None)
    """
    pshape, shape = tuple(pshape), tuple(shape)
    if len(shape) == len(pshape):
        return tuple(k if a == b else None for k, (a, b) in enumerate(zip(shape, pshape, strict=True)))
    if len(shape) > len(pshape):
        # the parameter behind leading dims of its own: a history of it (optax.lbfgs's
        # ``(memory_size, *param.shape)`` differences), one copy per step or per model
        extra = len(shape) - len(pshape)
        return (None,) * extra + tuple(range(len(pshape))) if pshape and shape[extra:] == pshape else None
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


def _match_nested(path: str, index: Mapping[str, str], roots: Mapping[str, int] | None = None) -> str | None:
    """:func:`_match_suffix` of ``path``, else of ``path`` without its last components: a leaf
    nested under a parameter's path (SM3 keeps a list of per-dim accumulators for each parameter)."""
    cur = path
    while True:
        found = _match_suffix(cur, index, roots)
        if found is not None or "/" not in cur:
            return found
        cur = cur.rsplit("/", 1)[0]


def _match_suffix(path: str, index: Mapping[str, str], roots: Mapping[str, int] | None = None) -> str | None:
    """The plan path that is a '/'-aligned suffix of ``path``: the one under the prefix that most state
    leaves end in a plan path under (``roots``, from :func:`_mirror_roots`), then the longest.

    A state mirrors the parameter tree under a prefix (adam's ``0/mu``), so with params ``mu/w`` and ``w``,
    ``0/mu/w`` is the moment of ``w`` (under ``0/mu``, where ``mu/w`` is mirrored too), not of ``mu/w``.

    >>> index = {"w": "w", "mu/w": "mu/w"}
    >>> _match_suffix("0/mu/w", index), _match_suffix("0/mu/w", index, _mirror_roots(["0/mu/w", "0/mu/mu/w"], index))
    ('mu/w', 'w')
    """
    parts = path.split("/")
    best: tuple[int, int] | None = None
    found = None
    for k in range(len(parts)):
        rest = "/".join(parts[k:])
        if rest in index:
            rank = ((roots or {}).get("/".join(parts[:k]), 0), len(parts) - k)
            if best is None or rank > best:
                best, found = rank, index[rest]
    return found


def _mirror_roots(paths: list[str], index: Mapping[str, str]) -> dict[str, int]:
    """{prefix: how many of ``paths`` are a plan path under it}: where a state mirrors the parameters."""
    roots: dict[str, int] = {}
    for path in paths:
        parts = path.split("/")
        for k in range(len(parts)):
            if "/".join(parts[k:]) in index:
                prefix = "/".join(parts[:k])
                roots[prefix] = roots.get(prefix, 0) + 1
    return roots


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
    roots = _mirror_roots([keystr(p) for p, b in flat if getattr(unbox(b), "shape", None) is not None], index)
    targets: list[str | None] = []
    for i, (path, box) in enumerate(flat):
        if getattr(unbox(box), "shape", None) is None:
            targets.append(None)
            continue
        target = index.get(positional[i]) if positional is not None and i in positional else None
        targets.append(target if target is not None else _match_nested(keystr(path), index, roots))
    return [keystr(p) for p, _ in flat], [b for _, b in flat], treedef, targets


def check_state_leaves(tree: Any, what: str = "the state") -> tuple[list[tuple[Any, Any]], Any]:
    """``tree_flatten_with_path`` of a state (boxes as leaves); TreeError naming non-array leaves (``what``: how
    the message names the tree).

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
        raise TreeError(f"{what} has leaves that are not arrays", problems)
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
    >>> from tpflax._src.planner.params import trainable
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


__all__ = ["adapt_spec", "below_param", "check_state_leaves", "factored_dim", "init_shape", "is_lookahead_params", "kept_dims", "lookahead_quiet",
           "opt_state_problems", "state_leaf_specs", "state_leaf_targets", "state_leaf_ties", "state_specs", "takes_lookahead_params"]
