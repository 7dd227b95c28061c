"""The collectives a model calls by hand inside ``shard_map`` (context-parallel attention's gathers).

XLA compiles them as written, whatever the plan: the trace records each data-moving one
(``all_gather``, ``psum_scatter``, ``ppermute``, ``all_to_all``) with its group and its buffer on one
device, and its transpose when the gradient flows back through it (an ``all_gather``'s gradient is
reduce-scattered). ``psum`` is not priced here: over the axis a row layer's contraction is split on
it is the column -> row pair's all-reduce, which the pair prices with the plan's layout.

>>> from tpflax._src.trace.records import Collective
>>> [i.total for i in explicit_items((Collective("all-gather", ("model",), 1024.0, 4, 2, "all_gather"),), [])]
[1536.0]
"""

from __future__ import annotations

from collections.abc import Sequence

from tpflax._src.cost.records import CommItem


def explicit_items(collectives: Sequence, notes: list[str]) -> list[CommItem]:
    """One :class:`CommItem` per recorded collective; a note that the reshards into the bodies are not priced."""
    if collectives:
        notes.append("shard_map: the collectives its bodies call are counted as written; the reshards XLA adds "
                     "where a value's layout differs from the body's in_specs or out_specs are not")
    return [CommItem(c.kind, c.axes, c.size, c.group, c.count, c.source,
                     f"{c.source} inside shard_map, as written") for c in collectives]
