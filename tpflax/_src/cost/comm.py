"""Communication per training step, modelled per collective from the plan's decisions.

Each source of collectives has its own function: column -> row pairs, embeddings
and output heads (and tensor-split layers without a partner) here; gradients (fsdp
and data parallelism: :mod:`tpflax._src.cost.gradients`), experts
(:mod:`tpflax._src.cost.experts`) and the reshards of fused kernels
(:mod:`tpflax._src.cost.reshard`) have their own modules. They read only the
decisions (spec, shape, kind, pair, role, layers dim, unit, trainable), the mesh
axis roles and the traced rows, through a :class:`~tpflax._src.cost.scope.Scope`
that holds what one (plan, mesh) shares. Alike leaves of
repeated layers are priced once (:mod:`tpflax._src.cost.leaves`): an item's
``count`` includes how many there are, and its ``source`` names their group.

Rematerialisation re-issues the forward sums a recomputed block reads: XLA (TPU and
CPU alike) sums a block's attention output again to recompute its MLP input (see
:func:`_pair_items`, :class:`tpflax._src.cost.residual.Recompute`, which the chooser prices alike); a row
feeding only a residual add that no later norm of its block reads is summed once. A scanned stack's fsdp
weights are the exception: the step gathers them one layer at a time inside the
scan body, so a remat'd body gathers each layer again in the backward loop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tpflax._src.cost.activations import acts_for, layer_key
from tpflax._src.cost.batch import config_value
from tpflax._src.cost.chain import chain_collectives
from tpflax._src.cost.explicit import cpu_wire
from tpflax._src.cost.gradients import gradient_items
from tpflax._src.cost.kvsplit import kv_split_comms, kv_splits
from tpflax._src.cost.pieces import member_items
from tpflax._src.cost.price import gathered_bytes, stream_gathers
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.residual import row_layers, scope_recompute
from tpflax._src.cost.scope import Scope, body, drop_layers, is_tied, layers, leaf_itemsize
from tpflax._src.cost.straddle import parted_ranks, straddled_items, straddled_split
from tpflax._src.cost.stream import (
    conditioned_leaves,
    mapped_splits,
    stream_reached,
    tpu_stream_gathers,
    update_gathers,
)
from tpflax._src.cost.whole import (
    constrained_dims,
    lone_read,
    lone_row,
    tensor_split,
    whole_members,
)
from tpflax._src.facts.classify import ATTN
from tpflax._src.facts.tree import itemsize
from tpflax._src.mesh import EXPERT, TENSOR
from tpflax._src.specs import entry_axes, used_axes
from tpflax._src.trace.records import reached_dims, score_bias_tags
from tpflax._src.trace.reshape import spill
from tpflax._src.trace.spread import GATHERS_PER_TOUCH


def comm_items(scope: Scope, notes: list[str]) -> list[CommItem]:
    """The gradient, pair and layer collectives of one training step (see :func:`tpflax._src.cost.estimate.price_leaves`)."""
    return gradient_items(scope) + _pair_items(scope, notes) + _layer_items(scope, notes)



# ---------------------------------------------------------------------------
# column -> row pairs

def _pair_items(s: Scope, notes: list[str]) -> list[CommItem]:
    """A split pair sums the row side's partial outputs forward and the column side's input gradients back."""
    items: list[CommItem] = []
    dec, label = s.lv.decisions, s.lv.label
    # the rows a remat'd block's recompute sums again (Recompute: the chooser prices them alike). Measured: Llama
    # fsdp=2,model=4 remat on, v5e:2x4, o's sum again per layer; on XLA:CPU the zoo's llama and llama-scan remat steps
    # and the nnx.scan + nnx.remat probe_nnx decoder, a ``rematted_computation`` all-reduce of o's output per layer;
    # ResNet-18 fsdp=2,model=4 remat on, v5e:2x4, each block's second conv, normalised next (+0.27 GiB); a flat
    # q/k/v/o Dense block, whose o is kind "dense", one more o all-reduce per layer (0.905x before)
    redone = scope_recompute(s)
    unread = redone.unread(row_layers(s.lv)) if redone is not None and redone.again else frozenset()
    # a residual stream kept split on its features (a lookup table split on them) takes the pairs' partial
    # sums split: XLA:TPU reduce-scatters them into it (an all-reduce's first half; the gathers of the stream
    # behind each norm, _embedding_items, are the second); XLA:CPU has no reduce-scatter pass and all-reduces
    constrained = constrained_stream(s)
    summing = "reduce-scatter" if s.backend == "tpu" and (_stream_split(s) or any(constrained)) else "all-reduce"
    loose = _unconfirmed_pairs(s)
    if loose:
        notes.append(_loose_note(s, loose))
    kvs = kv_splits(s)
    # a shard_map body runs its matmuls as written: a row output it reduce-scatters by hand is summed there (the
    # explicit collective, priced as written), and the columns it takes read one input, whose gradient the
    # shard_map's transpose sums once (measured, XLA:CPU dp=2,tp=4: EasyDeL's Mixtral experts)
    written = {s.lv.rep(p) for p in s.written}
    mapped = {s.lv.rep(p) for p in s.shard_mapped}
    body_split = {rep: axes for axes, reps in mapped_splits(s).items() for rep in reps}
    # XLA:TPU's one sum of an input's partial gradients, by the value the columns read: a parallel block's
    # attention and MLP columns (GPT-J's, read off one norm) are two pairs, one all-reduce (measured, transformers'
    # GPT-J, v5e:2x4 data=2,model=4: one bf16[4,32,64] per layer for q, k, v and fc_in)
    input_sums: dict[tuple[str, int], int] = {}
    for pc in s.lv.pairs:
        cols, rows = list(pc.columns), list(pc.rows)
        axes = tuple(dict.fromkeys(a for p in cols + rows for a in s.axes(p, TENSOR)))
        inside = () if axes else _body_axes(body_split, cols + rows)
        if not axes and not inside:
            continue
        n = s.size(axes or inside)
        # a layer called several times (shared weights, ALBERT) sums its partial outputs at each call;
        # a projection's joined uses (one call, several inputs) are not calls
        joined = s.joined or {}
        # each member's own calls: a layer shared by several calls (a RetinaNet head over every FPN level) sums at
        # each, the single-call columns feeding it once each (est 1.66x the compiled before, review_r r06)
        calls_of = {p: max(1, (s.parts or {}).get(p, 1) - len(joined.get(p, ()))) for p in cols + rows}
        calls = max(calls_of.values())
        # every member contracted in k slices (a Python loop over an expert stack, ``w[i]`` for each expert i):
        # k pairs, each summing and gathering as one does (measured, XLA:CPU fsdp=2,tp=4: Tunix's Qwen3 MoE, a
        # row sum, a stream gather and an output gradient gather per expert and layer)
        looped = min(_per_call(s, p) for p in cols + rows)
        # a pair a loop body contracts unchanged at every step (a Universal Transformer's one block under
        # ``nn.scan(variable_broadcast="params")``) sums and gathers at every step, as a stack does at every layer
        steps = max(1, min((s.loops or {}).get(p, (1, False))[0] for p in cols + rows))
        once = max(layers(dec[p]) for p in cols + rows) * pc.count * calls * steps
        count = once * looped
        source = f"pair {pc.id}" + (f" and {pc.count - 1} alike" if pc.count > 1 else "")
        if inside:
            # the plan keeps the pair whole, but a shard_map body takes it split: it sums as the body is written
            items += [CommItem("all-reduce", inside, _pair_act(r, dec[r], "out", s), n, count, source,
                               f"row {label[r]}: its partial outputs summed in the shard_map body (forward)")
                      for r in rows if r not in written]
            items.append(CommItem("all-reduce", inside, _pair_act(cols[0], dec[cols[0]], "in", s), n, count, source,
                                  f"columns {', '.join(label[c] for c in cols)}: the shard_map's transpose sums "
                                  "their input's gradient (backward)"))
            continue
        if cols[0] in s.experts_split:
            items += expert_split_items(s, pc, axes, count, source)
            continue
        halves = {parted_split(s, p) for p in cols + rows}
        if len(halves) == 1 and (ek := halves.pop()) is not None:
            items += _parted_items(s, pc, axes, ek, count, source)
            continue
        straddled = {straddled_split(s, p) for p in cols + rows}
        if len(straddled) == 1 and (eng := straddled.pop()) is not None:
            items += straddled_items(s, pc, axes, eng, count, source)
            continue
        items += [i for m in cols + rows for i in ragged_split_items(s, m, count, source)]
        for r in rows:
            key = layer_key(dec[r].unit)
            # an expert row's outputs (its contraction batches over the experts) are weighted by the router, a
            # product of two activations whose backward reads them: the recompute sums them again (measured,
            # XLA:CPU data=2,model=4: tests/test_expert_split_rows.py, MaxText's mixtral)
            redo = redone is not None and redone.summed_again(key, dec[r].kind, bool(s.batch_dims.get(r)), unread)
            # a row split only on dims its contraction batches over (experts, E in ``BSEH,EHM->BSEM``) sums
            # nothing: each device's outputs are whole (the weighted sum over E is a product of two activations)
            if s.axes(r, TENSOR) and not _batch_split(r, s) and r not in written:
                items.append(CommItem(summing, axes, _pair_act(r, dec[r], "out", s), n,
                                      count // calls * calls_of[r] * (1 + redo),
                                      source, f"row {label[r]}: sum partial outputs (forward"
                                              f"{', again in the remat recompute' if redo else ''})"))
        # XLA:CPU reduces the column inputs' gradients one by one (q, k and v are three
        # all-reduces); XLA:TPU adds them first and reduces their shared input's gradient once,
        # except where a residual also reads that input (post-norm: BERT, BART): the partial
        # gradients are then added to the residual's one by one, and it reduces each; and where each
        # column casts the input for itself (a bfloat16 Dense over a float32 norm output): each partial
        # gradient is converted back before the sum, and it reduces each (trace.sharing)
        # a tensor-split grouped convolution is gathered whole (cost/grouped.py): its input gradient is whole
        tensor_cols = [c for c in cols if s.axes(c, TENSOR) and not (s.grouped or {}).get(c, (0, 0))[1]]
        # a column split only on dims its contractions batch over (Griffin's RG-LRU gates, block-diagonal by
        # heads, on linear_x's split output) reads its input split: its input gradient comes out split, unsummed;
        # a head_dim-split key/value (kvs) has its own collectives (cost/kvsplit.py)
        split_cols = [c for c in tensor_cols if not _batch_split(c, s) and c not in kvs]
        by_call = {c: b for c in split_cols if (b := _joined_calls(s, c, dec[c], calls_of[c])) is not None}
        items += [CommItem(kind, axes, s.rows_of(c) * width * s.act_item + fixed * leaf_itemsize(dec[c]),
                           ranks or n, count * k, source, f"{label[c]}: {why}")
                  for c in cols if c in kvs for kind, width, fixed, k, why, ranks in kv_split_comms(kvs[c], n)]
        # in a shard_map body the transpose of its input (replicated over the axes) sums the input's gradient
        # once, whichever dims the kernels split (their experts too)
        by_hand = [c for c in tensor_cols if c not in kvs]
        by_hand = by_hand if by_hand and all(c in mapped for c in by_hand) else []
        split_cols = by_hand or split_cols
        alone = [] if by_hand else [c for c in split_cols if s.backend != "tpu" or c in (s.shared or ())]
        summed = [c for c in split_cols if c not in alone]
        for c in alone + summed[:1]:
            what = f"columns {', '.join(label[x] for x in summed)}" if c in summed else f"column {label[c]}"
            if c in summed and (at := input_sums.get(((s.apart or {}).get(c, c), count))) is not None:
                also = f" and {', '.join(label[x] for x in summed)} (pair {pc.id}, reading the same input): sum"
                items[at] = dataclasses.replace(items[at], why=items[at].why.replace(": sum", also, 1))
                continue
            if c in summed:
                input_sums[((s.apart or {}).get(c, c), count)] = len(items)
            # a kernel contracted in slices (a stacked gate/up kernel used as w[0] and w[1]): one partial
            # input gradient per slice, each reduced apart
            k = _per_call(s, c) if c in alone else looped
            own = by_call[c][0] if c in by_call else _pair_act(c, dec[c], "in", s)
            items.append(CommItem(summing, axes, own, n, once // calls * calls_of[c] * k,
                                  source,
                                  f"{what}: sum partial input gradients (backward"
                                  f"{f', once for each of its {k} contracted slices' if k > 1 else ''})"))
        items += [CommItem("all-reduce", axes, by_call[j][1][i] if j in by_call else _pair_act(j, dec[j], "in", s) * r,
                           n, count, source, f"column {label[j]}, its joined other input: sum partial input "
                                             "gradients (backward)")
                  for j in split_cols for i, r in enumerate(joined.get(j, ()))]  # each other input's gradient, apart
        items += [i for c in tensor_cols for i in _stream_items(c, dec[c], axes, s, count, tuple(rows))]
        # a split column's output read whole by a contraction outside its pair (traced: StyleGAN2's first
        # synthesis conv, read by its toRGB row and by the next block's upsampling conv): XLA gathers it for
        # that reader forward, and again in the backward for the reader's weight gradient (measured, XLA:CPU)
        # (what is gathered is what the reader reads, where narrower than the column's output: a WaveNet's gated
        # half of its dilated conv's fused [tanh | sigmoid] output)
        items += [CommItem("all-gather", axes, min(_pair_act(c, dec[c], "out", s), _pair_act(r, dec[r], "in", s)
                                                   or _pair_act(c, dec[c], "out", s)), n, 2 * count, source,
                           f"column {label[c]}: gather its split output for {label[r]}, which reads it whole "
                           "(forward, and again for that kernel's weight gradient)")
                  for c in tensor_cols for r in _whole_readers(c, cols + rows, s)]
        whole = whole_members(s) if any(not s.axes(p, TENSOR) for p in cols + rows) else {}
        streamed = stream_reached(s) if whole and s.backend != "tpu" else {}  # XLA:CPU's (_twice_on_split_stream)
        for m in cols + rows:  # kept whole: a GQA key/value with fewer heads than the tensor degree, a gate
            if (r := whole.get(m)) is not None:
                new = member_items(r, f"{'column' if m in cols else 'row'} {label[m]}", n, count, source,
                                   _pair_act(m, dec[m], r.side, s))
                if m in cols and m in streamed and (r.kind, r.phase) == ("all-gather", "backward"):
                    # the gather only: one piece (MQA) gathers nothing, and its output gradient is summed once
                    new = [_twice_on_split_stream(i) if i.kind == "all-gather" else i for i in new]
                items += new
        items += _constrained_items(s, cols, rows, axes, constrained, count, source, looped)
        if pc.id in loose:
            items += _loose_items(s, pc, axes, n, count, source)
        _heads_note(dec, pc.id, cols, s, notes)
    return items


def _twice_on_split_stream(item: CommItem) -> CommItem:
    """A whole column's output-gradient gather (:func:`tpflax._src.cost.pieces.member_items`) where the column reads
    a feature-split table's residual stream (:func:`tpflax._src.cost.stream.stream_reached`): XLA:CPU gathers it
    twice, once for the input gradient and once more for the weight gradient, whose other operand (the norm's
    output) it gathers again from the split stream in the backward, and the two gathers come out of the
    partitioner unmerged (their replica groups spelled two ways). Measured, XLA:CPU data=2,model=4 and
    fsdp=2,model=4: LLaVA's GQA (2 key/value heads over model=4) key and value, 8 ``f32[4,40,32]`` gathers where
    the 1003-row table is split on its features, 4 where it is whole; the zoo Llama (2 key/value heads) alike,
    8 ``f32[4,32,2,16]`` against 4. Counted once, LLaVA's fsdp=2,model=4 estimate missed 41 KB."""
    return dataclasses.replace(item, count=2 * item.count,
                               why=item.why + "; twice: the feature-split stream it reads is gathered again for "
                                              "its weight gradient")


