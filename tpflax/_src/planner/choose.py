"""The one chooser: price every candidate layout of a decision group, keep the cheapest that fits.

The rule sets find the decision groups (a column -> row pair, an embedding, an
output head, a GQA key/value set, one leaf's fsdp split) and propose candidate
layouts for each (:class:`Option`); :func:`pick` prices every candidate with
:func:`tpflax._src.cost.price.price` and scores it by step time on the target
hardware (:class:`tpflax._src.cost.price.Context`). Ties (equal step time to
1e-9) go to fewer bytes per device, then to the rule's own order. Every
candidate's cost is kept on the decisions (:class:`Alternative`), and the reason
says what the runner-up would have changed.

Memory is a constraint: :func:`fit` switches groups to their smallest
candidate, cheapest step time lost per byte saved first, until the pass's
parameters, gradients and optimizer moments fit ``device_memory``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tpflax._src.cost.price import ActComm, Context, Cost, LeafLayout, compare, price
from tpflax._src.facts.tree import narrower
from tpflax._src.planner.decision import Alternative
from tpflax._src.specs import entries, fmt_bytes, to_pspec

_TIE = 1e-9
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("tpflax_chooser_record", default=None)


@dataclass(frozen=True)
class Option:
    """One candidate layout of a group.

    Attributes:
        name: what it is called in reasons (``"vocab split"``, ``"replicate"``).
        proposals: ``((path, Proposal), ...)`` for every leaf of the group.
        acts: the activation collectives it causes per step.
        matmul: paths contracted with activations (their flops follow their split).
        whole: the group kept whole on every tensor rank (see :func:`best`).
        sums_output: its collectives move the whole output of what it divides
            (a contraction-dim split summing partial logits, a feature-split
            lookup gathering its rows), so it does not rule a whole option out
            (see :func:`best`).
        pieces: ``((path, pieces), ...)``: leaves whose weight gradient comes out split in that many pieces
            (:attr:`tpflax._src.cost.price.LeafLayout.pieces`).
        held: ``((path, parts), ...)``: leaves whose split blocks XLA gathers into that many parts of whole experts
            (:attr:`tpflax._src.cost.price.LeafLayout.held`).
    """

    name: str
    proposals: tuple[tuple[str, Any], ...]
    acts: tuple[ActComm, ...] = ()
    matmul: frozenset[str] = frozenset()
    whole: bool = False
    sums_output: bool = False
    pieces: tuple[tuple[str, int], ...] = ()
    held: tuple[tuple[str, int], ...] = ()


@dataclass
class Chosen:
    """A group after :func:`pick`: its options, their costs and the chosen index."""

    kind: str
    options: tuple[Option, ...]
    costs: tuple[Cost, ...]
    index: int
    facts: Mapping[str, Any] = field(default_factory=dict)
    tokens: int = 0  # the tokens per step it was priced at


def revise(p: Any, **changes: Any) -> Any:
    """``dataclasses.replace(p, **changes)`` for a frozen dataclass without slots or ``__post_init__``
    (a :class:`~tpflax._src.planner.builders.Proposal`), without replace's per-call field checks:
    the chooser and the fsdp pass revise every leaf's proposal, and the checks cost more than the copy."""
    q = object.__new__(type(p))
    q.__dict__.update(p.__dict__)
    q.__dict__.update(changes)
    return q


def layout(f: Any, p: Any, matmul: bool, positional: bool = False, pieces: int = 1, cast: str = "",
           held: int = 0) -> LeafLayout:
    """A leaf's :class:`LeafLayout` under proposal ``p``; ``cast``: the dtype every matmul and lookup reads it
    cast to (:attr:`State.casts`), its :attr:`LeafLayout.cast_item` where narrower than the leaf's."""
    shape = tuple(f.leaf.shape)
    spec = p.spec if len(p.spec) == len(shape) else entries(p.spec, len(shape))
    return _layout(shape, f.leaf.itemsize, spec, f.leaf.trainable, matmul, f.layers_dim, positional, pieces,
                   narrower(cast, f.leaf.itemsize), held)


@functools.lru_cache(maxsize=1 << 14)
def _layout(shape, item, spec, trainable, matmul, layers_dim, positional, pieces, cast_item, held) -> LeafLayout:
    return LeafLayout(shape, item, spec, trainable=trainable, matmul=matmul,
                      layers=1 if layers_dim is None else shape[layers_dim], positional=positional,
                      pieces=pieces, cast_item=cast_item, held=held)


@functools.lru_cache(maxsize=1 << 12)
def _pspec(spec):
    return to_pspec(spec)


def _leaves(o: Option, facts: Mapping[str, Any], positional: frozenset[str],
            casts: Mapping[str, str] | None = None) -> tuple[LeafLayout, ...]:
    """One option's leaves as priced; ``positional``: the traced tables looked up at batch-free positions
    (:attr:`State.positional`); ``casts``: :attr:`State.casts`."""
    pieces, casts, held = dict(o.pieces), casts or {}, dict(o.held)
    return tuple(layout(facts[path], p, path in o.matmul, path in positional, pieces.get(path, 1), casts.get(path, ""),
                        held.get(path, 0)) for path, p in o.proposals)


