"""The ``{primitive name: handler}`` table, and the handlers for values that keep their dims.

Every handler is ``handler(walk, eqn, ins, ctx, ranks) -> outs``: ``ins`` are
the :class:`~tpflax._src.trace.interpreter.Val` of the equation's inputs,
``ranks`` the ranks of its outputs, ``ctx`` identifies the enclosing loop
bodies (a use inside a loop body is one use however often the body is walked).
Here: elementwise ops, reductions, and the layout ops (transpose, broadcast,
squeeze, slice, split, concatenate, pad...); reshapes are in
:mod:`tpflax._src.trace.reshape`. Contractions live in
:mod:`tpflax._src.trace.contractions`, control flow and calls in
:mod:`tpflax._src.trace.control`. A primitive not in the table goes to
:func:`tpflax._src.trace.control.call` (a body to walk into) or ends every
chain through it.

>>> [HANDLERS[k].__name__ for k in ("add", "reduce_sum", "reshape", "dot_general", "scan", "jit")]
['elementwise', 'reduce', 'reshape', 'dot_general', 'scan', 'call']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from tpflax._src.trace import collectives, constraints, contractions, control
from tpflax._src.trace.interpreter import SLICED, Handler, Val, Walk, is_minor, moved_parts, opaque
from tpflax._src.trace.records import FftRead
from tpflax._src.trace.reshape import reshape

# Ops that keep every dim in place (n-ary, equal shapes up to rank-0 operands).
ELEMENTWISE = frozenset("""
add sub mul div rem pow integer_pow max min neg sign floor ceil round is_finite exp exp2 log log1p
expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh acosh atanh atan2 sqrt rsqrt cbrt
square abs erf erfc erf_inv lgamma digamma igamma select_n clamp convert_element_type copy copy_p
stop_gradient reduce_precision and or not xor eq ne lt le gt ge nextafter real imag conj
shift_left shift_right_logical shift_right_arithmetic population_count clz optimization_barrier
sharding_constraint reshard name
""".split())
# Ops that only change the dtype or identity of a value: a parameter stays a parameter.
# ``sharding_constraint`` (with_sharding_constraint), ``reshard`` (jax.sharding.reshard, which jax itself
# inserts under a mesh: MaxText's rotary embedding traced under one) and ``name`` (checkpoint_name) are
# identities for dataflow: a model that annotates its activations keeps its pairs.
VIEW = frozenset({"convert_element_type", "copy", "copy_p", "stop_gradient", "reduce_precision",
                  "optimization_barrier", "sharding_constraint", "reshard", "name"})
REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                    "reduce_or", "reduce_xor", "argmax", "argmin"})
CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})


# -- elementwise -------------------------------------------------------------

def elementwise(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    name = eqn.primitive.name
    rank = ranks[0]
    out = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    # lax broadcasts an operand's size-1 dims implicitly (``x + noise`` with a ``(1, h, w, 1)`` noise
    # constant, StyleGAN2's): a parameter's size-1 dim there holds copies, not the output's features
    ins = [_copies(v, [d for d, n in enumerate(getattr(x.aval, "shape", ())) if n == 1 and d < len(out) and out[d] != 1])
           if v.origin else v for v, x in zip(ins, eqn.invars, strict=True)]
    full = [v for v in ins if v.rank == rank and rank > 0]
    params = [v for v in full if v.origin]
    acts = [v for v in full if not v.origin and not v.constant]  # ``kernel * mask``: still a weight
    if name in VIEW or (params and not acts):
        # A view of parameters (a cast, a weight computed from weights) is still a parameter; one
        # parameter met twice (weight norm: ``v / norm(v)``) is one origin, with its fullest dims
        origin = _one_per_path(o for v in params for o in v.origin)
        tags = w.pointwise([v for v in full if v.tags is not None], rank, name)
        base = full[0] if full else Val(rank)
        # a cast of one reshaped parameter keeps its parts (Val.parts); a weight computed from several does not
        parts = base.parts if len(params) == 1 and base is params[0] else ()
        outs = [dataclasses.replace(base, origin=origin, tags=tags, parts=parts,
                                    const_of=max([v.const_of for v in params] or [0]))
                for _ in ranks]
        if id(base) in w.concat_vals and not params:
            # a view (a cast) of a concatenation's value: each output is recorded in Walk.concat_vals as the same
            # concatenation along the same dim (the tuple holds the output itself, so its id stays its own), so the
            # contraction that reads the cast finds the concatenation's pieces (contractions.py, Dataflow.concats)
            w.concat_vals.update((id(o), (o, *w.concat_vals[id(base)][1:])) for o in outs)
        return outs
    if params:
        _note_params(w, name, params, acts)
    gains = _gains(w, params, acts)
    tags = w.pointwise([v for v in acts if v.tags is not None], rank, name)
    if tags is not None and len(acts) > 1:
        _note_spread(w, tags, out)
        # tags two operands carry along one dim: multiplied, each split makes the other's gradient split
        pairs = _cross_tags([v for v in acts if v.tags is not None])
        w.alongside.update(pairs)
        w.alongside.update((b, a) for a, b in pairs)
        if name in ("add", "sub"):
            _note_joined(w, acts)
        elif name == "mul":
            w.gated.update(pairs)
            _note_broadcast_sums(w, eqn, ins, ctx, out)
    onehot = name == "eq" and any(v.iota for v in ins) and not all(v.iota for v in ins)
    onehot = onehot or (name in VIEW and any(v.onehot for v in ins))
    iota = all(v.iota or v.rank == 0 for v in ins) and any(v.iota for v in ins) and name in (
        "add", "sub", "mul", "convert_element_type", "copy")
    return [Val(r, tags=tags, onehot=onehot, iota=iota, gains=gains) for r in ranks]


def _note_broadcast_sums(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, out: tuple[int, ...]) -> None:
    """A product of two activations one of which lax broadcasts along a dim whose features the other carries
    (Mamba's scan, ``(dt * x)[..., None] * B[:, :, None, :]``, B copied over d_inner): backward, that
    operand's gradient sums those features, all-reduced at its size when they are split (measured, XLA:CPU
    data=2,model=4, the hand layout: B's gradient ``f32[4, 16, 16]`` summed over the split d_inner per layer).
    Recorded apart from the contractions' such sums (:attr:`Dataflow.broadcast_sums`)."""
    count = math.prod(w.lengths.get(c, 1) for c in ctx if isinstance(c, int))
    for i, (v, x) in enumerate(zip(ins, eqn.invars, strict=True)):
        shape = tuple(getattr(x.aval, "shape", ()))
        if not v.live or v.origin or len(shape) != len(out):
            continue
        copied = [d for d, n in enumerate(shape) if n == 1 and out[d] != 1]
        found = frozenset(k for j, o in enumerate(ins) if j != i and not o.origin and o.tags is not None
                          for d in copied for k in o.dim_tags(d) if not is_minor(k))
        if found:
            w.broadcast_sums.append((found, math.prod(shape), count))
            w.broadcast_sides.append(frozenset(k for d in range(len(shape)) for k in v.dim_tags(d) if not is_minor(k)))


def constrained(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``with_sharding_constraint``: an identity for the dataflow, whose layout is recorded
    (:mod:`tpflax._src.trace.constraints`)."""
    constraints.note(w, eqn, ins[0])
    outs = elementwise(w, eqn, ins, ctx, ranks)
    w.pinned.update((id(v), v) for v in outs[:1])
    return outs


def _gains(w: Walk, params: list[Val], acts: list[Val]) -> tuple:
    """The per-channel parameters a combination carries on (:attr:`Val.gains`); those it carried meet the
    tagged activations here as their channels."""
    carried = tuple(g for v in acts for g in v.gains)
    for path, dims in carried:
        _note_channels(w, path, dims, [v for v in acts if v.tags is not None])
    new = tuple(o for p in params for o in p.origin
                if not any(v.dim_tags(d) for v in acts for d, ld in enumerate(o[1]) if ld is not None))
    return (carried + new)[:4]


def _note_spread(w: Walk, tags: tuple, shape: tuple[int, ...]) -> None:
    """Record the rows (elements over the dim's size) of activations combined along each tagged dim: an
    adaLN modulation of one row per example scaling a residual stream of every token reaches its rows."""
    n = math.prod(shape)
    for d, m in enumerate(tags):
        for k in m:
            if not is_minor(k) and shape[d]:
                w.spread[k] = max(w.spread.get(k, 0), n // shape[d])


def _note_joined(w: Walk, acts: list[Val]) -> None:
    """Tags added to an activation that lacks them (a branch onto the residual stream): a norm over their
    dim after this normalises the stream, whose width no column split carries on."""
    # dim by dim where the operands line up: a tag rides with the others of its own dim, not with a tag another
    # dim carries (gMLP's token-mixing weight tags the tokens, which every later channel split shares a value with)
    ranks = {len(v.tags) for v in acts if v.tags is not None}
    by_dim = [[set(v.dim_tags(d)) for v in acts] for d in range(next(iter(ranks)))] if len(ranks) == 1 else \
        [[{k for m in (v.tags or ()) for k in m} for v in acts]]
    rides: set = set()
    strays: set = set()
    for dim_keys in by_dim:
        for k in set.union(*dim_keys) - set.intersection(*dim_keys):
            lacking = [{t for t in ks if not is_minor(t)} for ks in dim_keys if k not in ks]
            if all(ks and all(ks <= has for has in dim_keys if k in has) for ks in lacking):
                # the operand lacking it is the same features, which the other carries a factor more of (a
                # Mamba-2 head's ``y + x * D``, y mixed by its own dt per head): a skip, not a stream joined
                rides.add(k)
                continue
            strays.add(k)
            w.added.setdefault(k, set()).update(*(ks for ks in dim_keys if k not in ks))
    keys = [{k for m in (v.tags or ()) for k in m} for v in acts]
    for k in set.union(*keys) - set.intersection(*keys) - (rides - strays):
        # an operand lacking the tag but computed from the kernel that made it is a statistic of the tagged
        # value itself (``x - mean(x)`` in a top-k or a norm over a column's output, Gemma 3n's sparse
        # gate): a per-row value each shard all-reduces, not a stream the branch joins. A max over it is a
        # softmax's (``x - max(x)``), whose sum still needs the whole dim: joined, as before
        bit = w.bits.get(w.uses[w.root(k)[0]].path, 0) if not is_minor(k) and k not in w.extrema else 0
        if not bit or any(k not in ks and not w.deps_of(v) & bit for v, ks in zip(acts, keys, strict=True)):
            w.joined.add(k)


def _cross_tags(acts: list[Val]) -> set[tuple[tuple[int, int], tuple[int, int]]]:
    """``(tag, tag)`` that two operands carry along the same dim, one only in the first, one only in the
    second, in operand order (:attr:`tpflax._src.trace.records.Dataflow.alongside`; multiplied, VAN's
    ``u * attn``, :attr:`tpflax._src.trace.records.Dataflow.gated`)."""
    out: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    for d in range(min(v.rank for v in acts)):
        keys = [{k for k in v.dim_tags(d) if not is_minor(k)} for v in acts]
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                out.update((x, y) for x in a - b for y in b - a)
    return out


def _one_per_path(origin: Any) -> tuple:
    """``((path, dims), ...)`` with one entry per path: the one mapping the most dims."""
    best: dict[str, tuple] = {}
    for path, dims in origin:
        if path not in best or sum(d is not None for d in dims) > sum(d is not None for d in best[path]):
            best[path] = dims
    return tuple(best.items())


def _note_params(w: Walk, name: str, params: list[Val], acts: list[Val]) -> None:
    """Parameters combined with activations: elementwise, and a bias when added to a fresh use."""
    fresh = [v for v in acts if v.fresh is not None]
    for p in params:
        for path, dims in p.origin:
            w.elementwise.add(path)
            w.combined.setdefault(path, []).append(frozenset(d for d in dims if d is not None))
            if name == "add" and len(fresh) == 1 and len(acts) == 1:
                # Added straight to a contraction's output: that contraction's bias.
                uid = fresh[0].fresh
                align = {ld: kd for d, ld in enumerate(dims) if ld is not None
                         for (u, kd) in fresh[0].dim_tags(d) if u == uid}
                w.biases.setdefault(path, (uid, align))
            _note_channels(w, path, dims, acts)


def _note_channels(w: Walk, path: str, dims: tuple, acts: list[Val]) -> None:
    """The uses whose output features the parameter's dims meet, elementwise (``Walk.channels``)."""
    by = w.channels.setdefault(path, {})
    for a in acts:
        for d, ld in enumerate(dims):
            if ld is None or d >= a.rank:
                continue
            for k in a.dim_tags(d):
                if not is_minor(k):
                    uid, kd = w.root(k)
                    by.setdefault(uid, {}).setdefault(ld, kd)


# -- reductions --------------------------------------------------------------

_STATS = ("reduce_sum", "reduce_max", "reduce_min")


def reduce(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    name = eqn.primitive.name
    axes = tuple(eqn.params.get("axes", ()))
    v = ins[0]
    for a in axes:
        tags = v.dim_tags(a)
        if name in ("reduce_max", "reduce_min"):
            w.extrema.update(tags)
        if name in _STATS and not any(k in w.joined for k in tags):
            # a norm's mean square over a projection's own output (OLMo-2's q/k norm over the whole width,
            # a sandwich norm on a branch before its residual add): each shard reduces its part and XLA
            # all-reduces the small result, one value per row, so the split carries on past the norm
            w.cap_minor(tags)
            width = eqn.invars[0].aval.shape[a]
            for k in tags:
                if not is_minor(k):
                    w.normed[k] = min(w.normed.get(k, width), width)
                    if name == "reduce_sum":
                        w.stats[k] = w.stats.get(k, 0) + 1
        else:
            if name == "reduce_sum" and (ended := frozenset(k for k in tags if not is_minor(k) and k in w.joined
                                                            and k not in w.escapes)):
                w.stream_ends.append((ended, len(w.uses)))  # a norm over a joined stream: where its tags end
            w.escape(tags, f"{name} reduces over it (a norm, a mean or a softmax over features needs the "
                           "whole dim)")
    if v.origin and v.tags is None and name in _STATS:
        # a reduction of a parameter (the norm in a weight norm) is still computed from that parameter
        return [Val(ranks[0], origin=tuple((p, tuple(d for i, d in enumerate(dims) if i not in axes))
                                           for p, dims in v.origin))]
    if v.tags is None:
        return [Val(r) for r in ranks]
    tags = tuple(w.merge([v.tags[d]]) for d in range(v.rank) if d not in axes)
    return [Val(ranks[0], tags=tags if any(tags) else None)]


def variadic_reduce(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``lax.reduce`` with a computation of its own: operands then init values, n outputs."""
    axes = tuple(eqn.params.get("dimensions", ()))
    operands = ins[:len(ranks)]
    for v in operands:
        for a in axes:
            w.escape(v.dim_tags(a), "reduce reduces over it")
    tags = w.pointwise([v for v in operands if v.tags is not None], operands[0].rank, "") if operands else None
    kept = tuple(t for d, t in enumerate(tags) if d not in axes) if tags is not None else ()
    return [Val(r, tags=kept if any(kept) and len(kept) == r else None) for r in ranks]


def cumulative(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    axis = eqn.params.get("axis", 0)
    w.escape(ins[0].dim_tags(axis), f"{eqn.primitive.name} runs along it")
    return [dataclasses.replace(ins[0], origin=(), fresh=None)]


def fft(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``jnp.fft``: the transform mixes its last ``len(fft_lengths)`` dims (a sequence, moved last by a
    transpose) and leaves the others in place (the batch, and a Hyena or FNO mixer's features between its
    projections, which then pair through it).

    >>> import jax, jax.numpy as jnp
    >>> jaxpr = jax.make_jaxpr(lambda x: jax.lax.fft(x, "FFT", (8,)))(jnp.ones((2, 8), jnp.complex64))
    >>> jaxpr.eqns[-1].params["jaxpr"].eqns[-1].primitive.name, HANDLERS["fft"].__name__
    ('fft', 'fft')
    """
    rank = ranks[0]
    mixed = range(rank - len(eqn.params["fft_lengths"]), rank)
    if ins[0].fed:
        kind = eqn.params["fft_type"]
        w.ffts.append(f"{getattr(kind, 'name', kind)} of {eqn.invars[0].aval.dtype}{list(eqn.invars[0].aval.shape)}")
    if ins[0].fed or ins[0].live:  # an activation's, or a weight's (a long convolution's filter): XLA:CPU gathers it
        a, o = eqn.invars[0].aval, eqn.outvars[0].aval
        w.fft_reads.append(FftRead(
            tuple(a.shape), a.dtype.itemsize, tuple(o.shape), o.dtype.itemsize,
            tuple(frozenset(k for k in ins[0].dim_tags(d) if not is_minor(k)) if d not in mixed else frozenset()
                  for d in range(rank)),
            tuple(mixed), ins[0].fed, ins[0].live, math.prod(w.lengths.get(c, 1) for c in ctx if isinstance(c, int))))
    for d in mixed:
        w.escape(ins[0].dim_tags(d), "an fft mixes it")
    # a weight's transform (a long-convolution filter's) is a weight computed from a weight: its other dims stay
    # the filter's, which meet the features the projections split
    return [_copies(dataclasses.replace(ins[0], fresh=None), list(mixed))]


# -- layout ops --------------------------------------------------------------

def _same_dims(w: Walk, v: Val, rank: int) -> Val:
    return w.moved(v, list(range(v.rank)), rank)


def transpose(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    return [w.moved(ins[0], list(eqn.params["permutation"]), ranks[0])]


def broadcast_in_dim(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    mapping: list[int | None] = [None] * ranks[0]
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        mapping[d] = i
    shape, src = eqn.params["shape"], eqn.invars[0].aval.shape
    copied = [d for d, m in enumerate(mapping) if m is not None and src[m] == 1 and shape[d] != 1]
    return [_copies(w.moved(ins[0], mapping, ranks[0]), copied)]


def squeeze(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    dims = set(d % max(ins[0].rank, 1) for d in eqn.params["dimensions"])
    return [w.moved(ins[0], [d for d in range(ins[0].rank) if d not in dims], ranks[0])]


def slice_(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    v = ins[0]
    src = tuple(eqn.invars[0].aval.shape)
    dst = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
    if 0 in dst:  # an empty slice (associative_scan's odd elements of a length-1 level) holds no data
        return [Val(ranks[0])]
    starts = eqn.params["start_indices"]
    strides = eqn.params.get("strides") or (1,) * len(src)
    limits: dict[int, int] = {}
    picked = []
    cut = []  # dims cut into unequal pieces: each piece's tags go on under a key of its own (see split)
    for d in range(v.rank):
        if src[d] == dst[d]:
            continue
        if (id(eqn.invars[0]), d) in w.tiled:
            # one of the unequal pieces static slices cut the dim into (Walk.tiled): a split's piece
            limits[d] = dst[d]
            w.slice_of(v.dim_tags(d), starts[d], dst[d], src[d])
            cut.append(d)
        elif strides[d] > 1 and starts[d] < strides[d] and dst[d] * strides[d] == src[d]:
            # Every s-th element (rotate-every-two rotary): a contiguous shard of the
            # input holds exactly its own elements of the output while n divides it.
            limits[d] = dst[d]
        elif strides[d] == 1 and src[d] % dst[d] == 0 and starts[d] % dst[d] == 0:
            limits[d] = dst[d]  # one of k equal pieces (q of a fused qkv): see split
            w.fuse(v.dim_tags(d), src[d] // dst[d])
            # cut by a slice, whose transpose is a pad (a split's is a concatenate): Dataflow.padded
            w.padded.update(w.root(k) for k in v.dim_tags(d) if not is_minor(k))
            w.slice_of(v.dim_tags(d), starts[d], dst[d], src[d])
            if dst[d] == 1:
                picked.append((d, src[d]))
        elif strides[d] == 1:
            # a split of the dim needs its other shards, unless the slices tile it (a GQA's fused [q | k | v]
            # cut by static slices, q wider than k and v): the walk's end drops the escape then (Walk.slices)
            limits[d] = dst[d]
            w.slice_of(v.dim_tags(d), starts[d], dst[d], src[d])
            w.escape(v.dim_tags(d), SLICED)
        else:
            w.escape(v.dim_tags(d), SLICED)
    out = w.moved(v, list(range(v.rank)), ranks[0], limit=limits)
    for d, n in picked:
        out = w.pick(v, out, d, n)
    for d in cut:
        out = w.piece(out, d, ("slice", id(eqn.invars[0]), d), w.tiled[(id(eqn.invars[0]), d)].index(starts[d]))
        if dst[d] == 1:  # one head of a fused [q | k | v] reshaped to heads first (Falcon's MQA key): read whole
            w.escape(out.dim_tags(d), "a piece of one element")
    return [out]


def split(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    v = ins[0]
    axis = eqn.params["axis"]
    sizes = tuple(int(n) for n in eqn.params["sizes"])
    if len(set(sizes)) != 1:
        # Unequal pieces (a parallel block's fused [q | k | v | gate | up]): split naively over the
        # fused dim like equal ones, each piece under a key of its own (see Walk.piece)
        w.fuse(v.dim_tags(axis), len(sizes))
        for k in v.dim_tags(axis):
            w.cuts.setdefault(k, sizes)
        return [w.piece(w.moved(v, list(range(v.rank)), r, limit={axis: n}), axis, id(eqn), i)
                for i, (r, n) in enumerate(zip(ranks, sizes, strict=True))]
    # Equal pieces (a fused qkv kernel's output): the tag goes on, marked fused, so
    # the column is split over the fused dim (the pieces are resharded by XLA).
    w.fuse(v.dim_tags(axis), len(sizes))
    outs = [w.moved(v, list(range(v.rank)), r, limit={axis: sizes[0]}) for r in ranks]
    return [w.pick(v, o, axis, len(sizes)) for o in outs] if sizes[0] == 1 else outs


def unstack(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``jnp.unstack`` (torch's ``qkv.unbind(0)``): single equal pieces along ``axis``, which goes away."""
    v, axis = ins[0], eqn.params["axis"]
    w.fuse(v.dim_tags(axis), len(ranks))
    whole = w.pick(v, w.moved(v, list(range(v.rank)), v.rank, limit={axis: 1}), axis, len(ranks))
    out = w.moved(whole, [d for d in range(v.rank) if d != axis], ranks[0]) if ranks else None
    return [out] * len(ranks)


def dynamic_slice(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    v = ins[0]
    src = tuple(eqn.invars[0].aval.shape)
    sizes = tuple(eqn.params["slice_sizes"])
    cut = {}
    for d in range(v.rank):
        if src[d] != sizes[d]:
            w.escape(v.dim_tags(d), "dynamically sliced")
            cut[d] = sizes[d]
    out = _same_dims(w, v, ranks[0])
    # one expert of a reshaped stack (``w.reshape(E, f, d)[i]``) is no whole minor part of the stored dim
    return [dataclasses.replace(out, parts=moved_parts(v.parts, list(range(v.rank)), cut)) if v.parts else out]


def dynamic_update_slice(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``lax.dynamic_update_slice(buffer, update, *start)``: a key/value cache written at the decoding
    position. Each dim of the result is that dim of both the buffer and the update, so it keeps their tags
    (the heads the new key was split by); a dim the update is shorter along (the cache's length) is written
    at an offset known only at run time, and escapes. Written with an activation, the result is one: the
    cache leaf it came from is no weight its readers contract with."""
    buf, upd = ins[0], ins[1]
    shapes = [tuple(eqn.invars[i].aval.shape) for i in (0, 1)]
    rank = ranks[0]
    offset = [d for d in range(rank) if shapes[0][d] != shapes[1][d]]
    return [_written(w, buf, upd, rank, offset)]


def _written(w: Walk, buf: Val, upd: Val, rank: int, offset: list[int]) -> Val:
    """``upd`` (already in ``buf``'s dims) written into ``buf``: the ``offset`` dims escape, the others keep both
    values' tags; written with an activation, the result is an activation (the buffer leaf is no weight)."""
    for v in (buf, upd):
        for d in offset:
            w.escape(v.dim_tags(d), "written at an offset along it")
    out = concatenate_like(w, [buf, upd], rank, offset)
    if not upd.origin or not buf.origin:
        out = dataclasses.replace(out, origin=(), const_of=0)
    return out


def scatter(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``x.at[idx].set(u)`` (and ``.add``, ``.mul``, ``.min``, ``.max``): a cache written at the decoding
    position with jnp's indexed update. As :func:`dynamic_update_slice`: each window dim of the update is
    that dim of the result and keeps its tags; the dims written at indices, and a window shorter than the
    operand's dim, escape."""
    buf, upd = ins[0], ins[2]
    dn = eqn.params["dimension_numbers"]
    shapes = [tuple(eqn.invars[i].aval.shape) for i in (0, 2)]
    if (upd.fed and not upd.origin and ins[1].fed and not ins[1].live and 0 in dn.scatter_dims_to_operand_dims
            and shapes[1][:1] != shapes[0][:1]):
        w.crossed.append(f"rows of a {shapes[1]} activation written into a {shapes[0]} one at indices from the "
                         "inputs")
        w.cross("scatter", ctx, eqn.outvars[0].aval, eqn.invars[2].aval, None, upd.live)
    elif (upd.fed and not upd.origin and ins[1].fed
          and (spread := contractions.per_example_indices(dn.scatter_dims_to_operand_dims, dn, eqn.invars[1].aval,
                                                          eqn.invars[0].aval)) is not None):
        # per example, written at (arange(b), idx) (Mixture-of-Depths' routed tokens back into the stream): the
        # batch index is data, not a batching dim, so XLA moves the updates as across the batch split (measured).
        # Not a write of whole rows at one index each (a sorted MoE's unsort, ``.at[order].set(y)``): XLA moves
        # those otherwise, and the ragged experts' items price them
        w.cross("spread", ctx, eqn.outvars[0].aval, eqn.invars[2].aval, None, upd.live, indices=spread)
    rank = ranks[0]
    inserted = set(dn.inserted_window_dims) | set(getattr(dn, "operand_batching_dims", ()))
    windows = [d for d in range(rank) if d not in inserted]
    mapping: list[int | None] = [None] * rank
    for d, u in zip(windows, dn.update_window_dims, strict=False):
        mapping[d] = u
    offset = [d for d in range(rank) if mapping[d] is None or d in dn.scatter_dims_to_operand_dims
              or shapes[1][mapping[d]] != shapes[0][d]]
    for u in range(upd.rank):
        if u not in dn.update_window_dims:
            w.escape(upd.dim_tags(u), "written at indices along it")
    placed = w.moved(upd, mapping, rank)
    return [_written(w, buf, placed, rank, offset)]


def concatenate(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """Values side by side along ``dimension``: the tags of that dim end there, unless the inputs are different
    kernels' outputs (:func:`_joined_columns`); those go on, and the walk's end keeps them only where a kernel
    contracts the concatenation row for row (:func:`tpflax._src.trace.dataflow._concats`)."""
    dim = eqn.params["dimension"]
    rank = ranks[0]
    out = concatenate_like(w, ins, rank, [dim])
    joined = _joined_columns(w, ins, dim)
    if joined is None:
        for v in ins:
            w.escape(v.dim_tags(dim), "concatenated with other values along it")
        return [out]
    shape = tuple(eqn.outvars[0].aval.shape)
    keys = [set(v.dim_tags(dim)) for v in ins]
    # each input's own keys: a key several inputs carry (the column they are all computed from: xLSTM's q, k and v,
    # from one conv output) says nothing of which input is where
    w.concats.append((tuple(frozenset(k - set().union(*keys[:i], *keys[i + 1:])) for i, k in enumerate(keys)),
                      tuple(int(x.aval.shape[dim]) for x in eqn.invars), math.prod(shape) // shape[dim]))
    tags = list(out.tags or ({},) * rank)
    tags[dim] = joined
    got = dataclasses.replace(out, tags=tuple(tags))
    w.concat_vals[id(got)] = (got, len(w.concats) - 1, dim)
    return [got]


def _joined_columns(w: Walk, ins: list[Val], dim: int):
    """The tags of ``dim`` of a concatenation of different kernels' outputs side by side (a parallel block's
    ``concat([attn_out, gelu(up)])`` read by one fused output projection), or None.

    Each input's own kernel dims go on: a row kernel contracting the concatenation pairs with every column feeding
    it, as a row contracting ``gate * up`` pairs with both. Only whole (major) tags, every input tagged along
    ``dim``, and each input with a tag key in no other input (rotate-half's ``concat([-x2, x1])`` is one dim
    rearranged, which a split cuts; the pieces of a fused in_proj cut by ``jnp.split`` have keys of their own,
    :meth:`Walk.piece`); a key several inputs carry besides their own goes on with them (the column they are all
    computed from: xLSTM's ``proj_up``, on the heads of its headwise q, k and v, split alike); anything else ends
    the chains as before."""
    maps = []
    for v in ins:
        m = v.dim_tags(dim)
        if not m or any(is_minor(k) for k in m):
            return None
        maps.append({k for k in m if k not in w.escapes})
    for i, keys in enumerate(maps):
        if not keys - set().union(*maps[:i], *maps[i + 1:]):
            return None
    return w.merge(v.dim_tags(dim) for v in ins)


def concatenate_like(w: Walk, ins: list[Val], rank: int, joined: list[int]) -> Val:
    """Values put side by side along the ``joined`` dims: their origins, their tags on the other dims."""
    origin = tuple(o for v in ins for o in v.origin)
    tags = w.pointwise([v for v in ins if v.tags is not None], rank, "")
    if tags is not None:
        tags = tuple({} if d in joined else t for d, t in enumerate(tags))
    return Val(rank, origin=origin, tags=tags if tags and any(tags) else None,
               const_of=max([v.const_of for v in ins] or [0]))


def stack(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``jnp.stack``: a new dim at ``axis``; every other dim keeps its tags (interleaved rotary)."""
    axis = eqn.params["axis"]
    rank = ranks[0]
    mapping = [d if d < axis else d - 1 for d in range(rank)]
    mapping[axis] = None
    moved = [w.moved(v, mapping, rank) for v in ins]
    tags = w.pointwise([m for m in moved if m.tags is not None], rank, "")
    return [Val(rank, origin=tuple(o for m in moved for o in m.origin), tags=tags,
                const_of=max([v.const_of for v in ins] or [0]))]


def pad(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    v = ins[0]
    for d, (lo, hi, inner) in enumerate(eqn.params["padding_config"]):
        if lo or hi or inner:
            w.escape(v.dim_tags(d), "padded")
    return [_same_dims(w, v, ranks[0])]


def rev(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    v = ins[0]
    for d in eqn.params["dimensions"]:
        w.escape(v.dim_tags(d), "reversed")
    return [_same_dims(w, v, ranks[0])]


def tile(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``jnp.tile`` (a primitive since jax 0.10): a dim repeated ``r > 1`` times holds copies, so a
    split of it is no split of the input; the dims repeated once keep their tags. A weight tiled along a
    dim has no weight dim there, as a broadcast's new dim has none (:func:`_copies`)."""
    v = ins[0]
    reps = eqn.params["reps"]
    for d, r in enumerate(reps):
        if r != 1:
            w.escape(v.dim_tags(d), "tiled (repeated copies along it)")
    return [_copies(_same_dims(w, v, ranks[0]), [d for d, r in enumerate(reps) if r != 1])]


def _copies(v: Val, dims: Sequence[int]) -> Val:
    """``v`` with no weight dim at ``dims``, which hold copies: a weight tiled or broadcast from size 1 over
    the batch (big_vision's attention-pooling probe, ``tile(probe, (b, 1, 1))``; a class token
    ``broadcast_to(cls, (b, 1, d))``) is a value per example, the activation of the products it meets
    (:func:`tpflax._src.trace.contractions.dot_general`), not a kernel."""
    if not v.origin or not dims:
        return v
    return dataclasses.replace(v, origin=tuple((p, tuple(None if i in dims else x for i, x in enumerate(ds)))
                                               for p, ds in v.origin))


def bitcast_convert_type(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """Between types of one width (``jnp.signbit``'s float64 -> int64, NetKet's ``log_cosh``) an elementwise op;
    between widths it adds or drops a trailing dim, which tpflax does not follow."""
    if tuple(eqn.invars[0].aval.shape) == tuple(getattr(eqn.outvars[0].aval, "shape", ())):
        return elementwise(w, eqn, ins, ctx, ranks)
    return opaque(w, eqn, ins, ctx, ranks)


def iota(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    return [Val(ranks[0], iota=True)]


def sort(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    d = eqn.params.get("dimension", 0)
    for v in ins:
        w.escape(v.dim_tags(d), "sorted along it")
    return [_same_dims(w, ins[i], r) if i < len(ins) else Val(r) for i, r in enumerate(ranks)]


def top_k(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    v = ins[0]
    w.escape(v.dim_tags(v.rank - 1), "top_k picks along it")
    return [Val(r, tags=tuple(w.merge([t]) for t in v.tags[:-1]) + ({},)
                if v.tags is not None else None) for r in ranks]


HANDLERS: dict[str, Handler] = {
    **{name: cumulative for name in CUMULATIVE}, "fft": fft,
    **{name: reduce for name in REDUCE},
    "reduce": variadic_reduce,
    "transpose": transpose, "broadcast_in_dim": broadcast_in_dim, "squeeze": squeeze,
    "reshape": reshape, "slice": slice_, "split": split, "unstack": unstack,
    "dynamic_slice": dynamic_slice, "dynamic_update_slice": dynamic_update_slice,
    **{name: scatter for name in ("scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul",
                                  "scatter-min", "scatter_min", "scatter-max", "scatter_max")},
    "concatenate": concatenate, "stack": stack, "pad": pad, "rev": rev, "tile": tile, "iota": iota, "sort": sort, "top_k": top_k,
    "bitcast_convert_type": bitcast_convert_type,
    "dot_general": contractions.dot_general, "conv_general_dilated": contractions.conv_general_dilated,
    "ragged_dot_general": contractions.ragged_dot_general,
    "gather": contractions.gather,
    "scan": control.scan, "while": control.while_, "cond": control.cond,
    **{name: control.call for name in control.CALLS},
    **collectives.HANDLERS,
    **{name: elementwise for name in ELEMENTWISE},  # last: wins over any name above
    "sharding_constraint": constrained,
    "reshard": constrained,
}


def new_walk() -> Walk:
    """A :class:`Walk` with the full table; primitives not in it go to :func:`control.call`."""
    return Walk(handlers=HANDLERS, fallback=control.call)
