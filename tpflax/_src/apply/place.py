"""Apply a plan: arrays placed on a real mesh that train under ``jax.jit``.

This is the converter. A :class:`~tpflax.plan.Plan` becomes

* ``NamedSharding`` trees (:func:`shardings`, :func:`state_shardings`,
  :func:`optimizer_shardings`, :func:`batch_sharding`),
* arrays on the mesh (:func:`shard`, :func:`init_sharded`,
  :func:`shard_optimizer_state`, :func:`shard_train_state`, :func:`shard_batch`),
  and back on the host (:func:`unshard`),
* sharding constraints inside a traced step (:func:`constrain`,
  :func:`constrain_batch`) and a jitted step with in/out shardings and donation
  (:func:`jit_step`).

Everything is validated before the first byte moves: a tree that does not match
the plan, a mesh of another shape, or too few devices raise a
:class:`~tpflax.errors.TpflaxError` and nothing is placed halfway. The caller's
tree is never modified (unless ``donate=True`` is asked for).

Placement works with ``jax.process_count() > 1``: a leaf whose sharding spans
devices of other processes is built with ``jax.make_array_from_callback`` from
the slices this process's devices hold, so each process supplies only its
addressable shards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpflax._src.errors import OptionError, PlanMismatchError, SpecError, TpflaxWarning, TreeError
from tpflax._src.facts.tree import COLLECTIONS, is_box, keystr, unbox, walk
from tpflax._src.mesh import DATA, FSDP, _pairs, make_mesh, mesh_shape
from tpflax._src.planner.plan import Plan, check_tree_matches
from tpflax._src.specs import entries, entry_axes, to_pspec

# ---------------------------------------------------------------------------
# meshes


def check_mesh(plan: Plan, mesh: Any) -> None:
    """Raise PlanMismatchError if ``mesh`` differs from the plan's mesh shape."""
    got = [(str(n), int(v)) for n, v in _pairs(mesh)]  # names and sizes only: roles are the plan's
    if tuple(got) != tuple(plan.mesh.axes):
        raise PlanMismatchError(
            f"the mesh {dict(got)} differs from the plan's mesh {plan.mesh.sizes}; build it with "
            f"tpflax.make_mesh({plan.mesh.sizes}) or re-plan for this mesh")


def _mesh_for(plan: Plan, mesh: Any) -> jax.sharding.Mesh:
    """A concrete mesh matching the plan: builds one from a shape (DeviceError if too few devices)."""
    if not isinstance(plan, Plan):
        raise OptionError(
            f"expected a tpflax.Plan, got {type(plan).__name__}; make one with tpflax.plan(tree, mesh) or "
            "tpflax.Plan.from_json(text) (the order is shard(tree, plan, mesh), shardings(plan, mesh))")
    if mesh is None:
        mesh = plan.mesh.sizes
    if isinstance(mesh, jax.sharding.AbstractMesh):
        raise PlanMismatchError(
            "an AbstractMesh has no devices to place arrays on; pass a jax.sharding.Mesh, e.g. "
            f"tpflax.make_mesh({plan.mesh.sizes})")
    if not isinstance(mesh, jax.sharding.Mesh):
        check_mesh(plan, mesh)
        mesh = make_mesh(mesh)
    check_mesh(plan, mesh)
    return mesh


def _as_mesh(mesh: Any) -> jax.sharding.Mesh:
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    return make_mesh(mesh)


# ---------------------------------------------------------------------------
# boxes: flax metadata and nnx Variables keep their wrapper, with a new value


def _rebox(box: Any, value: Any) -> Any:
    """``box`` with its array replaced by ``value`` (a new object; ``box`` is untouched)."""
    if not is_box(box):
        return value
    from flax.core import meta

    if isinstance(box, meta.AxisMetadata):
        return box.replace_boxed(value)
    return box.replace(value)  # nnx.Variable.replace returns a copy with the new value


def _leaf_count(box: Any) -> int:
    """How many array leaves a full flatten yields for one walked leaf (1 for every flax box)."""
    return len(jax.tree_util.tree_leaves(box)) if is_box(box) else 1


def _nnx_graph_node(x: Any) -> bool:
    """True for nnx Modules / Optimizers: objects to split, place and merge back."""
    try:
        from flax import nnx
    except Exception:  # noqa: BLE001 - flax without nnx
        return False
    return isinstance(x, (nnx.Module, nnx.Optimizer)) or (
        hasattr(nnx, "Pytree") and isinstance(x, nnx.Pytree) and not isinstance(x, nnx.State))


# ---------------------------------------------------------------------------
# sharding trees


def shardings(plan: Plan, mesh: Any, tree: Any = None) -> Any:
    """A ``NamedSharding`` tree for the plan on ``mesh``.

    Args:
        plan: the plan.
        mesh: a ``jax.sharding.Mesh`` (or a shape, to build one with :func:`make_mesh`).
        tree: lay the shardings out on this tree (matched by path); defaults to
            ``plan.specs``' own structure.

    Raises:
        PlanMismatchError: the mesh or the tree differs from the plan.
        DeviceError: a mesh shape needs more devices than there are.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 1})
    >>> shardings(p, tpflax.make_mesh({"model": 1}))["w"].spec
    P(None, None)
    """
    mesh = _mesh_for(plan, mesh)
    specs = plan.specs if tree is None else plan.specs_for(tree)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def _plan_leaf_shardings(plan: Plan, mesh: jax.sharding.Mesh, tree: Any):
    """(boxed leaves, boxed treedef, one NamedSharding per leaf) for a tree that must match the plan."""
    leaves, treedef = walk(tree)
    check_tree_matches(plan, leaves)
    boxes = treedef.flatten_up_to(tree)
    return boxes, treedef, [NamedSharding(mesh, plan.decisions[x.path].spec) for x in leaves]