def cost_of(o: Option, facts: Mapping[str, Any], ctx: Context, positional: frozenset[str] = frozenset()) -> Cost:
    """The priced cost of one option (cached by value: alike layers are priced once)."""
    return price(_leaves(o, facts, positional), o.acts, ctx)


def _duplicates(a: Cost, b: Cost) -> bool:
    """``a`` holds more bytes *and* computes more flops per device than ``b``."""
    return (a.bytes_per_device > b.bytes_per_device * (1 + _TIE)
            and a.flops > b.flops * (1 + _TIE))


def best(costs: Sequence[Cost], whole: Sequence[bool] = (), sums_output: Sequence[bool] = ()) -> int:
    """Index of the cheapest cost: step time, then bytes per device, then order.

    A candidate that keeps the whole group on every tensor rank (``whole``) and
    so holds more bytes *and* computes more flops per device than another is
    out: it repeats, on every rank of the tensor axis, the matmuls that axis
    exists to divide (on a tiny layer the interconnect may make that faster, but
    then the mesh should not have the axis: that is :func:`tpflax.suggest_mesh`'s
    call, not the planner's). Only a split whose collectives are narrower than
    the outputs it divides rules it out this way: against a split that must
    move the whole output (``sums_output``: partial logits summed over a split
    embedding dim) step time decides, at any width.

    Measured: without this rule 140 of the 168 third-party plans (``benchmarks/third_party.py``'s tiny configs with
    the published ratios, tree-only and traced, data=2,model=4 and fsdp=2,model=4) change, their pairs kept whole,
    above the hand Megatron layout's bytes and flops per device; a GQA of 12 query and 6 key/value heads on model=4 at width 48
    compiles (XLA:CPU) to 2.10 / 0.29 / 2.16 of the hand layout's bytes / collectives / flops kept whole, against
    1.00 / 1.00 / 1.00 for "K/V replicated", though tpu-v5e's step time prices it 0.30 us against 0.69 us (at width
    1536 and 8192 tokens, 1.163 ms against 1.132 ms, step time alone keeps Megatron).

    >>> best([Cost(10, (), 0.0, 1.0), Cost(5, (), 0.0, 1.0), Cost(1, (), 0.0, 2.0)])
    1
    >>> best([Cost(10, (), 8.0, 1.0), Cost(5, (), 2.0, 3.0)], whole=[True, False])
    1
    >>> best([Cost(10, (), 8.0, 1.0), Cost(5, (), 2.0, 3.0)], whole=[True, False], sums_output=[False, True])
    0
    """
    whole = tuple(whole) or (False,) * len(costs)
    sums = tuple(sums_output) or (False,) * len(costs)
    keep = [i for i, c in enumerate(costs)
            if not (whole[i] and any(_duplicates(c, o) for o, s in zip(costs, sums, strict=True) if not s))]
    low = min(costs[i].step_time for i in keep)
    near = [i for i in keep if costs[i].step_time <= low * (1 + _TIE) + 1e-18]
    return min(near, key=lambda i: (costs[i].bytes_per_device, i))


def pick(st: Any, kind: str, options: Sequence[Option], facts: Mapping[str, Any]) -> None:
    """Price ``options``, write the cheapest one's proposals into ``st.out`` with every alternative.

    A group with a leaf forced by a rule or annotation, or with one option, takes
    the first option unpriced.
    """
    options = tuple(o for o in options if o.proposals)
    if not options:
        return
    paths = [path for path, _ in options[0].proposals]
    if len(options) == 1 or any(p in st.forced for p in paths):
        for path, p in options[0].proposals:
            if path not in st.forced:
                st.out[path] = p
        return
    ctx = st.context
    share = max((st.rows[p] for p in paths if p in st.rows), default=max(st.scale.get(p, 1.0) for p in paths))
    if share != 1.0:  # traced: a group is priced at the rows its contractions read (a pooled
        # projection's few, a decoder's shorter sequence), not at the widest layer's
        ctx = replace(ctx, tokens=max(1, round(ctx.tokens * share)))
    laid = tuple(_leaves(o, facts, st.positional, st.casts) for o in options)
    costs = tuple(price(leaves, o.acts, ctx) for leaves, o in zip(laid, options, strict=True))
    index = best(costs, [o.whole for o in options], [o.sums_output for o in options])
    record = _RECORD.get()
    if record is not None:  # alike groups (repeated layers) are the same entry: keyed by their layouts
        priced = tuple((leaves, o.acts, o.whole, o.sums_output) for leaves, o in zip(laid, options, strict=True))
        record.setdefault((priced, ctx.tokens, ctx.act_item, ctx.hardware, index), ctx)
    ch = Chosen(kind, options, costs, index, {p: facts[p] for p in paths}, ctx.tokens)
    st.chosen.append(ch)
    _write(st, ch)


