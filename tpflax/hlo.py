"""Read the collectives of a compiled XLA program (public; see ``tpflax.dry_run``).

>>> from tpflax import hlo
>>> hlo.ring_bytes("all-reduce", 1024, 4)
1536.0
"""

from tpflax._src.hlo import (
    KINDS,
    Collective,
    dtype_bytes,
    group_axes,
    parse_collectives,
    parse_replica_groups,
    ring_bytes,
    summarize,
)

__all__ = ["KINDS", "Collective", "dtype_bytes", "group_axes", "parse_collectives",
           "parse_replica_groups", "ring_bytes", "summarize"]
