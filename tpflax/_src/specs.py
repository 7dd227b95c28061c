"""PartitionSpec helpers: validity, bytes per device, JSON form.

Internally a spec is a tuple with one entry per dim: ``None``, an axis name, or
a tuple of axis names. ``to_pspec`` turns it into a ``jax.sharding.PartitionSpec``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from jax.sharding import PartitionSpec

from tpflax._src.mesh import EXPERT, FSDP, MeshShape, batch_axes

Entry = Any  # None | str | tuple[str, ...]


def entry_axes(entry: Entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def normalize_entry(entry: Entry) -> Entry:
    axes = entry_axes(entry)
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def entries(spec: Any, rank: int | None = None) -> tuple[Entry, ...]:
    """A PartitionSpec / tuple / list as a tuple of normalized entries, padded to ``rank``."""
    if spec is None:
        out: tuple[Entry, ...] = ()
    else:
        out = tuple(normalize_entry(e) for e in tuple(spec))
    if rank is not None and len(out) < rank:
        out = out + (None,) * (rank - len(out))
    return out


def to_pspec(spec: Sequence[Entry]) -> PartitionSpec:
    return PartitionSpec(*spec)


def shards(entry: Entry, mesh: MeshShape) -> int:
    sizes = mesh.sizes
    return math.prod(sizes[a] for a in entry_axes(entry))


def spec_problems(path: str, shape: Sequence[int], spec: Sequence[Entry], mesh: MeshShape) -> list[str]:
    """Everything wrong with ``spec`` for a leaf of ``shape`` on ``mesh``; empty when valid."""
    problems = []
    sizes = mesh.sizes
    if len(spec) > len(shape):
        problems.append(
            f"{path}: spec {to_pspec(spec)} has {len(spec)} entries but the leaf has rank {len(shape)} "
            f"(shape {tuple(shape)}); give at most {len(shape)} entries")
        return problems
    seen: set[str] = set()
    for dim, entry in enumerate(spec):
        for axis in entry_axes(entry):
            if axis not in sizes:
                problems.append(
                    f"{path}: spec {to_pspec(spec)} names mesh axis {axis!r}, but the mesh is {mesh}; "
                    f"use one of {', '.join(sizes)}")
            elif axis in seen:
                problems.append(
                    f"{path}: spec {to_pspec(spec)} uses mesh axis {axis!r} twice; a mesh axis may shard "
                    "only one dim of a leaf")
            seen.add(axis)
        if all(a in sizes for a in entry_axes(entry)):
            n = shards(entry, mesh)
            if n > 1 and shape[dim] % n:
                problems.append(
                    f"{path}: dim {dim} of shape {tuple(shape)} has size {shape[dim]}, not divisible by "
                    f"mesh axis {describe(entry, mesh)}; shard another dim or leave dim {dim} None")
    return problems


def describe(entry: Entry, mesh: MeshShape) -> str:
    sizes = mesh.sizes
    return "*".join(f"{a}={sizes[a]}" for a in entry_axes(entry))


def local_shape(shape: Sequence[int], spec: Sequence[Entry], mesh: MeshShape) -> tuple[int, ...]:
    """Shape of the largest shard (ceil division, so padding counts on the fullest device)."""
    spec = entries(spec, len(shape))
    return tuple(-(-d // shards(e, mesh)) for d, e in zip(shape, spec, strict=False))


def bytes_per_device(shape: Sequence[int], itemsize: int | float, spec: Sequence[Entry], mesh: MeshShape) -> int:
    """Bytes of the fullest shard; a sub-byte ``itemsize`` (int4: 0.5) rounds up, as XLA packs a shard."""
    return math.ceil(math.prod(local_shape(shape, spec, mesh)) * itemsize)


def used_axes(spec: Sequence[Entry]) -> set[str]:
    return {a for e in spec for a in entry_axes(e)}


def without_axes(spec: Any, axes: set[str] | frozenset[str]) -> PartitionSpec:
    """``spec`` with ``axes`` removed from every entry: the layout of a leaf gathered over them.

    >>> without_axes(PartitionSpec(("fsdp", "model"), "fsdp"), {"fsdp"}) == PartitionSpec("model", None)
    True
    """
    out = []
    for e in tuple(spec):
        kept = tuple(a for a in entry_axes(e) if a not in axes)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    return PartitionSpec(*out)


def fsdp_axes(plan: Any) -> frozenset[str]:
    """The axes ZeRO-3 gathers for compute: fsdp-role axes, and batch axes that split a parameter.

    A parameter split over an axis the batch is also split over (a pure-FSDP
    plan on a ``data`` axis, a rule naming ``data``) must be whole along it
    for each shard of the batch, exactly as over an fsdp axis. An expert axis
    is not: an expert layer gathers its tokens over it and keeps its experts split.
    """
    return gathered_axes(plan.mesh, [d.spec for d in plan.decisions.values()])


def gathered_axes(mesh: MeshShape, specs: Sequence[Any]) -> frozenset[str]:
    """:func:`fsdp_axes` of a mesh and the specs laid out on it."""
    batch = set(batch_axes(mesh))
    used = {a for spec in specs for a in used_axes(spec)}
    return frozenset(a for a, r in dict(mesh.roles).items()
                     if a in batch and (r == FSDP or (a in used and r != EXPERT)))


def spec_to_json(spec: Sequence[Entry]) -> list[Any]:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def spec_from_json(data: Any) -> tuple[Entry, ...]:
    if not isinstance(data, list):
        raise TypeError(f"spec must be a list, got {type(data).__name__}")
    out = []
    for e in data:
        if e is None or isinstance(e, str):
            out.append(e)
        elif isinstance(e, list) and all(isinstance(a, str) for a in e):
            out.append(normalize_entry(tuple(e)))
        else:
            raise TypeError(f"spec entry {e!r} is not null, an axis name or a list of axis names")
    return tuple(out)


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: the one byte formatter every report uses.

    >>> fmt_bytes(1536)
    '1.5 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