# ---------------------------------------------------------------------------
# placement


def _host_value(x: Any) -> Any:
    """A host array to slice per shard: numpy (memmaps stay lazy) or a gathered jax array."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, jax.Array):
        return np.asarray(jax.device_get(x))
    return np.asarray(x)


def _from_callback(x: Any, sharding: NamedSharding) -> jax.Array:
    """Build a global array from the slices this process's devices hold (the multi-host path)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # typed PRNG keys have no numpy form: place their key data (one trailing dim more), rewrap
        data = _from_callback(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = _host_value(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index]))


def _needs_callback(x: Any, sharding: NamedSharding) -> bool:
    if isinstance(x, np.memmap):
        return True  # read only the slices each device holds, never the whole file
    if sharding.is_fully_addressable:
        return False
    # A global array that spans processes already: device_put reshards it collectively.
    return not (isinstance(x, jax.Array) and not x.is_fully_addressable)


def _put(values: Sequence[Any], shards: Sequence[NamedSharding], *, per_shard: bool = False,
         donate: bool = False) -> list[jax.Array]:
    """Place every value on its sharding; one batched ``jax.device_put`` for the local ones.

    ``per_shard=True`` builds every leaf with ``jax.make_array_from_callback``
    even on one host (what multi-host placement does everywhere).
    """
    out: list[Any] = [None] * len(values)
    batch_idx = []
    for i, (x, s) in enumerate(zip(values, shards, strict=True)):
        if per_shard or _needs_callback(x, s):
            out[i] = _from_callback(x, s)
        else:
            batch_idx.append(i)
    if batch_idx:
        placed = jax.device_put([values[i] for i in batch_idx], [shards[i] for i in batch_idx],
                                donate=donate)
        for i, a in zip(batch_idx, placed, strict=True):
            out[i] = a if donate else _unalias(values[i], a)
    return out


def _unalias(src: Any, out: jax.Array) -> jax.Array:
    """``out`` with no buffer shared with ``src``.

    ``jax.device_put`` (even with ``may_alias=False``, jax 0.10) reuses the
    source buffer for the shard on the source's own device. Donating the placed
    tree in a step would then delete the caller's array: copy those shards.
    """
    if not isinstance(src, jax.Array) or not src.is_fully_addressable:
        return out
    src_ptrs = {s.data.unsafe_buffer_pointer() for s in src.addressable_shards}
    shards = out.addressable_shards
    if not any(s.data.unsafe_buffer_pointer() in src_ptrs for s in shards):
        return out
    arrays = [s.data.copy() if s.data.unsafe_buffer_pointer() in src_ptrs else s.data for s in shards]
    return jax.make_array_from_single_device_arrays(out.shape, out.sharding, arrays)


def shard(tree: Any, plan: Plan, mesh: Any = None, *, per_shard: bool = False,
          donate: bool = False, check_finite: bool | None = None) -> Any:
    """Place an existing tree on the mesh, bit-exact, laid out as the plan says.

    Args:
        tree: the tree that was planned (params, full linen variables, a boxed
            tree, ``nnx.State``) holding numpy or jax arrays, or an ``nnx.Module``
            (split, placed, merged back into a new module).
        plan: the plan.
        mesh: a ``jax.sharding.Mesh`` of the plan's shape, or a shape to build one;
            defaults to the plan's mesh over the first devices.
        per_shard: build every leaf from per-device host slices with
            ``jax.make_array_from_callback``. Always done for leaves whose
            sharding spans other processes, and for ``np.memmap`` leaves (only
            the slices are read).
        donate: let jax reuse the input buffers (the input arrays are deleted).
        check_finite: warn (:class:`tpflax.TpflaxWarning`) about float leaves
            holding NaN or inf; they are still placed exactly as given. None
            (default): check values already in host memory (numpy, and jax arrays
            on CPU devices); True: also arrays on accelerators (one reduction
            per leaf); False: skip.

    Returns:
        A new tree of the same structure (flax boxes and nnx Variables kept)
        whose arrays carry ``NamedSharding(mesh, plan spec)``.

    Raises:
        PlanMismatchError: the tree's paths, shapes or dtypes, or the mesh,
            differ from the plan. Nothing is placed.
        TreeError: a leaf was deleted (donated), or is 64-bit while
            ``jax_enable_x64`` is off (jax would cast it, losing bits).
        DeviceError: too few devices for a mesh given as a shape.

    >>> import jax.numpy as jnp, tpflax
    >>> params = {"w": jnp.ones((8, 4))}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> tpflax.shard(params, p, tpflax.make_mesh({"model": 2}))["w"].sharding.spec
    P('model', None)
    """
    if _nnx_graph_node(tree):
        from tpflax._src.apply import nnx as nnx_apply

        return nnx_apply.shard_module(tree, plan, mesh, per_shard=per_shard)
    mesh = _mesh_for(plan, mesh)
    boxes, treedef, shards = _plan_leaf_shardings(plan, mesh, tree)
    values = [unbox(b) for b in boxes]
    problems = _value_problems(tree, values)
    if problems:  # raised before anything moves: never a partially placed tree
        raise TreeError("the tree cannot be placed bit-exact", problems)
    if check_finite is not False:
        _warn_nonfinite(tree, values, everywhere=bool(check_finite))
    placed = _put(values, shards, per_shard=per_shard, donate=donate)
    return jax.tree_util.tree_unflatten(treedef, [_rebox(b, v) for b, v in zip(boxes, placed,
                                                                               strict=True)])


