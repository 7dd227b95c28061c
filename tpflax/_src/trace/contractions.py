"""Handlers for the ops that contract or look up parameters: uses, and the edges between them.

A ``dot_general`` or ``conv_general_dilated`` with a parameter operand is a
*use*: each kept parameter dim tags the activation dim it produces, and each
tagged activation dim it sums over closes an *edge* from the tag's use. A
``gather`` from a parameter (or a matmul with a one-hot) is a lookup.

>>> import jax, jax.numpy as jnp
>>> from tpflax._src.trace.handlers import new_walk
>>> from tpflax._src.trace.interpreter import Val
>>> j = jax.make_jaxpr(lambda a, b, x: (x @ a) @ b)(
...     jnp.zeros((4, 8)), jnp.zeros((8, 4)), jnp.zeros((2, 4))).jaxpr
>>> w = new_walk()
>>> _ = w.run(j, [Val(2, origin=(("a", (0, 1)),)), Val(2, origin=(("b", (0, 1)),)), Val(2, fed=True)])
>>> [(u.path, u.contracted, u.kept) for u in w.uses], list(w.edges)
([('a', (0,), (1,)), ('b', (0,), (1,))], [(0, 1, 1, 0)])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from tpflax._src.trace.interpreter import TagMap, Val, Walk, is_minor, opaque
from tpflax._src.trace.records import Product
from tpflax._src.trace.reshape import spill

# why a kept dim escapes when a product of two activations sums it (a combine ``bsed,bse->bsd``)
PRODUCT_SUM = "summed by a product of two activations (needs an all-reduce)"


def dot_general(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    groups = tuple(eqn.params.get("rhs_groups", ()))  # a ragged dot's kernel group dims (ragged_dot_general)
    lhs, rhs = ins
    lf = [d for d in range(lhs.rank) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.rank) if d not in rc and d not in rb and d not in groups]
    out_rank = ranks[0]
    lp, rp = bool(lhs.origin), bool(rhs.origin)
    if lp and rp and _per_example(lhs) != _per_example(rhs):
        # a weight broadcast over a dim no weight has (a learned latent array or query tokens over the batch)
        # meets a weight: it is the activation of this product, the other the kernel it uses
        lhs, rhs = (Val(lhs.rank, live=True), rhs) if _per_example(lhs) else (lhs, Val(rhs.rank, live=True))
        lp, rp = bool(lhs.origin), bool(rhs.origin)
    # a weight computed from weights (x @ (a @ b)), or from a weight and constants (NetKet's GCNN: the kernel
    # contracted with its symmetry group's irreps): still parameters, read by the contraction with activations
    if (lp and rp) or (lp and rhs.constant) or (rp and lhs.constant):
        origin = []
        for p, dims in lhs.origin:
            origin.append((p, tuple(dims[d] for d in lb) + tuple(dims[d] for d in lf)
                           + (None,) * len(rf)))
        for p, dims in rhs.origin:
            origin.append((p, tuple(dims[d] for d in rb) + (None,) * len(lf)
                           + tuple(dims[d] for d in rf)))
        return [Val(out_rank, origin=tuple(origin))]
    if not lp and not rp:
        for v in (lhs, rhs):  # a lookup at constant indices read as a kernel (NetKet's symmetries)
            for uid, size in w.fixed_looks.get(id(v), (None, ()))[1]:
                w.expanded.setdefault(uid, (w.n_eqns, *size, ()))
        # sums a head_dim: the minor part of a projection cut into (heads, head_dim)
        summed = any(is_minor(k) for v, cs in ((lhs, lc), (rhs, rc)) for d in cs for k in v.dim_tags(d))
        out = _act_dot(w, lhs, rhs, (lc, rc), (lb, rb), lf, rf, out_rank)
        if _static(lhs) or _static(rhs):
            _note_grown(w, out, tuple(eqn.outvars[0].aval.shape))
        _note_product(w, eqn, out, ctx, lf, rf, summed)
        _note_split_sums(w, eqn, lhs, rhs, (lc, rc), lf, rf, ctx)
        return [out]
    if lp and groups:
        return opaque(w, eqn, ins, ctx, ranks, why="a ragged dot with a parameter on the left")
    if lp:  # weight on the left: mirror so the activation is on the left
        act, par, ac, pc, ab, pb, af, pf = rhs, lhs, rc, lc, rb, lb, rf, lf
    else:  # a ragged dot's group dims batch the kernel like experts, matched by no activation dim
        act, par, ac, pc, ab, pb, af, pf = lhs, rhs, lc, tuple(rc), lb, tuple(rb) + groups, lf, rf
    if not pc and not pf:
        return [_scale(w, act, par, ab, af, out_rank)]
    shape_p = tuple(eqn.invars[0 if lp else 1].aval.shape)
    tag_b: list[TagMap] = [dict(w.merge([act.dim_tags(a)])) for a in ab]
    tag_pf: list[TagMap] = [{} for _ in pf]
    fresh = None
    act_shape = tuple(eqn.invars[1 if lp else 0].aval.shape)
    # the tokens the layer sees (the cost model's rows); experts' batched kernels see slices of them, a ragged
    # dot's all of them: inside a shard_map, the tokens the body takes (its rows come routed, a token once per
    # expert it goes to, but its input and its input's gradient move at the body's boundary), else its rows
    rows = 0 if ab or (pb and not groups) else (w.body_rows if groups and w.body_rows else
                                                math.prod(act_shape[d] for d in af) * w.row_shards)
    # of those rows, the heads: dims a reshape cut out of a matmul's output features (a weight shared across heads)
    per_head = math.prod(act_shape[d] for d in af if any(k in w.cut for k in act.dim_tags(d)))
    for path, dims in par.origin:
        op = "onehot" if act.onehot else "dot"
        # the minor parts of leaf dims a reshape of the parameter cut (Val.parts): contracted or kept as their leaf dim
        parts = par.part_of(path) if par.parts and not act.onehot else (None,) * par.rank
        kept = [dims[d] for d in pf if dims[d] is not None]
        batched = [dims[d] for d in pb if dims[d] is not None]
        summed = [dims[d] for d in pc if dims[d] is not None]
        for group, which in ((summed, pc), (kept, pf)):
            for d in which:
                if dims[d] is None and parts[d] is not None and parts[d][0] not in (*summed, *kept, *batched):
                    group.append(parts[d][0])
        uid = w.use(ctx, eqn, path, op, summed, kept, batched, par.const_of, rows,
                    str(eqn.outvars[0].aval.dtype), from_input=not (act.live or act.origin),
                    per_head=per_head if rows else 1)
        w.reads.setdefault(uid, (eqn, 1 if lp else 0, ctx))
        if id(act) in w.pinned:
            w.direct.add(uid)
        if id(par) not in w.raw:
            w.derived.add(uid)
            # with the sizes of its batch dims no parameter dim makes: a weight broadcast over the examples
            # (Perceiver's latents), or a product with constants batched over them (NetKet's irreps)
            w.expanded.setdefault(uid, (w.n_eqns, *_size(eqn.invars[0 if lp else 1].aval),
                                        tuple(shape_p[p] for p in pb if dims[p] is None)))
        w.widths.setdefault(uid, math.prod(act_shape[a] for a in ac))
        w.note_grad(uid, act)
        fresh = uid if len(par.origin) == 1 else None
        if op == "onehot":
            continue
        # inside a shard_map body the kernel is one shard: its dims are ``split`` times larger outside
        size = [n * w.split.get((path, dims[p]), 1) if dims[p] is not None else n for p, n in enumerate(shape_p)]
        # a stored dim cut into (major, minor) (DBRX's ``(E * f, d)`` read as ``(E, f, d)``): a split of it holds whole
        # minor parts over n dividing the major size, and runs on into them over more ranks where each rank still holds
        # one slice of one major element (reshape.spill: 4 experts over 8 ranks, half an expert each)
        for q, pt in enumerate(parts):
            if pt is not None and dims[pt[1]] == pt[0]:
                size[q] = size[pt[1]] = pt[2] * spill(pt[2] * shape_p[q], pt[2], shape_p[q])
                w.parted.setdefault(path, {})[pt[0]] = pt[2]
        at = w.concat_vals.get(id(act))
        for a, p in zip(ac, pc, strict=True):
            if at is not None and a == at[2] and dims[p] is not None:
                w.concat_reads.setdefault(at[1], set()).add((uid, dims[p]))
            if dims[p] is None and parts[p] is not None:
                # the minor part of a stored dim (DBRX's ``btef,efd->bted`` summing the f of its ``(E * f, d)``)
                for k, (limit, via) in w.merge([act.dim_tags(a)]).items():
                    w.edge(k, uid, parts[p][0], math.gcd(limit, size[p]), via)
                continue
            if dims[p] is None:
                continue
            for k, (limit, via) in w.merge([act.dim_tags(a)]).items():
                w.edge(k, uid, dims[p], math.gcd(limit, size[p]), via)
        for i, p in enumerate(pb[:len(tag_b)]):  # a ragged dot's group dims reach no output dim
            if dims[p] is not None:
                tag_b[i][(uid, dims[p])] = (size[p], ())
        for i, p in enumerate(pf):
            if dims[p] is not None:
                tag_pf[i][(uid, dims[p])] = (size[p], ())
            elif parts[p] is not None:  # kept minor part: its own key, on the leaf dim (Walk.part_key)
                tag_pf[i][w.part_key(uid, parts[p][0])] = (size[p], ())
    if act.onehot:
        return [Val(out_rank)]  # an embedding lookup: its rows are not a column's output
    tag_af = [w.merge([act.dim_tags(a)]) for a in af]
    # dot_general's output dims: batch, then lhs free, then rhs free.
    tags = tag_b + (tag_pf + tag_af if lp else tag_af + tag_pf)
    return [Val(out_rank, tags=tuple(tags) if any(tags) else None, fresh=fresh)]


@dataclasses.dataclass(frozen=True)
class _RaggedView:
    """A ``ragged_dot_general`` equation as :func:`dot_general` reads one: its operands, its output, its dimension
    numbers, and its kernel's group dims (``rhs_groups``)."""

    source: Any
    params: dict

    @property
    def invars(self) -> list[Any]:
        return self.source.invars[:2]

    @property
    def outvars(self) -> list[Any]:
        return self.source.outvars

    @property
    def primitive(self) -> Any:
        return self.source.primitive


