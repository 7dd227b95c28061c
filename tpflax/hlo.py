"""Read the collectives and matmul flops of a compiled XLA program (public; see ``tpflax.dry_run``).

>>> from tpflax import hlo
>>> hlo.ring_bytes("all-reduce", 1024, 4)
1536.0
>>> hlo.dot_flops("ENTRY main {\\n  %a = f32[8,16]{1,0} parameter(0)\\n  %b = f32[16,4]{1,0} parameter(1)\\n"
...               "  ROOT %d = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}\\n}")
1024.0
"""

from tpflax._src.hlo import (
    KINDS,
    Collective,
    dot_flops,
    dtype_bytes,
    group_axes,
    parse_collectives,
    parse_replica_groups,
    ring_bytes,
    summarize,
)

__all__ = ["KINDS", "Collective", "dot_flops", "dtype_bytes", "group_axes", "parse_collectives",
           "parse_replica_groups", "ring_bytes", "summarize"]