def _value_problems(tree: Any, values: Sequence[Any]) -> list[str]:
    """Leaves that cannot be placed bit-exact: deleted arrays, 64-bit values jax would narrow."""
    suspects = [i for i, x in enumerate(values) if isinstance(x, (jax.Array, np.ndarray, np.generic))
                and (x.is_deleted() if isinstance(x, jax.Array)
                     else jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype)]
    if not suspects:
        return []
    leaves, _ = walk(tree)  # paths for the message; walked only when something is wrong
    problems = []
    for i in suspects:
        leaf, x = leaves[i], values[i]
        if isinstance(x, jax.Array):
            problems.append(f"{leaf.path}: the array (shape {leaf.shape}) was deleted, e.g. donated to a "
                            "jitted step; pass the step's output or a live copy")
        else:
            canon = jax.dtypes.canonicalize_dtype(x.dtype)
            problems.append(
                f"{leaf.path}: {x.dtype} array of shape {leaf.shape} would become {canon} on device "
                f"(jax_enable_x64 is off), losing bits; cast it with .astype('{canon}') and re-plan, "
                "or enable jax.config.update('jax_enable_x64', True)")
    return problems


def _warn_nonfinite(tree: Any, values: Sequence[Any], *, everywhere: bool) -> None:
    """Warn once, naming every float leaf that holds NaN or inf."""
    import warnings

    bad = []
    for i, x in enumerate(values):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jax.dtypes.issubdtype(dtype, np.inexact) or not np.size(x):
            continue
        if isinstance(x, jax.Array):
            on_host = x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set)
            if not on_host:
                if everywhere:
                    n = int(jax.numpy.sum(~jax.numpy.isfinite(x)))
                    if n:
                        bad.append((i, n))
                continue
        with np.errstate(invalid="ignore"):  # NaN is what we are counting, not an error
            n = np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x)))
        if n:
            bad.append((i, n))
    if bad:
        leaves, _ = walk(tree)
        bad = [f"{leaves[i].path} (shape {leaves[i].shape}, {leaves[i].dtype}): {n} NaN/inf value(s)"
               for i, n in bad]
        warnings.warn("placing leaves that hold NaN or inf, bit-exact as given (check the checkpoint or the "
                      "init if this is unexpected; check_finite=False skips this check): "
                      + "; ".join(bad), TpflaxWarning, stacklevel=3)


def unshard(tree: Any) -> Any:
    """Gather every array of ``tree`` back to host numpy, bit-exact.

    Works on any tree (params, optimizer state, boxed trees, ``nnx.State``) and on
    an ``nnx.Module`` (its ``nnx.State`` is returned). Arrays that span several
    processes are all-gathered, so every process gets the full values.

    >>> import jax.numpy as jnp
    >>> unshard({"w": jnp.arange(3)})["w"]
    array([0, 1, 2], dtype=int32)
    """
    if _nnx_graph_node(tree):
        from flax import nnx

        tree = nnx.state(tree)
    boxes, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_box)
    return jax.tree_util.tree_unflatten(treedef, [_rebox(b, _gather(unbox(b))) for b in boxes])


