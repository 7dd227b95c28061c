"""Replica groups in their HLO spellings, and the mesh axes a group spans.

Replica groups are written three ways in HLO text: explicit
``{{0,1},{2,3}}``, iota ``[2,4]<=[8]`` / ``[4,2]<=[2,4]T(1,0)``, and mesh axes
``mesh['axis_0'=2,'axis_1'=4] {'axis_0'}``. All three become explicit tuples of
logical device ids; :func:`group_axes` maps them back to the mesh axes they
span (logical id ``i`` is position ``i`` of ``mesh.devices.flat``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def parse_replica_groups(text: str | None, num_devices: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Explicit groups from any of HLO's replica-group spellings.

    Args:
        text: ``{{0,1},{2,3}}``, ``[2,4]<=[8]``, ``[4,2]<=[2,4]T(1,0)``,
            ``mesh['axis_0'=2,'axis_1'=4] {'axis_0'}`` or ``{}``.
        num_devices: devices in the program, for ``{}`` (one group of all).

    >>> parse_replica_groups("[2,2]<=[2,2]T(1,0)")
    ((0, 2), (1, 3))
    >>> parse_replica_groups("mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}")  # devices 0 4 1 5 2 6 3 7
    ((0, 1, 2, 3), (4, 5, 6, 7))
    """
    import numpy as np

    if text is None:
        return ()
    text = text.strip()
    if text.startswith("mesh["):
        return _mesh_groups(text)
    m = re.fullmatch(r"\[([\d,]*)\]<=\[([\d,]*)\](?:T\(([\d,]*)\))?", text)
    if m:
        out_dims = [int(x) for x in m.group(1).split(",") if x]
        dims = [int(x) for x in m.group(2).split(",") if x]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        ids = ids.reshape(-1, out_dims[-1]) if out_dims else ids.reshape(1, -1)
        return tuple(tuple(int(x) for x in row) for row in ids)
    groups = tuple(tuple(int(x) for x in g.split(",") if x.strip())
                   for g in re.findall(r"\{([\d,\s]*)\}", text))
    groups = tuple(g for g in groups if g)
    if not groups and num_devices:
        return (tuple(range(num_devices)),)
    return groups


def _mesh_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """Groups from ``mesh['a'=2,'b'=4] {'a'}`` (sub-axes ``'a':(pre)size`` too)."""
    import numpy as np

    head = re.match(r"mesh\[(.*?)\]", text)
    axes = re.findall(r"'?([\w.\-]+)'?\s*=\s*(\d+)", head.group(1)) if head else []
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    ids = np.arange(math.prod(sizes)).reshape(sizes) if sizes else np.arange(1)
    dev = re.search(r"device_ids=\[([\d,\s]*)\]", text)
    iota = re.search(r"device_ids=\(\[([\d,]*)\](?:T\(([\d,]*)\))?\)", text)
    if dev:
        listed = [int(x) for x in dev.group(1).split(",") if x.strip()]
        if len(listed) == ids.size:
            ids = np.array(listed).reshape(sizes)
    elif iota:  # the devices in iota form: ([2,4]T(1,0)) is arange(8).reshape(2, 4).T, flattened
        dims = [int(x) for x in iota.group(1).split(",") if x]
        listed = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(2):
            listed = listed.transpose([int(x) for x in iota.group(2).split(",")])
        if listed.size == ids.size:
            ids = listed.reshape(sizes)
    brace = text.rfind("{")
    wanted = re.findall(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?", text[brace + 1:text.rfind("}")]) \
        if brace >= 0 else []
    # Split every axis into (pre, size, post) pieces so sub-axes become real dims.
    split: list[list[tuple[int, int]]] = [[(0, s)] for s in sizes]  # per axis: [(pre, size)] minor pieces
    for name, pre, size in wanted:
        if pre and name in names:
            i = names.index(name)
            split[i] = sorted(set(split[i]) | {(int(pre), int(size))})
    dims, keys = [], []
    for i, s in enumerate(sizes):
        pieces = [p for p in split[i] if p[0] > 0]
        if not pieces:
            dims.append(s)
            keys.append((names[i], None))
            continue
        # one sub-axis only is supported per axis: (pre, size, rest)
        pre, size = pieces[0]
        rest = s // (pre * size)
        dims += [pre, size, rest]
        keys += [(names[i], "pre"), (names[i], (pre, size)), (names[i], "post")]
    ids = ids.reshape(dims)
    chosen = []
    for name, pre, size in wanted:
        key = (name, (int(pre), int(size))) if pre else (name, None)
        if key in keys:
            chosen.append(keys.index(key))
    if not chosen:
        return (tuple(int(x) for x in ids.reshape(-1)),)
    others = [d for d in range(len(dims)) if d not in chosen]
    flat = ids.transpose(others + chosen).reshape(-1, math.prod(dims[d] for d in chosen))
    return tuple(tuple(int(x) for x in row) for row in flat)


def group_axes(groups: Iterable[Sequence[int]], mesh: Any) -> tuple[str, ...]:
    """Mesh axes a set of device groups spans, in mesh order.

    Logical device id ``i`` is the ``i``-th device of the mesh in row-major
    order (``mesh.devices.flat``), which is how jax assigns devices to a
    program compiled with shardings on that mesh.

    Args:
        groups: device id groups (or collective-permute ``(source, target)`` pairs).
        mesh: anything :func:`tpflax.mesh_shape` accepts.

    >>> group_axes([(0, 4), (1, 5), (2, 6), (3, 7)], {"data": 2, "model": 4})
    ('data',)
    """
    axes = mesh_axes(mesh)
    sizes = [s for _, s in axes]
    total = math.prod(sizes)
    varying = set()
    for g in groups:
        coords = [_unravel(i % total, sizes) for i in g]
        for d in range(len(sizes)):
            if len({c[d] for c in coords}) > 1:
                varying.add(d)
    return tuple(axes[d][0] for d in sorted(varying))


def mesh_axes(mesh: Any) -> tuple[tuple[str, int], ...]:
    """``((name, size), ...)`` of a mesh given in any common form (no role checks).

    >>> mesh_axes("data=2,model=4")
    (('data', 2), ('model', 4))
    """
    from tpflax._src.mesh import MeshShape, parse_mesh_string

    if isinstance(mesh, MeshShape):
        return mesh.axes
    if isinstance(mesh, str):
        return tuple(parse_mesh_string(mesh).items())
    if isinstance(mesh, Mapping):
        return tuple((str(k), int(v)) for k, v in mesh.items())
    names = getattr(mesh, "axis_names", None)
    if names is not None and hasattr(mesh, "shape"):
        return tuple((n, int(mesh.shape[n])) for n in names)
    return tuple((str(n), int(s)) for n, s in mesh)


def _unravel(i: int, sizes: Sequence[int]) -> tuple[int, ...]:
    out = []
    for s in reversed(sizes):
        out.append(i % s)
        i //= s
    return tuple(reversed(out))
