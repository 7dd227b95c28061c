"""The collectives of one dense kernel called several times in a chain, split as a column: pure arithmetic over
the traced calls, shared by the planner's chooser (:func:`tpflax._src.planner.dataflow_rules._chained_calls`)
and the estimate (:func:`tpflax._src.cost.comm._column_items`) so the two count them alike.

Measured on compiled adamw steps, XLA:CPU data=2,model=4 (``x = d(gelu(x))`` 2, 3 and 4 calls: 1, 2 and 3
gathers and as many input-gradient sums; ``d`` on a sequence then on its mean over positions: the second call's
sum and the gather it reads at the mean's 8 rows, not the sequence's 64; ``x = x + d(gelu(x))``: 2 gathers per
call reading an activation).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChainCall:
    """One call of a chained kernel.

    Attributes:
        rows: the rows (tokens) the call contracts.
        from_input: it reads the model's own input (no input gradient computed).
        read: the rows at which a contraction reads its output (0: read by no contraction, the loss alone).
        added: its output is added back onto the stream its input comes from (``x = x + d(gelu(x))``).
    """

    rows: int
    from_input: bool
    read: int
    added: bool


def chain_calls(flow: Any, uses: Sequence[Any]) -> tuple[ChainCall, ...] | None:
    """The calls of one kernel (``uses``, its plain ``dot`` uses in trace order) if they form a chain: same
    contraction at each call, outside scans, each call but one reading, through elementwise ops, an earlier
    call's output (:attr:`Dataflow.edges` between them); else None (one call, calls of other shapes, or two or more
    reading no earlier call: ``d(a) * d(b)``)."""
    if len(uses) < 2:
        return None
    u0 = uses[0]
    if any(u.op != "dot" or u.scan_length or u.batch or len(u.kept) != 1 or u.kept != u0.kept
           or u.contracted != u0.contracted or not u.tokens for u in uses):
        return None
    path, ids = u0.path, {u.id for u in uses}
    # an earlier call's output reaching a later call's contraction straight, or through a norm that reduces over
    # it (:attr:`Dataflow.norm_fed`: ``x = d(LayerNorm(x))``, where the trace's edges stop)
    links = [(e.src_use, e.src_dim, e.dst_use, e.dst_dim) for e in flow.edges if e.src == e.dst == path]
    normed = [(a, ad, b, bd) for a, ad, b, bd, _ in getattr(flow, "norm_fed", ())]
    feeds: dict[int, set[tuple[int, int]]] = {}
    for e in flow.edges:
        feeds.setdefault(e.dst_use, set()).add((e.src_use, e.src_dim))
    for a, ad, b, _, _ in getattr(flow, "norm_fed", ()):
        feeds.setdefault(b, set()).add((a, ad))
    onto = {u.id: bool(flow.added.get((u.id, u.kept[0]), frozenset()) & feeds.get(u.id, set())) for u in uses}
    added = any(onto.values())
    for ls in (links, links + normed):
        fed = {b for a, _, b, bd in ls if a in ids and b in ids and a != b and bd in flow.uses[b].contracted}
        if sum(u.id not in fed for u in uses) <= 1:
            break
        # a chain through norms added back onto its stream (pre-norm, x = x + d(gelu(LN(x)))) is left out: XLA
        # gathers its stream once per call there (measured, 256 wide), not as a residual chain without norms
        if added:
            return None
    else:
        return None
    read: dict[int, int] = {}
    reads = [(e.src_use, e.src_dim, e.dst_use) for e in flow.edges]
    reads += [(a, ad, b) for a, ad, b, _, _ in getattr(flow, "norm_fed", ())]
    for a, ad, b in reads:
        if a in ids and ad == u0.kept[0]:
            rows = flow.uses[b].tokens or flow.uses[a].tokens
            read[a] = min(read.get(a, rows), rows)
    # added back onto a stream that carries tags (a norm's own adds carry none)
    return tuple(ChainCall(u.tokens, bool(u.from_input), read.get(u.id, 0), onto[u.id])
                 for u in uses)


def chain_collectives(calls: Sequence[ChainCall], input_grad: bool = True) -> tuple[float, int, float, int]:
    """``(rows gathered, gathers, rows summed, sums)`` of a chained kernel split as a column, its output split on
    the tensor axis: each call not reading the model's input sums its partial input gradient at its own rows
    (none where the kernel's input has no gradient, ``input_grad``); without a residual, each call whose output a
    contraction reads gathers it, at the rows that contraction reads (the last call's output, read by the loss
    alone, stays split); added back onto the stream its input comes from, XLA keeps that stream split and gathers
    it for each call reading it and again for that call's weight gradient.

    >>> c = [ChainCall(64, True, 64, False), ChainCall(64, False, 64, False), ChainCall(64, False, 0, False)]
    >>> chain_collectives(c)
    (128, 2, 128, 2)
    >>> chain_collectives([ChainCall(64, True, 8, False), ChainCall(8, False, 0, False)])
    (8, 1, 8, 1)
    >>> chain_collectives([ChainCall(64, True, 64, True), ChainCall(64, False, 64, True)])
    (128, 2, 64, 1)
    """
    later = [c for c in calls if not c.from_input]
    sums = later if input_grad else []
    if any(c.added for c in calls):
        return 2 * sum(c.rows for c in later), 2 * len(later), sum(c.rows for c in sums), len(sums)
    read = [c for c in calls if c.read]
    return sum(c.read for c in read), len(read), sum(c.rows for c in sums), len(sums)