def _gather(x: Any) -> Any:
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x  # typed PRNG keys have no numpy form; keep the jax array
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    if isinstance(x, np.ndarray):
        return x.copy()
    return x


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
        *args: positional arguments of ``init_fn`` (arrays: rng, sample inputs).
        chunk_bytes: compile the init as several programs, each creating leaves
            worth at most this many bytes per device (XLA drops the rest of the
            init from each). Random initialisers need ~3x their output in
            temporaries; one program for a whole model keeps several leaves'
            temporaries alive on every device at once. None: one program.
        **kwargs: keyword arguments, closed over as static values (e.g. ``train=False``).

    Raises:
        PlanMismatchError: ``init_fn``'s output differs from the plan.

    >>> import jax, flax.linen as nn, tpflax
    >>> model = nn.Dense(8)
    >>> x = jax.numpy.ones((1, 4))
    >>> p = tpflax.plan(jax.eval_shape(model.init, jax.random.key(0), x), {"model": 2},
    ...                 rules=[("kernel", "column")])
    >>> v = tpflax.init_sharded(model.init, p, tpflax.make_mesh({"model": 2}), jax.random.key(0), x)
    >>> v["params"]["kernel"].sharding.spec
    P(None, 'model')
    """
    mesh = _mesh_for(plan, mesh)
    if not callable(init_fn):
        raise OptionError(f"init_fn must be callable (e.g. model.init), got {type(init_fn).__name__}")
    graphdefs: list[Any] = []

    def as_tree(*a):
        out = init_fn(*a, **kwargs)
        if _nnx_graph_node(out):
            from flax import nnx

            graphdef, state = nnx.split(out)
            graphdefs[:] = [graphdef]
            return state
        return out

    abstract = jax.eval_shape(as_tree, *args)
    boxes, _, shards = _plan_leaf_shardings(plan, mesh, abstract)
    flat_shards = [s for b, s in zip(boxes, shards, strict=True) for _ in range(_leaf_count(b))]
    full_treedef = jax.tree_util.tree_structure(abstract)

    flat_abstract = jax.tree_util.tree_leaves(abstract)
    out: list[Any] = [None] * len(flat_shards)
    for chunk in _chunks(flat_abstract, flat_shards, chunk_bytes):
        def chunk_init(*a, chunk=chunk):
            leaves = jax.tree_util.tree_leaves(as_tree(*a))
            return [leaves[i] for i in chunk]

        made = jax.jit(chunk_init, out_shardings=[flat_shards[i] for i in chunk])(*args)
        for i, x in zip(chunk, made, strict=True):
            out[i] = x
    tree = jax.tree_util.tree_unflatten(full_treedef, out)
    if graphdefs:
        from flax import nnx

        return nnx.merge(graphdefs[0], tree)
    return tree


def _chunks(abstract: Sequence[Any], shards: Sequence[NamedSharding],
            chunk_bytes: int | None) -> list[list[int]]:
    """Consecutive leaf indices grouped to at most ``chunk_bytes`` per device each."""
    if not chunk_bytes:
        return [list(range(len(abstract)))]
    groups: list[list[int]] = [[]]
    size = 0
    for i, (a, s) in enumerate(zip(abstract, shards, strict=True)):
        local = math.prod(s.shard_shape(tuple(a.shape))) * np.dtype(a.dtype).itemsize
        if groups[-1] and size + local > chunk_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += local
    return groups


# ---------------------------------------------------------------------------
# derived trees: optimizer state, TrainState, nnx.Optimizer


def _adapt(spec: PartitionSpec, pshape: tuple[int, ...], shape: tuple[int, ...],
           sizes: Mapping[str, int]) -> PartitionSpec:
    """The parameter's spec carried over to a leaf derived from it, whose shape may differ.

    Same shape: the same spec. Same rank: dims of equal size keep their entry.
    One dim fewer (adafactor's factored moments drop a reduced dim): the dropped
    dim's entry goes. Anything else, or an entry that would not divide: replicated.
    """
    ent = entries(spec, len(pshape))
    if tuple(shape) == tuple(pshape):
        out = list(ent)
    elif len(shape) == len(pshape):
        out = [e if a == b else None for e, a, b in zip(ent, shape, pshape, strict=True)]
    elif len(shape) == len(pshape) - 1:
        out = [None] * len(shape)
        for k in range(len(pshape)):
            if tuple(pshape[:k] + pshape[k + 1:]) == tuple(shape):
                out = list(ent[:k] + ent[k + 1:])
                break
    else:
        out = [None] * len(shape)
    for i, e in enumerate(out):
        n = math.prod(sizes[a] for a in entry_axes(e))
        if n > 1 and shape[i] % n:
            out[i] = None
    return to_pspec(out)


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


def _match_suffix(path: str, index: Mapping[str, str]) -> str | None:
    """The plan path that is the longest '/'-aligned suffix of ``path``."""
    cur = path
    while True:
        if cur in index:
            return index[cur]
        if "/" not in cur:
            return None
        cur = cur.split("/", 1)[1]


def _positional_matches(optimizer: Any, state: Any, params: Any) -> dict[int, str] | None:
    """{state leaf index: plan-relative param path} from ``optax.tree_map_params``, or None.

    tree_map_params initialises the optimizer on a placeholder, so it finds the
    params-shaped subtrees exactly; it fails for optimizers whose init inspects
    the params (masked, multi_transform), and then path matching takes over.
    """
    import optax

    param_leaves, _ = walk(params)
    ids = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_box),
                                       [_Id(i) for i in range(len(param_leaves))])
    try:
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


@dataclasses.dataclass(frozen=True)
class _Id:
    """Marks a state leaf as a copy of parameter number ``i`` (an unregistered type: a leaf)."""

    i: int


_OTHER = _Id(-1)  # a state leaf that belongs to no parameter


def _state_specs(tree: Any, plan: Plan, *, optimizer: Any = None,
                 params: Any = None) -> tuple[list[Any], Any, list[PartitionSpec]]:
    """(boxes, treedef, spec per leaf) for a tree derived from the planned parameters.

    Pure: needs only the plan's mesh shape, so the estimator uses it too.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    boxes = [b for _, b in flat]
    positional = None
    if optimizer is not None and params is not None:
        positional = _positional_matches(optimizer, tree, params)
    index = _suffix_index(plan)
    specs, problems = [], []
    for i, (path, box) in enumerate(flat):
        value = unbox(box)
        shape = getattr(value, "shape", None)
        if shape is None:
            if isinstance(value, (int, float, complex, bool, np.generic)):
                specs.append(PartitionSpec())
                continue
            problems.append(f"{keystr(path)}: leaf of type {type(value).__name__} is not an array")
            specs.append(None)
            continue
        shape = tuple(int(d) for d in shape)
        target = None
        if positional is not None and i in positional:
            target = index.get(positional[i])
        if target is None:
            target = _match_suffix(keystr(path), index)
        if target is None:
            specs.append(PartitionSpec())  # counts, step numbers, rng state: replicated
            continue
        d = plan.decisions[target]
        specs.append(_adapt(d.spec, tuple(d.shape), shape, plan.mesh.sizes))
    if problems:
        raise TreeError("the state has leaves that are not arrays", problems)
    return boxes, treedef, specs


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
        mesh: the mesh (or a shape).
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
    mesh = _mesh_for(plan, mesh)
    boxes, treedef, specs = _state_specs(tree, plan, optimizer=optimizer, params=params)
    return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def state_specs(tree: Any, plan: Plan, *, optimizer: Any = None, params: Any = None) -> Any:
    """PartitionSpec tree for a tree derived from the planned parameters (no mesh needed).

    The spec-level twin of :func:`state_shardings`; see it for how leaves are
    tied to parameters.

    >>> import jax, optax, tpflax
    >>> params = {"w": jax.ShapeDtypeStruct((8, 4), "float32")}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> state_specs(jax.eval_shape(optax.adam(1e-3).init, params), p)[0].mu["w"]
    P('model', None)
    """
    _, treedef, specs = _state_specs(tree, plan, optimizer=optimizer, params=params)
    return jax.tree_util.tree_unflatten(treedef, specs)


def _abstract_params(plan: Plan, params: Any = None) -> Any:
    """The parameter tree an optimizer sees: ``params`` (abstracted), else built from the plan.

    From the plan alone: the planned tree's own structure (``plan.specs``), or
    nested dicts after ``Plan.from_json``; its ``params`` collection when it
    planned full linen variables.
    """
    if params is not None:
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.asarray(x).dtype)),
            params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        plan.specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    paths = [keystr(p) for p, _ in flat]
    if sorted(paths) == sorted(plan.decisions):
        tree = jax.tree_util.tree_unflatten(treedef, [
            jax.ShapeDtypeStruct(plan.decisions[p].shape, plan.decisions[p].dtype) for p in paths])
    else:
        tree = {}
        for path, d in plan.decisions.items():
            node = tree
            parts = path.split("/")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = jax.ShapeDtypeStruct(d.shape, d.dtype)
    if isinstance(tree, Mapping) and "params" in tree and {str(k) for k in tree} <= COLLECTIONS:
        return tree["params"]
    return tree