def downstream_of(s: Scope, path: str, row: bool) -> tuple[int, int, int, tuple[str, ...], bool] | None:
    """:attr:`Scope.downstream` of ``path``, a lone layer split as a row (``row``) or a column: a column's split output
    splits the stream it joins; a row's split input does only where it reads that stream (or no kernel). None for a
    column whose split output scales the stream (DiT's adaLN, :attr:`Scope.streams`): :func:`_stream_items` prices
    the stream it splits (counted again here, a DiT's tree plan with its adaLN kernels split was 1.20x the
    compiled collectives, re-run r60)."""
    if path in (s.streams or {}):
        return None
    v = (s.downstream or {}).get(path)
    return v if v and (not row or v[4]) else None


def _calls(s: Scope, path: str, row: bool = False) -> tuple[int, int, int, int]:
    """``(calls, calls reading the model's input, calls reading an earlier call's output, calls adding their
    output back onto the stream their input comes from)`` of a partnerless dense layer (:attr:`Scope.chained`:
    one ``nn.Dense`` called several times, each call summing and gathering as one does; :attr:`Scope.residual`);
    ``(1, 0, 0, 0)`` for one call not added back, a projection's joined uses (one call, several inputs) being
    none."""
    calls = max(1, (s.parts or {}).get(path, 1) - len((s.joined or {}).get(path, ())))
    inputs, chained = (s.chained or {}).get(path, (0, 0)) if calls > 1 else (0, 0)
    # a call whose output joins a stream running on through norms adds it back onto what it reads, as far as XLA
    # is concerned: the stream comes out split there too (Traced.downstream)
    resid = 0 if path in (s.streams or {}) else \
        max((s.residual or {}).get(path, (0, ()))[0], (downstream_of(s, path, row) or (0,))[0])
    return calls, min(inputs, calls), min(chained, calls), min(resid, calls)


