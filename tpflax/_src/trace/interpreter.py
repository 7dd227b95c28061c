"""The jaxpr walk: what is known about each value, and the loop that visits equations.

A :class:`Walk` visits a jaxpr once (loop bodies to a fixed point). For every
equation it reads what it knows about the inputs (:class:`Val`), looks the
primitive up in its ``{primitive name: handler}`` table
(:data:`tpflax._src.trace.handlers.HANDLERS`) and stores what the handler says
about the outputs. The handlers record uses, edges and escapes on the walk.

A *tag* is one kept parameter dim of one use: ``(use id, param dim) -> (limit,
via)``, where ``limit`` says how far the dim can be split on the way (a split over
``n`` stays local while ``n`` divides it: the gcd of the activation dim sizes along
the way, or more where a reshape cuts the dim and the split runs on into its minor
part, see :mod:`tpflax._src.trace.reshape`) and ``via`` the notable ops
passed. The minor part of a cut dim carries the key :func:`minor_key` of the tag.

>>> w = Walk(handlers={}, fallback=opaque)
>>> w.merge([{(0, 1): (64, ())}, {(0, 1): (48, ("mul",))}], "tanh")
{(0, 1): (16, ('mul', 'tanh'))}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tpflax._src.trace.records import Crossing, Product, Use

TagMap = dict  # (use id, param dim) -> (limit, via)

EMPTY: TagMap = {}

# Names worth reporting in a reason ("through logistic, mul").
def minor_key(k: tuple[int, int]) -> tuple[int, int]:
    """The key of the minor part of a tagged dim a reshape cut (and back: it is its own inverse).

    A negative param dim marks it: ``(use id, ~param dim)``.

    >>> minor_key((3, 1)), minor_key(minor_key((3, 1))), is_minor(minor_key((3, 1)))
    ((3, -2), (3, 1), True)
    """
    return (k[0], ~k[1])


def is_minor(k: tuple[int, int]) -> bool:
    return k[1] < 0


# A piece key (see :meth:`Walk.piece`) is ``(use id, param dim + PIECE * n)``: no kernel has this many dims.
PIECE = 1 << 16

# A sunk minor key (see :meth:`Walk.sink`) is ``(use id, ~param dim - SUNK * n)``: the minor part of an earlier cut of
# a dim whose major part a later reshape cut again (a head_dim under heads regrouped ``(kv_heads, groups)``).
SUNK = 1 << 20

# A part key (see :meth:`Walk.part_key`) is ``(use id, param dim + PART)``: the minor part of a kernel dim a reshape
# of the parameter cut (DBRX's experts stored ``(E * f, d)``, read as ``(E, f, d)``: the ``f`` of the stored dim).
PART = 1 << 30


NOTABLE = frozenset({"mul", "div", "logistic", "tanh", "exp", "erf", "erfc", "max", "min",
                     "dot", "integer_pow", "square", "sqrt", "rsqrt", "log"})


SLICED = "sliced (a split of the dim needs its other shards)"  # the escape of a slice that is no equal piece


@dataclass(frozen=True)
class Val:
    """What the walk knows about one jaxpr value.

    Attributes:
        rank: the value's rank.
        origin: ``(path, leaf dim per value dim)`` for values that are parameters
            (or views of them, or weights computed from weights).
        tags: per value dim, the tags it carries; None when it carries none.
        onehot: a one-hot encoding (``iota == ids``): a matmul with it is a lookup.
        iota: an ``iota`` (or arithmetic on one).
        fresh: use id whose raw output this is (bias detection).
        const_of: scan trip count when a parameter enters a loop body unchanged.
        picks: ``(major dim, minor dim, tags)`` for a tagged dim a reshape cut into
            ``(pieces, heads, ...)`` (timm's ``qkv.reshape(b, n, 3, heads, head_dim)``): the tags
            the minor dim takes once the major dim is cut into single pieces (:meth:`Walk.pick`).
        gains: ``(path, leaf dim per value dim)`` of per-channel parameters combined elementwise with
            activations that carry no tag along their dims (flax's LayerNorm: ``rsqrt(var) * scale``): when
            the value meets a tagged activation, they are that activation's channels.
        live: computed from a parameter (the backward computes its gradient); the model's
            inputs, constants and what only they make are not.
        fed: computed from the model's inputs (token ids, pixels); parameters, constants and
            what only they make (``arange`` positions) are not.
        deps: the parameters it is computed from, as a bit mask over the traced parameter paths
            (:attr:`Walk.bits`); a value carrying ``origin`` also depends on those paths' bits.
        parts: ``(path, per value dim (leaf dim, major value dim, major size) or None)`` for a parameter a reshape
            cut a leaf dim of into ``(major, minor)`` (DBRX's experts stored ``(E * f, d)`` and read as ``(E, f, d)``):
            the minor value dim is a part of that leaf dim too, which ``origin`` maps to its major dim alone. A split
            of the stored dim over ``n`` dividing the major size holds whole minor parts (whole experts), so the
            contractions reading the minor part meet on the leaf dim (:func:`tpflax._src.trace.contractions.dot_general`).
    """

    rank: int
    origin: tuple[tuple[str, tuple[int | None, ...]], ...] = ()
    tags: tuple[TagMap, ...] | None = None
    onehot: bool = False
    iota: bool = False
    fresh: int | None = None
    const_of: int = 0
    picks: tuple[tuple[int, int, TagMap], ...] = ()
    live: bool = False
    fed: bool = False
    gains: tuple[tuple[str, tuple[int | None, ...]], ...] = ()
    deps: int = 0
    parts: tuple[tuple[str, tuple[tuple[int, int, int] | None, ...]], ...] = ()

    def part_of(self, path: str) -> tuple[tuple[int, int, int] | None, ...]:
        """Per value dim, the ``(leaf dim, major value dim, major size)`` whose minor part it is (:attr:`parts`)."""
        return next((ps for p, ps in self.parts if p == path), (None,) * self.rank)

    @property
    def constant(self) -> bool:
        """Computed from neither parameters nor inputs, no ``iota`` or one-hot (NetKet's autoregressive mask, a
        group's irreps): no activation; a parameter combined with constants alone is still a weight."""
        return not (self.origin or self.live or self.fed or self.tags is not None or self.iota or self.onehot)

    def dim_tags(self, d: int) -> TagMap:
        return self.tags[d] if self.tags is not None else EMPTY


def rank_of(v: Any) -> int:
    return len(getattr(v.aval, "shape", ()))


Handler = Callable[["Walk", Any, list[Val], tuple, list[int]], list[Val]]


@dataclass
class Walk:
    """The walk's state: the handler table and what it has recorded so far.

    Attributes:
        handlers: ``{primitive name: handler(walk, eqn, ins, ctx, out ranks)}``.
        fallback: the handler for primitives not in the table.
        uses, edges, escapes, outputs, recurrent, biases, channelwise, elementwise, channels, scanned,
            fused, products, n_eqns: the findings
            (``reads`` feeds :attr:`Dataflow.shared`) (see :class:`tpflax._src.trace.records.Dataflow`).
        spills: ``{tag: major size}`` for tags whose split may run on into the minor part
            of a dim a reshape cut (``(heads) -> (kv_heads, groups)``).
        caps: ``{tag: size}``: a minor part was reduced, sliced or contracted, so a split of
            the tag stays within the major part; applied to its edges' limits at the end.
        joined: tags added to an activation that lacks them (a residual add): a reduction over
            their dim ends them, as over a model input's. ``normed``: ``{tag: width}``, tags a norm reduced
            over (a ``width`` wide dim) and let through; see :meth:`edge`. ``widths``: ``{use id: elements
            it contracts per row}``.
        spread: ``{tag: rows}``: the most rows of an elementwise combination of activations the tag's
            dim reached (see :attr:`tpflax._src.trace.records.Dataflow.spread`).
        grown: ``{tag: rows}``: the most rows the tag's dim reached through a contraction with a value of
            neither parameters nor inputs that widens it (see :attr:`tpflax._src.trace.records.Dataflow.grown`).
        resequenced: tags a reshape merged, as the minor part, into a dim whose major part carries no tag (the
            rows; see :attr:`tpflax._src.trace.records.Dataflow.resequenced`).
    """

    handlers: Mapping[str, Handler]
    fallback: Handler
    uses: list[Use] = field(default_factory=list)
    use_key: dict[Any, int] = field(default_factory=dict)
    edges: dict[tuple[int, int, int, int], tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    escapes: dict[tuple[int, int], str] = field(default_factory=dict)
    outputs: set[tuple[int, int]] = field(default_factory=set)
    features: set[tuple[int, int]] = field(default_factory=set)  # of those, on an output's last dim
    recurrent: set[int] = field(default_factory=set)
    biases: dict[str, tuple[int, dict[int, int]]] = field(default_factory=dict)
    channelwise: dict[str, tuple[int, dict[int, int]]] = field(default_factory=dict)
    elementwise: set[str] = field(default_factory=set)
    combined: dict[str, list[frozenset[int]]] = field(default_factory=dict)
    channels: dict[str, dict[int, dict[int, int]]] = field(default_factory=dict)
    scanned: dict[str, int] = field(default_factory=dict)
    fused: dict[tuple[int, int], int] = field(default_factory=dict)
    spills: dict[tuple[int, int], int] = field(default_factory=dict)
    caps: dict[tuple[int, int], int] = field(default_factory=dict)
    sunk: dict[tuple[int, int], tuple[tuple[int, int], int]] = field(default_factory=dict)  # Walk.sink: key -> (tag, cap)
    cut: set[tuple[int, int]] = field(default_factory=set)  # tags whose dim a reshape cut into (major, minor): heads
    spread: dict[tuple[int, int], int] = field(default_factory=dict)
    alongside: set[tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=set)
    grown: dict[tuple[int, int], int] = field(default_factory=dict)
    # tags a reshape merged into a dim led by an untagged one (the rows): Dataflow.resequenced
    resequenced: set[tuple[int, int]] = field(default_factory=set)
    gated: set[tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=set)  # tags multiplied together
    joined: set[tuple[int, int]] = field(default_factory=set)  # tags added to an activation lacking them
    # tags added to an activation lacking them, statistics of the tagged value too -> the other operands' tags
    added: dict[tuple[int, int], set[tuple[int, int]]] = field(default_factory=dict)
    extrema: set[tuple[int, int]] = field(default_factory=set)  # tags a max or min reduced over (a softmax's)
    normed: dict[tuple[int, int], int] = field(default_factory=dict)  # tag -> width a norm reduced it over
    stats: dict[tuple[int, int], int] = field(default_factory=dict)  # tag -> the sums a norm reduced it by
    # (tag, use id, use dim): a norm over the tag's dim contracted straight by that use, where the tag ends (edge)
    norm_fed: set[tuple[tuple[int, int], int, int]] = field(default_factory=set)
    # the joined tags (a residual stream's writers) each sum over a joined dim first ends (a norm over the stream),
    # with the uses recorded before it
    stream_ends: list[tuple[frozenset[tuple[int, int]], int]] = field(default_factory=list)
    widths: dict[int, int] = field(default_factory=dict)  # use id -> the elements it contracts per row
    bits: dict[str, int] = field(default_factory=dict)  # parameter path -> its bit in Val.deps
    grad_deps: dict[int, int] = field(default_factory=dict)  # use id -> Val.deps of the activation it reads
    reads: dict[int, tuple[Any, int, tuple]] = field(default_factory=dict)  # use id -> (dot eqn, operand, ctx)
    products: dict[tuple[tuple, int], Product] = field(default_factory=dict)  # (ctx, id(eqn)) -> Product
    # (kernel dims a product of two activations sums, elements a split of one makes it all-reduce, runs)
    split_sums: list[tuple[frozenset[tuple[int, int]], int, int]] = field(default_factory=list)
    # the same, of an elementwise product one side of which lax broadcasts along the other's features
    broadcast_sums: list[tuple[frozenset[tuple[int, int]], int, int]] = field(default_factory=list)
    # per broadcast sum, the kernel dims the broadcast side carries (whose gradient it sums into)
    broadcast_sides: list[frozenset[tuple[int, int]]] = field(default_factory=list)
    # (kernel dims one side of a product of two activations contracts, the other side's, that side's elements, runs)
    split_grads: list[tuple[frozenset[tuple[int, int]], frozenset[tuple[int, int]], int, int]] = field(
        default_factory=list)
    lengths: dict[int, int] = field(default_factory=dict)  # id(scan eqn) -> its trip count
    pending: tuple[int, ...] | None = None  # the last attention-score shape recorded, until its probs @ v
    pending_key: tuple[tuple, int] | None = None  # its key in ``products``: the softmax's ``exp`` marks it
    pieces: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # piece key -> its kernel dim
    piece_ids: dict[Any, int] = field(default_factory=dict)  # (kernel dim, piece) -> n of its key
    cuts: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)  # unequal pieces' sizes
    # tag -> the static slices taken of its dim: {(start, size, dim size)} (unequal pieces when they tile it)
    slices: dict[tuple[int, int], set[tuple[int, int, int]]] = field(default_factory=dict)
    piece_no: dict[tuple[int, int], int] = field(default_factory=dict)  # piece key -> its index in the cut
    # (id of a value, dim) that static slices cut into unequal pieces, each element in one -> the pieces' starts
    # in order (:func:`tiled_slices`)
    tiled: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)
    views: set[tuple[int, int]] = field(default_factory=set)  # fused dims cut apart by a reshape (Walk.pick)
    padded: set[tuple[int, int]] = field(default_factory=set)  # fused dims cut into equal pieces by static slices
    parts: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # part key -> its kernel dim
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # parameter path -> its stored shape
    parted: dict[str, dict[int, int]] = field(default_factory=dict)  # path -> {leaf dim: major size} (Dataflow.parted)
    # kernels' outputs put side by side by a concatenate (handlers._joined_columns): per input its tag keys on the
    # joined dim, the inputs' sizes along it and the concatenation's rows (Dataflow.concats)
    concats: list[tuple[tuple[frozenset, ...], tuple[int, ...], int]] = field(default_factory=list)
    # id of a concatenation's output (or a cast of it) -> (the value, kept alive: ids are reused; its index in
    # ``concats``; its joined dim), and per index the (use id, kernel dim) contracting that value's joined dim as it is
    concat_vals: dict[int, tuple[Any, int, int]] = field(default_factory=dict)
    concat_reads: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    split: dict[tuple[str, int], int] = field(default_factory=dict)  # (path, leaf dim) -> shards in a shard_map body
    ragged: dict[int, Any] = field(default_factory=dict)  # id(ragged_dot_general eqn) -> the view dot_general reads
    # path -> ((leaf dim, mesh axes, sizes), ...) the first shard_map it enters lays it out over (Dataflow.in_specs)
    in_specs: dict[str, tuple[tuple[int, tuple[str, ...], tuple[int, ...]], ...]] = field(default_factory=dict)
    axis_sizes: dict[str, int] = field(default_factory=dict)  # the mesh of the shard_map body being walked
    row_shards: int = 1  # a shard_map body's activations hold 1/row_shards of the rows (its batch split)
    body_rows: int = 0  # the rows (whole) of the activations a shard_map body takes: the tokens its ragged dots route
    rematted: set[int] = field(default_factory=set)  # ids of the fully rematerialised calls walked into
    row_axes: set[str] = field(default_factory=set)  # mesh axes shard_map in_specs cut activations' rows over
    collectives: dict[tuple, tuple] = field(default_factory=dict)  # (ctx, id(eqn)) -> its Collectives
    # (use id, param dim, mesh axes): a tagged dim a with_sharding_constraint lays out over those axes
    constraints: set[tuple[int, int, tuple[str, ...]]] = field(default_factory=set)
    split_widths: set[tuple[int, tuple[str, ...]]] = field(default_factory=set)
    # id -> the value a constraint or a shard_map's out_specs lays out (kept alive: ids are reused), and the uses
    # that contract such a value as it is, with no op between (Dataflow.direct)
    pinned: dict[int, Any] = field(default_factory=dict)
    direct: set[int] = field(default_factory=set)
    derived: set[int] = field(default_factory=set)  # uses whose kernel is not the parameter's own value
    # rows of an input-derived activation gathered or scattered along its leading dim at indices the inputs give
    # (a GNN's ``h[senders]``, ``segment_sum(m, receivers)``): they cross the batch split
    crossed: list[str] = field(default_factory=list)
    # what each of them moves, and each per-example pick or spread (records.Crossing)
    crossings: list[Any] = field(default_factory=list)
    # id -> (the value a crossing gather reads, its key): gathers of one value share its reshard (kept alive: ids are
    # reused)
    cross_keys: dict[int, tuple[Any, int]] = field(default_factory=dict)
    ffts: list[str] = field(default_factory=list)  # FFTs of input-derived activations (XLA:CPU gathers them)
    fft_reads: list[Any] = field(default_factory=list)  # every FFT's operand and output (records.FftRead)
    # use id -> (the contraction's place in the walk, elements, item bytes, sizes of its batch dims no parameter dim
    # makes) of the array a contraction with activations reads as its kernel where it is not the parameter's own
    # value (Dataflow.expanded); and id -> (value, [(use id, (elements, item bytes))]) of a lookup's output at
    # constant indices, which a contraction may read (the value kept alive: ids are reused)
    expanded: dict[int, tuple[int, int, int, tuple[int, ...]]] = field(default_factory=dict)
    fixed_looks: dict[int, tuple[Any, list[tuple[int, tuple[int, int]]]]] = field(default_factory=dict)
    n_eqns: int = 0
    # id of a parameter's own Val (as analyze seeds it) -> its path, and per path what reads that Val: a static
    # slice's (start, limit) per dim, or None for anything else (Dataflow.sliced)
    raw: dict[int, str] = field(default_factory=dict)
    raw_reads: dict[str, list[tuple[tuple[int, int], ...] | None]] = field(default_factory=dict)

    # -- the run loop ----------------------------------------------------

    def run(self, jaxpr: Any, args: Sequence[Val], ctx: tuple = ()) -> list[Val]:
        """Walk ``jaxpr`` on ``args``; returns what is known about its outputs."""
        env: dict[Any, Val] = {}
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a
        for v in jaxpr.constvars:
            env[v] = Val(rank_of(v))
        self.tiled.update(tiled_slices(jaxpr))

        def read(v: Any) -> Val:
            if type(v).__name__ == "Literal":
                return Val(rank_of(v))
            return env.get(v) or Val(rank_of(v))

        for eqn in jaxpr.eqns:
            self.n_eqns += 1
            ins = [read(v) for v in eqn.invars]
            if self.raw:
                self.note_raw_reads(eqn, ins)
            outs = made = self.eqn(eqn, ins, ctx)
            if any(i.live or i.origin for i in ins):
                outs = [o if o.live else dataclasses.replace(o, live=True) for o in outs]
            if any(i.fed for i in ins):
                outs = [o if o.fed else dataclasses.replace(o, fed=True) for o in outs]
            deps = 0
            for i in ins:
                deps |= self.deps_of(i)
            if deps:
                outs = [o if o.deps | deps == o.deps else dataclasses.replace(o, deps=o.deps | deps) for o in outs]
            for a, o in zip(made, outs, strict=True):
                if a is not o and id(a) in self.concat_vals:  # the flags' copy is the concatenation's value now
                    self.concat_vals[id(o)] = (o, *self.concat_vals.pop(id(a))[1:])
            for v, o in zip(eqn.outvars, outs, strict=True):
                if type(v).__name__ != "DropVar":
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[Val], ctx: tuple) -> list[Val]:
        ranks = [rank_of(v) for v in eqn.outvars]
        handler = self.handlers.get(eqn.primitive.name, self.fallback)
        if eqn.primitive.name == "exp" and self.pending is not None:
            self.note_softmax(eqn)
        try:
            return handler(self, eqn, ins, ctx, ranks)
        except KeyError as e:
            # A parameter this jax version names differently: end the chains through
            # it (the tree heuristics decide those leaves) rather than fail the plan.
            return opaque(self, eqn, ins, ctx, ranks, why=f"unreadable parameter {e}")

    # -- recording -------------------------------------------------------

    def note_raw_reads(self, eqn: Any, ins: list[Val]) -> None:
        """What reads a parameter's own Val: a static ``slice`` (UViT's ``pos[:, :n]``), its window; any other
        primitive, None. A call passes the Val on to its body, whose equations are the reads."""
        from tpflax._src.trace.control import CALLS

        if eqn.primitive.name in CALLS:
            return
        for v in ins:
            path = self.raw.get(id(v))
            if path is None:
                continue
            window = None
            if eqn.primitive.name == "slice" and not any(n > 1 for n in (eqn.params.get("strides") or ())):
                window = tuple(zip(eqn.params["start_indices"], eqn.params["limit_indices"], strict=True))
            self.raw_reads.setdefault(path, []).append(window)

    def note_softmax(self, eqn: Any) -> None:
        """An ``exp`` of the pending scores' shape (their softmax): its dtype's width goes on the product."""
        aval = eqn.outvars[0].aval
        p = self.products.get(self.pending_key) if self.pending_key is not None else None
        if p is not None and sorted(aval.shape) == sorted(p.shape):
            self.products[self.pending_key] = dataclasses.replace(p, softmax=max(p.softmax, aval.dtype.itemsize))

    def escape(self, m: TagMap, why: str) -> None:
        for k in m:
            if is_minor(k):
                self.cap(k)
            else:
                self.escapes.setdefault(k, why)

    def cap_minor(self, m: TagMap) -> None:
        """Cap the minor parts in ``m``; the major ones keep their split."""
        for k in m:
            if is_minor(k):
                self.cap(k)

    def cap(self, k: tuple[int, int]) -> None:
        """The minor part ``k`` of a cut dim needs its other shards: its tag splits only the major part."""
        if k in self.sunk:
            major, size = self.sunk[k]
        else:
            major = minor_key(k)
            size = self.spills.get(major, 1)
        self.caps[major] = math.gcd(self.caps.get(major, 0), size)

    def sink(self, k: tuple[int, int], size: int) -> tuple[int, int]:
        """A key for the live minor part of tag ``k`` whose major part a later reshape cuts again: (8 heads, head_dim)
        regrouped (2 kv heads, 4 groups, head_dim) by a GQA. The head_dim's cap stays its own cut's major ``size`` (the
        8 heads), not the new cut's (2): :attr:`spills` is one size per tag, the gcd of every cut's major part."""
        sk = (k[0], ~k[1] - SUNK * (1 + len(self.sunk)))
        self.sunk[sk] = (k, size)
        return sk

    def fuse(self, m: TagMap, pieces: int) -> None:
        """The tagged dims in ``m`` are cut into ``pieces`` equal parts (a fused qkv's output)."""
        for k in m:
            if is_minor(k):
                self.cap(k)
            else:
                self.fused[k] = max(self.fused.get(k, 1), pieces)

    def slice_of(self, m: TagMap, start: int, size: int, total: int) -> None:
        """The tagged dims in ``m`` (of ``total`` elements) are sliced at ``[start, start + size)`` (the minor
        parts of cut dims are capped by the caller's :meth:`fuse` or :meth:`escape`)."""
        for k in m:
            if not is_minor(k):
                self.slices.setdefault(k, set()).add((start, size, total))

    def piece(self, v: Val, axis: int, key: Any, index: int) -> Val:
        """``v`` with the tags of dim ``axis`` under keys of their own: one piece of an unequal split.

        A parallel block's fused input projection is cut into q, k, v, gate and up; the pieces go to
        different places (q to the attention's output projection, gate and up to the MLP's down
        projection, an MQA key into a product that sums it). Each piece keeps a key of its own, so
        one piece that ends does not end the others and each piece's consumers are told apart;
        :meth:`root` gives the kernel dim back. ``key`` names the split, ``index`` the piece in it.
        """
        if v.tags is None or not v.tags[axis]:
            return v
        out = {}
        for k, lv in v.tags[axis].items():
            if is_minor(k):
                self.cap(k)
                continue
            root = self.root(k)
            n = self.piece_ids.setdefault((root, key, index), len(self.piece_ids) + 1)
            pk = (root[0], root[1] + PIECE * n)
            self.pieces[pk] = root
            self.piece_no[pk] = index
            out[pk] = lv
        tags = tuple(out if d == axis else t for d, t in enumerate(v.tags))
        return dataclasses.replace(v, tags=tags if any(tags) else None, fresh=None)

    def pick(self, v: Val, out: Val, axis: int, pieces: int) -> Val:
        """``out``, one of ``pieces`` single slices of ``v`` along ``axis``, with the tags of a pick.

        A fused ``[q|k|v]`` output reshaped to ``(3, heads, head_dim)`` and indexed on the 3 (timm's
        ``q, k, v = qkv[0], qkv[1], qkv[2]``, ``jnp.unstack``) is the fused dim cut into equal pieces,
        like ``jnp.split`` of it: the heads dim of each piece carries the fused kernel's tags on, and
        the kernel is marked fused. The dims of ``out`` are those of ``v`` (the sliced dim kept).
        """
        tags = list(out.tags or ({},) * out.rank)
        found = False
        for a, b, t in v.picks:
            if a == axis and t:
                self.fuse(t, pieces)
                self.views.update(self.root(k) for k in t if not is_minor(k))
                # a spill of the picked dim into this one (reshape.spill) ends with the pick: the dim's own tags go on
                drop = {minor_key(k) for k in t if not is_minor(k)}
                tags[b] = self.merge([{k: x for k, x in tags[b].items() if k not in drop}, t])
                found = True
        if not found:
            return out
        return dataclasses.replace(out, tags=tuple(tags) if any(tags) else None,
                                   picks=tuple(p for p in out.picks if p[0] != axis))

    def root(self, k: tuple[int, int]) -> tuple[int, int]:
        """The ``(use id, param dim)`` a tag key stands for (a piece key's or a part key's kernel dim)."""
        r = self.pieces.get(k)
        return r if r is not None else self.parts.get(k, k)

    def part_key(self, uid: int, dim: int) -> tuple[int, int]:
        """The tag key of the minor part of kernel dim ``dim`` of use ``uid`` (:attr:`Val.parts`)."""
        pk = (uid, dim + PART)
        self.parts[pk] = (uid, dim)
        return pk

    def escape_all(self, val: Val, why: str) -> None:
        if val.tags is not None:
            for m in val.tags:
                self.escape(m, why)

    def cross(self, kind: str, ctx: tuple, whole: Any, rows: Any, read: Val | None, live: bool,
              indices: int = 0) -> None:
        """Record a gather or scatter of rows across the batch split (:class:`records.Crossing`): ``whole`` and
        ``rows`` are the abstract indexed array and moved rows, ``read`` the value a graph net's gather reads (None:
        a scatter or a per-example pick, which share nothing). Gathers of one value share the first one's key."""
        key = len(self.crossings)
        if read is not None:
            key = self.cross_keys.setdefault(id(read), (read, key))[1]
        self.crossings.append(Crossing(kind, math.prod(whole.shape), math.prod(rows.shape), whole.dtype.itemsize,
                                       key, live, math.prod(self.lengths.get(c, 1) for c in ctx if isinstance(c, int)),
                                       indices))

    def deps_of(self, v: Val) -> int:
        """``v.deps`` with the bits of the parameters it is a view of (:attr:`Val.origin`)."""
        deps = v.deps
        for path, _ in v.origin:
            deps |= self.bits.get(path, 0)
        return deps

    def note_grad(self, uid: int, act: Val) -> None:
        """Record the parameters the activation use ``uid`` contracts is computed from (every call's, OR-ed:
        a loop's later steps read a carry its first did not). A value computed from a parameter the walk
        lost track of (no bits) counts as computed from all of them."""
        deps = self.deps_of(act) or (-1 if act.live else 0)
        self.grad_deps[uid] = self.grad_deps.get(uid, 0) | deps

    def use(self, ctx: tuple, eqn: Any, path: str, op: str, contracted, kept, batch, scan_length,
            rows: int = 0, dtype: str = "", grouped: int | None = None, from_input: bool = False,
            fixed: bool = False, looked: tuple[int, ...] = (), in_rows: int = 0, grouped_in: int | None = None,
            per_head: int = 1) -> int:
        key = (ctx, id(eqn), path)
        if key in self.use_key:
            u = self.uses[self.use_key[key]]
            if (u.fixed and not fixed) or (u.from_input and not from_input):
                # a loop's later step reads what its first did not: ids carried from a step (a generated token), a
                # carry computed from parameters (the previous layer's output: its gradient is computed)
                self.uses[u.id] = dataclasses.replace(u, fixed=u.fixed and fixed, from_input=u.from_input and from_input)
            return u.id
        u = Use(len(self.uses), path, op, tuple(contracted), tuple(kept), tuple(batch), scan_length, rows, dtype,
                grouped, from_input, fixed, tuple(looked), in_rows, grouped_in, per_head)
        self.uses.append(u)
        self.use_key[key] = u.id
        return u.id

    def edge(self, k: tuple[int, int], dst: int, dst_dim: int, limit: int, via) -> None:
        if is_minor(k):  # a kernel sums the minor part alone: the split it allows stays in the major part
            self.cap(k)
            return
        if k[0] == dst:
            return
        if k in self.normed and "dot" not in via and self.normed[k] <= self.widths.get(self.root(k)[0], 0):
            # normalised, then contracted straight by a kernel: a column that narrows (MLA's low-rank q_a -> norm
            # -> q_b, rank r << d) ends there as at any norm, its row would all-reduce the wide output of a
            # projection back up. A column that widens (NormFormer's fc1 -> GELU -> LayerNorm(d_ff) -> fc2,
            # a sub-LN, Mamba-2's gated norm over d_inner) goes on into its row, Megatron's split: the norm's
            # statistics cost one small all-reduce per row. Through an activation product (OLMo-2's q norm,
            # then q.k) it goes on whatever its width.
            self.escapes.setdefault(k, "a norm over it feeds a kernel directly (a column that does not widen)")
            self.norm_fed.add((k, dst, dst_dim))
            return
        key = (k[0], k[1], dst, dst_dim)
        old = self.edges.get(key)
        if old is None:
            self.edges[key] = (limit, tuple(via))
        else:
            self.edges[key] = (math.gcd(old[0], limit), old[1])

    # -- tags ------------------------------------------------------------

    def merge(self, maps: Iterable[TagMap], op: str | None = None) -> TagMap:
        """The union of tag maps (gcd of limits), noting ``op`` in ``via`` when notable."""
        out: TagMap = {}
        for m in maps:
            for k, (limit, via) in m.items():
                if k in self.escapes:
                    continue  # its chain already ended: no column can come of it
                if op and (not via or via[-1] != op) and op in NOTABLE and len(via) < 6:
                    via = via + (op,)
                old = out.get(k)
                if old is None:
                    out[k] = (limit, via)
                else:
                    out[k] = (math.gcd(old[0], limit), old[1] if len(old[1]) >= len(via) else via)
        return out

    def moved(self, v: Val, mapping: Sequence[int | None], rank: int, *, keep_flags=True,
              limit: Mapping[int, int] | None = None) -> Val:
        """``v`` with output dim ``i`` taken from input dim ``mapping[i]`` (None: new dim)."""
        origin = tuple((p, tuple(dims[m] if m is not None else None for m in mapping))
                       for p, dims in v.origin)
        tags = None
        if v.tags is not None:
            out = []
            for i, m in enumerate(mapping):
                t = self.merge([v.tags[m]]) if m is not None else {}
                if t and limit and i in limit:
                    t = {k: (math.gcd(lim, limit[i]), via) for k, (lim, via) in t.items()}
                out.append(t)
            tags = tuple(out) if any(out) else None
        where = {m: i for i, m in enumerate(mapping) if m is not None}
        picks = tuple((where[a], where[b], t) for a, b, t in v.picks if a in where and b in where)
        return Val(rank, origin=origin, tags=tags, onehot=v.onehot and keep_flags,
                   iota=v.iota and keep_flags, fresh=v.fresh, const_of=v.const_of, picks=picks, fed=v.fed,
                   deps=v.deps, parts=moved_parts(v.parts, mapping, limit))

    def pointwise(self, vals: list[Val], rank: int, name: str):
        """Per-dim merged tags of same-rank values combined elementwise, or None."""
        if not vals:
            return None
        tags = tuple(self.merge((v.tags[d] for v in vals), name) for d in range(rank))
        return tags if any(tags) else None

    def join(self, a: Val, b: Val) -> Val:
        """What is known about a value that is ``a`` or ``b`` (loop carries, cond branches)."""
        fed = a.fed or b.fed  # ids in one branch or step are ids
        deps, live = a.deps | b.deps, a.live or b.live  # computed from parameters in one branch or step
        if a.tags is None and b.tags is None:
            return dataclasses.replace(a, fresh=None, fed=fed, deps=deps, live=live)
        rank = a.rank
        tags = tuple(self.merge([a.dim_tags(d), b.dim_tags(d)]) for d in range(rank))
        return Val(rank, origin=a.origin, tags=tags if any(tags) else None, fed=fed, deps=deps, live=live)


def moved_parts(parts: tuple, mapping: Sequence[int | None], limit: Mapping[int, int] | None = None) -> tuple:
    """:attr:`Val.parts` with output dim ``i`` taken from input dim ``mapping[i]``. A part whose major dim does
    not go on whole (dropped, indexed or sliced: one expert of a Python loop over them, ``w[i]``) ends: a split of
    the stored dim no longer holds whole minor parts of what is read; so does one whose major dim's output dim is
    in ``limit`` (``{output dim: size}``: sliced, cut into pieces).

    >>> moved_parts((("w", (None, (0, 0, 4), None)),), [0, 1, 2]), moved_parts((("w", (None, (0, 0, 4), None)),), [1, 2])
    ((('w', (None, (0, 0, 4), None)),), ())
    """
    if not parts:
        return ()
    where = {m: i for i, m in enumerate(mapping) if m is not None}
    out = []
    for path, ps in parts:
        # ``limit`` is keyed by output dim: the major's is ``where[ps[m][1]]`` (ps[m][1] is its input dim)
        new = tuple(None if m is None or ps[m] is None or ps[m][1] not in where
                    or (limit and where[ps[m][1]] in limit)
                    else (ps[m][0], where[ps[m][1]], ps[m][2]) for m in mapping)
        if any(x is not None for x in new):
            out.append((path, new))
    return tuple(out)


def tiled_slices(jaxpr: Any) -> dict[tuple[int, int], tuple[int, ...]]:
    """``{(id(value), dim): the pieces' starts}`` for each value of ``jaxpr`` that static slices, each along that one dim, cut into
    unequal pieces holding every element once: Falcon's fused ``[q | k | v]`` sliced ``f[..., :-2]``,
    ``f[..., -2:-1]``, ``f[..., -1:]``. Such slices are a split (:func:`tpflax._src.trace.handlers.slice_`).

    >>> import jax, jax.numpy as jnp
    >>> j = jax.make_jaxpr(lambda x: (x[:, :4], x[:, 4:5], x[:, 5:], x[:2]))(jnp.zeros((3, 6))).jaxpr
    >>> [(d, starts) for (_, d), starts in tiled_slices(j).items()]
    [(1, (0, 4, 5))]
    """
    taken: dict[tuple[int, int], list[tuple[int, int]]] = {}
    size: dict[tuple[int, int], int] = {}  # (id(value), dim) -> the dim's size
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "slice" or any(n > 1 for n in (eqn.params.get("strides") or ())):
            continue
        var = eqn.invars[0]
        shape, starts = var.aval.shape, eqn.params["start_indices"]
        dst = eqn.outvars[0].aval.shape
        cut = [d for d in range(len(shape)) if dst[d] != shape[d]]
        if len(cut) == 1:
            taken.setdefault((id(var), cut[0]), []).append((starts[cut[0]], dst[cut[0]]))
            size[(id(var), cut[0])] = shape[cut[0]]
    out = {}
    for (var, d), got in taken.items():
        got.sort()
        ends = [a + n for a, n in got]
        if (len({n for _, n in got}) > 1 and got[0][0] == 0 and ends[-1] == size[(var, d)]
                and all(got[i + 1][0] == ends[i] for i in range(len(got) - 1))):
            out[(var, d)] = tuple(a for a, _ in got)
    return out


def opaque(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int], *,
           why: str = "") -> list[Val]:
    """An op tpflax does not follow: every tag through it ends, parameters count as elementwise."""
    name = eqn.primitive.name
    for v in ins:
        w.escape_all(v, f"passed to {name}" + (f" ({why})" if why else ""))
        for path, _ in v.origin:
            w.elementwise.add(path)
    return [Val(r) for r in ranks]


def same_tags(a: Val, b: Val) -> bool:
    ta = [set(m) for m in a.tags] if a.tags is not None else []
    tb = [set(m) for m in b.tags] if b.tags is not None else []
    return ta == tb
