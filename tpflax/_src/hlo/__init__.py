"""Read a compiled XLA program's HLO text: its collectives, priced per device, and its matmul flops.

Modules:

- ``text``: the HLO text scanner (instructions, attributes, shapes, element sizes).
- ``groups``: replica groups in their HLO spellings, and the mesh axes they span.
- ``loops``: how often each computation runs (``while`` trip counts multiply).
- ``records``: the :class:`Collective` record, the ring byte convention, :func:`summarize`.
- ``collectives``: :func:`parse_collectives`; ``channels``: one collective's copies merged.
- ``flops``: :func:`dot_flops`, the FLOPs of ``dot`` and ``convolution``.
"""

from tpflax._src.hlo.collectives import parse_collectives
from tpflax._src.hlo.flops import dot_flop_counts, dot_flops
from tpflax._src.hlo.groups import group_axes, parse_replica_groups
from tpflax._src.hlo.records import KINDS, Collective, ring_bytes, summarize
from tpflax._src.hlo.text import dtype_bytes

__all__ = ["KINDS", "Collective", "dot_flop_counts", "dot_flops", "dtype_bytes", "group_axes",
           "parse_collectives", "parse_replica_groups", "ring_bytes", "summarize"]
