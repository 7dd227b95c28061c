"""Move values onto shardings: one batched ``device_put``, or per-shard callbacks across hosts.

Placement works with ``jax.process_count() > 1``: a leaf whose sharding spans
devices of other processes is built with ``jax.make_array_from_callback`` from
the slices this process's devices hold, so each process supplies only its
addressable shards.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from tpflax._src.apply.bind import bind_mesh, match_plan, plan_leaf_shardings, rebox_all
from tpflax._src.apply.stored import has_layouts, into_plan_order, mark_stored
from tpflax._src.errors import TpflaxWarning, TreeError
from tpflax._src.facts.tree import is_box, keystr, unbox, walk
from tpflax._src.planner.plan import Plan


def _host_value(x: Any) -> Any:
    """A host array to slice per shard: numpy (memmaps stay lazy) or a gathered jax array."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, jax.Array):
        return np.asarray(jax.device_get(x))
    return np.asarray(x)


def _from_callback(x: Any, sharding: NamedSharding, *, copy: bool = True) -> jax.Array:
    """Build a global array from the slices this process's devices hold (the multi-host path); with ``copy``,
    slices of the caller's numpy array are copied for CPU devices (see :func:`owned`)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # typed PRNG keys have no numpy form: place their key data (one trailing dim more), rewrap
        data = _from_callback(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = _host_value(x)
    if copy and isinstance(x, np.ndarray) and _on_cpu(sharding):
        return jax.make_array_from_callback(host.shape, sharding, lambda index: np.array(host[index]))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index]))


def _on_cpu(sharding: Any) -> bool:
    return all(d.platform == "cpu" for d in sharding.device_set)


def owned(x: Any, sharding: Any) -> Any:
    """``x`` to hand to a placement onto ``sharding`` whose result must not change when the caller later
    writes to ``x``: a copy of a numpy array bound for CPU devices, whose client adopts an aligned host
    buffer as the device buffer (no copy at all: the placed array *is* the caller's memory, measured on
    jax 0.10). The copy is the device buffer then, so it costs no memory a placed copy would not. Bound
    for an accelerator, ``x`` itself: the transfer copies, but asynchronously; see :func:`settled`."""
    return np.array(x) if isinstance(x, np.ndarray) and _on_cpu(sharding) else x


def settled(values: Sequence[Any], shards: Sequence[Any], out: Sequence[Any]) -> None:
    """Wait for the host-to-device copies of the numpy arrays among ``values`` bound for an accelerator:
    until they complete the transfer reads the caller's buffer, so a write to it right after the call
    would reach the placed array."""
    pending = [a for x, s, a in zip(values, shards, out, strict=True)
               if isinstance(x, np.ndarray) and not _on_cpu(s)]
    if pending:
        jax.block_until_ready(pending)


def _needs_callback(x: Any, sharding: NamedSharding) -> bool:
    if isinstance(x, np.memmap):
        return True  # read only the slices each device holds, never the whole file
    if sharding.is_fully_addressable:
        return False
    # A global array that spans processes already: device_put reshards it collectively.
    return not (isinstance(x, jax.Array) and not x.is_fully_addressable)


def _unalias(src: Any, out: jax.Array) -> jax.Array:
    """``out`` with no buffer shared with ``src``.

    ``jax.device_put`` (even with ``may_alias=False``, jax 0.10) reuses the
    source buffer for the shard on the source's own device. Donating the placed
    tree in a step would then delete the caller's array: copy those shards, with a
    ``device_put`` onto their own device (a jitted ``copy`` is traced against the
    context mesh of ``jax.set_mesh``, which refuses a one-device argument).
    """
    if not isinstance(src, jax.Array) or not src.is_fully_addressable:
        return out
    src_ptrs = {s.data.unsafe_buffer_pointer() for s in src.addressable_shards}
    shards = out.addressable_shards
    if not any(s.data.unsafe_buffer_pointer() in src_ptrs for s in shards):
        return out
    arrays = [jax.device_put(s.data, s.data.sharding, may_alias=False)
              if s.data.unsafe_buffer_pointer() in src_ptrs else s.data for s in shards]
    return jax.make_array_from_single_device_arrays(out.shape, out.sharding, arrays)


def put(values: Sequence[Any], shards: Sequence[NamedSharding], *, per_shard: bool = False,
        donate: bool = False) -> list[jax.Array]:
    """Place every value on its sharding; one batched ``jax.device_put`` for the local ones.

    ``per_shard=True`` builds every leaf with ``jax.make_array_from_callback``
    even on one host (what multi-host placement does everywhere). Without
    ``donate`` no output shares a buffer with its input, and none changes when the
    caller writes to a numpy input after the call (:func:`owned`, :func:`settled`).

    >>> import numpy as np, tpflax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> s = NamedSharding(tpflax.make_mesh({"model": 2}), P("model"))
    >>> put([np.arange(4.0)], [s], per_shard=True)[0].sharding.spec
    P('model',)
    """
    out: list[Any] = [None] * len(values)
    batch_idx = []
    for i, (x, s) in enumerate(zip(values, shards, strict=True)):
        if per_shard or _needs_callback(x, s):
            out[i] = _from_callback(x, s, copy=not donate)
        else:
            batch_idx.append(i)
    if batch_idx:
        placed = jax.device_put([values[i] if donate else owned(values[i], shards[i]) for i in batch_idx],
                                [shards[i] for i in batch_idx], donate=donate)
        for i, a in zip(batch_idx, placed, strict=True):
            out[i] = a if donate else _unalias(values[i], a)
    if not donate:
        settled(values, shards, out)
    return out


def place_tree(tree: Any, plan: Plan, mesh: Any = None, *, per_shard: bool = False,
               donate: bool = False, check_finite: bool | None = None) -> Any:
    """:func:`tpflax.shard` for a tree (not an nnx graph node): checked, then placed bit-exact."""
    mesh = bind_mesh(plan, mesh)
    boxes, treedef, shards = plan_leaf_shardings(plan, mesh, tree)
    values = [unbox(b) for b in boxes]
    check_values(tree, values)
    if check_finite is not False:
        _warn_nonfinite(tree, values, everywhere=bool(check_finite))
    lays = ([plan.decisions[p].layout for p in match_plan(plan, walk(tree)[0])] if has_layouts(plan)
            else [None] * len(values))
    # head-aligned fused kernels: into the stored order (new arrays); arrays tpflax already stored (the
    # output of shard, init_sharded, a restore) are taken from that order, not moved a second time
    values = into_plan_order(values, lays)
    placed = put(values, shards, per_shard=per_shard, donate=donate)
    mark_stored(placed, lays)
    return rebox_all(boxes, placed, treedef)


def check_values(tree: Any, values: Sequence[Any], *, narrow: bool | str = True, what: str = "the tree",
                 doing: str = "placed") -> None:
    """Raise TreeError, naming each leaf, when ``values`` (the unboxed leaves of ``tree``, in its flattening
    order with flax boxes as leaves) cannot be placed or read bit-exact: a deleted array (donated to a jitted
    step), or, with ``narrow``, a Python int out of int32 range or a 64-bit host value jax would narrow to 32
    bits. ``narrow="overflow"`` (a batch's: float64 inputs and int64 ids narrow as jax narrows them) refuses
    only 64-bit integers whose values do not fit the narrower type, which jax would wrap (``2**40 + 7`` read
    back as 7). Raised before anything moves: never a partially placed tree.

    >>> import jax.numpy as jnp, numpy as np
    >>> check_values({"w": np.zeros(2, np.float32)}, [np.zeros(2, np.float32)])
    >>> x = jnp.ones(3); x.delete()
    >>> check_values({"opt": {"mu": x}}, [x])
    Traceback (most recent call last):
    tpflax._src.errors.TreeError: the tree cannot be placed bit-exact:
      - opt/mu: the array (shape (3,)) was deleted, e.g. donated to a jitted step; pass the step's output or a live copy
    """
    traced = [i for i, x in enumerate(values) if isinstance(x, jax.core.Tracer)]
    if traced:  # inside jit / vmap / grad: is_deleted() was jax's bare ConcretizationTypeError
        where = _paths(tree, values)
        shown = [f"{(where[i] or 'the root') if where else f'leaf {i}'}: traced {jax.typeof(values[i]).str_short()}"
                 for i in traced[:5]] + ([f"... and {len(traced) - 5} more"] if len(traced) > 5 else [])
        fix = ("inside a jitted function lay values out with tpflax.constrain(tree, plan, mesh) (or "
               "constrain_batch), and call this on concrete arrays outside it" if doing == "placed" else
               "call it on the jitted function's output, outside jax.jit")
        raise TreeError(f"{what} holds traced values (this call runs inside jax.jit, vmap or grad), which cannot "
                        f"be {doing}: {fix}", shown)
    suspects = [i for i, x in enumerate(values) if (narrow and _wraps(x)) or (
                isinstance(x, (jax.Array, np.ndarray, np.generic))
                and (x.is_deleted() if isinstance(x, jax.Array) else _narrows(x, narrow)))]
    if not suspects:
        return
    paths = _paths(tree, values)
    problems = []
    for i in suspects:
        x = values[i]
        where = (paths[i] or "the root") if paths else f"leaf {i}"
        if narrow and _wraps(x):
            canon = jax.dtypes.canonicalize_dtype(int)
            problems.append(f"{where}: the Python int {x} does not fit the {canon} jax makes of it "
                            "(jax_enable_x64 is off); split it into two smaller ints or enable "
                            "jax.config.update('jax_enable_x64', True)")
        elif isinstance(x, jax.Array):
            problems.append(f"{where}: the array (shape {tuple(x.shape)}) was deleted, e.g. donated to a "
                            "jitted step; pass the step's output or a live copy")
        elif narrow == "overflow":
            canon = jax.dtypes.canonicalize_dtype(x.dtype)
            problems.append(
                f"{where}: {x.dtype} array of shape {tuple(np.shape(x))} holds values {np.min(x)}..{np.max(x)} "
                f"that do not fit the {canon} jax makes of it (jax_enable_x64 is off), so they would wrap; "
                "map them into range (e.g. ids modulo the table size) or enable "
                "jax.config.update('jax_enable_x64', True)")
        else:
            canon = jax.dtypes.canonicalize_dtype(x.dtype)
            problems.append(
                f"{where}: {x.dtype} array of shape {tuple(np.shape(x))} would become {canon} on device "
                f"(jax_enable_x64 is off), losing bits; cast it with .astype('{canon}') and re-plan, "
                "or enable jax.config.update('jax_enable_x64', True)")
    raise TreeError(f"{what} cannot be {doing} bit-exact", problems)


def _paths(tree: Any, values: Sequence[Any]) -> list[str] | None:
    """Paths for a message, found only when something is wrong: the planned tree's as walk() names them, any
    other pytree's (an optimizer state with empty or non-array leaves, a batch) by its keys; None when they do
    not line up with ``values``."""
    try:
        paths = [leaf.path for leaf in walk(tree)[0]]
    except TreeError:
        paths = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]]
    return paths if len(paths) == len(values) else None


def _wraps(x: Any) -> bool:
    """Whether ``x`` is a Python int out of the range of the integer jax makes of it (int32 unless
    jax_enable_x64): jax refuses to convert it (a bare OverflowError), an int64 copy would wrap."""
    if type(x) is not int:
        return False
    info = np.iinfo(jax.dtypes.canonicalize_dtype(int))
    return not info.min <= x <= info.max


def _narrows(x: Any, narrow: bool | str) -> bool:
    """Whether host value ``x`` loses bits on device as ``narrow`` counts it (see :func:`check_values`)."""
    canon = jax.dtypes.canonicalize_dtype(x.dtype)
    if not narrow or canon == x.dtype:
        return False
    if narrow != "overflow":
        return True
    if not np.issubdtype(x.dtype, np.integer) or not np.size(x):
        return False
    info = np.iinfo(canon)
    return bool(np.min(x) < info.min or np.max(x) > info.max)


def _nonfinite_count(x: Any, everywhere: bool) -> int:
    """NaN/inf count of a float leaf; 0 for others, and for device arrays unless ``everywhere``."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, np.inexact) or not np.size(x):
        return 0
    if isinstance(x, jax.Array):
        on_host = x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set)
        if not on_host:
            return int(jax.numpy.sum(~jax.numpy.isfinite(x))) if everywhere else 0
    with np.errstate(invalid="ignore"):  # NaN is what we are counting, not an error
        return int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x))))


def _warn_nonfinite(tree: Any, values: Sequence[Any], *, everywhere: bool) -> None:
    """Warn once, naming every float leaf that holds NaN or inf."""
    bad = [(i, n) for i, x in enumerate(values) if (n := _nonfinite_count(x, everywhere))]
    if not bad:
        return
    leaves, _ = walk(tree)
    lines = [f"{leaves[i].path} (shape {leaves[i].shape}, {leaves[i].dtype}): {n} NaN/inf value(s)"
             for i, n in bad]
    warnings.warn("placing leaves that hold NaN or inf, bit-exact as given (check the checkpoint or the "
                  "init if this is unexpected; check_finite=False skips this check): "
                  + "; ".join(lines), TpflaxWarning, stacklevel=4)


__all__ = ["owned", "place_tree", "put", "settled"]