def optimizer_shardings(optimizer: Any, plan: Plan, mesh: Any = None, *, opt_state: Any = None,
                        params: Any = None) -> Any:
    """``NamedSharding`` tree for ``optimizer``'s state (for ``jax.jit`` in/out shardings).

    Args:
        optimizer: an optax ``GradientTransformation`` (or anything with ``init``).
        plan: the parameters' plan.
        mesh: the mesh (or a shape).
        opt_state: the state (concrete or abstract); derived with
            ``jax.eval_shape(optimizer.init, params)`` when omitted.
        params: the parameters (concrete or abstract); default: from the plan.

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"model": 2},
    ...                 rules=[("w", "row")])
    >>> optimizer_shardings(optax.sgd(0.1, momentum=0.9), p)[0].trace["w"].spec
    P('model', None)
    """
    abstract = _abstract_params(plan, params)
    if opt_state is None:
        opt_state = jax.eval_shape(optimizer.init, abstract)
    return state_shardings(opt_state, plan, mesh, optimizer=optimizer, params=abstract)


def shard_optimizer_state(optimizer: Any, opt_state: Any, plan: Plan, mesh: Any = None, *,
                          params: Any = None) -> Any:
    """Optimizer state on the mesh, its specs derived from the parameter specs.

    Args:
        optimizer: an optax ``GradientTransformation``, or an ``nnx.Optimizer``
            (then ``opt_state`` is ignored and a new, sharded ``nnx.Optimizer``
            is returned; the given one is untouched).
        opt_state: an existing state to place, or None to create it sharded with
            ``jax.jit(optimizer.init, out_shardings=...)``.
        plan: the parameters' plan.
        mesh: the mesh (or a shape).
        params: the parameters to initialise from when ``opt_state`` is None
            (needed by optimizers whose state copies the parameters, such as
            lookahead); default: zeros of the planned shapes, which is what
            adam, adafactor, sgd and friends start from anyway.

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"model": 2},
    ...                 rules=[("w", "row")])
    >>> st = shard_optimizer_state(optax.adam(1e-3), None, p, tpflax.make_mesh({"model": 2}))
    >>> st[0].nu["w"].sharding.spec
    P('model', None)
    """
    if _nnx_graph_node(optimizer):
        from tpflax._src.apply import nnx as nnx_apply

        return nnx_apply.shard_module(optimizer, plan, mesh, derived=True)
    mesh = _mesh_for(plan, mesh)
    if not callable(getattr(optimizer, "init", None)):
        raise OptionError(f"optimizer {optimizer!r} has no init(); pass an optax GradientTransformation "
                          "(e.g. optax.adamw(1e-3)) or an nnx.Optimizer")
    abstract = _abstract_params(plan, params)
    if opt_state is not None:
        boxes, treedef, specs = _state_specs(opt_state, plan, optimizer=optimizer,
                                             params=abstract)
        _check_state_matches(optimizer, opt_state, abstract)
        placed = _put([unbox(b) for b in boxes], [NamedSharding(mesh, s) for s in specs])
        return jax.tree_util.tree_unflatten(treedef, [_rebox(b, v) for b, v in
                                                      zip(boxes, placed, strict=True)])
    state_shape = jax.eval_shape(optimizer.init, abstract)
    out_shardings = state_shardings(state_shape, plan, mesh, optimizer=optimizer, params=abstract)
    if params is not None:
        return jax.jit(optimizer.init, out_shardings=out_shardings)(params)
    import jax.numpy as jnp

    def init_from_zeros():
        return optimizer.init(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract))

    return jax.jit(init_from_zeros, out_shardings=out_shardings)()


