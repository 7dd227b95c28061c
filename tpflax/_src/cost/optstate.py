"""The optimizer state: its shapes (once per model) and its specs (per plan).

``jax.eval_shape(optimizer.init, params)`` runs once on the unsharded abstract
parameters. Which parameter dim each state dim follows is read once from the
one derivation of optimizer-state specs (``state_specs``, shared with the code
that places the state), by asking it about a probe plan whose every parameter
dim is split over its own size-1 axis. Any plan of the same tree then gives
each state leaf its parameter's entries on the dims it follows: pure lookups,
no optax call per mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tpflax._src.errors import EstimateError
from tpflax._src.facts.tree import itemsize
from tpflax._src.mesh import MeshShape
from tpflax._src.planner.params import optimizer_params
from tpflax._src.planner.state import init_shape, state_specs, takes_lookahead_params
from tpflax._src.specs import Entry, bytes_per_device, entries


def _abstract_state(plan, optimizer: Any, params: Any = None) -> tuple[Any, Any]:
    """``(abstract optimizer state, the abstract params it was made for)``."""
    if params is None:
        params = optimizer_params(plan)
    try:
        return init_shape(optimizer, params), params
    except Exception as e:  # noqa: BLE001 - any optax failure is the user's optimizer/params mismatch
        raise EstimateError(f"optimizer.init failed on the planned parameters: {type(e).__name__}: {e}; "
                            "pass an optax.GradientTransformation built for this parameter tree") from e


def opt_state_specs(plan, optimizer, params: Any = None) -> tuple[Any, Any]:
    """The optimizer state's shapes and a PartitionSpec for each of its leaves.

    State leaves shaped like their parameter take its spec; factored moments
    (adafactor's row/column statistics) keep the entries of the dims they kept;
    step counts and other scalars are replicated.

    Args:
        plan: the plan.
        optimizer: an ``optax.GradientTransformation``.
        params: the parameter tree (abstract is fine); defaults to the plan's.

    Returns:
        ``(abstract state, spec tree)``.

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"params": {"w": jax.ShapeDtypeStruct((8, 8), "float32")}}, {"model": 2},
    ...                 rules=[("w", "column")])
    >>> state, specs = opt_state_specs(p, optax.adam(1e-3))
    >>> tuple(specs[0].mu["w"])
    (None, 'model')
    """
    state, params = _abstract_state(plan, optimizer, params)
    return state, state_specs(state, plan, optimizer=optimizer, params=params)


@dataclass(frozen=True)
class OptLeaf:
    """One optimizer-state leaf: shape, bytes per element, and per dim the (param path, dim) it follows."""

    shape: tuple[int, ...]
    itemsize: int
    follows: tuple[tuple[str, int] | None, ...]


@dataclass(frozen=True)
class OptLayout:
    """The optimizer state of one model, independent of the mesh."""

    leaves: tuple[OptLeaf, ...]

    @property
    def full_bytes(self) -> int:
        return sum(math.prod(x.shape) * x.itemsize for x in self.leaves)


class _Ones(dict):
    """Mesh sizes of the probe: every axis has size 1, so no entry is dropped for divisibility."""

    def __missing__(self, key: str) -> int:
        return 1


@dataclass(frozen=True)
class _ProbeMesh:
    sizes: Mapping[str, int]


def opt_layout(plan, optimizer: Any, params: Any = None) -> OptLayout:
    """Which parameter dim every optimizer-state dim follows, for any plan of ``plan``'s tree.

    ``optax.lookahead``'s slow copy of the parameters counts with its state: the train step keeps it
    beside the fast parameters (:func:`tpflax.make_train_step`), placed like them.

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"data": 1})
    >>> [x.follows for x in opt_layout(p, optax.adam(1e-3)).leaves]
    [(), (('w', 0), ('w', 1)), (('w', 0), ('w', 1))]
    """
    import jax
    from jax.sharding import PartitionSpec

    state, params = _abstract_state(plan, optimizer, params)
    paths = list(plan.decisions)
    probe = replace(plan, mesh=_ProbeMesh(_Ones()), decisions={
        path: replace(d, spec=PartitionSpec(*(f"#{i}.{k}" for k in range(len(d.shape)))))
        for i, (path, d) in enumerate(plan.decisions.items())})
    specs = state_specs(state, probe, optimizer=optimizer, params=params)
    s_leaves = jax.tree_util.tree_leaves(state)
    p_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if takes_lookahead_params(state):  # the slow copy: the parameters again, tied by path
        s_leaves += jax.tree_util.tree_leaves(params)
        p_leaves += jax.tree_util.tree_leaves(state_specs(params, probe),
                                              is_leaf=lambda x: isinstance(x, PartitionSpec))
    out = []
    for leaf, spec in zip(s_leaves, p_leaves, strict=True):
        shape = tuple(int(s) for s in leaf.shape)
        follows = tuple(_follow(e, paths) for e in entries(spec, len(shape)))
        out.append(OptLeaf(shape, itemsize(leaf.dtype), follows))
    return OptLayout(tuple(out))


def _follow(entry: Entry, paths: Sequence[str]) -> tuple[str, int] | None:
    if not isinstance(entry, str):
        return None
    i, k = entry[1:].split(".")
    return paths[int(i)], int(k)


def opt_entries(layout: OptLayout, spec_of: Mapping[str, tuple[Entry, ...]]) -> list[tuple[Entry, ...]]:
    """Each state leaf's spec entries under a plan (``spec_of``: param path -> its entries).

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"model": 2}, rules=[("w", "row")])
    >>> opt_entries(opt_layout(p, optax.adam(1e-3)), {"w": ("model", None)})
    [(), ('model', None), ('model', None)]
    """
    return [tuple(spec_of[f[0]][f[1]] if f is not None else None for f in x.follows) for x in layout.leaves]


@functools.lru_cache(maxsize=1 << 16)
def shard_bytes(shape: tuple[int, ...], item: int, spec: tuple[Entry, ...], mesh: MeshShape) -> int:
    """:func:`tpflax._src.specs.bytes_per_device`, cached: repeated layers repeat these arguments.

    >>> from tpflax._src.mesh import mesh_shape
    >>> shard_bytes((10, 4), 4, ("model", None), mesh_shape({"model": 4}))  # ceil(10 / 4) rows
    48
    """
    return bytes_per_device(shape, item, spec, mesh)