@contextlib.contextmanager
def recording():
    """Collect every distinct group the chooser prices in this block, with the option it picked (keys
    of the dict yielded, each with the context it was priced in): :func:`same_picks` replays them."""
    record: dict = {}
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


def same_picks(record: Mapping[tuple, Context], mesh: Any) -> bool:
    """Whether every group of a :func:`recording` picks the same option priced on ``mesh`` (same axis
    names): then a pass on ``mesh`` whose candidates are the same (the same dims divide) decides alike.
    Without ``device_memory`` only: :func:`fit`'s moves are not replayed."""
    contexts: dict[tuple, Context] = {}  # one per pricing: alike layouts hit price()'s cache
    for (priced, *how, index), ctx in record.items():
        c = contexts.get(tuple(how))
        if c is None:
            c = contexts[tuple(how)] = replace(ctx, mesh=mesh)
        costs = tuple(price(leaves, acts, c) for leaves, acts, _, _ in priced)
        if best(costs, [o[2] for o in priced], [o[3] for o in priced]) != index:
            return False
    return True


def _write(st: Any, ch: Chosen) -> None:
    o = ch.options[ch.index]
    ranked = sorted((i for i in range(len(ch.options)) if i != ch.index), key=lambda i: ch.costs[i].step_time)
    words = _words(tuple(x.name for x in ch.options), ch.kind, ch.costs, ch.index, ranked[0],
                   ch.options[ranked[0]].whole, st.context.hardware.name, ch.tokens)
    specs = [dict(x.proposals) for x in ch.options]  # once per group, not once per leaf
    for path, p in o.proposals:
        alts = tuple(_alt(x.name, ch.kind, tuple(specs[k][path].spec), ch.costs[k], k == ch.index)
                     for k, x in enumerate(ch.options))
        prev = st.out.get(path)
        kept = prev.alternatives if prev is not None and ch.kind == "fsdp" else ()
        st.out[path] = revise(p, reason=p.reason + words, alternatives=kept + alts)


@functools.lru_cache(maxsize=1 << 12)
def _words(names: tuple[str, ...], kind: str, costs: tuple[Cost, ...], index: int, runner: int,
           runner_whole: bool, hardware: str, tokens: int) -> str:
    """The reason's tail: what the group was chosen over (repeated layers share it)."""
    c = costs[index]
    out = ""
    if costs[runner].step_time < c.step_time and runner_whole:
        out = (" (ruled out: it repeats the group's matmuls on every tensor rank, holding more bytes and "
               "flops per device; a mesh without that tensor axis is the faster choice)")
    return (f"; chosen by cost over {len(names)} {kind} layouts ({', '.join(names)}; step time on {hardware}, "
            f"{tokens} tokens per step): runner-up {compare(names[runner], costs[runner], c)}{out}")


@functools.lru_cache(maxsize=1 << 14)
def _alt(name: str, kind: str, spec: tuple, c: Cost, chosen: bool) -> Alternative:
    """One Alternative per distinct (candidate, spec, cost): repeated layers share it."""
    return Alternative(name=name, group=kind, spec=_pspec(spec), bytes_per_device=c.bytes_per_device,
                       comm_bytes=c.comm_bytes, flops=c.flops, step_time=c.step_time, chosen=chosen,
                       collectives=c.collectives)


def fit(st: Any, budget: int | None) -> list[str]:
    """Switch groups to their smallest option until the pass fits ``budget`` bytes; warnings in words.

    fsdp groups move first (they never change the compute); a tensor group moves
    only if none of its leaves has an fsdp choice on top.
    """
    if not budget:
        return []
    total = sum(cost_of(Option("", ((p, st.out[p]),)), st.facts, st.context).bytes_per_device
                for p in st.out if p in st.facts)
    if total <= budget:
        return []
    fsdp_paths = {p for ch in st.chosen if ch.kind == "fsdp" for p in ch.facts}
    moves = []
    for ch in st.chosen:
        if ch.kind != "fsdp" and fsdp_paths & set(ch.facts):
            continue
        small = min(range(len(ch.costs)), key=lambda i: (ch.costs[i].bytes_per_device, ch.costs[i].step_time))
        saved = ch.costs[ch.index].bytes_per_device - ch.costs[small].bytes_per_device
        if saved > 0:
            lost = (ch.costs[small].step_time - ch.costs[ch.index].step_time) / saved
            moves.append((ch.kind != "fsdp", lost, id(ch), ch, small, saved))
    for *_, ch, small, saved in sorted(moves, key=lambda m: m[:3]):
        if total <= budget:
            break
        ch.index = small
        _write(st, ch)
        total -= saved
    if total > budget:
        return [f"the plan's parameters, gradients and optimizer state need {fmt_bytes(total)} per device, "
                f"more than device_memory={fmt_bytes(budget)} even with the smallest candidate layouts; "
                "use a larger mesh"]
    return []
