"""Create parameters already sharded: ``jax.jit(init, out_shardings=...)``, in chunks."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpflax._src.apply.bind import bind_mesh, is_graph_node, leaf_count, plan_leaf_shardings
from tpflax._src.apply.stored import has_layouts, mark_stored, tree_layouts
from tpflax._src.errors import OptionError, SuggestError, TraceError
from tpflax._src.facts.tree import itemsize
from tpflax._src.hardware import parse_bytes
from tpflax._src.layout import to_storage
from tpflax._src.mesh import traced_under
from tpflax._src.planner.plan import Plan
from tpflax._src.planner.state import check_state_leaves

DEFAULT_CHUNK_BYTES = 32 << 20


def init_sharded(init_fn: Callable[..., Any], plan: Plan, mesh: Any = None, *args: Any,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, **kwargs: Any) -> Any:
    """Create parameters already sharded: no device ever holds the whole model.

    ``init_fn(*args, **kwargs)`` is traced abstractly, checked against the plan,
    then compiled with ``jax.jit(..., out_shardings=...)`` so each device computes
    only its own shards (random initialisers included: jax's threefry is
    partitionable).

    Args:
        init_fn: e.g. ``model.init`` (linen), or a function returning
            ``nnx.state(...)`` or an ``nnx.Module`` (a Module comes back merged).
        plan: the plan for the tree ``init_fn`` returns.
        mesh: the mesh (or a shape; defaults to the plan's).
        *args: positional arguments of ``init_fn`` (arrays: rng, sample inputs; Python numbers,
            bools, strings and None are closed over as static values, as ``kwargs`` are).
        chunk_bytes: compile the init as several programs, each creating leaves
            worth at most this many bytes per device (XLA drops the rest of the
            init from each). Random initialisers need ~3x their output in
            temporaries; one program for a whole model keeps several leaves'
            temporaries alive on every device at once (a number or ``"32MiB"``).
            None: one program.
        **kwargs: keyword arguments, closed over as static values (e.g. ``train=False``).

    Leaves with a ``Decision.layout`` (``plan(..., fused="aligned")``) come back in the stored
    order: :func:`tpflax.shard` of the plain init's output, bit for bit.

    Raises:
        PlanMismatchError: ``init_fn``'s output differs from the plan.
        TraceError: ``init_fn`` closes over an ``nnx.Rngs`` made outside it (create it inside,
            or pass it as a positional argument).

    An ``nnx.Rngs`` passed as a positional argument (or inside one: a dict, a tuple) is advanced as
    plain NNX advances it (``Model(rngs)``), every stream, so a second ``init_sharded`` with the same
    ``Rngs`` makes other weights.

    >>> import jax, flax.linen as nn, tpflax
    >>> model = nn.Dense(8)
    >>> x = jax.numpy.ones((1, 4))
    >>> p = tpflax.plan(jax.eval_shape(model.init, jax.random.key(0), x), {"model": 2},
    ...                 rules=[("kernel", "column")])
    >>> v = tpflax.init_sharded(model.init, p, tpflax.make_mesh({"model": 2}), jax.random.key(0), x)
    >>> v["params"]["kernel"].sharding.spec
    P(None, 'model')
    """
    mesh = bind_mesh(plan, mesh)
    if not callable(init_fn):
        raise OptionError(f"init_fn must be callable (e.g. model.init), got {type(init_fn).__name__}")
    chunk_bytes = _chunk_size(chunk_bytes)
    graphdefs: list[Any] = []

    def as_tree(*a):
        out = init_fn(*a, **kwargs)
        if is_graph_node(out):
            from flax import nnx

            graphdef, state = nnx.split(out)
            graphdefs[:] = [graphdef]
            return state
        check_state_leaves(out, what="the tree init_fn returned")
        return out

    # a positional Python number, bool, string or None (``init_sharded(f, plan, mesh, key, 16)``, a ``train``
    # flag) is closed over as kwargs are: traced, it was a bare TypeError from jax wherever it sets a shape
    static = {i: a for i, a in enumerate(args) if a is None or isinstance(a, (bool, int, float, complex, str))}
    init = as_tree
    if static:
        n = len(args)

        def init(*a):
            rest = iter(a)
            return as_tree(*(static[i] if i in static else next(rest) for i in range(n)))

        args = tuple(a for i, a in enumerate(args) if i not in static)
    # a model constraining with bare PartitionSpecs initialises under its mesh
    return traced_under(mesh, lambda: _init(init, graphdefs, plan, mesh, args, chunk_bytes))


def _init(as_tree: Callable[..., Any], graphdefs: list[Any], plan: Plan, mesh: Any, args: Sequence[Any],
          chunk_bytes: int | None) -> Any:
    """:func:`init_sharded`'s work, once the init function is wrapped (``as_tree``)."""
    from flax.errors import TraceContextError

    try:
        abstract = jax.eval_shape(as_tree, *args)
    except TraceContextError as e:  # an nnx.Rngs (or Module) made outside, mutated inside the trace
        raise TraceError(
            f"init_fn uses nnx state created outside it ({e}); create the nnx.Rngs inside the function "
            "(init_sharded(lambda: Model(nnx.Rngs(0)), plan, mesh)) or pass it as a positional argument "
            "(init_sharded(lambda rngs: Model(rngs), plan, mesh, rngs))") from e
    boxes, _, shards = plan_leaf_shardings(plan, mesh, abstract)
    flat_shards = [s for b, s in zip(boxes, shards, strict=True) for _ in range(leaf_count(b))]
    # head-aligned fused kernels are created in the stored order, inside the jitted init
    lays = tree_layouts(plan, abstract) if has_layouts(plan) else [None] * len(boxes)
    flat_lays = [lay for b, lay in zip(boxes, lays, strict=True) for _ in range(leaf_count(b))]
    out: list[Any] = [None] * len(flat_shards)
    # an nnx.Rngs argument is advanced as plain NNX advances it: the traced copy's state after the init
    # (the same from every chunk: each runs the whole init) is written back to the caller's
    # (every one among the arguments, nested in a dict or tuple too)
    # (one nnx.Rngs passed twice is one object inside the init too, as in plain NNX: jit would otherwise
    # copy it once per place, and both copies would draw the same keys)
    nodes, rest, rebuild = _shared_rngs(args)
    node_states: list[Any] = []
    for n, chunk in enumerate(_chunks(jax.tree_util.tree_leaves(abstract), flat_shards, chunk_bytes)):
        def chunk_init(traced, rest, chunk=chunk, first=n == 0):
            # the traced copies of the Rngs, before the init advances them
            leaves = jax.tree_util.tree_leaves(as_tree(*rebuild(traced, rest)))
            made = [leaves[i] if flat_lays[i] is None else to_storage(leaves[i], flat_lays[i]) for i in chunk]
            return made, [_node_state(r) for r in traced] if first else []

        replicated = NamedSharding(mesh, PartitionSpec())
        made, states = jax.jit(chunk_init, out_shardings=([flat_shards[i] for i in chunk], replicated))(nodes, rest)
        node_states = node_states or states
        for i, x in zip(chunk, made, strict=True):
            out[i] = x
    for node, state in zip(nodes, node_states, strict=True):
        _write_back(node, state)
    mark_stored(out, flat_lays)
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), out)
    if graphdefs:
        from flax import nnx

        return nnx.merge(graphdefs[0], tree)
    return tree


