"""The copies of one collective merged into one: same ``channel_id``, pieces of one async chain.

The TPU compiler splits one collective into an async start, continuation
fusions and a done, each holding a copy of it under the same ``channel_id``;
:func:`_one_per_channel` counts it once, and :func:`_chained` tells such a chain
from distinct collectives that happen to share a channel id and shapes.
"""

from __future__ import annotations

import re
from dataclasses import replace

from tpflax._src.hlo.records import Collective
from tpflax._src.hlo.text import _attr, _Instr


def _one_per_channel(collectives: list[Collective], chained=None) -> list[Collective]:
    """Merge the copies of one collective that share a ``channel_id``: it runs once.

    XLA gives every cross-device collective its own channel id. The TPU compiler
    splits an fsdp all-gather into an ``async-collective-start`` fusion, several
    ``async_collective_fusion`` continuations (each overlapping a slice of the
    transfer with compute) and an ``async-collective-done`` fusion; every one of
    them holds a copy of the same all-gather, result shape and channel id. Counting
    each copy overstated the gathers by the number of pieces (2.65x for Llama-2-7B).

    Distinct collectives can share a channel id and shapes too (XLA:TPU's ``all-reduce-scatter``
    fusions of two layers' gradients, XLA:CPU's shard_map bodies), so a copy must also be a piece
    of the same chain: ``chained(a, b)`` (from :func:`_chained`) says whether the computations
    ``a`` and ``b`` are; without it every same-key copy in another computation is merged.
    """
    groups: dict[tuple, list[tuple[int, set[str]]]] = {}  # key -> [(index in out, computations)]
    out: list[Collective | None] = []
    for c in collectives:
        # same channel, same buffer, same groups (or permute pairs), another computation of the
        # same chain: a copy. Two of them in one computation are two.
        k = ((c.kind, c.channel_id, c.shapes, c.replica_groups, c.source_target_pairs)
             if c.channel_id is not None else None)
        if k is None:
            out.append(c)
            continue
        hits = [g for g in groups.setdefault(k, []) if c.computation not in g[1]
                and (chained is None or any(chained(c.computation, x) for x in g[1]))]
        if not hits:
            groups[k].append((len(out), {c.computation}))
            out.append(c)
            continue
        i, comps = hits[0]
        comps.add(c.computation)
        for j, more in hits[1:]:  # c joins pieces seen apart (a chain written out of order)
            comps |= more
            groups[k].remove((j, more))
            c = replace(c, pieces=c.pieces + out[j].pieces, count=max(c.count, out[j].count))
            out[j] = None
        out[i] = replace(out[i], pieces=out[i].pieces + c.pieces, is_async=True, count=max(out[i].count, c.count))
    return [c for c in out if c is not None]


def _chained(instrs: list[_Instr]):
    """``chained(a, b)``: whether computations ``a`` and ``b`` are pieces of one async chain.

    The pieces of an XLA:TPU async collective are fusions each reading the one before it (the
    in-flight buffer and its flags, through ``get-tuple-element``); two fusions that each make
    their own result from other values are two collectives. A computation nothing calls with
    ``calls=`` (the entry, a loop body) is no piece. When a caller reads operands the text does not
    define (an excerpt of a module), the pieces cannot be told apart and are taken as one chain.
    """
    defined = {(i.computation, i.name): i for i in instrs}
    callers: dict[str, set[tuple[str, str]]] = {}
    reads: dict[str, set[tuple[str, str]]] = {}
    unknown: set[str] = set()
    for ins in instrs:
        callee = _attr(ins.attrs, "calls") if "calls=" in ins.attrs else None
        for comp in re.findall(r"%?([\w.\-]+)", callee or ""):
            callers.setdefault(comp, set()).add((ins.computation, ins.name))
            for name in _names(ins.operands):
                src = defined.get((ins.computation, name))
                while src is not None and src.opcode in ("get-tuple-element", "bitcast") and _names(src.operands):
                    name = _names(src.operands)[0]
                    src = defined.get((ins.computation, name))
                if src is None:
                    unknown.add(comp)
                reads.setdefault(comp, set()).add((ins.computation, name))

    def chained(a: str, b: str) -> bool:
        if a not in callers or b not in callers:
            return False
        if callers[a] & reads.get(b, set()) or callers[b] & reads.get(a, set()):
            return True
        return a in unknown or b in unknown

    return chained


def _names(operands: str) -> list[str]:
    """The instruction names an operand list reads (shapes, layouts and ``/*index=*/`` dropped)."""
    return re.findall(r"%?([\w.\-]+)", re.sub(r"/\*.*?\*/|[a-z][a-z0-9]*\[[^\]]*\](?:\{[^}]*\})?", "", operands))