def _check_state_matches(optimizer: Any, opt_state: Any, abstract_params: Any) -> None:
    """The given state must be the one ``optimizer.init`` makes for the planned parameters.

    Otherwise its leaves would silently fall back to replicated (an OOM on a pod).
    """
    want = jax.eval_shape(optimizer.init, abstract_params)
    got_leaves = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_box)[0]
    want_leaves = jax.tree_util.tree_flatten_with_path(want, is_leaf=is_box)[0]
    problems = []
    if len(got_leaves) != len(want_leaves):
        problems.append(f"the state has {len(got_leaves)} leaves; optimizer.init on the planned parameters "
                        f"makes {len(want_leaves)}")
    else:
        for (path, g), (wpath, w) in zip(got_leaves, want_leaves, strict=True):
            gs, ws = tuple(np.shape(unbox(g))), tuple(np.shape(unbox(w)))
            if keystr(path) != keystr(wpath):
                problems.append(f"{keystr(path)}: the planned parameters give {keystr(wpath)} here")
            elif gs != ws:
                problems.append(f"{keystr(path)}: shape {gs}, but the planned parameters give {ws}")
    if problems:
        raise PlanMismatchError("the optimizer state was not made for the planned parameters; "
                                "re-create it with optimizer.init(params) or pass opt_state=None", problems)


def train_state_shardings(state: Any, plan: Plan, mesh: Any = None) -> Any:
    """``NamedSharding`` tree for a ``flax.training.train_state.TrainState`` (or abstract one).

    ``params`` take the plan's specs, ``opt_state`` is derived through
    ``state.tx``, ``step`` is replicated.
    """
    return state_shardings(state, plan, mesh, optimizer=getattr(state, "tx", None),
                           params=getattr(state, "params", None))


def shard_train_state(state: Any, plan: Plan, mesh: Any = None) -> Any:
    """A ``TrainState`` placed on the mesh: params per plan, optimizer state derived, step replicated.

    ``state.params`` is checked against the plan first (a mismatch raises
    PlanMismatchError and nothing is placed).

    >>> import jax, jax.numpy as jnp, optax, tpflax
    >>> from flax.training import train_state
    >>> params = {"w": jnp.ones((8, 4))}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> ts = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
    >>> shard_train_state(ts, p, tpflax.make_mesh({"model": 2})).opt_state[0].mu["w"].sharding.spec
    P('model', None)
    """
    mesh = _mesh_for(plan, mesh)
    params = getattr(state, "params", None)
    if params is not None:
        _check_params_subtree(plan, params)
    boxes, treedef, specs = _state_specs(state, plan, optimizer=getattr(state, "tx", None),
                                         params=params)
    placed = _put([unbox(b) for b in boxes], [NamedSharding(mesh, s) for s in specs])
    return jax.tree_util.tree_unflatten(treedef, [_rebox(b, v) for b, v in zip(boxes, placed,
                                                                               strict=True)])


def _check_params_subtree(plan: Plan, params: Any) -> None:
    """Params must match the plan, or its ``params`` collection when it planned full variables."""
    leaves, _ = walk(params)
    if all(x.path in plan.decisions for x in leaves) or not leaves:
        check_tree_matches(plan, leaves)
        return
    sub = {k: v for k, v in plan.decisions.items() if k.startswith("params/")}
    prefixed = [dataclasses.replace(x, path="params/" + x.path) for x in leaves]
    check_tree_matches(dataclasses.replace(plan, decisions=sub), prefixed)


# ---------------------------------------------------------------------------
# inside a step: constraints


