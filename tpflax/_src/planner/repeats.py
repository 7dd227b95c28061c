"""One use per weight for weights the forward pass contracts several times alike.

Two layouts make one parameter show up as several contractions of the same
dims in the trace, and both are still one column or row of a pair:

* **sliced**: ``for i in range(E): x @ w[i]`` (experts in a Python loop): each
  use reads one slice, so the uses leave the indexed dims out;
* **repeated**: one layer called N times (ALBERT's shared layer group,
  Universal Transformers): each call contracts the whole weight at the same
  place in its call's dataflow (the same partners, over the same dims);
* **joined**: one projection applied to several inputs whose outputs are joined
  before the same contraction (LongT5's transient-global keys and values, of the
  tokens and of the per-block summaries, concatenated along the keys): every use
  reaches the same consumer over the same dims, so a split of the output
  features is the same split for each. Uses reading the weight differently join
  too when one dim reaches the same consumers from each (DeBERTa's query and key
  kernels, :func:`joined_on`).

:func:`merge_uses` folds such uses into the first, so the dataflow rules pair
the weight once; a split then holds in every call.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from tpflax._src.trace.dataflow import Dataflow, Edge, Use
from tpflax._src.trace.records import remap_added

CONTRACT = ("dot", "conv")


def _position(flow: Dataflow, uid: int, inside: set[str], call: Mapping[int, int]) -> tuple:
    """Where a use sits in its call: its partners inside the repeated layer, in the same call, and the dims."""
    at = call.get(uid)
    outs = frozenset((e.src_dim, e.dst, e.dst_dim) for e in flow.edges
                     if e.src_use == uid and e.dst in inside and call.get(e.dst_use) == at)
    ins = frozenset((e.src, e.src_dim, e.dst_dim) for e in flow.edges
                    if e.dst_use == uid and e.src in inside and call.get(e.src_use) == at)
    return outs, ins


def _across(e: Edge, call: Mapping[int, int]) -> bool:
    """The edge joins two different calls of one layer (its call ``k``'s output read by call ``k + 1``)."""
    return e.src_use in call and e.dst_use in call and call[e.src_use] != call[e.dst_use]


def repeated(flow: Dataflow, uses: Sequence[Use], inside: set[str], call: Mapping[int, int] | None = None) -> bool:
    """Uses of one weight at the same place of N calls of its layer (with a partner there).

    ``inside``: the weights contracted as often, the layer's own. Edges to other
    weights differ from call to call (the first call reads the embedding's
    projection, the others the previous call's output) and are not compared.
    ``call``: each use of those weights' call (its rank among its weight's uses):
    an edge from one call to another (calls chained back to back, ``down(up(down(up(x))))``
    with no norm between, call 1's ``down`` feeding call 2's ``up``) is the
    previous call's output, not the layer's own place, and is not compared either.
    """
    call = call if call is not None else {}
    first = _position(flow, uses[0].id, inside, call)
    return bool(first[0] or first[1]) and all(_position(flow, u.id, inside, call) == first for u in uses[1:])


def _sinks(flow: Dataflow, uid: int) -> tuple:
    """Where a use's output goes: its edges (by consumer use), escapes and model outputs, by dim."""
    return (frozenset((e.src_dim, e.dst_use, e.dst_dim) for e in flow.edges if e.src_use == uid),
            frozenset(d for u, d in flow.escapes if u == uid), frozenset(d for u, d in flow.outputs if u == uid))


def joined(flow: Dataflow, uses: Sequence[Use]) -> bool:
    """Uses of one weight whose outputs all reach the same consumer uses over the same dims.

    >>> u = [Use(0, "w", "dot", (0,), (1,)), Use(1, "w", "dot", (0,), (1,)), Use(2, "o", "dot", (0,), (1,))]
    >>> e = [Edge("w", 0, 1, "o", 2, 0, 4, ()), Edge("w", 1, 1, "o", 2, 0, 4, ())]
    >>> joined(Dataflow(("w", "o"), tuple(u), tuple(e), {}, frozenset(), frozenset(), {}, frozenset(), {}), u[:2])
    True
    """
    first = _sinks(flow, uses[0].id)
    return bool(first[0]) and all(_sinks(flow, u.id) == first for u in uses[1:])


def joined_on(flow: Dataflow, uses: Sequence[Use]) -> Use | None:
    """Uses of one weight that read it differently but carry one dim alike to the same consumers: the use
    keeping that dim, to stand for them all; None if there is no such dim.

    DeBERTa's disentangled attention projects the hidden states and the relative-position embeddings with
    the same query and key kernels. The embeddings are a parameter, so the trace sees the kernel's product
    with them as a weight, contracted with the other side's queries or keys over head_dim, its heads a batch
    dim. Split over heads, every use splits alike and each reaches the attention output's projection on its
    heads, as the hidden states' projection does. A dim that any use contracts, or whose output escapes or
    leaves the model, is no such dim.

    >>> u = [Use(0, "q", "dot", (0,), (1, 2)), Use(1, "q", "dot", (2,), (), (1,)), Use(2, "o", "dot", (0, 1), (2,))]
    >>> e = [Edge("q", 0, 1, "o", 2, 0, 4, ()), Edge("q", 1, 1, "o", 2, 0, 4, ())]
    >>> flow = Dataflow(("q", "o"), tuple(u), tuple(e), {(0, 2): "dot"}, frozenset(), frozenset(), {}, frozenset(), {})
    >>> joined_on(flow, u[:2]).id
    0
    """
    dims = set.intersection(*({*u.kept, *u.batch} for u in uses))

    def sinks(uid: int, d: int) -> frozenset:
        return frozenset((e.dst_use, e.dst_dim) for e in flow.edges if e.src_use == uid and e.src_dim == d)

    for d in sorted(dims):
        if any((u.id, d) in flow.escapes or (u.id, d) in flow.outputs for u in uses):
            continue
        first = sinks(uses[0].id, d)
        if first and all(sinks(u.id, d) == first for u in uses[1:]):
            return next((u for u in uses if d in u.kept), None)
    return None


def merge_uses(flow: Dataflow, shapes: Mapping[str, tuple[int, ...]]) -> Dataflow:
    """One use for a parameter contracted once per slice or once per call of its layer.

    The uses must all read the same dims. Sliced uses leave out the indexed
    dims (experts in a loop); repeated uses sit at the same place of each call
    (see :func:`repeated`); joined uses feed the same consumers (see :func:`joined`). A weight used alike in unrelated places (a tied
    projection used twice) keeps its uses. The other uses become ``alias:<first
    id>`` (``repeat:``/``join:<first id>`` for repeated/joined ones) and their edges, escapes and outputs move to the first.

    >>> u = [Use(0, "w", "dot", (1,), (2,)), Use(1, "w", "dot", (1,), (2,))]
    >>> f = Dataflow(("w",), tuple(u), (), {}, frozenset({(1, 2)}), frozenset(), {}, frozenset(), {})
    >>> g = merge_uses(f, {"w": (2, 8, 16)})
    >>> g.uses[1].op, sorted(g.outputs)
    ('alias:0', [(0, 2)])
    """
    by_path: dict[str, list[Use]] = defaultdict(list)
    for u in flow.uses:
        if u.op in CONTRACT:
            by_path[u.path].append(u)
    alias: dict[int, int] = {}
    tag: dict[int, str] = {}
    call = {u.id: i for us in by_path.values() for i, u in enumerate(us)}
    repeats: dict[int, int] = {}  # the uses of layers merged as repeated calls: their call
    for path, us in by_path.items():
        shape = shapes.get(path, ())
        covered = set(us[0].contracted) | set(us[0].kept) | set(us[0].batch)
        missing = [d for d in range(len(shape)) if d not in covered]
        same = all((u.op, u.contracted, u.kept, u.batch) == (us[0].op, us[0].contracted, us[0].kept,
                                                              us[0].batch) for u in us)
        sliced = bool(missing) and len(us) <= math.prod(shape[d] for d in missing)
        inside = {p for p, vs in by_path.items() if len(vs) == len(us)}
        if len(us) < 2:
            continue
        if not same:
            rep = joined_on(flow, us) if all(u.op == us[0].op for u in us) else None
            if rep is not None:
                alias.update({u.id: rep.id for u in us if u is not rep})
                tag.update({u.id: "join" for u in us if u is not rep})
            continue
        how = ("alias" if sliced else None if missing else "repeat" if repeated(flow, us, inside, call)
               else "join" if joined(flow, us) else None)
        if how == "repeat":
            repeats.update({u.id: call[u.id] for u in us})
        if how:
            alias.update({u.id: us[0].id for u in us[1:]})
            tag.update({u.id: how for u in us[1:]})
    if not alias:
        return flow

    def a(uid: int) -> int:
        return alias.get(uid, uid)

    edges: dict[tuple, Edge] = {}
    for e in flow.edges:
        if _across(e, repeats):
            # one call's output read by the next call of the same layer (no norm between): merged, it would read
            # as the layer feeding itself (its row a column of its own column); each call reads the previous
            # call's output as the first call reads its input, whole after the row's sum
            continue
        e2 = dataclasses.replace(e, src_use=a(e.src_use), dst_use=a(e.dst_use))
        edges.setdefault((e2.src_use, e2.src_dim, e2.dst_use, e2.dst_dim), e2)
    uses = tuple(dataclasses.replace(u, op=f"{tag[u.id]}:{alias[u.id]}") if u.id in alias else u for u in flow.uses)
    return dataclasses.replace(
        flow, uses=uses, edges=tuple(edges.values()),
        escapes={(a(k[0]), k[1]): v for k, v in flow.escapes.items()},
        outputs=frozenset((a(u), d) for u, d in flow.outputs),
        features=frozenset((a(u), d) for u, d in flow.features),
        recurrent=frozenset(a(u) for u in flow.recurrent),
        biases={p: (a(u), al) for p, (u, al) in flow.biases.items()},
        channels={p: {a(u): al for u, al in by.items()} for p, by in flow.channels.items()},
        channelwise={p: (a(u), al) for p, (u, al) in flow.channelwise.items()},
        fused={(a(k[0]), k[1]): v for k, v in flow.fused.items()},
        cuts={(a(k[0]), k[1]): v for k, v in flow.cuts.items()},
        concats={(a(k[0]), k[1]): v for k, v in flow.concats.items()},
        concat_again={(a(k[0]), k[1]): (a(v[0]), v[1]) for k, v in flow.concat_again.items()},
        views=frozenset((a(k[0]), k[1]) for k in flow.views),
        added=remap_added(flow.added, lambda k: (a(k[0]), k[1])),
        branches={(a(k[0]), k[1]): tuple(frozenset(map(a, p)) for p in v) for k, v in flow.branches.items()})
