"""One collective of a compiled program (:class:`Collective`), and the byte convention used to count it.

The parser (:mod:`tpflax._src.hlo.collectives`) prices each collective with the
**same** per-device convention the estimator uses, so the two can be compared.

Counting convention (ring algorithm, bytes one device sends, n = group size):

=====================  ==========================  =========================
kind                   ``S`` is                    bytes sent per device
=====================  ==========================  =========================
all-reduce             the buffer (result)         ``2 (n-1)/n * S``
all-gather             the gathered (result) buf.  ``(n-1)/n * S``
reduce-scatter         the full (operand) buffer   ``(n-1)/n * S``
all-to-all             the buffer (result)         ``(n-1)/n * S``
collective-permute     the buffer (result)         ``S``
=====================  ==========================  =========================
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def ring_bytes(kind: str, size: float, n: int) -> float:
    """Bytes one device sends for a collective under the ring algorithm.

    Args:
        kind: one of :data:`KINDS`.
        size: ``S`` as defined per kind in the module docstring (the full
            buffer: the all-reduce buffer, the gathered result, the unscattered
            operand, the all-to-all buffer, the permuted buffer).
        n: devices in the group.

    >>> ring_bytes("all-reduce", 1024, 4), ring_bytes("all-gather", 1024, 4)
    (1536.0, 768.0)
    """
    if kind == "collective-permute":
        return float(size) if n > 1 else 0.0
    if n <= 1:
        return 0.0
    factor = 2.0 if kind == "all-reduce" else 1.0
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; use one of {', '.join(KINDS)}")
    return factor * (n - 1) / n * float(size)


@dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program.

    Attributes:
        kind: all-reduce, all-gather, reduce-scatter, all-to-all or collective-permute.
        name: the HLO instruction name (of the ``-start`` op for async pairs).
        shapes: result shapes per device (several for a tuple all-reduce).
        dtypes: element types of ``shapes``.
        bytes: result bytes per device.
        replica_groups: logical device ids of every group (``()`` if unknown).
        group_size: devices per group.
        ring_bytes: bytes one device sends per execution (module convention).
        count: executions per program run (``while`` trip counts multiply).
        axes: mesh axes the groups span, when parsed with a mesh.
        dimensions: gather/scatter/split dimensions, if any.
        source_target_pairs: collective-permute pairs.
        is_async: came from a ``-start``/``-done`` pair or an ``async-start`` wrapper.
        op_name: jax provenance from the instruction's metadata.
        computation: the HLO computation holding the instruction.
        channel_id: the instruction's ``channel_id`` (None when it has none).
        pieces: how many instructions of the program make up this collective (the TPU compiler
            splits one collective into an async start, continuation fusions and a done, each
            holding a copy of it under the same ``channel_id``).
    """

    kind: str
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    bytes: int
    replica_groups: tuple[tuple[int, ...], ...]
    group_size: int
    ring_bytes: float
    count: int = 1
    axes: tuple[str, ...] = ()
    dimensions: tuple[int, ...] = ()
    source_target_pairs: tuple[tuple[int, int], ...] = ()
    is_async: bool = False
    op_name: str = ""
    computation: str = ""
    channel_id: int | None = None
    pieces: int = 1

    @property
    def dtype(self) -> str:
        """The element type (the first one for a tuple all-reduce)."""
        return self.dtypes[0] if self.dtypes else ""

    @property
    def total_ring_bytes(self) -> float:
        """``ring_bytes * count``: what this instruction sends per program run."""
        return self.ring_bytes * self.count

    @property
    def axis_label(self) -> str:
        """``"model"``, ``"data+model"``, or ``"?"`` when the axes are unknown."""
        return "+".join(self.axes) if self.axes else "?"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "shapes": [list(s) for s in self.shapes],
                "dtypes": list(self.dtypes), "bytes": self.bytes, "group_size": self.group_size,
                "replica_groups": [list(g) for g in self.replica_groups], "ring_bytes": self.ring_bytes,
                "count": self.count, "axes": list(self.axes), "op_name": self.op_name,
                "channel_id": self.channel_id, "pieces": self.pieces}


def summarize(collectives: Iterable[Collective], *, by: str = "kind", field: str = "ring_bytes") -> dict:
    """Total bytes per collective kind (or per ``(kind, axes)``).

    Args:
        collectives: from :func:`parse_collectives`.
        by: ``"kind"`` -> ``{kind: bytes}``; ``"axis"`` -> ``{(kind, "data+model"): bytes}``.
        field: ``"ring_bytes"`` (bytes each device sends, times ``count``) or
            ``"bytes"`` (result bytes, times ``count``).

    >>> c = Collective("all-gather", "ag", ((8,),), ("f32",), 32, ((0, 1),), 2, 16.0)
    >>> summarize([c, c])
    {'all-gather': 32.0}
    """
    if by not in ("kind", "axis"):
        raise ValueError(f"by must be 'kind' or 'axis', not {by!r}")
    if field not in ("ring_bytes", "bytes"):
        raise ValueError(f"field must be 'ring_bytes' or 'bytes', not {field!r}")
    out: dict = {}
    for c in collectives:
        key = c.kind if by == "kind" else (c.kind, c.axis_label)
        value = (c.ring_bytes if field == "ring_bytes" else c.bytes) * c.count
        out[key] = out.get(key, 0.0) + float(value)
    return out