def constrain(tree: Any, plan: Plan, mesh: Any = None) -> Any:
    """``with_sharding_constraint`` every leaf to the plan's spec (use inside ``jax.jit``).

    Pins the layout of updated parameters (or of an nnx model's state) so XLA
    cannot pick another one for the step's outputs.
    """
    mesh = _mesh_for(plan, mesh)
    boxes, treedef, shards = _plan_leaf_shardings(plan, mesh, tree)
    out = [_rebox(b, jax.lax.with_sharding_constraint(unbox(b), s)) for b, s in zip(boxes, shards,
                                                                                   strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------
# activations: the batch dimension


def batch_spec(mesh: Any, *, axis_roles: Mapping[str, str] | None = None) -> PartitionSpec:
    """``PartitionSpec`` splitting dim 0 over every data and fsdp axis of ``mesh`` (mesh order)."""
    ms = mesh_shape(mesh, axis_roles)
    axes = tuple(n for n, r in ms.roles if r in (DATA, FSDP) and ms.sizes[n] > 1)
    if not axes:
        return PartitionSpec()
    return PartitionSpec(axes[0] if len(axes) == 1 else axes)


def batch_sharding(mesh: Any, *, axis_roles: Mapping[str, str] | None = None) -> NamedSharding:
    """The ``NamedSharding`` for a training step's inputs: batch dim over the data/fsdp axes.

    Use it as ``jax.jit`` in_shardings for the batch, or with :func:`shard_batch`.
    On a mesh with no data or fsdp axis the batch is replicated.

    >>> import tpflax
    >>> batch_sharding(tpflax.make_mesh({"data": 2, "model": 4})).spec
    P('data',)
    """
    mesh = _as_mesh(mesh)
    return NamedSharding(mesh, batch_spec(mesh, axis_roles=axis_roles))


def _batch_problems(batch: Any, spec: PartitionSpec, mesh: jax.sharding.Mesh) -> list[str]:
    sizes = dict(mesh.shape)
    n = math.prod(sizes[a] for e in spec for a in entry_axes(e))
    problems = []
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = np.shape(x)
        if shape and n > 1 and shape[0] % n:
            axes = "*".join(f"{a}={sizes[a]}" for e in spec for a in entry_axes(e))
            problems.append(f"{keystr(path) or '<batch>'}: batch dim of shape {tuple(shape)} is "
                            f"{shape[0]}, not divisible by mesh axes {axes}; use a batch size that "
                            f"is a multiple of {n}")
    return problems


def shard_batch(batch: Any, mesh: Any, *, process_local: bool = False,
                axis_roles: Mapping[str, str] | None = None) -> Any:
    """Place a batch with its leading dim split over the data/fsdp axes (scalars replicated).

    Args:
        batch: a tree of arrays with a leading batch dim.
        mesh: the mesh.
        process_local: each process passes only its own part of the global
            batch (``jax.make_array_from_process_local_data``); by default every
            process passes the same global batch.

    Raises:
        SpecError: a leaf's batch dim does not divide over the batch axes.
    """
    mesh = _as_mesh(mesh)
    spec = batch_spec(mesh, axis_roles=axis_roles)
    if not process_local:
        problems = _batch_problems(batch, spec, mesh)
        if problems:
            raise SpecError("the batch does not split over the mesh", problems)
    flat, treedef = jax.tree_util.tree_flatten(batch)
    shards = [NamedSharding(mesh, spec if np.ndim(x) else PartitionSpec()) for x in flat]
    if process_local:
        out = [jax.make_array_from_process_local_data(s, np.asarray(x)) for x, s in
               zip(flat, shards, strict=True)]
    else:
        out = _put(flat, shards)
    return jax.tree_util.tree_unflatten(treedef, out)


def constrain_batch(batch: Any, mesh: Any, *, axis_roles: Mapping[str, str] | None = None) -> Any:
    """``with_sharding_constraint`` a batch's leading dim to the data/fsdp axes (inside jit).

    Raises:
        SpecError: a leaf's batch dim does not divide over the batch axes.
    """
    mesh = _as_mesh(mesh)
    spec = batch_spec(mesh, axis_roles=axis_roles)
    problems = _batch_problems(batch, spec, mesh)
    if problems:
        raise SpecError("the batch does not split over the mesh", problems)
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, spec if np.ndim(x) else PartitionSpec())), batch)


# ---------------------------------------------------------------------------
# a jitted step

ROLES = ("params", "state", "batch", "replicated", None)
_DONATED = ("params", "state")


