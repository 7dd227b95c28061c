"""A step's inputs: the batch dim split over the data, fsdp and expert axes of the mesh.

The layout rule itself (which axes) is :func:`tpflax._src.mesh.batch_axes`,
shared with the cost model and the dry run; this module checks divisibility
and places or constrains the arrays.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpflax._src.apply.put import check_values, owned, put, settled
from tpflax._src.errors import AbstractMeshError, OptionError, SpecError, TreeError
from tpflax._src.facts.tree import keystr
from tpflax._src.mesh import (
    MeshShape,
    batch_pspec,
    constrain_to,
    device_mesh,
    mesh_shape,
    sharding_mesh,
)
from tpflax._src.specs import entries, entry_axes, spec_problems


def batch_spec(mesh: Any, *, axis_roles: Mapping[str, str] | None = None) -> PartitionSpec:
    """``PartitionSpec`` splitting dim 0 over every data and fsdp axis of ``mesh`` (mesh order).

    >>> batch_spec({"data": 2, "fsdp": 2, "model": 2})
    P(('data', 'fsdp'),)
    """
    return batch_pspec(mesh_shape(mesh, axis_roles))


def batch_sharding(mesh: Any, batch: Any = None, *, batch_size: int | None = None,
                   axis_roles: Mapping[str, str] | None = None) -> Any:
    """The ``NamedSharding`` for a training step's inputs: batch dim over the data/fsdp axes.

    Use it as ``jax.jit`` in_shardings for the batch, or with :func:`shard_batch`.
    On a mesh with no data or fsdp axis the batch is replicated. Given ``batch`` (a
    tree of arrays or ``jax.ShapeDtypeStruct``), one sharding per leaf, scalars
    replicated: a single sharding would give a scalar leaf (a step counter) the
    batch dim it lacks, which ``jax.jit`` refuses.

    Which leaves are split: an explicit spec always wins (a ``jax.ShapeDtypeStruct`` leaf carrying a
    ``NamedSharding`` keeps its spec, on ``mesh``); given ``batch_size``, a leaf whose leading dim is another
    size (a positional table, a mask shared by every example) stays replicated; without it every leaf's
    leading dim is the batch's, and leaves disagreeing on it are refused.

    Raises:
        TreeError: a ``batch`` leaf is no array jax can hold (a string, an object array), or the leaves
            disagree on the batch (leading) size and no ``batch_size`` says which is the batch.
        SpecError: a ``batch`` leaf's batch dim does not divide over the batch axes, or an explicit spec
            names an axis ``mesh`` lacks or does not divide its dim.

    >>> import jax, tpflax
    >>> mesh = tpflax.make_mesh({"data": 2, "model": 4})
    >>> batch_sharding(mesh).spec
    P('data',)
    >>> s = batch_sharding(mesh, {"x": jax.ShapeDtypeStruct((8, 4), "float32"), "step": jax.ShapeDtypeStruct((), "int32")})
    >>> s["x"].spec, s["step"].spec
    (P('data',), P())
    >>> pe = jax.ShapeDtypeStruct((16, 4), "float32")  # shared by every example: no batch dim
    >>> batch_sharding(mesh, {"x": jax.ShapeDtypeStruct((8, 4), "float32"), "pe": pe}, batch_size=8)["pe"].spec
    P()
    """
    _check_order("batch_sharding(mesh, batch)", mesh, batch)
    batch_size = _check_size(batch_size)
    mesh = sharding_mesh(mesh)
    spec = batch_spec(mesh, axis_roles=axis_roles)
    if batch is None:
        return NamedSharding(mesh, spec)
    check_batch_leaves(batch)
    check_batch_sizes(batch, batch_size)
    return batch_shardings(batch, mesh, spec, batch_size)


def _check_order(call: str, mesh: Any, batch: Any) -> None:
    """OptionError when the batch and the mesh are passed swapped: ``batch_sharding`` takes the mesh first, as
    jit's shardings are built, and ``shard_batch`` / ``constrain_batch`` the batch first, as they transform it;
    swapped, the batch was read as a mesh ("axis 'x' has size array([[1., ...")."""
    meshes = (jax.sharding.Mesh, jax.sharding.AbstractMesh)
    if isinstance(batch, meshes) and not isinstance(mesh, meshes):
        raise OptionError(f"the batch and the mesh are swapped; pass them as {call}")


def explicit_spec(x: Any) -> PartitionSpec | None:
    """The spec a batch leaf was given: a ``jax.ShapeDtypeStruct`` carrying a ``NamedSharding`` over Auto mesh
    axes (an array's placement is where it is, no spec asked for; over Explicit axes every abstract value
    carries its type's sharding, ``jax.eval_shape``'s ``P(None, None)`` too, which asks for nothing); None
    otherwise."""
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.ShapeDtypeStruct) else None
    if not isinstance(sharding, NamedSharding):
        return None
    types = getattr(sharding.mesh, "axis_types", ())
    if any(t == jax.sharding.AxisType.Explicit for t in types):
        return None
    return sharding.spec


def batch_shardings(batch: Any, mesh: jax.sharding.Mesh, spec: PartitionSpec, size: int | None = None) -> Any:
    """One ``NamedSharding`` per batch leaf: ``spec`` for arrays, replicated for scalars.

    A leaf with an explicit spec (:func:`explicit_spec`) keeps it; given ``size``, a leaf whose leading dim
    is another size stays replicated (it holds no batch: a positional table, a shared mask).

    Raises:
        TreeError: a leaf is no array jax can hold (a string, an object array).
        SpecError: a leaf's batch dim does not divide over the batch axes; an explicit spec names an axis
            the mesh lacks, or does not divide its dim.
    """
    check_batch_leaves(batch)
    sizes = dict(mesh.shape)
    shape_of = MeshShape(axes=tuple(sizes.items()), roles=())  # the checker reads only the axes' sizes
    n = math.prod(sizes[a] for e in spec for a in entry_axes(e))
    problems = []
    flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
    leads = collections.Counter(s[0] for s in (tuple(getattr(x, "shape", None) or np.shape(x)) for _, x in flat
                                               if explicit_spec(x) is None) if s)
    out = []
    for path, x in flat:
        shape = tuple(getattr(x, "shape", None) or np.shape(x))
        where = keystr(path) or "<batch>"
        given = explicit_spec(x)
        if given is not None:
            wrong = spec_problems(where, shape, entries(given), shape_of)
            problems += wrong
            out.append(None if wrong else NamedSharding(mesh, given))
            continue
        if not shape or (size is not None and shape[0] != size):
            out.append(NamedSharding(mesh, PartitionSpec()))
            continue
        if n > 1 and shape[0] % n:
            axes = "*".join(f"{a}={sizes[a]}" for e in spec for a in entry_axes(e))
            problems.append(_undivided(where, shape, spec, axes, n, leads))
        out.append(NamedSharding(mesh, spec))
    if problems:
        raise SpecError("the batch does not split over the mesh", problems)
    return jax.tree_util.tree_unflatten(treedef, out)


def _undivided(where: str, shape: tuple[int, ...], spec: PartitionSpec, axes: str, n: int,
               leads: Mapping[int, int]) -> str:
    """Why a leaf's leading dim does not split over the ``n`` devices of the batch ``axes``, and the fix. When the
    other leaves lead with another size, the leaf's batch is likely another dim (Transformer-XL's memory laid out
    (layers, batch, memory, d)): say that its leading dim is taken as the batch and how to name the batch dim."""
    others = [m for m, _ in leads.most_common() if m != shape[0]]
    if not others:
        return (f"{where}: batch dim of shape {shape} is {shape[0]}, not divisible by mesh axes {axes}; use a "
                f"batch size that is a multiple of {n}")
    size = others[0]
    dims = [k for k in range(1, len(shape)) if shape[k] == size]
    entry = spec[0] if len(spec) else None
    named = (", ".join("None" for _ in range(dims[0])) + f", {entry!r}") if dims else f"..., {entry!r}, ..."
    at = f"dim {dims[0]}" if dims else "its batch dim"
    return (f"{where}: its leading dim ({shape[0]}, of shape {shape}) is taken as the batch, but the other "
            f"inputs lead with {size} examples and {shape[0]} does not divide over mesh axes {axes}. If its "
            f"batch is {at}, say so: pass it in sample= as jax.ShapeDtypeStruct({shape}, dtype, "
            f"sharding=NamedSharding(mesh, P({named}))), which keeps that spec; if it holds no batch (shared "
            f"by every example), pass batch={size} to keep it replicated; or put its batch dim first")


def check_batch_sizes(batch: Any, size: int | None = None) -> None:
    """TreeError when the batch's array leaves (0-d ones and leaves with an explicit spec aside) disagree on
    their leading (batch) size: each is split over the batch axes as holding the same examples, so
    ``{"x": (8, 32), "y": (4,)}`` (labels of another batch, a mask shared by every example) would be laid out
    as if it did, and fail or mislead later. Given the batch ``size``, leaves of another are no batch, but at
    least one leaf must have it (a short last batch would otherwise be replicated whole).

    >>> import numpy as np
    >>> check_batch_sizes({"x": np.ones((8, 3)), "y": np.ones(8), "step": 3})
    >>> check_batch_sizes({"x": np.ones((8, 3)), "y": np.ones(4)})
    Traceback (most recent call last):
    tpflax._src.errors.TreeError: the batch's leaves disagree on the batch (leading) size: x has 8 examples (shape (8, 3)) but y has 4 (shape (4,)); give every leaf the same leading dim, or pass batch_size=8 to keep the leaves of another leading size (a shared mask, a table) replicated
    >>> check_batch_sizes({"pe": np.ones((16, 3)), "x": np.ones((8, 3)), "y": np.ones(8)})
    Traceback (most recent call last):
    tpflax._src.errors.TreeError: the batch's leaves disagree on the batch (leading) size: x has 8 examples (shape (8, 3)) but pe has 16 (shape (16, 3)); give every leaf the same leading dim, or pass batch_size=8 to keep the leaves of another leading size (a shared mask, a table) replicated
    """
    leaves = []
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = tuple(getattr(x, "shape", None) or np.shape(x))
        if shape and explicit_spec(x) is not None:
            continue
        if shape:
            leaves.append((keystr(path) or "<batch>", shape))
    if size is not None:
        # a loader's short last batch (7 of 8 examples) would be replicated whole, every leaf of "another size"
        if leaves and not any(shape[0] == size for _, shape in leaves):
            shown = "; ".join(f"{w} has {s[0]} (shape {s})" for w, s in leaves[:4])
            raise TreeError(f"no batch leaf has batch_size={size} examples ({shown}): every leaf would stay "
                            "replicated; pass the batch's own size (a short last batch: its size, or drop it)")
        return
    counts = collections.Counter(shape[0] for _, shape in leaves)
    if len(counts) < 2:
        return
    # named against the size most leaves share (the first leaf's on a tie): {"pe": (16, d), "x": (8, d),
    # "y": (8,)} sorts the table first, which is no batch
    most = max(counts, key=lambda n: (counts[n], -next(i for i, (_, s) in enumerate(leaves) if s[0] == n)))
    name, shape = next(leaf for leaf in leaves if leaf[1][0] == most)
    problems = [f"{w} has {s[0]} (shape {s})" for w, s in leaves if s[0] != most]
    raise TreeError(f"the batch's leaves disagree on the batch (leading) size: {name} has {shape[0]} examples "
                    f"(shape {shape}) but {'; '.join(problems[:4])}"
                    f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}; give every leaf the "
                    f"same leading dim, or pass batch_size={shape[0]} to keep the leaves of another leading "
                    "size (a shared mask, a table) replicated")


def check_batch_leaves(batch: Any) -> None:
    """TreeError naming every batch leaf jax cannot hold (a string, a numpy array of strings or
    objects), before anything is placed: ``device_put`` would refuse it with no path.

    >>> import numpy as np
    >>> import ml_dtypes
    >>> check_batch_leaves({"x": np.ones((4, 2), ml_dtypes.bfloat16), "step": 3})
    >>> check_batch_leaves({"x": np.ones((4, 2)), "name": "wiki"})
    Traceback (most recent call last):
    tpflax._src.errors.TreeError: the batch has leaves that are not arrays:
      - name: leaf of type str is not an array; jax takes arrays and numbers only: keep it out of the batch (e.g. a static argument of the step) or encode it as numbers
    """
    problems = []
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        where = keystr(path) or "<batch>"
        dtype = getattr(x, "dtype", None)
        if dtype is None and not isinstance(x, (int, float, complex, bool, np.generic)):
            problems.append(f"{where}: leaf of type {type(x).__name__} is not an array; jax takes arrays and "
                            "numbers only: keep it out of the batch (e.g. a static argument of the step) or "
                            "encode it as numbers")
        elif isinstance(dtype, np.dtype) and (dtype.kind in "OSUMm" or (dtype.kind == "V" and dtype.name.startswith("void"))):
            # (bfloat16, the float8s and int4 are kind "V" too, named for themselves; raw or structured voids are not)
            problems.append(f"{where}: array of dtype {dtype} (shape {tuple(np.shape(x))}) is not numeric; jax "
                            "arrays hold numbers, bools or PRNG keys: encode it as numbers (e.g. token ids) or "
                            "keep it out of the batch")
    if problems:
        raise TreeError("the batch has leaves that are not arrays", problems)


def shard_batch(batch: Any, mesh: Any, *, process_local: bool = False, batch_size: int | None = None,
                axis_roles: Mapping[str, str] | None = None) -> Any:
    """Place a batch with its leading dim split over the data/fsdp axes (scalars replicated).

    Args:
        batch: a tree of arrays with a leading batch dim.
        mesh: the mesh.
        process_local: each process passes only its own part of the global
            batch (``jax.make_array_from_process_local_data``), all parts alike, so
            the global batch dim is the part's times the process count; by default
            every process passes the same global batch.
        batch_size: the (global) batch size: a leaf whose leading dim is another size (a positional
            table, a mask shared by every example; every process passes all of it) stays replicated.
            Default: every leaf's leading dim is the batch's, and leaves disagreeing on it are refused.
        axis_roles: roles for mesh axes tpflax does not recognise by name.

    The placed arrays share no memory with numpy inputs: a loader may refill its buffer as soon as
    this returns.

    Raises:
        TreeError: a leaf is no array jax can hold (a string, an object array) or is abstract
            (``jax.ShapeDtypeStruct``: :func:`batch_sharding` gives its shardings), or the leaves
            disagree on the batch (leading) size and no ``batch_size`` says which is the batch.
        SpecError: a leaf's batch dim does not divide over the batch axes.
        OptionError: ``batch_size`` is no positive integer.
        AbstractMeshError: ``mesh`` is an ``AbstractMesh`` (no devices to place on); a ``MeshError``.

    >>> import numpy as np, tpflax
    >>> b = shard_batch({"x": np.ones((4, 3))}, tpflax.make_mesh({"data": 2}))
    >>> b["x"].sharding.spec
    P('data',)
    """
    _check_order("shard_batch(batch, mesh)", mesh, batch)
    abstract = [keystr(p) or "<batch>" for p, x in jax.tree_util.tree_flatten_with_path(batch)[0]
                if isinstance(x, jax.ShapeDtypeStruct)]
    if abstract:  # jax's bare "Argument of type <class 'jax.ShapeDtypeStruct'> is not a valid JAX type"
        raise TreeError(f"shard_batch() places arrays, but {len(abstract)} batch leaves are abstract "
                        f"(jax.ShapeDtypeStruct, e.g. {abstract[0]}): pass the arrays, or take the shardings for "
                        "jax.jit with tpflax.batch_sharding(mesh, batch)")
    if isinstance(mesh, jax.sharding.AbstractMesh):  # made into a mesh of this host's devices, placed there
        raise AbstractMeshError(f"shard_batch() places arrays, but {mesh} is an AbstractMesh, which has no devices: "
                                f"pass a jax.sharding.Mesh, e.g. tpflax.make_mesh({dict(mesh.shape)}), or take the "
                                "shardings for jax.jit with tpflax.batch_sharding(mesh, batch)")
    batch_size = _check_size(batch_size)
    mesh = device_mesh(mesh)
    spec = batch_spec(mesh, axis_roles=axis_roles)
    flat, treedef = jax.tree_util.tree_flatten(batch)
    # float64 inputs and int64 ids narrow to 32 bits, as jax narrows them, unless an id would wrap
    check_batch_leaves(batch)
    check_batch_sizes(batch, batch_size)
    check_values(batch, flat, narrow="overflow", what="the batch")
    if process_local:  # local parts of a global batch as many times longer as there are processes
        n = jax.process_count()

        def global_shape(x: Any) -> tuple[int, ...]:
            shape = tuple(np.shape(x))
            if not shape or (batch_size is not None and shape[0] * n != batch_size):
                return shape  # no batch: every process passes all of it
            return (shape[0] * n, *shape[1:])

        whole = [jax.ShapeDtypeStruct(global_shape(x), getattr(x, "dtype", None) or np.asarray(x).dtype)
                 for x in flat]
        try:
            shards = jax.tree_util.tree_leaves(batch_shardings(jax.tree_util.tree_unflatten(treedef, whole),
                                                               mesh, spec, batch_size))
        except SpecError as e:
            if n == 1:
                raise
            raise SpecError(f"the global batch ({n} processes' parts of this size) does not split over the "
                            "mesh", e.problems) from None
        out = [jax.make_array_from_process_local_data(s, np.asarray(owned(x, s))) for x, s in
               zip(flat, shards, strict=True)]
        settled(flat, shards, out)
    else:
        out = put(flat, jax.tree_util.tree_leaves(batch_shardings(batch, mesh, spec, batch_size)))
    return jax.tree_util.tree_unflatten(treedef, out)


def constrain_batch(batch: Any, mesh: Any, *, batch_size: int | None = None,
                    axis_roles: Mapping[str, str] | None = None) -> Any:
    """``with_sharding_constraint`` a batch's leading dim to the data/fsdp axes (inside jit).

    ``batch_size``: as for :func:`shard_batch` (leaves of another leading size stay replicated).

    Raises:
        SpecError: a leaf's batch dim does not divide over the batch axes.
        TreeError: the leaves disagree on the batch (leading) size and no ``batch_size`` says which is the batch.
        OptionError: ``batch_size`` is no positive integer.
    """
    _check_order("constrain_batch(batch, mesh)", mesh, batch)
    batch_size = _check_size(batch_size)
    check_batch_sizes(batch, batch_size)
    mesh = sharding_mesh(mesh)
    shards = batch_shardings(batch, mesh, batch_spec(mesh, axis_roles=axis_roles), batch_size)
    return jax.tree_util.tree_map(constrain_to, batch, shards)


def _check_size(batch_size: Any) -> int | None:
    """``batch_size`` as an int (numpy integers too), None as is; OptionError for anything else."""
    if batch_size is None:
        return None
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OptionError(f"batch_size={batch_size!r} must be a positive integer (the number of examples in the "
                          "batch), or None")
    return int(batch_size)


__all__ = ["batch_sharding", "batch_shardings", "batch_spec", "constrain_batch", "shard_batch"]
