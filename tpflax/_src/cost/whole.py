"""Whole kernels that contract a tensor-split activation, or whose output is read split, priced for the estimate.

A kernel kept whole on the tensor axis beside a split pair can meet the pair's split features along the
trace (:func:`split_dims`). Two ways, each with its collective:

* its contracted dim reads split features (Mamba's ``x_proj`` reading ``in_proj``'s split ``d_inner``): each
  device sums its slice, and XLA either all-reduces the partial outputs or gathers the input before the
  matmul, whichever moves fewer bytes (forward);
* its output dim is read split (Mamba's ``dt_proj``, whose output ``out_proj`` sums split; a column kept whole
  in a split pair): the output's gradient arrives split, so the input gradient comes out in partial sums,
  all-reduced, or the output gradient is gathered first, whichever moves fewer (backward; nothing to sum when
  its input needs no gradient).

Either way the kernel's weight gradient comes out split (its update runs split and is gathered:
:func:`tpflax._src.cost.stream.split_grads`).

Measured (XLA:CPU, data=2,model=4): the tests' Mamba (tests/test_ssm.py), ``x_proj``'s ``f32[4,16,40]``
output all-reduced per layer forward, not its 128-wide input gathered, and ``dt_proj``'s 8-wide input gradient
all-reduced backward, in one tuple with the B and C gradients of the selective scan (partial sums of a
product of two activations, not priced here: 8 KB per layer); tests/test_whole_reads.py's gated MLP, whose
8-wide whole probe reads the split hidden and whose whole expansion, a column of the pair, gates it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from tpflax._src.cost.disagree import (
    both_sides,
    disagreeing,
    gate_seconds,
    kernel_reads,
    reached_whole,
    replicated,
)
from tpflax._src.cost.pieces import WholeRead, column_read, narrower, pieces_of
from tpflax._src.cost.price import gathered_bytes
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.reshard import edge_limit, piece_permutes, repeated_kv, whole_kv_pair
from tpflax._src.cost.scope import body, leaf_itemsize
from tpflax._src.facts.tree import narrower as narrower_cast
from tpflax._src.mesh import TENSOR
from tpflax._src.specs import entry_axes, gathered_axes, used_axes


def split_dims(s: Any, start: Callable[[str], bool] | None = None,
               constrained: bool = True) -> dict[tuple[str, ...], set[tuple[str, int]]]:
    """``{tensor axes: (leaf, dim)}``: dims of leaves outside pairs, kept whole on the tensor axes, that a tensor
    split reaches along :attr:`tpflax._src.cost.traced.Traced.meets` (representatives' paths, trace dims), from
    the split dims of every leaf, or of the representatives ``start`` accepts, and (``constrained``) from the
    dims a model's own constraint splits (:func:`constrained_dims`): those reach the members of pairs the plan
    keeps whole too (a split pair prices its whole members itself, :func:`whole_members`). Empty untraced."""
    lv = s.lv
    by_axes: dict[frozenset[str], set[tuple[str, int]]] = {}
    for p, d, _, _ in s.meets:
        axes = tensor_split(s, p, d)
        if axes and (start is None or start(lv.rep(p))):
            by_axes.setdefault(axes, set()).add((p, d))
    split_pairs = {m for pc in lv.pairs for m in pc.columns + pc.rows
                   if any(s.axes(x, TENSOR) for x in pc.columns + pc.rows)}
    starts = [(axes, begin, lv.in_pair) for axes, begin in by_axes.items()]
    starts += [(frozenset(axes), begin, split_pairs) for axes, begin in constrained_dims(s).items() if constrained]
    reached: dict[tuple[str, ...], set[tuple[str, int]]] = {}
    for axes, begin, paired in starts:  # a whole dim meeting a split one: its gradient comes split, and so on
        for p, dim in reached_whole(s.meets, begin, lambda p, paired=paired: _whole(s, lv.rep(p), paired)):
            reached.setdefault(tuple(sorted(axes)), set()).add((lv.rep(p), dim))
    return reached


def constrained_dims(s: Any) -> dict[tuple[str, ...], set[tuple[str, int]]]:
    """``{tensor axes: (leaf, dim)}``: parameter dims whose activation the model's own ``with_sharding_constraint``
    lays out over tensor axes (:attr:`Scope.constrained`) that the plan does not split them over. XLA keeps the
    constraint's layout there whatever the plan, so a whole kernel making or reading that activation sums or
    gathers around its matmul (:func:`whole_reads`) and its gradient comes out split (:func:`split_dims`). Its
    axes over the batch, and the dims the plan splits as the constraint does, cost nothing."""
    tensor = set(s.mesh.axes_with(TENSOR))
    return disagreeing(list(s.constrained) + _stream_ends(s, tensor), tensor, lambda p, d: tensor_split(s, p, d))


def _stream_ends(s: Any, tensor: set[str]) -> list[tuple[str, int, tuple[str, ...]]]:
    """``(path, dim, tensor axes)``: the dims that contract or look up a residual stream a model's constraint
    splits past a norm, where it carries no kernel's tag (:attr:`Scope.split_widths`: MaxText's
    ``activation_embed`` over ``tensor``): a plain matmul's one contracted dim of that width that meets no
    other kernel's dim (the output head reading the final norm), a lookup table's features (the embedding
    writing the stream), a plain matmul's one output dim of that width added onto the stream
    (:attr:`Scope.streamed`: an attention's output projection, whose sum with the residual a norm reads). XLA
    carries the constraint's split there: a whole head sums its partial logits, a whole output projection's
    output gradient arrives split, and each one's gradient comes out split (measured, XLA:CPU data=2,tensor=4:
    MaxText's llama3 replicated; EasyDeL's Llama and Phi-3, which constrain the normed stream, not the
    projection's output)."""
    widths: dict[int, tuple[str, ...]] = {}
    for width, axes in s.split_widths or ():
        if set(axes) & tensor:
            widths[width] = tuple(sorted(set(widths.get(width, ())) | (set(axes) & tensor)))
    if not widths:
        return []
    met = {(p, d) for p, d, *_ in s.meets} | {(q, e) for *_, q, e in s.meets}
    dots = s.dots or {}
    dims = [(p, use[0][0]) for p, use in dots.items() if len(use[0]) == 1]
    # a plain matmul's output added onto the stream (an attention's output projection onto the residual): its norm
    # after the add leaves the stream untagged, so only the width says the constraint there splits that output
    # (whatever it meets: Gemma 2's sandwich norm scales that output before the add)
    streamed = sorted((p, d) for p, d in s.streamed if p in dots and dots[p][1] == (d,))
    met -= set(streamed)
    dims += streamed
    dims += [(p, len(s.lv.decisions[s.lv.rep(p)].shape) - 1) for p in s.looked
             if s.lv.rep(p) in s.lv.decisions]
    out = []
    for p, d in dims:
        shape = s.lv.decisions[s.lv.rep(p)].shape if s.lv.rep(p) in s.lv.decisions else ()
        if d < len(shape) and shape[d] in widths and (p, d) not in met:
            out.append((p, d, widths[shape[d]]))
    return out


def _whole(s: Any, rep: str, paired: Any) -> bool:
    """A representative the plan keeps whole on the tensor axes, outside the pairs ``paired``."""
    return rep in s.lv.decisions and rep not in paired and not any(
        tensor_split(s, rep, i) for i in range(len(s.lv.specs.get(rep, ()))))


def tensor_split(s: Any, path: str, dim: int) -> frozenset[str]:
    """The tensor axes the plan splits ``path``'s (a trace path's representative) ``dim`` over."""
    spec = s.lv.specs.get(s.lv.rep(path), ())
    return frozenset(entry_axes(spec[dim]) if dim < len(spec) else ()) & s.mesh.role_axes.get(TENSOR, frozenset())


def whole_reads(s: Any, start: Callable[[str], bool] | None = None) -> list[WholeRead]:
    """The collectives of whole kernels outside pairs whose contraction meets the split features of a pair or
    of a dense layer split without a partner (the module docstring), or of the leaves ``start`` accepts.
    A partnerless column's split output is gathered at each whole kernel reading it, not once
    (:func:`lone_read`).

    Around a model's own constraint (:func:`constrained_dims`) inside a scan over stacked layers, XLA:CPU sums
    the partial outputs or input gradients whatever their width (measured, ``tests/test_constraint_cost.py``:
    a whole 256 -> 64 kernel reading a constrained 256-wide hidden, its 64-wide output all-reduced in the loop,
    and a 64 -> 256 one, 256 wide); unrolled, it takes the narrower as above (the 256 -> 64 pair gathers the
    64-wide hidden; a square one too). A stack's other whole kernels are not priced here, nor kernels of other
    kinds than dense, attention and head layers, but those a constraint pins (their first use a plain dot: a
    stack of ``(2, 256, 64)`` kernels the tree takes for experts; or a matmul batched over experts, MaxText's
    ``wo`` in ``BSEH,EHM->BSEM``). Inside rematerialised layers (:attr:`Scope.remat`) the recompute runs some
    of the forward's collectives again (:func:`tpflax._src.cost.disagree.kernel_reads`); a gated pair's second
    kernel, in one alike class with its first, takes that class's share of the gated reads."""
    lv, out = s.lv, []
    split: frozenset[str] | None = None  # the leaves split over a tensor axis, found once where needed
    pinned = {r for dims in split_dims(s, start=lambda rep: False).values() for r, _ in dims} if start is None else ()
    taken: set[tuple] = set()  # the input gathers priced, per activation read (:func:`_input_gather`)
    for axes, dims in split_dims(s, start=start or (lambda rep: rep in lv.in_pair or _lone(s, rep)),
                                 constrained=start is None).items():
        gates = _gate_shares(s, dims)
        for rep in sorted({r for r, _ in dims}):
            d, stack = lv.decisions[rep], _stack(s, rep)
            # a batched matmul (an expert kernel's ``BSEH,EHM->BSEM``) only where a constraint pins it
            use = (s.dots or {}).get(rep) or ((s.batched_dots or {}).get(rep) if rep in pinned else None)
            if use is None or (rep not in pinned and (stack or d.kind not in ("dense", "attention", "head"))):
                continue  # a kernel a constraint pins: any kind whose matmul is a plain dot (a stack the tree calls experts)
            in_width = math.prod(d.shape[i] for i in use[0])
            batched = rep not in (s.dots or {})
            rows = s.rows_of(rep) * s.act_item  # a batched matmul's rows count its batch dims (each expert's tokens)
            out_width = (math.prod(d.shape[i] for i in use[1]) if batched
                         else math.prod(d.shape) // max(stack, 1) // max(in_width, 1))
            in_b, out_b = rows * in_width, rows * out_width
            # the matmul reads a copy XLA lays out as it prefers; and a batched one (an expert kernel's, the router
            # weighting its outputs) sums its partial input gradients even unrolled (tests/test_expert_split_rows.py)
            copy = bool(stack) or rep in s.derived or batched
            # the rematerialised calls are the layers: an embedding or output head runs outside them; measured
            # around a model's own constraints only (a kernel a pair's split reaches is priced as without remat)
            args = (rep, axes, in_b, out_b, {dim for r, dim in dims if r == rep}, use, copy)
            kw = dict(input_grad=(s.widths or {}).get(rep) != 0, cast=_cast(s, rep, d),
                      remat=s.remat and rep in pinned and d.kind not in ("embedding", "head"),
                      reshard=rows * _piece_permutes(s, rep, d, use, axes))
            reads, share = kernel_reads(*args, **kw), gates.get(rep, 0.0)
            second = kernel_reads(*args, **kw, gate=True) if share else reads
            if second != reads:  # a gated pair's second kernel, alike to its first: each its own reads
                reads = [replace(r, share=1 - share) for r in reads] if share < 1 else []
                reads += [replace(r, share=share) for r in second]
            if rep in pinned and not (kw["remat"] or kw["cast"]):  # one gather of one activation (_input_gather)
                group = (lv.rep((s.apart or {}).get(rep, rep)), axes)
                reads = [r for r in reads if not _input_gather(r, in_b, out_b) or _first(taken, (group, r.phase, r.size))]
            if copy and split is None:
                split = frozenset(p for p in lv.decisions if any(tensor_split(s, p, i)
                                                                 for i in range(len(lv.specs.get(p, ())))))
            # a copy's output gradient read split in pieces (a GQA key/value's heads): its sum runs over them
            k = output_pieces(s, rep, split, axes) if copy else None
            out += [replace(r, pieces=k) if k and r.phase == "backward" and k < s.size(axes) else r for r in reads]
    return out


def _piece_permutes(s: Any, rep: str, d: Any, use: tuple[tuple[int, ...], tuple[int, ...]],
                    axes: tuple[str, ...]) -> int:
    """The columns XLA's collective-permutes move to reshard the pieces of ``rep``'s output, a traced fused kernel
    (``[q|k|v]``) cut on its one kept dim whose pieces are each split over ``axes``
    (:func:`tpflax._src.cost.reshard.piece_permutes`); 0 for any other kernel, or pieces read whole."""
    dim, pieces, whole, viewed, _ = (s.fused or {}).get(rep, (None, 1, (), False, False))
    if dim is None or pieces == 1 or whole or viewed or use[1] != (dim,):
        return 0
    return sum(piece_permutes(d.shape[dim], pieces, s.size(axes)) or ())


def _input_gather(r: WholeRead, in_b: float, out_b: float) -> bool:
    """Whether ``r`` gathers its kernel's input: forward, or for its weight gradient where the input is the
    narrower side. Whole kernels reading one activation (a block's q, k and v its normed input, a gated MLP's two
    expansions theirs: :attr:`Scope.apart`'s groups) share that gather, forward and backward, unless each reads
    a copy of its own (a cast; a remat recompute runs each kernel's own). Measured around a model's own constraints
    only (XLA:CPU data=2,model=4: ``tests/test_constraint_block.py``'s EasyDeL-style block, separate q/k/v and
    gate/up kernels, one gather of the stream each; EasyDeL's Llama replicated, also on fsdp=2,tp=4)."""
    return r.kind == "all-gather" and (r.phase == "forward" or (r.phase == "weight" and r.size == in_b <= out_b))


def _first(taken: set[tuple], key: tuple) -> bool:
    """Whether ``key`` is not in ``taken`` yet; it is then added."""
    if key in taken:
        return False
    taken.add(key)
    return True


def _gate_shares(s: Any, dims: set[tuple[str, int]]) -> dict[str, float]:
    """``{representative: share}``: the share of its alike kernels that are the second of a gated pair
    (:func:`tpflax._src.cost.disagree.gate_seconds`; ``wi_1`` of MaxText's ``wi_0``/``wi_1``, one class of two)."""
    lv, dots = s.lv, {**(s.batched_dots or {}), **(s.dots or {})}
    hit: dict[str, set[int]] = {}
    for r, d in dims:
        hit.setdefault(r, set()).add(d)
    if not any(r in dots and both_sides(h, dots[r]) for r, h in hit.items()):
        return {}  # no kernel hit on both sides: no gated pair to find (the common case)
    members = {r: {r} for r in hit}
    for p, r in lv.rep_of.items():
        if r in members:
            members[r].add(p)
    seconds = gate_seconds(s.meets, dots, {p: hit[r] for r, ps in members.items() for p in ps})
    return {r: len(ps & seconds) / len(ps) for r, ps in members.items() if ps & seconds}


def _cast(s: Any, rep: str, d: Any) -> bool:
    """Whether a matmul reads ``rep`` cast to a narrower dtype (a bfloat16 model's float32 kernels)."""
    item = leaf_itemsize(d)
    return bool(narrower_cast(s.cast_to.get(rep, ""), item) or narrower_cast(s.cast_some.get(rep, ""), item))


def _stack(s: Any, rep: str) -> int:
    """The layers of the stack ``rep`` is, one sliced off per step of a scan: along the plan's layers dim, else
    the trace's (a plan made without the model keeps a stacked dim as a plain one); 0 outside a scan."""
    d = s.lv.decisions[rep]
    dim = d.layers_dim if d.layers_dim is not None else s.scanned.get(rep)
    return d.shape[dim] if dim is not None else 0


def lone_read(s: Any, path: str) -> bool:
    """Whether a whole kernel contracts the split output of ``path``, a column without a partner: its
    collectives (:func:`whole_reads`) stand for the column's own gather of its output."""
    return any(r.phase == "forward" for r in whole_reads(s, start=lambda rep: rep == path))


def lone_row(s: Any, path: str, axes: tuple[str, ...]) -> WholeRead | None:
    """A dense layer without a partner split over ``axes`` on the dims its contraction sums (a row, traced):
    XLA slices its input, whole or split, to the kernel's rows and sums the partial outputs (forward), whatever
    the widths: it never gathers the input (measured, XLA:CPU data=2,model=4: ``(256, 64)``, ``(64, 64)`` and
    ``(64, 256)`` rows ``P('model', None)`` behind a whole layer, each output all-reduced; the whole layer's
    updates, which the split input gradient reaches, are priced apart). None otherwise."""
    d, use = s.lv.decisions[path], (s.dots or {}).get(path)
    if use is None or d.layers_dim is not None or d.kind != "dense":
        return None
    spec = s.lv.specs[path]
    if not any(set(entry_axes(spec[i])) & set(axes) for i in use[0] if i < len(spec)) or any(
            set(entry_axes(spec[i])) & set(axes) for i in use[1] if i < len(spec)):
        return None
    _, out_b = _act_bytes(s, path, d, math.prod(body(d)[i] for i in use[0]))
    return WholeRead(path, axes, "all-reduce", out_b, "forward")


def _lone(s: Any, rep: str) -> bool:
    """A dense layer outside pairs split over a tensor axis, not one whose output scales a residual stream
    (DiT's adaLN, :attr:`Scope.streams`: its stream's gathers are priced with it)."""
    d = s.lv.decisions[rep]
    return d.kind == "dense" and rep not in (s.streams or {}) and bool(s.axes(rep, TENSOR))


def whole_members(s: Any) -> dict[str, WholeRead]:
    """``{member: its collective}`` for the members of a split pair kept whole on the tensor axes: a row's
    partial outputs summed or its input gathered (forward), a column's partial input gradients summed or its
    output gradient gathered (backward; a GQA key/value gathers, a gate's narrow expansion, 8 -> 256, sums),
    whichever moves fewer. A column reading the model's inputs has no input gradient to sum, but its output
    gradient is still summed over the ranks sharing each piece and its update pieces gathered (a KV-whole GQA
    key/value, 8:2 heads on data=2,model=4: 0.813 of compiled collectives priced with nothing, 1.001 with them).

    Traced, a column's output is split by XLA as far as the row's split reaches it (:func:`output_pieces`: a
    GQA key/value of ``K`` heads beside query heads split over ``n`` ranks in ``K`` pieces, each on ``n / K``
    ranks). Its weight gradient then comes out split in those pieces, and its input gradient is summed or its
    output gradient gathered over ``K`` ranks; inside ``jax.checkpoint`` or a scanned stack, where the kernel the
    matmul reads is a copy XLA splits in those pieces too, XLA:CPU sums the input gradient whatever it moves,
    unless tpflax's step gathers that kernel whole (fsdp). Measured, XLA:CPU data=2,model=4, an nnx decoder of 8
    query heads, K 1, 2 and 4: in a Python loop ``f32[4,16,K,8]`` output gradients gathered, under ``nnx.remat``
    or ``nnx.scan`` the ``f32[4,16,64]`` input gradients all-reduced; benchmarks/probe_nnx.py ``scan``, whose
    fsdp=2,model=4 hand layout gathers the output gradients under both)."""
    out = {}
    for pc in s.lv.pairs:
        axes = tuple(dict.fromkeys(a for p in pc.columns + pc.rows for a in s.axes(p, TENSOR)))
        if (found := whole_kv_pair(s, pc)) is not None:
            # a GQA's whole key/value beside a query dot_product_attention regroups into head groups the ranks do not
            # follow (cost/headcut.py whole_kv): its gathers are whole_kv_items', its update runs in the groups
            _, axes, _, kvs, _, w = found
            for m in kvs:
                out_b = _act_bytes(s, m, s.lv.decisions[m], body(s.lv.decisions[m])[0])[1]
                out[m] = WholeRead(m, axes, "all-gather", out_b, "backward", pieces=w.pieces or 1, out=out_b,
                                   grouped=True)
            continue
        for m in (pc.columns + pc.rows) if axes else ():
            d, width = s.lv.decisions[m], (s.widths or {}).get(m)
            if s.axes(m, TENSOR):
                continue
            cast = (s.cast_to or {}).get(m, d.dtype) != d.dtype
            # a GQA key/value repeated to query heads its groups do not follow: its repeated gradient is gathered,
            # and its update run in its groups, even where its input (the model's) needs no gradient
            rep = repeated_kv(s, pc, m, axes) if m in pc.columns and (s.backend == "cpu" or cast) else None
            in_b, out_b = _act_bytes(s, m, d, width or body(d)[0])
            in_b = in_b if width != 0 else 0.0
            if m in pc.rows:
                out[m] = narrower(m, axes, out_b, in_b, "forward")
                continue
            # measured on XLA:CPU; XLA:TPU gathers a whole float32 key/value's output gradient over every rank and
            # sums no pieces (the zoo llama, fsdp=2,model=4 on v5e:2x4: tests/test_tpu.py, 3.3% over with pieces),
            # but splits a cast copy in the pieces too (transformers' Mistral in mixed precision, 0.842 -> 1.001:
            # tests/test_cast_kernels.py)
            # the matmul reads a copy XLA splits in the pieces: a loop's or a remat'd call's, unless tpflax's fsdp
            # step gathers the kernel whole for it; a dtype cast's, made after that gather
            k = output_pieces(s, m, pc.rows, axes) if s.backend == "cpu" or cast else None
            copy = (s.remat or d.layers_dim is not None) and not _pinned(s, m) or cast
            if rep is not None:
                out[m] = replace(column_read(m, axes, in_b, out_b, rep[0], copy), repeat=out_b * rep[1])
                continue
            out[m] = column_read(m, axes, in_b, out_b, k, copy)
    return out


def _pinned(s: Any, path: str) -> bool:
    """Whether tpflax's step gathers ``path`` whole for compute (split over an fsdp-gathered axis): the kernel its
    matmuls read is then whole, not a copy XLA may split in the key/value heads inside a loop or a remat'd call."""
    spec = s.lv.specs[path]
    return bool(set(used_axes(spec)) & gathered_axes(s.mesh, list(s.lv.specs.values())))


def output_pieces(s: Any, col: str, rows: Collection[str], axes: tuple[str, ...]) -> int | None:
    """How many pieces XLA splits the output of ``col``, a pair's column kept whole, into: the least limit
    (:attr:`tpflax._src.cost.traced.Traced.limits`) of the traced edges from it to a dim of ``rows`` split over
    the ``n`` ranks of ``axes``, ``n`` if that is a multiple of ``n`` (a gate's expansion), the limit if it
    divides ``n`` (a GQA key/value's heads; 1 for MQA: whole, its output gradient summed over every rank).
    None untraced or where neither divides the other."""
    limit = edge_limit(s, col, rows, axes)
    return None if limit is None else pieces_of(limit, s.size(axes))


def replicated_items(s: Any) -> list[CommItem]:
    """The gathers XLA compiles where a model's own constraint replicates an activation dim (``None``, or past a
    short spec's end) that the plan splits over tensor axes: the activation gathered where the constraint stands
    (forward), and each kernel split over those axes that contracts it gathered whole, once a step, for the
    backward product (the activation's gradient, replicated too, comes from the whole kernel). A reader that reaches
    the constrained value through an op (a relu between) instead has its split input gradient gathered back into
    the constraint's layout, an activation's worth (measured, XLA:CPU and XLA:TPU data=2,model=4, a 256 -> 1024 ->
    512 pair: the same for a ``shard_map`` whose out_specs keep the features whole, ``tests/test_shard_map.py``).

    Measured (XLA:CPU, data=2,model=4, the Flax guide's block under Megatron, ``P('data', None)`` on the hidden,
    tests/test_constraint_plan.py): per layer the hidden ``f32[4,64]`` gathered after the relu and ``down``'s
    ``(64, 256)`` kernel gathered in the backward, scanned or unrolled, 256 -> 64 or 64 -> 256; the pair's
    all-reduces stay. Where the row's output is wider than twice its kernel (1,024 rows there), XLA gathers the
    kernel in the forward instead of summing the row's partial outputs, which the pair's items still price."""
    lv, tensor = s.lv, frozenset(s.mesh.axes_with(TENSOR))
    found: dict[tuple[str, tuple[str, ...], float, str], int] = {}  # per leaf, then per class of alike leaves

    def add(rep: str, axes: tuple[str, ...], size: float, why: str, stack: int) -> None:
        key = (rep, axes, size, why)
        found[key] = found.get(key, 0) + max(stack, 1)

    for p, d, ax, readers in replicated(s.constrained, tensor, lambda q, e: tensor_split(s, q, e), s.meets, s.dots or {}):
        rep, use = lv.rep(p), s.dots[p]
        if rep not in lv.decisions:
            continue
        dec, stack = lv.decisions[rep], _stack(s, rep)
        in_width = math.prod(dec.shape[i] for i in use[0])
        width = in_width if d in use[0] else math.prod(dec.shape) // max(stack, 1) // max(in_width, 1)
        act = s.rows_of(rep) * s.act_item * width
        add(rep, ax, act, "a model's constraint replicates an activation the plan splits: gathered there", stack)
        for qrep in {lv.rep(q) for q in readers if q in s.direct} & set(lv.decisions):
            qstack, qdec = max(_stack(s, qrep), 1), lv.decisions[qrep]
            # XLA:TPU gathers a float32 kernel for its product as bfloat16
            add(qrep, ax, gathered_bytes(s.leaf_bytes(qrep, qdec) * s.size(ax) // qstack, leaf_itemsize(qdec),
                                         s.backend == "tpu"),
                "it contracts an activation a model's constraint replicates: gathered whole for the backward "
                "product", qstack)
        if any(q not in s.direct for q in readers):
            add(rep, ax, act, "its readers reach an activation a model's constraint replicates through an op (a "
                "relu): their input gradient, split, is gathered back into the constraint's layout", stack)
    return [CommItem("all-gather", ax, size, s.size(ax), n, lv.label[rep], why)
            for (rep, ax, size, why), n in found.items()]


def whole_read_items(s: Any) -> list[CommItem]:
    """:func:`whole_reads` as the estimate's items, one per alike class of kernels and direction."""
    items = []
    for r in whole_reads(s):
        what = ("a whole fused kernel whose pieces a constraint splits" if r.kind == "collective-permute"
                or r.phase == "pieces" else "a whole kernel contracting split features" if r.forward
                else "a whole kernel whose output is read split")
        # what it gathers is a matmul's operand: XLA:TPU moves a float32 one as bfloat16 (default precision)
        size = gathered_bytes(r.size, s.act_item, s.backend == "tpu") if r.kind == "all-gather" else r.size
        # a share is of an alike class's members, so its count is whole
        n = round(s.lv.count[r.path] * r.share) * max(_stack(s, r.path), 1) * (1 + r.redo)
        items.append(CommItem(r.kind, r.axes, size, r.pieces or s.size(r.axes), n,
                              s.lv.label[r.path],
                              f"{what}: {r.how}" + (", again in the remat recompute" if r.redo else "")))
    return items


def _act_bytes(s: Any, path: str, d: Any, in_width: int) -> tuple[float, float]:
    """Bytes on one device of the input and the output activation of ``path``'s contraction."""
    rows = s.rows_of(path) * s.act_item
    return rows * in_width, rows * (math.prod(body(d)) // max(in_width, 1))
