"""What a ``shard_map`` in the forward costs beyond the plan: the collectives its bodies call by hand
(context-parallel attention's gathers), and the row split its in_specs give the whole program.

XLA compiles the collectives as written, whatever the plan: the trace records each data-moving one
(``all_gather``, ``psum_scatter``, ``ppermute``, ``all_to_all``) with its group and its buffer on one
device, and its transpose when the gradient flows back through it (an ``all_gather``'s gradient is
reduce-scattered). ``psum`` is not priced here: over the axis a row layer's contraction is split on
it is the column -> row pair's all-reduce, which the pair prices with the plan's layout, or as the body
writes it where the plan keeps the pair whole (:func:`tpflax._src.cost.comm._body_axes`).

An in_spec that cuts an activation's rows (its dims without a kernel's features: the sequence of
context-parallel attention) over a tensor axis does not stay at the body's boundary. XLA's sharding
propagation carries the row split from the boundary through the stream that feeds the body and reads
its output, and gives up the plan's tensor splits over that axis instead of resharding the
activations (measured on XLA:CPU, ``tests/test_shard_map.py``: every kernel split over ``model`` was
gathered whole before its matmul, every gradient summed over ``model``, and no column -> row pair's
all-reduce was left). The axis is then a batch axis of the step: :func:`row_split_mesh` gives it the
fsdp role for the communication model, so a leaf split over it is gathered for compute and its
gradient reduced, a leaf kept whole over it has its gradient summed over it (apart from, and before,
the sum over the other batch axes: :mod:`tpflax._src.cost.gradients`), and no pair's collective runs
over it.

>>> from tpflax._src.trace.records import Collective
>>> [i.total for i in explicit_items((Collective("all-gather", ("model",), 1024.0, 4, 2, "all_gather"),), [])]
[1536.0]
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

from tpflax._src.cost.records import CommItem
from tpflax._src.mesh import FSDP, TENSOR, MeshShape


def explicit_items(collectives: Sequence, notes: list[str], backend: str = "tpu") -> list[CommItem]:
    """One :class:`CommItem` per recorded collective (XLA:CPU moves a 16-bit buffer as float32: MaxText's bfloat16
    expert outputs, reduce-scattered by hand, are ``f32`` in the compiled program); a note that the other reshards
    into the bodies are not priced."""
    if collectives:
        notes.append("shard_map: the collectives its bodies call are counted as written; the reshards XLA adds "
                     "where a value's feature dims are laid out otherwise than the body's in_specs or out_specs "
                     "are not")
    return [CommItem(c.kind, c.axes, c.size * (cpu_wire(c.item, backend) / c.item if c.item else 1), c.group,
                     c.count, c.source, f"{c.source} inside shard_map, as written") for c in collectives]


def cpu_wire(item: int, backend: str) -> int:
    """Bytes per element a collective of ``item``-byte elements sends: XLA:CPU converts 16-bit operands to
    float32 around its collectives (a bfloat16 MaxText decoder's sums and gathers of activations are float32
    in the compiled program, ``benchmarks/results/probe_maxtext.md``); other backends send them as they are.

    >>> cpu_wire(2, "cpu"), cpu_wire(2, "tpu"), cpu_wire(4, "cpu")
    (4, 2, 4)
    """
    return 4 if backend == "cpu" and item == 2 else item


def row_split_mesh(mesh: MeshShape, row_axes: Collection[str], notes: list[str]) -> MeshShape:
    """``mesh`` with the tensor axes that a ``shard_map``'s in_specs cut activation rows over made batch axes.

    >>> from tpflax._src.mesh import mesh_shape
    >>> m = row_split_mesh(mesh_shape({"data": 2, "model": 4}), {"model"}, [])
    >>> dict(m.roles)
    {'data': 'data', 'model': 'fsdp'}
    """
    roles = dict(mesh.roles)
    moved = [a for a in mesh.names if a in row_axes and roles[a] == TENSOR and mesh.sizes[a] > 1]
    if not moved:
        return mesh
    notes.append(f"shard_map: its in_specs split activations' rows over {', '.join(moved)}; XLA carries that split "
                 "through the stream around the body, so the step's communication is priced with "
                 f"{', '.join(moved)} as a batch axis: kernels split over it are gathered for compute, every "
                 "gradient is summed over it, and the plan's tensor-parallel collectives over it do not run")
    return replace(mesh, roles=tuple((a, FSDP if a in moved else r) for a, r in mesh.roles))