def _is_rngs(x: Any) -> bool:
    if not is_graph_node(x):
        return False
    from flax import nnx

    return isinstance(x, (nnx.Rngs, nnx.RngStream))


def _shared_rngs(args: Any) -> tuple[list[Any], list[Any], Callable[[Sequence[Any], Sequence[Any]], Any]]:
    """``(rngs, rest, rebuild)``: the distinct ``nnx.Rngs`` (and ``RngStream``) objects among ``args``, at any
    depth of their containers, the other leaves, and how to put ``args`` back together from (traced copies of)
    both, each Rngs at every place it was passed."""
    flat, treedef = jax.tree_util.tree_flatten(args, is_leaf=_is_rngs)
    rngs: list[Any] = []
    where: list[int | None] = []
    for x in flat:
        if _is_rngs(x):
            i = next((j for j, r in enumerate(rngs) if r is x), len(rngs))
            rngs[len(rngs):] = [x] if i == len(rngs) else []
            where.append(i)
        else:
            where.append(None)
    rest = [x for x, w in zip(flat, where, strict=True) if w is None]

    def rebuild(traced: Sequence[Any], others: Sequence[Any]) -> Any:
        it = iter(others)
        return treedef.unflatten([next(it) if w is None else traced[w] for w in where])

    return rngs, rest, rebuild


def _node_state(node: Any) -> Any:
    from flax import nnx

    return nnx.state(node)


def _write_back(node: Any, state: Any) -> None:
    """``node`` (the caller's nnx.Rngs) updated to ``state``, as uncommitted arrays on the default device
    like the ones plain NNX makes (the jitted init returned them replicated over the mesh)."""
    from flax import nnx

    def local(x: Any) -> Any:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.numpy.asarray(np.asarray(x))

    nnx.update(node, jax.tree_util.tree_map(local, state))


def _chunk_size(value: Any) -> int | None:
    """``chunk_bytes`` as bytes (``"32MiB"`` too); None or 0: one program."""
    if value is None or (isinstance(value, (numbers.Number, np.generic)) and value == 0):
        return None  # 0, 0.0, False, np.int64(0): one program, as before
    try:
        return parse_bytes(value, "chunk_bytes")
    except SuggestError as e:
        raise OptionError(f"{e}; or None for one program") from None


def _chunks(abstract: Sequence[Any], shards: Sequence[NamedSharding],
            chunk_bytes: int | None) -> list[list[int]]:
    """Consecutive leaf indices grouped to at most ``chunk_bytes`` per device each."""
    if not chunk_bytes:
        return [list(range(len(abstract)))]
    groups: list[list[int]] = [[]]
    size = 0
    for i, (a, s) in enumerate(zip(abstract, shards, strict=True)):
        local = math.prod(s.shard_shape(tuple(a.shape))) * itemsize(a.dtype)
        if groups[-1] and size + local > chunk_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += local
    return groups


__all__ = ["DEFAULT_CHUNK_BYTES", "init_sharded"]