@dataclasses.dataclass(frozen=True)
class Step:
    """A step function compiled for a plan's mesh; see :func:`jit_step`.

    Calling it compiles once per argument structure (cached), with in/out
    shardings from the argument roles, and donates the params/state arguments.
    """

    fn: Callable[..., Any]
    plan: Plan
    mesh: jax.sharding.Mesh
    in_roles: tuple[Any, ...]
    out_roles: Any
    optimizer: Any
    donate: bool
    compiler_options: Any = None
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def jitted(self, *args: Any):
        """The ``jax.jit`` object for these arguments (built on first use)."""
        if len(args) != len(self.in_roles):
            raise PlanMismatchError(
                f"the step was given {len(args)} arguments but in_roles names {len(self.in_roles)} "
                f"({self.in_roles}); pass one role per positional argument")
        key = tuple(jax.tree_util.tree_structure(a) for a in args) + tuple(
            (np.shape(x), str(getattr(x, "dtype", ""))) for x in jax.tree_util.tree_leaves(args))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        in_shardings = tuple(self._shardings(role, a) for role, a in
                             zip(self.in_roles, args, strict=True))
        out_shape = jax.eval_shape(self.fn, *args)
        if isinstance(self.out_roles, tuple):
            if not isinstance(out_shape, tuple) or len(out_shape) != len(self.out_roles):
                raise PlanMismatchError(
                    f"out_roles {self.out_roles} names {len(self.out_roles)} outputs but the step "
                    f"returns {type(out_shape).__name__}"
                    f"{'' if not isinstance(out_shape, tuple) else f' of {len(out_shape)}'}; "
                    "give one role per output")
            out_shardings = tuple(self._shardings(r, o) for r, o in
                                  zip(self.out_roles, out_shape, strict=True))
        else:
            out_shardings = self._shardings(self.out_roles, out_shape)
        donate = tuple(i for i, r in enumerate(self.in_roles) if self.donate and r in _DONATED)
        jitted = jax.jit(self.fn, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate, compiler_options=self.compiler_options)
        self.cache[key] = jitted
        return jitted

    def _shardings(self, role: Any, tree: Any) -> Any:
        if role is None:
            return None
        if role == "params":
            return shardings(self.plan, self.mesh, tree)
        if role == "state":
            params = _abstract_params(self.plan) if self.optimizer is not None else None
            return state_shardings(tree, self.plan, self.mesh, optimizer=self.optimizer,
                                   params=params)
        if role == "batch":
            spec = batch_spec(self.mesh, axis_roles=dict(self.plan.mesh.roles))
            problems = _batch_problems(tree, spec, self.mesh)
            if problems:
                raise SpecError("the batch does not split over the mesh", problems)
            return jax.tree_util.tree_map(
                lambda x: NamedSharding(self.mesh, spec if np.ndim(x) else PartitionSpec()), tree)
        if role == "replicated":
            return NamedSharding(self.mesh, PartitionSpec())
        raise PlanMismatchError(f"unknown role {role!r}; use one of {ROLES}")

    def __call__(self, *args: Any) -> Any:
        return self.jitted(*args)(*args)

    def lower(self, *args: Any):
        """``jax.jit(...).lower(*args)``: for ``.compile().memory_analysis()`` and HLO text."""
        return self.jitted(*args).lower(*args)


def jit_step(fn: Callable[..., Any], plan: Plan, mesh: Any = None, *,
             in_roles: Sequence[Any] = ("params", "state", "batch"), out_roles: Any = "mirror",
             optimizer: Any = None, donate: bool = True,
             compiler_options: Mapping[str, Any] | None = None) -> Step:
    """Compile a training step with the plan's in/out shardings and buffer donation.

    Each positional argument has a role: ``"params"`` (must match the plan),
    ``"state"`` (optimizer state, TrainState or anything derived from the
    params: see :func:`state_shardings`), ``"batch"`` (leading dim over the
    data/fsdp axes), ``"replicated"``, or ``None`` (jax infers it from the
    argument). ``params`` and ``state`` arguments are donated when ``donate``.

    The equivalent by hand::

        step = jax.jit(train_step,
                       in_shardings=(tpflax.shardings(plan, mesh),
                                     tpflax.optimizer_shardings(tx, plan, mesh),
                                     tpflax.batch_sharding(mesh)),
                       out_shardings=(tpflax.shardings(plan, mesh),
                                      tpflax.optimizer_shardings(tx, plan, mesh), None),
                       donate_argnums=(0, 1))

    Args:
        fn: the step, e.g. ``(params, opt_state, batch) -> (params, opt_state, loss)``.
        plan: the parameters' plan.
        mesh: the mesh (or a shape).
        in_roles: one role per positional argument.
        out_roles: a role, or a tuple of roles for a tuple output. ``"mirror"``
            (default): output ``i`` takes input ``i``'s role when that is params or
            state, else ``None``.
        optimizer: the optax optimizer, to tie state leaves to params exactly.
        donate: donate params/state inputs.
        compiler_options: passed to ``jax.jit`` (XLA options).

    >>> import jax, jax.numpy as jnp, tpflax
    >>> params = {"w": jnp.ones((8, 4))}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> mesh = tpflax.make_mesh({"model": 2})
    >>> step = jit_step(lambda w, x: (jax.tree.map(lambda a: a * 2, w), (x @ w["w"]).sum()), p,
    ...                 mesh, in_roles=("params", "batch"))
    >>> w, loss = step(tpflax.shard(params, p, mesh), jnp.ones((2, 8)))
    >>> float(loss), w["w"].sharding.spec
    (64.0, P('model', None))
    """
    mesh = _mesh_for(plan, mesh)
    in_roles = tuple(in_roles)
    for r in in_roles:
        if r not in ROLES and r != "opt_state":
            raise PlanMismatchError(f"unknown role {r!r} in in_roles; use one of {ROLES}")
    in_roles = tuple("state" if r == "opt_state" else r for r in in_roles)
    if out_roles == "mirror":
        out_roles = tuple(r if r in _DONATED else None for r in in_roles)
    elif isinstance(out_roles, (list, tuple)):
        out_roles = tuple("state" if r == "opt_state" else r for r in out_roles)
    elif out_roles == "opt_state":
        out_roles = "state"
    return Step(fn=fn, plan=plan, mesh=mesh, in_roles=in_roles, out_roles=out_roles,
                optimizer=optimizer, donate=donate,
                compiler_options=dict(compiler_options) if compiler_options else None)


__all__ = [
    "Step", "batch_sharding", "batch_spec", "check_mesh", "constrain", "constrain_batch",
    "init_sharded", "jit_step", "optimizer_shardings", "shard", "shard_batch",
    "shard_optimizer_state", "shard_train_state", "shardings", "state_shardings",
    "train_state_shardings", "unshard",
]