def _per_call(s: Scope, path: str) -> int:
    """Contractions of ``path``'s slices in one call of its layer (:attr:`Scope.slices`; a Python loop over a
    stacked layers leaf slices its layers, which ``layers`` counts already)."""
    return max(1, (s.slices or {}).get(path, 1) // layers(s.lv.decisions[path]))


def _body_axes(split: dict[str, tuple[str, ...]], members: list[str]) -> tuple[str, ...]:
    """The tensor axes a ``shard_map``'s in_specs split every one of a pair's ``members`` over, where the plan keeps
    them whole there (``split``: :func:`tpflax._src.cost.stream.mapped_splits` by leaf); else ``()``. The body then
    sums the row's partial outputs as written (its ``psum``) and its transpose the columns' input gradient, whatever
    the plan (measured, XLA:CPU data=2,model=4: a replicated plan of a column -> row pair taken split by a body,
    ``tests/test_shard_map.py``)."""
    got = {split.get(m) for m in members}
    return got.pop() if len(got) == 1 and None not in got else ()


def _whole_readers(c: str, pair: list[str], s: Scope) -> list[str]:
    """The convs outside ``pair`` that read conv column ``c``'s tensor-split output channels whole (their kernel
    not split on its input channels), as traced; representatives, once each. Dense layers are left out: their
    traced edges also run through activation products (CaiT's talking heads mix the scores q and k make),
    where XLA gathers the product, not the column's output."""
    t_axes = set(s.axes(c, TENSOR))
    spec = s.lv.specs[c]
    out: list[str] = []
    if not _conv(s, c):
        return out
    for (src, sdim, dst, ddim) in s.limits:
        r = s.lv.rep(dst)
        if s.lv.rep(src) != c or r in pair or r in out or r not in s.lv.specs or sdim >= len(spec) \
                or not t_axes & set(entry_axes(spec[sdim])):
            continue
        if _conv(s, r) and ddim < len(s.lv.specs[r]) \
                and not t_axes & set(entry_axes(s.lv.specs[r][ddim])):
            out.append(r)
    return out


def _conv(s: Scope, path: str) -> bool:
    """A conv kernel: by the tree, or traced as one (a 1-D conv's ``(k, in, out)`` kernel, which the tree takes for a
    DenseGeneral's: a WaveNet's gated output, read whole by its skip conv, was gathered by XLA and not priced, 0.82 of
    the compiled collectives): contracted by the trace, in no dot."""
    return s.lv.decisions[path].kind == "conv" or (
        path in s.contracted and path not in s.dots and path not in s.batched_dots)


def _batch_split(c: str, s: Scope) -> bool:
    """Whether ``c`` is split over the tensor axes only on dims its traced contractions batch over."""
    dims = s.batch_dims.get(c)
    split = {i for i, e in enumerate(s.lv.specs[c]) if set(entry_axes(e)) & set(s.axes(c, TENSOR))}
    return bool(dims) and bool(split) and split <= dims


def expert_split_items(s: Scope, pc: Any, axes: tuple[str, ...], count: int, source: str) -> list[CommItem]:
    """An expert pair split over the tensor ``axes`` on its experts dim (:attr:`Scope.experts_split`): each device
    runs its own experts on its slice of the dispatched buffer, nothing moves around the expert matmuls; the
    combine (``ebcd,btec->btd``) sums the experts' outputs over the axes (forward) and the dispatch's transpose
    the tokens' input gradient (backward), once for every column reading the buffer, both at the layer's tokens
    (measured, XLA:CPU data=2,model=4 and fsdp=2,model=4, benchmarks/linen_probe.py moe-mixtral and moe-switch:
    two ``f32[tokens, d]`` all-reduces over model per layer and a router-weight gradient of a few hundred bytes,
    unmodelled). Priced here, not as a product of two activations (:func:`tpflax._src.cost.estimate.split_sum_items`
    skips the combine's sum)."""
    dec, label, n = s.lv.decisions, s.lv.label, s.size(axes)
    d_in, d_out = body(dec[pc.columns[0]])[1], body(dec[pc.rows[-1]])[-1]
    return [CommItem("all-reduce", axes, s.rows_local * d_out * s.act_item, n, count, source,
                     f"experts of {label[pc.rows[-1]]} split over the tensor axis: the combine sums their outputs "
                     "(forward)"),
            CommItem("all-reduce", axes, s.rows_local * d_in * s.act_item, n, count, source,
                     f"experts of {', '.join(dict.fromkeys(label[c] for c in pc.columns))} split over the tensor axis: the "
                     "dispatch's transpose sums their input gradients (backward)")]


def parted_split(s: Scope, path: str) -> tuple[int, int] | None:
    """``(E, k)`` when 2-D ``path``'s tensor axes split a stored dim its contractions read cut into ``(E, minor)``
    (:attr:`Scope.parted`: DBRX's experts stored ``(E * f, d)``) over ``n = E * k`` ranks, ``k > 1``: each rank holds
    ``1 / k`` of one expert, where the trace runs the split on into the experts (:func:`tpflax._src.trace.reshape.spill`,
    the same test). Else None (``n`` dividing E holds whole experts: a pair as any other)."""
    d = s.lv.decisions[path]
    for dim, n_exp, n in parted_ranks(s, path):
        # the trace's own test (trace.reshape.spill): n / E ranks in each expert need n / E to divide f, and E a
        # prime power and n / E a power of the same prime (6 experts over 12 ranks: no); else no two-step sums
        if n > n_exp and n % n_exp == 0 and (n_exp * spill(d.shape[dim], n_exp, d.shape[dim] // n_exp)) % n == 0:
            return n_exp, n // n_exp
    return None


def _parted_items(s: Scope, pc: Any, axes: tuple[str, ...], ek: tuple[int, int], count: int,
                  source: str) -> list[CommItem]:
    """An expert pair stored flat ``(E * f, d)`` split over ``n = E * k`` tensor ranks (:func:`parted_split`), each
    rank ``1 / k`` of one expert. XLA sums in two steps: over the ``k`` ranks of one expert, then over the ``E``
    experts. The row sums its one expert's partial outputs over ``k`` (forward; the combine's sum over ``E`` is a
    product of two activations, :func:`tpflax._src.cost.estimate.split_sum_items`), and each column's input
    gradient is summed over ``k`` and then over ``E`` (backward): measured, XLA:CPU model=8, 4 experts, per column
    ``f32[tokens, d]`` all-reduced over groups of 2 and again over groups of 4, and the down projection's
    ``f32[tokens, 1, d]`` over groups of 2; priced as one sum over 8 before, 0.78x the compiled collectives."""
    dec, label = s.lv.decisions, s.lv.label
    n_exp, k = ek
    items = []
    for r in pc.rows:
        d = dec[r]
        width = d.shape[1 - next(iter((s.parted or {})[r]))]
        # at the tokens its columns read: one expert's (tokens, 1, d) on each rank, not every expert's rows
        items.append(CommItem("all-reduce", axes, s.rows_of(pc.columns[0]) * width * s.act_item, k, count, source,
                              f"row {label[r]}: sum partial outputs over the {k} ranks holding one expert (forward)"))
    for c in pc.columns:
        d = dec[c]
        width = d.shape[1 - next(iter((s.parted or {})[c]))]
        size = s.rows_of(c) * width * s.act_item
        items.append(CommItem("all-reduce", axes, size, k, count, source, f"column {label[c]}: sum partial input "
                              f"gradients over the {k} ranks holding one expert (backward)"))
        items.append(CommItem("all-reduce", axes, size, n_exp, count, source, f"column {label[c]}: then over the "
                              f"{n_exp} experts (backward)"))
    return items


def ragged_split_items(s: Scope, path: str, count: int, source: str) -> list[CommItem]:
    """A ``jax.lax.ragged_dot`` kernel split over tensor axes on its group dims (its experts, :attr:`Scope.ragged`):
    the rows it reads carry no experts dim to split alike, so each device contracts every row with its own
    experts' slices and leaves the other experts' rows zero. XLA sums that partial output over the axes (forward)
    and the partial input gradient the transposed dot makes (backward); the kernel's gradient stays local. Each
    ragged dot is summed so, the gate's and the up projection's and the down projection's alike, at the rows it
    reads (measured, XLA:CPU data=2,model=4: a dropless MoE sorting the batch's tokens for ragged_dot, its
    ``(E, d, f)`` and ``(E, f, d)`` kernels split ``P('model', None, None)``: per layer ``f32[tokens*k, f]``
    twice and ``f32[tokens*k, d]`` once all-reduced over model forward, ``f32[tokens*k, f]`` once and
    ``f32[tokens*k, d]`` twice backward)."""
    dims = (s.ragged or {}).get(path, ())
    tensor = s.axes(path, TENSOR)
    spec = s.lv.specs[path]
    axes = tuple(a for a in tensor if any(a in entry_axes(spec[k]) for k in dims if k < len(spec)))
    if not axes:
        return []
    d, label, n = s.lv.decisions[path], s.lv.label[path], s.size(axes)
    why = f"ragged dot {label} with its groups split over the tensor axis: sum its partial"
    return [CommItem("all-reduce", axes, _pair_act(path, d, "out", s), n, count, source, f"{why} output (forward)"),
            CommItem("all-reduce", axes, _pair_act(path, d, "in", s), n, count, source,
                     f"{why} input gradient (backward)")]


def _unconfirmed_pairs(s: Scope) -> frozenset[int]:
    """The plan's pair classes (ids) whose columns feed none of their rows in the traced program: no traced
    dataflow edge from a column to a row (:attr:`tpflax._src.cost.traced.Traced.edges`), every member traced
    as a contraction. A tree plan pairs layers by names and widths; where no such edge is, the pair's split
    output and split input meet nothing split alike (a U-Net's ConvTranspose_0 -> ConvTranspose_1, each
    feeding a skip concat; a Conformer's depthwise -> pointwise conv taken in name order). Empty untraced."""
    if s.edges is None:
        return frozenset()
    # a pair class holds representatives: a layer's columns may stand for themselves (the first block's q/k/v,
    # whose input has no gradient) while its row stands for every block's, so the edges are read between classes
    edges = {(s.lv.rep(a), s.lv.rep(b)) for a, b in s.edges}
    out = set()
    for pc in s.lv.pairs:
        members = (*pc.columns, *pc.rows)
        # a column whose output scales a larger activation (DiT's adaLN, Traced.streams) reaches the row through
        # that product, not as the activation the row sums: no edge of a pair
        if pc.columns and pc.rows and all(p in s.contracted for p in members) \
                and not any((c, r) in edges for c in pc.columns if c not in (s.streams or {}) for r in pc.rows):
            out.add(pc.id)
    return frozenset(out)


def _loose_items(s: Scope, pc: Any, axes: tuple[str, ...], n: int, count: int, source: str) -> list[CommItem]:
    """A pair that is no edge of the program: XLA treats each member as alone. The column's split output
    meets no split row, so it is gathered (forward); the row reads an activation whole and slices it, so its
    input gradient comes out split and is gathered (backward). The sums the pair prices stay (measured: two
    linen Dense layers reading one input, tree-paired, XLA:CPU data=2,model=4)."""
    dec, label = s.lv.decisions, s.lv.label
    items = [CommItem("all-gather", axes, _pair_act(c, dec[c], "out", s), n, count, source,
                      f"column {label[c]}, whose output no row of its pair reads (traced): gather it (forward)")
             for c in pc.columns if s.axes(c, TENSOR)]
    items += [CommItem("all-gather", axes, _pair_act(r, dec[r], "in", s), n, count, source,
                       f"row {label[r]}, whose input no column of its pair makes (traced): gather its input "
                       "gradient (backward)")
              for r in pc.rows if s.axes(r, TENSOR) and (s.widths or {}).get(r) != 0]
    return items


def _loose_note(s: Scope, loose: frozenset[int]) -> str:
    label = s.lv.label
    names = "; ".join(f"{', '.join(label[c] for c in pc.columns)} -> {', '.join(label[r] for r in pc.rows)}"
                      for pc in s.lv.pairs if pc.id in loose)
    return (f"column -> row pairs with no traced dataflow between them: {names}. XLA reshards around each "
            "(gathers of the activations, or moves the kernels); priced as gathers of the column's output and "
            "the row's input gradient, unconfirmed against the compiled program. Plan with "
            "plan(..., model=fn, sample=...) to pair the layers the program connects")


def constrained_stream(s: Scope) -> tuple[set[tuple[str, int]], dict[int, frozenset[str]]]:
    """The parameter dims (representatives') a model's own constraint splits over tensor axes the plan keeps
    them whole on, with every dim they meet along the trace, and ``{width: tensor axes}`` of the untagged
    activation dims it splits over tensor axes (:attr:`Scope.split_widths`): MaxText's residual stream, its
    ``activation_embed`` over ``tensor``, reaches the embed dims of every pair's columns (contracted) and rows
    (kept), past norms, where the stream carries no tag. A norm
    scale the plan splits over tensor axes splits its output so (XLA propagates the scale's layout: MaxText's
    ``norm`` rule, measured on its GPT-3, whose stream no constraint splits), unless the scale follows a
    kernel's split channels (the trace's meets: a split conv's GroupNorm is the pair's own)."""
    begin = {pd for dims in constrained_dims(s).values() for pd in dims}
    dims = {(s.lv.rep(p), d) for p, d in reached_dims(s.meets, begin)} if begin else set()
    tensor = set(s.mesh.axes_with(TENSOR))
    widths: dict[int, frozenset[str]] = {}
    split = list(s.split_widths or ())
    attached = {p for p, *_ in s.meets}  # a norm's scale along a kernel's channels (a split conv's GroupNorm)
    for p, d in s.lv.decisions.items():
        if d.kind == "norm" and body(d) and p not in attached:
            split.append((body(d)[-1], tuple(entry_axes(drop_layers(d, s.lv.specs[p])[-1]))))
    for width, axes in split:
        if set(axes) & tensor:
            widths[width] = widths.get(width, frozenset()) | (set(axes) & tensor)
    return dims, widths


def _constrained_items(s: Scope, cols: list[str], rows: list[str], axes: tuple[str, ...],
                       stream: tuple[set[tuple[str, int]], dict[int, frozenset[str]]], count: int,
                       source: str, looped: int = 1) -> list[CommItem]:
    """A split pair whose outer dims a model's constraint splits (:func:`constrained_stream`): the stream its
    columns contract reaches them split, gathered before their matmul and again in a remat recompute (one
    gather for columns reading one value: q, k and v; two where a constraint makes a copy, MaxText's q input
    and k/v input each constrained apart); its rows' output gradient arrives split, gathered for the backward.
    An attention pair gathers each again in the backward (its columns' input for their weight gradients, its
    row's output gradient for each product); an MLP keeps them. Their partial sums are the pair's own items.

    Measured (XLA:CPU, data=2,model=4, tests/test_constraint_stream.py: an attention and an MLP block under
    ``P('data', None, 'model')`` on the residual): 8 gathers of the stream per layer with remat, 6 without
    (unrolled; 7 scanned), 3 for an MLP block alone with remat; MaxText's llama3, 11 a layer (q and k/v
    apart), gemma2 23 for 22 priced, gpt3 7 for 8 (``results/probe_maxtext.md``)."""
    # an expert kernel (``BSEH,EHM->BSEM``, a ragged dot: batched over the experts) reads or writes the stream so too
    dots, dec, label = {**(s.batched_dots or {}), **(s.dots or {})}, s.lv.decisions, s.lv.label
    dims, widths = stream
    split = {w for w, ax in widths.items() if ax & set(axes)}

    def width(p: str, side: int) -> int:  # side 0: the contracted dims, 1: the kept ones
        return math.prod(dec[p].shape[d] for d in dots[p][side])

    def whole(p: str, side: int) -> bool:  # the plan keeps those dims whole on the pair's axes
        return not any(tensor_split(s, p, d) & set(axes) for d in dots[p][side])

    # not a row a shard_map body reduce-scatters by hand (that collective's transpose gathers it, as written), nor
    # one split on the experts its contraction batches over (whole per-expert outputs, which a product combines)
    by_hand = {s.lv.rep(p) for p in s.written}
    writes = [r for r in rows if r in dots and r not in by_hand and not _batch_split(r, s) and whole(r, 1)
              and (any((r, d) in dims for d in dots[r][1]) or width(r, 1) in split)]
    # a residual branch reads the stream it writes (through a norm, which ends the trace's meets)
    written = {width(r, 1) for r in writes} | split
    reads = [c for c in cols if c in dots and whole(c, 0) and (any((c, d) in dims for d in dots[c][0])
                                                                or width(c, 0) in written)]
    items = []
    apart = len({(s.apart or {}).get(c, c) for c in reads})  # MaxText constrains q's input and k/v's apart
    # an attention block's gathers the backward repeats: its columns' input for their weight gradients, its
    # row's output gradient for each product (an MLP's are kept from the forward or its recompute)
    attn = any(dec[p].kind == "attention" or ATTN.search(p) for p in cols + rows)
    # looped experts (count holds their slices) reading one input between them gather it once a call; reading
    # each its own slice of a dispatched buffer (Tunix's), once each (measured, XLA:CPU: tests/test_looped_experts.py)
    one = looped > 1 and bool(reads) and (s.slice_reads or {}).get(reads[0], 0) < (s.slices or {}).get(reads[0], 0)
    if reads and _pair_act(reads[0], dec[reads[0]], "in", s):
        items.append(CommItem("all-gather", axes, _pair_act(reads[0], dec[reads[0]], "in", s), s.size(axes),
                              (count // looped if one else count) * (1 + s.remat + attn) * apart, source,
                              f"{', '.join(label[c] for c in reads)}: gather the stream a model's constraint (or a "
                              "split norm scale) splits on the contracted features (forward"
                              + (", again in the remat recompute" if s.remat else "")
                              + (", and for the weight gradient" if attn else "") + ")"))
    items += [CommItem("all-gather", axes, _pair_act(r, dec[r], "out", s), s.size(axes), count * (1 + attn), source,
                       f"row {label[r]}: gather the output gradient the split stream splits on its features "
                       f"(backward{', once for each product' if attn else ''})") for r in writes]
    if looped > 1 and s.backend == "cpu" and reads and writes and width(reads[0], 1) < width(reads[0], 0):
        items += _looped_narrow_items(s, reads, writes, axes, count, source, looped)
    return items


def _looped_narrow_items(s: Scope, cols: list[str], rows: list[str], axes: tuple[str, ...], count: int, source: str,
                         looped: int) -> list[CommItem]:
    """Experts a Python loop runs over a stacked kernel (``w[i]``), their hidden narrower than the split stream
    their columns contract: XLA computes each slice's weight gradients split like the stream, so it gathers the
    narrower hidden instead (each column's output gradient, each row's input) and moves each slice's gradient
    into its kernel's own split with an all-to-all. Measured on XLA:CPU only (fsdp=2,tp=4, Tunix's Qwen3 MoE:
    8 experts of hidden 96 and 192 under a 256-wide stream split over tp; at 384 XLA keeps the stream it
    gathered forward, as the pair's own items say)."""
    dec, label, n = s.lv.decisions, s.lv.label, s.size(axes)
    items = [CommItem("all-gather", axes, _pair_act(c, dec[c], "out", s), n, count, source,
                      f"looped expert column {label[c]}: gather its narrower output gradient for its weight "
                      "gradient, split like the stream (backward)") for c in cols]
    items += [CommItem("all-gather", axes, _pair_act(r, dec[r], "in", s), n, count, source,
                       f"looped expert row {label[r]}: gather its narrower input for its weight gradient, split "
                       "like the stream (backward)") for r in rows]
    items += [CommItem("all-to-all", axes, math.prod(body(dec[p])) / looped * cpu_wire(leaf_itemsize(dec[p]), s.backend)
                       / n, n, count, source, f"looped expert {label[p]}: move each slice's weight gradient from "
                       "the stream's split into its own (backward)") for p in cols + rows]
    return items


def _stream_split(s: Scope) -> bool:
    """Whether a lookup table split on its features over a tensor axis keeps the residual stream split
    (as :func:`_embedding_items` prices its gathers): not a vocab split, not a table inside attention."""
    return any(d.kind == "embedding" and s.axes(p, TENSOR) and feeds_stream(p, d, s.axes(p, TENSOR), s)
               for p, d in s.lv.decisions.items())


def _split_vocab(path: str, d: Any, axes: tuple[str, ...], s: Scope) -> bool:
    """Whether a table's rows are split over the tensor ``axes`` (an fsdp split of the rows is the fsdp
    gather's, not a vocab split)."""
    return bool(set(entry_axes(drop_layers(d, s.lv.specs[path])[0])) & set(axes))


def looked_up_table(path: str, d: Any, s: Scope) -> bool:
    """A table as the estimate prices one: the trace's (or the tree's) embedding, or a leaf a rule splits that
    the trace shows only looked up (whatever its kind)."""
    return d.kind == "embedding" or (d.strategy == "vocab" and len(body(d)) >= 2) or (
        path in s.looked and path not in s.contracted)


def feeds_stream(path: str, d: Any, axes: tuple[str, ...], s: Scope) -> bool:
    """A lookup table split on its features over ``axes`` keeps the residual stream split; a table inside an
    attention layer (T5's, BEiT's relative bias) or a traced per-head bias of the scores (:func:`score_bias`)
    feeds the scores, not the stream, and a table of a
    per-example conditioning vector (DiT's class embedding, :attr:`Scope.conditions`) the modulations."""
    return not _split_vocab(path, d, axes, s) and not ATTN.search(path) and path not in _conditioning(s) \
        and not score_bias(path, d, axes, s)


def score_bias(path: str, d: Any, axes: tuple[str, ...], s: Scope) -> bool:
    """A 2-D table looked up, traced, at as many ids per example as an attention's query-key pairs (a whole
    multiple of them), one column per head, the scores' heads split over ``axes`` as its columns are:
    Graphormer's spatial encoding (shortest-path distance -> a bias per head, added to the scores), a T5-like
    relative bias looked up per example. Its looked-up rows are added to the head-split scores, not to the
    residual stream: split over its columns it moves nothing (measured, XLA:CPU data=2,model=4: no
    collective beyond the split gradient's batch sum, tests/test_estimate_traced.py)."""
    b, rows = body(d), s.lookup_rows.get(path)
    if len(b) != 2 or not rows or not set(axes) <= set(entry_axes(drop_layers(d, s.lv.specs[path])[1])):
        return False
    return any(all(set(axes) <= set(entry_axes(_spec_at(s, p, i))) for p, i in tags)
               for tags in score_bias_tags(rows, b[-1], ((sc.per_example, sc.dims) for sc in s.scores)))


def _spec_at(s: Scope, path: str, dim: int) -> Any:
    spec = s.lv.specs.get(s.lv.rep(path)) or ()
    return spec[dim] if dim < len(spec) else None


def _conditioning(s: Scope) -> set[str]:
    return {s.lv.rep(t) for t in s.conditions or {}}


def _heads_note(decisions, pid: int, cols: list[str], s: Scope, notes: list[str]) -> None:
    # attention split finer than its heads: the score contraction crosses devices and
    # XLA reshards attention in ways this model does not predict; say so
    n_heads = config_value(s.config, "n_heads")
    if not n_heads or not any(decisions[c].kind == "attention" for c in cols):
        return
    degree = max((s.size(s.axes(c, TENSOR)) for c in cols), default=1)
    if degree > 1 and n_heads % degree:
        notes.append(f"attention pair {pid}: {n_heads} heads do not divide the tensor degree {degree}, so "
                     "head_dim is split and XLA adds resharding collectives that are not modelled; use a "
                     "tensor degree that divides the heads")


def _joined_calls(s: Scope, path: str, d: Any, calls: int) -> tuple[float, list[float]] | None:
    """A column whose joined other inputs (``Scope.joined``) are read by calls of its own layer, traced: the input
    gradient bytes of its own calls (their mean) and of each joined call, each at its own shape; None otherwise.

    DeBERTa's shared query and key projections are called on the tokens and on the relative-position table (a
    parameter, read by no example): their calls' mean, the tokens' 128 rows and the table's 32 taken for 16 (split
    over the batch as the tokens are), priced each input gradient at 72 rows and the joined one at nothing;
    XLA:CPU all-reduces each apart, f32[4,32,128] and f32[32,128] (measured, data=2,model=4: the model all-reduces
    0.82x the compiled ones). A joined input reading no batch rows (ratio 0) is whole on every device."""
    extra = (s.joined or {}).get(path, ())
    if not extra or path in (s.buffers or {}) or (s.widths or {}).get(path) == 0:
        return None
    acts = acts_for(s.activations, d.unit)
    if len(acts) != calls + len(extra):
        return None
    # the calls are told apart by what they read, not by their order: its own calls read the traced rows (the
    # tokens), the joined ones the others (a table projected before the tokens was priced as the own call, split
    # over the batch, and the tokens as the joined one, whole: 1.21x the compiled collectives, data=2,model=4)
    own_rows = (s.rows or {}).get(path, 0) * s.batch.size
    mine = [i for i, a in enumerate(acts) if math.prod(a.inputs[0][:-1]) == own_rows]
    mine = mine if len(mine) == calls else list(range(calls))
    own = [s.nbytes(acts[i].inputs[0], path) for i in mine]
    others = [s.nbytes(a.inputs[0], path) if r else math.prod(a.inputs[0]) * s.act_item
              for a, r in zip([a for i, a in enumerate(acts) if i not in mine], extra, strict=True)]
    return sum(own) / len(own), others


def _members_summed(path: str, d: Any, side: str, acts: list[Any], s: Scope) -> int:
    """How many members' partial outputs a row called inside ``nnx.vmap`` / ``nn.vmap`` over its stacked kernel sums
    at once: every member's (each has its own weights, so its own output), where the stacked dim is not split over
    the tensor axes; 1 otherwise. The traced calls are one member's shapes, repeated per member.

    Measured, XLA:CPU data=2,model=4: an NNX MoE whose 8 experts (w1, w3, w2 stacked by ``nnx.vmap``) run densely
    over every token by ``nnx.vmap(in_axes=(0, None))``, split on their ffn dim (the tree-only plan): one
    f32[8,4,32,128] all-reduce of w2's outputs per layer, priced at one expert's f32[4,32,128] (est/comp 0.72,
    review_w W08). Their input gradient, the tokens read by every member, is summed over the members on the device
    first: one f32[4,32,128] each, as priced."""
    members = max(a.members for a in acts)  # (a kernel shared by per-example members sums every example's too)
    if side != "out" or members <= 1:
        return 1
    spec = drop_layers(d, s.lv.specs[path])  # a kernel shared by the members (2-D) has no stacked dim to split
    return 1 if len(spec) >= 3 and set(s.axes(path, TENSOR)) & set(entry_axes(spec[0])) else members


def _pair_act(path: str, d: Any, side: str, s: Scope) -> float:
    if side == "in" and (s.widths or {}).get(path) == 0:
        return 0.0  # it reads the model's inputs: no input gradient to sum
    # an expert kernel reads its buffer, not its layer's input (the tokens before the dispatch)
    acts = acts_for(s.activations, d.unit) if path not in (s.buffers or {}) else []
    if acts:  # a layer called at several sizes (a head shared by FPN levels): its calls' mean, priced at each call
        mean = sum(s.nbytes(a.output if side == "out" else a.inputs[0], path) for a in acts) / len(acts)
        return mean * _members_summed(path, d, side, acts, s)
    b = body(d)
    t_axes = set(s.axes(path, TENSOR))
    split = [i for i, e in enumerate(drop_layers(d, s.lv.specs[path])) if t_axes & set(entry_axes(e))]
    if d.kind == "expert" and len(b) == 3:
        # a column's input as wide as its contraction sums, as traced: DBRX's columns are stored (E, f, d), not (E, d, f)
        width = ((s.widths or {}).get(path) or b[1]) if side == "in" else b[-1]
    elif len(b) == 2 and len(split) == 1 and d.role in ("column", "row"):
        # the split dim is a column's output and a row's input, however the kernel is stored
        # ((out, in) Conv1D kernels too): the other dim is the activation's width
        width = b[1 - split[0]] if (side == "in") == (d.role == "column") else b[split[0]]
    elif d.kind == "conv" and len(b) >= 3:  # (..window.., in, out) channels: the window's taps are no width
        # its input gradient at its input's positions (a strided conv's more, a transposed one's fewer)
        width = b[-2] * s.in_rows.get(path, 1.0) if side == "in" else b[-1]
    elif side == "in":  # a column's input: as wide as the dims its contraction sums over, as traced (a kernel
        # stacked (2, d, f) and used as w[0], w[1] reads d), else its first dim
        width = (s.widths or {}).get(path) or b[0]
    else:
        width = b[-1]
    # an expert kernel split over expert axes reads its layer's tokens gathered over them (they split the batch)
    gathered = s.size(s.axes(path, EXPERT)) if d.kind == "expert" and path not in (s.buffers or {}) else 1
    return s.rows_of(path) * width * s.act_item * gathered


# ---------------------------------------------------------------------------
# embeddings, output heads and tensor-split layers without a partner

def _layer_items(s: Scope, notes: list[str]) -> list[CommItem]:
    """Collectives of tensor-split leaves outside pairs."""
    lv = s.lv
    items: list[CommItem] = []
    for path, d in lv.decisions.items():
        axes = s.axes(path, TENSOR)
        # a frozen parameter (plan(trainable=)) computes as a trained one does: its activation collectives stay
        if path in lv.in_pair or d.kind in ("int", "state") or not axes or d.kind == "bias":
            continue
        if looked_up_table(path, d, s):
            new = _embedding_items(path, d, axes, s, notes=notes)
        elif s.edges is not None and path not in s.contracted:
            continue  # traced, no contraction uses it (a Conv1D's (width, channels) taps, combined elementwise)
        elif s.channel_partners(path, axes):
            continue  # a depthwise conv between split kernels: its channels stay split (Scope.channel_partners)
        elif d.kind in ("dense", "head") and set(axes) & set(entry_axes(lv.specs[path][-1])):
            # its output features split over the tensor axes (an fsdp split of them is the fsdp gather's)
            new = _column_items(path, d, axes, s)
        elif (row := lone_row(s, path, axes)) is not None:
            calls, inputs, chained, resid = _calls(s, path, row=True)
            # a call reading the model's own input (whole) whose output the next call reads, with no residual
            # between (d(gelu(d(x)))): XLA keeps that output split on its features, as the next call contracts it,
            # and computes the call as a column: it moves the kernel's shard into the column layout (an
            # all-to-all) instead of summing partial outputs (measured, XLA:CPU data=2,model=4, widths 16 to 512,
            # 32 and 256 rows: one all-to-all of the shard and one output all-reduce, the second call's)
            turned = min(inputs, chained) if chained and not resid else 0
            new = [CommItem(row.kind, axes, row.size, s.size(axes), layers(d) * (calls - turned), path,
                            f"row layer without a column partner: {row.how}"
                            + (f", at each of its {calls - turned} calls" if calls - turned > 1 else
                               f", at 1 of its {calls} calls" if calls > 1 else ""))]
            if turned:
                new.append(CommItem("all-to-all", axes, s.leaf_bytes(path, d), s.size(axes), layers(d) * turned,
                                    path, "row layer without a column partner whose call on the model's input feeds "
                                    "its next call: XLA computes that call as a column, its kernel shard moved to the "
                                    "column layout (forward)"))
            if resid and not chained:
                # a row whose output is added back onto the stream its input comes from (h = inp(x);
                # h = h + d(gelu(h)); or one layer called on several activations of that stream, all added onto
                # it): XLA keeps the stream's gradient split on the features the split input gradient adds to it,
                # so the calls' one output gradient arrives split, gathered for the weight gradients and again for
                # the input gradients (measured, XLA:CPU data=2,model=4 and fsdp=2,model=4: 1 and 2 calls, 2 gathers)
                new.append(CommItem("all-gather", axes, row.size, s.size(axes), layers(d) * 2, path,
                                    "row layer without a column partner added back onto the stream it reads: "
                                    "gather its split output gradient for its weight gradient and again for its "
                                    "input gradient (backward)"))
            new += _residual_norm_items(path, d, axes, s) + _downstream_items(path, d, axes, s, row.size, row=True)
            if chained:
                # a shared row whose calls are chained through the residual (x = x + d(f(x)) in a Python loop):
                # its split input gradient joins the residual's gradient, which XLA then keeps split on the
                # features, and every call's output gradient arrives split: gathered for its weight gradient,
                # and again (its replica groups spelled another way) for its input gradient where that is
                # computed (measured, XLA:CPU data=2,model=4 and fsdp=2,model=4: 2, 3 and 4 calls after the input
                # 3, 5 and 7 gathers; 3 calls after a whole layer 6)
                new.append(CommItem("all-gather", axes, row.size, s.size(axes),
                                    layers(d) * (2 * calls - inputs), path,
                                    f"row layer without a column partner called {calls} times, chained through "
                                    "the residual: gather each call's split output gradient for its weight "
                                    "gradient and again for its input gradient (backward)"))
        else:
            if d.kind in ("dense", "conv") and any(e is not None for e in drop_layers(d, lv.specs[path])):
                notes.append(f"{lv.label[path]}: {d.strategy} split without a partner is not modelled")
            continue
        k = lv.count[path]
        items += [CommItem(i.kind, i.axes, i.size, i.group_size, i.count * k, lv.label[path], i.why) for i in new]
    return items


def _stream_bytes(size: float, width: int, s: Scope) -> float:
    """Bytes per device of the feature-split residual stream a table's lookup (``size`` bytes) starts: what its
    norms of the table's ``width`` read, traced (their calls' mean, weighted by their layers), else ``size``.

    The stream can be longer than the lookup: LLaVA concatenates 16 projected image patches before its 24 text
    tokens, and XLA gathers the 40-token stream behind each norm, never the 24-token lookup alone (fsdp=2,model=4:
    13 gathers of f32[4,40,128]); priced at the lookup's size, the model all-gathers were 0.66x the compiled
    ones and the estimate 0.89x the compiled collectives."""
    total = n = 0.0
    for p, x in s.lv.decisions.items():
        if x.kind != "norm" or tuple(body(x)) != (width,) or p.endswith("bias"):
            continue
        acts = [a for a in acts_for(s.activations, x.unit) if a.output and a.output[-1] == width]
        if not acts:
            return size
        k = s.lv.count[p] * layers(x)
        total += k * sum(s.nbytes(a.output) for a in acts) / len(acts)
        n += k
    return total / n if n else size


def _embedding_items(path: str, d: Any, axes: tuple[str, ...], s: Scope, *, notes: list[str]) -> list[CommItem]:
    """A vocab-split lookup sums its rows; a feature-split one gathers them; a tied output adds the head's."""
    n, b = s.size(axes), body(d)
    split_vocab = _split_vocab(path, d, axes, s)
    # a table of more dims (Gemma 3n's per-layer inputs, (vocab, layers, width)) looks up all its trailing dims
    # per row, and its unit's calls are another table's (the token table's, in the same embedder)
    acts = acts_for(s.activations, d.unit) if len(b) == 2 else []
    looks = (s.lookups or {}).get(path, 1)  # a table the encoder and the decoder both look up (T5)
    # the ids its lookups gather, traced (one codebook's of a multi-codebook input; the encoder's and the
    # decoder's of a shared table: each lookup is summed apart, priced at their mean), else the batch's tokens
    looked = s.lookup_rows.get(path)
    rows = looked * s.batch.size / s.shards / looks if looked else s.rows_local
    size = s.nbytes(acts[0].output) if acts else rows * (math.prod(b[1:]) if split_vocab else b[-1]) * s.act_item
    if split_vocab and s.backend == "tpu" and s.parts is not None:
        # XLA:TPU sums the split rows in the dtype the lookup made them in, traced: a float32 table looked up as it
        # is in a bfloat16 model (transformers' GPT-J: f32[4,32,64], measured on v5e:2x4 data=2,model=4)
        cast = (s.cast_to or {}).get(path)
        size = size / s.act_item * (acts[0].itemsize if acts else itemsize(cast) if cast else leaf_itemsize(d))
    if not split_vocab and score_bias(path, d, axes, s):
        return []  # its columns split with the scores' heads: XLA adds each device's heads to its own scores
    lv = s.lv  # a feature-split lookup keeps the residual stream split: gathered behind each norm too
    to_stream = feeds_stream(path, d, axes, s)
    table = next((t for t in s.conditions or {} if lv.rep(t) == path), None)
    if table is not None and not split_vocab:
        # the split conditioning vector, gathered for each modulation that reads it (measured on the linen
        # probe's 2-block DiT: 4 gathers, the lookup's and one per adaLN kernel and the final one)
        stream = sum(layers(lv.decisions[lv.rep(k)]) for k in s.conditions[table])
    elif not to_stream:
        stream = 0
    elif s.backend == "tpu":  # XLA:TPU gathers it again for each split kernel's transpose
        stream = tpu_stream_gathers(s, axes, b[-1]) - 1  # the lookup's own item below counts one
    else:
        stream = stream_gathers(((p, x.kind, body(x), lv.count[p] * layers(x)) for p, x in lv.decisions.items()),
                                b[-1]) - 1
    # XLA:TPU gathers the stream for the kernels that read it: a float32 stream as bfloat16
    gathered = gathered_bytes(_stream_bytes(size, b[-1], s) if to_stream and table is None else size,
                              s.act_item, s.backend == "tpu" and to_stream)
    count, why = looks + stream, "them (forward) and " + (
        "the conditioning vector for each modulation reading it" if table is not None else
        "the feature-split residual stream behind each norm")
    if to_stream and any(w == b[-1] and set(axes) <= ax for w, ax in constrained_stream(s)[1].items()):
        # a model's constraint splits the stream so too (EasyDeL's and MaxText's hidden states): the lookup comes
        # out in its layout, and each pair prices its own gathers of the stream (_constrained_items); left is the
        # final norm's output, gathered for the output head (measured, tests/test_streamed_table.py)
        count, why = 1, "the stream the model's constraint splits, behind the final norm for the output head"
    items = [CommItem("all-reduce", axes, size, n, looks, path, "vocab-split embedding: sum the looked-up rows "
                      "(forward)") if split_vocab else
             CommItem("all-gather", axes, gathered, n, count, path, f"embedding split on its features: gather {why}")]
    if to_stream:
        items += update_gathers(s, axes, [p for p, x in lv.decisions.items() if p != path and b[-1] in body(x)])
    elif table is not None and not split_vocab:
        items += update_gathers(s, axes, conditioned_leaves(s, table, axes), "a leaf whole on the tensor axis "
                                "whose gradient the feature-split conditioning vector splits")
    attend = acts_for(s.activations, d.unit + ":attend")
    if not is_tied(path, d, s):
        return items
    if not split_vocab:  # the logits contract the split features: every device holds partial logits
        rows = math.prod(attend[0].output[:-1]) * (1 / s.shards if attend[0].output[0] in s.batch_leads else 1) \
            if attend else s.rows_of(path)
        return items + [
            CommItem("all-reduce", axes, rows * b[0] * s.act_item, n, 1, path,
                     "tied embedding split on its features: sum the partial logits (forward)"),
            CommItem("all-gather", axes, size, n, 1, path,
                     "tied embedding split on its features: gather the logits' input gradient (backward)")]
    a = attend[0] if attend else None
    in_size = s.nbytes(a.inputs[0], path) if a else s.rows_of(path) * b[-1] * s.act_item
    items += _head_items(axes, n, in_size, (a.output if a else None), s, path, "tied output embedding")
    if not attend and s.tied is None:
        notes.append(f"{path}: assumed tied to the output (no head layer found)")
    return items


def _column_items(path: str, d: Any, axes: tuple[str, ...], s: Scope) -> list[CommItem]:
    n, b = s.size(axes), body(d)
    acts = acts_for(s.activations, d.unit)
    a = acts[0] if acts else None
    # behind frozen layers only (a trained head on a frozen model) its input has no gradient to sum
    in_size = 0 if (s.widths or {}).get(path) == 0 else \
        s.nbytes(a.inputs[0], path) if a else s.rows_of(path) * b[0] * s.act_item
    if d.kind == "head":  # the planner marks output heads
        return _head_items(axes, n, in_size, (a.output if a else None), s, path, "vocab-split output head")
    out_size = s.nbytes(a.output, path) if a else s.rows_of(path) * b[-1] * s.act_item
    calls, inputs, chained, resid = _calls(s, path)
    # read by whole kernels, the split output is gathered (or their partial outputs summed) at each of them
    # (cost/whole.py prices it there); else gathered once, where it is read whole: upsampled on the way
    # (Traced.grown), at the size it grew to
    grown = s.grown.get(path, 1.0)
    if path in s.reduced:  # only reduced row by row (an RBM's log-cosh sum): one value per row all-reduced
        items = [CommItem("all-reduce", axes, s.rows_of(path) * 4, n, layers(d), path,
                          "column layer without a row partner whose split output is only reduced row by row: "
                          "sum each row's partial reduction (forward)")]
    elif (chain := s.chain.get(path) if calls > 1 else None) is not None:
        # one kernel called several times in a chain: its gathers and sums as the planner's chooser counts them,
        # each call at its own rows (cost/chain.py, measured there)
        g_rows, gathers, s_rows, sums = chain_collectives(chain, in_size > 0)
        rows0 = chain[0].rows
        items = [CommItem("all-gather", axes, out_size * g_rows / rows0 / gathers, n, layers(d) * gathers, path,
                          f"column layer without a row partner called {calls} times in a chain: "
                          + ("gather the split stream for each call reading an activation (forward) and again for "
                             "its weight gradient (backward)" if any(c.added for c in chain) else
                             f"gather the split output of each of its {gathers} calls a contraction reads (forward)"))
                 ] if gathers else []
        items += _residual_norm_items(path, d, axes, s) + _downstream_items(path, d, axes, s, out_size)
        if sums:
            items.append(CommItem("all-reduce", axes, in_size * s_rows / rows0 / sums, n, layers(d) * sums, path,
                                  "column layer without a row partner: sum input gradients (backward, at each of "
                                  f"its {sums} calls reading an activation, at its own rows)"))
        return items + _stream_items(path, d, axes, s, layers(d))
    elif chained or resid:
        # a column whose output is added back onto the stream its input comes from (h = inp(x);
        # h = h + d(gelu(h)), each call of one layer applied to several activations of that stream; measured,
        # XLA:CPU data=2,model=4 and fsdp=2,model=4: 1 call 2 gathers, 2 unchained calls 4) prices as the chain:
        # a shared column whose calls are chained through the residual (x = x + d(f(x)) in a Python loop): XLA
        # keeps the residual stream split on the features its split output adds to it, and gathers the stream for
        # each call reading it, for its matmul (forward) and again for its weight gradient (backward; the two
        # spelled with different replica groups, unmerged); a call reading the model's own input reads it whole,
        # and the last call's output, read by the loss alone, stays split (measured, XLA:CPU data=2,model=4 and
        # fsdp=2,model=4: 2, 3 and 4 calls after the input 2, 4 and 6 gathers; 3 calls after a whole layer 6)
        items = [CommItem("all-gather", axes, out_size, n, layers(d) * 2 * (calls - inputs), path,
                          (f"column layer without a row partner called {calls} times, chained through the residual: "
                           if chained else "column layer without a row partner added back onto the stream it reads: ")
                          + "gather the split stream for each call reading an activation (forward) and again for its "
                          "weight gradient (backward)")]
    else:
        items = [] if lone_read(s, path) or path in s.loss_read else [
            CommItem("all-gather", axes, out_size * grown, n, layers(d) * calls, path,
                     ("column layer without a row partner: gather its split output (forward)" if grown == 1 else
                      f"column layer without a row partner: gather its split output, upsampled {grown:.3g}x on "
                      "the way (forward)") + (f", at each of its {calls} calls" if calls > 1 else ""))]
    items += _residual_norm_items(path, d, axes, s) + _downstream_items(path, d, axes, s, out_size)
    # each call sums its partial input gradients, but a call reading the model's own input, whose gradient the
    # step never computes
    items.append(CommItem("all-reduce", axes, in_size, n, layers(d) * (calls - inputs if calls > 1 else 1), path,
                          "column layer without a row partner: sum input gradients (backward"
                          + (f", at each of its {calls - inputs} calls reading an activation)" if calls > 1 else ")")))
    return items + _stream_items(path, d, axes, s, layers(d))


def _downstream_items(path: str, d: Any, axes: tuple[str, ...], s: Scope, size: float,
                      row: bool = False) -> list[CommItem]:
    """A lone split layer whose output joins a residual stream that runs on through norms (:attr:`Scope.downstream`):
    XLA keeps the stream split on its features from there on, as a feature-split table's (``size``: one call's
    output, the stream's bytes on a device). Each later norm sums its statistics per row across the split (a
    LayerNorm's two, forward and again backward) and its output is gathered for the kernels reading it (once: the
    gathered value serves their weight gradients too); each later layer writing the stream gets its output gradient
    split, gathered. Measured, XLA:CPU data=2,model=4: a lone Dense, column or row, added onto the stream before two
    pre-norm Megatron MLP blocks and a final norm, 3 norm gathers, 2 writer gathers and 6 norm all-reduces of two
    ``f32[4,8]``; a post-norm on the model's output, read by the loss alone, its all-reduces and no gather; a whole
    Dense added onto the stream after it, its output gradient gathered twice (weight and input gradients). The
    whole leaves of the stream's width are updated split (:func:`tpflax._src.cost.stream.split_grads`)."""
    _, norms, gathers, writers, _ = downstream_of(s, path, row) or (0, 0, 0, (), True)
    lv = s.lv
    for w in writers:  # a split writer (a row) gathers its output gradient once, a whole one twice
        r = lv.rep(w)
        gathers += 1 + (r in lv.specs and not set(used_axes(lv.specs[r])) & set(axes))
    n, k = s.size(axes), layers(d)
    return [CommItem("all-gather", axes, size, n, k * gathers, path,
                     "split layer whose output joins the residual stream: XLA keeps the stream split, gathered behind "
                     "each later norm a kernel reads (forward) and for each later writer's output gradient, a whole "
                     "one's twice (backward)")] * bool(gathers) + [
            CommItem("all-reduce", axes, s.rows_of(path) * 4 * 2, n, k * 2 * norms, path,
                     "split layer whose output joins the residual stream: each later norm sums its statistics per "
                     "row across the split stream (forward and backward)")] * bool(norms)


def _residual_norm_items(path: str, d: Any, axes: tuple[str, ...], s: Scope) -> list[CommItem]:
    """A lone split layer added back onto the stream it reads through a norm (``h = h + d(LayerNorm(h))``,
    :attr:`Scope.residual_norms`): XLA keeps the stream split on its features as ``d``'s split output (a column)
    or input (a row) is, so the norm works on the split features and all-reduces its sums per row (float32),
    forward and again backward (measured, XLA:CPU data=2,model=4: a LayerNorm's two ``f32[4,8]`` each way, an
    RMSNorm's one)."""
    sums = (s.residual_norms or {}).get(path, 0)
    if not sums:
        return []
    return [CommItem("all-reduce", axes, s.rows_of(path) * 4 * sums, s.size(axes), layers(d) * 2, path,
                     "split layer added back onto the stream it reads through a norm: the norm runs on the split "
                     "stream and sums its statistics per row (forward and backward)")]


def _stream_items(path: str, d: Any, axes: tuple[str, ...], s: Scope, count: int,
                  rows: tuple[str, ...] = ()) -> list[CommItem]:
    """A column whose split output scales a larger activation (DiT's adaLN, :attr:`Scope.streams`): XLA splits
    the residual stream, gathered for each kernel that reads or writes it. A row of its own pair (DiT's final
    linear, tree-paired with the final modulation) reads the stream split as XLA left it: no gather for it
    (measured on the linen probe's DiT, data=2,model=4: 16 gathers of the stream, 4 per block each way)."""
    stream = (s.streams or {}).get(path)
    if not stream:
        return []
    ratio, width, gathers = stream
    own = s.rows_of(path) * ratio
    gathers -= GATHERS_PER_TOUCH * sum(1 for r in rows if (s.widths or {}).get(r) == width
                                       and s.rows_of(r) == own and s.axes(r, TENSOR))
    return [CommItem("all-gather", axes, own * width * s.act_item, s.size(axes), gathers * count, path,
                     "column layer whose split output scales the residual stream: XLA splits the stream, "
                     "gathered for each kernel that reads or writes it")] if gathers > 0 else []


def _head_items(axes, n: int, in_size: float, out_shape, s: Scope, path: str, what: str) -> list[CommItem]:
    if out_shape:
        local = 1 / s.shards if out_shape[0] in s.batch_leads else 1.0
        rows = math.prod(out_shape[:-1]) * local
    else:
        rows = s.rows_of(path)
    # softmax cross-entropy over a split vocabulary: max, sum of exp and the label's
    # logit are reduced across the split (float32 per row), then the input gradient
    return [CommItem("all-reduce", axes, rows * 4, n, 3, path,
                     f"{what}: max, sum and label logit of the split softmax (forward)"),
            CommItem("all-reduce", axes, in_size, n, 1, path, f"{what}: sum input gradients (backward)")]
