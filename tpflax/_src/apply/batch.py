"""A step's inputs: the batch dim split over the data, fsdp and expert axes of the mesh.

The layout rule itself (which axes) is :func:`tpflax._src.mesh.batch_axes`,
shared with the cost model and the dry run; this module checks divisibility
and places or constrains the arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpflax._src.apply.put import check_values, owned, put, settled
from tpflax._src.errors import MeshError, OptionError, SpecError, TreeError
from tpflax._src.facts.tree import keystr
from tpflax._src.mesh import batch_pspec, constrain_to, device_mesh, mesh_shape, sharding_mesh
from tpflax._src.specs import entry_axes


def batch_spec(mesh: Any, *, axis_roles: Mapping[str, str] | None = None) -> PartitionSpec:
    """``PartitionSpec`` splitting dim 0 over every data and fsdp axis of ``mesh`` (mesh order).

    >>> batch_spec({"data": 2, "fsdp": 2, "model": 2})
    P(('data', 'fsdp'),)
    """
    return batch_pspec(mesh_shape(mesh, axis_roles))


def batch_sharding(mesh: Any, batch: Any = None, *, axis_roles: Mapping[str, str] | None = None) -> Any:
    """The ``NamedSharding`` for a training step's inputs: batch dim over the data/fsdp axes.

    Use it as ``jax.jit`` in_shardings for the batch, or with :func:`shard_batch`.
    On a mesh with no data or fsdp axis the batch is replicated. Given ``batch`` (a
    tree of arrays or ``jax.ShapeDtypeStruct``), one sharding per leaf, scalars
    replicated: a single sharding would give a scalar leaf (a step counter) the
    batch dim it lacks, which ``jax.jit`` refuses.

    Raises:
        TreeError: a ``batch`` leaf is no array jax can hold (a string, an object array), or the leaves
            disagree on the batch (leading) size.
        SpecError: a ``batch`` leaf's batch dim does not divide over the batch axes.

    >>> import jax, tpflax
    >>> mesh = tpflax.make_mesh({"data": 2, "model": 4})
    >>> batch_sharding(mesh).spec
    P('data',)
    >>> s = batch_sharding(mesh, {"x": jax.ShapeDtypeStruct((8, 4), "float32"), "step": jax.ShapeDtypeStruct((), "int32")})
    >>> s["x"].spec, s["step"].spec
    (P('data',), P())
    """
    _check_order("batch_sharding(mesh, batch)", mesh, batch)
    mesh = sharding_mesh(mesh)
    spec = batch_spec(mesh, axis_roles=axis_roles)
    if batch is None:
        return NamedSharding(mesh, spec)
    check_batch_leaves(batch)
    check_batch_sizes(batch)
    return batch_shardings(batch, mesh, spec)


def _check_order(call: str, mesh: Any, batch: Any) -> None:
    """OptionError when the batch and the mesh are passed swapped: ``batch_sharding`` takes the mesh first, as
    jit's shardings are built, and ``shard_batch`` / ``constrain_batch`` the batch first, as they transform it;
    swapped, the batch was read as a mesh ("axis 'x' has size array([[1., ...")."""
    meshes = (jax.sharding.Mesh, jax.sharding.AbstractMesh)
    if isinstance(batch, meshes) and not isinstance(mesh, meshes):
        raise OptionError(f"the batch and the mesh are swapped; pass them as {call}")


def batch_shardings(batch: Any, mesh: jax.sharding.Mesh, spec: PartitionSpec) -> Any:
    """One ``NamedSharding`` per batch leaf: ``spec`` for arrays, replicated for scalars.

    Raises:
        TreeError: a leaf is no array jax can hold (a string, an object array).
        SpecError: a leaf's batch dim does not divide over the batch axes.
    """
    check_batch_leaves(batch)
    sizes = dict(mesh.shape)
    n = math.prod(sizes[a] for e in spec for a in entry_axes(e))
    problems = []
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = tuple(getattr(x, "shape", None) or np.shape(x))
        if shape and n > 1 and shape[0] % n:
            axes = "*".join(f"{a}={sizes[a]}" for e in spec for a in entry_axes(e))
            problems.append(f"{keystr(path) or '<batch>'}: batch dim of shape {tuple(shape)} is "
                            f"{shape[0]}, not divisible by mesh axes {axes}; use a batch size that "
                            f"is a multiple of {n}")
    if problems:
        raise SpecError("the batch does not split over the mesh", problems)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, spec if len(getattr(x, "shape", np.shape(x)))
                                                          else PartitionSpec()), batch)


def check_batch_sizes(batch: Any) -> None:
    """TreeError when the batch's array leaves (0-d ones aside) disagree on their leading (batch) size: each
    is split over the batch axes as holding the same examples, so ``{"x": (8, 32), "y": (4,)}`` (labels of
    another batch, a mask shared by every example) would be laid out as if it did, and fail or mislead later.

    >>> import numpy as np
    >>> check_batch_sizes({"x": np.ones((8, 3)), "y": np.ones(8), "step": 3})
    >>> check_batch_sizes({"x": np.ones((8, 3)), "y": np.ones(4)})
    Traceback (most recent call last):
    tpflax._src.errors.TreeError: the batch's leaves disagree on the batch (leading) size: x has 8 examples (shape (8, 3)) but y has 4 (shape (4,)); give every leaf the same leading dim, and pass a leaf that is not per-example (a shared mask, a table) apart from the batch (e.g. replicated)
    """
    first = None
    problems = []
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = tuple(getattr(x, "shape", None) or np.shape(x))
        if not shape:
            continue
        where = keystr(path) or "<batch>"
        if first is None:
            first = (where, shape)
        elif shape[0] != first[1][0]:
            problems.append(f"{where} has {shape[0]} (shape {shape})")
    if problems:
        name, shape = first
        raise TreeError(f"the batch's leaves disagree on the batch (leading) size: {name} has {shape[0]} examples "
                        f"(shape {shape}) but {'; '.join(problems[:4])}"
                        f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}; give every leaf the "
                        "same leading dim, and pass a leaf that is not per-example (a shared mask, a table) apart "
                        "from the batch (e.g. replicated)")


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


def shard_batch(batch: Any, mesh: Any, *, process_local: bool = False,
                axis_roles: Mapping[str, str] | None = None) -> Any:
    """Place a batch with its leading dim split over the data/fsdp axes (scalars replicated).

    Args:
        batch: a tree of arrays with a leading batch dim.
        mesh: the mesh.
        process_local: each process passes only its own part of the global
            batch (``jax.make_array_from_process_local_data``), all parts alike, so
            the global batch dim is the part's times the process count; by default
            every process passes the same global batch.
        axis_roles: roles for mesh axes tpflax does not recognise by name.

    The placed arrays share no memory with numpy inputs: a loader may refill its buffer as soon as
    this returns.

    Raises:
        TreeError: a leaf is no array jax can hold (a string, an object array) or is abstract
            (``jax.ShapeDtypeStruct``: :func:`batch_sharding` gives its shardings), or the leaves
            disagree on the batch (leading) size.
        SpecError: a leaf's batch dim does not divide over the batch axes.
        MeshError: ``mesh`` is an ``AbstractMesh`` (no devices to place on).

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
        raise MeshError(f"shard_batch() places arrays, but {mesh} is an AbstractMesh, which has no devices: pass a "
                        "jax.sharding.Mesh (tpflax.make_mesh(...)), or take the shardings for jax.jit with "
                        "tpflax.batch_sharding(mesh, batch)")
    mesh = device_mesh(mesh)
    spec = batch_spec(mesh, axis_roles=axis_roles)
    flat, treedef = jax.tree_util.tree_flatten(batch)
    # float64 inputs and int64 ids narrow to 32 bits, as jax narrows them, unless an id would wrap
    check_batch_leaves(batch)
    check_batch_sizes(batch)
    check_values(batch, flat, narrow="overflow", what="the batch")
    if process_local:  # local parts of a global batch as many times longer as there are processes
        n = jax.process_count()
        whole = [jax.ShapeDtypeStruct((np.shape(x)[0] * n, *np.shape(x)[1:]) if np.ndim(x) else (),
                                      getattr(x, "dtype", None) or np.asarray(x).dtype) for x in flat]
        try:
            shards = jax.tree_util.tree_leaves(batch_shardings(jax.tree_util.tree_unflatten(treedef, whole),
                                                               mesh, spec))
        except SpecError as e:
            if n == 1:
                raise
            raise SpecError(f"the global batch ({n} processes' parts of this size) does not split over the "
                            "mesh", e.problems) from None
        out = [jax.make_array_from_process_local_data(s, np.asarray(owned(x, s))) for x, s in
               zip(flat, shards, strict=True)]
        settled(flat, shards, out)
    else:
        out = put(flat, jax.tree_util.tree_leaves(batch_shardings(batch, mesh, spec)))
    return jax.tree_util.tree_unflatten(treedef, out)


def constrain_batch(batch: Any, mesh: Any, *, axis_roles: Mapping[str, str] | None = None) -> Any:
    """``with_sharding_constraint`` a batch's leading dim to the data/fsdp axes (inside jit).

    Raises:
        SpecError: a leaf's batch dim does not divide over the batch axes.
        TreeError: the leaves disagree on the batch (leading) size.
    """
    _check_order("constrain_batch(batch, mesh)", mesh, batch)
    check_batch_sizes(batch)
    mesh = sharding_mesh(mesh)
    shards = batch_shardings(batch, mesh, batch_spec(mesh, axis_roles=axis_roles))
    return jax.tree_util.tree_map(constrain_to, batch, shards)


__all__ = ["batch_sharding", "batch_shardings", "batch_spec", "constrain_batch", "shard_batch"]