def ragged_dot_general(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    """``jax.lax.ragged_dot``: rows sorted by expert, each run of them contracting its expert's slice of the kernel
    (MaxText's and EasyDeL's experts off TPU, ``(tokens, d) x (experts, d, f)``). For the dataflow a dot whose
    kernel batches over its group dims, as an einsum over stacked experts does, but no activation dim carries
    them: the rows are the tokens every expert's slice sees in turn."""
    rn = eqn.params["ragged_dot_dimension_numbers"]
    view = w.ragged.setdefault(id(eqn), _RaggedView(eqn, {"dimension_numbers": rn.dot_dimension_numbers,
                                                          "rhs_groups": tuple(rn.rhs_group_dimensions)}))
    return dot_general(w, view, ins[:2], ctx, ranks)


def _static(v: Val) -> bool:
    """A value of neither parameters nor inputs (an interpolation's weight matrix, built from ``iota``)."""
    return not (v.origin or v.live or v.fed or v.tags)


def _note_grown(w: Walk, out: Val, shape: tuple[int, ...]) -> None:
    """Record the rows of a tagged activation contracted with a static matrix (:func:`_static`):
    ``jax.image.resize`` upsamples a split output so, and XLA carries the split along to where it is
    read whole (:attr:`tpflax._src.trace.records.Dataflow.grown`)."""
    if out.tags is None:
        return
    n = math.prod(shape)
    for d, m in enumerate(out.tags):
        for k in m:
            if not is_minor(k) and shape[d]:
                w.grown[k] = max(w.grown.get(k, 0), n // shape[d])


def _per_example(v: Val) -> bool:
    """A weight-made value with a dim that no weight it comes from has: broadcast over it (the batch)."""
    return any(all(dims[d] is None for _, dims in v.origin) for d in range(v.rank))


def _scale(w: Walk, act: Val, par: Val, ab, af, out_rank: int) -> Val:
    """A parameter that only meets batch dims (``einsum("...k,k->...k")``): an elementwise
    scale (a norm's gain), not a kernel; the activation's dims pass unchanged."""
    for path, _ in par.origin:
        w.elementwise.add(path)
    tags = [w.merge([act.dim_tags(a)], "mul") for a in ab] + [w.merge([act.dim_tags(a)]) for a in af]
    return Val(out_rank, tags=tuple(tags) if any(tags) else None)


def _act_dot(w: Walk, lhs: Val, rhs: Val, contract, batch, lf, rf, out_rank: int) -> Val:
    """A product of two activations (attention scores, ...): summed tags end, others pass."""
    (lc, rc), (lb, rb) = contract, batch
    for v, cs in ((lhs, lc), (rhs, rc)):
        for d in cs:
            w.escape(v.dim_tags(d), PRODUCT_SUM)
    for v, other, free in ((lhs, rhs, lf), (rhs, lhs, rf)):
        # The backward sums a free dim of one side into the other side's gradient. A projection's
        # output (keys, values kept whole: 2 kv heads under 4 query heads) has its gradient summed
        # over the tensor ranks anyway; a product's (the probabilities) would be all-reduced at the
        # scores' size: a split running on into a minor part (a cut head's head_dim) stops there.
        if not any("dot" not in via for m in other.tags or () for _, via in m.values()):
            for d in free:
                for k in v.dim_tags(d):
                    if is_minor(k):
                        w.cap(k)
    tags = [w.merge([lhs.dim_tags(a), rhs.dim_tags(b)], "dot") for a, b in zip(lb, rb, strict=True)]
    tags += [w.merge([lhs.dim_tags(a)], "dot") for a in lf]
    tags += [w.merge([rhs.dim_tags(b)], "dot") for b in rf]
    return Val(out_rank, tags=tuple(tags) if any(tags) else None)


def _note_split_sums(w: Walk, eqn: Any, lhs: Val, rhs: Val, contract, lf, rf, ctx: tuple) -> None:
    """Record what a product of two activations all-reduces when a kernel dim it sums is split.

    Forward, it sums its contracted dims: split (a single-head attention's q and k split over their
    channels), its output comes in partial sums, all-reduced at the scores' size. Backward, each side's
    gradient sums the other side's free dims: a split one (the values' channels under ``probs @ v``)
    all-reduces that gradient (the probabilities'). A head_dim (a minor part) is not counted: a split
    stops at it (:func:`_act_dot` caps it).
    """
    sizes = [math.prod(v.aval.shape) for v in (*eqn.invars, *eqn.outvars)]
    count = math.prod(w.lengths.get(c, 1) for c in ctx if isinstance(c, int))

    def keys(v: Val, dims) -> frozenset[tuple[int, int]]:
        return frozenset(k for d in dims for k in v.dim_tags(d) if not is_minor(k))

    # backward: only a side computed from parameters has a gradient (RoFormer's rotary einsum
    # ``bslh,...sh->bslh`` multiplies q by constant sin/cos tables, whose gradient nobody computes)
    for found, size in ((keys(lhs, contract[0]) | keys(rhs, contract[1]), sizes[2]),
                        (keys(lhs, lf) if rhs.live else frozenset(), sizes[1]),
                        (keys(rhs, rf) if lhs.live else frozenset(), sizes[0])):
        if found:
            w.split_sums.append((found, size, count))
    # backward, each side's gradient is the product of the output's gradient with the other side: a contracted
    # dim split on the other side only comes out split in it (SAM's ``bmc,bhwc->bmhw`` with the hypernetworks'
    # c split and the upscaled image's c whole), to be made whole again (Dataflow.split_grads)
    ka, kb = keys(lhs, contract[0]), keys(rhs, contract[1])
    if ka and _grad_goes_on(w, rhs, kb):
        w.split_grads.append((ka, kb, sizes[1], count))
    if kb and _grad_goes_on(w, lhs, ka):
        w.split_grads.append((kb, ka, sizes[0], count))


def _grad_goes_on(w: Walk, v: Val, own: frozenset[tuple[int, int]]) -> bool:
    """Whether the backward carries ``v``'s gradient on past the layers whose features its contracted dims are
    (``own``): ``v`` is computed from a parameter outside those layers' modules. A ``ConvTranspose`` over the
    model's input only takes its kernel's (and bias's) small gradients from it, which XLA gathers instead."""
    if not v.live:
        return False
    deps = w.deps_of(v)
    if not deps:  # computed from a parameter the walk lost track of
        return True
    mods = {w.uses[w.root(k)[0]].path.rpartition("/")[0] for k in own}
    mask = 0
    for path, bit in w.bits.items():
        if path.rpartition("/")[0] in mods:
            mask |= bit
    return bool(deps & ~mask)


def _note_product(w: Walk, eqn: Any, out: Val, ctx: tuple, lf, rf, summed: bool) -> None:
    """Record the attention scores ``q @ k``: a product of two activations with free dims on both sides
    and a heads dim (a dim carrying a parameter contraction's output features: before the last, or
    anywhere when the product sums projected features). The product that reads the last one recorded
    (``probs @ v``: its probabilities are the scores, maybe transposed) is the same layer's second and
    is not recorded."""
    shape = tuple(eqn.outvars[0].aval.shape)
    # the heads: a dim that a parameter contraction's output features made (the q projection's). A MoE
    # dispatch or combine einsum keeps none but the features, last, and sums tokens or experts; ``q @ k``
    # sums a head_dim, and keeps the heads last when the einsum puts a multi-query key first (b, t, s, h)
    dims = range(len(shape) if summed else len(shape) - 1)
    heads = any(w.root(k)[1] in w.uses[k[0]].kept for i in dims for k in out.dim_tags(i))
    if not lf or not rf or len(shape) < 3 or not heads:
        return
    if w.pending is not None and sorted(w.pending) in (sorted(v.aval.shape) for v in eqn.invars):
        w.pending = None
        return
    w.pending = shape
    tags = tuple(tuple(sorted({w.root(k) for k in out.dim_tags(d) if not is_minor(k)})) for d in range(len(shape)))
    count = math.prod(w.lengths.get(c, 1) for c in ctx if isinstance(c, int))
    w.products[(ctx, id(eqn))] = Product(shape, count, tags)
    w.pending_key = (ctx, id(eqn))


def conv_general_dilated(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    groups = eqn.params.get("feature_group_count", 1)
    out_rank = ranks[0]
    shape_p = tuple(eqn.invars[1].aval.shape)
    if (not lhs.origin and not rhs.origin and rhs.tags is None and groups > 1 and shape_p[rspec[1]] == 1
            and shape_p[rspec[0]] == groups):
        # a depthwise convolution with a constant filter (StyleGAN2's FIR blur, ``upfirdn2d``): each output
        # channel reads its own input channel, so a split of the channels passes through, as an elementwise op's
        tags: list[TagMap] = [{} for _ in range(out_rank)]
        tags[ospec[0]], tags[ospec[1]] = w.merge([lhs.dim_tags(lspec[0])]), w.merge([lhs.dim_tags(lspec[1])])
        for d in lspec[2:]:
            w.escape(lhs.dim_tags(d), "a spatial dim of a convolution window")
        return [Val(out_rank, tags=tuple(tags) if any(tags) else None)]
    if lhs.origin or not rhs.origin:
        return opaque(w, eqn, ins, ctx, ranks)
    tags: list[TagMap] = [{} for _ in range(out_rank)]
    tags[ospec[0]] = w.merge([lhs.dim_tags(lspec[0])])
    for d in lspec[2:]:
        w.escape(lhs.dim_tags(d), "a spatial dim of a convolution window")
    fresh = None
    # a grouped convolution's batch is not partitioned by XLA: its input and output are gathered; a
    # depthwise one (one input channel per group: ConvNeXt's, MobileNet's) is split over the batch like
    # any other (measured, XLA:CPU data=2: no gather for a 7x7 depthwise conv, the gathers for 4 groups)
    moved = None
    if groups != 1:
        moved = (0 if shape_p[rspec[1]] == 1 else
                 math.prod(eqn.invars[0].aval.shape) + math.prod(eqn.outvars[0].aval.shape))
    channels = lhs.dim_tags(lspec[1])
    local = _channel_local(w, channels) if groups != 1 and shape_p[rspec[1]] == 1 and shape_p[rspec[0]] == groups \
        else None
    out_shape = tuple(eqn.outvars[0].aval.shape)
    positions = math.prod(out_shape) // max(1, out_shape[ospec[1]])  # the rows its collectives move
    in_shape = tuple(eqn.invars[0].aval.shape)
    in_positions = math.prod(in_shape) // max(1, in_shape[lspec[1]])  # its input gradient's
    for n, (path, dims) in enumerate(rhs.origin):
        o, i = dims[rspec[0]], dims[rspec[1]]
        contracted = [dims[d] for d in rspec[1:] if dims[d] is not None]
        # a kernel computed from several weights (a weight norm's v and g) moves its activations once
        uid = w.use(ctx, eqn, path, "conv", contracted, [o] if o is not None else [], [], rhs.const_of,
                    positions, str(eqn.outvars[0].aval.dtype), grouped=moved if n == 0 else None,
                    from_input=not lhs.live, in_rows=in_positions,
                    grouped_in=math.prod(in_shape) if moved and n == 0 else None)
        if id(rhs) not in w.raw:
            w.derived.add(uid)
        # the input channels a group reads, as a dense's width (its window is not a width: a 3x3 conv 64 -> 128
        # widens): a norm over its output feeds a row only if that output is wider (Walk.edge; SegFormer's k2 s2
        # ``sr`` conv 64 -> 64, LayerNorm(64), ``kv`` no pair: XLA gathers the normalised channels for ``kv``)
        w.widths.setdefault(uid, shape_p[rspec[1]])
        w.note_grad(uid, lhs)
        fresh = uid if len(rhs.origin) == 1 else None
        if groups == 1 and i is not None:
            for k, (limit, via) in w.merge([lhs.dim_tags(lspec[1])]).items():
                w.edge(k, uid, i, math.gcd(limit, shape_p[rspec[1]]), via)
        if o is not None:
            tags[ospec[1]][(uid, o)] = (shape_p[rspec[0]], ())
            if local is not None:
                w.channelwise.setdefault(path, (local[0], {o: local[1]}))
    if local is not None:
        # depthwise, one output channel per input channel: output channel c reads input channel c
        # alone, so a split of the channels passes through with no collective (like an elementwise op)
        tags[ospec[1]].update(w.merge([channels]))
    elif groups != 1:
        w.escape(channels, f"a grouped convolution ({groups} groups)")
    return [Val(out_rank, tags=tuple(tags) if any(tags) else None, fresh=fresh)]


def _channel_local(w: Walk, channels: TagMap) -> tuple[int, int] | None:
    """The one ``(use id, param dim)`` a depthwise convolution's input channels carry, or None.

    Its kernel's output channels are then split like that use's output (``Dataflow.channelwise``).
    Channels carrying several tags (a residual stream) or a cut dim's minor part keep the old answer:
    the convolution ends their chains.
    """
    live = w.merge([channels])
    if len(live) != 1 or any(is_minor(k) for k in channels):
        return None
    return next(iter(live))


def gather(w: Walk, eqn: Any, ins: list[Val], ctx: tuple, ranks: list[int]) -> list[Val]:
    operand = ins[0]
    dn = eqn.params["dimension_numbers"]
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    looked = math.prod(eqn.invars[1].aval.shape[:-1])
    # indices computed from parameters too (Mixture-of-Depths' router's top_k): XLA compiles the same collectives
    # whoever computed them
    across = not operand.origin and operand.fed and ins[1].fed and 0 in indexed
    picked = per_example_indices(dn.start_index_map, dn, eqn.invars[1].aval, eqn.invars[0].aval) if across else None
    if picked is not None:
        # rows picked per example at (arange(b), idx) (BERT's masked positions, CLIP's end tokens, MoD's routed
        # tokens): the batch index is data, not a batching dim, so XLA moves the picked rows and their indices,
        # not the operand (measured; the mirror of a scatter's "spread")
        w.cross("pick", ctx, eqn.invars[0].aval, eqn.outvars[0].aval, None, operand.live, indices=picked)
    elif across and not ins[1].live and looked != eqn.invars[0].aval.shape[0]:
        # a graph with as many edges as nodes is missed here (the sizes cannot tell them apart)
        w.crossed.append(f"rows of a {tuple(eqn.invars[0].aval.shape)} activation gathered at "
                         f"{tuple(eqn.invars[1].aval.shape[:-1])} indices from the inputs")
        w.cross("gather", ctx, eqn.invars[0].aval, eqn.outvars[0].aval, operand, operand.live)
    if not operand.origin:
        # An activation indexed by data (BigBird's random key blocks): the indexed dims
        # need every shard, but its batch and whole-slice dims (heads, head features)
        # pass through untouched, so their tags go on.
        mapping = gather_passthrough(eqn, operand.rank, ranks[0])
        for d in range(operand.rank):
            if d not in mapping:
                w.escape(operand.dim_tags(d), "gathered (indexed by data)")
        out = w.moved(operand, mapping, ranks[0], keep_flags=False)
        return [dataclasses.replace(out, fresh=None)]
    looks = []
    for path, dims in operand.origin:
        uid = w.use(ctx, eqn, path, "gather", [dims[d] for d in sorted(indexed) if dims[d] is not None],
                    [dims[d] for d in range(operand.rank) if d not in indexed and dims[d] is not None],
                    [], operand.const_of, dtype=str(eqn.invars[0].aval.dtype), fixed=not ins[1].fed,
                    looked=tuple(eqn.invars[1].aval.shape[:-1]))
        if id(operand) not in w.raw:
            w.derived.add(uid)
        looks.append(uid)
    if ins[1].fed or ins[1].live:
        return [Val(r) for r in ranks]
    # constant indices: the output may be a contraction's kernel (see dot_general); made as the walk marks a value
    # computed from a parameter, so that it stays this object
    deps = 0
    for v in ins:
        deps |= w.deps_of(v)
    out = [Val(r, live=True, deps=deps) for r in ranks]
    w.fixed_looks[id(out[0])] = (out[0], [(u, _size(eqn.outvars[0].aval)) for u in looks])
    return out


def per_example_indices(index_map: Sequence[int], dn: Any, indices: Any, whole: Any) -> int | None:
    """The bytes of the indices of a gather or scatter at ``(arange(b), idx)`` (a per-example pick or spread,
    :mod:`tpflax._src.cost.crossing`), or None when it is not one.

    Per example: two or more index dims, the batch's (dim 0) among them, no batching dims (the batch index is
    data) and indices as long as the batch. ``index_map`` is the gather's ``start_index_map`` or the scatter's
    ``scatter_dims_to_operand_dims``; ``indices`` and ``whole`` the abstract indices and indexed array. One rule
    for both, so that a pick and its spread cannot drift apart.

    >>> import jax, jax.numpy as jnp
    >>> x, i = jnp.zeros((8, 32, 4)), jnp.zeros((8, 6), jnp.int32)
    >>> eqn = jax.make_jaxpr(lambda x, i: x[jnp.arange(8)[:, None], i])(x, i).eqns[-1]
    >>> dn = eqn.params["dimension_numbers"]
    >>> per_example_indices(dn.start_index_map, dn, eqn.invars[1].aval, eqn.invars[0].aval)  # 8 x 6 x 2 int32
    384
    >>> eqn = jax.make_jaxpr(lambda x, i: x[i[0]])(x, i).eqns[-1]  # whole examples at one index each
    >>> dn = eqn.params["dimension_numbers"]
    >>> per_example_indices(dn.start_index_map, dn, eqn.invars[1].aval, eqn.invars[0].aval) is None
    True
    """
    if (len(index_map) > 1 and 0 in index_map and not getattr(dn, "operand_batching_dims", ())
            and tuple(indices.shape[:1]) == tuple(whole.shape[:1])):
        return math.prod(indices.shape) * indices.dtype.itemsize
    return None


def _size(aval: Any) -> tuple[int, int]:
    """(elements, item bytes) of an abstract array."""
    return math.prod(aval.shape), aval.dtype.itemsize


def gather_passthrough(eqn: Any, operand_rank: int, out_rank: int) -> list[int | None]:
    """Per output dim of a ``gather``, the operand dim it copies whole (None: none).

    Operand batching dims (a vmapped gather) land on the output's batch dims, and
    slice dims taken whole and not indexed on the offset dims; an indexed or
    partly sliced dim copies nothing whole.

    >>> import jax, jax.numpy as jnp
    >>> pick = jax.vmap(lambda x, i: x[i])  # per example, rows picked by data
    >>> eqn = jax.make_jaxpr(pick)(jnp.zeros((2, 5, 4)), jnp.zeros((2, 3), jnp.int32)).eqns[-1]
    >>> gather_passthrough(eqn, 3, 3)  # batch and feature dims pass, the rows do not
    [0, None, 2]
    """
    dn = eqn.params["dimension_numbers"]
    src = tuple(eqn.invars[0].aval.shape)
    sizes = tuple(eqn.params["slice_sizes"])
    mapping: list[int | None] = [None] * out_rank
    sliced = [d for d in range(operand_rank)
              if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
    for o, d in zip(dn.offset_dims, sliced, strict=True):
        if d not in dn.start_index_map and sizes[d] == src[d]:
            mapping[o] = d
    # lax.gather's index vector is the indices' last dim: indices dim i is the i-th batch dim
    batch_out = [d for d in range(out_rank) if d not in dn.offset_dims]
    for od, idd in zip(dn.operand_batching_dims, dn.start_indices_batching_dims, strict=True):
        mapping[batch_out[idd]] = od
    return mapping
