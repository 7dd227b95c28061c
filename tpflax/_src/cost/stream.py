"""A feature-split residual stream's update gathers (XLA:CPU), priced for the estimate.

A lookup table split on its features (its rows do not divide the tensor axis) leaves the residual
stream feature-split through every block (:func:`tpflax._src.cost.price.stream_gathers` prices the
activation gathers). The gradients of the leaves kept whole on the tensor axis that meet the stream
on a dim of its width (norms, row biases, position tables, a classifier) then come out split too:
XLA:CPU runs their optimizer update on the split shard and gathers the parameter and each of its
moments back whole (measured: 57 such gathers behind a 2-block tagger's split table,
tests/test_choose.py ``Tagger``; 3 per leaf under adamw). XLA:TPU does so for the kernels only
(the Tagger's classifier and the GQA block's output head, 3 gathers each, compiled for v5e:2x4),
not for 1-D leaves (norm scales and biases).

XLA:TPU also gathers the stream itself more often than XLA:CPU (:func:`tpu_stream_gathers`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tpflax._src.cost.optstate import shard_bytes
from tpflax._src.cost.pieces import update_pieces
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.scope import body, drop_layers, layers, leaf_itemsize
from tpflax._src.cost.straddle import straddled_parts
from tpflax._src.cost.whole import split_dims, whole_members
from tpflax._src.mesh import TENSOR
from tpflax._src.specs import entry_axes, gathered_axes, used_axes, without_axes
from tpflax._src.trace.records import reached_dims


def update_gathers(s: Any, axes: tuple[str, ...], reached: list[str],
                   why: str = "a leaf whole on the tensor axis whose gradient the feature-split stream splits",
                   pieces: Mapping[str, int] | None = None) -> list[CommItem]:
    """Gathers of the ``reached`` leaves kept whole on ``axes`` once a feature-split table splits the stream:
    the parameter and its moments after the split update; where tpflax's step gathers fsdp leaves for
    compute (:func:`zero3_axes`), the gradient once, whole over those axes, before an update as stored.

    Args:
        s: the estimate's :class:`~tpflax._src.cost.scope.Scope`.
        axes: the tensor axes that split the table's features.
        reached: the other leaves with a dim of the table's feature width (the residual stream's).
        why: what splits their gradient, for the items' reason.
        pieces: ``{leaf: pieces}`` for leaves split in fewer pieces than ``axes`` has ranks (a GQA key/value
            kernel in its heads): gathered over that many.

    Returns:
        One all-gather item per alike class of leaves (on TPU of two or more dims; none on GPU).

    >>> import jax, optax, tpflax
    >>> from jax.sharding import PartitionSpec as P
    >>> v = {"emb": {"embedding": jax.ShapeDtypeStruct((30, 64), "float32")},
    ...      "ln": {"scale": jax.ShapeDtypeStruct((64,), "float32")}}
    >>> p = tpflax.plan(v, {"data": 2, "model": 4}, rules=[("emb", P(None, "model")), (".*", P())])
    >>> e = tpflax.estimate(p, optax.adamw(1e-3), "8x16", backend="cpu")  # 8 sequences of 16 token ids
    >>> [(i.kind, i.count, i.size) for i in e.items if i.kind == "all-gather"]  # stream (at least 5); ln/scale's update
    [('all-gather', 5, 16384.0), ('all-gather', 3, 256)]
    """
    if s.backend not in ("cpu", "tpu"):
        return []
    lv, ranks = s.lv, s.size(axes)
    # the parameter and each optimizer moment of its shape (adam's two, sgd's momentum trace), each gathered
    moments = s.moments or {}  # None: no optimizer, no moments
    gathered = zero3_axes(s)
    items = []
    for path in reached:
        d, n = lv.decisions[path], (pieces or {}).get(path, ranks)
        if s.backend == "tpu" and len(body(d)) < 2:
            continue
        if not d.trainable or set(used_axes(lv.specs[path])) & set(axes) or (path, axes) in s.update_gathered:
            continue
        s.update_gathered.add((path, axes))
        if gathered:
            # the step gathers fsdp leaves for compute and pins every gradient to the parameter's layout
            # (scan_fsdp.pin): XLA gathers the split gradient there, whole over the fsdp axes, and the update
            # runs as stored (measured, fsdp=2,model=4: the linen probe's DiT, one gather of each whole adaLN
            # kernel, of the final modulation and of the timestep MLP's output bias; benchmarks/third_party.py
            # distilbert-tok, one of each norm gain and bias, the classifier and its bias, as 14 + 1 + 1)
            size = shard_bytes(tuple(d.shape), leaf_itemsize(d), tuple(without_axes(lv.specs[path], gathered)), s.mesh)
            items.append(CommItem("all-gather", axes, size, n, lv.count[path], lv.label[path], f"{why}: "
                                  "its gradient is gathered where the step pins it to the parameter's layout"))
            continue
        copies = 1 + moments.get(path, 0)
        items.append(CommItem("all-gather", axes, s.leaf_bytes(path, d), n, copies * lv.count[path],
                              lv.label[path], f"{why}: its update runs split, then the parameter and its "
                              "moments are gathered"))
    return items


def zero3_axes(s: Any) -> frozenset[str]:
    """The axes tpflax's step gathers parameters over for compute (:func:`tpflax._src.specs.fsdp_axes`): where
    there are any, the step pins every gradient to its parameter's layout, a replicated plan's too (measured,
    fsdp=2,model=4: the Flax guide's MultiDotReluDot replicated under its own ``P('fsdp', 'model')`` constraint,
    one gather of each whole gradient, benchmarks/probe_nnx.py ``gspmd``)."""
    return gathered_axes(s.mesh, list(s.lv.specs.values()))


def tpu_stream_gathers(s: Any, axes: tuple[str, ...], width: int) -> int:
    """Gathers of a residual stream of ``width`` split on its features over ``axes`` that XLA:TPU compiles.

    Forward, one per norm of the stream: its output gathered once for the kernels that read it. Backward,
    one per kernel that writes the stream (its last dim the width, not split over ``axes``: a row, or a
    kernel kept whole), whose output gradient arrives split with the stream, and one per kernel split over
    ``axes`` that reads it (its first dim the width: a column), which gathers the stream again for its
    weight gradient; a whole kernel that only reads the stream reuses the forward gather. XLA:CPU gathers
    twice per norm instead (:func:`tpflax._src.cost.price.stream_gathers`).

    Measured compiled for v5e:2x4, float32 (the stream gathered as ``bf16``): the published-width
    DistilBERT (``benchmarks/third_party_tpu.py`` ``distilbert-tok``: 5 norms; q/k/v/lin1 columns and
    out_lin/lin2 rows in 2 blocks) 18 gathers on both meshes, 4 forward and 14 backward, one per split
    kernel and one more behind each of the last block's rows (this count: 17; one and two per norm: 11);
    the tests' Llama-style GQA block 7 (3 norms; q and up read, o and down write; k, v and the head whole
    readers: 7) and 2-block Tagger 11 (5 norms; 2 up columns; 2 down rows and 2 whole out kernels write;
    this count takes its whole value kernels, square, for writers too: 13).

    Args:
        s: the estimate's :class:`~tpflax._src.cost.scope.Scope`.
        axes: the tensor axes that split the table's features.
        width: the stream's width (the table's features).
    """
    lv, n = s.lv, 0
    for p, x in lv.decisions.items():
        b, k = body(x), lv.count[p] * layers(x)
        if x.kind == "norm" and tuple(b) == (width,) and not p.endswith("bias"):  # a norm counted by its gain
            n += k
        elif x.kind not in ("embedding", "norm", "bias") and len(b) >= 2:
            split = [bool(set(entry_axes(e)) & set(axes)) for e in drop_layers(x, lv.specs[p])]
            split += [False] * (len(b) - len(split))
            writes = b[-1] == width and not split[-1]
            reads_split = b[0] == width and any(split)
            n += k * (writes or reads_split)
    return n


def conditioned_leaves(s: Any, table: str, axes: tuple[str, ...]) -> list[str]:
    """The leaves whose gradient a feature-split conditioning ``table`` (:attr:`Scope.conditions`) splits,
    whose update then runs split: the modulation kernels reading the conditioning vector, on their input
    dim, and what meets it there along the trace (the timestep MLP's output kernel and bias it is summed
    with). Measured on the linen probe's DiT (benchmarks/linen_probe.py, data=2,model=4): XLA:CPU gathers
    the adaLN kernels, the final modulation and the timestep MLP's output bias (3 gathers each under adamw),
    and reduces their gradients over the batch axes split; the blocks' own leaves of the stream's width
    (the residual stream is not split) are not gathered.

    Returns:
        Representative paths kept whole on ``axes``, as :func:`update_gathers` takes them.
    """
    lv, readers = s.lv, (s.conditions or {}).get(table, ())
    width = lv.decisions[lv.rep(table)].shape[-1]
    hot = set()
    for k in readers:  # a reader's input dim: of the table's width, not its output's (last) or layers dim
        d = lv.decisions[lv.rep(k)]
        hot |= {(k, i) for i, n in enumerate(d.shape[:-1]) if n == width and i != d.layers_dim}
    # along the meets: the activation dim the modulation reads is theirs too
    reps = {lv.rep(p) for p, _ in reached_dims(s.meets, hot)}
    return sorted(r for r in reps if r != table and r in lv.decisions and lv.decisions[r].trainable
                  and not set(used_axes(lv.specs[r])) & set(axes))


def split_updates(s: Any) -> dict[str, int]:
    """``{leaf: devices}``: leaves whose update a tensor split splits over that many devices: the leaves a
    feature-split conditioning table reaches (:func:`conditioned_leaves`) and those a tensor-split kernel's
    dims reach along the trace (:func:`split_grads`, a split time embedding's output read by whole adaLN
    modulation kernels). XLA:CPU reduces their gradient over the batch axes on the split shard (measured on
    flaxdiff's SimpleMMDiT, benchmarks/probe_flaxdiff.py, data=2,model=4 and fsdp=2,model=4: each modulation
    kernel's ``(64, 384)`` gradient summed as ``f32[384,16]``)."""
    out: dict[str, int] = {}
    for table in s.conditions or {}:
        rep = s.lv.rep(table)
        d = s.lv.decisions.get(rep)
        axes = s.axes(rep, TENSOR) if d is not None else ()
        if axes and not set(entry_axes(drop_layers(d, s.lv.specs[rep])[0])) & set(axes):  # split on features
            out.update(dict.fromkeys(conditioned_leaves(s, table, axes), s.size(axes)))
    for reps in split_grads(s).values():
        out.update(reps)
    out.update(stream_reached(s))
    return out


def stream_reached(s: Any) -> dict[str, int]:
    """``{leaf: devices}``: the trained leaves kept whole on the tensor axes that a feature-split lookup table's
    residual stream reaches (a dim of the table's width: norms, a whole output head, a whole kernel reading
    the stream), whose update :func:`update_gathers` prices split and gathered back. Their gradient comes out
    split with the stream, and XLA sums it over the batch axes on that shard, before the update (measured,
    XLA:CPU data=2,model=4 and fsdp=2,model=4: a Mamba-2 LM's 1003-row table split on its 128 features, its
    whole ``(128, 1003)`` head's gradient summed over the batch as ``f32[1003,32]``, each ``(128, 32)``
    B/C projection's as ``f32[32,32]``, each norm gain's as ``f32[32]``)."""
    # comm prices the stream's gathers and imports this module
    from tpflax._src.cost.comm import feeds_stream, looked_up_table

    lv, out = s.lv, {}
    for path, d in lv.decisions.items():
        axes = s.axes(path, TENSOR)
        if not axes or path in lv.in_pair or not looked_up_table(path, d, s) or not feeds_stream(path, d, axes, s):
            continue
        width = body(d)[-1]
        for p, x in lv.decisions.items():
            if p != path and width in body(x) and x.trainable and not set(used_axes(lv.specs[p])) & set(axes):
                out[p] = s.size(axes)
    return out


def split_grads(s: Any) -> dict[tuple[str, ...], dict[str, int]]:
    """``{tensor axes: leaves}``: the leaves outside pairs kept whole on the tensor axes whose gradient a tensor
    split splits: a dim meeting (:attr:`tpflax._src.cost.traced.Traced.meets`) a split dim, or one that meets one
    (Mamba's ``x_proj`` reading a split ``in_proj``'s output, ``A_log`` meeting a whole ``dt_proj``'s output
    that a split ``out_proj`` sums), whether XLA sums or gathers around its matmul (:mod:`tpflax._src.cost.whole`:
    the weight gradient reads the split activation as saved; measured, a whole 256 -> 256 kernel reading a
    split 256-wide hidden: its input gathered forward, its gradient still updated split and gathered); and the
    members kept whole in a split pair (:func:`tpflax._src.cost.whole.whole_members`): a column in the pieces XLA
    splits its output into (a GQA key/value's heads; none for MQA), untraced one whose output gradient XLA
    gathers none; and the parameters a ``shard_map`` takes split over tensor axes the plan keeps them whole on
    (:func:`mapped_splits`). ``{axes: {leaf: pieces}}``; empty untraced."""
    out: dict[tuple[str, ...], dict[str, int]] = {}
    for axes, dims in split_dims(s).items():
        out[axes] = dict.fromkeys((rep for rep, _ in dims), s.size(axes))
    for axes, reps in mapped_splits(s).items():
        out.setdefault(axes, {}).update(dict.fromkeys(reps, s.size(axes)))
    for m, r in whole_members(s).items():
        if (k := update_pieces(r, s.size(r.axes))) is not None:
            out.setdefault(r.axes, {})[m] = k
    _residual_splits(s, out)
    _straddled_parts(s, out)
    return {a: reps for a, reps in out.items() if reps}


def _residual_splits(s: Any, out: dict[tuple[str, ...], dict[str, int]]) -> None:
    """The leaves kept whole on the tensor axes that a split kernel's output added back onto the stream its own
    input comes from (:attr:`Scope.residual`) reaches along the trace's meets, from the stream's dims and the
    kernel's kept ones: XLA keeps that stream (or its gradient) split as the kernel's output (or input gradient)
    is, so the layer writing the stream and the kernel's whole bias get their gradient split, updated split and
    gathered (measured, XLA:CPU data=2,model=4, ``h = inp(x); h = h + d(gelu(h))``: ``inp``'s kernel and bias
    gathered 3 times each with ``d`` a lone column, and ``d``'s whole bias too with it a lone row)."""
    lv = s.lv
    for path, (_, dims) in (s.residual or {}).items():
        rep = lv.rep(path)
        axes = tuple(sorted(s.axes(rep, TENSOR))) if rep in lv.specs and rep not in lv.in_pair else ()
        if not axes:
            continue
        for p, _ in reached_dims(s.meets, set(dims)):
            r = lv.rep(p)
            if (r in lv.decisions and lv.decisions[r].trainable and r not in lv.in_pair
                    and not set(used_axes(lv.specs[r])) & set(axes)):
                out.setdefault(axes, {}).setdefault(r, s.size(axes))
    for path, (*_, fed) in (s.downstream or {}).items():
        # the stream split from here on reaches every whole leaf of its width (its norms, the writers' biases, a
        # head), as a feature-split table's does (stream_reached): behind a column's split output, or a row's
        # split input where it reads the stream (comm.downstream_of)
        rep = lv.rep(path)
        axes = tuple(sorted(s.axes(rep, TENSOR))) if rep in lv.specs and rep not in lv.in_pair else ()
        spec = drop_layers(lv.decisions[rep], lv.specs[rep]) if axes else ()
        if not axes or not (fed or (spec and set(entry_axes(spec[-1])) & set(axes))):
            continue
        width = body(lv.decisions[rep])[-1]
        for p, x in lv.decisions.items():
            if p != rep and width in body(x) and x.trainable and not set(used_axes(lv.specs[p])) & set(axes):
                out.setdefault(axes, {}).setdefault(p, s.size(axes))


def _straddled_parts(s: Any, out: dict[tuple[str, ...], dict[str, int]]) -> None:
    """A whole kernel stored flat ``(E * f, d)`` and read as experts (:attr:`Scope.parted`) whose gradient a tensor
    split over ``n`` ranks cutting experts splits (:mod:`tpflax._src.cost.straddle`) comes out in ``gcd(E, n)``
    parts of whole experts, not ``n`` pieces (measured, XLA:CPU data=2,model=4, 6 experts, ``v1`` whole beside
    ``w1``/``w2`` split: its gradient summed over data as ``f32[3, 128, 64]``, its update gathered over groups of
    2)."""
    for axes, reps in out.items():
        n = math.prod(s.mesh.sizes[a] for a in axes)
        for m in reps:
            for n_exp in ((s.parted or {}).get(m) or {}).values():
                g = straddled_parts(n_exp, n)
                if g is not None:
                    reps[m] = g


def mapped_splits(s: Any) -> dict[tuple[str, ...], set[str]]:
    """``{tensor axes: leaves}``: parameters a ``shard_map`` body takes split over tensor axes (its in_specs,
    :attr:`Scope.shard_mapped`) that the plan uses nowhere on them (a replicated plan under EasyDeL's or
    MaxText's expert ``shard_map``). The body's transpose hands their gradient back split as the in_specs cut
    it, so XLA sums it over the batch axes on that shard, updates it split and gathers the parameter and its
    moments (measured, XLA:CPU dp=2,tp=4: EasyDeL's Mixtral replicated, each expert kernel summed over dp as
    ``f32[8,256,112]`` and gathered 3 times as ``f32[8,256,448]``)."""
    lv, out = s.lv, {}
    tensor = set(s.mesh.axes_with(TENSOR))
    for path, dims in (s.shard_mapped or {}).items():
        rep = lv.rep(path)
        if rep not in lv.decisions or not lv.decisions[rep].trainable:
            continue
        axes = tuple(sorted({a for _, names, _ in dims for a in names} & tensor - set(used_axes(lv.specs[rep]))))
        if axes:
            out.setdefault(axes, set()).add(rep)
    return out


def split_grad_items(s: Any) -> list[CommItem]:
    """Update gathers of the leaves whose gradient a tensor split splits (:func:`split_grads`; measured on
    Mamba, data=2,model=4: 3 gathers per leaf under adamw, 160 KB).

    Returns:
        :func:`update_gathers`' items for those leaves; none untraced.
    """
    why = "a leaf whole on the tensor axis whose gradient a tensor split it meets splits (a kernel's or a constraint's)"
    return [i for axes, reps in split_grads(s).items()
            for i in update_gathers(s, axes, sorted(reps), why, pieces=reps)]
